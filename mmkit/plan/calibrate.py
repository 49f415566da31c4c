"""`mmkit calibrate`: a few seconds of micro-benchmarks on the local device, written as a GPU preset.

Measured (medians of repeated calls, after a warm-up; CUDA synchronised around each call):
- matmul throughput per precision at square sizes 32…1024 (the FLOPs of one call decide which
  measured size the time model interpolates from);
- memory bandwidth: an elementwise add of two 16M-element fp32 tensors, bytes read + written;
- the cost of one eager operator inside a training step: a small MLP's full step (forward,
  backward, clipping, AdamW), whose kernels are tiny, divided by the operators it dispatches.

The preset (`local` unless named) copies the base preset's memory figures (the CPU preset, or the
GPU's own when there is one) and adds a `[calibration]` table; `--gpu local` then predicts step
times from the measured figures (mmkit.plan.timemodel) and says so.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmkit.errors import MmkitError
from mmkit.settings import Calibration, GpuPreset

MATMUL_SIZES = (32, 96, 256, 512, 1024)
BANDWIDTH_ELEMENTS = 1 << 24
MIN_SECONDS = 0.12  # per measured figure
MAX_CALLS = 400


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def median_seconds(fn: Callable[[], object]) -> float:
        fn()
        sync()
        times: list[float] = []
        while sum(times) < MIN_SECONDS and len(times) < MAX_CALLS:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_seconds


def matmul_rates(device: torch.device, precisions: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """(FLOPs per call, TFLOP/s) per precision at MATMUL_SIZES."""
    timed = _timer(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out: dict[str, list[tuple[float, float]]] = {}
    for precision in precisions:
        rows = []
        for n in MATMUL_SIZES:
            a = torch.randn(n, n, device=device).to(dtypes[precision])
            b = torch.randn(n, n, device=device).to(dtypes[precision])
            flops = 2.0 * n**3
            rows.append((flops, flops / timed(lambda a=a, b=b: torch.mm(a, b)) / 1e12))
        out[precision] = rows
    return out


def bandwidth_gb_s(device: torch.device) -> float:
    timed = _timer(device)
    a = torch.randn(BANDWIDTH_ELEMENTS, device=device)
    b = torch.randn(BANDWIDTH_ELEMENTS, device=device)
    c = torch.empty_like(a)
    seconds = timed(lambda: torch.add(a, b, out=c))
    return 3 * a.numel() * a.element_size() / seconds / 1e9


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace != "prim":
            self.ops += 1
        return func(*args, **(kwargs or {}))


def seconds_per_op(device: torch.device) -> float:
    """A small MLP's training step (its kernels are tiny) over the operators it dispatches."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16))]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 16, device=device)

    def step() -> None:
        loss = model(x).square().mean()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    counter = _OpCounter()
    with counter:
        step()
    return _timer(device)(step) / counter.ops


def calibrate(device: str, base: GpuPreset, name: str) -> GpuPreset:
    """Measure `device` and return `base` renamed `name` with the measured calibration."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MmkitError("calibrate --device cuda: no CUDA device is available here")
    precisions = tuple(p for p in base.precisions if p != "fp16" or dev.type == "cuda")
    what = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    calibration = Calibration(
        source=f"mmkit calibrate on {what}, torch {torch.__version__}, {datetime.date.today().isoformat()}",
        matmul_tflops=matmul_rates(dev, precisions),  # type: ignore[arg-type]
        bandwidth_gb_s=bandwidth_gb_s(dev),
        seconds_per_op=seconds_per_op(dev),
    )
    return base.model_copy(update={"name": name, "display_name": f"{base.display_name}, calibrated here",
                                   "calibration": calibration})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def preset_toml(preset: GpuPreset) -> str:
    """The preset as a TOML file the preset loader reads back (top-level keys, then tables)."""
    document = preset.model_dump(mode="json", exclude_none=True, exclude={"name"})
    lines = ["# Written by `mmkit calibrate`: the GPU preset's memory figures and the device's measured speed."]
    tables = {k: v for k, v in document.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in document.items() if k not in tables]
    for table, values in tables.items():
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in nested]
        for sub, sub_values in nested.items():
            lines += ["", f"[{table}.{sub}]"] + [f"{k} = {_toml_value(v)}" for k, v in sub_values.items()]
    return "\n".join(lines) + "\n"


def write_preset(preset: GpuPreset, folder: Path) -> Path:
    from mmkit.atomic import write_atomic

    path = folder / "gpus" / f"{preset.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, preset_toml(preset))
    return path
