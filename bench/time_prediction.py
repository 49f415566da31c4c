"""Time prediction: the step time predicted from the simulated step against real steps on this CPU.

    python -m bench.time_prediction [--quick]

`mmkit calibrate` measures this CPU (matmul rates, bandwidth, per-operator cost) in rounds and keeps
each figure's median; here its rounds run between the rounds of real steps, so that calibration and
measurement see the same machine (other jobs on a shared CPU come and go within a minute, and slow a
small model's step up to twice). Nothing of the user's is touched. For every registered model
(its default size and input shapes), two batch sizes and two precisions (fp32, bf16 autocast):
- predicted: the time model (mmkit.plan.timemodel) over the operators of the simulated step, with
  the calibrated figures;
- the old estimate: whole-step FLOPs / (the CPU preset's peak × assumed utilization), bytes /
  bandwidth and operators × assumed cost, the slowest of the three (mmkit.plan.timing);
- measured: real training steps (mmkit's own step: autocast, backward, clipping, AdamW), after a
  warm-up round, every configuration timed in turn in each round (interleaved), median.
Error = (predicted − measured) / measured.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import goal, machine_line, ms, part_main, quartiles, timed

BATCH_SIZES = (4, 16)
PRECISIONS = ("fp32", "bf16")
ROUNDS = 7
GOAL_MEDIAN, GOAL_WORST = 0.15, 0.35


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from mmkit.models.registry import build_model, list_models, resolve_config
    from mmkit.plan.calibrate import calibrated, measure_round
    from mmkit.plan.count import config_flops
    from mmkit.plan.memory import FakeTrainingRig, StepSettings
    from mmkit.plan.timemodel import device_rates, predict_step
    from mmkit.plan.timing import estimate_time
    from mmkit.settings import load_gpu_preset
    from mmkit.train.step import build_grad_scaler, build_optimizer, training_step

    cpu = load_gpu_preset("cpu")
    batch_sizes = BATCH_SIZES[:1] if quick else BATCH_SIZES
    configs: list[dict[str, Any]] = []
    steps: dict[int, Any] = {}
    for name in list_models():
        entry, size, config = resolve_config(name, None, None)
        flops = config_flops(entry, config)
        torch.manual_seed(0)
        model = build_model(entry, config).train()
        optimizer = build_optimizer(model, "adamw", 1e-4, 0.01)
        for b in batch_sizes:
            inputs = model.example_inputs(b, device="cpu", seed=0)
            labels = torch.arange(b) % model.config.num_classes
            for precision in PRECISIONS:
                memory = FakeTrainingRig(entry, config, StepSettings(batch_size=b, precision=precision)).training_step(b)
                moved = 3 * memory.weights + 2 * memory.gradients + 2 * memory.optimizer + 2 * memory.activations
                old = estimate_time(cpu, precision, b, flops.train_flops, flops.forward_flops, moved, b, 0, 1,
                                    ops_per_step=memory.ops)
                scaler = build_grad_scaler(precision, "cpu")

                def step(model=model, optimizer=optimizer, inputs=inputs, labels=labels, precision=precision,
                         scaler=scaler) -> None:
                    training_step(model, optimizer, inputs, labels, precision=precision, scaler=scaler, grad_clip=1.0)

                steps[len(configs)] = step
                configs.append({"model": name, "size": size, "batch_size": b, "precision": precision,
                                "costs": memory.costs, "old_estimate_seconds": old.step_seconds, "times": []})
    rounds = 2 if quick else ROUNDS
    for index in steps:  # warm-up round: optimizer state, oneDNN primitives
        steps[index]()
    calibration_rounds = []
    for r in range(rounds):
        calibration_rounds.append(measure_round("cpu", cpu))  # `mmkit calibrate`'s rounds, between the steps
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for index in order:
            configs[index]["times"].append(timed(steps[index]))
    local = calibrated("cpu", cpu, "local", calibration_rounds)  # measured only; no preset file is written
    rates = device_rates(local)
    for row in configs:
        predicted = predict_step(row.pop("costs"), rates)
        row.update(predicted_seconds=predicted.seconds, predicted_parts=predicted.parts, operators=predicted.operators)
        row["measured_seconds"] = quartiles(row["times"])
        measured = row["measured_seconds"]["median"]
        row["error"] = (row["predicted_seconds"] - measured) / measured
        row["old_error"] = (row["old_estimate_seconds"] - measured) / measured
    errors = [abs(r["error"]) for r in configs]
    old_errors = [abs(r["old_error"]) for r in configs]
    median, worst = statistics.median(errors), max(errors)
    goals = [
        goal("step-time prediction on CPU after `mmkit calibrate`, median |error|", f"≤ {GOAL_MEDIAN:.0%}",
             f"{median:.0%} (old estimate: {statistics.median(old_errors):.0%})", median <= GOAL_MEDIAN),
        goal("step-time prediction on CPU after `mmkit calibrate`, worst |error|", f"≤ {GOAL_WORST:.0%}",
             f"{worst:.0%} (old estimate: {max(old_errors):.0%})", worst <= GOAL_WORST),
    ]
    return {"rows": configs, "goals": goals, "calibration": local.calibration.model_dump(mode="json") if local.calibration else None}


def to_markdown(part: dict[str, Any]) -> str:
    lines = ["| model | batch | precision | measured (median) | predicted | error | old estimate | old error |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in part["rows"]:
        lines.append(f"| {r['model']}:{r['size']} | {r['batch_size']} | {r['precision']} "
                     f"| {ms(r['measured_seconds']['median'])} | {ms(r['predicted_seconds'])} | {r['error']:+.0%} "
                     f"| {ms(r['old_estimate_seconds'])} | {r['old_error']:+.0%} |")
    cal = part.get("calibration") or {}
    if cal:
        lines += ["", f"Calibration: {cal['source']}; bandwidth {cal['bandwidth_gb_s']:.1f} GB/s, "
                  f"{cal['seconds_per_op'] * 1e6:.1f} µs per operator."]
    lines += ["Predicted: Σ over the simulated step's operators of max(FLOPs / matmul rate, bytes / bandwidth) + "
              "operators × per-operator cost. Old estimate: the slowest of whole-step FLOPs at the CPU preset's "
              "peak × 30 %, bytes at its bandwidth, and operators × 15 µs."]
    return "\n".join(lines)


def readme_table(part: dict[str, Any]) -> str:
    """The table in short for the README: a row per model, each configuration's error with the
    former estimate's in brackets, then the median and worst and the machine."""
    configs = [(b, p) for p in PRECISIONS for b in BATCH_SIZES]
    by_model: dict[str, dict[tuple[int, str], dict[str, Any]]] = {}
    for r in part["rows"]:
        by_model.setdefault(f"{r['model']}:{r['size']}", {})[(r["batch_size"], r["precision"])] = r
    lines = ["| model | " + " | ".join(f"{p}, batch {b}" for b, p in configs) + " |",
             "|---|" + "---:|" * len(configs)]
    for model, rows in by_model.items():
        cells = [f"{rows[c]['error']:+.0%} ({rows[c]['old_error']:+.0%})" if c in rows else "—" for c in configs]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    new = [abs(r["error"]) for r in part["rows"]]
    old = [abs(r["old_error"]) for r in part["rows"]]
    lines += ["", f"Median \\|error\\| {statistics.median(new):.0%}, worst {max(new):.0%} (former estimate: "
              f"{statistics.median(old):.0%}, {max(old):.0%}); {machine_line(part['machine'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return part_main(__doc__, run, to_markdown, argv)


if __name__ == "__main__":
    main()
