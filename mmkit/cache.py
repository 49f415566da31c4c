"""Simulation results kept on disk, so that a repeated or slightly changed plan reuses them.

A simulated step is a pure function of what it is keyed by here: the model's code and config,
the step settings and batch size, and the torch and mmkit versions. Each result is one small JSON
file `MMKIT_CACHE_DIR/simulations/<kind>-<sha256 of the key>.json` holding its key beside the
value, so a hash collision or a stale file is never read as a hit.

The model's code enters the key as a fingerprint: mmkit's own sources (the families, the step, the
tracker), plus the model spec's origin (a model file's SHA-256, a module's source file, an entry
point's distribution, transformers' version for `hf:` models). `--no-cache` (or
`MMKIT_NO_CACHE=1`) bypasses the cache; an unreadable or unwritable cache costs a simulation,
never an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mmkit import __version__
from mmkit.atomic import write_json_atomic

T = TypeVar("T")
SUBDIR = "simulations"
_disabled = False


@contextlib.contextmanager
def bypassed(flag: bool = True) -> Iterator[None]:
    """Within the block, simulate again instead of reading or writing the cache (`--no-cache`)."""
    global _disabled
    before, _disabled = _disabled, _disabled or flag
    try:
        yield
    finally:
        _disabled = before


def enabled() -> bool:
    return not _disabled and os.environ.get("MMKIT_NO_CACHE", "") in ("", "0")


def _cache_dir() -> Path:
    from mmkit.settings import MmkitSettings

    return MmkitSettings().cache_path / SUBDIR


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 over mmkit's own Python sources (what a built-in family's simulation runs)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _module_file_sha(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return None
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()


def model_fingerprint(source: Mapping[str, Any] | None) -> dict[str, Any]:
    """What identifies a model's code besides mmkit's own: the spec's origin (run.json's `model_source`)."""
    import torch

    out: dict[str, Any] = {"mmkit": __version__, "code": code_fingerprint(), "torch": torch.__version__}
    if source:
        out["source"] = dict(source)
        kind = source.get("kind")
        if kind == "module" and source.get("module"):
            out["module_sha256"] = _module_file_sha(str(source["module"]))
        if kind == "hf":
            try:
                from importlib.metadata import version

                out["transformers"] = version("transformers")
            except Exception:  # noqa: BLE001 - not installed: the hf: model could not be built either
                out["transformers"] = None
    return out


def model_key(entry: Any, config: Any) -> dict[str, Any]:
    """The part of a key that names a model: its code (`model_fingerprint`), entry and config."""
    return {"model": model_fingerprint(entry.source), "entry": entry.name, "config": config.model_dump(mode="json")}


def _path(kind: str, key: Mapping[str, Any]) -> tuple[Path, str]:
    canonical = json.dumps({"kind": kind, **key}, sort_keys=True, default=str)
    return _cache_dir() / f"{kind}-{hashlib.sha256(canonical.encode()).hexdigest()[:32]}.json", canonical


def lookup(kind: str, key: Mapping[str, Any], decode: Callable[[Any], T] = lambda v: v) -> T | None:
    """The stored value for `key`, decoded, or None (not stored, unreadable, or the cache is off)."""
    if not enabled():
        return None
    path, canonical = _path(kind, key)
    try:
        document = json.loads(path.read_text())
        if document.get("key") == canonical:
            return decode(document["value"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def store(kind: str, key: Mapping[str, Any], payload: Any) -> None:
    """Keep `payload` (JSON-serialisable) for `key`; a failed write is ignored (a cache, not a record)."""
    if not enabled():
        return
    path, canonical = _path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": canonical, "value": payload}, indent=0)
    except (OSError, TypeError, ValueError):
        pass


def cached(kind: str, key: Mapping[str, Any], compute: Callable[[], T], *,
           encode: Callable[[T], Any] = lambda v: v, decode: Callable[[Any], T] = lambda v: v) -> T:
    """`compute()`'s result for `key`, from the cache when an identical key was stored before."""
    hit = lookup(kind, key, decode)
    if hit is not None:
        return hit
    value = compute()
    store(kind, key, encode(value))
    return value
