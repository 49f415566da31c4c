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
from typing import Any, NamedTuple, Self

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


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
    """Class logits from a model output: the tensor itself or its `logits` field."""
    return output if isinstance(output, torch.Tensor) else output.logits


@dataclass(frozen=True)
class ModelEntry:
    """A registered family: its builder, named sizes, size ladder, default data and one-line description."""

    name: str
    build: Callable[[Any], MultimodalModel]
    sizes: Mapping[str, ModelConfig]
    default_size: str
    ladder: tuple[int, ...]  # widths, largest first
    default_data: str
    description: str

    @property
    def config_class(self) -> type[ModelConfig]:
        return type(self.sizes[self.default_size])


_ENTRIES: dict[str, ModelEntry] = {}


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
        if name in _ENTRIES:
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
