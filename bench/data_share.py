"""Data share: the fraction of a training epoch spent producing batches, per built-in dataset.

    python -m bench.data_share [--quick]

Each built-in dataset is trained for one epoch by `mmkit.train.run.train_run` (preset quick,
the dataset's default model, a stratified fraction of the training split), with the loop's
`iterate_batches` wrapped so that the time spent inside each `next()` of the training batches is
summed. Share = that time / the epoch's own `epoch_time` (history.jsonl; validation excluded).
Generating the built-in data (once per process, cached) is reported beside it, outside the epoch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import goal, ms, part_main

GOAL_SHARE = 0.03
DEFAULT_MODEL = {"synthetic-cifar": "multichannel", "synthetic-av": "lfm2", "synthetic-fashion": "clip"}
TRAIN_FRACTION = {"synthetic-cifar": 0.5, "synthetic-av": 0.25, "synthetic-fashion": 0.25}


def epoch_data_share(data: str, model: str, train_fraction: float) -> dict[str, Any]:
    import mmkit.train.loop as loop
    from mmkit.data.datasets import clear_dataset_cache
    from mmkit.train.resolve import RunOptions, resolve_run
    from mmkit.train.run import train_run
    from mmkit.train.rundir import read_history

    clear_dataset_cache()
    start = time.perf_counter()
    prepared = resolve_run(RunOptions(model=model, preset="quick", data=data, device="cpu", epochs=2,
                                      train_fraction=train_fraction))
    generation = time.perf_counter() - start
    spent = {"seconds": 0.0, "batches": 0}
    original = loop.iterate_batches

    def timed_batches(*args: Any, **kwargs: Any) -> Iterator[Any]:
        batches = original(*args, **kwargs)
        if not kwargs.get("shuffle"):  # validation and test batches: not part of the epoch
            yield from batches
            return
        while True:
            begin = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                spent["seconds"] += time.perf_counter() - begin
                return
            spent["seconds"] += time.perf_counter() - begin
            spent["batches"] += 1
            yield batch

    loop.iterate_batches = timed_batches
    try:
        with tempfile.TemporaryDirectory(prefix="mmkit-bench-") as tmp:
            train_run(Path(tmp) / "run", prepared.run_config(), stop_after_epochs=1, dataset=prepared.dataset)
            record = read_history(Path(tmp) / "run")[0]
    finally:
        loop.iterate_batches = original
    config = prepared.run_config()
    return {
        "data": data, "model": model, "size": config.size, "batch_size": config.training.batch_size,
        "train_fraction": train_fraction, "batches": spent["batches"], "data_seconds": spent["seconds"],
        "epoch_seconds": record["epoch_time"], "share": spent["seconds"] / record["epoch_time"],
        "per_batch_seconds": spent["seconds"] / max(spent["batches"], 1), "generation_seconds": generation,
    }


def run(quick: bool = False) -> dict[str, Any]:
    from mmkit.data.catalog import BUILTIN_DATASETS

    rows = []
    for data in BUILTIN_DATASETS:
        fraction = TRAIN_FRACTION.get(data, 0.25) * (0.2 if quick else 1.0)
        rows.append(epoch_data_share(data, DEFAULT_MODEL[data], fraction))
    goals = [goal(f"data share, {r['data']}", f"≤ {GOAL_SHARE:.0%}", f"{r['share']:.2%}", r["share"] <= GOAL_SHARE)
             for r in rows]
    return {"rows": rows, "goals": goals}


def to_markdown(part: dict[str, Any]) -> str:
    lines = ["| dataset | model | batch | batches | producing batches | epoch | share | per batch | data generated once |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in part["rows"]:
        lines.append(f"| {r['data']} | {r['model']}:{r['size']} | {r['batch_size']} | {r['batches']} "
                     f"| {ms(r['data_seconds'])} | {ms(r['epoch_seconds'])} | {r['share']:.2%} "
                     f"| {r['per_batch_seconds'] * 1e6:,.0f} µs | {ms(r['generation_seconds'])} |")
    lines += ["", "One epoch of `mmkit train MODEL --preset quick` on a stratified fraction of the training split; "
              "batches are produced by indexing the in-memory tensors (`iterate_batches`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return part_main(__doc__, run, to_markdown, argv)


if __name__ == "__main__":
    main()
