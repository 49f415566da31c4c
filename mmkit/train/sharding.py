"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`): which modules become
sharding units, sharding a model, and its full (unsharded) state for mmkit's own checkpoints.

    --strategy fsdp     every rank holds 1/N of each weight, gradient and AdamW state (a DTensor
                        sharded on dim 0); a unit's weights are all-gathered before its forward and
                        again before its backward, its gradients reduce-scattered (averaged) after

The units are the model's repeated blocks: a family names them (`fsdp_blocks`, a tuple of module
classes, on the model class), `--set fsdp.wrap=[ClassName,...]` overrides, and any other model
gets its largest repeated child module class (the class seen at least twice with the most
parameters per instance). The root is sharded last and holds whatever no unit took.

Mixed precision stays torch.autocast around the step, as in every other run: the sharded weights
and their all-gathers are fp32, autocast casts them per op (FSDP2's MixedPrecisionPolicy would
all-gather bf16 copies instead; the planner simulates what runs here).

Checkpoints stay mmkit's safetensors: the full state dicts are gathered to rank 0
(`torch.distributed.checkpoint.state_dict` with `full_state_dict=True, cpu_offload=True`) in the
layout of an unsharded run — optimizer state keyed by parameter index — so a run written with FSDP
resumes with FSDP, with DDP or in one process, and eval and compare read it like any run.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmkit.errors import MmkitError

# containers without a forward of their own: hooks on them would never run
_NO_FORWARD = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The largest repeated child module class: seen at least twice below the root, with the most
    parameters per instance (the first seen on a tie); empty when no class with parameters repeats."""
    seen = Counter(type(m) for m in model.modules() if m is not model and not isinstance(m, _NO_FORWARD))
    size: dict[type[nn.Module], int] = {}
    for m in model.modules():
        if m is not model and seen[type(m)] >= 2:
            size[type(m)] = max(size.get(type(m), 0), _param_count(m))
    candidates = [cls for cls, n in size.items() if n > 0]
    return (max(candidates, key=lambda cls: size[cls]),) if candidates else ()


def block_classes(model: nn.Module, wrap: Sequence[str] | None = None) -> tuple[type[nn.Module], ...]:
    """The module classes sharded as units: `wrap` (class names, `--set fsdp.wrap`), else the
    family's `fsdp_blocks`, else `default_block_classes`. An unknown name is refused in one line."""
    if wrap:
        by_name = {type(m).__name__: type(m) for m in model.modules() if m is not model}
        unknown = [name for name in wrap if name not in by_name]
        if unknown:
            raise MmkitError(
                f"--set fsdp.wrap: {', '.join(unknown)} is not a module class of this model; its classes: "
                f"{', '.join(sorted(n for n, c in by_name.items() if not issubclass(c, _NO_FORWARD)))}"
            )
        return tuple(by_name[name] for name in wrap)
    declared = getattr(model, "fsdp_blocks", None)
    return tuple(declared) if declared else default_block_classes(model)


def sharding_units(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """The modules sharded before the root, innermost first (fully_shard's order)."""
    units = [m for m in model.modules() if m is not model and isinstance(m, classes)
             and not isinstance(m, _NO_FORWARD) and _param_count(m) > 0]
    return list(reversed(units))


def shard_model(model: nn.Module, wrap: Sequence[str] | None = None, mesh: Any = None) -> nn.Module:
    """`fully_shard` each unit, then the root, in place over the default process group (or `mesh`,
    a 1-D DeviceMesh); returns the model, now an FSDPModule whose parameters are DTensors."""
    from torch.distributed.fsdp import fully_shard

    for unit in sharding_units(model, block_classes(model, wrap)):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync_paused(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients unsharded and unreduced for non-final micro-batches (FSDP's no_sync)."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _full_options(**extra: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (an unsharded optimizer's indices)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU (empty on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state dict on rank 0 in `optimizer.state_dict()`'s layout (state
    keyed by parameter index, as one process writes it); empty on the other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {
        "state": {index[name]: dict(values) for name, values in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in by_name["param_groups"]],
    }


def load_full_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (every rank holds it) into the sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_full_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load an unsharded optimizer state dict in `optimizer.state_dict()`'s layout (every rank
    holds it) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[i]: dict(values) for i, values in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())
