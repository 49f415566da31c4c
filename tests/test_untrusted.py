"""Untrusted files: checkpoints and data handed over by someone else are read, never executed.

A hostile checkpoint comes with a manifest that matches it (anyone can compute a sha256), so these
tests forge the manifest after tampering: what stops the file is the safetensors parser and mmkit's
own checks of names, shapes and fields, not the checksum.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from runhelpers import forge_manifest, last_checkpoint
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()


class Payload:
    """Unpickling this creates `sentinel`: proof that code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "R"
    result = runner.invoke(app, ["train", "multichannel", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.1",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "R"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture
def payload(tmp_path: Path) -> tuple[bytes, Path]:
    sentinel = tmp_path / "payload-ran"
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))  # the payload is live: loading it does run code
    assert live.exists()
    return pickle.dumps(Payload(sentinel)), sentinel




def rewrite_header(data: bytes, change) -> bytes:
    """A safetensors file with its JSON header changed by `change(header)`."""
    (length,) = struct.unpack("<Q", data[:8])
    header = change(json.loads(data[8 : 8 + length]))
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) >= 1 and lines[-1].startswith("mmkit: error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def evaluate(run: Path, *extra: str):
    step = int(last_checkpoint(run).name.removeprefix("step-"))
    return runner.invoke(app, ["eval", str(run), "--checkpoint", str(step), *extra])


def test_a_pickle_named_like_a_checkpoint_is_refused_and_never_runs(run: Path, payload) -> None:
    data, sentinel = payload
    checkpoint = last_checkpoint(run)
    (checkpoint / "model.safetensors").write_bytes(data)
    forge_manifest(checkpoint)
    line = one_error_line(evaluate(run))
    assert "model.safetensors: unreadable safetensors file" in line
    result = runner.invoke(app, ["resume", str(run), "--epochs", "2"])  # nothing intact to fall back to
    assert result.exit_code == 2 and "no intact checkpoint" in result.stderr
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["payload.pt", "payload.safetensors", "payload.pkl"])
def test_a_pickle_given_as_data_is_refused_and_never_runs(run: Path, payload, tmp_path: Path, name: str) -> None:
    data, sentinel = payload
    path = tmp_path / name
    path.write_bytes(data)
    line = one_error_line(runner.invoke(app, ["train", "multichannel", "--data", str(path), "--out", str(tmp_path / "X")]))
    assert "not a readable safetensors file" in line
    one_error_line(runner.invoke(app, ["eval", str(run), "--data", str(path)]))
    assert not sentinel.exists() and not (tmp_path / "X" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda data: data + b"\0" * 64, "file not fully covered"),  # trailing bytes
        (lambda data: struct.pack("<Q", 1 << 40) + data[8:], "header too large"),  # a huge header
        (lambda data: rewrite_header(data, lambda h: h | {"__metadata__": {"format": {"nested": 1}}}),
         "invalid JSON in header"),  # metadata that is not string → string
        (lambda data: rewrite_header(data, lambda h: h | {"__metadata__": {"format": 7}}), "invalid JSON in header"),
        (lambda data: data[:8] + b"{" * (len(data) - 8), "header"),  # garbage where the header is
    ],
    ids=["trailing-bytes", "huge-header", "nested-metadata", "number-metadata", "garbage-header"],
)
def test_malformed_safetensors_checkpoints_are_refused(run: Path, tamper, reason: str) -> None:
    checkpoint = last_checkpoint(run)
    model_file = checkpoint / "model.safetensors"
    model_file.write_bytes(tamper(model_file.read_bytes()))
    forge_manifest(checkpoint)
    line = one_error_line(evaluate(run))
    assert f"{model_file}: unreadable safetensors file" in line and reason in line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s | {"classifier.weight": torch.zeros(11, 7)}, "'classifier.weight' is torch.float32 [11, 7]"),
        (lambda s: {k: v for k, v in s.items() if k != "classifier.bias"}, "missing 'classifier.bias'"),
        (lambda s: s | {"extra.weight": torch.zeros(3)}, "unexpected 'extra.weight'"),
        (lambda s: s | {"classifier.bias": s["classifier.bias"].to(torch.int64)}, "'classifier.bias' is torch.int64"),
    ],
    ids=["wrong-shape", "missing", "unexpected", "wrong-dtype"],
)
def test_tensors_that_do_not_fit_the_model_are_refused(run: Path, change, expected: str) -> None:
    checkpoint = last_checkpoint(run)
    model_file = checkpoint / "model.safetensors"
    state = load_file(model_file)
    assert "classifier.weight" in state, sorted(state)  # the names this test tampers with
    save_file(change(state), model_file)
    forge_manifest(checkpoint)
    line = one_error_line(evaluate(run))
    assert "does not fit the model" in line and expected in line
    line = one_error_line(runner.invoke(app, ["resume", str(run), "--epochs", "2"]))
    assert "does not fit the model" in line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t | {"epoch": "many"}, "field 'epoch'"),
        (lambda t: t | {"global_step": -5}, "field 'global_step'"),
        (lambda t: {k: v for k, v in t.items() if k != "optimizer"}, "field 'optimizer'"),
        (lambda t: t | {"optimizer": {"state": {"__dict_pairs__": [[99, {}]]}, "param_groups": []}},
         "optimizer state does not fit the model"),
    ],
    ids=["epoch-not-int", "negative-step", "no-optimizer", "optimizer-for-another-model"],
)
def test_bad_trainer_state_is_refused_on_resume(run: Path, change, expected: str) -> None:
    checkpoint = last_checkpoint(run)
    path = checkpoint / "trainer_state.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    forge_manifest(checkpoint)
    line = one_error_line(runner.invoke(app, ["resume", str(run), "--epochs", "2"]))
    assert "trainer_state.json" in line or "state.safetensors" in line
    assert expected in line


def test_optimizer_state_of_the_wrong_shape_is_refused_on_resume(run: Path) -> None:
    checkpoint = last_checkpoint(run)
    state_file = checkpoint / "state.safetensors"
    tensors = load_file(state_file)
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = torch.zeros(5, 5)
    save_file(tensors, state_file)
    forge_manifest(checkpoint)
    line = one_error_line(runner.invoke(app, ["resume", str(run), "--epochs", "2"]))
    assert "optimizer state does not fit the model" in line and "[5, 5]" in line
