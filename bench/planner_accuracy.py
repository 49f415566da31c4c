"""Planner accuracy: simulated against measured peak tensor memory of one training step.

    python -m bench.planner_accuracy [--quick]

For every registered model (its default size and input shapes), two batch sizes and two
precisions (fp32, bf16 autocast), AdamW and clipping at 1.0: the planner's simulated peak
(`simulate_training_step`, fake tensors) against the peak of live tensor storage in real steps
on this CPU (`measure_training_steps`, after one warm-up step). Error = (simulated − measured) /
measured. On CUDA the same comparison against `torch.cuda.max_memory_allocated` is bench.gpu.
"""

from __future__ import annotations

from typing import Any

from bench.common import goal, part_main

GOAL_ERROR = 0.03
BATCH_SIZES = (2, 8)
PRECISIONS = ("fp32", "bf16")


def accuracy_row(name: str, batch_size: int, precision: str, device: str = "cpu") -> dict[str, Any]:
    from mmkit.models.registry import resolve_config
    from mmkit.plan.memory import StepSettings, measure_training_steps, simulate_training_step

    entry, size, config = resolve_config(name, None, None)
    settings = StepSettings(batch_size=batch_size, precision=precision, gpu_target=device != "cpu")
    simulated = simulate_training_step(entry, config, settings)
    measured = measure_training_steps(entry, config, settings, device=device, steps=0)
    return {"model": name, "size": size, "batch_size": batch_size, "precision": precision, "device": device,
            "simulated_bytes": simulated.peak_tensors, "measured_bytes": measured.peak_tensors,
            "method": measured.method,
            "error": (simulated.peak_tensors - measured.peak_tensors) / measured.peak_tensors}


def run(quick: bool = False) -> dict[str, Any]:
    from mmkit.models.registry import list_models

    batch_sizes = BATCH_SIZES[:1] if quick else BATCH_SIZES
    rows = [accuracy_row(name, b, p) for name in list_models() for b in batch_sizes for p in PRECISIONS]
    worst = max(rows, key=lambda r: abs(r["error"]))
    goals = [goal("planner error on CPU, every model", f"≤ {GOAL_ERROR:.0%}",
                  f"worst {worst['error']:+.3%} ({worst['model']}, batch {worst['batch_size']}, {worst['precision']})",
                  abs(worst["error"]) <= GOAL_ERROR)]
    return {"rows": rows, "goals": goals}


def to_markdown(part: dict[str, Any]) -> str:
    lines = ["| model | batch | precision | simulated peak | measured peak | error |", "|---|---:|---|---:|---:|---:|"]
    for r in part["rows"]:
        lines.append(f"| {r['model']}:{r['size']} | {r['batch_size']} | {r['precision']} | {r['simulated_bytes']:,} B "
                     f"| {r['measured_bytes']:,} B | {r['error']:+.3%} |")
    lines += ["", "Measured: live tensor storage of real CPU steps (weights, gradients, optimizer state, "
              "activations, batch), after one warm-up step; AdamW, clipping at 1.0."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return part_main(__doc__, run, to_markdown, argv)


if __name__ == "__main__":
    main()
