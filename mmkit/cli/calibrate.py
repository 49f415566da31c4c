"""`mmkit calibrate`: measure this machine's device and write it as a GPU preset (see mmkit.plan.calibrate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmkit.cli.common import console, err_console, one_line_errors, print_json
from mmkit.errors import MmkitError


@one_line_errors
def calibrate_cli(
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (CUDA when there is one).")] = "auto",
    name: Annotated[str, typer.Option("--name", help="Name of the preset written (`--gpu NAME` uses it).")] = "local",
    base: Annotated[
        str | None, typer.Option("--base", help="GPU preset whose memory figures it copies (default: cpu, or "
                                 "the preset matching the CUDA device).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Presets folder to write into (default: the first folder of "
                                  "MMKIT_PRESET_PATH, else the user's presets folder).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the preset as one JSON document.")] = False,
) -> None:
    """Time matmuls, memory bandwidth and per-operator cost here (about fifteen seconds), and write them as a GPU
    preset: plans with `--gpu NAME` then predict step times from measured figures."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise MmkitError(f"--name {name!r}: use letters, digits, '.', '_' or '-'")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise MmkitError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    import torch

    from mmkit.plan.calibrate import calibrate, write_preset
    from mmkit.plan.hardware import resolve_gpu
    from mmkit.settings import MmkitSettings, load_gpu_preset

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = load_gpu_preset(base) if base else resolve_gpu("auto" if device.startswith("cuda") else "cpu")[0]
    settings = MmkitSettings()
    folder = out or settings.preset_dirs[0]
    err_console.print(f"calibrating {device} (about fifteen seconds) …")
    measured = calibrate(device, preset, name)
    path = write_preset(measured, folder)
    if json_output:
        print_json(measured.model_dump(mode="json") | {"path": str(path)})
        return
    cal = measured.calibration
    assert cal is not None
    for kind, table in (("matmul", cal.matmul_tflops), ("convolution", cal.conv_tflops),
                        ("matmul", cal.matmul_layout_tflops)):
        for key, rows in table.items():
            rates = ", ".join(f"{tflops * 1000:,.1f} at {flops / 1e6:,.2f} MFLOP" for flops, tflops in rows)
            what = "forward + backward" if " " not in key else "one product of that layout"
            console.print(f"{kind} {key}, {what} (GFLOP/s, measured): {rates}")
    heavy = ", ".join(f"{op} {gb_s:,.1f}" for op, gb_s in sorted(cal.op_gb_s.items()))
    console.print(f"bandwidth (GB/s, measured): simple operators {cal.bandwidth_gb_s:,.1f}; {heavy}")
    console.print(f"one operator in a training step (measured): {cal.seconds_per_op * 1e6:,.1f} µs, "
                  f"and {cal.seconds_per_step * 1e3:,.2f} ms per step besides its operators")
    console.print(f"wrote {path}: plan with `--gpu {name}` (memory figures from preset {preset.name!r})")
