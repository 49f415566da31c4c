"""Continual learning, measured: replay against no replay, and the text-embedding cache's speed-up.

    python -m bench.continual                          # both parts; writes bench/results/continual.{md,json}
    python -m bench.continual --only cache --rounds 8
    python -m bench.continual --only replay --epochs-per-task 2

replay   `mmkit train clip --preset continual --set epochs_per_task=E` twice on the same seed, with
         the preset's replay buffer (500) and with `buffer_size=0`; the accuracy matrix, average
         accuracy, forgetting (both definitions), backward transfer and the wall time of each.
cache    one training step of clip (default size, batch 256, synthetic-fashion) with the continual
         loss, `text_cache` on and off, timed in interleaved rounds (on, off, on, off, …) after a
         warm-up, medians; with the text encoder trained (the cache encodes the batch's distinct
         prompts once per step instead of once per sample) and frozen (the cache encodes each prompt
         once for the whole run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, interleaved, machine, machine_line, timed
from mmkit.data.datasets import iterate_batches, load_dataset
from mmkit.models.registry import create_model
from mmkit.settings import resolve_training
from mmkit.train.continual import PromptEmbeddings, continual_forward_loss, prompt_tokens
from mmkit.train.step import build_grad_scaler, build_optimizer, training_step


def replay_vs_none(epochs_per_task: int, buffers: tuple[int, ...] = (500, 0), seed: int = 0) -> list[dict]:
    rows = []
    for buffer_size in buffers:
        with tempfile.TemporaryDirectory(prefix="mmkit-bench-") as tmp:
            run = Path(tmp) / "run"
            command = ["mmkit", "train", "clip", "--preset", "continual", "--device", "cpu", "--seed", str(seed),
                       "--set", f"epochs_per_task={epochs_per_task}", "--set", f"buffer_size={buffer_size}",
                       "--out", str(run)]
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            figures = json.loads((run / "metrics.json").read_text())["continual"]
        rows.append({"buffer_size": buffer_size, "epochs_per_task": epochs_per_task, "seed": seed,
                     "wall_seconds": seconds, **figures})
        print(f"replay buffer {buffer_size}: forgetting {figures['forgetting']:.4f}, "
              f"average accuracy {figures['average_accuracy']:.4f}, {seconds:.0f} s", file=sys.stderr)
    return rows


def text_cache_speedup(precision: str, rounds: int, batch_size: int = 256) -> list[dict]:
    recipe = resolve_training("continual", {})
    dataset = load_dataset("synthetic-fashion", seed=0)
    train = dataset.indices("train")
    inputs, labels = next(iterate_batches(dataset, train[:batch_size], batch_size, shuffle=False))
    rows = []
    for frozen in (False, True):
        rigs = {}
        for cache in (True, False):
            torch.manual_seed(0)
            model = create_model("clip").train()
            if frozen:
                for p in [*model.text_encoder.parameters(), *model.projection.text.parameters()]:
                    p.requires_grad_(False)
            prompts = PromptEmbeddings(prompt_tokens(dataset.classes, model.config.context_length), cache)
            loss = continual_forward_loss(prompts, recipe.contrastive_weight, recipe.label_smoothing)
            optimizer = build_optimizer(model, "adamw", recipe.lr, recipe.weight_decay)
            rigs[cache] = (model, optimizer, build_grad_scaler(precision, "cpu"), loss, prompts)

        def step(cache: bool) -> float:
            model, optimizer, scaler, loss, _ = rigs[cache]
            return timed(lambda: training_step(model, optimizer, inputs, labels, precision=precision, scaler=scaler,
                                               grad_clip=1.0, forward_loss=loss))

        times = interleaved({True: lambda: step(True), False: lambda: step(False)}, rounds)  # one warm-up each
        on, off = statistics.median(times[True]), statistics.median(times[False])
        encoded = {cache: rigs[cache][4].encoded for cache in (True, False)}
        rows.append({"precision": precision, "text_encoder": "frozen" if frozen else "trained",
                     "batch_size": batch_size, "rounds": rounds, "step_seconds_cache": on,
                     "step_seconds_no_cache": off, "speedup": off / on,
                     "prompts_encoded_cache": encoded[True], "prompts_encoded_no_cache": encoded[False],
                     "steps": rounds + 1})
        print(f"text cache, {precision}, text encoder {rows[-1]['text_encoder']}: "
              f"{off * 1000:.0f} ms → {on * 1000:.0f} ms per step (×{off / on:.2f})", file=sys.stderr)
    return rows


def to_markdown(report: dict) -> str:
    lines = [f"Machine: {machine_line(report['machine'])}.", ""]
    if report.get("replay"):
        lines += ["`mmkit train clip --preset continual --set epochs_per_task=E --set buffer_size=N` "
                  "(same seed):", "",
                  "| replay buffer | epochs per task | average accuracy | forgetting (first-learned − final) "
                  "| forgetting (best earlier − final) | BWT | wall time |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["replay"]:
            lines.append(f"| {r['buffer_size']} | {r['epochs_per_task']} | {r['average_accuracy']:.3f} "
                         f"| {r['forgetting']:.3f} | {r['forgetting_max']:.3f} | {r['bwt']:.3f} "
                         f"| {r['wall_seconds']:.0f} s |")
        lines.append("")
        for r in report["replay"]:
            lines.append(f"Accuracy matrix, buffer {r['buffer_size']} (row i: after task i): "
                         + "; ".join(" ".join(f"{a:.2f}" for a in row) for row in r["matrix"]))
            lines.append("")
    if report.get("cache"):
        lines += ["Text-embedding cache, one clip training step with the continual loss, median of interleaved "
                  "rounds:", "",
                  "| precision | text encoder | batch | step, cache off | step, cache on | speed-up "
                  "| prompts encoded off / on |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in report["cache"]:
            lines.append(f"| {r['precision']} | {r['text_encoder']} | {r['batch_size']} "
                         f"| {r['step_seconds_no_cache'] * 1000:.0f} ms | {r['step_seconds_cache'] * 1000:.0f} ms "
                         f"| ×{r['speedup']:.2f} | {r['prompts_encoded_no_cache']} / {r['prompts_encoded_cache']} "
                         f"in {r['steps']} steps |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("replay", "cache"))
    parser.add_argument("--epochs-per-task", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, for the cache part")
    parser.add_argument("--out", type=Path, default=RESULTS / "continual")
    args = parser.parse_args(argv)
    report: dict = {"machine": machine()}
    if args.only in (None, "replay"):
        report["replay"] = replay_vs_none(args.epochs_per_task)
    if args.only in (None, "cache"):
        report["cache"] = [row for p in args.precisions.split(",") for row in text_cache_speedup(p, args.rounds)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
