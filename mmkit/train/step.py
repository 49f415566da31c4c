"""One training step, shared by `train` and by the memory planner, so the planner simulates
exactly what training runs: forward under autocast, loss, (scaled) backward, gradient clipping,
optimizer step, zero_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.models.registry import logits_of

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

Phase = Callable[[str], None]
ForwardLoss = Callable[[nn.Module, Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def _no_phase(_: str) -> None:
    return None


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum 0.9 over the trainable parameters.

    `foreach=None` lets torch choose (multi-tensor kernels on CUDA, per-parameter loops on CPU),
    except for AdamW on a CPU, which gets the fused kernel where torch has it: its optimizer step is
    3–4 times faster there than the per-parameter loop, with fewer temporaries (bench/speedups.py).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        if foreach is None and params and all(p.device.type == "cpu" for p in params):
            try:
                return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
            except RuntimeError:  # torch without a fused CPU kernel
                pass
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, foreach=foreach)
    raise ValueError(f"unknown optimizer {name!r}")


def build_grad_scaler(precision: str, device_type: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device_type) if precision == "fp16" else None


def compute_loss(
    output: Any, labels: torch.Tensor, contrastive_weight: float = 0.0, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy on the class logits, plus the symmetric CLIP contrastive loss when the model
    returns `contrastive_logits` [B, B] and `contrastive_weight` > 0."""
    streams = getattr(output, "stream_logits", None)
    if streams is not None:  # independently trained models: each its own loss
        return sum(F.cross_entropy(s.float(), labels, label_smoothing=label_smoothing) for s in streams)
    logits = logits_of(output)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    contrastive = getattr(output, "contrastive_logits", None)
    if contrastive_weight > 0 and contrastive is not None and contrastive.shape[0] == contrastive.shape[1]:
        targets = torch.arange(contrastive.shape[0], device=contrastive.device)
        contrastive = contrastive.float()
        symmetric = (F.cross_entropy(contrastive, targets) + F.cross_entropy(contrastive.t(), targets)) / 2
        loss = loss + contrastive_weight * symmetric
    return loss


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    contrastive_weight: float = 0.0,
    label_smoothing: float = 0.0,
    loss_scale: float = 1.0,
    step_optimizer: bool = True,
    on_phase: Phase = _no_phase,
    forward_loss: ForwardLoss | None = None,
    clip_foreach: bool | None = None,
    optimizer_phase: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Forward, loss, backward and (when `step_optimizer`) clip + step + zero_grad.

    `loss_scale` divides the loss for gradient accumulation (1 / accumulation steps); with
    `step_optimizer=False` gradients accumulate and the optimizer is left alone. `forward_loss`
    replaces the forward pass and `compute_loss` (continual learning brings its own).
    `clip_foreach` is clipping's `foreach` (None: torch's choice, the multi-tensor kernels for a CPU or
    CUDA model's plain tensors). `optimizer_phase` runs in place of clipping, the optimizer step and
    zero_grad (the memory simulation repeats a phase it recorded, mmkit.plan.memory). Returns the
    (unscaled, detached) loss.
    """
    device_type = labels.device.type
    on_phase("forward")
    with torch.autocast(device_type, dtype=AMP_DTYPES.get(precision), enabled=precision in AMP_DTYPES):
        if forward_loss is not None:
            loss = forward_loss(model, inputs, labels)
        else:
            output = model(**inputs)
            loss = compute_loss(output, labels, contrastive_weight, label_smoothing)
            del output
    on_phase("backward")
    scaled = loss * loss_scale
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    if step_optimizer and optimizer_phase is not None:
        on_phase("optimizer")
        optimizer_phase()
    elif step_optimizer:
        on_phase("optimizer")
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if grad_clip is not None:
            inner = getattr(model, "module", model)  # inside DistributedDataParallel
            groups = inner.clip_groups() if hasattr(inner, "clip_groups") else None
            for group in groups or [list(model.parameters())]:
                torch.nn.utils.clip_grad_norm_(group, grad_clip, foreach=clip_foreach)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step when gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    on_phase("done")
    return loss.detach()
