"""Exact counts of a model: parameters by component, MACs and FLOPs, weight bytes.

Everything runs on the meta device: the model is built without allocating a single weight and the
forward and backward passes run on shape-only tensors, so counting a 150M-parameter model costs
a fraction of a second and almost no memory.

FLOPs come from torch's FLOP formulas (`torch.utils.flop_counter`, counted as its `FlopCounterMode`
counts them, plus the CPU's attention kernels), which count the ops that dominate cost — matrix
products, convolutions, attention — at 2 FLOPs per multiply-accumulate, and ignore elementwise ops
(activations, norms, residual adds). MACs are therefore exactly FLOPs / 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from mmkit.errors import MmkitError
from mmkit.models.module import FactoryConfig, InputDecl, ModuleModel, output_leaves
from mmkit.models.registry import (
    ModelConfig,
    ModelEntry,
    MultimodalModel,
    build_model,
    family_input_specs,
    resolve_config,
)
from mmkit.models.spec import complete_factory_config, is_factory
from mmkit.plan.tracker import FlopCounter

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class ComponentCount:
    name: str  # dotted module path, e.g. "audio.layers.0"
    params: int
    trainable: int
    children: list[ComponentCount] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "params": self.params, "trainable": self.trainable}
        if self.children:
            out["children"] = [c.as_dict() for c in self.children]
        return out


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass and of forward + backward, for a given batch size."""

    batch_size: int
    forward_flops: int
    train_flops: int  # forward + backward

    @property
    def forward_macs(self) -> int:
        return self.forward_flops // 2


@dataclass(frozen=True)
class CountReport:
    model: str
    size: str
    config: dict[str, Any]
    total_params: int
    trainable_params: int
    buffer_count: int  # non-trainable state that is not a parameter (e.g. BatchNorm statistics)
    components: list[ComponentCount]
    per_sample: FlopCount
    per_batch: FlopCount

    @property
    def weights_bytes(self) -> dict[str, int]:
        return {dtype: self.total_params * n for dtype, n in BYTES_PER_PARAM.items()}

    def as_dict(self) -> dict[str, Any]:
        """The `mmkit count --json` document (a stable contract)."""
        return {
            "model": self.model,
            "size": self.size,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "frozen_params": self.total_params - self.trainable_params,
            "buffer_count": self.buffer_count,
            "components": [c.as_dict() for c in self.components],
            "macs_per_sample": self.per_sample.forward_macs,
            "flops_per_sample": self.per_sample.forward_flops,
            "train_flops_per_sample": self.per_sample.train_flops,
            "batch_size": self.per_batch.batch_size,
            "macs_per_batch": self.per_batch.forward_macs,
            "flops_per_batch": self.per_batch.forward_flops,
            "train_flops_per_batch": self.per_batch.train_flops,
            "weights_bytes": self.weights_bytes,
            "config": self.config,
            "method": {
                "params": "exact (counted on the meta device)",
                "flops": "exact for matmul, convolution and attention (torch's FLOP formulas); "
                "elementwise ops not counted; 1 MAC = 2 FLOPs",
            },
        }


def count_components(module: nn.Module, depth: int, prefix: str = "") -> list[ComponentCount]:
    """Parameter counts of `module`'s children, recursing `depth` levels (depth 1 = children)."""
    components = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        params = list(child.parameters())
        if not params and not any(True for _ in child.children()):
            continue  # parameter-free leaves (activations, dropout) add nothing to the tree
        components.append(
            ComponentCount(
                name=path,
                params=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                children=count_components(child, depth - 1, path + ".") if depth > 1 else [],
            )
        )
    return components


def _backward_target(output: Any) -> torch.Tensor | None:
    """A scalar that depends on every floating output (tensors, dicts, tuples, dataclass-like
    objects, nested), so backward reaches every branch; None when no output needs a gradient."""
    tensors = [t for t in output_leaves(output) if t.requires_grad]
    return torch.stack([t.float().sum() for t in tensors]).sum() if tensors else None


Hook = Callable[[nn.Module, tuple[Any, ...], Any], None]


def _counted_forward(model: MultimodalModel, batch_size: int, counter: FlopCounter, forward_hook: Hook | None) -> Any:
    """The model's forward at `batch_size` with its FLOPs counted, `forward_hook(module, inputs, output)`
    called after each module's forward (not in backward's recomputation under activation checkpointing)."""
    inputs = model.example_inputs(batch_size)
    handle = register_module_forward_hook(forward_hook) if forward_hook is not None else None
    try:
        with counter:
            return model(**inputs)
    finally:
        if handle is not None:
            handle.remove()


def count_flops(model: MultimodalModel, batch_size: int, forward_hook: Hook | None = None) -> FlopCount:
    """FLOPs of one forward and one forward + backward pass, on the model's (meta) device."""
    counter = FlopCounter()
    output = _counted_forward(model, batch_size, counter, forward_hook)
    forward = counter.total
    with counter:
        target = _backward_target(output) if any(p.requires_grad for p in model.parameters()) else None
        if target is not None:
            target.backward()
    model.zero_grad(set_to_none=True)
    return FlopCount(batch_size=batch_size, forward_flops=forward, train_flops=counter.total)


# counts made in this process, by model key: a count made along with another meta pass (the CPU
# probe's layer shapes) is reused here even when the simulation cache is bypassed
_COUNTED: dict[str, FlopCount | None] = {}
_FORWARD: dict[str, int] = {}


def _memo_key(entry: ModelEntry, config: ModelConfig) -> str:
    from mmkit.cache import model_key

    return json.dumps(model_key(entry, config), sort_keys=True, default=str)


def _meta_model(entry: ModelEntry, config: ModelConfig) -> MultimodalModel:
    with torch.device("meta"):
        return build_model(entry, config).train()


def config_flops(entry: ModelEntry, config: ModelConfig) -> FlopCount:
    """`count_flops` at batch 1 of `entry` built with `config` in training mode (meta device, cached)."""
    from mmkit.cache import lookup, model_key, store

    memo, key = _memo_key(entry, config), model_key(entry, config)
    if memo not in _COUNTED:
        _COUNTED[memo] = lookup("flops", key, decode=lambda v: FlopCount(*map(int, v)))  # type: ignore[assignment]
    if _COUNTED.get(memo) is None:
        flops = _COUNTED[memo] = count_flops(_meta_model(entry, config), 1)
        store("flops", key, [flops.batch_size, flops.forward_flops, flops.train_flops])
    return _COUNTED[memo]


def config_forward_flops(entry: ModelEntry, config: ModelConfig, forward_hook: Hook | None = None) -> int:
    """FLOPs of one training-mode forward at batch 1 (meta device, cached): `config_flops`' forward
    without its backward pass, which the CPU probe and the validation time do not need. With
    `forward_hook` the count always runs (the hook sees its forward pass) and is remembered."""
    from mmkit.cache import lookup, model_key, store

    memo, key = _memo_key(entry, config), model_key(entry, config)
    if forward_hook is None:
        if memo in _FORWARD:
            return _FORWARD[memo]
        if (full := _COUNTED.get(memo)) is not None:
            return full.forward_flops
        known = lookup("forward-flops", key, decode=int)
        if known is not None:
            _FORWARD[memo] = known
            return known
    counter = FlopCounter()
    _counted_forward(_meta_model(entry, config), 1, counter, forward_hook)
    _FORWARD[memo] = counter.total
    store("forward-flops", key, counter.total)
    return counter.total


def count_model(
    name: str,
    size: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 1,
    depth: int = 1,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> CountReport:
    """Exact parameter, MAC and FLOP counts of a model spec; no weight is allocated. `inputs`
    (`--input`) describe a plain factory's inputs: name → {"shape", "dtype", "high"}."""
    entry, size_name, config = resolve_config(name, size, overrides)
    if is_factory(entry):
        assert isinstance(config, FactoryConfig)
        decls = {key: InputDecl.model_validate(value) for key, value in (inputs or {}).items()}
        config = complete_factory_config(entry, config, inputs=decls, need_logits=False)
    elif inputs:
        raise MmkitError(f"--input describes a plain factory's inputs; model {entry.name!r} describes its own "
                         f"({', '.join(family_input_specs(entry))})")
    return count_config(entry, size_name, config, batch_size, depth)


def count_config(entry: ModelEntry, size_name: str, config: ModelConfig, batch_size: int = 1,
                 depth: int = 1) -> CountReport:
    """`count_model` of a config already resolved (size, data widths and settings applied)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    with torch.device("meta"):
        model = build_model(entry, config)
    model.train()
    params = list(model.parameters())
    per_sample = count_flops(model, 1)
    per_batch = per_sample if batch_size == 1 else count_flops(model, batch_size)
    return CountReport(
        model=entry.name,
        size=size_name,
        config=config.model_dump(mode="json"),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        buffer_count=sum(b.numel() for b in model.buffers()),
        components=count_components(model.net if isinstance(model, ModuleModel) else model, depth=max(depth, 1)),
        per_sample=per_sample,
        per_batch=per_batch,
    )
