"""Hugging Face transformers models (`hf:SPEC`) in every command, offline: tiny configs written here
with the library's own `save_pretrained` (CLIP, ViT, wav2vec2, a BERT text classifier), counted,
planned, fitted, trained, killed and resumed, evaluated, and started from the library's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runhelpers import KILL_BEFORE_STEP_DRIVER, assert_bitwise_equal, last_model, losses, write_test_gpus
from safetensors.torch import save_file
from typer.testing import CliRunner

from mmkit.cli.app import app

transformers = pytest.importorskip("transformers")  # the `hf` extra
assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: nothing is downloaded

runner = CliRunner()

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
CLASSES = ["a", "b", "c"]


def tiny_configs() -> dict[str, object]:
    vision = {**TINY, "image_size": 32, "patch_size": 8}
    return {
        "clip": transformers.CLIPConfig(text_config={**TINY, "vocab_size": 100, "max_position_embeddings": 16},
                                        vision_config=vision, projection_dim=16),
        "vit": transformers.ViTConfig(**vision),
        "wav2vec2": transformers.Wav2Vec2Config(**TINY, vocab_size=32, conv_dim=(16, 16), conv_kernel=(10, 3),
                                                conv_stride=(5, 2), num_conv_pos_embeddings=16,
                                                num_conv_pos_embedding_groups=2, classifier_proj_size=16),
        "bert": transformers.BertConfig(**TINY, vocab_size=100, max_position_embeddings=64),
    }


# the library's class for each directory; `clip` is the dual encoder (contrastive), `clip-image` its
# image tower with a head, as CLIPForImageClassification saves it
LIBRARY = {"clip": "CLIPModel", "clip-image": "CLIPForImageClassification", "vit": "ViTForImageClassification",
           "wav2vec2": "Wav2Vec2ForSequenceClassification", "bert": "BertForSequenceClassification"}
CONFIG_OF = {"clip-image": "clip"}
TRAINED = ("clip-image", "vit", "wav2vec2", "bert")  # the classifiers; a dual encoder is planned, not trained
INPUT_OF = {"clip-image": "image", "vit": "image", "wav2vec2": "audio", "bert": "text"}
HF_NAME = {"image": "pixel_values", "audio": "input_values", "text": "input_ids"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved by the library (config.json + model.safetensors), 3 labels; a tensor
    file with an image, an audio and a text tensor per sample (48 samples, 3 classes)."""
    root = tmp_path_factory.mktemp("hf")
    configs = tiny_configs()
    torch.manual_seed(0)
    folders = {}
    for name, cls in LIBRARY.items():
        config = configs[CONFIG_OF.get(name, name)]
        config.num_labels = len(CLASSES)
        folders[name] = root / name
        getattr(transformers, cls)(config).save_pretrained(folders[name])
    generator = torch.Generator().manual_seed(0)
    n = 48
    labels = torch.arange(n) % len(CLASSES)
    save_file({
        "image": torch.randn(n, 3, 32, 32, generator=generator) + labels[:, None, None, None],
        "audio": torch.randn(n, 400, generator=generator) + labels[:, None],
        "text": labels[:, None] * 30 + torch.randint(0, 30, (n, 16), generator=generator),
        "label": labels,
        "split": torch.tensor([0] * 32 + [1] * 8 + [2] * 8, dtype=torch.uint8),
    }, str(root / "data.safetensors"), metadata={"classes": json.dumps(CLASSES)})
    folders["data"] = root / "data.safetensors"
    return folders


def invoke(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def library_model(name: str, folder: Path) -> torch.nn.Module:
    return getattr(transformers, LIBRARY[name]).from_pretrained(folder).eval()


@pytest.mark.parametrize("name", LIBRARY)
def test_count_equals_the_library_model(models: dict[str, Path], name: str) -> None:
    doc = invoke("count", f"hf:{models[name]}")
    assert doc["total_params"] == sum(p.numel() for p in library_model(name, models[name]).parameters())
    assert doc["config"]["task"] == ("contrastive" if name == "clip" else
                                     "audio-classification" if name == "wav2vec2" else
                                     "sequence-classification" if name == "bert" else "image-classification")


def test_a_model_type_counts_its_default_config() -> None:
    doc = invoke("count", "hf:clip")  # CLIPModel(CLIPConfig()): ViT-B/32 and its text tower
    assert doc["total_params"] == 151_277_313
    assert doc["config"]["inputs"] == {"pixel_values": {"shape": [3, 224, 224], "dtype": "float32", "high": None},
                                       "input_ids": {"shape": [77], "dtype": "int64", "high": 49408}}


@pytest.mark.parametrize("name", ["clip", "vit", "wav2vec2", "bert"])
def test_the_simulated_peak_is_a_real_cpu_step(models: dict[str, Path], name: str) -> None:
    # wav2vec2's LayerDrop skips layers at random; the plan is the step that skips none
    extra = ("--set", "model.seq_len=400", "--set", "model.layerdrop=0") if name == "wav2vec2" else ()
    doc = invoke("memory-plan", f"hf:{models[name]}", *extra, "--gpu", "rtx3050", "--batch-size", "4",
                 "--precision", "fp32", "--measure")
    measure = doc["measure"]
    assert measure["device"] == "cpu" and measure["measured_peak_tensors"] > 0
    assert abs(measure["measured_peak_tensors"] - measure["predicted_peak_tensors"]) <= 0.03 * measure[
        "measured_peak_tensors"]
    train = doc["train"]
    assert sum(train[c] for c in ("weights", "gradients", "optimizer", "activations", "other")) == train["peak_tensors"]


@pytest.mark.slow
def test_clip_of_the_default_config_is_fitted_to_the_laptop_gpu_offline() -> None:
    """The issue's case: `memory-plan hf:clip --gpu rtx3050 --batch-size auto`, nothing downloaded
    (about 10 s on an idle 2-core CPU: docs/hf-models.md)."""
    doc = invoke("memory-plan", "hf:clip", "--gpu", "rtx3050", "--batch-size", "auto")
    train = doc["train"]
    assert doc["fits"] and doc["auto"]["batch_size"] and doc["why"]["next_batch"]["fits"] is False
    assert sum(train[c] for c in ("weights", "gradients", "optimizer", "activations", "other")) == train["peak_tensors"]
    assert train["weights"] >= 151_277_313 * 4  # CLIPModel(CLIPConfig())'s parameters, fp32


@pytest.mark.parametrize("name", ["clip", "vit", "wav2vec2", "bert"])
def test_the_auto_batch_is_the_largest_that_fits(models: dict[str, Path], name: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKIT_PRESET_PATH", str(write_test_gpus(tmp_path, {"gpu-48m": 0.046875})))
    extra = ("--set", "model.seq_len=400") if name == "wav2vec2" else ()
    doc = invoke("memory-plan", f"hf:{models[name]}", *extra, "--gpu", "gpu-48m", "--batch-size", "auto",
                 "--set", "max_batch_size=1000000", "--precision", "fp32")
    assert doc["fits"] and doc["auto"]["batch_size"] and doc["train"]["total"] <= doc["budget_bytes"]
    following = doc["why"]["next_batch"]
    assert following["batch_size"] == doc["batch_size"] + 1
    assert following["simulated"] and not following["fits"] and following["total"] > doc["budget_bytes"]


TRAIN = ("--epochs", "2", "--batch-size", "8", "--train-fraction", "1", "--set", "precision=fp32",
         "--set", "checkpoint_every_steps=3")


@pytest.mark.parametrize("name", TRAINED)
def test_train_kill_9_resume_is_bitwise_identical_and_eval_reads_the_run(models: dict[str, Path], tmp_path: Path,
                                                                          name: str) -> None:
    args = ("train", f"hf:{models[name]}", "--data", str(models["data"]), "--weights", str(models[name]), *TRAIN)
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_BEFORE_STEP_DRIVER)
    killed = tmp_path / "killed"  # started first: it runs while the whole run trains here
    process = subprocess.Popen([sys.executable, str(driver), "7", *args, "--out", str(killed)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    whole = tmp_path / "whole"
    result = runner.invoke(app, [*args, "--out", str(whole)])
    assert result.exit_code == 0, result.output
    assert f"weights: {len(last_model(whole))} tensors loaded from {models[name]} (100.00% of" in result.output
    run_json = json.loads((whole / "run.json").read_text())
    assert run_json["model_source"]["kind"] == "hf" and run_json["weights"]["path"] == str(models[name])
    assert run_json["model_settings"]["feed"] == {INPUT_OF[name]: HF_NAME[INPUT_OF[name]]}

    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, stderr
    result = runner.invoke(app, ["resume", str(killed)])
    assert result.exit_code == 0, result.output
    assert "from step-00000006" in result.output  # mid-epoch 2: step 7 is trained again
    assert "weights:" not in result.output  # a resume's weights are its checkpoint's
    assert_bitwise_equal(last_model(whole), last_model(killed))
    assert losses(whole) == losses(killed)

    metrics = invoke("eval", str(killed))
    assert metrics["n"] == 8 and sum(map(sum, metrics["confusion_matrix"])) == 8
    assert metrics["accuracy"] == json.loads((whole / "metrics.json").read_text())["accuracy"]


@pytest.mark.parametrize("name", ["clip-image", "vit", "wav2vec2", "bert"])
def test_weights_reproduce_the_library_logits(models: dict[str, Path], name: str) -> None:
    """What `train --weights` starts from: the run's model, built as train builds it, gives the
    library's own logits, to the bit."""
    from mmkit.train.engine import build_training_model
    from mmkit.train.report import SilentReporter
    from mmkit.train.resolve import RunOptions, resolve_run

    resolved = resolve_run(RunOptions(model=f"hf:{models[name]}", data=str(models["data"]), precision="fp32",
                                      batch_size=8, weights=str(models[name])))
    model = build_training_model(resolved.run_config(), torch.device("cpu"), SilentReporter()).eval()
    assert resolved.dataset is not None
    tensor = INPUT_OF[name]
    batch = resolved.dataset.inputs[tensor][:4]
    with torch.no_grad():
        ours = model(**{tensor: batch}).logits
        theirs = library_model(name, models[name])(**{HF_NAME[tensor]: batch}).logits
    assert torch.equal(ours, theirs)


def test_weights_of_another_head_width_load_all_but_the_head(models: dict[str, Path]) -> None:
    from mmkit.models.registry import build_model, get_model_entry
    from mmkit.models.spec import complete_factory_config
    from mmkit.models.weights import load_weights

    entry = get_model_entry(f"hf:{models['vit']}")
    config = complete_factory_config(entry, entry.sizes["default"], num_classes=5)
    plan = load_weights(build_model(entry, config), str(models["vit"]))
    line = plan.describe()
    assert sorted(m[0] for m in plan.mismatched) == ["classifier.bias", "classifier.weight"]
    assert "classifier.weight: file [3, 32], model [5, 32]" in line and "a classification head is expected" in line
    assert not plan.missing and not plan.unexpected and "\n" not in line


def test_weights_of_the_base_model_go_under_its_prefix(models: dict[str, Path], tmp_path: Path) -> None:
    from mmkit.models.registry import build_model, get_model_entry
    from mmkit.models.spec import complete_factory_config
    from mmkit.models.weights import load_weights

    base = transformers.ViTModel(transformers.ViTConfig.from_pretrained(models["vit"]), add_pooling_layer=False)
    base.save_pretrained(tmp_path / "base")
    entry = get_model_entry(f"hf:{models['vit']}")
    model = build_model(entry, complete_factory_config(entry, entry.sizes["default"]))
    plan = load_weights(model, str(tmp_path / "base"))
    assert plan.missing == ("classifier.weight", "classifier.bias") and not plan.unexpected
    assert torch.equal(model.net.vit.embeddings.cls_token, base.embeddings.cls_token)


def test_a_sharded_checkpoint_loads_through_its_index(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mmkit.models.registry import build_model, get_model_entry
    from mmkit.models.spec import complete_factory_config
    from mmkit.models.weights import load_weights, weight_files

    tensors = load_file(models["bert"] / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [f.name for f in weight_files(str(tmp_path))] == list(shards)
    entry = get_model_entry(f"hf:{models['bert']}")
    model = build_model(entry, complete_factory_config(entry, entry.sizes["default"]))
    plan = load_weights(model, str(tmp_path))
    assert len(plan.mapping) == len(tensors) and not plan.missing and not plan.unexpected
    assert torch.equal(model.net.classifier.weight, tensors["classifier.weight"])


def test_a_dual_encoder_is_planned_not_trained(models: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", f"hf:{models['clip']}", "--data", str(models["data"]),
                                 "--out", str(tmp_path / "R")])
    assert result.exit_code == 2
    assert "task contrastive is planned (count, memory-plan) but not trained" in result.stderr
    assert not (tmp_path / "R" / "run.json").exists()


BAD = {
    "hub-id-offline": (("count", "hf:mmkit-tests/no-such-model"),
                       "tried to read config.json of Hub repository 'mmkit-tests/no-such-model' (the config alone, "
                       "no weights): not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
    "unknown-task": (("count", "hf:vit", "--set", "task=segmentation"), "unknown task 'segmentation' for an hf: "
                     "model; valid: image-classification, audio-classification, sequence-classification, contrastive"),
    "task-without-head": (("count", "hf:bert", "--set", "task=image-classification"),
                          "model type 'bert' has no image-classification head"),
    "unknown-setting": (("count", "hf:vit", "--set", "hiden_size=8"), "unknown model setting 'hiden_size'"),
    "missing-dir": (("count", "hf:./no/such/dir"), "no/such/dir not found"),
    "pickle": (("train", "hf:{vit}", "--data", "{data}", "--weights", "{bin}"),
               "pytorch_model.bin is a pickle, which mmkit never loads (unpickling runs code); convert it"),
    "pickle-dir": (("train", "hf:{vit}", "--data", "{data}", "--weights", "{bindir}"),
                   "holds pytorch_model.bin, a pickle, which mmkit never loads"),
    "weights-of-another-model": (("train", "hf:{vit}", "--data", "{data}", "--weights", "{bert}"),
                                 "2 of its 41 tensors match the model by name and shape, 0.4% of its values"),
    "data-without-the-input": (("train", "hf:{wav2vec2}", "--data", "synthetic-cifar"),
                               "takes input_values: the data has no tensor named 'input_values' or 'audio'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_hf_input_is_one_line_and_exit_2(models: dict[str, Path], tmp_path: Path, case: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pytorch_model.bin").write_bytes(b"not read")
    places = {**{k: str(v) for k, v in models.items()}, "bin": str(bindir / "pytorch_model.bin"), "bindir": str(bindir)}
    args, expected = BAD[case]
    args = tuple(a.format(**places) for a in args)
    result = runner.invoke(app, [*args, *(("--out", str(tmp_path / "R")) if args[0] == "train" else ())])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmkit: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "R" / "run.json").exists()


def test_a_hub_id_without_network_says_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo_id: str, filename: str, **kwargs: object) -> str:
        assert filename == "config.json"  # never weights
        raise LocalEntryNotFoundError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # as on a machine that tries the network and has none
    result = runner.invoke(app, ["count", "hf:owner/some-model"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "mmkit: error: model 'hf:owner/some-model': tried to read config.json of Hub repository 'owner/some-model' "
        "(the config alone, no weights): not in the Hugging Face cache, and the Hub could not be reached; give a "
        "local directory (hf:path/to/dir) or a model type (hf:vit)")


def test_without_transformers_an_hf_spec_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails, as uninstalled
    for args in (("count", "hf:vit"), ("memory-plan", "hf:vit", "--gpu", "rtx3050")):
        result = runner.invoke(app, list(args))
        assert result.exit_code == 2
        assert result.stderr.strip() == ("mmkit: error: model 'hf:vit': hf: models need transformers and "
                                         "huggingface_hub (transformers is not installed): pip install 'mmkit-cli[hf]'")
