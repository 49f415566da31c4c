"""Step overhead: mmkit's training step against a minimal hand-written PyTorch loop.

    python -m bench.overhead [--quick] [--rounds N]

Both sides train the same model (same seed, so the same initial weights) on the same batches of
256 samples already in memory, fp32 on the CPU, AdamW with the same hyper-parameters and kernel, gradient
clipping at 1.0 by the global norm (mmkit clips by default; the raw loop clips too, so the two do
the same arithmetic).

mmkit   what `mmkit train` runs per batch (mmkit/train/engine.py, `Engine.train_epoch`): the
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
Minor page faults per step are counted on both sides (getrusage).

lfm2's activations at batch 256 are large blocks that glibc's malloc serves with mmap and hands
back to the system when freed, so every step page-faults hundreds of MB back in; how many depends
on the order in which blocks are freed, which differs between the two loops. The lfm2 pair is
therefore measured twice: as a user runs it, and in a child process with malloc's mmap and trim
thresholds fixed (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), where both loops keep their
memory and only their arithmetic and bookkeeping differ.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import goal, interleaved, ms, paired_ratio, part_main, quartiles

GOAL_RATIO = 1.03
BATCH_SIZE = 256
MODELS = (("multichannel", "default"), ("lfm2", "rtx3050"))
# malloc keeps freed blocks up to 16 GiB instead of returning them to the system (glibc tunables)
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _counting_faults(block: Callable[[], float], steps: int, faults: list[float]) -> Callable[[], float]:
    """`block` (returns seconds per step) that also appends its minor page faults per step."""
    def run() -> float:
        before = _minor_faults()
        seconds = block()
        faults.append((_minor_faults() - before) / steps)
        return seconds
    return run


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
    from mmkit.train.engine import StepRunner, seed_everything
    from mmkit.train.report import StepRecord
    from mmkit.train.resolve import RunOptions, resolve_run
    from mmkit.train.schedule import learning_rate
    from mmkit.train.step import build_optimizer

    resolved = resolve_run(RunOptions(model=model, preset="quick", device="cpu", batch_size=batch_size, size=size,
                                      epochs=1, train_fraction=1.0))
    config, dataset = resolved.run_config(), resolved.dataset
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
                reporter.step(StepRecord(state["step"], 1, step_loss.item(), lr,
                                         state["seen"] / max(time.perf_counter() - state["start"], 1e-9)))
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
        faults: dict[str, list[float]] = {"mmkit": [], "raw": []}
        blocks = {"mmkit": _counting_faults(mmkit_block, len(batches), faults["mmkit"]),
                  "raw": _counting_faults(raw_block, len(batches), faults["raw"])}
        times = interleaved(blocks, rounds)
    ratio = paired_ratio(times["mmkit"], times["raw"])
    mm, raw = quartiles(times["mmkit"]), quartiles(times["raw"])
    return {
        "model": model, "size": config.size, "data": config.data, "batch_size": batch_size, "precision": "fp32",
        "grad_clip": recipe.grad_clip, "optimizer_kernel": "fused" if mm_optimizer.defaults.get("fused") else
        "foreach" if mm_optimizer.defaults.get("foreach") else "for-loop", "rounds": rounds, "steps_per_block": len(batches),
        "mmkit_step_seconds": mm, "raw_step_seconds": raw, "ratio": ratio,
        "ratio_of_medians": mm["median"] / raw["median"],
        "mmkit_times": times["mmkit"], "raw_times": times["raw"],
        "mmkit_minor_faults_per_step": quartiles(faults["mmkit"][1:] or faults["mmkit"]),
        "raw_minor_faults_per_step": quartiles(faults["raw"][1:] or faults["raw"]),
        "allocator": "fixed malloc thresholds" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default",
    }


def step_overhead_fixed_malloc(model: str, size: str, rounds: int, steps_per_block: int) -> dict[str, Any]:
    """`step_overhead` in a child process whose malloc keeps freed memory (FIXED_MALLOC)."""
    code = ("import json, sys; from bench.overhead import step_overhead; "
            f"print(json.dumps(step_overhead({model!r}, {size!r}, {rounds}, {steps_per_block})))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, **FIXED_MALLOC})
    if done.returncode != 0:
        raise RuntimeError(f"overhead child failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bookkeeping_cost(rounds: int = 200) -> dict[str, Any]:
    """The loop's per-step extras alone, without a model: schedule, lr on the param groups, the
    loss sum, `.item()` and the progress bar — what the ratio above is made of, in microseconds."""
    from mmkit.train.report import StepRecord
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
        reporter.step(StepRecord(step + 1, 1, loss.item(), lr, 1000.0))
        assert finite
    seconds = (time.perf_counter() - start) / rounds
    reporter.progress.stop()
    return {"steps": rounds, "seconds_per_step": seconds}


def run(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    rows = []
    for model, size in MODELS:
        heavy = model == "lfm2"
        # many short rounds: a shared machine's slow spells then hit single pairs, which the median drops
        n = rounds or (1 if quick else (12 if heavy else 40))
        rows.append(step_overhead(model, size, n, 1))
        if heavy:
            rows.append(step_overhead_fixed_malloc(model, size, n, 1))
    extras = bookkeeping_cost(50 if quick else 200)
    fixed = {r["model"]: r for r in rows if r["allocator"] != "default"}
    goals = [
        goal(f"step overhead, {r['model']}:{r['size']}", f"≤ {GOAL_RATIO:.2f}", f"{r['ratio']:.3f}",
             r["ratio"] <= GOAL_RATIO,
             "" if r["ratio"] <= GOAL_RATIO else
             f"the loop's own per-step work costs {extras['seconds_per_step'] * 1e6:,.0f} µs "
             f"({extras['seconds_per_step'] / r['raw_step_seconds']['median']:.2%} of the raw step); "
             f"{_allocator_note(r, fixed.get(r['model']))}")
        for r in rows if r["allocator"] == "default"
    ]
    return {"rows": rows, "bookkeeping": extras, "goals": goals}


def _overlap(row: dict[str, Any]) -> bool:
    """Do the two sides' p25–p75 step-time ranges overlap?"""
    mm, raw = row["mmkit_step_seconds"], row["raw_step_seconds"]
    return mm["p25"] <= raw["p75"] and raw["p25"] <= mm["p75"]


def _allocator_note(row: dict[str, Any], fixed: dict[str, Any] | None) -> str:
    faults_mm, faults_raw = row["mmkit_minor_faults_per_step"]["median"], row["raw_minor_faults_per_step"]["median"]
    note = (f"minor page faults per step, median: {faults_mm:,.0f} in mmkit's step, {faults_raw:,.0f} in the raw "
            f"loop; step-time p25–p75: mmkit {ms(row['mmkit_step_seconds']['p25'])}–"
            f"{ms(row['mmkit_step_seconds']['p75'])}, raw {ms(row['raw_step_seconds']['p25'])}–"
            f"{ms(row['raw_step_seconds']['p75'])}")
    if fixed is not None:
        spread = ("the quartile ranges overlap, so the remaining gap is within the round-to-round spread"
                  if _overlap(fixed) else "the quartile ranges do not overlap")
        note += (f". With malloc's thresholds fixed (neither loop returns memory to the system between steps) "
                 f"the ratio is {fixed['ratio']:.3f} with about {fixed['mmkit_minor_faults_per_step']['median']:,.0f} "
                 f"/ {fixed['raw_minor_faults_per_step']['median']:,.0f} faults per step; {spread}")
    return note


def to_markdown(part: dict[str, Any]) -> str:
    lines = ["| model | batch | allocator | mmkit step, median [p25–p75] | raw loop step | mmkit / raw (paired) "
             "| page faults / step, mmkit / raw | rounds × steps |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in part["rows"]:
        mm, raw = r["mmkit_step_seconds"], r["raw_step_seconds"]
        faults = f"{r['mmkit_minor_faults_per_step']['median']:,.0f} / {r['raw_minor_faults_per_step']['median']:,.0f}"
        lines.append(f"| {r['model']}:{r['size']} ({r['data']}) | {r['batch_size']} | {r['allocator']} "
                     f"| {ms(mm['median'])} [{ms(mm['p25'])}–{ms(mm['p75'])}] | {ms(raw['median'])} "
                     f"[{ms(raw['p25'])}–{ms(raw['p75'])}] | {r['ratio']:.3f} | {faults} "
                     f"| {r['rounds']} × {r['steps_per_block']} |")
    by_allocator = {(r["model"], r["allocator"]): r for r in part["rows"]}
    for (model, allocator), fixed in by_allocator.items():
        default = by_allocator.get((model, "default"))
        if allocator == "default" or default is None:
            continue
        mm = default["mmkit_step_seconds"]["median"] / fixed["mmkit_step_seconds"]["median"]
        raw = default["raw_step_seconds"]["median"] / fixed["raw_step_seconds"]["median"]
        lines += ["", f"With malloc's thresholds fixed, {model}'s step ran ×{mm:.2f} faster in mmkit and ×{raw:.2f} "
                  f"in the raw loop than with glibc's defaults (the two rows ran one after the other, in two "
                  f"processes). On Linux, to train that way: `MALLOC_MMAP_THRESHOLD_={FIXED_MALLOC['MALLOC_MMAP_THRESHOLD_']} "
                  f"MALLOC_TRIM_THRESHOLD_={FIXED_MALLOC['MALLOC_TRIM_THRESHOLD_']} mmkit train ...` — the process "
                  f"then keeps its peak memory instead of returning it to the system between steps."]
    b = part["bookkeeping"]
    lines += ["", f"The loop's per-step work besides the step itself (schedule, lr on each parameter group, loss sum, "
              f"`.item()`, progress bar): {b['seconds_per_step'] * 1e6:,.0f} µs per step, measured alone over "
              f"{b['steps']} steps. fp32, AdamW ({part['rows'][0]['optimizer_kernel']} kernel), clipping at 1.0 on both sides."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return part_main(__doc__, run, to_markdown, argv, ("--rounds", {"type": int}))


if __name__ == "__main__":
    main()
