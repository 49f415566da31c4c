"""Any `nn.Module` as an mmkit model: the config that rebuilds it and the wrapper that gives it the
model contract (named inputs, `input_specs`, `example_inputs`).

A plain factory (`package.module:factory`, `path/to/file.py:factory`) has no sizes, no ladder and no
input contract of its own. `FactoryConfig` records what rebuilds it — the factory's keyword
arguments and the inputs it takes (from the module's own `input_specs()` / `example_inputs()`, from
`--input`, or from the data's tensors matched to `forward`'s parameters) — and is saved in run.json
like any family's config, so `resume`, `eval` and torchrun workers build the same module.
`ModuleModel` wraps the user's module as its child `net`; everything downstream (counting, the
memory simulation, the training engine, checkpoints) sees a `MultimodalModel` and never asks where
it came from.

A user's code failing — the factory, `forward` — is reported as theirs: `UserModelError`, one line
naming the spec and their exception (`MMKIT_DEBUG=1` keeps the traceback chained).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn
from torch.utils._pytree import tree_leaves

from mmkit.errors import MmkitError
from mmkit.models.base import InputSpec, ModelConfig, MultimodalModel, logits_of

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class UserModelError(MmkitError):
    """The user's model code failed (import, factory, forward) or returned something unusable."""


class InputDecl(BaseModel):
    """One input of a module, serializable: per-sample shape, dtype name, integer range."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, ...]
    dtype: str = "float32"
    high: int | None = None  # integer inputs (token ids) are drawn from [0, high)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; valid: {', '.join(DTYPES)}")
        return value

    def spec(self) -> InputSpec:
        return InputSpec(tuple(self.shape), DTYPES[self.dtype], self.high)

    @classmethod
    def of(cls, spec: InputSpec) -> InputDecl:
        return cls(shape=tuple(spec.shape), dtype=DTYPE_NAMES[spec.dtype], high=spec.high)


class FactoryConfig(ModelConfig):
    """What rebuilds a plain factory's module: its keyword arguments and its inputs.

    `num_classes` is the width of the module's logits (found by running it once on the meta device,
    or the data's classes when the factory takes a `num_classes` argument); None until resolved.
    """

    num_classes: int | None = None  # type: ignore[assignment]
    kwargs: dict[str, Any] = {}
    inputs: dict[str, InputDecl] = {}

    @property
    def width(self) -> int | None:  # type: ignore[override]
        """None: a plain factory has no width to scale (no size ladder)."""
        return None

    def at_width(self, width: int) -> FactoryConfig:
        raise MmkitError("a plain factory has no width to scale (no size ladder)")

    def with_kwargs(self, overrides: Mapping[str, Any]) -> FactoryConfig:
        """`--set model.KEY=V`: keyword arguments of the factory."""
        if "width" in overrides:
            raise MmkitError("invalid model setting 'width': a plain factory has no size ladder; "
                             "pass the factory's own keyword arguments with --set model.KEY=VALUE")
        return self.model_copy(update={"kwargs": {**self.kwargs, **overrides}})

    def input_specs(self) -> dict[str, InputSpec]:
        return {name: decl.spec() for name, decl in self.inputs.items()}

    def check_trainable(self, spec: str) -> None:
        """Raise MmkitError when the model can be counted and planned but not trained."""


class ModuleModel(MultimodalModel):
    """A user's module with the model contract: `forward(**inputs)` calls `net(**inputs)`.

    Its output is whatever the module returns; `logits_of` takes a tensor, a `logits` field or
    key, or the first element of a tuple. Errors inside the user's forward name the spec."""

    config: FactoryConfig

    def __init__(self, config: FactoryConfig, net: nn.Module, spec: str) -> None:
        super().__init__(config)
        self.net = net
        self.spec = spec

    def input_specs(self) -> dict[str, InputSpec]:
        if not self.config.inputs:
            raise MmkitError(f"model {self.spec!r}: its inputs are not described; give them with --input "
                             "NAME=D1xD2[:dtype[:high]] (repeatable) or --data")
        return self.config.input_specs()

    def forward(self, **inputs: torch.Tensor) -> Any:
        try:
            if self.config.inputs:  # the inputs it was described with (data may hold more tensors)
                inputs = {name: inputs[name] for name in self.config.inputs}
            return self.net(**inputs)
        except (MmkitError, torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise user_error(self.spec, "forward", exc) from exc


def user_error(spec: str, where: str, exc: BaseException) -> UserModelError:
    """`model 'towers.py:build': forward raised ValueError: ...` (one line)."""
    message = " ".join(str(exc).split()) or "(no message)"
    return UserModelError(f"model {spec!r}: {where} raised {type(exc).__name__}: {message}")


def call_factory(spec: str, factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> nn.Module:
    """The factory's module, or one line naming the spec and what went wrong."""
    try:
        module = factory(**kwargs)
    except MmkitError:
        raise
    except TypeError as exc:
        unknown = unknown_kwargs(factory, kwargs)
        if unknown:
            raise UserModelError(f"model {spec!r}: the factory takes no argument {', '.join(map(repr, unknown))}; "
                                 f"it takes {', '.join(parameters(factory)) or 'none'}") from exc
        raise user_error(spec, "the factory", exc) from exc
    except Exception as exc:
        raise user_error(spec, "the factory", exc) from exc
    if not isinstance(module, nn.Module):
        raise UserModelError(f"model {spec!r}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    return module


def parameters(function: Callable[..., Any]) -> list[str]:
    """Names of `function`'s keyword-usable parameters (`**kwargs` left out)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    return [p.name for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether `function` takes a keyword argument `name` (by name or through `**kwargs`)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    return name in parameters(function) or any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def unknown_kwargs(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> list[str]:
    return [key for key in kwargs if not accepts(function, key)]


def forward_inputs(net: nn.Module, available: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(the names of `available` that `net.forward` takes, its required parameters that are missing)."""
    try:
        signature = inspect.signature(net.forward)
    except (TypeError, ValueError):
        return sorted(available), []
    params = signature.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return sorted(available), []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    taken = [p.name for p in named if p.name in available]
    missing = [p.name for p in named if p.default is p.empty and p.name not in available]
    return taken, missing


def own_inputs(spec: str, net: nn.Module) -> dict[str, InputDecl] | None:
    """The inputs a module describes itself: `input_specs()` (name → InputSpec or (shape, dtype[,
    high])) or `example_inputs(batch_size)` (name → tensor [B, ...]); None when it has neither."""
    try:
        if callable(getattr(net, "input_specs", None)):
            return {name: InputDecl.of(InputSpec(*value)) for name, value in net.input_specs().items()}
        if callable(getattr(net, "example_inputs", None)):
            return {name: _decl_of_example(tensor) for name, tensor in net.example_inputs(2).items()}
    except MmkitError:
        raise
    except Exception as exc:
        raise user_error(spec, "describing its inputs", exc) from exc
    return None


def _decl_of_example(tensor: torch.Tensor) -> InputDecl:
    if tensor.dtype.is_floating_point or tensor.device.type == "meta" or tensor.numel() == 0:
        return InputDecl(shape=tuple(tensor.shape[1:]), dtype=DTYPE_NAMES[tensor.dtype],
                         high=None if tensor.dtype.is_floating_point else 2)
    return InputDecl(shape=tuple(tensor.shape[1:]), dtype=DTYPE_NAMES[tensor.dtype], high=int(tensor.max()) + 1)


def logits_width(spec: str, output: Any) -> int:
    """The number of classes a module's output predicts, or one line naming what it returned."""
    try:
        logits = logits_of(output)
    except MmkitError as exc:
        raise UserModelError(f"model {spec!r}: {exc}") from None
    if logits.dim() != 2:
        raise UserModelError(f"model {spec!r}: training needs class logits [batch, classes]; forward returned a "
                             f"tensor of shape {list(logits.shape)}")
    return int(logits.shape[1])


def output_leaves(output: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output: dicts, tuples, dataclass-like objects."""
    if hasattr(output, "__dict__") and not isinstance(output, torch.Tensor) and not isinstance(output, Mapping):
        output = {k: v for k, v in vars(output).items() if not k.startswith("_")}
    return [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]
