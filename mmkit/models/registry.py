"""The model registry: the only way in is `create_model(name, size=None, **overrides)`.

A family is one file in `mmkit/models/` that defines a frozen pydantic config, a model class and
one builder decorated with `@register_model(...)`, built on `mmkit.models.base`; the builder's
function name is the registry key (as in timm). The registry imports the built-in families, which
register themselves; the base classes are re-exported here for callers. Named sizes are data
(config instances); the *size ladder* is a tuple of widths, largest first, that the memory planner
walks through `config.at_width(width)`.

Sizes are spelled `NAME` (a named size) or `wN` (the family's default size rescaled to width N,
e.g. `w192`), so that every point of the ladder has a name a user can type back in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from mmkit.errors import MmkitError, first_error, unknown_choice
from mmkit.models.base import (  # noqa: F401  (logits_of, register_model: part of the registry's API)
    USER_MODULE_PREFIX,
    InputSpec,
    ModelConfig,
    ModelEntry,
    MultimodalModel,
    logits_of,
    register_model,
    registered,
)
from mmkit.models.catalog import SPEC_FORMS, entry_point_models, is_hf_spec, parse_override_value  # noqa: F401
from mmkit.models.module import FactoryConfig


_WIDTH_SIZE = re.compile(r"w(\d+)")


def _ensure_families_loaded() -> None:
    # the package itself loads lazily (so that mmkit.models.catalog stays torch-free): import the
    # families here, each registers itself
    from mmkit.models import clip, fusion, lfm2, multichannel, separate  # noqa: F401  (registration)


def list_models() -> list[str]:
    """The built-in families and those installed packages offer (entry-point group `mmkit.models`)."""
    _ensure_families_loaded()
    return sorted({*(name for name, e in registered().items() if not _from_model_file(e)), *entry_point_models()})


def _from_model_file(entry: ModelEntry) -> bool:
    return getattr(entry.build, "__module__", "").startswith(USER_MODULE_PREFIX)


def get_model_entry(name: str) -> ModelEntry:
    """The entry of a model spec (see mmkit.models.spec): a registered or installed family's name,
    `package.module:factory` or `path/to/file.py:factory`."""
    _ensure_families_loaded()
    if is_hf_spec(name):
        from mmkit.models.hf import resolve_hf_spec

        return resolve_hf_spec(name)
    if ":" in name:
        from mmkit.models.spec import resolve_spec

        return resolve_spec(name)
    entries = registered()
    if name in entries and entries[name].source is None and not _from_model_file(entries[name]):
        return entries[name]
    from mmkit.models.spec import entry_point_entry

    entry = entry_point_entry(name)
    if entry is None:
        error = unknown_choice("model", name, list_models())
        raise MmkitError(f"{error} (or a spec: {SPEC_FORMS})")
    return entry


def size_config(entry: ModelEntry, size: str | None) -> tuple[str, ModelConfig]:
    """(canonical size name, config) for a size spelled `NAME` or `wN`."""
    size = size or entry.default_size
    if size == "default" and size not in entry.sizes:  # presets say "default" for the family's default size
        size = entry.default_size
    if size in entry.sizes:
        return size, entry.sizes[size]
    match = _WIDTH_SIZE.fullmatch(size)
    if match:
        width = int(match.group(1))
        if width <= 0:
            raise MmkitError(f"size {size!r} of model {entry.name!r}: width must be positive")
        return size, entry.sizes[entry.default_size].at_width(width)
    valid = [*entry.sizes, "w<width>, e.g. " + ", ".join(f"w{w}" for w in entry.ladder[:3])]
    raise MmkitError(f"unknown size {size!r} for model {entry.name!r}; valid: {', '.join(valid)}")


def _config_keys(config: BaseModel, prefix: str = "") -> list[str]:
    keys = []
    for field, value in config:
        path = prefix + field
        keys.append(path)
        if isinstance(value, BaseModel):
            keys.extend(_config_keys(value, path + "."))
    return keys


def apply_overrides(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """Apply `{"dotted.key": value}` overrides; the key `width` rescales through `at_width`.

    Unknown keys and invalid values raise MmkitError naming the key and the valid ones.
    """
    overrides = dict(overrides)
    if isinstance(config, FactoryConfig):  # a plain factory: its keyword arguments
        return config.with_kwargs(overrides) if overrides else config
    if "width" in overrides:
        width = overrides.pop("width")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise MmkitError(f"invalid model setting 'width': expected a positive integer, got {width!r}")
        config = config.at_width(width)
    if not overrides:
        return config
    valid = _config_keys(config)
    data = config.model_dump()
    for key, value in overrides.items():
        if key not in valid:
            raise MmkitError(
                f"unknown model setting {key!r}; valid: width, {', '.join(valid)}"
            )
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return type(config).model_validate(data)
    except ValidationError as exc:
        field, message = first_error(exc)
        raise MmkitError(f"invalid model setting {field!r}: {message}" if field
                         else f"invalid model settings: {message}") from None


def resolve_config(
    name: str, size: str | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[ModelEntry, str, ModelConfig]:
    """The registry entry, canonical size name and final config for a model request."""
    entry = get_model_entry(name)
    size_name, config = size_config(entry, size)
    config = apply_overrides(config, overrides or {})
    return entry, size_name, config


def require_inputs(model: str, needed: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]]) -> None:
    missing = [name for name in needed if name not in shapes]
    if missing:
        raise MmkitError(
            f"model {model!r} expects inputs {', '.join(needed)}; the data has "
            f"{', '.join(sorted(shapes)) or 'none'} (missing {', '.join(missing)})"
        )


def data_overrides(
    entry: ModelEntry, shapes: Mapping[str, tuple[int, ...]], num_classes: int
) -> dict[str, Any]:
    """Overrides that fit a model of `entry`'s family to a dataset: input widths and classes."""
    needed = tuple(family_input_specs(entry))
    require_inputs(entry.name, needed, shapes)
    return {**entry.config_class.overrides_for_inputs(shapes), "num_classes": num_classes}


def family_input_specs(entry: ModelEntry) -> dict[str, InputSpec]:
    """The inputs every size of `entry` takes (names and dtypes; widths are the default size's; cached)."""
    from mmkit.cache import cached, model_key

    config = entry.sizes[entry.default_size]

    def specs() -> dict[str, InputSpec]:
        with torch.device("meta"):
            return build_model(entry, config).input_specs()

    return cached(
        "inputs", model_key(entry, config), specs,
        encode=lambda v: {k: [list(i.shape), str(i.dtype).removeprefix("torch."), i.high] for k, i in v.items()},
        decode=lambda v: {k: InputSpec(tuple(shape), getattr(torch, dtype), high) for k, (shape, dtype, high) in v.items()},
    )


def build_model(entry: ModelEntry, config: ModelConfig) -> MultimodalModel:
    model = entry.build(config)
    if not isinstance(model, MultimodalModel):
        raise TypeError(f"builder {entry.name!r} returned {type(model).__name__}, not a MultimodalModel")
    return model


def create_model(name: str, size: str | None = None, **overrides: Any) -> MultimodalModel:
    """Build a registered model. Overrides are config fields; nested ones in dotted form
    (`create_model("lfm2", **{"fusion.layers": 2})`) or `width=N`."""
    entry, _, config = resolve_config(name, size, overrides)
    return build_model(entry, config)
