"""Step overhead: mmkit's training step against a minimal hand-written PyTorch loop.

    python -m bench.overhead [--quick] [--rounds N]

Both sides train the same model (same seed, so the same initial weights) on the same batches of
256 samples already in memory, fp32 on the CPU, AdamW with the same hyper-parameters and kernel, gradient
clipping at 1.0 by the global norm (mmkit clips by default; the raw loop clips too, so the two do
the same arithmetic).

mmkit   what `mmkit train` runs per batch (mmkit/train/loop.py, `_train`'s inner loop): the
        learning rate from the schedule set on every parameter group, `StepRunner.step` (micro-
        batching, out-of-memory guard, `training_step` under a disabled autocast, the non-finite
        loss check), the epoch's loss sum, and the rich progress bar's update with the loss
        (`.item()`), lr and samples/s, drawn into a console that writes to memory; the bar's
        refresh thread runs during mmkit's blocks only (started and stopped outside the timing,
        as a run does once per epoch).
raw     opt.zero_grad(); loss = F.cross_entropy(model(**x), y); loss.backward();
        clip_grad_norm_(model.parameters(), 1.0); opt.step()

Blocks of steps alternate (A B B A A B ...) after a warm-up block each; the ratio is the median of
the per-round ratios of the two blocks' mean step times (each round's pair ran back to back).
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import goal, interleaved, ms, paired_ratio, part_main, quartiles

GOAL_RATIO = 1.03
BATCH_SIZE = 256
MODELS = (("multichannel", "default"), ("lfm2", "rtx3050"))


def _silent_rich_reporter(steps: int) -> Any:
    """mmkit's own progress reporter, drawing into memory instead of the terminal."""
    from rich.console import Console
    from rich.progress import Progress

    from mmkit.cli.progress import RichReporter

    reporter = RichReporter()
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    reporter.progress = Progress(*reporter.progress.columns, console=console, transient=True)
    reporter.progress.start()
    reporter.epoch_start(1, 1, steps)
    return reporter


def step_overhead(model: str, size: str, rounds: int, steps_per_block: int,
                  batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    from mmkit.data.datasets import iterate_batches
    from mmkit.models.registry import build_model
    from mmkit.train.loop import StepRunner, seed_everything
    from mmkit.train.prepare import prepare_run
    from mmkit.train.schedule import learning_rate
    from mmkit.train.step import build_optimizer

    prepared = prepare_run(model, preset="quick", device="cpu",
                           flags={"batch_size": batch_size, "size": size, "epochs": 1, "train_fraction": 1.0})
    config, dataset = prepared.config, prepared.dataset
    recipe = config.training
    batches = list(iterate_batches(dataset, dataset.indices("train"), batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(0), drop_last=True))[:steps_per_block]

    # ---- mmkit: the loop's per-batch work, with its real components
    seed_everything(recipe.seed)
    mm_model = build_model(config.entry, config.model_config_object()).train()
    mm_optimizer = build_optimizer(mm_model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    total_steps = (2 * rounds + 2) * steps_per_block
    reporter = _silent_rich_reporter(total_steps)
    with tempfile.TemporaryDirectory(prefix="mmkit-bench-") as tmp:
        runner = StepRunner(Path(tmp), config, mm_model, mm_optimizer, None, torch.device("cpu"), reporter)
        state = {"step": 0, "seen": 0, "loss_sum": torch.zeros(()), "start": time.perf_counter()}

        def mmkit_block() -> float:
            reporter.progress.start()  # its refresh thread runs during mmkit's steps only, as in training
            start = time.perf_counter()
            for inputs, labels in batches:
                lr = learning_rate(
                    state["step"], base_lr=recipe.lr, total_steps=total_steps, warmup_steps=0,
                    schedule=recipe.schedule, steps_per_epoch=total_steps, restart_epochs=recipe.restart_epochs,
                )
                for group in mm_optimizer.param_groups:
                    group["lr"] = lr
                step_loss = runner.step(inputs, labels, state["step"] + 1, "epoch 1")
                state["step"] += 1
                n = labels.shape[0]
                state["seen"] += n
                state["loss_sum"] += step_loss * n
                reporter.step(step_loss.item(), lr, state["seen"] / max(time.perf_counter() - state["start"], 1e-9))
            seconds = (time.perf_counter() - start) / len(batches)
            reporter.progress.stop()
            return seconds

        # ---- raw: the minimal loop
        seed_everything(recipe.seed)
        raw_model = build_model(config.entry, config.model_config_object()).train()
        # the same optimizer kernel as mmkit's (fused AdamW on a CPU where torch has it)
        kernel = {k: mm_optimizer.defaults[k] for k in ("fused", "foreach") if mm_optimizer.defaults.get(k)}
        raw_optimizer = torch.optim.AdamW(raw_model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                          **kernel)

        def raw_block() -> float:
            start = time.perf_counter()
            for x, y in batches:
                raw_optimizer.zero_grad()
                loss = F.cross_entropy(raw_model(**x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
                raw_optimizer.step()
            return (time.perf_counter() - start) / len(batches)

        reporter.progress.stop()
        times = interleaved({"mmkit": mmkit_block, "raw": raw_block}, rounds)
    ratio = paired_ratio(times["mmkit"], times["raw"])
    mm, raw = quartiles(times["mmkit"]), quartiles(times["raw"])
    return {
        "model": model, "size": config.size, "data": config.data, "batch_size": batch_size, "precision": "fp32",
        "grad_clip": recipe.grad_clip, "optimizer_kernel": "fused" if mm_optimizer.defaults.get("fused") else
        "foreach" if mm_optimizer.defaults.get("foreach") else "for-loop", "rounds": rounds, "steps_per_block": len(batches),
        "mmkit_step_seconds": mm, "raw_step_seconds": raw, "ratio": ratio,
        "ratio_of_medians": mm["median"] / raw["median"],
        "mmkit_times": times["mmkit"], "raw_times": times["raw"],
    }


def bookkeeping_cost(rounds: int = 200) -> dict[str, Any]:
    """The loop's per-step extras alone, without a model: schedule, lr on the param groups, the
    loss sum, `.item()` and the progress bar — what the ratio above is made of, in microseconds."""
    from mmkit.train.schedule import learning_rate

    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(params)
    reporter = _silent_rich_reporter(rounds)
    loss, loss_sum = torch.tensor(0.5), torch.zeros(())
    start = time.perf_counter()
    for step in range(rounds):
        lr = learning_rate(step, base_lr=1e-3, total_steps=rounds, warmup_steps=5, schedule="cosine",
                           steps_per_epoch=rounds, restart_epochs=10)
        for group in optimizer.param_groups:
            group["lr"] = lr
        finite = bool(torch.isfinite(loss))
        loss_sum += loss.float().cpu() * 256
        reporter.step(loss.item(), lr, 1000.0)
        assert finite
    seconds = (time.perf_counter() - start) / rounds
    reporter.progress.stop()
    return {"steps": rounds, "seconds_per_step": seconds}


def run(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    rows = []
    for model, size in MODELS:
        heavy = model == "lfm2"
        # many short rounds: a shared machine's slow spells then hit single pairs, which the median drops
        n = rounds or (1 if quick else (5 if heavy else 40))
        steps = 1
        rows.append(step_overhead(model, size, n, steps))
    extras = bookkeeping_cost(50 if quick else 200)
    goals = [
        goal(f"step overhead, {r['model']}:{r['size']}", f"≤ {GOAL_RATIO:.2f}", f"{r['ratio']:.3f}",
             r["ratio"] <= GOAL_RATIO,
             "" if r["ratio"] <= GOAL_RATIO else
             f"the loop's own per-step work costs {extras['seconds_per_step'] * 1e6:,.0f} µs "
             f"({extras['seconds_per_step'] / r['raw_step_seconds']['median']:.2%} of the raw step); the rest is "
             f"noise between rounds (p25–p75 of the raw step: {ms(r['raw_step_seconds']['p25'])}–"
             f"{ms(r['raw_step_seconds']['p75'])})")
        for r in rows
    ]
    return {"rows": rows, "bookkeeping": extras, "goals": goals}


def to_markdown(part: dict[str, Any]) -> str:
    lines = ["| model | batch | mmkit step, median [p25–p75] | raw loop step | mmkit / raw (paired) | rounds × steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in part["rows"]:
        mm, raw = r["mmkit_step_seconds"], r["raw_step_seconds"]
        lines.append(f"| {r['model']}:{r['size']} ({r['data']}) | {r['batch_size']} | {ms(mm['median'])} "
                     f"[{ms(mm['p25'])}–{ms(mm['p75'])}] | {ms(raw['median'])} [{ms(raw['p25'])}–{ms(raw['p75'])}] "
                     f"| {r['ratio']:.3f} | {r['rounds']} × {r['steps_per_block']} |")
    b = part["bookkeeping"]
    lines += ["", f"The loop's per-step work besides the step itself (schedule, lr on each parameter group, loss sum, "
              f"`.item()`, progress bar): {b['seconds_per_step'] * 1e6:,.0f} µs per step, measured alone over "
              f"{b['steps']} steps. fp32, AdamW ({part['rows'][0]['optimizer_kernel']} kernel), clipping at 1.0 on both sides."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return part_main(__doc__, run, to_markdown, argv, ("--rounds", {"type": int}))


if __name__ == "__main__":
    main()
