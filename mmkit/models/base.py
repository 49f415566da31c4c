"""What a model family is built from: its config base, its input specs, the model base class and
the `@register_model` decorator that enters its builder into the table of registered families.

A family file imports this module, never `mmkit.models.registry`: the registry imports the
families (to have them register), so the families importing it back would make an import cycle.
Lookups by name, sizes and overrides are the registry's (`mmkit.models.registry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Self

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from mmkit.errors import MmkitError


class ModelConfig(BaseModel):
    """Base of every family's config: frozen, serializable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_classes: int

    @property
    def width(self) -> int:
        """The feature width the size ladder is measured in."""
        raise NotImplementedError

    def at_width(self, width: int) -> Self:
        """This config rescaled to `width` (the family documents how the other dims follow)."""
        raise NotImplementedError

    @classmethod
    def overrides_for_inputs(cls, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Config overrides that make the model accept inputs of these per-sample `shapes`.

        Called through `data_overrides`, which has already checked that every input the model
        uses is present; raise MmkitError when one is unusable (wrong rank, non-square image).
        """
        raise NotImplementedError


class InputSpec(NamedTuple):
    """One named model input, without the batch dimension."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None  # integer inputs (token ids) are drawn from [0, high)


class MultimodalModel(nn.Module):
    """Base of every registered model.

    Forward contract: `model(**inputs)` with inputs named by modality returns class logits
    `[B, num_classes]`, or a named structure whose `logits` field is that (see `logits_of`).
    """

    config: ModelConfig
    # the repeated blocks `--strategy fsdp` shards as units (empty: the largest repeated child class)
    fsdp_blocks: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def input_specs(self) -> dict[str, InputSpec]:
        raise NotImplementedError

    def example_inputs(
        self, batch_size: int, device: torch.device | str | None = None, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right names, shapes and dtypes, on the model's device by default."""
        if device is None:
            first = next(self.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        generator = None
        if seed is not None and device.type != "meta":
            generator = torch.Generator(device=device).manual_seed(seed)
        inputs = {}
        for name, spec in self.input_specs().items():
            shape = (batch_size, *spec.shape)
            if spec.high is not None:
                inputs[name] = torch.randint(
                    0, spec.high, shape, dtype=spec.dtype, device=device, generator=generator
                )
            else:
                inputs[name] = torch.randn(shape, dtype=spec.dtype, device=device, generator=generator)
        return inputs


def logits_of(output: Any) -> torch.Tensor:
    """Class logits from a model output: the tensor itself, its `logits` field or key, or the
    first element of a tuple (as many modules return `(logits, extra)`)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise MmkitError(f"training needs class logits (a tensor [batch, classes], a `logits` field or key, or a "
                         f"tuple whose first element is them); forward returned {describe_output(output)}")
    return logits


def describe_output(output: Any) -> str:
    """What a forward returned, for an error line: `a tensor [2, 5]`, `a dict with keys a, b`."""
    if isinstance(output, torch.Tensor):
        return f"a tensor {list(output.shape)}"
    if isinstance(output, Mapping):
        return f"a dict with keys {', '.join(map(str, output)) or '(none)'}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return type(output).__name__


@dataclass(frozen=True)
class ModelEntry:
    """A registered family: its builder, named sizes, size ladder, default data and one-line description."""

    name: str
    build: Callable[[Any], MultimodalModel]
    sizes: Mapping[str, ModelConfig]
    default_size: str
    ladder: tuple[int, ...]  # widths, largest first
    default_data: str  # "" for a plain factory: its data is the user's
    description: str
    source: Mapping[str, Any] | None = None  # how a model spec was found (run.json's `model_source`)

    @property
    def config_class(self) -> type[ModelConfig]:
        return type(self.sizes[self.default_size])


_ENTRIES: dict[str, ModelEntry] = {}
USER_MODULE_PREFIX = "_mmkit_user_"  # model files are imported under private names starting so


def registered() -> Mapping[str, ModelEntry]:
    """The families registered so far, by name (read-only; the registry loads the built-in ones)."""
    return MappingProxyType(_ENTRIES)


def register_model(
    *,
    sizes: Mapping[str, ModelConfig],
    default_size: str,
    ladder: tuple[int, ...],
    default_data: str,
) -> Callable[[Callable[[Any], MultimodalModel]], Callable[[Any], MultimodalModel]]:
    """Register a family builder under its function name."""
    if default_size not in sizes:
        raise ValueError(f"default size {default_size!r} is not one of {sorted(sizes)}")
    if list(ladder) != sorted(ladder, reverse=True):
        raise ValueError(f"size ladder must be ordered from large to small: {ladder}")

    def decorator(build: Callable[[Any], MultimodalModel]) -> Callable[[Any], MultimodalModel]:
        name = build.__name__
        known = _ENTRIES.get(name)
        reloaded = known is not None and all(  # a model file imported again after it changed
            getattr(b, "__module__", "").startswith(USER_MODULE_PREFIX) for b in (known.build, build))
        if known is not None and not reloaded:
            raise ValueError(f"model {name!r} registered twice")
        doc = (build.__doc__ or "").strip().splitlines()
        _ENTRIES[name] = ModelEntry(
            name=name,
            build=build,
            sizes=dict(sizes),
            default_size=default_size,
            ladder=tuple(ladder),
            default_data=default_data,
            description=doc[0] if doc else "",
        )
        return build

    return decorator
