"""The precision a run actually uses on its device, decided once for `train`, `memory-plan` and
`compare` alike.

On CUDA the recipe's precision runs (fp16 autocast + GradScaler; bf16 where the GPU has it, else
fp16). On a CPU, fp16 kernels are slow or missing, so mixed precision means bf16 autocast, and it
is used only where the CPU runs it faster: a recipe's fp16/bf16 becomes bf16 when the probe of the
model's own layers (mmkit.plan.probe) measures a speed-up of at least ×1.1, else fp32. A precision
the user typed (`--precision`, `--set precision=`) runs as given (fp16 as bf16 on a CPU), with a
warning when the probe found it slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmkit.errors import MmkitError

BF16_MIN_SPEEDUP = 1.1  # below this a measured gain is within timing noise, and fp32 is exact


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # what runs: fp32, fp16 or bf16
    note: str | None  # what the user is told, or None when the requested precision simply runs
    bf16_speedup: float | None = None  # the CPU probe's figure, where it was consulted
    probe: dict | None = None  # the probe's record, for run.json


def run_precision(
    requested: str, *, given: bool, device_type: str, supported: tuple[str, ...],
    cpu_probe: Callable[[], object],
) -> PrecisionChoice:
    """`requested`: the recipe's precision; `given`: the user typed it; `supported`: what the
    device offers (its preset's precisions); `cpu_probe()` → a CpuProbe, called only on a CPU when
    mixed precision is asked for."""
    if device_type != "cpu":
        if requested in supported:
            return PrecisionChoice(requested, None)
        if given:
            raise MmkitError(f"the GPU does not support {requested}; supported: {', '.join(supported)}")
        fallback = "fp16" if "fp16" in supported else "fp32"
        return PrecisionChoice(fallback, f"the preset's {requested} is not supported here: running {fallback}")
    if requested == "fp32":
        return PrecisionChoice("fp32", None)
    probe = cpu_probe()
    speedup = probe.speedup  # type: ignore[attr-defined]
    measured = probe.describe()  # type: ignore[attr-defined]
    record = probe.as_dict()  # type: ignore[attr-defined]
    if given:
        prefix = "fp16 autocast is very slow on a CPU: running bf16 autocast instead; " if requested == "fp16" else ""
        slower = speedup < 1.0
        note = (f"{prefix}{'warning: ' if slower else ''}{measured}"
                + ("; fp32 would be faster here (drop --precision)" if slower else ""))
        return PrecisionChoice("bf16", note, speedup, record)
    if speedup >= BF16_MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"precision bf16 (the preset asks {requested}): {measured}", speedup, record)
    return PrecisionChoice(
        "fp32", f"precision fp32 (the preset asks {requested}; below ×{BF16_MIN_SPEEDUP} bf16 is not worth it): "
        f"{measured}", speedup, record)
