"""Fuzzing: random bytes and random documents thrown at everything that reads a user's or a
stranger's file — presets, checkpoints and their pointers, tensor files. Only mmkit's own errors
may come out (one line for the user), never another exception, and never slowly (the deadline)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkit.data.tensorfile import read_tensor_file
from mmkit.errors import MmkitError
from mmkit.settings import TrainingRecipe, load_gpu_preset, resolve_training
from mmkit.train.checkpoint import (
    CHECKPOINT_FILES,
    FORMAT,
    CheckpointError,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    resolve_checkpoint,
    save_checkpoint,
)

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")), deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def toml_document(table: dict[str, object]) -> str:
    lines, subtables = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append(f"[{json.dumps(key)}]\n" + toml_document(value))
        else:
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n" + "\n".join(subtables)


preset_keys = st.sampled_from([*TrainingRecipe.model_fields, "vram_gib", "margin", "precisions", "peak_tflops",
                               "overhead", "memory_bandwidth_gb_s"]) | st.text(max_size=12)
preset_documents = st.dictionaries(
    preset_keys,
    scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=12), scalars, max_size=3),
    max_size=8,
)


@contextlib.contextmanager
def with_preset(kind: str, content: bytes) -> Iterator[None]:
    """`content` as the preset `fuzz` of `kind`, in a preset directory removed afterwards."""
    with tempfile.TemporaryDirectory() as root, pytest.MonkeyPatch.context() as monkeypatch:
        (Path(root) / kind).mkdir()
        (Path(root) / kind / "fuzz.toml").write_bytes(content)
        monkeypatch.setenv("MMKIT_PRESET_PATH", root)
        yield


def load_preset(kind: str) -> None:
    try:
        if kind == "training":
            recipe = resolve_training("fuzz")
            assert 0 < recipe.epochs and 0 < recipe.lr <= 10  # what loads is within the schema's bounds
        else:
            assert load_gpu_preset("fuzz").vram_gib > 0
    except MmkitError as exc:
        assert "\n" not in str(exc)  # one line for the user


@pytest.mark.parametrize("kind", ["training", "gpus"])
@FUZZ
@given(content=st.binary(max_size=300))
def test_random_bytes_as_a_preset(kind: str, content: bytes) -> None:
    with with_preset(kind, content):
        load_preset(kind)


@pytest.mark.parametrize("kind", ["training", "gpus"])
@FUZZ
@given(document=preset_documents)
def test_random_toml_as_a_preset(kind: str, document: dict[str, object]) -> None:
    with with_preset(kind, toml_document(document).encode("utf-8", "surrogatepass")):
        load_preset(kind)


# ---- checkpoints


def a_checkpoint(root: Path) -> Path:
    model = torch.nn.Linear(3, 2)
    return save_checkpoint(root, 7, model.state_dict(), {"rng": torch.zeros(4, dtype=torch.uint8)}, {"epoch": 1})


def forge_manifest(checkpoint: Path) -> None:
    files = {}
    for name in CHECKPOINT_FILES:
        data = (checkpoint / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps({"format": FORMAT, "step": 7, "files": files}))


def expect_checkpoint_error_or_load(checkpoint: Path) -> None:
    try:
        model_state, _, _ = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        assert str(checkpoint) in str(exc) and "\n" not in str(exc)
        return
    load_into_a_model(model_state)


def load_into_a_model(state: dict[str, torch.Tensor]) -> None:
    try:
        load_model_state(torch.nn.Linear(3, 2), state, "fuzzed")
    except CheckpointError as exc:
        assert "does not fit the model" in str(exc)


@FUZZ
@given(name=st.sampled_from([*CHECKPOINT_FILES, "manifest.json"]), content=st.binary(max_size=400),
       forge=st.booleans())
def test_random_bytes_in_a_checkpoint_file(name: str, content: bytes, forge: bool) -> None:
    with tempfile.TemporaryDirectory() as root:
        checkpoint = a_checkpoint(Path(root))
        (checkpoint / name).write_bytes(content)
        if forge and name != "manifest.json":
            forge_manifest(checkpoint)
        expect_checkpoint_error_or_load(checkpoint)


@FUZZ
@given(manifest=json_values)
def test_random_json_as_the_manifest(manifest: object) -> None:
    with tempfile.TemporaryDirectory() as root:
        checkpoint = a_checkpoint(Path(root))
        (checkpoint / "manifest.json").write_text(json.dumps(manifest))
        expect_checkpoint_error_or_load(checkpoint)


safetensors_headers = st.dictionaries(
    st.text(max_size=6),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", ""]),
        "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=3),
        "data_offsets": st.lists(st.integers(min_value=-1, max_value=600), min_size=0, max_size=3),
    }) | json_values,
    max_size=3,
)


@FUZZ
@given(header=safetensors_headers, data=st.binary(max_size=512), metadata=json_values)
def test_random_safetensors_headers_in_the_model_file(header: dict, data: bytes, metadata: object) -> None:
    document = dict(header)
    if metadata is not None:
        document["__metadata__"] = metadata
    encoded = json.dumps(document).encode()
    with tempfile.TemporaryDirectory() as root:
        checkpoint = a_checkpoint(Path(root))
        (checkpoint / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        forge_manifest(checkpoint)
        expect_checkpoint_error_or_load(checkpoint)


@FUZZ
@given(content=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_pointer_files(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        a_checkpoint(Path(root))
        (Path(root) / "checkpoints" / "last.json").write_bytes(content)
        (Path(root) / "checkpoints" / "best.json").write_bytes(content)
        assert resolve_checkpoint(Path(root), "last").name == "step-00000007"  # falls back to the newest
        try:
            resolve_checkpoint(Path(root), "best")
        except CheckpointError as exc:
            assert "best.json" in str(exc)


@FUZZ
@given(meta=json_values, shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), max_size=3))
def test_random_optimizer_state(meta: object, shapes: list[list[int]]) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    tensors = {f"optimizer.state.{i}.exp_avg": torch.zeros(shape) for i, shape in enumerate(shapes)}
    try:
        load_optimizer_state(optimizer, tensors, meta, "fuzzed")
    except CheckpointError as exc:
        assert "optimizer state does not fit the model" in str(exc)


@FUZZ
@given(content=st.binary(max_size=400))
def test_random_bytes_as_a_tensor_file(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "data.safetensors"
        path.write_bytes(content)
        with pytest.raises(MmkitError):
            read_tensor_file(path)
