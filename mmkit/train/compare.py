"""`compare A B`: one honest side-by-side of two models on the same data.

Three blocks:
1. static (exact and simulated): parameters, MACs, FLOPs, weight bytes; training and inference
   memory by category from the memory planner, at the same batch and precision;
2. speed (measured): training steps and inference forwards timed A, B, A, B, … after warm-up,
   medians with their interquartile range and the ratio A/B; the real step's peak memory;
3. learning (measured): each trained with the same data, recipe and seeds; test accuracy (UAR and
   WAR too) per seed, mean ± std, training wall time, and a verdict that says when a difference is
   within the spread. For a continual recipe (`tasks` > 0) also average accuracy, forgetting (both
   definitions) and backward transfer from each run's accuracy matrix.

A spec may carry its own recipe, `MODEL[:SIZE][@PRESET]`, to compare two whole recipes (the third
seed's before/after: `clip:baseline@continual-baseline clip:default@continual`); each side is then
simulated, timed and trained at its own batch and precision, and the table says so.

Static and learning numbers repeat exactly on the same machine and torch build; timings vary. So
the result names the machine: the CPU capability torch dispatches to (AVX2, AVX512, ...), the cores
it may use, and the highest 1-minute load average sampled around every timed run; a load above the
core count means other work competed for the CPU while timing, and the output warns.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmkit.data.datasets import Dataset, iterate_batches, load_dataset
from mmkit.errors import MmkitError
from mmkit.models.catalog import BUILTIN_MODELS, entry_point_models
from mmkit.models.registry import build_model, get_model_entry, logits_of
from mmkit.plan.count import count_config
from mmkit.plan.hardware import resolve_gpu
from mmkit.plan.memory import FakeTrainingRig, StepSettings, measure_training_steps
from mmkit.settings import GpuPreset
from mmkit.train.continual import read_continual_metrics
from mmkit.train.run import train_run
from mmkit.train.resolve import ResolvedRun, RunOptions, check_request, resolve_run, split_set_options
from mmkit.train.rundata import check_data_for_model
from mmkit.train.step import AMP_DTYPES, build_grad_scaler, build_optimizer, training_step

WARMUP_STEPS = 3  # steps before timing: allocator, caches and lazy initialisation settle
TIMED_ROUNDS = 15  # rounds of A, B each; medians over these
INFERENCE_BATCH = 256


@dataclass(frozen=True)
class ModelSpec:
    name: str
    size: str | None
    preset: str | None = None  # the spec's own recipe (`@PRESET`), else the command's --preset

    @property
    def label(self) -> str:
        label = f"{self.name}:{self.size}" if self.size else self.name
        return f"{label}@{self.preset}" if self.preset else label


def parse_spec(text: str, default_size: str | None) -> ModelSpec:
    """`lfm2:original` → (lfm2, original); `multichannel` → (multichannel, --size or default);
    `clip:baseline@continual-baseline` → (clip, baseline) trained with that preset."""
    model, at, preset = text.partition("@")
    if at and (not preset or "@" in preset):
        raise MmkitError(f"model spec {text!r}: expected MODEL, MODEL:SIZE or MODEL[:SIZE]@PRESET")
    parts = model.split(":")
    if len(parts) > 1 and parts[0] not in BUILTIN_MODELS and parts[0] not in entry_point_models():
        # a module or file spec (`towers.py:build`), with its size after a second colon
        name, size = ":".join(parts[:2]), ":".join(parts[2:])
    else:
        name, _, size = model.partition(":")
    get_model_entry(name)  # clear error for an unknown model
    return ModelSpec(name, size or default_size, preset or None)


def _with_inputs(dataset: Dataset, specs: Mapping[str, Any]) -> Dataset:
    """The dataset with only the inputs one model takes (the tensors are shared, not copied)."""
    return dataclasses.replace(dataset, inputs={k: v for k, v in dataset.inputs.items() if k in specs})


def _input_specs(side: ResolvedRun) -> dict[str, Any]:
    with torch.device("meta"):
        return build_model(side.entry, side.config).input_specs()


def _quartiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "n": len(ordered)}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def static_block(side: ResolvedRun, gpu: GpuPreset) -> dict[str, Any]:
    """Exact counts of the resolved model and its memory simulated at the side's batch and precision."""
    batch_size, precision = side.batch_size, side.precision.precision
    count = count_config(side.entry, side.size, side.config)
    step = StepSettings(batch_size=batch_size, precision=precision, gpu_target=gpu.device_type == "cuda")
    rig = FakeTrainingRig(side.entry, side.config, step)
    train = rig.training_step(batch_size)
    inference = rig.inference(batch_size)
    return {
        "size": count.size,
        "params": count.total_params,
        "macs_per_sample": count.per_sample.forward_macs,
        "flops_per_sample": count.per_sample.forward_flops,
        "train_flops_per_sample": count.per_sample.train_flops,
        "weights_bytes": count.weights_bytes,
        "train_memory": train.as_dict(),
        "inference_peak_tensors": inference,
        "memory_method": f"simulated at batch {batch_size}, {precision}, for {gpu.name}",
    }


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this OS
        return os.cpu_count() or 1


def cpu_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


class LoadWatch:
    """Samples of the 1-minute load average, taken around the timed runs."""

    def __init__(self) -> None:
        self.cores = usable_cores()
        self.samples: list[float] = []

    def sample(self) -> None:
        try:
            self.samples.append(os.getloadavg()[0])
        except (AttributeError, OSError):  # not available on this OS
            pass

    def machine(self) -> dict[str, Any]:
        """The `machine` block of the result."""
        peak = max(self.samples) if self.samples else None
        return {"cpu_capability": cpu_capability(), "cores": self.cores, "max_load_average": peak,
                "overloaded": peak is not None and peak > self.cores}


def load_warning(machine: dict[str, Any]) -> str | None:
    """One line when the load average exceeded the core count while timing, else None."""
    if not machine.get("overloaded"):
        return None
    return (f"the 1-minute load average reached {machine['max_load_average']:.2f} on {machine['cores']} "
            "cores while timing: other work competed for the CPU, so the speed and wall times are unreliable")


def _timed(device: torch.device, fn: Callable[[], None]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def speed_block(specs: list[ModelSpec], configs: list[Any], datasets: list[Dataset], batch_sizes: list[int],
                precisions: list[str], device: torch.device, seed: int,
                load: LoadWatch | None = None) -> list[dict[str, Any]]:
    """Interleaved timing: A, B, A, B, … so that drifts of the machine hit both alike. `datasets`:
    the data as each model takes it (its own inputs)."""
    batches, eval_batches = [], []
    for dataset, batch_size in zip(datasets, batch_sizes, strict=True):
        train_idx = dataset.indices("train")
        inputs, labels = next(iterate_batches(dataset, train_idx[:batch_size], batch_size, shuffle=False))
        batches.append(({k: v.to(device) for k, v in inputs.items()}, labels.to(device)))
        eval_idx = dataset.indices("test")[:INFERENCE_BATCH]
        eval_inputs, _ = next(iterate_batches(dataset, eval_idx, len(eval_idx), shuffle=False))
        eval_batches.append({k: v.to(device) for k, v in eval_inputs.items()})

    rigs = []
    for spec, config, precision in zip(specs, configs, precisions, strict=True):
        torch.manual_seed(seed)
        model = build_model(get_model_entry(spec.name), config).to(device).train()
        optimizer = build_optimizer(model, "adamw", 1e-3, 0.01)
        scaler = build_grad_scaler(precision, device.type)
        rigs.append((model, optimizer, scaler))

    def train_step(i: int) -> Callable[[], None]:
        model, optimizer, scaler = rigs[i]
        inputs, labels = batches[i]
        return lambda: training_step(model, optimizer, inputs, labels, precision=precisions[i], scaler=scaler,
                                     grad_clip=1.0)

    def infer(i: int) -> Callable[[], None]:
        model, precision, eval_inputs = rigs[i][0], precisions[i], eval_batches[i]

        def run() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=AMP_DTYPES.get(precision),
                                                 enabled=precision in AMP_DTYPES):
                logits_of(model.eval()(**eval_inputs))
            model.train()

        return run

    for i in range(len(rigs)):
        for _ in range(WARMUP_STEPS):
            train_step(i)()
            infer(i)()
    step_times: list[list[float]] = [[] for _ in rigs]
    infer_times: list[list[float]] = [[] for _ in rigs]
    for _ in range(TIMED_ROUNDS):
        if load is not None:
            load.sample()
        for i in range(len(rigs)):
            step_times[i].append(_timed(device, train_step(i)))
        for i in range(len(rigs)):
            infer_times[i].append(_timed(device, infer(i)))
    if load is not None:
        load.sample()

    blocks = []
    for i, (spec, config) in enumerate(zip(specs, configs, strict=True)):
        peak = measure_training_steps(
            get_model_entry(spec.name), config,
            StepSettings(batch_size=batch_sizes[i], precision=precisions[i]), device=str(device), steps=0,
        )
        throughput = [len(eval_idx) / t for t in infer_times[i]]
        blocks.append({
            "batch_size": batch_sizes[i],
            "train_step_seconds": _quartiles(step_times[i]),
            "train_samples_per_s": _quartiles([batch_sizes[i] / t for t in step_times[i]]),
            "inference_samples_per_s": _quartiles(throughput),
            "measured_peak_tensors": peak.peak_tensors,
            "peak_method": peak.method,
        })
    return blocks


CONTINUAL_FIGURES = ("average_accuracy", "forgetting", "forgetting_max", "bwt")


def learning_block(spec: ModelSpec, resolved: ResolvedRun, *, seeds: list[int], dataset: Dataset,
                   progress: Callable[[str], None], load: LoadWatch | None = None) -> dict[str, Any]:
    """Train `resolved` once per seed (the same run with only the training seed changed)."""
    runs = []
    device = resolved.device
    peak_cuda = torch.device(device).type == "cuda"
    for seed in seeds:
        progress(f"training {spec.label}, seed {seed}")
        config = resolved.with_seed(seed).run_config()
        if peak_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory(prefix="mmkit-compare-") as tmp:
            if load is not None:
                load.sample()
            start = time.perf_counter()
            outcome = train_run(Path(tmp) / "run", config, dataset=dataset)
            seconds = time.perf_counter() - start
            if load is not None:
                load.sample()
            figures = read_continual_metrics(outcome.run_dir) if config.training.tasks else None
        test = outcome.test
        run = {"seed": seed, "accuracy": test.accuracy, "uar": test.uar, "war": test.war,
               "macro_f1": test.macro_f1, "train_seconds": seconds}
        if peak_cuda:
            run["peak_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        if figures is not None:
            run |= {key: figures.as_dict()[key] for key in CONTINUAL_FIGURES}
            run["matrix"] = figures.matrix
        runs.append(run)
    metrics = ["accuracy", "uar", "war", "train_seconds"]
    metrics += [m for m in ("peak_memory_allocated", *CONTINUAL_FIGURES) if m in runs[0]]
    training = resolved.recipe
    return {
        "preset": resolved.options.preset, "batch_size": training.batch_size, "precision": resolved.precision.precision,
        "epochs": training.epochs, "tasks": training.tasks, "epochs_per_task": training.epochs_per_task,
        "runs": runs, **{metric: _mean_std([r[metric] for r in runs]) for metric in metrics},
    }


def verdict(label_a: str, label_b: str, a: dict[str, Any], b: dict[str, Any], metric: str) -> str:
    """Plain language: is the difference of means larger than its seed-to-seed uncertainty?"""
    ma, mb = a[metric]["mean"], b[metric]["mean"]
    k = max(len(a[metric]["values"]), 1)
    spread = math.sqrt((a[metric]["std"] ** 2 + b[metric]["std"] ** 2) / k)  # std. error of the difference
    diff = ma - mb
    if len(a[metric]["values"]) < 2:
        return (f"{label_a} {ma:.3f} vs {label_b} {mb:.3f} {metric}: one seed only, so the seed-to-seed "
                "spread is unknown; run with --seeds 3 or more before drawing a conclusion")
    if abs(diff) <= 2 * spread:
        return (f"{label_a} {ma:.3f} vs {label_b} {mb:.3f} test {metric}: the difference ({diff:+.3f}) is within "
                f"the seed-to-seed spread (2 × {spread:.3f}); no evidence that either learns better here")
    better = label_a if diff > 0 else label_b
    return (f"{better} is better by {abs(diff):.3f} test {metric} ({ma:.3f} vs {mb:.3f}), more than twice the "
            f"seed-to-seed spread ({spread:.3f}) over {k} seeds")


def compare(
    a: str, b: str, *, data: str | None = None, size: str | None = None, preset: str = "quick",
    batch_size: int | None = None, epochs: int | None = None, seeds: int = 3, precision: str | None = None,
    gpu: str | None = None, device: str = "auto", separate_mode: str = "joint", data_seed: int = 0,
    set_options: dict[str, Any] | None = None, progress: Callable[[str], None] = lambda _: None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Resolve both sides through the one resolution path (as `mmkit train` would run each), then
    measure. `gpu`: the preset the static memory is simulated for (default: the local device) and,
    when given, what an `auto` size or batch is fitted to (else the recipe's target, as in train)."""
    specs = [parse_spec(a, size), parse_spec(b, size)]
    model_set_options, training_sets = split_set_options(set_options or {})
    if model_set_options:
        raise MmkitError("compare --set takes training settings only; model.* settings would differ per model")
    owned = {"seed": "compare trains seeds 0…K−1 itself (--seeds K)",
             "size": "give the size in the model spec (MODEL:SIZE) or with --size"}
    clash = sorted(owned.keys() & training_sets.keys())
    if clash:
        raise MmkitError(f"compare --set {clash[0]}: {owned[clash[0]]}")
    data_spec = data or get_model_entry(specs[0].name).default_data
    if not data_spec:
        raise MmkitError(f"compare {specs[0].label} {specs[1].label}: give --data (a plain factory has no data of its own)")
    presets = [spec.preset or preset for spec in specs]
    options = [
        RunOptions(
            model=spec.name, preset=p, size=spec.size, batch_size=batch_size, epochs=epochs or None,
            precision=precision, data=data_spec, data_seed=data_seed, gpu=gpu, device=device,  # type: ignore[arg-type]
            set_items=tuple(training_sets.items()) + ((("model.mode", separate_mode),) if spec.name == "separate" else ()),
            allow_nonfinite=allow_nonfinite,
        )
        for spec, p in zip(specs, presets, strict=True)
    ]
    for option in options:
        check_request(option)
    progress(f"loading {data_spec}")
    dataset = load_dataset(data_spec, seed=data_seed)
    sides = []
    for option in options:
        try:
            sides.append(resolve_run(option))
        except MmkitError as exc:
            raise MmkitError(f"cannot compare {specs[0].label} and {specs[1].label} on {data_spec}: {exc}") from None
    # the data checks of a run, for the inputs either model takes (both are timed and trained on it)
    dataset, data_notes = check_data_for_model(
        dataset, {name: spec for side in reversed(sides) for name, spec in _input_specs(side).items()},
        training=True, allow_nonfinite=allow_nonfinite)
    for note in data_notes:
        progress(note)
    configs = [side.config for side in sides]
    batches = [side.batch_size for side in sides]
    precisions = [side.precision.precision for side in sides]
    recipes = [side.recipe for side in sides]
    device = sides[0].device
    static_gpu, _ = resolve_gpu(gpu or "auto")
    notes = [f"{spec.label}: {note}" for spec, side in zip(specs, sides, strict=True) for note in side.notes]

    progress("static: counting and simulating")
    static = [static_block(side, static_gpu) for side in sides]
    same_recipe = presets[0] == presets[1]
    result: dict[str, Any] = {
        "settings": {
            "a": specs[0].label, "b": specs[1].label, "data": data_spec, "data_seed": data_seed,
            "preset": preset, "presets": presets, "same_recipe": same_recipe,
            "batch_size": batches[0] if batches[0] == batches[1] else None,  # None: see each side's recipe
            "epochs": recipes[0].epochs if recipes[0].epochs else 0,
            "seeds": seeds, "precision": precisions[0] if precisions[0] == precisions[1] else None,
            "device": device, "gpu": static_gpu.name, "set": training_sets,
            "separate_mode": separate_mode if "separate" in (specs[0].name, specs[1].name) else None,
            "torch": torch.__version__,
        },
        **{key: {"model": spec.name, "static": block,
                 "recipe": {"preset": p, "batch_size": batch, "precision": prec}}
           for key, spec, block, p, batch, prec in zip("ab", specs, static, presets, batches, precisions, strict=True)},
        "notes": notes,
        "ratios": {
            "params": static[0]["params"] / static[1]["params"],
            "macs_per_sample": static[0]["macs_per_sample"] / static[1]["macs_per_sample"],
            "train_peak_tensors": static[0]["train_memory"]["peak_tensors"]
            / static[1]["train_memory"]["peak_tensors"],
        },
    }
    load = LoadWatch()
    result["machine"] = load.machine()
    if epochs == 0:
        result["settings"]["epochs"] = 0
        return result  # static only

    progress("speed: interleaved timing")
    own_data = [_with_inputs(dataset, _input_specs(side)) for side in sides]
    speed = speed_block(specs, configs, own_data, batches, precisions, torch.device(device), recipes[0].seed,
                        load=load)
    result["a"]["speed"], result["b"]["speed"] = speed
    result["ratios"]["train_step_time"] = (
        speed[0]["train_step_seconds"]["median"] / speed[1]["train_step_seconds"]["median"]
    )
    result["ratios"]["inference_throughput"] = (
        speed[0]["inference_samples_per_s"]["median"] / speed[1]["inference_samples_per_s"]["median"]
    )

    seed_list = list(range(seeds))
    for key, spec, side, data_of_side in zip(("a", "b"), specs, sides, own_data, strict=True):
        result[key]["learning"] = learning_block(spec, side, seeds=seed_list, dataset=data_of_side,
                                                 progress=progress, load=load)
    result["machine"] = load.machine()
    la, lb = result["a"]["learning"], result["b"]["learning"]
    result["settings"]["epochs"] = la["epochs"] if la["epochs"] == lb["epochs"] else None
    for key, block in (("a", la), ("b", lb)):
        result[key]["recipe"]["epochs"] = block["epochs"]
    result["ratios"]["train_seconds"] = la["train_seconds"]["mean"] / lb["train_seconds"]["mean"]
    # imbalanced test classes (emotion data): judge by UAR, which weighs every class alike
    counts = torch.bincount(dataset.labels[dataset.indices("test")], minlength=dataset.num_classes)
    metric = "uar" if counts.max() != counts.min() else "accuracy"
    result["verdict_metric"] = metric
    result["verdict"] = verdict(specs[0].label, specs[1].label, la, lb, metric)
    return result
