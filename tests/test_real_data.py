"""Real datasets from their official on-disk formats, written here in tiny form: RAVDESS and
CREMA-D trees (WAV tones, MP4/FLV videos through PyAV), CIFAR-10 binary batches, Fashion-MNIST IDX
files; `mmkit data prepare` / `mmkit data info`; training and evaluating on the results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from official_formats import (
    idx_bytes,
    write_cifar10,
    write_crema_d_tree,
    write_fashion_mnist,
    write_ravdess_tree,
    write_tone_wav,
)
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.data.catalog import CIFAR_CLASSES, FASHION_CLASSES, RAVDESS_EMOTIONS
from mmkit.data.datasets import load_dataset
from mmkit.data.formats import PrepareOptions, prepare_source
from mmkit.data.formats.cifar10 import luma
from mmkit.data.formats.emotion import format_actors, parse_actors
from mmkit.data.formats.fashion_mnist import NEUTRAL_PROMPT
from mmkit.data.formats.ravdess import parse_ravdess_name
from mmkit.data.synthetic import CLASS_PROMPTS
from mmkit.data.tensorfile import read_tensor_file
from mmkit.data.tokenizer import decode
from mmkit.errors import MmkitError

runner = CliRunner()

# the audio settings of the tiny trees: 0.5 s → 50 frames of 32 bands; video 4 frames of 16×16
TINY_AUDIO = ("--audio-seconds", "0.5", "--n-mels", "32")
TINY_VIDEO = ("--frames", "4", "--frame-size", "16")


def invoke(*args: str):
    return runner.invoke(app, list(args))


def one_line_exit_2(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmkit: error: ") and expected in lines[0], result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


# --- RAVDESS ------------------------------------------------------------------------------------


def test_ravdess_names_parse_or_fail_naming_the_field() -> None:
    name = parse_ravdess_name(Path("03-01-05-02-01-02-12.wav"))
    assert (name.modality, name.channel, name.emotion, name.intensity, name.actor) == (3, 1, 5, 2, 12)
    assert RAVDESS_EMOTIONS[name.emotion - 1] == "angry"
    with pytest.raises(MmkitError, match=r"emotion 09 is outside 01–08"):
        parse_ravdess_name(Path("03-01-09-01-01-01-01.wav"))
    with pytest.raises(MmkitError, match=r"actor 25 is outside 01–24"):
        parse_ravdess_name(Path("03-01-01-01-01-01-25.wav"))
    with pytest.raises(MmkitError, match=r"not a RAVDESS file name"):
        parse_ravdess_name(Path("speech_take.wav"))
    with pytest.raises(MmkitError, match=r"modality 01 does not fit a \.wav file"):
        parse_ravdess_name(Path("01-01-01-01-01-01-01.wav"))


def test_actor_lists_and_ranges() -> None:
    assert parse_actors("21-24") == (21, 22, 23, 24)
    assert parse_actors("1,3, 5-7") == (1, 3, 5, 6, 7)
    assert format_actors((1, 2, 3, 4, 7)) == "1–4, 7"
    with pytest.raises(MmkitError, match="not a list of actor ids"):
        parse_actors("a-b")


@pytest.fixture(scope="module")
def ravdess_av(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny RAVDESS tree with audio and video, and its prepared tensor file."""
    pytest.importorskip("av")
    root = write_ravdess_tree(tmp_path_factory.mktemp("ravdess"), video=True)
    out = root.parent / "ravdess.safetensors"
    result = invoke("data", "prepare", str(root), "--format", "ravdess", "--out", str(out),
                    "--val-actors", "3", "--test-actors", "4", *TINY_AUDIO, *TINY_VIDEO)
    assert result.exit_code == 0, result.output
    assert "test actors 4; validation actors 3; training actors 1–2" in result.stdout
    assert "centre crop" in result.stdout
    return root, out


def test_ravdess_prepare_maps_classes_from_file_names_and_splits_by_actor(ravdess_av: tuple[Path, Path]) -> None:
    _, out = ravdess_av
    dataset = read_tensor_file(out)
    assert dataset.classes == RAVDESS_EMOTIONS
    assert dataset.input_shapes() == {"audio": (50, 32), "video": (4, 3, 16, 16)}
    assert len(dataset) == 32  # 4 actors × 8 speech takes; the song takes are not speech
    # no actor in two splits, and each actor where the options put it
    split_of_actor = {}
    for actor, code in zip(dataset.groups.tolist(), dataset.split.tolist(), strict=True):
        assert split_of_actor.setdefault(actor, code) == code
    assert split_of_actor == {1: 0, 2: 0, 3: 1, 4: 2}
    # the label follows the file name's emotion: tone pitch and grey level rise with the emotion code
    loudest_band = dataset.inputs["audio"].mean(dim=1).argmax(dim=1)  # (N,)
    grey = dataset.inputs["video"].mean(dim=(1, 2, 3, 4))  # (N,)
    for actor in range(1, 5):
        mine = dataset.groups == actor
        order = torch.argsort(dataset.labels[mine])
        assert dataset.labels[mine][order].tolist() == list(range(8))
        assert (loudest_band[mine][order].diff() > 0).all(), f"actor {actor}: {loudest_band[mine][order]}"
        assert (grey[mine][order].diff() > 0).all()
    # actor 4 had only full-AV MP4s: its audio came from their AAC tracks, and looks like the WAVs'
    assert torch.equal(loudest_band[dataset.groups == 4], loudest_band[dataset.groups == 1])


def test_train_and_evaluate_lfm2_on_prepared_ravdess(ravdess_av: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = ravdess_av
    run = tmp_path / "run"
    result = invoke("train", "lfm2", "--data", str(out), "--preset", "quick", "--epochs", "1", "--size", "w64",
                    "--batch-size", "8", "--device", "cpu", "--out", str(run))
    assert result.exit_code == 0, result.output
    config = json.loads((run / "run.json").read_text())
    assert config["data"] == str(out)
    assert config["model_settings"]["audio_frames"] == 50 and config["model_settings"]["n_mels"] == 32
    assert config["model_settings"]["frame_height"] == 16 and config["model_settings"]["video_frames"] == 4
    result = invoke("eval", str(run), "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 8  # actor 4's takes
    assert set(report["per_class_recall"]) == set(RAVDESS_EMOTIONS)
    assert sum(map(sum, report["confusion_matrix"])) == 8


def test_data_info_on_a_prepared_file_shows_counts_groups_and_notes(ravdess_av: tuple[Path, Path]) -> None:
    _, out = ravdess_av
    result = invoke("data", "info", str(out), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["splits"] == {"train": 16, "val": 8, "test": 8}
    assert info["counts"]["test"] == {name: 1 for name in RAVDESS_EMOTIONS}
    assert info["groups"] == {"1": {"train": 8, "val": 0, "test": 0}, "2": {"train": 8, "val": 0, "test": 0},
                              "3": {"train": 0, "val": 8, "test": 0}, "4": {"train": 0, "val": 0, "test": 8}}
    assert info["groups_in_several_splits"] == []
    assert info["inputs"]["video"] == {"shape": [4, 3, 16, 16], "dtype": "float32"}
    assert any("test actors 4" in note for note in info["notes"])
    table = invoke("data", "info", str(out))
    assert table.exit_code == 0 and "groups in more than one split: none" in table.stdout
    assert "surprised" in table.stdout and "centre crop" in table.stdout


def test_ravdess_audio_only_song_and_default_split(tmp_path: Path) -> None:
    root = write_ravdess_tree(tmp_path / "tree", video=False)
    songs = prepare_source(root, "ravdess", PrepareOptions(channel="song", val_actors=(2,), test_actors=(3,),
                                                           audio_seconds=0.3))
    assert songs.classes == ("neutral",) and len(songs) == 3  # actor 4 has no song take
    assert songs.split.tolist() == [0, 1, 2]
    assert set(songs.inputs) == {"audio"}
    # the default split (test 21–24, validation 17–20) finds none of actors 1–4 in validation
    with pytest.raises(MmkitError, match=r"no takes in the val split: .*test actors 21–24; validation actors 17–20"):
        prepare_source(root, "ravdess")


def test_ravdess_folder_is_refused_by_data_with_the_prepare_command(tmp_path: Path) -> None:
    root = write_ravdess_tree(tmp_path / "tree", video=False)
    result = invoke("train", "lfm2", "--data", str(root), "--epochs", "1")
    one_line_exit_2(result, "is a RAVDESS folder: decode it once with `mmkit data prepare")


# --- CREMA-D ------------------------------------------------------------------------------------


def test_crema_d_prepare_maps_emotions_and_splits_by_actor(tmp_path: Path) -> None:
    root = write_crema_d_tree(tmp_path / "crema")
    out = tmp_path / "crema.safetensors"
    result = invoke("data", "prepare", str(root), "--out", str(out), "--val-actors", "1003", "--test-actors",
                    "1004", *TINY_AUDIO)  # format detected from the names
    assert result.exit_code == 0, result.output
    assert "test actors 1004; validation actors 1003; training actors 1001–1002" in result.stdout
    dataset = read_tensor_file(out)
    assert dataset.classes == ("angry", "disgust", "fearful", "happy", "neutral", "sad")
    assert set(dataset.inputs) == {"audio"}
    assert [len(dataset.indices(s)) for s in ("train", "val", "test")] == [12, 6, 6]
    assert {(g, s) for g, s in zip(dataset.groups.tolist(), dataset.split.tolist(), strict=True)} == {
        (1001, 0), (1002, 0), (1003, 1), (1004, 2)}
    loudest_band = dataset.inputs["audio"].mean(dim=1).argmax(dim=1)
    for actor in (1001, 1002, 1003, 1004):
        mine = dataset.groups == actor
        order = torch.argsort(dataset.labels[mine])
        assert dataset.labels[mine][order].tolist() == list(range(6))
        assert (loudest_band[mine][order].diff() > 0).all()
    info = json.loads(invoke("data", "info", str(out), "--json").stdout)
    assert info["splits"] == {"train": 12, "val": 6, "test": 6}
    assert info["counts"]["val"] == {name: 1 for name in dataset.classes}
    assert info["groups_in_several_splits"] == []


def test_crema_d_with_video_skips_takes_without_one(tmp_path: Path) -> None:
    pytest.importorskip("av")
    root = write_crema_d_tree(tmp_path / "crema", with_video=True)
    dataset = prepare_source(root, "crema-d", PrepareOptions(
        modalities=("audio", "video"), val_actors=(1002,), test_actors=(1003,), audio_seconds=0.3, frames=2,
        frame_size=8))
    assert dataset.input_shapes() == {"audio": (30, 80), "video": (2, 3, 8, 8)}
    assert len(dataset) == 18 and 1004 not in dataset.groups.tolist()
    assert any("6 of 24 takes skipped" in note for note in dataset.notes)


# --- CIFAR-10 -----------------------------------------------------------------------------------


def test_cifar10_binary_inputs_follow_the_record_layout(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "cifar-10-batches-bin")
    dataset = load_dataset(str(root))
    assert dataset.classes == CIFAR_CLASSES
    assert dataset.input_shapes() == {"color": (3072,), "brightness": (1024,)}
    assert [len(dataset.indices(s)) for s in ("train", "val", "test")] == [90, 10, 20]
    assert torch.bincount(dataset.labels[dataset.indices("val")]).tolist() == [1] * 10  # stratified
    # recompute from the raw records: colour = the bytes / 255, brightness = BT.601 luma, each standardised
    records = np.concatenate([np.frombuffer((root / f"data_batch_{i}.bin").read_bytes(), np.uint8).reshape(-1, 3073)
                              for i in range(1, 6)] + [np.frombuffer((root / "test_batch.bin").read_bytes(),
                                                                     np.uint8).reshape(-1, 3073)])
    assert dataset.labels.tolist() == records[:, 0].tolist()
    image = torch.from_numpy(records[:, 1:].astype(np.float32) / 255)
    train = dataset.split == 0
    expected_luma = 0.299 * image[:, :1024] + 0.587 * image[:, 1024:2048] + 0.114 * image[:, 2048:]
    for key, raw in (("color", image), ("brightness", expected_luma)):
        standardised = (raw - raw[train].mean()) / raw[train].std()
        assert torch.allclose(dataset.inputs[key], standardised, atol=1e-5)
    assert torch.allclose(luma(image.reshape(-1, 3, 32, 32)).reshape(-1, 1024), expected_luma)
    assert any("stratified 10% of the five training batches" in note for note in dataset.notes)


def test_train_and_evaluate_multichannel_on_a_cifar10_folder(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "cifar")
    run = tmp_path / "run"
    result = invoke("train", "multichannel", "--data", str(root), "--preset", "quick", "--epochs", "1",
                    "--device", "cpu", "--out", str(run))
    assert result.exit_code == 0, result.output
    result = invoke("eval", str(run), "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 20
    out = tmp_path / "prepared" / "cifar.safetensors"  # a new folder; the file holds the same data
    result = invoke("data", "prepare", str(root), "--format", "cifar10", "--out", str(out), "--val-fraction", "0.2")
    assert result.exit_code == 0, result.output
    info = json.loads(invoke("data", "info", str(out), "--json").stdout)
    assert info["splits"] == {"train": 80, "val": 20, "test": 20} and info["groups"] is None


def test_pickled_cifar10_is_refused_with_a_pointer_to_the_binary_version(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "cifar-10-batches-py", pickled=True)
    expected = "CIFAR-10's pickled \"python version\"; mmkit never unpickles files; use CIFAR-10's binary version"
    for args in (("data", "prepare", str(root), "--format", "cifar10", "--out", str(tmp_path / "x.safetensors")),
                 ("data", "prepare", str(tmp_path), "--out", str(tmp_path / "x.safetensors")),  # the parent folder
                 ("train", "multichannel", "--data", str(root))):
        result = invoke(*args)
        one_line_exit_2(result, expected)
        assert "cifar-10-batches-bin" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
    renamed = tmp_path / "renamed"
    write_cifar10(renamed)
    (renamed / "data_batch_3.bin").write_bytes((tmp_path / "cifar-10-batches-py" / "data_batch_3").read_bytes())
    with pytest.raises(MmkitError, match=r"data_batch_3\.bin is pickled"):
        load_dataset(str(renamed))


# --- Fashion-MNIST ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_idx_images_labels_and_prompts(tmp_path: Path, gz: bool) -> None:
    root = write_fashion_mnist(tmp_path / "fashion", gz=gz)
    dataset = load_dataset(str(root))
    assert dataset.classes == FASHION_CLASSES
    assert dataset.input_shapes() == {"image": (1, 28, 28), "text": (32,)}
    assert [len(dataset.indices(s)) for s in ("train", "val", "test")] == [20, 10, 10]
    assert dataset.labels.tolist() == [i % 10 for i in range(30)] + [i % 10 for i in range(10)]
    # pixels: image of class c is flat at 20·c + 5, standardised on the train split
    raw = (20 * dataset.labels + 5).float() / 255
    train = dataset.split == 0
    pixels = raw[:, None].expand(-1, 784)
    expected = (pixels - pixels[train].mean()) / pixels[train].std()
    assert torch.allclose(dataset.inputs["image"].reshape(-1, 784), expected, atol=1e-5)
    for i in range(len(dataset)):
        text = decode(dataset.inputs["text"][i])
        assert text == (CLASS_PROMPTS[int(dataset.labels[i])] if dataset.split[i] == 0 else NEUTRAL_PROMPT)


def test_fashion_mnist_prepare_then_info_counts(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path / "fashion", gz=True)
    out = tmp_path / "fashion.safetensors"
    result = invoke("data", "prepare", str(root), "--format", "fashion-mnist", "--out", str(out))
    assert result.exit_code == 0, result.output
    info = json.loads(invoke("data", "info", str(out), "--json").stdout)
    assert info["splits"] == {"train": 20, "val": 10, "test": 10}
    assert info["counts"]["train"] == {name: 2 for name in FASHION_CLASSES}
    assert info["inputs"]["image"] == {"shape": [1, 28, 28], "dtype": "float32"}
    table = invoke("data", "info", str(out))
    assert table.exit_code == 0 and "sneaker" in table.stdout.lower()


def test_train_and_evaluate_clip_on_a_fashion_mnist_folder(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path / "fashion", gz=True)
    run = tmp_path / "run"
    result = invoke("train", "clip", "--data", str(root), "--preset", "quick", "--epochs", "1", "--device", "cpu",
                    "--out", str(run))
    assert result.exit_code == 0, result.output
    result = invoke("eval", str(run), "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 10


def test_continual_learning_on_a_fashion_mnist_folder(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path / "fashion", gz=False)
    run = tmp_path / "continual"
    result = invoke("train", "clip", "--preset", "continual-fast", "--data", str(root), "--set", "epochs_per_task=1",
                    "--batch-size", "16", "--device", "cpu", "--out", str(run))
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 10  # the official t10k images


def test_bad_idx_files_name_the_problem(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path / "fashion", gz=False)
    labels = root / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(MmkitError, match=r"train-labels-idx1-ubyte: IDX dimensions \[30\] need 30 bytes of data, found 27"):
        load_dataset(str(root))
    (root / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(30, np.uint8)))  # a labels file
    with pytest.raises(MmkitError, match=r"IDX magic 0x00000801, expected 0x00000803"):
        load_dataset(str(root))


# --- `mmkit data info` on built-ins; bad input ----------------------------------------------------


def test_data_info_on_a_builtin() -> None:
    result = invoke("data", "info", "synthetic-cifar", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["splits"] == {"train": 5000, "val": 1000, "test": 1000}
    assert info["classes"] == list(CIFAR_CLASSES)
    assert info["counts"]["val"] == {name: 100 for name in CIFAR_CLASSES}
    assert info["inputs"] == {"color": {"shape": [3072], "dtype": "float32"},
                              "brightness": {"shape": [1024], "dtype": "float32"}}
    assert info["groups"] is None
    table = invoke("data", "info", "synthetic-cifar")
    assert table.exit_code == 0 and "airplane" in table.stdout and "5000" in table.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = str(tmp_path / "out.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    bad_name = tmp_path / "bad"
    write_tone_wav(bad_name / "03-01-09-01-01-01-01.wav", 440.0, seconds=0.1)
    cases = [
        (("data", "prepare", str(empty), "--format", "nosuch", "--out", out),
         "unknown format 'nosuch'; valid: cifar10, crema-d, fashion-mnist, ravdess"),
        (("data", "prepare", str(tmp_path / "missing"), "--format", "ravdess", "--out", out),
         "data folder not found: "),
        (("data", "prepare", str(empty), "--out", out), "no files of a known format"),
        (("data", "prepare", str(empty), "--format", "ravdess", "--out", out), "no RAVDESS files"),
        (("data", "prepare", str(empty), "--format", "fashion-mnist", "--out", out),
         "Fashion-MNIST file train-images-idx3-ubyte (or train-images-idx3-ubyte.gz) not found"),
        (("data", "prepare", str(empty), "--format", "cifar10", "--out", out),
         "CIFAR-10 binary files missing: data_batch_1.bin"),
        (("data", "prepare", str(bad_name), "--format", "ravdess", "--out", out),
         "03-01-09-01-01-01-01.wav: RAVDESS emotion 09 is outside 01–08"),
        (("data", "prepare", str(bad_name), "--format", "cifar10", "--channel", "song", "--out", out),
         "--channel: not an option of the cifar10 format"),
        (("data", "prepare", str(bad_name), "--format", "ravdess", "--val-actors", "1-3", "--test-actors", "3-4",
          "--out", out), "actor 3 is in both the validation and the test actors"),
        (("data", "prepare", str(archive), "--out", out), "is not a folder; extract the archive"),
        (("data", "prepare", str(bad_name), "--format", "ravdess", "--hop-ms", "0.01", "--out", out),
         "a 0.01 ms hop is less than one sample at 16000 Hz"),
        (("data", "prepare", str(empty)), "Missing option '--out'"),
        (("data", "info", str(tmp_path / "missing.safetensors")), "data file not found: "),
        (("data", "info", str(empty)), "no files of a known format"),
        (("train", "multichannel", "--data", str(tmp_path / "missing_dir/")), "data file not found"),
    ]
    for args, expected in cases:
        one_line_exit_2(invoke(*args), expected)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"")
    one_line_exit_2(invoke("data", "prepare", str(empty), "--out", str(existing)), "exists; pass --force")
