"""Plain training: epochs over the training split, validation after each, the best checkpoint
tested at the end. `resume` is the same function with its state loaded from the run's last
checkpoint. It runs on the shared engine (mmkit.train.engine), which owns the steps, the stop
requests and the checkpoints.

Exact resume: a checkpoint holds the model, the optimizer state, the GradScaler state, the global
and Python RNG states and the data-order generator. It is taken at an epoch boundary after
validation (every `checkpoint_every` epochs, at the last one and at a new best), every
`checkpoint_every_steps` optimizer steps inside an epoch (with the position in the epoch and the
epoch's data order), and when SIGINT/SIGTERM arrives. Loading it puts every source of randomness
and every counter where the uninterrupted run had them, so the continued run is bitwise
identical on the CPU — after a clean stop, a signal or a `kill -9` alike.

Failures the run survives stop it with `RunStopped` (one line, exit code 1) and never leave a bad
checkpoint behind: a non-finite loss without a GradScaler, a checkpoint or history write that fails
(disk full), and CUDA out-of-memory that back-off cannot fix. Out of memory in forward or backward
halves the micro-batch and doubles `grad_accum` instead, so the batch per optimizer step is
unchanged, and records the new `grad_accum` in run.json so that `resume` keeps it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mmkit.data.datasets import Dataset, iterate_batches, num_batches
from mmkit.models.registry import MultimodalModel
from mmkit.train.checkpoint import load_checkpoint, load_model_state, read_pointer, stop_on_write_failure
from mmkit.train.config import RunConfig
from mmkit.train.distributed import SINGLE, World, check_batch_split
from mmkit.train.engine import (
    Batch,
    Engine,
    EpochPlan,
    TrainOutcome,
    build_training_model,
    prepare_run_dir,
    seed_everything,
    train_indices,
)
from mmkit.train.evaluation import evaluate, evaluate_with_loss
from mmkit.train.forecast import MEASURED_STEPS, RunForecast, measured_forecast, predict_run
from mmkit.train.metrics import ClassificationMetrics
from mmkit.train.report import Reporter
from mmkit.train.rundata import load_run_data
from mmkit.train.rundir import METRICS_FILE, write_metrics
from mmkit.train.schedule import learning_rate
from mmkit.train.sharding import shard_model
from mmkit.train.signals import StopRequest
from mmkit.train.state import Restored, Trainables
from mmkit.train.step import build_grad_scaler, build_optimizer


def train_plain(
    run_dir: Path, config: RunConfig, resume: bool, stop_after_epochs: int | None, reporter: Reporter,
    dataset: Dataset | None, stop: StopRequest, world: World = SINGLE, forecast: bool = False,
) -> TrainOutcome:
    """Train (or with `resume` continue) the plain run in `run_dir`; see `mmkit.train.run.train_run`."""
    recipe = config.training
    device = world.device(config.device)

    # ---- data: the full validation and test splits, a stratified fraction of train
    dataset = dataset or load_run_data(config, check_nonfinite=False)[0]  # checked when the run was made
    train_idx = train_indices(config, dataset)
    val_idx = dataset.indices("val")
    batch_size = int(recipe.batch_size)  # global: what one optimizer step sees, whatever the world size
    check_batch_split(world.size, batch_size, len(train_idx))
    steps_per_epoch = num_batches(len(train_idx), batch_size)
    prepare_run_dir(run_dir, config, world)

    # ---- model, optimizer, scaler: seeded, so a fresh run is reproducible (and the same on every rank)
    seed_everything(recipe.seed)
    model = build_training_model(config, device, reporter, world, fresh=not resume)
    sharded = world.distributed and recipe.strategy == "fsdp"
    if sharded:  # FSDP2, in place and before the optimizer: it steps the DTensor shards
        shard_model(model, recipe.fsdp_wrap)
    optimizer = build_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    scaler = build_grad_scaler(config.precision, device.type)
    # every rank draws from rank 0's random streams (saved in checkpoints, restored on all ranks)
    cuda_device = device.index if world.distributed and device.type == "cuda" else None
    # data parallel: DDP all-reduces the gradients (FSDP reduce-scatters them); checkpoints hold the unwrapped `model`
    # (clip and fusion leave their contrastive parameters unused when its weight is 0)
    unused = recipe.contrastive_weight == 0 and hasattr(model, "encode_text")
    wrap = None if sharded else (lambda m: world.wrap(m, find_unused_parameters=unused))
    engine = Engine(run_dir, config, Trainables(model, optimizer, scaler), device, reporter, stop, world=world,
                    wrap=wrap, cuda_device=cuda_device)
    restored = engine.start(resume)

    reporter.start(config, _resumed_from(restored, steps_per_epoch, world.size) if restored else None,
                   engine.state.global_step)
    last_epoch = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, stop_after_epochs)
    if forecast and world.is_main:
        # the forecast builds the model (on the meta device) after a resume restored the random state: a
        # module that draws while it is built (a legacy `torch.Tensor(n).uniform_()` ignores the meta
        # device) must not move the run's generator
        with torch.random.fork_rng(devices=[]):
            predicted = predict_run(
                config.entry, config.model_config_object(), precision=config.precision, device_type=device.type,
                batch_size=batch_size, train_samples=len(train_idx), val_samples=len(val_idx),
                epochs=recipe.epochs - engine.state.epoch, size=config.size, train_fraction=recipe.train_fraction,
            )
        stop.typical_step_seconds = predicted.step_seconds
        reporter.forecast(predicted)
        engine.after_step = _measured_forecast(predicted, reporter)

    lr_at = _schedule(config, steps_per_epoch)

    def batches(skip: int) -> Iterator[Batch]:
        """The epoch's global batches from `skip` on; every rank draws the same order and trains
        on its slice of each."""
        order = iterate_batches(dataset, train_idx, batch_size, shuffle=True, generator=engine.state.data_order,
                                part=(world.rank, world.size))
        for k, (inputs, labels) in enumerate(itertools.islice(order, skip, None), start=skip):
            yield inputs, labels, min(batch_size, len(train_idx) - k * batch_size)

    model.train()
    for epoch in range(engine.state.epoch, last_epoch):
        plan = EpochPlan(epoch, recipe.epochs, steps_per_epoch, batches, lr_at, f"epoch {epoch + 1}")
        totals = engine.train_epoch(plan)
        # ---- end of epoch: validate, log, checkpoint
        val, val_loss = evaluate_with_loss(model, dataset, val_idx, batch_size=recipe.eval_batch_size,
                                           precision=config.precision, device=device, world=world)
        is_best = engine.state.improves(val.uar, epoch + 1)
        record = {
            "epoch": epoch + 1, "step": engine.state.global_step, "train_loss": totals.train_loss,
            "val_loss": val_loss, "val_accuracy": val.accuracy, "val_uar": val.uar, "val_war": val.war,
            "val_macro_f1": val.macro_f1, "lr": totals.lr, "grad_accum": totals.grad_accum,
            "epoch_time": totals.seconds, "samples_per_s": totals.samples / max(totals.seconds, 1e-9),
            "world_size": world.size, "best": is_best,
        }
        engine.end_epoch(record, last=epoch + 1 == last_epoch, best={"val_uar": val.uar} if is_best else None,
                         fields={"val": {"uar": val.uar, "accuracy": val.accuracy}})

    finished = last_epoch >= recipe.epochs
    test = None
    if finished:
        world.barrier()  # the best pointer is written
        test = final_test(run_dir, engine.config, model, dataset, device, world)
    reporter.end(test)
    return TrainOutcome(run_dir, last_epoch, finished, test)


def _schedule(config: RunConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of each 0-based global step: warmup, then the recipe's schedule."""
    recipe = config.training
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = round(recipe.warmup_fraction * total_steps)

    def lr_at(step: int) -> float:
        return learning_rate(step, base_lr=recipe.lr, total_steps=total_steps, warmup_steps=warmup_steps,
                             schedule=recipe.schedule, steps_per_epoch=steps_per_epoch,
                             restart_epochs=recipe.restart_epochs)

    return lr_at


def _resumed_from(restored: Restored, steps_per_epoch: int, world_size: int) -> str:
    """`step-00000120 (epoch 2, after step 41 of 79)`, or `(end of epoch 1)`, and the process counts."""
    state, saved = restored.state, restored.trainer.world_size
    where = (f"epoch {state.epoch + 1}, after step {state.batches_in_epoch} of {steps_per_epoch}"
             if state.mid_epoch else f"end of epoch {state.epoch}")
    processes = (f", written by {saved} process{'es' if saved > 1 else ''}, continued by {world_size}"
                 if saved != world_size else "")
    return f"{restored.checkpoint.name} ({where}){processes}"


def _measured_forecast(predicted: RunForecast, reporter: Reporter) -> Callable[[float], None]:
    """Told each step's seconds: after the first (warm-up) step and `MEASURED_STEPS` more, report
    the forecast from the measured steps."""
    step_times: list[float] = []

    def after_step(seconds: float) -> None:
        if len(step_times) > MEASURED_STEPS:
            return
        step_times.append(seconds)
        if len(step_times) == MEASURED_STEPS + 1:
            val_seconds = predicted.epoch_seconds - predicted.steps_per_epoch * predicted.step_seconds
            reporter.forecast(measured_forecast(step_times[1:], predicted, val_seconds))

    return after_step


def final_test(
    run_dir: Path, config: RunConfig, model: MultimodalModel, dataset: Dataset, device: torch.device,
    world: World = SINGLE,
) -> ClassificationMetrics:
    """Evaluate the best checkpoint on the test split and write metrics.json (rank 0)."""
    best = read_pointer(run_dir, "best")
    model_state, _, trainer = load_checkpoint(best)
    load_model_state(model, model_state, best / "model.safetensors")
    test = evaluate(model, dataset, dataset.indices("test"), batch_size=config.training.eval_batch_size,
                    precision=config.precision, device=device, world=world)
    if world.is_main:
        document = test.as_dict("test") | {"checkpoint": best.name, "epoch": trainer["epoch"]}
        with stop_on_write_failure(run_dir, str(run_dir / METRICS_FILE)):
            write_metrics(run_dir, document)
    return test
