"""Safe checkpoints: safetensors for tensors, JSON for everything else, nothing executable.

Layout of a run directory's checkpoints (a stable contract):

    RUN/checkpoints/step-NNNNNNNN/   model.safetensors   the model's state_dict
                                     state.safetensors   optimizer, scaler and RNG tensors
                                     trainer_state.json  step, epoch, config, non-tensor state
                                     manifest.json       size and sha256 of the three; written last
    RUN/checkpoints/best.json, last.json   pointers: {"step": N, "path": "step-NNNNNNNN", ...}

A checkpoint is built in `checkpoints/.tmp-step-NNNNNNNN-<pid>-<random>/`, every file and the
directory are fsynced, and only then is it renamed to `step-NNNNNNNN`. A directory named
`step-*` with a manifest is therefore complete; a crash leaves at worst a `.tmp-*` directory, which
is never listed and is removed by a later save once its process is gone. Loading checks every file
against the manifest (size, then sha256) before reading a byte of it as tensors or JSON.

Training state that is not a plain tensor dict (optimizer and scheduler state dicts, RNG states,
the GradScaler) is split here into tensors (for `state.safetensors`) and JSON-able metadata (for
`trainer_state.json`) and put back together exactly, keeping ints, floats, tuples and int keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmkit.errors import MmkitError, RunStopped
from mmkit.train.rundir import CHECKPOINTS_DIR, fsync_dir, fsync_file, remove_stale_temp, write_json_atomic
from mmkit.train.sharding import is_sharded, load_full_model_state, load_full_optimizer_state

FORMAT = "mmkit-checkpoint/1"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, TRAINER_STATE_FILE)
POINTER_NAMES = ("best", "last")

_STEP_DIR = re.compile(r"step-(\d+)")
_HASH_CHUNK = 1 << 20  # read files 1 MiB at a time when hashing
WRITE_ERRORS = (OSError, SafetensorError)  # what a write to a full or failing disk raises


class CheckpointError(MmkitError):
    """A checkpoint or pointer file is missing or damaged; the message names the file and why."""


# --------------------------------------------------------------------------------------------------
# Paths


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    """`step-00000012`: zero-padded to 8 digits so names sort like steps (longer when step ≥ 1e8)."""
    return f"step-{step:08d}"


def step_of(path: Path | str) -> int:
    """The step number in a `step-NNNNNNNN` directory name."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected step-NNNNNNNN)")
    return int(match.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (`step-*` directories with a manifest), oldest step first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        entry
        for entry in root.iterdir()
        if _STEP_DIR.fullmatch(entry.name) and entry.is_dir() and (entry / MANIFEST_FILE).is_file()
    ]
    return sorted(found, key=lambda p: (step_of(p), p.name))


# --------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: Mapping[str, Tensor],
    state_tensors: Mapping[str, Tensor],
    trainer_state: Mapping[str, Any],
    *,
    keep_last: int | None = 3,
    protect: Iterable[str | Path] = frozenset(),
) -> Path:
    """Write `RUN/checkpoints/step-NNNNNNNN/` atomically and return its path.

    `model_state` is a model's state_dict (tied / shared tensors are fine: each key is stored,
    duplicates as copies); `state_tensors` the optimizer / scaler / RNG tensors; `trainer_state`
    anything JSON-serializable. An existing checkpoint of the same step is replaced.

    `keep_last=K` then deletes the oldest complete checkpoints beyond the newest K, never the one
    just written, nothing named in `protect` (directory names or paths) and never the checkpoint
    that `best.json` points to. `keep_last=None` keeps everything.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    temp = root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        # "pt" lets other safetensors tools load it. One key only: safetensors writes the metadata
        # from a hash map, in an order that changes from one process to the next, so that two keys
        # made identical runs write different bytes (the manifest names mmkit's format)
        metadata = {"format": "pt"}
        save_file(_prepare_for_safetensors(model_state), temp / MODEL_FILE, metadata=metadata)
        save_file(_prepare_for_safetensors(state_tensors), temp / STATE_FILE, metadata=metadata)
        (temp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        files = {}
        for file_name in CHECKPOINT_FILES:
            fsync_file(temp / file_name)
            digest, size = _sha256(temp / file_name)
            files[file_name] = {"sha256": digest, "bytes": size}
        manifest = {"format": FORMAT, "step": step, "files": files}
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        fsync_file(temp / MANIFEST_FILE)
        fsync_dir(temp)
        if final.exists():
            # Move the old one out of the way first: at every instant there is at most one
            # `step-N`, and it is complete.
            old = root / f".old-{name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, old)
            os.rename(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise

    if keep_last is not None:
        _prune(run_dir, keep_last, keep={name, *(Path(p).name for p in protect)})
    remove_stale_temp(root)
    return final


def _prepare_for_safetensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, no two sharing storage (safetensors refuses aliases).

    Tied weights (two keys, one Parameter) become two equal copies on disk; loading them back with
    `load_state_dict` into a model that ties them writes the same values twice, which is harmless.
    """
    prepared: dict[str, Tensor] = {}
    seen_storages: set[tuple[str, int]] = set()
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{key!r}: expected a tensor, got {type(value).__name__}")
        tensor = value.detach().to("cpu")
        storage = (str(value.device), tensor.untyped_storage().data_ptr())
        shared = storage in seen_storages
        seen_storages.add(storage)
        if shared or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        prepared[key] = tensor
    return prepared


def _prune(run_dir: Path, keep_last: int, keep: set[str]) -> None:
    """Delete the oldest complete checkpoints beyond the newest `keep_last`, except `keep`."""
    try:
        keep.add(read_pointer(run_dir, "best").name)
    except CheckpointError:
        pass  # no (valid) best pointer yet: nothing extra to protect
    complete = list_checkpoints(run_dir)
    for path in complete[: max(len(complete) - keep_last, 0)]:
        if path.name not in keep:
            _remove_dir(path)


def _remove_dir(path: Path) -> None:
    """Rename away first so an interrupted delete never leaves a half-empty `step-*` behind."""
    doomed = path.with_name(f".old-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# --------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(model_state, state_tensors, trainer_state) of a verified checkpoint directory.

    Raises CheckpointError naming the file and the reason when the manifest is missing or invalid,
    or a file is missing, truncated, of the wrong size or fails its sha256 check.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    manifest = _read_manifest(path)
    for file_name, expected in manifest["files"].items():
        _verify_file(path / file_name, expected["bytes"], expected["sha256"])
    try:
        model_state = load_file(path / MODEL_FILE, device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path / MODEL_FILE}: unreadable safetensors file ({error})") from None
    try:
        state_tensors = load_file(path / STATE_FILE, device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable safetensors file ({error})") from None
    trainer_state = _read_json(path / TRAINER_STATE_FILE)
    if not isinstance(trainer_state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE_FILE}: expected a JSON object")
    return model_state, state_tensors, trainer_state


def _read_manifest(checkpoint: Path) -> dict[str, Any]:
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path}: manifest.json missing "
            "(the checkpoint is incomplete or not an mmkit checkpoint)"
        )
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{manifest_path}: unsupported format {found!r}; expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: no 'files' table")
    for file_name in CHECKPOINT_FILES:
        if file_name not in files:
            raise CheckpointError(f"{manifest_path}: does not list {file_name}")
    for file_name, entry in files.items():
        valid_entry = (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        )
        if Path(file_name).name != file_name or file_name in ("", ".", "..") or not valid_entry:
            raise CheckpointError(f"{manifest_path}: invalid entry for {file_name!r}")
    return manifest


def _verify_file(path: Path, expected_bytes: int, expected_sha256: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: {path.name} missing")
    size = path.stat().st_size
    if size == 0 and expected_bytes > 0:
        raise CheckpointError(f"{path}: {path.name} is empty (0 of {expected_bytes} bytes; truncated)")
    if size < expected_bytes:
        raise CheckpointError(f"{path}: {path.name} truncated ({size} of {expected_bytes} bytes)")
    if size != expected_bytes:
        raise CheckpointError(
            f"{path}: {path.name} size mismatch ({size} bytes, manifest says {expected_bytes})"
        )
    if _sha256(path)[0] != expected_sha256:
        raise CheckpointError(f"{path}: {path.name}: sha256 mismatch (the file is corrupt)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {path.name} missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: {path.name}: invalid JSON ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {path.name}: JSON nested too deeply") from None


def load_model_state(model: torch.nn.Module, state: Mapping[str, Tensor], source: Path | str) -> None:
    """Put a checkpoint's weights into `model`, refusing any tensor that is missing, unexpected, or
    of another shape or dtype than the model's (a checkpoint of another model, or a hostile file)."""
    expected = model.state_dict()
    problems = [f"missing {k!r}" for k in expected if k not in state]
    problems += [f"unexpected {k!r}" for k in state if k not in expected]
    problems += [
        f"{k!r} is {state[k].dtype} {list(state[k].shape)}, the model has {v.dtype} {list(v.shape)}"
        for k, v in expected.items()
        if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source}: does not fit the model: {'; '.join(problems[:3])}{more}")
    if is_sharded(model):  # FSDP: every rank holds the full state and keeps its shard
        load_full_model_state(model, state)
    else:
        model.load_state_dict(state)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Any, source: Path | str,
    model: torch.nn.Module | None = None,
) -> None:
    """`optimizer.load_state_dict` from checkpoint tensors + meta, refusing a state that does not
    match the optimizer's parameters (so a bad file fails here, not at the next step). `model`:
    the optimizer's model, needed when it is sharded (FSDP: each rank keeps its shard)."""
    try:
        state = optimizer_state_from_tensors(tensors, meta)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
            raise ValueError("no 'state' table")
        for index, entries in state["state"].items():
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entries, dict):
                raise ValueError(f"state for parameter {index!r}, which the optimizer does not have")
            for key, value in entries.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                    raise ValueError(f"{key} of parameter {index} is {list(value.shape)}, "
                                     f"the parameter is {list(params[index].shape)}")
        if model is not None and is_sharded(model):
            load_full_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        raise CheckpointError(f"{source}: optimizer state does not fit the model ({error})") from None


# --------------------------------------------------------------------------------------------------
# Pointers: best.json and last.json


def _pointer_path(run_dir: Path, name: str) -> Path:
    if name not in POINTER_NAMES:
        raise ValueError(f"pointer name must be one of {POINTER_NAMES}, got {name!r}")
    return checkpoints_dir(run_dir) / f"{name}.json"


def write_pointer(
    run_dir: Path, name: str, checkpoint_path: Path | str, extra: Mapping[str, Any] | None = None
) -> Path:
    """Atomically write `checkpoints/<name>.json` = {"step", "path", **extra}; return its path.

    `checkpoint_path` is a complete checkpoint directory of this run (a path or its name). `extra`
    may repeat "step" or "path" only with the same values.
    """
    pointer = _pointer_path(run_dir, name)
    target = checkpoints_dir(run_dir) / Path(checkpoint_path).name
    step = step_of(target)
    if not (target / MANIFEST_FILE).is_file():
        raise CheckpointError(
            f"{target}: not a complete checkpoint (no {MANIFEST_FILE}); {name}.json unchanged"
        )
    record = {"step": step, "path": target.name}
    for key, value in (extra or {}).items():
        if key in record and value != record[key]:
            raise ValueError(f"extra {key}={value!r} contradicts the checkpoint's {key}={record[key]!r}")
        record[key] = value
    write_json_atomic(pointer, record)
    return pointer


def read_pointer_record(run_dir: Path, name: str) -> dict[str, Any]:
    """The whole pointer record {"step", "path", **extra}, validated (target not checked)."""
    pointer = _pointer_path(run_dir, name)
    if not pointer.is_file():
        raise CheckpointError(f"{pointer}: {pointer.name} missing (no {name} checkpoint recorded)")
    record = _read_json(pointer)
    target = record.get("path") if isinstance(record, dict) else None
    # The path must be a bare `step-N` name: a pointer can never lead outside checkpoints/.
    if not isinstance(target, str) or not _STEP_DIR.fullmatch(target):
        raise CheckpointError(f"{pointer}: {pointer.name}: not a checkpoint pointer (no valid 'path')")
    return record


def read_pointer(run_dir: Path, name: str) -> Path:
    """The checkpoint directory that `checkpoints/<name>.json` points to; it must exist and be complete."""
    record = read_pointer_record(run_dir, name)
    target = checkpoints_dir(run_dir) / record["path"]
    if not (target / MANIFEST_FILE).is_file():
        available = _describe_available(run_dir)
        raise CheckpointError(
            f"{_pointer_path(run_dir, name)}: points to {record['path']}, which is missing or incomplete; "
            f"available: {available}"
        )
    return target


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """"last", "best", a step number ("12") or a directory name ("step-00000012") → checkpoint path.

    "last" falls back to the newest complete checkpoint when last.json is missing, unreadable or
    points to a checkpoint that is gone (e.g. a crash between saving and updating the pointer).
    """
    which = str(which).strip()
    if which == "last":
        try:
            return read_pointer(run_dir, "last")
        except CheckpointError:
            complete = list_checkpoints(run_dir)
            if complete:
                return complete[-1]
            raise CheckpointError(f"{checkpoints_dir(run_dir)}: no checkpoints in this run") from None
    if which == "best":
        return read_pointer(run_dir, "best")
    match = _STEP_DIR.fullmatch(which) or re.fullmatch(r"(\d+)", which)
    if match is None:
        raise CheckpointError(
            f"unknown checkpoint {which!r}; use last, best or a step number; available: "
            f"{_describe_available(run_dir)}"
        )
    step = int(match.group(1))
    for path in list_checkpoints(run_dir):
        if step_of(path) == step:
            return path
    raise CheckpointError(
        f"no checkpoint at step {step} in {checkpoints_dir(run_dir)}; "
        f"available: {_describe_available(run_dir)}"
    )


def last_good(run_dir: Path) -> str:
    """How a stopped run can go on: the checkpoint `resume` would continue from, and the command."""
    try:
        last = resolve_checkpoint(run_dir, "last")
    except CheckpointError:
        return "no checkpoint had been written yet; start the run again"
    return f"the last good checkpoint {last.name} is intact; continue with `mmkit resume {run_dir}`"


@contextmanager
def stop_on_write_failure(run_dir: Path, what: str) -> Iterator[None]:
    """Turn a failed write of `what` (a full disk: `OSError`, or safetensors' own `SafetensorError`)
    into `RunStopped`: one line naming what failed, the last intact checkpoint and the command
    that continues the run. The writers have already removed their temp files."""
    try:
        yield
    except WRITE_ERRORS as exc:
        raise RunStopped(f"could not write {what} ({_write_error_reason(exc)}); {last_good(run_dir)}") from None


def _write_error_reason(exc: BaseException) -> str:
    """`No space left on device`, from an OSError or from safetensors' `IoError(Os { ... message: "..." })`."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r'message: "([^"]+)"', str(exc))
    return found.group(1) if found else str(exc) or type(exc).__name__


def _describe_available(run_dir: Path) -> str:
    """`steps 10, 20, 30; last → step-00000030; best → step-00000020` (for error messages)."""
    steps = [str(step_of(p)) for p in list_checkpoints(run_dir)]
    parts = [f"steps {', '.join(steps)}" if steps else "no checkpoints"]
    for name in POINTER_NAMES:
        try:
            parts.append(f"{name} → {read_pointer_record(run_dir, name)['path']}")
        except CheckpointError:
            pass
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Training state as tensors + JSON metadata (no Python object serialization anywhere)

# Tags for the values JSON cannot hold as themselves.
_TENSOR, _TUPLE, _PAIRS = "__tensor__", "__tuple__", "__dict_pairs__"


def state_to_tensors(state: Any, prefix: str) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, JSON scalars) into tensors + JSON meta.

    Each tensor goes to `tensors["<prefix>.<path>"]` (e.g. `optimizer.state.3.exp_avg`) and is
    replaced in the meta by `{"__tensor__": key}`; tuples become `{"__tuple__": [...]}` and dicts
    with non-string keys (an optimizer's `state` is keyed by int) `{"__dict_pairs__": [[k, v], ...]}`,
    so `state_from_tensors` restores them exactly. Works for optimizer, LR scheduler and GradScaler
    state dicts.
    """
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, Tensor):
            if path in tensors:
                raise ValueError(f"two state entries map to the tensor key {path!r}")
            tensors[path] = value.detach()
            return {_TENSOR: path}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            keys_are_plain = all(isinstance(k, str) for k in value) and not (
                len(value) == 1 and next(iter(value)) in (_TENSOR, _TUPLE, _PAIRS)
            )
            if keys_are_plain:
                return {k: encode(v, f"{path}.{k}") for k, v in value.items()}
            for k in value:
                if k is not None and not isinstance(k, (bool, int, float, str)):
                    raise TypeError(f"{path}: cannot store a dict key of type {type(k).__name__}")
            return {_PAIRS: [[k, encode(v, f"{path}.{k}")] for k, v in value.items()]}
        raise TypeError(f"{path}: cannot store a value of type {type(value).__name__} in a checkpoint")

    meta = encode(state, prefix)
    return tensors, meta


def state_from_tensors(tensors: Mapping[str, Tensor], meta: Any) -> Any:
    """Inverse of `state_to_tensors`."""

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            [(tag, inner)] = value.items()
            if tag == _TENSOR:
                if inner not in tensors:
                    raise CheckpointError(f"state tensor {inner!r} missing from {STATE_FILE}")
                return tensors[inner]
            if tag == _TUPLE:
                return tuple(decode(v) for v in inner)
            if tag == _PAIRS:
                return {k: decode(v) for k, v in inner}
        return {k: decode(v) for k, v in value.items()}

    return decode(meta)


def optimizer_state_to_tensors(
    state_dict: Mapping[str, Any], prefix: str = "optimizer"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """`optimizer.state_dict()` → (tensors like `optimizer.state.3.exp_avg`, JSON meta).

    Store the tensors in `state.safetensors` and the meta in `trainer_state.json`.
    """
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("expected an optimizer state_dict with 'state' and 'param_groups'")
    return state_to_tensors(dict(state_dict), prefix)


def optimizer_state_from_tensors(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_state_to_tensors`: a state_dict for `optimizer.load_state_dict`."""
    return state_from_tensors(tensors, meta)


def grad_scaler_state_to_meta(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """`GradScaler.state_dict()` is plain floats and ints (empty when disabled): JSON as it is."""
    meta = dict(state_dict)
    json.dumps(meta)  # fail here, not at save time, if a future torch puts something else in it
    return meta


def grad_scaler_state_from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    return dict(meta)


def rng_state_to_tensors(prefix: str = "rng", cuda_device: int | None = None) -> dict[str, Tensor]:
    """Every random state a training run draws from, as tensors.

    `<prefix>.torch` (CPU generator, uint8), `<prefix>.cuda.<i>` per CUDA device when CUDA is
    available, `<prefix>.python.state` (int64 [626]: `random.getstate()`'s version and its 625
    Mersenne Twister words), `<prefix>.python.gauss_next` (float64 [0] or [1]), and NumPy's
    global generator, which models draw from too (wav2vec2's SpecAugment masks):
    `<prefix>.numpy.state` (int64 [626]: its 624 Mersenne Twister words, position, has-gauss) and
    `<prefix>.numpy.gauss` (float64 [1]).

    `cuda_device` (a data-parallel process's GPU): only that device's state, stored as
    `<prefix>.cuda.0`, so that no process touches (and creates a context on) another's GPU.
    """
    tensors = {f"{prefix}.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and cuda_device is not None:
        tensors[f"{prefix}.cuda.0"] = torch.cuda.get_rng_state(cuda_device)
    elif torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}.cuda.{index}"] = state
    version, internal, gauss_next = random.getstate()
    tensors[f"{prefix}.python.state"] = torch.tensor([version, *internal], dtype=torch.int64)
    tensors[f"{prefix}.python.gauss_next"] = torch.tensor(
        [] if gauss_next is None else [gauss_next], dtype=torch.float64
    )
    _, words, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors[f"{prefix}.numpy.state"] = torch.tensor([*words.tolist(), position, has_gauss], dtype=torch.int64)
    tensors[f"{prefix}.numpy.gauss"] = torch.tensor([cached_gaussian], dtype=torch.float64)
    return tensors


def restore_rng_state(tensors: Mapping[str, Tensor], prefix: str = "rng", cuda_device: int | None = None) -> None:
    """Inverse of `rng_state_to_tensors` (other keys in `tensors` are ignored).

    CUDA states are restored for the devices that exist now; saved CUDA states are skipped when
    resuming without CUDA. `cuda_device`: only that device, from `<prefix>.cuda.0`.
    """
    for key in (f"{prefix}.torch", f"{prefix}.python.state", f"{prefix}.python.gauss_next"):
        if key not in tensors:
            raise CheckpointError(f"RNG state {key!r} missing from {STATE_FILE}")
    torch.set_rng_state(tensors[f"{prefix}.torch"].to("cpu", torch.uint8))
    if torch.cuda.is_available() and cuda_device is not None:
        state = tensors.get(f"{prefix}.cuda.0")
        if state is not None:
            torch.cuda.set_rng_state(state.to("cpu", torch.uint8), cuda_device)
    elif torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            state = tensors.get(f"{prefix}.cuda.{index}")
            if state is not None:
                torch.cuda.set_rng_state(state.to("cpu", torch.uint8), index)
    version, *internal = (int(v) for v in tensors[f"{prefix}.python.state"].tolist())
    gauss = tensors[f"{prefix}.python.gauss_next"].tolist()
    random.setstate((version, tuple(internal), gauss[0] if gauss else None))
    if f"{prefix}.numpy.state" in tensors:  # checkpoints written before mmkit saved it have none
        *words, position, has_gauss = tensors[f"{prefix}.numpy.state"].tolist()
        np.random.set_state(("MT19937", np.array(words, dtype=np.uint32), int(position), int(has_gauss),
                             float(tensors[f"{prefix}.numpy.gauss"].item())))


def generator_state_to_tensor(generator: torch.Generator) -> Tensor:
    """A `torch.Generator`'s state (uint8, on the CPU whatever the generator's device)."""
    return generator.get_state().clone()


def restore_generator_state(generator: torch.Generator, state: Tensor) -> None:
    generator.set_state(state.to("cpu", torch.uint8).contiguous())


# --------------------------------------------------------------------------------------------------
# Pointers are derived state: rebuilt from the step directories when broken


def pointer_problem(run_dir: Path, name: str) -> str | None:
    """Why `checkpoints/<name>.json` cannot be used (`missing`, `unreadable`, `pointing to step-N,
    which is missing or incomplete`, `checkpoint step-N is damaged: no manifest.json`), or None
    when it names a complete checkpoint."""
    if not _pointer_path(run_dir, name).is_file():
        return "missing"
    try:
        record = read_pointer_record(run_dir, name)
    except CheckpointError:
        return "unreadable"
    target = checkpoints_dir(run_dir) / record["path"]
    if target.is_dir() and not (target / MANIFEST_FILE).is_file():
        # step directories are renamed into place only when complete: one without its manifest
        # was damaged afterwards, not left half-written
        return f"checkpoint {record['path']} is damaged: no {MANIFEST_FILE}"
    if not (target / MANIFEST_FILE).is_file():
        return f"pointing to {record['path']}, which is missing or incomplete"
    return None


def derived_pointer(run_dir: Path, name: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `name` should point to and the pointer's extra fields, from the trainer state
    of the intact step directories; None when there is none yet (no epoch has ended for `best`).

    `last` is the newest one. `best` is the end-of-epoch checkpoint of the `best_epoch` that the
    newest trainer state records; when that one is gone, the end-of-epoch checkpoint with the
    highest validation UAR stored in it (the first of equals, as training picks it)."""
    states = _trainer_states(run_dir)
    if not states:
        return None
    if name == "last":
        path, state = states[-1]
        epoch = state.get("epoch")
        return path, ({"epoch": epoch} if isinstance(epoch, int) else {}) | {"step": step_of(path)}
    ends = [(p, s) for p, s in states if not s.get("batches_in_epoch") and _val_uar(s) is not None]
    best_epoch = states[-1][1].get("best_epoch")
    recorded = [(p, s) for p, s in ends if best_epoch is not None and s.get("epoch") == best_epoch]
    if recorded:
        path, state = recorded[-1]
    elif ends:
        path, state = max(ends, key=lambda entry: _val_uar(entry[1]))  # type: ignore[arg-type, return-value]
    else:
        return None
    return path, {"epoch": state.get("epoch"), "step": step_of(path), "val_uar": _val_uar(state)}


def repair_pointers(run_dir: Path) -> str | None:
    """Rewrite best.json / last.json where `pointer_problem` finds them broken and the step
    directories say what they should be; one warning line naming what was rebuilt, or None."""
    rebuilt = []
    for name in POINTER_NAMES:
        problem = pointer_problem(run_dir, name)
        derived = derived_pointer(run_dir, name) if problem is not None else None
        if derived is not None:
            write_pointer(run_dir, name, derived[0], derived[1])
            rebuilt.append(f"{name}.json ({problem}) → {derived[0].name}")
    if not rebuilt:
        return None
    return (f"warning: rebuilt {' and '.join(rebuilt)} in {checkpoints_dir(run_dir)} from the trainer state of "
            f"the step directories")


def resolve_pointer(run_dir: Path, name: str) -> tuple[Path, str | None]:
    """The checkpoint `checkpoints/<name>.json` names or, when the pointer is broken, the one
    `derived_pointer` finds, with a warning line (the files are left as they are)."""
    problem = pointer_problem(run_dir, name)
    derived = derived_pointer(run_dir, name) if problem is not None else None
    if derived is None:
        return resolve_checkpoint(run_dir, name), None  # a sound pointer, or its error
    return derived[0], (f"warning: {_pointer_path(run_dir, name)}: {problem}; using {derived[0].name}, found "
                        f"from the trainer state of the step directories")


def _trainer_states(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(checkpoint, trainer state) of each complete checkpoint whose trainer_state.json matches its
    manifest, oldest first (the tensor files are verified when a checkpoint is loaded)."""
    found = []
    for path in list_checkpoints(run_dir):
        try:
            expected = _read_manifest(path)["files"][TRAINER_STATE_FILE]
            _verify_file(path / TRAINER_STATE_FILE, expected["bytes"], expected["sha256"])
            state = _read_json(path / TRAINER_STATE_FILE)
        except CheckpointError:
            continue
        if isinstance(state, dict):
            found.append((path, state))
    return found


def _val_uar(state: Mapping[str, Any]) -> float | None:
    """The validation UAR an end-of-epoch trainer state stores, or None."""
    val = state.get("val")
    uar = val.get("uar") if isinstance(val, dict) else None
    return float(uar) if isinstance(uar, (int, float)) and not isinstance(uar, bool) else None


