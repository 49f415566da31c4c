"""What every part of the suite shares: the machine's description, interleaved timing, medians."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a report was measured on, and how busy it was when the part started."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        # the SIMD kernels torch dispatches to (e.g. AVX512, AVX2): CPU timings depend on it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(), "system": platform.system(),
        "date": time.strftime("%Y-%m-%d"), "load_average_1min": round(load[0], 2),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"
    capability = info.get("cpu_capability")  # absent from reports written before it was recorded
    capability = f" ({capability} capability as reported by torch)" if capability else ""
    return (f"{info['cpu']}{capability}, {info['cores']} cores (torch threads: {info['torch_threads']}){gpu}; "
            f"torch {info['torch']}, Python {info['python']}, {info['system']}; {info['date']}")


def quartiles(times: Sequence[float]) -> dict[str, float]:
    """Median and 25th/75th percentiles (the quartiles of `statistics.quantiles`, inclusive)."""
    if len(times) == 1:
        return {"median": times[0], "p25": times[0], "p75": times[0]}
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": q2, "p25": q1, "p75": q3}


def interleaved(runs: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each run `warmup` times, then `rounds` times in turn (A, B, B, A, A, B, ...: the order
    alternates so neither side always follows the other); each call returns its own seconds."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(runs[name]())
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios: each round's two measurements were taken back to back, so a
    slow spell on a shared machine affects both sides of a ratio rather than one side's median."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def goal(name: str, target: str, measured: str, met: bool | None, note: str = "") -> dict[str, Any]:
    """One line of the report's goal table; `met` None means not measured."""
    return {"goal": name, "target": target, "measured": measured,
            "status": "not measured" if met is None else ("met" if met else "missed"), "note": note}


def part_main(doc: str, run: Callable[..., dict[str, Any]], to_markdown: Callable[[dict[str, Any]], str],
              argv: list[str] | None, option: tuple[str, dict[str, Any]] | None = None,
              convert: Callable[[Any], Any] = lambda value: value) -> dict[str, Any]:
    """The command line every part shares when it runs alone (`python -m bench.PART`): `--quick`,
    and at most one option of the part's own, passed to `run` after `quick`; prints the machine
    and the part as JSON, then the part's Markdown."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    if option is not None:
        parser.add_argument(option[0], **option[1])
    args = parser.parse_args(argv)
    extra = [convert(getattr(args, option[0].lstrip("-").replace("-", "_")))] if option is not None else []
    part = run(args.quick, *extra)
    print(json.dumps({"machine": machine(), **part}, indent=2, default=str))
    print(to_markdown(part))
    return part
