"""A training step's time, predicted from the operators of its simulation.

The simulated step (mmkit.plan.memory) records every operator it dispatches with its FLOPs (torch's
FLOP registry: matmuls, convolutions, attention) and the bytes it reads and writes
(`StepMemory.costs`). The prediction is a roofline per operator plus its dispatch cost:

    step = Σ over operators  max(FLOPs / matmul rate for its dtype and size, bytes / bandwidth)
           + operators × seconds per operator + seconds per step

The device's figures come from one of two sources, and every prediction says which:
- **calibrated** (`mmkit calibrate`): matmul throughput measured per dtype at several sizes (a
  size between two measured ones is interpolated in log space), memory bandwidth, and the cost of
  one eager operator in a training step, all on the local device;
- **datasheet**: the GPU preset's peak TFLOP/s × an assumed utilization, its memory bandwidth,
  and an assumed per-operator cost (mmkit.plan.timing).

What it leaves out, and says so: loading data (the step starts with the batch in memory), the
host-device copy, and collectives between processes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmkit.settings import GpuPreset
from mmkit.plan.timing import ASSUMED_SECONDS_PER_OP, ASSUMED_UTILIZATION, peak_tflops
from mmkit.plan.tracker import split_layout

DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Random fills cost per element (the generator's work), not per byte: their bytes are charged as if
# the tensor were fp32, the dtype calibrate measures them in
RANDOM_FILLS = {"bernoulli_", "uniform_", "normal_", "exponential_", "random_"}
ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
CONVOLUTIONS = {"convolution", "convolution_backward", "_convolution", "cudnn_convolution", "_slow_conv2d_forward"}


@dataclass(frozen=True)
class DeviceRates:
    """What the time model knows about a device."""

    source: str  # "calibrated ..." or "datasheet ..."
    matmul: dict[str, tuple[tuple[float, float], ...]]  # precision → ((FLOPs per call, FLOP/s), ...) by size
    bandwidth: float  # bytes/s
    seconds_per_op: float
    conv: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)  # as matmul; empty: matmul's
    # as matmul, for one layout of the operands ("bf16 nn": neither transposed); a layout not here: matmul's
    matmul_layouts: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    op_bandwidth: dict[str, float] = field(default_factory=dict)  # bytes/s of operators measured on their own
    seconds_per_step: float = 0.0  # a step's cost besides its operators

    def matmul_rate(self, precision: str, flops: float, op: str = "mm") -> float:
        """FLOP/s of a matmul-like call of `flops` FLOPs (interpolated in log-log between measured sizes);
        convolutions from their own table where there is one, a matrix product with its operands'
        layout (`mm:nn`) from that layout's where there is one."""
        base, layout = split_layout(op)
        tables = self.conv if base in CONVOLUTIONS and self.conv else self.matmul
        table = (self.matmul_layouts.get(f"{precision} {layout}") if layout else None) \
            or tables.get(precision) or tables.get("fp32") or self.matmul["fp32"]
        sizes = [s for s, _ in table]
        i = bisect.bisect_left(sizes, flops)
        if i == 0:
            return table[0][1]
        if i == len(table):
            return table[-1][1]
        (s0, r0), (s1, r1) = table[i - 1], table[i]
        t = (math.log(flops) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))


def device_rates(gpu: GpuPreset) -> DeviceRates:
    """The preset's calibration where it has one, else its datasheet figures with the assumptions."""
    cal = gpu.calibration
    if cal is not None:
        return DeviceRates(
            source=f"calibrated: {cal.source}",
            matmul={p: tuple((float(s), float(r) * 1e12) for s, r in sorted(rows)) for p, rows in cal.matmul_tflops.items()},
            bandwidth=cal.bandwidth_gb_s * 1e9,
            seconds_per_op=cal.seconds_per_op,
            conv={p: tuple((float(s), float(r) * 1e12) for s, r in sorted(rows)) for p, rows in cal.conv_tflops.items()},
            op_bandwidth={op: gb_s * 1e9 for op, gb_s in cal.op_gb_s.items()},
            seconds_per_step=cal.seconds_per_step,
            matmul_layouts={k: tuple((float(s), float(r) * 1e12) for s, r in sorted(rows))
                            for k, rows in cal.matmul_layout_tflops.items()},
        )
    utilization = ASSUMED_UTILIZATION[gpu.device_type]
    matmul = {p: ((1.0, peak_tflops(gpu, p) * 1e12 * utilization),) for p in gpu.precisions}
    return DeviceRates(
        source=f"datasheet: {gpu.name} preset's peak × assumed {utilization:.0%} utilization, its memory bandwidth, "
               f"assumed {ASSUMED_SECONDS_PER_OP[gpu.device_type] * 1e6:.0f} µs per operator",
        matmul=matmul, bandwidth=gpu.memory_bandwidth_gb_s * 1e9,
        seconds_per_op=ASSUMED_SECONDS_PER_OP[gpu.device_type],
    )


@dataclass(frozen=True)
class StepTime:
    seconds: float
    source: str
    parts: dict[str, float] = field(default_factory=dict)  # compute, memory, per-op (seconds)
    operators: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"step_seconds": self.seconds, "source": self.source, "parts": self.parts,
                "operators": self.operators,
                "method": "predicted: Σ over the simulated step's operators of max(FLOPs / matmul rate, "
                          "bytes / bandwidth) + operators × per-operator cost; data loading not included"}


def predict_step(costs: Sequence[Sequence], rates: DeviceRates) -> StepTime:
    """Seconds of one training step from its simulated operators (`StepMemory.costs`)."""
    compute = memory = 0.0
    operators = 0
    for op, dtype, flops, moved, calls in costs:
        operators += calls
        base = split_layout(op)[0]  # a matrix product's name carries its layout (mm:nt)
        if base in RANDOM_FILLS:
            moved = moved * 4 // ITEM_BYTES.get(dtype, 4)
        memory_time = moved / rates.op_bandwidth.get(base, rates.bandwidth)
        if flops > 0:
            per_call = flops / 2 if base == "convolution_backward" else flops  # the table is keyed by a forward's FLOPs
            compute_time = flops / rates.matmul_rate(DTYPE_PRECISION.get(dtype, "fp32"), per_call, op)
            if compute_time >= memory_time:
                compute += calls * compute_time
                continue
        memory += calls * memory_time
    overhead = operators * rates.seconds_per_op + rates.seconds_per_step
    return StepTime(compute + memory + overhead, rates.source,
                    {"compute": compute, "memory": memory, "per_op": overhead}, operators)
