"""Training-time estimates from exact FLOPs and the GPU preset's peak throughput.

This is an estimate and says so: a step takes at least its FLOPs at the preset's peak rate
divided by an assumed utilization, and at least the bytes it must move at the preset's memory
bandwidth (a roofline: whichever is slower bounds the step). `mmkit memory-plan --measure`
replaces it with measured step times on the local device. Plans now predict the step from its
simulated operators (mmkit.plan.timemodel) and `predicted_time` turns that step into epochs; the
whole-step estimate (`estimate_time`) stays for the benchmark's comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmkit.settings import GpuPreset

# assumption: the fraction of peak dense TFLOP/s a real training step sustains (model FLOP
# utilization). Large transformer runs reach 40–60 %; small models and batches, and CPUs
# running many small kernels, reach less.
ASSUMED_UTILIZATION = {"cuda": 0.40, "cpu": 0.30}
# assumption: the fixed cost of one eager PyTorch operator (Python dispatch + kernel launch),
# which bounds small-batch steps however fast the device is
ASSUMED_SECONDS_PER_OP = {"cuda": 10e-6, "cpu": 15e-6}


@dataclass(frozen=True)
class TimeEstimate:
    step_seconds: float  # one optimizer step of `batch_size` samples
    epoch_seconds: float  # training steps + one validation pass
    total_seconds: float
    steps_per_epoch: int
    epochs: int
    train_samples: int
    val_samples: int
    utilization: float
    bound: str  # "compute", "memory bandwidth" or "per-op overhead"
    tflops: float
    ops_per_step: int = 0
    device_type: str = "cuda"
    # the step time from the operator time model (mmkit.plan.timemodel) and its figures' source, where used
    step_model: dict[str, object] | None = None

    def as_dict(self) -> dict[str, object]:
        common: dict[str, object] = {
            "step_seconds": self.step_seconds, "epoch_seconds": self.epoch_seconds, "total_seconds": self.total_seconds,
            "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "train_samples": self.train_samples,
            "val_samples": self.val_samples, "bound": self.bound,
        }
        if self.step_model is not None:
            return common | {
                "step_model": self.step_model,
                "method": "predicted: the step from the simulated step's operators (step_model: its figures' "
                "source), the validation pass from forward FLOPs at the preset's peak × assumed utilization; data "
                "loading not included",
            }
        return common | {
            "assumed_utilization": self.utilization,
            "peak_tflops": self.tflops,
            "ops_per_step": self.ops_per_step,
            "assumed_seconds_per_op": ASSUMED_SECONDS_PER_OP.get(self.device_type, float("nan")),
            "method": "estimate: the slowest of FLOPs from count / (peak TFLOP/s × assumed "
            "utilization), bytes moved / memory bandwidth, and simulated operators × assumed "
            "per-op overhead; validation pass included, data loading not",
        }


def peak_tflops(gpu: GpuPreset, precision: str) -> float:
    value = getattr(gpu.peak_tflops, precision, None)
    return value if value is not None else gpu.peak_tflops.fp32


def estimate_time(
    gpu: GpuPreset,
    precision: str,
    batch_size: int,
    train_flops_per_sample: int,
    forward_flops_per_sample: int,
    bytes_moved_per_step: int,
    train_samples: int,
    val_samples: int,
    epochs: int,
    ops_per_step: int = 0,
) -> TimeEstimate:
    """The roofline estimate from whole-step FLOPs, bytes and operators (the module docstring); what
    plans gave before the operator time model, kept for the benchmark's comparison."""
    rate = _sustained_rate(gpu, precision)
    compute = batch_size * train_flops_per_sample / rate
    memory = bytes_moved_per_step / (gpu.memory_bandwidth_gb_s * 1e9)
    launches = ops_per_step * ASSUMED_SECONDS_PER_OP[gpu.device_type]
    bound = max((compute, "compute"), (memory, "memory bandwidth"), (launches, "per-op overhead"))[1]
    return _per_epoch(gpu, precision, batch_size, max(compute, memory, launches), bound, forward_flops_per_sample,
                      train_samples, val_samples, epochs, ops_per_step=ops_per_step)


def predicted_time(
    gpu: GpuPreset,
    precision: str,
    batch_size: int,
    step_model: dict[str, object],
    forward_flops_per_sample: int,
    train_samples: int,
    val_samples: int,
    epochs: int,
) -> TimeEstimate:
    """Epoch and run times from a step the operator time model predicted (`StepTime.as_dict()`,
    mmkit.plan.timemodel)."""
    parts: dict[str, float] = step_model["parts"]  # type: ignore[assignment]
    bound = {"compute": "compute", "memory": "memory bandwidth", "per_op": "per-op overhead"}[
        max(parts, key=lambda part: parts[part])]
    return _per_epoch(gpu, precision, batch_size, float(step_model["step_seconds"]), bound,  # type: ignore[arg-type]
                      forward_flops_per_sample, train_samples, val_samples, epochs, step_model=step_model)


def _sustained_rate(gpu: GpuPreset, precision: str) -> float:
    """FLOP/s the preset's peak × the assumed utilization gives."""
    return peak_tflops(gpu, precision) * 1e12 * ASSUMED_UTILIZATION[gpu.device_type]


def _per_epoch(gpu: GpuPreset, precision: str, batch_size: int, step: float, bound: str, forward_flops_per_sample: int,
               train_samples: int, val_samples: int, epochs: int, ops_per_step: int = 0,
               step_model: dict[str, object] | None = None) -> TimeEstimate:
    """`step` seconds per optimizer step, a validation pass at forward FLOPs / the sustained rate."""
    steps = math.ceil(train_samples / batch_size)
    epoch = steps * step + val_samples * forward_flops_per_sample / _sustained_rate(gpu, precision)
    return TimeEstimate(
        step_seconds=step,
        epoch_seconds=epoch,
        total_seconds=epoch * epochs,
        steps_per_epoch=steps,
        epochs=epochs,
        train_samples=train_samples,
        val_samples=val_samples,
        utilization=ASSUMED_UTILIZATION[gpu.device_type],
        bound=bound,
        tflops=peak_tflops(gpu, precision),
        ops_per_step=ops_per_step,
        device_type=gpu.device_type,
        step_model=step_model,
    )
