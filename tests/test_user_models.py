"""A user's own model in every command: a plain factory in a file, a `@register_model` family in a
file, and a family an installed package offers through the `mmkit.models` entry-point group. The
models are written here, into a temporary directory; none of them is one of mmkit's."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from mmkit.cli.app import app
from runhelpers import KILL_BEFORE_STEP_DRIVER, assert_bitwise_equal, last_model, losses

runner = CliRunner()

PLAIN = '''
import torch
from torch import nn


class ThreeInputs(nn.Module):
    """Audio frames (float32), token ids (int64) and a small image (uint8) into class logits."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(8, hidden), nn.GELU())
        self.tokens = nn.Embedding(20, hidden)
        self.image = nn.Conv2d(3, hidden, 3, padding=1)
        self.head = nn.Linear(3 * hidden, num_classes)

    def forward(self, audio, tokens, image):
        a = self.audio(audio).mean(1)                     # (B, H)
        t = self.tokens(tokens).mean(1)                   # (B, H)
        i = self.image(image.float() / 255).mean((2, 3))  # (B, H)
        return {"logits": self.head(torch.cat([a, t, i], dim=1)), "features": a}


def build(num_classes: int = 4, hidden: int = 16) -> nn.Module:
    return ThreeInputs(num_classes, hidden)


def broken(num_classes: int = 4) -> nn.Module:
    raise RuntimeError("weights not found on this laptop")


def embedder() -> nn.Module:
    return nn.Linear(8, 3)  # [B, T, 3] per frame: no class logits


def not_a_module() -> int:
    return 3
'''

FAMILY = '''
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmkit.models.base import InputSpec, ModelConfig, MultimodalModel, register_model


class {cls}Config(ModelConfig):
    seq: int = 256
    in_dim: int = 8
    hidden: int = 64

    @property
    def width(self) -> int:
        return self.hidden

    def at_width(self, width: int) -> "{cls}Config":
        return self.model_copy(update={{"hidden": width}})

    @classmethod
    def overrides_for_inputs(cls, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        seq, in_dim = shapes["x"]
        return {{"seq": seq, "in_dim": in_dim}}


class {cls}(MultimodalModel):
    def __init__(self, config: {cls}Config) -> None:
        super().__init__(config)
        self.body = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.ReLU())
        self.head = nn.Linear(config.hidden, config.num_classes)

    def input_specs(self) -> dict[str, InputSpec]:
        return {{"x": InputSpec((self.config.seq, self.config.in_dim))}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(1))  # (B, C)


@register_model(sizes={{"small": {cls}Config(num_classes=4, hidden=16), "big": {cls}Config(num_classes=4, hidden=256)}},
                default_size="small", ladder=(1024, 512, 256, 128, 64, 32, 16), default_data="")
def {name}(config: {cls}Config) -> {cls}:
    """A per-frame perceptron, averaged over time."""
    return {cls}(config)
'''

PLAIN_INPUTS = ("--input", "audio=6x8", "--input", "tokens=5:int64:20", "--input", "image=3x4x4:uint8:256")
SPECS = {"plain": "plain.py:build", "family": "family.py:twolayer", "entry-point": "epfam"}
INPUTS = {"plain": PLAIN_INPUTS, "family": (), "entry-point": ()}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's project: two model files, a tensor file, and an installed package offering `epfam`."""
    root = tmp_path_factory.mktemp("project")
    (root / "plain.py").write_text(PLAIN)
    (root / "family.py").write_text(FAMILY.format(cls="TwoLayer", name="twolayer"))
    site = root / "site"
    (site / "mmkit_epfam").mkdir(parents=True)
    (site / "mmkit_epfam" / "__init__.py").write_text(FAMILY.format(cls="EpNet", name="epfam"))
    dist = site / "mmkit_epfam-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmkit-epfam\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmkit.models]\nepfam = mmkit_epfam\n")
    generator = torch.Generator().manual_seed(0)
    n = 96
    labels = torch.arange(n) % 4
    save_file({
        "audio": torch.randn(n, 6, 8, generator=generator) + labels[:, None, None] * 0.5,
        "tokens": (labels[:, None] * 4 + torch.randint(0, 4, (n, 5), generator=generator)),
        "image": torch.randint(0, 256, (n, 3, 4, 4), generator=generator).to(torch.uint8),
        "x": torch.randn(n, 4, 8, generator=generator) + labels[:, None, None] * 0.5,
        "label": labels,
        "split": torch.tensor([0] * 64 + [1] * 16 + [2] * 16, dtype=torch.uint8),
    }, str(root / "all.safetensors"), metadata={"classes": json.dumps(["a", "b", "c", "d"])})
    return root


@pytest.fixture(scope="module", autouse=True)
def forget_the_families() -> Iterator[None]:
    """The families these tests register leave the registry with them (other tests list it)."""
    from mmkit.models import base
    from mmkit.models.registry import list_models

    list_models()  # the built-in families register now, so that they are not taken for these tests' own
    before = set(base.registered())
    yield
    for name in set(base.registered()) - before:
        del base._ENTRIES[name]
    sys.modules.pop("mmkit_epfam", None)


@pytest.fixture(autouse=True)
def in_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands run from the project, with the package installed (on sys.path, as pip puts it)."""
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project / "site"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(project / "site"), os.environ.get("PYTHONPATH", "")]))
    importlib.invalidate_caches()


def invoke(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def real_module(kind: str, project: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The user's module built by the user's own code, and one sample of its inputs."""
    if kind == "plain":
        spec = importlib.util.spec_from_file_location("plain_for_test", project / "plain.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        inputs = {"audio": torch.randn(1, 6, 8), "tokens": torch.randint(0, 20, (1, 5)),
                  "image": torch.randint(0, 256, (1, 3, 4, 4)).to(torch.uint8)}
        return module.build(), inputs
    from mmkit.models.registry import get_model_entry  # the families register through mmkit's decorator

    entry = get_model_entry(SPECS[kind])
    model = entry.build(entry.sizes[entry.default_size])
    return model, {"x": torch.randn(1, 256, 8)}


@pytest.mark.parametrize("kind", SPECS)
def test_count_equals_the_real_module(project: Path, kind: str) -> None:
    doc = invoke("count", SPECS[kind], *INPUTS[kind])
    model, inputs = real_module(kind, project)
    assert doc["total_params"] == sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter:
        model(**inputs)
    assert doc["flops_per_sample"] == counter.get_total_flops() > 0


def test_a_module_nobody_here_wrote_counts_like_torch() -> None:
    doc = invoke("count", "torch.nn:Transformer", "--input", "src=10x512", "--input", "tgt=20x512",
                 "--set", "batch_first=true")
    assert doc["total_params"] == 44_140_544 == sum(p.numel() for p in torch.nn.Transformer().parameters())
    assert [c["name"] for c in doc["components"]] == ["encoder", "decoder"]


@pytest.mark.parametrize("kind", SPECS)
def test_the_simulated_peak_equals_a_real_cpu_step(kind: str) -> None:
    doc = invoke("memory-plan", SPECS[kind], *INPUTS[kind], "--gpu", "rtx3050", "--batch-size", "8",
                 "--precision", "fp32", "--size", "default" if kind == "plain" else "small", "--measure")
    assert doc["measure"]["device"] == "cpu"
    assert doc["measure"]["measured_peak_tensors"] == doc["measure"]["predicted_peak_tensors"] > 0


@pytest.mark.parametrize("kind", SPECS)
def test_the_auto_batch_is_the_largest_that_fits(kind: str) -> None:
    big = ("--input", "audio=2048x8", "--input", "tokens=5:int64:20", "--input", "image=3x4x4:uint8:256",
           "--set", "model.hidden=512") if kind == "plain" else ()
    doc = invoke("memory-plan", SPECS[kind], *big, "--gpu", "rtx3050", "--batch-size", "auto",
                 "--set", "max_batch_size=1000000", "--precision", "fp32")
    assert doc["fits"] and doc["auto"]["batch_size"]
    following = doc["why"]["next_batch"]
    assert following["batch_size"] == doc["batch_size"] + 1
    assert following["simulated"] and not following["fits"] and following["total"] > doc["budget_bytes"]
    if kind != "plain":  # a registered family fits its width too (the preset's size is auto): the widest
        assert doc["auto"]["size"] and doc["width"] == 1024 and doc["why"]["next_width"] is None
    else:
        assert doc["size"] == "default" and doc["width"] is None


TRAIN = ("--data", "all.safetensors", "--epochs", "2", "--batch-size", "8", "--set", "checkpoint_every_steps=3")


@pytest.mark.parametrize("kind", SPECS)
def test_train_kill_9_resume_is_bitwise_identical_and_eval_reads_the_run(project: Path, tmp_path: Path,
                                                                          kind: str) -> None:
    whole = tmp_path / "whole"
    result = runner.invoke(app, ["train", SPECS[kind], *TRAIN, "--out", str(whole)])
    assert result.exit_code == 0, result.output
    run_json = json.loads((whole / "run.json").read_text())
    if kind != "entry-point":
        source = run_json["model_source"]
        assert source["kind"] == "file" and Path(source["path"]).parent == project
        assert run_json["model"] == f"{source['path']}:{SPECS[kind].split(':')[1]}"  # absolute: resumable anywhere

    killed = tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_BEFORE_STEP_DRIVER)
    process = subprocess.run([sys.executable, str(driver), "8", "train", SPECS[kind], *TRAIN, "--out", str(killed)],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    result = runner.invoke(app, ["resume", str(killed)])
    assert result.exit_code == 0, result.output
    assert "from step-00000006" in result.output  # mid-epoch 2: step 7 is trained again
    assert_bitwise_equal(last_model(whole), last_model(killed))
    assert losses(whole) == losses(killed)

    metrics = invoke("eval", str(killed))
    assert metrics["n"] == 16 and sum(map(sum, metrics["confusion_matrix"])) == 16
    assert metrics["accuracy"] == json.loads((whole / "metrics.json").read_text())["accuracy"]


def test_compare_a_file_model_with_an_installed_family(project: Path) -> None:
    doc = invoke("compare", "plain.py:build", "epfam:small", "--data", "all.safetensors", "--seeds", "1",
                 "--epochs", "1")
    assert (doc["a"]["model"], doc["b"]["model"]) == ("plain.py:build", "epfam")
    assert doc["a"]["static"]["params"] == sum(p.numel() for p in real_module("plain", project)[0].parameters())
    assert doc["b"]["static"]["size"] == "small"
    for side in ("a", "b"):  # each trained and evaluated on its own inputs of the one tensor file
        run = doc[side]["learning"]["runs"][0]
        assert 0.0 <= run["accuracy"] <= 1.0 and run["train_seconds"] > 0
        assert doc[side]["speed"]["train_step_seconds"]["median"] > 0


def test_a_changed_model_file_is_refused_on_resume(project: Path, tmp_path: Path) -> None:
    model_file = tmp_path / "mine.py"
    model_file.write_text(PLAIN)
    run = tmp_path / "R"
    result = runner.invoke(app, ["train", f"{model_file}:build", "--data", "all.safetensors", "--epochs", "1",
                                 "--batch-size", "16", "--out", str(run), "--stop-after-epochs", "1"])
    assert result.exit_code == 0, result.output
    model_file.write_text(PLAIN + "\n# tuned the head\n")
    result = runner.invoke(app, ["resume", str(run), "--epochs", "2"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"mmkit: error: the run's model file {model_file} changed since the run was written (sha256 "
        + result.stderr.split("(sha256 ")[1].strip()]
    assert "--allow-changed-model" in result.stderr
    result = runner.invoke(app, ["resume", str(run), "--epochs", "2", "--allow-changed-model"])
    assert result.exit_code == 0, result.output
    assert "changed since the run was written; using it as it is now" in result.stderr
    model_file.unlink()
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"mmkit: error: the run's model file is missing: expected {model_file} "
                                     f"(model '{model_file}:build')")


BAD = {
    "missing-file": (("count", "nothere.py:build"), "file not found"),
    "missing-factory": (("count", "plain.py:nosuch"), "plain.py has no 'nosuch'; it defines"),
    "missing-module": (("count", "nosuchpkg.models:build"), "no module named 'nosuchpkg'"),
    "factory-raises": (("count", "plain.py:broken", "--input", "a=2"),
                       "the factory raised RuntimeError: weights not found on this laptop"),
    "not-a-module": (("count", "plain.py:not_a_module", "--input", "a=2"), "returned int, not a torch.nn.Module"),
    "unknown-kwarg": (("count", "plain.py:build", *PLAIN_INPUTS, "--set", "depth=3"),
                      "the factory takes no argument 'depth'; it takes num_classes, hidden"),
    "no-inputs": (("count", "plain.py:build"), "describe its inputs with --input"),
    "input-rejected": (("count", "plain.py:build", "--input", "audio=6x9", "--input", "tokens=5:int64:20",
                        "--input", "image=3x4x4:uint8:256"), "forward raised RuntimeError"),
    "no-logits": (("memory-plan", "plain.py:embedder", "--input", "input=7x8", "--gpu", "rtx3050"),
                  "training needs class logits [batch, classes]; forward returned a tensor of shape [2, 7, 3]"),
    "input-syntax": (("count", "plain.py:build", "--input", "audio=6by8"), "is not dimensions joined by x"),
    "input-dtype": (("count", "plain.py:build", "--input", "audio=6x8:float8"), "unknown dtype 'float8'"),
    "input-int-bound": (("count", "plain.py:build", "--input", "tokens=5:int64"), "needs the upper bound"),
    "input-twice": (("count", "plain.py:build", "--input", "a=2", "--input", "a=3"), "--input a is given twice"),
    "input-for-a-family": (("count", "multichannel", "--input", "color=3072"), "describes a plain factory's inputs"),
    "auto-size": (("memory-plan", "plain.py:build", *PLAIN_INPUTS, "--size", "auto", "--gpu", "rtx3050"),
                  "--size auto needs a size ladder"),
    "train-without-data": (("train", "plain.py:build", *PLAIN_INPUTS), "training needs data; give --data"),
    "bad-spec": (("count", "plain.py:build-it"), "expected NAME, package.module:factory, path/to/file.py:factory or hf:SPEC"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_model_input_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    args, expected = BAD[case]
    result = runner.invoke(app, [*args, *(("--out", str(tmp_path / "R")) if args[0] == "train" else ())])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmkit: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_two_processes_train_a_file_model_and_resume_it_from_run_json(tmp_path: Path) -> None:
    run = tmp_path / "R"
    base = [sys.executable, "-m", "mmkit"]
    process = subprocess.run([*base, "train", "plain.py:build", "--data", "all.safetensors", "--epochs", "1",
                              "--batch-size", "8", "--nproc-per-node", "2", "--out", str(run)],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    # both ranks rebuild the model from run.json's spec, from another working directory
    process = subprocess.run([*base, "resume", str(run), "--epochs", "2", "--nproc-per-node", "2"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert [record["epoch"] for record in map(json.loads, (run / "history.jsonl").read_text().splitlines())] == [1, 2]


def test_the_users_traceback_comes_with_mmkit_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["count", "plain.py:build", "--input", "audio=6x9", "--input", "tokens=5:int64:20",
            "--input", "image=3x4x4:uint8:256"]
    quiet = runner.invoke(app, args)
    assert quiet.exit_code == 2 and "Traceback" not in quiet.stderr
    monkeypatch.setenv("MMKIT_DEBUG", "1")
    loud = runner.invoke(app, args)
    assert loud.exit_code == 2
    assert "Traceback" in loud.stderr and 'plain.py", line' in loud.stderr  # the user's own frames
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_create_model_takes_a_spec_in_python(project: Path) -> None:
    from mmkit.models import create_model

    model = create_model("plain.py:build", hidden=8, num_classes=3)
    output = model(audio=torch.randn(2, 6, 8), tokens=torch.randint(0, 20, (2, 5)),
                   image=torch.randint(0, 256, (2, 3, 4, 4)).to(torch.uint8))
    assert output["logits"].shape == (2, 3)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in real_module("plain", project)[0].__class__(3, 8).parameters())
