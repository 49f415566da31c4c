"""`train --weights PATH`: a model's starting weights from local safetensors files, never a pickle.

PATH is a `.safetensors` file, a sharded checkpoint's `model.safetensors.index.json`, or a
directory holding either (what `save_pretrained` writes; `hf:DIR` is read as DIR). Tensors are
matched to the model strictly by name and shape; nothing is loaded that does not match both, and
weights that cover less than half of the model's values are refused (another model's). The
names are the module's own (a plain factory's or an hf: model's module, not mmkit's wrapper `net.`);
a model may read a checkpoint's names as its own (`checkpoint_name`: an hf: model applies the
library's renamings and base-model prefix, so ViTModel weights go into a ViTForImageClassification),
and older checkpoints' names are read as today's (`LayerNorm.gamma`/`beta` → `weight`/`bias`, weight
norm's `weight_g`/`weight_v` → `parametrizations.weight.original0`/`original1`). What is left as
initialized — typically a classification head whose width is not the data's classes — and what the
file holds that the model does not are said in one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmkit.errors import MmkitError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CONVERT = ("convert it to safetensors once, where you trust the file: python -c \"from transformers import "
           "AutoModel; AutoModel.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)\"")
LEGACY_NAMES = ((".gamma", ".weight"), (".beta", ".bias"), (".weight_g", ".parametrizations.weight.original0"),
                (".weight_v", ".parametrizations.weight.original1"))
SHOWN = 6  # names listed in the one line, per kind
MIN_SHARE = 0.5  # weights that cover less of the model are refused: another model's, whatever matched


def weight_files(path: str) -> list[Path]:
    """The safetensors files of `path`, or one line saying why there are none (a pickle is refused)."""
    path_text = path.removeprefix("hf:")
    where = Path(path_text).expanduser()
    if where.is_dir():
        if (where / INDEX_FILE).is_file():
            where = where / INDEX_FILE
        elif (where / SINGLE_FILE).is_file():
            where = where / SINGLE_FILE
        else:
            pickled = [name for name in PICKLE_FILES if (where / name).is_file()]
            if pickled:
                raise MmkitError(f"--weights {path}: {where} holds {pickled[0]}, a pickle, which mmkit never loads "
                                 f"(unpickling runs code); {CONVERT}")
            raise MmkitError(f"--weights {path}: {where} has no {SINGLE_FILE} or {INDEX_FILE}")
    if where.name.endswith(PICKLE_SUFFIXES) or where.name.endswith(".bin.index.json"):  # by its name: never opened
        raise MmkitError(f"--weights {path}: {where.name} is a pickle, which mmkit never loads (unpickling runs "
                         f"code); {CONVERT}")
    if not where.is_file():
        raise MmkitError(f"--weights {path}: file not found: {where}")
    if where.name.endswith(".index.json"):
        try:
            weight_map = json.loads(where.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise MmkitError(f"--weights {path}: {where} is not a safetensors index (no weight_map: {exc})") from None
        files = [where.parent / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MmkitError(f"--weights {path}: the index names shards that are not there: {', '.join(missing[:3])}")
        return files
    if where.suffix != ".safetensors":
        raise MmkitError(f"--weights {path}: expected a .safetensors file, a {INDEX_FILE} or a directory holding one")
    return [where]


def _file_shapes(files: list[Path], path: str) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor's name → (shape, file), from the files' headers (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    shapes[name] = (tuple(handle.get_slice(name).get_shape()), file)
        except (SafetensorError, OSError) as exc:
            raise MmkitError(f"--weights {path}: {file} is not a readable safetensors file: {exc}") from None
    return shapes


def target_module(model: nn.Module) -> nn.Module:
    """The module whose names the weights carry: a wrapped module's own (`net`), else the model."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


@dataclass(frozen=True)
class WeightsPlan:
    """Which file tensor goes to which model tensor, and what does not match."""

    path: str
    files: tuple[Path, ...]
    mapping: dict[str, str]  # file name → model name (name and shape match)
    missing: tuple[str, ...]  # model tensors nothing in the files matches: left as initialized
    unexpected: tuple[str, ...]  # file tensors the model has no name for
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (model name, file shape, model shape)
    share: float  # of the model's values (parameters and buffers) that were loaded

    def describe(self) -> str:
        """One line: what was loaded, and what was not."""
        parts = [f"weights: {len(self.mapping)} tensors loaded from {self.path} ({self.share:.2%} of the model's values)"]
        if self.mismatched:
            shown = ", ".join(f"{n}: file {list(a)}, model {list(b)}" for n, a, b in self.mismatched[:SHOWN])
            parts.append(f"{len(self.mismatched)} of another shape, left as initialized ({shown}"
                         f"{', …' if len(self.mismatched) > SHOWN else ''})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing, left as initialized ({_names(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected, not used ({_names(self.unexpected)})")
        line = "; ".join(parts)
        if any(_is_head(n) for n in (*self.missing, *(m[0] for m in self.mismatched))):
            line += " — a classification head is expected here when the data's classes are not the weights' labels"
        return line


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names[:SHOWN]) + (", …" if len(names) > SHOWN else "")


def _is_head(name: str) -> bool:
    return name.split(".")[0] in ("classifier", "score", "head", "projector", "fc") or ".classifier." in name


def plan_weights(model: nn.Module, path: str) -> WeightsPlan:
    """Match the tensors of `path` to `model` (built on any device, meta included) by name and
    shape; one line when none matches (they are some other model's weights)."""
    files = weight_files(path)
    shapes = _file_shapes(files, path)
    module = target_module(model)
    own = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    rename = getattr(model, "checkpoint_name", None) or (lambda name: name)  # a library's own names (mmkit.models.hf)
    best: dict[str, str] = {}
    for name in shapes:
        target = _legacy(rename(name), own)
        if target in own:
            best[name] = target
    mapping = {name: target for name, target in best.items() if shapes[name][0] == own[target]}
    mismatched = tuple((target, shapes[name][0], own[target]) for name, target in best.items()
                       if shapes[name][0] != own[target])
    tensors = module.state_dict(keep_vars=True)
    named = {id(tensors[target]) for target in best.values()}  # a tied tensor is named with its twin
    missing = tuple(name for name in own if id(tensors[name]) not in named)
    unexpected = tuple(name for name in shapes if name not in best)
    total = sum(math.prod(shape) for shape in own.values())
    loaded = sum(math.prod(own[target]) for target in mapping.values())
    if loaded < MIN_SHARE * total:  # a head that happens to match is not the model's weights
        first = next(iter(shapes), "(none)")
        raise MmkitError(f"--weights {path}: {len(mapping)} of its {len(shapes)} tensors match the model by name "
                         f"and shape, {loaded / max(total, 1):.1%} of its values (the file's first: {first}; the "
                         f"model's first: {next(iter(own), '(none)')}); are they another model's weights?")
    return WeightsPlan(path, tuple(files), mapping, missing, unexpected, mismatched, loaded / max(total, 1))


def _legacy(name: str, own: Mapping[str, Any]) -> str:
    if name in own:
        return name
    for old, new in LEGACY_NAMES:
        if name.endswith(old) and name[: -len(old)] + new in own:
            return name[: -len(old)] + new
    return name


def load_weights(model: nn.Module, path: str) -> WeightsPlan:
    """Copy the matching tensors of `path` into `model` (in its dtypes, on its device)."""
    from safetensors import safe_open

    plan = plan_weights(model, path)
    module = target_module(model)
    state = module.state_dict()
    with torch.no_grad():
        for file in plan.files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    target = plan.mapping.get(name)
                    if target is not None:
                        state[target].copy_(handle.get_tensor(name))
    return plan
