"""`memory-plan` as a plain function over a resolved run's fit: simulate inference, estimate time,
optionally measure real steps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmkit.errors import MmkitError
from mmkit.plan.count import config_forward_flops
from mmkit.plan.fit import Candidate, FitResult
from mmkit.plan.memory import (
    FakeTrainingRig,
    Measurement,
    StepSettings,
    measure_training_steps,
)
from mmkit.plan.timemodel import device_rates, predict_step
from mmkit.plan.timing import TimeEstimate, predicted_time
from mmkit.settings import GpuPreset

if TYPE_CHECKING:
    from mmkit.plan.search import SearchResult


@dataclass(frozen=True)
class MeasureReport:
    measurement: Measurement
    predicted_peak: int  # simulated for the measuring device (CPU kernels, or the GPU plan)
    time: TimeEstimate  # from the measured step time

    @property
    def error_percent(self) -> float:
        measured = self.measurement.peak_tensors
        return 100.0 * (self.predicted_peak - measured) / measured if measured else float("nan")


@dataclass(frozen=True)
class MemoryPlan:
    fit: FitResult
    gpu: GpuPreset
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    margin: float
    inference_peak: int
    inference_overhead: dict[str, int]
    time: TimeEstimate | None
    measure: MeasureReport | None
    notes: list[str]
    nproc: int = 1  # data-parallel processes (one GPU each); the fit is per process
    strategy: str = "ddp"  # fsdp: the fit is one rank's sharded step
    grad_accum: int = 1  # micro-batches per optimizer step (the recipe's)
    has_data: bool = True  # False: a model described by --input alone; the time is per step
    search: SearchResult | None = None  # `--target-batch`: the ranked ways to train, the fit is the winner's

    @property
    def batch_size(self) -> int:
        """The global batch: what `train --batch-size` takes (per process × processes)."""
        return self.fit.batch_size * self.nproc

    @property
    def fits(self) -> bool:
        return self.fit.chosen.fits

    def as_dict(self) -> dict[str, Any]:
        """The `mmkit memory-plan --json` document (a stable contract)."""
        fit, chosen = self.fit, self.fit.chosen
        train = chosen.train
        overhead = sum(chosen.overhead.values())
        doc: dict[str, Any] = {
            "model": fit.entry.name,
            "size": fit.size,
            "width": fit.config.width,
            "gpu": {"name": self.gpu.name, "display_name": self.gpu.display_name, "vram_bytes": self.gpu.vram_bytes},
            "batch_size": self.batch_size,
            "nproc": self.nproc,
            "strategy": self.strategy,
            "per_rank_batch_size": fit.batch_size,
            "precision": self.precision,
            "grad_accum": self.grad_accum,
            "optimizer": self.optimizer,
            "gradient_checkpointing": self.gradient_checkpointing,
            "train": {
                **(train.as_dict() if train else {}),
                "peak_phase": train.peak_phase if train else None,
                "overhead": overhead,
                "overhead_lines": chosen.overhead,
                "total": chosen.total,
            },
            "inference": {
                "peak_tensors": self.inference_peak,
                "overhead": sum(self.inference_overhead.values()),
                "overhead_lines": self.inference_overhead,
                "total": self.inference_peak + sum(self.inference_overhead.values()),
            },
            "budget_bytes": fit.budget_bytes,
            "margin": self.margin,
            "fits": self.fits,
            "auto": {"size": fit.auto_size, "batch_size": fit.auto_batch},
            "why": {
                "next_width": _candidate_dict(fit.next_width),
                "next_batch": _candidate_dict(fit.next_batch),
                "batch_cap_reached": fit.batch_cap_reached,
            },
            "simulations": fit.simulations,
            "simulations_cached": fit.cached,
            "method": {
                "train": "simulated: one steady-state training step on fake tensors (CPU kernels), "
                "live storages tracked; overhead lines from the GPU preset",
                "time": "predicted from the simulated step's operators (see time.method and time.step_model.source)",
                **({"ddp_gradient_buckets": "estimated, not simulated: DDP's gradient buckets hold one more copy "
                    "of every trainable gradient in the parameters' dtype (fp32), per process"}
                   if self.nproc > 1 and self.strategy == "ddp" else {}),
                **({"fsdp": f"simulated: one rank's step of {self.nproc} over a fake process group; weights, "
                    "gradients and optimizer state are the rank's shards, all_gather the all-gather buffers and "
                    "unsharded weights; the collective backend's own buffers (NCCL's) are not included"}
                   if self.strategy == "fsdp" else {}),
            },
            "time": self.time.as_dict() if self.time else None,
            "notes": self.notes,
        }
        if self.measure is not None:
            m = self.measure
            doc["measure"] = {
                "device": m.measurement.device,
                "method": m.measurement.method,
                "predicted_peak_tensors": m.predicted_peak,
                "measured_peak_tensors": m.measurement.peak_tensors,
                "error_percent": m.error_percent,
                "step_seconds": m.measurement.step_seconds,
                "timed_steps": len(m.measurement.step_seconds),
                "step_seconds_median": m.measurement.median_step_seconds,
                "step_seconds_p25": m.measurement.spread_seconds[0],
                "step_seconds_p75": m.measurement.spread_seconds[1],
                "time": m.time.as_dict(),
            }
        return doc


def _candidate_dict(candidate: Candidate | None) -> dict[str, Any] | None:
    if candidate is None:
        return None
    return {
        "size": candidate.size,
        "width": candidate.width,
        "batch_size": candidate.batch_size,
        "total": candidate.total,
        "fits": candidate.fits,
        "simulated": candidate.simulated,  # False: a lower bound from the model states alone
    }


def plan_memory(
    fit: FitResult,
    gpu: GpuPreset,
    *,
    precision: str,
    optimizer: str,
    gradient_checkpointing: bool,
    margin: float | None,
    train_samples: int,
    val_samples: int,
    epochs: int = 1,
    measure: bool = False,
    measure_device: str | None = None,
    notes: list[str] | None = None,
    nproc: int = 1,
    grad_accum: int = 1,
    has_data: bool = True,
    search: SearchResult | None = None,
    strategy: str = "ddp",
) -> MemoryPlan:
    """The plan of a resolved run (mmkit.train.resolve): its fit, inference simulated at the
    choice, the time estimated, and optionally real steps measured.

    `fit` is per process when `nproc` > 1 (each of that many data-parallel processes holds batch /
    nproc); the time is per epoch with every process taking its share of the `train_samples`
    (the training split after `train_fraction`), gradient all-reduce not included.
    """
    sharded = strategy == "fsdp" and nproc > 1
    step = StepSettings(
        batch_size=fit.batch_size, precision=precision, optimizer=optimizer,
        gpu_target=gpu.device_type == "cuda", shards=nproc if sharded else 1,
    )
    if measure and sharded:
        raise MmkitError("--measure runs one process; a sharded step is measured on real ranks (the gloo tests "
                         "compare it with this simulation), drop --measure")
    rig = fit.rigs.get(fit.size) or FakeTrainingRig(fit.entry, fit.config, step)
    inference_peak = rig.inference(fit.batch_size)
    inference_overhead = gpu.overhead_bytes(inference_peak)

    time_estimate = None
    forward_flops = config_forward_flops(fit.entry, fit.config)
    train_samples = max(1, -(-train_samples // nproc))  # this process's share
    val_samples = -(-val_samples // nproc)
    memory = fit.chosen.train
    if memory is not None:
        time_estimate = predicted_time(gpu, precision, fit.batch_size,
                                       predict_step(memory.costs, device_rates(gpu)).as_dict(), forward_flops, train_samples, val_samples, epochs)

    measured = None
    if measure:
        device = measure_device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MmkitError("--measure on cuda: no CUDA device is available here")
        local = dataclasses.replace(step, gpu_target=device.startswith("cuda"))
        measurement = measure_training_steps(fit.entry, fit.config, local, device=device)
        predicted = (
            fit.chosen.train.peak_tensors
            if local.gpu_target == step.gpu_target and fit.chosen.train is not None
            else FakeTrainingRig(fit.entry, fit.config, local).training_step(fit.batch_size).peak_tensors
        )
        measured_step = measurement.median_step_seconds
        steps = -(-train_samples // fit.batch_size)
        measured_time = TimeEstimate(
            step_seconds=measured_step,
            epoch_seconds=steps * measured_step,
            total_seconds=steps * measured_step * epochs,
            steps_per_epoch=steps, epochs=epochs, train_samples=train_samples, val_samples=val_samples,
            utilization=float("nan"), bound="measured", tflops=float("nan"),
        )
        measured = MeasureReport(measurement, predicted, measured_time)

    return MemoryPlan(
        fit=fit, gpu=gpu, precision=precision, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        margin=gpu.margin if margin is None else margin,
        inference_peak=inference_peak, inference_overhead=inference_overhead,
        time=time_estimate, measure=measured, notes=list(notes or []), nproc=nproc, grad_accum=grad_accum,
        strategy="fsdp" if sharded else "ddp",
        has_data=has_data, search=search,
    )
