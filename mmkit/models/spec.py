"""Model specs: wherever a model name goes, a spec goes.

    NAME                      a registered family: built in, or registered by an installed
                              package through the `mmkit.models` entry-point group
    package.module:factory    an importable callable returning an `nn.Module`
    path/to/file.py:factory   the same, from a file

A spec resolves to a `ModelEntry`, as the built-in families have, so nothing downstream asks where a
model came from. When the callable a spec names is a builder registered with `@register_model`
(in the file, the module or the package), the spec gets that family whole: sizes, ladder,
`--size auto`. Any other callable is a *plain factory* (`FactoryBuilder`): one size, its keyword
arguments from `--set model.KEY=VALUE`, its inputs described by the module, `--input` or the data
(`complete_factory_config`).

Loading a spec runs the user's code, as `python file.py` would (a file is imported under a private
module name, its directory on `sys.path` only while it is imported). Loading a checkpoint never
runs code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mmkit.errors import MmkitError
from mmkit.models.base import USER_MODULE_PREFIX, ModelEntry, registered
from mmkit.models.catalog import ENTRY_POINT_GROUP, split_spec
from mmkit.models.module import (
    DTYPE_NAMES,
    FactoryConfig,
    InputDecl,
    ModuleModel,
    UserModelError,
    accepts,
    call_factory,
    forward_inputs,
    logits_width,
    own_inputs,
    user_error,
)


@dataclass(frozen=True)
class FactoryBuilder:
    """A plain factory as a family's builder: `config.kwargs` → the user's module, wrapped."""

    spec: str
    factory: Callable[..., Any]

    def __call__(self, config: FactoryConfig) -> ModuleModel:
        return ModuleModel(config, call_factory(self.spec, self.factory, config.kwargs), self.spec)


def is_factory(entry: ModelEntry) -> bool:
    return isinstance(entry.build, FactoryBuilder)


def resolve_spec(spec: str) -> ModelEntry:
    """The entry of `module:attr` or `file.py:attr` (imports the user's code once per file version)."""
    target, attr, is_file = split_spec(spec)
    if is_file:
        path = Path(target).expanduser().resolve()
        module, source = _import_file(spec, path)
        canonical = f"{path}:{attr}"
    else:
        module, source = _import_module(spec, target), {"kind": "module", "module": target}
        canonical = spec
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            raise MmkitError(f"model {spec!r}: {target} has no {attr!r}"
                             + (f"; it defines {', '.join(defined)}" if defined else ""))
        obj = getattr(obj, part)
    source = {**source, "spec": canonical}
    for entry in registered().values():
        if entry.build is obj:  # a registered family: everything a built-in one has
            return replace(entry, name=canonical, source=source)
    if not callable(obj):
        raise MmkitError(f"model {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable returning a module")
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return ModelEntry(
        name=canonical, build=FactoryBuilder(canonical, obj), sizes={"default": FactoryConfig()},
        default_size="default", ladder=(), default_data="", description=doc[0] if doc else "", source=source,
    )


def _import_module(spec: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise MmkitError(f"model {spec!r}: no module named {exc.name!r} (is the package installed, or is it a "
                             "file? write path/to/file.py:factory)") from None
        raise user_error(spec, f"importing {name}", exc) from exc
    except Exception as exc:
        raise user_error(spec, f"importing {name}", exc) from exc


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_file(spec: str, path: Path) -> tuple[Any, dict[str, Any]]:
    """The module of a model file, imported under `_mmkit_user_<stem>_<sha>`: once per content."""
    if not path.is_file():
        raise MmkitError(f"model {spec!r}: file not found: {path}")
    if path.suffix != ".py":
        raise MmkitError(f"model {spec!r}: {path} is not a Python file (.py)")
    sha = file_sha256(path)
    source = {"kind": "file", "path": str(path), "sha256": sha}
    name = f"{USER_MODULE_PREFIX}{''.join(c if c.isalnum() else '_' for c in path.stem)}_{sha[:16]}"
    if name in sys.modules:
        return sys.modules[name], source
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise MmkitError(f"model {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    directory = str(path.parent)
    added = directory not in sys.path
    if added:  # its sibling modules import while it loads, and only then
        sys.path.insert(0, directory)
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, (KeyboardInterrupt, MmkitError)):
            raise
        raise user_error(spec, f"importing {path.name}", exc) from exc
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)
    return module, source


def entry_point_entry(name: str) -> ModelEntry | None:
    """The family an installed package registers under `name` (entry-point group `mmkit.models`),
    or None when no package offers one."""
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name != name:
            continue
        try:
            obj = point.load()
        except MmkitError:
            raise
        except Exception as exc:
            raise user_error(f"{name} (entry point {point.value})", "importing it", exc) from exc
        distribution = getattr(getattr(point, "dist", None), "name", None)
        source = {"kind": "entry-point", "value": point.value, "distribution": distribution}
        entries = registered()
        if name in entries:
            return replace(entries[name], source=source)
        for entry in entries.values():
            if entry.build is obj:
                return replace(entry, name=name, source=source)
        raise MmkitError(f"the entry point {name!r} ({point.value}) of {distribution or 'an installed package'} "
                         f"registered no model named {name!r} (decorate its builder with @register_model)")
    return None


# --------------------------------------------------------------------------------------------------
# Describing a plain factory's inputs and classes


def data_input_decls(dataset: Any) -> dict[str, InputDecl]:
    """What each tensor of a dataset would be as a model input: float tensors as float32, integer
    ones in their dtype with the range they hold."""
    decls = {}
    for name, tensor in dataset.inputs.items():
        if tensor.dtype.is_floating_point:
            decls[name] = InputDecl(shape=tuple(tensor.shape[1:]), dtype="float32")
        else:
            high = int(tensor.max()) + 1 if tensor.numel() else 1
            decls[name] = InputDecl(shape=tuple(tensor.shape[1:]), dtype=DTYPE_NAMES[tensor.dtype], high=high)
    return decls


def complete_factory_config(
    entry: ModelEntry, config: FactoryConfig, *, inputs: Mapping[str, InputDecl] | None = None,
    data_inputs: Mapping[str, InputDecl] | None = None, num_classes: int | None = None, need_logits: bool = True,
) -> FactoryConfig:
    """`config` with its inputs and classes settled, from (in this order) `--input`, the module's
    own `input_specs()` / `example_inputs()`, or the data's tensors that `forward` takes.

    The module is built and run once on the meta device (nothing allocated): its logits' width is
    `num_classes`. When the factory takes a `num_classes` argument, the data's classes are passed."""
    builder = entry.build
    assert isinstance(builder, FactoryBuilder)
    complete = getattr(builder, "complete_config", None)
    if complete is not None:  # a builder that settles its own config (hf: models, mmkit.models.hf)
        return complete(entry, config, inputs=inputs, data_inputs=data_inputs, num_classes=num_classes,
                        need_logits=need_logits)
    spec = entry.name
    if num_classes is not None and "num_classes" not in config.kwargs and accepts(builder.factory, "num_classes"):
        config = config.with_kwargs({"num_classes": num_classes})
    with torch.device("meta"):
        net = call_factory(spec, builder.factory, config.kwargs)
    decls = dict(inputs or {}) or own_inputs(spec, net)
    if not decls and data_inputs:
        taken, missing = forward_inputs(net, data_inputs)
        if missing:
            raise MmkitError(f"model {spec!r}: forward takes {', '.join(missing)}, which the data does not have "
                             f"(it has {', '.join(sorted(data_inputs)) or 'no inputs'})")
        if not taken:
            raise MmkitError(f"model {spec!r}: forward takes none of the data's tensors "
                             f"({', '.join(sorted(data_inputs))})")
        decls = {name: data_inputs[name] for name in taken}
    if not decls:
        raise MmkitError(f"model {spec!r}: describe its inputs with --input NAME=D1xD2[:dtype[:high]] (repeatable), "
                         "or give --data")
    config = config.model_copy(update={"inputs": decls})
    model = ModuleModel(config, net, spec)
    try:
        with torch.no_grad():
            output = model(**model.example_inputs(2, device="meta"))
    except UserModelError as exc:
        raise UserModelError(f"{exc} (on inputs {_describe_decls(decls)})") from exc.__cause__
    try:
        width = logits_width(spec, output)
    except UserModelError:
        if need_logits:
            raise
        return config
    if num_classes is not None and width != num_classes:
        hint = ("" if accepts(builder.factory, "num_classes")
                else "; give the factory a num_classes argument and mmkit passes the data's")
        raise MmkitError(f"model {spec!r} predicts {width} classes, the data has {num_classes}{hint}")
    return config.model_copy(update={"num_classes": width})


def _describe_decls(decls: Mapping[str, InputDecl]) -> str:
    return ", ".join(f"{name} {list(d.shape)} {d.dtype}" for name, d in decls.items())
