"""Safe checkpoints: exact round trips, atomic layout, pruning, corruption detection, pointers."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mmkit
from mmkit.errors import MmkitError
from mmkit.train.checkpoint import (
    CheckpointError,
    derived_pointer,
    generator_state_to_tensor,
    grad_scaler_state_from_meta,
    grad_scaler_state_to_meta,
    list_checkpoints,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    read_pointer,
    read_pointer_record,
    repair_pointers,
    resolve_checkpoint,
    restore_generator_state,
    restore_rng_state,
    rng_state_to_tensors,
    save_checkpoint,
    state_from_tensors,
    state_to_tensors,
    write_pointer,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    inputs, labels = _batch(seed)
    nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _save_simple(run: Path, step: int, value: float = 0.0, **kwargs) -> Path:
    return save_checkpoint(run, step, {"w": torch.full((4,), value)}, {}, {"step": step}, **kwargs)


def _assert_state_dicts_bitwise_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, entries in a["state"].items():
        assert isinstance(index, int)
        assert entries.keys() == b["state"][index].keys()
        for key, value in entries.items():
            other = b["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and value.shape == other.shape
                assert torch.equal(value, other), (index, key)
            else:
                assert value == other and type(value) is type(other), (index, key)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_model_and_optimizer_round_trip_exactly(tmp_path: Path, make_optimizer) -> None:
    model = _model()
    optimizer = make_optimizer(model.parameters())
    _train_step(model, optimizer, seed=1)
    _train_step(model, optimizer, seed=2)

    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
    assert any(key.startswith("optimizer.state.0.") for key in opt_tensors)
    path = save_checkpoint(tmp_path, 2, model.state_dict(), opt_tensors, {"step": 2, "optimizer": opt_meta})
    assert path == tmp_path / "checkpoints" / "step-00000002"

    model_state, state_tensors, trainer_state = load_checkpoint(path)
    restored_model = _model()
    restored_model.load_state_dict(model_state)
    restored_optimizer = make_optimizer(restored_model.parameters())
    restored_sd = optimizer_state_from_tensors(state_tensors, trainer_state["optimizer"])
    _assert_state_dicts_bitwise_equal(optimizer.state_dict(), restored_sd)
    restored_optimizer.load_state_dict(restored_sd)
    _assert_state_dicts_bitwise_equal(optimizer.state_dict(), restored_optimizer.state_dict())

    # One more step on both: the restored run continues bit for bit.
    _train_step(model, optimizer, seed=3)
    _train_step(restored_model, restored_optimizer, seed=3)
    for (name, original), restored in zip(model.state_dict().items(), restored_model.state_dict().values()):
        assert torch.equal(original, restored), name


def test_scheduler_and_grad_scaler_state_round_trip_through_json() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
    for seed in range(3):
        _train_step(model, optimizer, seed)
        scheduler.step()
    tensors, meta = state_to_tensors(scheduler.state_dict(), "scheduler")
    assert state_from_tensors(tensors, json.loads(json.dumps(meta))) == scheduler.state_dict()

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    meta = json.loads(json.dumps(grad_scaler_state_to_meta(scaler.state_dict())))
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(grad_scaler_state_from_meta(meta))
    assert fresh.state_dict() == scaler.state_dict()


def test_state_encoding_keeps_int_keys_tuples_and_odd_dicts() -> None:
    state = {
        "state": {3: {"t": torch.arange(3)}, 10: {"n": 1.5}},
        "pairs": {1: (2, None), 2.5: "x"},
        "x": [{"__tuple__": 1}],  # a real dict that looks like a tag
    }
    tensors, meta = state_to_tensors(state, "p")
    assert set(tensors) == {"p.state.3.t"}
    restored = state_from_tensors(tensors, json.loads(json.dumps(meta)))
    assert restored["state"][10] == {"n": 1.5}
    assert torch.equal(restored["state"][3]["t"], torch.arange(3))
    assert restored["pairs"] == {1: (2, None), 2.5: "x"}
    assert restored["x"] == [{"__tuple__": 1}]
    with pytest.raises(TypeError, match="set"):
        state_to_tensors({"bad": {1, 2}}, "p")


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(123)
    random.seed(123)
    random.gauss(0, 1)  # leaves a cached gauss_next in Python's state
    np.random.seed(123)
    np.random.standard_normal()  # and a cached gaussian in NumPy's (models draw from it: SpecAugment masks)
    generator = torch.Generator().manual_seed(7)
    torch.rand(3, generator=generator)

    state = rng_state_to_tensors()
    state["data.generator"] = generator_state_to_tensor(generator)
    path = save_checkpoint(tmp_path, 1, {}, state, {})

    def draw() -> tuple:
        python = random.random(), random.gauss(0, 1)
        numpy = float(np.random.standard_normal()), int(np.random.randint(1 << 30))
        return torch.rand(4), torch.randn(2), *python, *numpy, torch.rand(4, generator=generator)

    first = draw()
    _, loaded, _ = load_checkpoint(path)
    restore_rng_state(loaded)
    restore_generator_state(generator, loaded["data.generator"])
    second = draw()
    for a, b in zip(first, second):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_restore_rng_state_without_rng_tensors_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="rng.torch"):
        restore_rng_state({})


class _TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # one Parameter, two state_dict keys


def test_tied_and_non_contiguous_tensors_are_saved_and_loaded(tmp_path: Path) -> None:
    model = _TiedModel()
    state = model.state_dict()
    assert state["embed.weight"].data_ptr() == state["head.weight"].data_ptr()
    base = torch.arange(12.0).reshape(3, 4)
    extra = {"transposed": base.t(), "row": base[1], "also_base": base}  # views of one storage
    path = save_checkpoint(tmp_path, 1, {**state, **extra}, {}, {})
    loaded, _, _ = load_checkpoint(path)
    assert torch.equal(loaded["embed.weight"], model.embed.weight)
    assert torch.equal(loaded["head.weight"], model.embed.weight)
    for key, value in extra.items():
        assert torch.equal(loaded[key], value), key

    fresh = _TiedModel()
    fresh.load_state_dict({k: loaded[k] for k in state})
    assert fresh.head.weight is fresh.embed.weight  # still tied
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_layout_and_manifest(tmp_path: Path) -> None:
    path = _save_simple(tmp_path, 12)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.safetensors",
        "trainer_state.json",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "mmkit-checkpoint/1" and manifest["step"] == 12
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000012"]  # no temp left


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    _save_simple(tmp_path, 5, value=1.0)
    path = _save_simple(tmp_path, 5, value=2.0)
    assert torch.equal(load_checkpoint(path)[0]["w"], torch.full((4,), 2.0))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005"]


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {}, {"not json": object()})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftover_temp_dirs_are_never_listed_and_stale_ones_are_cleaned(tmp_path: Path) -> None:
    _save_simple(tmp_path, 1)
    root = tmp_path / "checkpoints"
    stale = root / f".tmp-step-00000002-{_dead_pid()}-abcd1234"
    stale.mkdir()
    for name in ["model.safetensors", "state.safetensors", "trainer_state.json", "manifest.json"]:
        (stale / name).write_text("{}")  # even a temp dir that looks complete
    (root / "step-00000003").mkdir()  # a step dir without manifest is not a checkpoint either
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]

    _save_simple(tmp_path, 4)
    assert not stale.exists()  # its process is gone, so the next save removes it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000004"]


def test_list_checkpoints_sorts_by_step_and_handles_a_new_run(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path) == []
    for step in [100, 9, 100_000_000, 20]:
        _save_simple(tmp_path, step, keep_last=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000009",
        "step-00000020",
        "step-00000100",
        "step-100000000",
    ]


def test_keep_last_deletes_old_ones_but_keeps_protected_and_best(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save_simple(tmp_path, step, keep_last=2, protect={"step-00000001"})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000004", "step-00000005"]

    write_pointer(tmp_path, "best", tmp_path / "checkpoints" / "step-00000004")
    for step in range(6, 9):
        _save_simple(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000007", "step-00000008"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    _save_simple(tmp_path, 10)
    _save_simple(tmp_path, 20)
    path = _save_simple(tmp_path, 5, keep_last=1)  # older step than the others
    assert path.is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000020"]


def _corrupt_truncate(path: Path) -> str:
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return "model.safetensors truncated"


def _corrupt_flip_byte(path: Path) -> str:
    model = path / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: the header still parses
    model.write_bytes(bytes(data))
    return "model.safetensors: sha256 mismatch"


def _corrupt_empty(path: Path) -> str:
    (path / "state.safetensors").write_bytes(b"")
    return "state.safetensors is empty"


def _corrupt_delete_state(path: Path) -> str:
    (path / "state.safetensors").unlink()
    return "state.safetensors missing"


def _corrupt_manifest_missing(path: Path) -> str:
    (path / "manifest.json").unlink()
    return "manifest.json missing"


def _corrupt_manifest_bad_json(path: Path) -> str:
    (path / "manifest.json").write_text('{"format": "mmkit-checkpoint/1", "files": {')
    return "manifest.json: invalid JSON"


def _corrupt_trainer_state(path: Path) -> str:
    (path / "trainer_state.json").write_text('{"step": 3}')  # same size class, different bytes
    return "trainer_state.json"


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_truncate,
        _corrupt_flip_byte,
        _corrupt_empty,
        _corrupt_delete_state,
        _corrupt_manifest_missing,
        _corrupt_manifest_bad_json,
        _corrupt_trainer_state,
    ],
)
def test_damaged_checkpoints_raise_a_checkpoint_error_naming_the_file(tmp_path: Path, corrupt) -> None:
    path = save_checkpoint(
        tmp_path, 3, {"w": torch.randn(64, 64)}, {"rng.torch": torch.get_rng_state()}, {"step": 2}
    )
    expected = corrupt(path)
    with pytest.raises(CheckpointError, match=expected) as error:
        load_checkpoint(path)
    assert isinstance(error.value, MmkitError)  # the CLI shows it as one line, exit code 2
    assert str(path) in str(error.value)


def test_missing_checkpoint_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "checkpoints" / "step-00000001")


def test_pointers_round_trip(tmp_path: Path) -> None:
    path = _save_simple(tmp_path, 7)
    pointer = write_pointer(tmp_path, "best", path, {"val_uar": 0.625, "epoch": 3})
    assert pointer == tmp_path / "checkpoints" / "best.json"
    record = {"step": 7, "path": "step-00000007", "val_uar": 0.625, "epoch": 3}
    assert json.loads(pointer.read_text()) == record
    assert read_pointer(tmp_path, "best") == path
    assert read_pointer_record(tmp_path, "best")["val_uar"] == 0.625
    write_pointer(tmp_path, "last", "step-00000007", {"step": 7})  # a bare name works too
    with pytest.raises(ValueError, match="contradicts"):
        write_pointer(tmp_path, "last", path, {"step": 8})
    assert read_pointer(tmp_path, "last") == path
    assert sorted(p.name for p in pointer.parent.iterdir()) == ["best.json", "last.json", "step-00000007"]


def test_pointer_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="best.json missing"):
        read_pointer(tmp_path, "best")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        write_pointer(tmp_path, "last", tmp_path / "checkpoints" / "step-00000001")
    path = _save_simple(tmp_path, 1)
    pointer = write_pointer(tmp_path, "last", path)
    pointer.write_text("{oops")
    with pytest.raises(CheckpointError, match="last.json: invalid JSON"):
        read_pointer(tmp_path, "last")
    pointer.write_text(json.dumps({"step": 1, "path": "../../etc"}))
    with pytest.raises(CheckpointError, match="not a checkpoint pointer"):
        read_pointer(tmp_path, "last")
    pointer.write_text(json.dumps({"step": 9, "path": "step-00000009"}))
    with pytest.raises(CheckpointError, match=r"points to step-00000009.*available: steps 1"):
        read_pointer(tmp_path, "last")


def test_resolve_checkpoint(tmp_path: Path) -> None:
    for step in [10, 12, 20]:
        _save_simple(tmp_path, step)
    root = tmp_path / "checkpoints"
    write_pointer(tmp_path, "last", root / "step-00000020")
    write_pointer(tmp_path, "best", root / "step-00000012")
    assert resolve_checkpoint(tmp_path, "last") == root / "step-00000020"
    assert resolve_checkpoint(tmp_path, "best") == root / "step-00000012"
    assert resolve_checkpoint(tmp_path, "12") == root / "step-00000012"
    assert resolve_checkpoint(tmp_path, "step-00000010") == root / "step-00000010"
    assert resolve_checkpoint(tmp_path, "step-10") == root / "step-00000010"
    expected = r"no checkpoint at step 11 .*available: steps 10, 12, 20"
    with pytest.raises(CheckpointError, match=expected) as error:
        resolve_checkpoint(tmp_path, "11")
    assert "best → step-00000012" in str(error.value)
    with pytest.raises(CheckpointError, match="unknown checkpoint 'latest'; use last, best or a step number"):
        resolve_checkpoint(tmp_path, "latest")


def test_resolve_last_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoints"):
        resolve_checkpoint(tmp_path, "last")
    with pytest.raises(CheckpointError, match="best.json missing"):
        resolve_checkpoint(tmp_path, "best")
    _save_simple(tmp_path, 1)
    write_pointer(tmp_path, "last", tmp_path / "checkpoints" / "step-00000001")
    # A crash after saving step 2 (which pruned step 1) but before last.json was updated.
    _save_simple(tmp_path, 2, keep_last=1)
    assert resolve_checkpoint(tmp_path, "last") == tmp_path / "checkpoints" / "step-00000002"


def _code_tokens(source: Path) -> list[str]:
    """The names and operators of a Python file: comments and strings (docstrings) left out."""
    with open(source, "rb") as f:
        return [
            token.string
            for token in tokenize.tokenize(f.readline)
            if token.type in (tokenize.NAME, tokenize.OP)
        ]


def test_no_unsafe_deserialization_in_the_package() -> None:
    """Neither `torch.load` nor the stdlib object serializer is used anywhere in mmkit.

    The check reads code, not prose: docstrings may say "no pickle, ever".
    """
    package = Path(mmkit.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert package / "train" / "checkpoint.py" in sources
    for source in sources:
        tokens = _code_tokens(source)
        where = source.relative_to(package.parent)
        serializers = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle"}
        assert not serializers & set(tokens), f"{where} uses pickle"
        for i in range(len(tokens) - 2):
            assert tokens[i : i + 3] != ["torch", ".", "load"], f"{where} calls torch.load"
        # `from torch import load` / `from torch.serialization import load`
        text = " ".join(tokens)
        assert "from torch import load" not in text and "torch . serialization" not in text, where


def test_the_unsafe_deserialization_guard_catches_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('"""No pickle here."""\nimport torch\nstate = torch.load("x.pt")  # pickle\n')
    tokens = _code_tokens(bad)
    assert "pickle" not in tokens  # docstring and comment are ignored ...
    assert any(tokens[i : i + 3] == ["torch", ".", "load"] for i in range(len(tokens)))  # ... code is not

def test_best_is_derived_from_the_recorded_best_epoch_else_the_stored_val_uar(tmp_path: Path) -> None:
    def save(step: int, **state) -> Path:
        return save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {"global_step": step, **state}, keep_last=None)

    first = save(10, epoch=1, best_uar=0.5, best_epoch=1, val={"uar": 0.5})
    save(20, epoch=2, best_uar=0.5, best_epoch=1, val={"uar": 0.3})
    save(25, epoch=2, batches_in_epoch=5, best_uar=0.5, best_epoch=1)  # mid-epoch: never a best
    assert derived_pointer(tmp_path, "best") == (first, {"epoch": 1, "step": 10, "val_uar": 0.5})
    assert derived_pointer(tmp_path, "last")[0].name == "step-00000025"
    assert repair_pointers(tmp_path) == (
        "warning: rebuilt best.json (missing) → step-00000010 and last.json (missing) → step-00000025 in "
        f"{tmp_path / 'checkpoints'} from the trainer state of the step directories")
    assert read_pointer(tmp_path, "best") == first and repair_pointers(tmp_path) is None  # sound now
    shutil.rmtree(first)  # the recorded best is gone: the highest stored val UAR is next
    assert derived_pointer(tmp_path, "best")[0].name == "step-00000020"
    assert repair_pointers(tmp_path).startswith("warning: rebuilt best.json (pointing to step-00000010, which is missing")


def test_nothing_is_derived_before_the_first_epoch_ends(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(2)}, {}, {"epoch": 0, "batches_in_epoch": 5, "best_epoch": None})
    assert derived_pointer(tmp_path, "best") is None and repair_pointers(tmp_path) == (
        f"warning: rebuilt last.json (missing) → step-00000005 in {tmp_path / 'checkpoints'} from the trainer "
        "state of the step directories")



def test_identical_runs_write_byte_identical_checkpoints(tmp_path: Path) -> None:
    """Every file of every checkpoint (model.safetensors, state.safetensors, trainer_state.json,
    manifest.json) and the pointers: the same bytes from two runs of one command into two directories.
    (history.jsonl and the printed progress carry wall-clock times; no checkpoint file does.)"""
    from typer.testing import CliRunner

    from mmkit.cli.app import app

    runs = [tmp_path / "first", tmp_path / "elsewhere" / "second"]
    for run in runs:
        result = CliRunner().invoke(app, ["train", "multichannel", "--preset", "quick", "--set", "train_fraction=0.05",
                                          "--epochs", "2", "--out", str(run)])
        assert result.exit_code == 0, result.output

    def digests(run: Path) -> dict[str, str]:
        root = run / "checkpoints"
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    first, second = map(digests, runs)
    assert sorted(first) == ["best.json", "last.json",
                             *(f"step-{s:08d}/{name}" for s in (8, 16) for name in
                               ("manifest.json", "model.safetensors", "state.safetensors", "trainer_state.json"))]
    assert first == second
