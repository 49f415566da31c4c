"""The GPU rows: what only a CUDA device can show. Without one, each row says it was not measured.

    python -m bench.gpu [--quick]

amp          lfm2:original, one training step in fp32, fp16 (with GradScaler) and bf16 autocast
planner      every registered model: the planner's GPU-target simulation (foreach optimizer kernels,
             512-byte allocation granule) against `torch.cuda.max_memory_allocated` of real steps,
             and the overhead lines of the matching GPU preset beside them
oom_backoff  a training step whose batch does not fit a memory cap (`set_per_process_memory_fraction`):
             `StepRunner` halves the micro-batch and doubles grad_accum, and the step completes
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import goal, interleaved, ms, part_main, quartiles

GOAL_ERROR = 0.08
NO_CUDA = "no CUDA device on this machine (torch.cuda.is_available() is False); the rows run wherever one is"


def amp_rows(quick: bool) -> list[dict[str, Any]]:
    from mmkit.models.registry import create_model
    from mmkit.train.step import build_grad_scaler, training_step

    batch = 8 if quick else 16
    runs = {}
    for precision in ("fp32", "fp16", "bf16"):
        torch.manual_seed(0)
        model = create_model("lfm2", "original").cuda().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = build_grad_scaler(precision, "cuda")
        inputs = model.example_inputs(batch, seed=0)
        labels = torch.arange(batch, device="cuda") % model.config.num_classes

        def step(m=model, o=optimizer, s=scaler, p=precision, x=inputs, y=labels) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            training_step(m, o, x, y, precision=p, scaler=s, grad_clip=1.0)
            torch.cuda.synchronize()
            return time.perf_counter() - start

        runs[precision] = step
        del model
    times = interleaved(runs, 3 if quick else 10)
    base = quartiles(times["fp32"])["median"]
    return [{"model": "lfm2:original", "batch_size": batch, "precision": p, "step_seconds": quartiles(t),
             "speedup_vs_fp32": base / quartiles(t)["median"]} for p, t in times.items()]


def planner_rows(quick: bool) -> list[dict[str, Any]]:
    from mmkit.models.registry import list_models, resolve_config
    from mmkit.plan.hardware import resolve_gpu
    from mmkit.plan.memory import StepSettings, measure_training_steps, simulate_training_step

    preset, _ = resolve_gpu("auto")
    rows = []
    for name in list_models():
        entry, size, config = resolve_config(name, None, None)
        for batch in (2,) if quick else (2, 8):
            for precision in ("fp32", "fp16", "bf16"):
                settings = StepSettings(batch_size=batch, precision=precision, gpu_target=True)
                simulated = simulate_training_step(entry, config, settings)
                torch.cuda.empty_cache()
                measured = measure_training_steps(entry, config, settings, device="cuda", steps=2)
                overhead = preset.overhead_bytes(simulated.peak_tensors)
                rows.append({"model": name, "size": size, "batch_size": batch, "precision": precision,
                             "simulated_bytes": simulated.peak_tensors, "measured_bytes": measured.peak_tensors,
                             "error": (simulated.peak_tensors - measured.peak_tensors) / measured.peak_tensors,
                             "overhead_bytes": overhead, "gpu_preset": preset.name})
    return rows


def oom_backoff_row() -> dict[str, Any]:
    from mmkit.train.engine import StepRunner
    from mmkit.train.report import SilentReporter
    from mmkit.train.resolve import RunOptions, resolve_run

    batch = 64
    config = resolve_run(RunOptions(model="lfm2", preset="quick", device="cuda", batch_size=batch, size="original",
                                    epochs=1)).run_config()
    from mmkit.models.registry import build_model
    from mmkit.train.step import build_optimizer

    model = build_model(config.entry, config.model_config_object()).cuda().train()
    optimizer = build_optimizer(model, "adamw", 1e-4, 0.01)
    inputs = model.example_inputs(batch, device="cpu", seed=0)
    labels = torch.arange(batch) % model.config.num_classes
    # a cap a little above the model states (weights, gradients, AdamW state: 16 bytes per parameter)
    states = sum(p.numel() for p in model.parameters()) * 16
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(0.95, (states * 1.5 + 2**30) / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    messages: list[str] = []

    class Recorder(SilentReporter):
        def message(self, text: str) -> None:
            messages.append(text)

    try:
        with tempfile.TemporaryDirectory(prefix="mmkit-bench-") as tmp:
            config.save(Path(tmp))
            runner = StepRunner(Path(tmp), config, model, optimizer, None, torch.device("cuda"), Recorder())
            loss = runner.step(inputs, labels, 1, "epoch 1")
            return {"model": "lfm2:original", "batch_size": batch, "memory_cap_bytes": int(fraction * total),
                    "grad_accum_after": runner.micro_batches, "loss": float(loss), "messages": messages,
                    "backed_off": runner.micro_batches > 1}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def run(quick: bool = False) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"measured": False, "reason": NO_CUDA, "device": None,
                "goals": [goal("planner error on CUDA vs max_memory_allocated", f"≤ {GOAL_ERROR:.0%}", "—", None, NO_CUDA),
                          goal("AMP speed-up, lfm2:original on CUDA", "measured", "—", None, NO_CUDA),
                          goal("CUDA out-of-memory back-off", "backs off and completes", "—", None, NO_CUDA)]}
    part: dict[str, Any] = {"measured": True, "device": torch.cuda.get_device_name(0)}
    part["planner"] = planner_rows(quick)
    part["amp"] = amp_rows(quick)
    part["oom_backoff"] = oom_backoff_row()
    worst = max(part["planner"], key=lambda r: abs(r["error"]))
    fp16 = next(r for r in part["amp"] if r["precision"] == "fp16")
    part["goals"] = [
        goal("planner error on CUDA vs max_memory_allocated", f"≤ {GOAL_ERROR:.0%}",
             f"worst {worst['error']:+.2%} ({worst['model']}, batch {worst['batch_size']}, {worst['precision']})",
             abs(worst["error"]) <= GOAL_ERROR),
        goal("AMP speed-up, lfm2:original on CUDA", "measured", f"fp16 ×{fp16['speedup_vs_fp32']:.2f}", True),
        goal("CUDA out-of-memory back-off", "backs off and completes",
             f"grad_accum 1 → {part['oom_backoff']['grad_accum_after']}", part["oom_backoff"]["backed_off"]),
    ]
    return part


def to_markdown(part: dict[str, Any]) -> str:
    if not part["measured"]:
        return f"Not measured: {part['reason']}."
    lines = [f"Device: {part['device']}.", "", "| model | batch | precision | simulated | max_memory_allocated | error |"
             " overhead lines (preset) |", "|---|---:|---|---:|---:|---:|---|"]
    for r in part["planner"]:
        over = ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in r["overhead_bytes"].items())
        lines.append(f"| {r['model']}:{r['size']} | {r['batch_size']} | {r['precision']} | {r['simulated_bytes']:,} B "
                     f"| {r['measured_bytes']:,} B | {r['error']:+.2%} | {over} ({r['gpu_preset']}) |")
    lines += ["", "| lfm2:original | batch | step | speed-up vs fp32 |", "|---|---:|---:|---:|"]
    for r in part["amp"]:
        lines.append(f"| {r['precision']} | {r['batch_size']} | {ms(r['step_seconds']['median'])} "
                     f"| ×{r['speedup_vs_fp32']:.2f} |")
    o = part["oom_backoff"]
    lines += ["", f"Out-of-memory back-off ({o['model']}, batch {o['batch_size']}, memory capped at "
              f"{o['memory_cap_bytes'] / 2**30:.1f} GiB): grad_accum 1 → {o['grad_accum_after']}, "
              f"the step completed (loss {o['loss']:.3f})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return part_main(__doc__, run, to_markdown, argv)


if __name__ == "__main__":
    main()
