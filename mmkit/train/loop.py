"""The training loop: one plain function, read top to bottom. `resume` is the same function with
its state loaded from the run's last checkpoint.

Exact resume: a checkpoint holds the model, the optimizer state, the GradScaler state, the global
and Python RNG states and the data-order generator. It is taken at an epoch boundary after
validation, every `checkpoint_every_steps` optimizer steps inside an epoch (with the position in
the epoch and the epoch's data order), and when SIGINT/SIGTERM arrives. Loading it puts every source
of randomness and every counter where the uninterrupted run had them, so the continued run is
bitwise identical on the CPU — after a clean stop, a signal or a `kill -9` alike.

Failures the run survives stop it with `RunStopped` (one line, exit code 1) and never leave a bad
checkpoint behind: a non-finite loss without a GradScaler, a checkpoint or history write that fails
(disk full), and CUDA out-of-memory that back-off cannot fix. Out of memory in forward or backward
halves the micro-batch and doubles `grad_accum` instead, so the batch per optimizer step is
unchanged, and records the new `grad_accum` in run.json so that `resume` keeps it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from mmkit.data.datasets import Dataset, iterate_batches, num_batches, stratified_subset
from mmkit.errors import MmkitError, RunStopped, validation_message
from mmkit.models.registry import MultimodalModel, build_model, logits_of
from mmkit.train.checkpoint import (
    CheckpointError,
    checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    optimizer_state_to_tensors,
    read_pointer,
    read_pointer_record,
    resolve_checkpoint,
    restore_rng_state,
    rng_state_to_tensors,
    save_checkpoint,
    step_dir_name,
    last_good,
    stop_on_write_failure,
    write_pointer,
)
from mmkit.train.compile import compile_model
from mmkit.train.config import RunConfig
from mmkit.train.forecast import MEASURED_STEPS, RunForecast, measured_forecast, predict_run
from mmkit.train.distributed import SINGLE, World, check_batch_split, no_sync
from mmkit.train.metrics import ClassificationMetrics, classification_metrics, confusion_matrix
from mmkit.train.rundata import load_run_data
from mmkit.train.rundir import HISTORY_FILE, METRICS_FILE, read_history, write_history, write_metrics
from mmkit.train.schedule import learning_rate
from mmkit.train.signals import StopRequest
from mmkit.train.step import AMP_DTYPES, ForwardLoss, build_grad_scaler, build_optimizer, training_step

OutOfMemoryError = torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError on torch >= 2.5

DATA_GENERATOR_KEY = "rng.data_order"
EPOCH_ORDER_KEY = "rng.epoch_order"  # data-order state at the start of an interrupted epoch


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the step finished and a checkpoint was written."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} in epoch {epoch} after step {step}")
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


class Reporter(Protocol):
    """What the loop tells the outside world; the CLI draws progress bars, tests stay silent."""

    def start(self, config: RunConfig, resumed_from: str | None) -> None: ...
    def forecast(self, forecast: RunForecast) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def step(self, loss: float, lr: float, samples_per_s: float) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, test: ClassificationMetrics | None) -> None: ...


class SilentReporter:
    def start(self, config: RunConfig, resumed_from: str | None) -> None: ...
    def forecast(self, forecast: RunForecast) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def step(self, loss: float, lr: float, samples_per_s: float) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, test: ClassificationMetrics | None) -> None: ...


class TrainerState(BaseModel):
    """What `resume` reads from trainer_state.json, checked before any of it is used."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    epoch: NonNegativeInt  # epochs completed
    global_step: NonNegativeInt
    best_uar: float
    best_epoch: NonNegativeInt | None
    batches_in_epoch: NonNegativeInt = 0  # > 0: a mid-epoch checkpoint
    epoch_samples_seen: NonNegativeInt = 0
    optimizer: dict[str, Any]
    scaler: dict[str, float | int] | None = None


def _trainer_state(document: dict[str, Any], checkpoint_dir: Path) -> TrainerState:
    try:
        return TrainerState.model_validate(document)
    except ValidationError as exc:
        raise CheckpointError(validation_message(checkpoint_dir / "trainer_state.json", exc)) from None


@dataclass(frozen=True)
class TrainOutcome:
    run_dir: Path
    epochs_done: int
    finished: bool  # False when stopped early by `stop_after_epochs`
    test: ClassificationMetrics | None


def evaluate_with_loss(
    model: MultimodalModel, dataset: Dataset, indices: torch.Tensor, *, batch_size: int,
    precision: str, device: torch.device, world: World = SINGLE,
) -> tuple[ClassificationMetrics, float]:
    """Metrics and mean cross-entropy on `indices` in one pass (eval mode, no grad).

    With several ranks, rank r evaluates batches r, r + k, r + 2k, ... — the very batches one
    process would form — and the confusion matrix and the per-batch loss sums are all-reduced
    (integers, and sums with zeros), then added in batch order: the result is bitwise the
    single-process one.
    """
    was_training = model.training
    model.eval()
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    batch_losses = torch.zeros(num_batches(len(indices), batch_size) if len(indices) else 0, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(
        device.type, dtype=AMP_DTYPES.get(precision), enabled=precision in AMP_DTYPES
    ):
        batches = iterate_batches(dataset, indices, batch_size, shuffle=False)
        for i, (inputs, labels) in enumerate(itertools.islice(batches, world.rank, None, world.size)):
            logits = logits_of(model(**{k: v.to(device) for k, v in inputs.items()}))
            batch_losses[world.rank + i * world.size] = torch.nn.functional.cross_entropy(
                logits.float(), labels.to(device), reduction="sum"
            ).double().cpu()
            confusion += confusion_matrix(labels, logits.argmax(dim=-1).cpu(), dataset.num_classes)
    model.train(was_training)
    confusion, batch_losses = world.sum(confusion), world.sum(batch_losses)
    total = torch.zeros((), dtype=torch.float64)
    for loss in batch_losses:  # in batch order, as one process adds them
        total += loss
    return classification_metrics(confusion, dataset.classes), (total / max(len(indices), 1)).item()


def evaluate(
    model: MultimodalModel, dataset: Dataset, indices: torch.Tensor, *, batch_size: int,
    precision: str, device: torch.device, world: World = SINGLE,
) -> ClassificationMetrics:
    """Accuracy, UAR, WAR, macro-F1 and the confusion matrix on `indices` (eval mode, no grad)."""
    return evaluate_with_loss(model, dataset, indices, batch_size=batch_size, precision=precision, device=device,
                              world=world)[0]


def build_training_model(
    config: RunConfig, device: torch.device, reporter: Reporter, world: World = SINGLE
) -> MultimodalModel:
    """The run's model on `device` (seed first): SyncBatchNorm across CUDA ranks, compiled in place
    with `compile` (or a warning and eager mode where torch.compile cannot run)."""
    model = build_model(config.entry, config.model_config_object())
    if world.distributed and device.type == "cuda":  # batch statistics over the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.training.compile and (warning := compile_model(model, device.type)):
        reporter.message(warning)
    return model


def train_indices(config: RunConfig, dataset: Dataset) -> torch.Tensor:
    """The training split, or its stratified seeded subset (`train_fraction`)."""
    indices = dataset.indices("train")
    fraction = config.training.train_fraction
    if fraction < 1.0:
        indices = stratified_subset(indices, dataset.labels[indices], fraction, config.training.seed)
    return indices


def _write_history(run_dir: Path, records: list[dict[str, Any]]) -> None:
    with stop_on_write_failure(run_dir, str(run_dir / HISTORY_FILE)):
        write_history(run_dir, records)


def _save_training_checkpoint(
    run_dir: Path, config: RunConfig, model: MultimodalModel, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, data_order: torch.Generator, global_step: int,
    state: dict[str, Any], extra_tensors: dict[str, torch.Tensor], protect_best: bool,
    cuda_device: int | None = None,
) -> Path:
    """Model, optimizer, scaler, every RNG and the data order; `last` points to the result.
    `cuda_device`: a data-parallel process's GPU, the only one whose RNG state it saves.

    Never writes non-finite weights, and a failed write (e.g. a full disk) leaves the previous
    checkpoints and pointers as they were: the save is atomic and rotation runs only after it.
    """
    model_state = model.state_dict()
    bad = next((k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise RunStopped(f"weight {bad!r} is not finite at step {global_step}; no checkpoint written; "
                         f"{last_good(run_dir)}")
    tensors, optimizer_meta = optimizer_state_to_tensors(optimizer.state_dict())
    tensors.update(rng_state_to_tensors(cuda_device=cuda_device))
    tensors[DATA_GENERATOR_KEY] = data_order.get_state()
    tensors.update(extra_tensors)
    trainer_state = {
        "model": config.model, "size": config.size, "global_step": global_step, **state,
        "optimizer": optimizer_meta, "scaler": scaler.state_dict() if scaler is not None else None,
    }
    best_name = _pointer_name(run_dir, "best")
    with stop_on_write_failure(run_dir, f"the checkpoint of step {global_step}"):
        path = save_checkpoint(
            run_dir, global_step, model_state, tensors, trainer_state,
            keep_last=config.training.keep_last, protect={best_name} if best_name and protect_best else set(),
        )
    with stop_on_write_failure(run_dir, str(checkpoints_dir(run_dir) / "last.json")):
        write_pointer(run_dir, "last", path, {"epoch": state["epoch"], "step": global_step})
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train_run(
    run_dir: Path,
    config: RunConfig,
    *,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    reporter: Reporter | None = None,
    dataset: Dataset | None = None,
    world: World = SINGLE,
    forecast: bool = False,
) -> TrainOutcome:
    """Train (or continue) the run in `run_dir` as `config` says; returns when done or stopped.

    SIGINT and SIGTERM are caught for the whole run (mmkit.train.signals): during training the
    current step finishes, a checkpoint is written and `TrainingInterrupted` is raised; a second
    SIGINT stops at once. After the last step the run simply completes. `world` is this process's
    rank in a data-parallel run (every rank calls `train_run`; rank 0 alone writes to `run_dir`).
    `forecast`: tell the reporter the predicted, then the measured, run time (mmkit.train.forecast).
    """
    reporter = reporter or SilentReporter()
    stop = StopRequest(run_dir, announce=reporter.message)
    with stop.installed():
        if config.training.tasks:  # class-incremental continual learning
            if world.distributed:
                raise MmkitError("continual learning runs in one process; drop --nproc-per-node")
            from mmkit.train.continual import train_continual

            return train_continual(run_dir, config, resume, stop_after_epochs, reporter, dataset, stop)
        return _train(run_dir, config, resume, stop_after_epochs, reporter, dataset, stop, world, forecast)


def _train(
    run_dir: Path, config: RunConfig, resume: bool, stop_after_epochs: int | None, reporter: Reporter,
    dataset: Dataset | None, stop: StopRequest, world: World = SINGLE, forecast: bool = False,
) -> TrainOutcome:
    recipe = config.training
    device = world.device(config.device)

    # ---- data: the full validation and test splits, a stratified fraction of train
    dataset = dataset or load_run_data(config, check_nonfinite=False)[0]  # checked when the run was made
    train_idx = train_indices(config, dataset)
    val_idx = dataset.indices("val")
    batch_size = int(recipe.batch_size)  # global: what one optimizer step sees, whatever the world size
    check_batch_split(world.size, batch_size, len(train_idx))
    steps_per_epoch = num_batches(len(train_idx), batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = round(recipe.warmup_fraction * total_steps)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir)

    # ---- model, optimizer, scaler: seeded, so a fresh run is reproducible (and the same on every rank)
    seed_everything(recipe.seed)
    model = build_training_model(config, device, reporter, world)
    optimizer = build_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    scaler = build_grad_scaler(config.precision, device.type)
    data_order = torch.Generator().manual_seed(recipe.seed)
    # every rank draws from rank 0's random streams (saved in checkpoints, restored on all ranks)
    cuda_device = device.index if world.distributed and device.type == "cuda" else None
    start_epoch, global_step, best_uar, best_epoch = 0, 0, -1.0, None
    history: list[dict[str, Any]] = []

    # ---- resume: put every counter, state and random stream back where the checkpoint left them
    resumed_from = None
    resume_batches, resume_partial = 0, (torch.zeros(()), 0)
    if resume:
        checkpoint_dir, trainer, tensors = restore_training_state(
            run_dir, config, model, optimizer, scaler, data_order, reporter, cuda_device
        )
        start_epoch, global_step = trainer.epoch, trainer.global_step
        resume_batches = trainer.batches_in_epoch
        if resume_batches:  # a mid-epoch checkpoint: replay the epoch's data order from its start
            data_order.set_state(tensors[EPOCH_ORDER_KEY])
            resume_partial = (tensors["progress.epoch_loss_sum"].reshape(()), trainer.epoch_samples_seen)
        best_uar, best_epoch = trainer.best_uar, trainer.best_epoch
        if world.is_main:
            history = [r for r in read_history(run_dir) if r["epoch"] <= start_epoch]
            _write_history(run_dir, history)  # drop epochs the interrupted run logged after its checkpoint
        saved_world = getattr(trainer, "world_size", 1)
        resumed_from = (
            f"{checkpoint_dir.name} (epoch {start_epoch + 1}, after step {resume_batches} of {steps_per_epoch})"
            if resume_batches else f"{checkpoint_dir.name} (end of epoch {start_epoch})"
        ) + (f", written by {saved_world} process{'es' if saved_world > 1 else ''}, continued by {world.size}"
             if saved_world != world.size else "")
    elif world.is_main and (run_dir / HISTORY_FILE).exists():
        (run_dir / HISTORY_FILE).unlink()
    world.barrier()  # no rank starts before rank 0 has set the run directory up

    # ---- data parallel: DDP all-reduces the gradients; checkpoints hold the unwrapped `model`
    # (clip and fusion leave their contrastive parameters unused when its weight is 0)
    trained = world.wrap(model, find_unused_parameters=recipe.contrastive_weight == 0
                         and hasattr(model, "encode_text"))
    runner = StepRunner(run_dir, config, trained, optimizer, scaler, device, reporter, world=world)

    def save(state: dict[str, Any], extra: dict[str, torch.Tensor], protect_best: bool) -> Path:
        """Rank 0 writes the checkpoint; the others wait until it is complete."""
        path = checkpoints_dir(run_dir) / step_dir_name(global_step)
        if world.is_main:
            path = _save_training_checkpoint(run_dir, config, model, optimizer, scaler, data_order, global_step,
                                             state | {"world_size": world.size}, extra, protect_best, cuda_device)
        world.barrier()
        stop.last_checkpoint = path.name
        return path

    reporter.start(config, resumed_from)
    last_epoch = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, stop_after_epochs)
    predicted = None
    if forecast and world.is_main:
        predicted = predict_run(
            config.entry, config.model_config_object(), precision=config.precision, device_type=device.type,
            batch_size=batch_size, train_samples=len(train_idx), val_samples=len(val_idx),
            epochs=recipe.epochs - start_epoch, size=config.size, train_fraction=recipe.train_fraction,
        )
        stop.typical_step_seconds = predicted.step_seconds
        reporter.forecast(predicted)
    step_times: list[float] = []  # steps 2.. of this process, for the measured forecast
    model.train()
    for epoch in range(start_epoch, last_epoch):
        reporter.epoch_start(epoch + 1, recipe.epochs, steps_per_epoch, done=resume_batches)
        epoch_order = data_order.get_state()  # the order of this epoch is drawn from here
        epoch_start, seen, loss_sum = time.perf_counter(), 0, torch.zeros(())
        seen_before = resume_partial[1] if resume_batches else 0  # samples/s counts this process's steps
        # every rank draws the same order and trains on its slice of each global batch
        batches = iterate_batches(dataset, train_idx, batch_size, shuffle=True, generator=data_order,
                                  part=(world.rank, world.size))
        if resume_batches:  # skip what the interrupted run already trained on in this epoch
            batches = itertools.islice(batches, resume_batches, None)
            loss_sum, seen = resume_partial[0].clone(), resume_partial[1]
        batches_done = resume_batches
        resume_batches = 0
        lr = learning_rate(
            global_step, base_lr=recipe.lr, total_steps=total_steps, warmup_steps=warmup_steps,
            schedule=recipe.schedule, steps_per_epoch=steps_per_epoch, restart_epochs=recipe.restart_epochs,
        )
        for inputs, labels in batches:
            lr = learning_rate(
                global_step, base_lr=recipe.lr, total_steps=total_steps, warmup_steps=warmup_steps,
                schedule=recipe.schedule, steps_per_epoch=steps_per_epoch,
                restart_epochs=recipe.restart_epochs,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            n = min(batch_size, len(train_idx) - batches_done * batch_size)  # the global batch
            stop.step_begins(global_step + 1)
            step_loss = runner.step(inputs, labels, global_step + 1, f"epoch {epoch + 1}", batch_total=n)
            loss_value = step_loss.item()  # waits for the device: the step is done
            stop.step_ends(time.monotonic() - stop.step_started)
            config = runner.config  # grad_accum may have grown after out of memory
            global_step += 1
            batches_done += 1
            seen += n
            loss_sum += step_loss * n
            reporter.step(loss_value, lr, (seen - seen_before) / max(time.perf_counter() - epoch_start, 1e-9))
            if predicted is not None and len(step_times) <= MEASURED_STEPS:
                step_times.append(stop.typical_step_seconds or 0.0)
                if len(step_times) == MEASURED_STEPS + 1:  # the first, warm-up step is left out
                    val_seconds = predicted.epoch_seconds - predicted.steps_per_epoch * predicted.step_seconds
                    reporter.forecast(measured_forecast(step_times[1:], predicted, val_seconds))
            signum = world.max(stop.signal or 0)  # a signal on any rank stops every rank after this step
            periodic = recipe.checkpoint_every_steps and global_step % recipe.checkpoint_every_steps == 0
            if signum or (periodic and batches_done < steps_per_epoch):
                # mid-epoch: the position in the epoch and the epoch's data order make resume exact
                path = save(
                    {"epoch": epoch, "batches_in_epoch": batches_done, "epoch_samples_seen": seen,
                     "best_uar": best_uar, "best_epoch": best_epoch},
                    {EPOCH_ORDER_KEY: epoch_order, "progress.epoch_loss_sum": loss_sum.clone()},
                    protect_best=True,
                )
                if signum:  # the step has finished and is saved: stop
                    raise TrainingInterrupted(signum, path, epoch + 1, global_step)

        # ---- end of epoch: validate, log, checkpoint
        epoch_time = time.perf_counter() - epoch_start
        val, val_loss = evaluate_with_loss(model, dataset, val_idx, batch_size=recipe.eval_batch_size,
                                           precision=config.precision, device=device, world=world)
        record = {
            "epoch": epoch + 1, "step": global_step,
            "train_loss": (loss_sum / max(seen, 1)).item(), "val_loss": val_loss,
            "val_accuracy": val.accuracy, "val_uar": val.uar, "val_war": val.war,
            "val_macro_f1": val.macro_f1, "lr": lr, "grad_accum": runner.micro_batches, "epoch_time": epoch_time,
            "samples_per_s": seen / max(epoch_time, 1e-9), "world_size": world.size,
        }
        is_best = val.uar > best_uar
        if is_best:
            best_uar, best_epoch = val.uar, epoch + 1
        record["best"] = is_best
        history.append(record)
        if world.is_main:
            _write_history(run_dir, history)  # before the checkpoint: resume trims what it lacks
        periodic = (epoch + 1) % recipe.checkpoint_every == 0 or epoch + 1 == last_epoch
        if periodic or is_best:
            path = save(
                {"epoch": epoch + 1, "best_uar": best_uar, "best_epoch": best_epoch,
                 "val": {"uar": val.uar, "accuracy": val.accuracy}},
                {}, protect_best=not is_best,
            )
            if is_best and world.is_main:
                with stop_on_write_failure(run_dir, str(checkpoints_dir(run_dir) / "best.json")):
                    write_pointer(run_dir, "best", path, {"epoch": epoch + 1, "step": global_step, "val_uar": val.uar})
        reporter.epoch_end(record)

    finished = last_epoch >= recipe.epochs
    test = None
    if finished:
        world.barrier()  # the best pointer is written
        test = final_test(run_dir, config, model, dataset, device, world)
    reporter.end(test)
    return TrainOutcome(run_dir, last_epoch, finished, test)


class _Phase:
    """The phase `training_step` is in (forward, backward, optimizer, done), for OOM handling."""

    def __init__(self) -> None:
        self.name = "start"

    def __call__(self, name: str) -> None:
        self.name = name


class StepRunner:
    """One optimizer step over a batch, in `grad_accum` micro-batches, with the safety rules of
    every training loop: CUDA out of memory in forward/backward halves the micro-batch (and records
    the doubled `grad_accum` in run.json); a non-finite loss without a GradScaler stops the run.

    In a data-parallel run `model` is the DDP-wrapped model and `inputs` this rank's share of the
    global batch: micro-batches before the last run under `no_sync` (gradients accumulate locally,
    one all-reduce per optimizer step), and the returned loss is the global batch's mean.
    """

    def __init__(
        self, run_dir: Path, config: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None, device: torch.device, reporter: Reporter,
        forward_loss: ForwardLoss | None = None, world: World = SINGLE,
    ) -> None:
        self.run_dir, self.config, self.model, self.optimizer = run_dir, config, model, optimizer
        self.scaler, self.device, self.reporter, self.forward_loss = scaler, device, reporter, forward_loss
        self.world = world
        self.micro_batches = min(config.training.grad_accum, int(config.training.batch_size))

    def step(
        self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, step: int, where: str,
        batch_total: int | None = None,
    ) -> torch.Tensor:
        """Train on one batch; `step` (1-based) and `where` ("epoch 3") name it in messages.
        `batch_total`: the global batch this rank's `labels` are a share of (default: all of it)."""
        n = labels.shape[0]
        total = n if batch_total is None else batch_total
        while True:  # out of memory: retry the step with half the micro-batch
            phase = _Phase()
            try:
                loss = self._accumulate(inputs, labels, phase, n * self.world.size / total)
                break
            except OutOfMemoryError:
                rank = f" on rank {self.world.rank}" if self.world.distributed else ""
                if phase.name == "optimizer":
                    raise RunStopped(
                        f"CUDA out of memory in the optimizer step at step {step}{rank}: the weights, gradients and "
                        f"optimizer state alone do not fit, whatever the batch; pick a smaller --size (see "
                        f"`mmkit memory-plan`); {last_good(self.run_dir)}"
                    ) from None
                if self.world.distributed:  # halving one rank's micro-batch alone would desynchronize DDP
                    raise RunStopped(
                        f"CUDA out of memory in the {phase.name} pass at step {step}{rank}; with several processes "
                        f"the micro-batch is not halved automatically: raise --set grad_accum (see `mmkit "
                        f"memory-plan --nproc`); {last_good(self.run_dir)}"
                    ) from None
            self._back_off(step)
        if self.world.distributed:  # the global batch's mean: shares weighted by their size
            loss = self.world.sum(loss.double() * n / total).float()
        if not torch.isfinite(loss) and self.scaler is None:
            # (with fp16 the GradScaler has already skipped this step and lowered its scale)
            recipe = self.config.training
            raise RunStopped(
                f"loss is {loss.item()} at {where}, step {step}; stopped before any checkpoint with "
                f"non-finite weights; {last_good(self.run_dir)} (a lower lr than {recipe.lr:g}"
                f"{'' if self.config.precision == 'fp32' else ' or fp32'} may avoid it)"
            )
        return loss

    def _accumulate(
        self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, phase: _Phase, share: float = 1.0
    ) -> torch.Tensor:
        """The batch in `micro_batches` gradient-accumulation slices; its mean loss (CPU, float32).

        `share` (this rank's samples × ranks / global batch; 1 when shares are equal) weights the
        gradient so that DDP's average over the ranks is the gradient of the global mean loss.
        """
        recipe = self.config.training
        n, micro_batches = labels.shape[0], self.micro_batches
        bounds = [round(i * n / micro_batches) for i in range(micro_batches + 1)]
        step_loss = torch.zeros(())
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
            if hi <= lo:
                continue
            micro = {k: v[lo:hi].to(self.device) for k, v in inputs.items()}
            last = i == micro_batches - 1 or hi == n
            with contextlib.nullcontext() if last else no_sync(self.model):
                loss = training_step(
                    self.model, self.optimizer, micro, labels[lo:hi].to(self.device),
                    precision=self.config.precision, scaler=self.scaler, grad_clip=recipe.grad_clip,
                    contrastive_weight=recipe.contrastive_weight, label_smoothing=recipe.label_smoothing,
                    loss_scale=(hi - lo) / n * share, step_optimizer=last,
                    on_phase=phase, forward_loss=self.forward_loss,
                )
            step_loss += loss.float().cpu() * (hi - lo) / n
        return step_loss

    def _back_off(self, step: int) -> None:
        """After out of memory in forward/backward: drop the partial gradients, double `grad_accum`
        (halving the micro-batch; the batch per optimizer step is unchanged), record it in run.json."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        batch_size = int(self.config.training.batch_size)
        micro = math.ceil(batch_size / self.micro_batches)
        if micro <= 1:
            raise RunStopped(
                f"CUDA out of memory at step {step} even with a micro-batch of 1; pick a smaller --size or "
                f"precision (see `mmkit memory-plan`); {last_good(self.run_dir)}"
            )
        doubled = min(self.micro_batches * 2, batch_size)
        training = self.config.training.model_copy(update={"grad_accum": doubled})
        self.config = self.config.model_copy(update={"training": training})
        self.config.save(self.run_dir)
        self.reporter.message(
            f"CUDA out of memory at step {step}: micro-batch {micro} → {math.ceil(batch_size / doubled)}, "
            f"grad_accum {self.micro_batches} → {doubled}; the batch per optimizer step stays {batch_size} "
            f"(run.json updated, resume keeps it)"
        )
        self.micro_batches = doubled

def restore_training_state(
    run_dir: Path, config: RunConfig, model: MultimodalModel, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, data_order: torch.Generator, reporter: Reporter,
    cuda_device: int | None = None,
) -> tuple[Path, TrainerState, dict[str, torch.Tensor]]:
    """Load the newest intact checkpoint into model, optimizer, scaler, every RNG and the data
    order; return it with its (validated) trainer state and its state tensors."""
    checkpoint_dir, (model_state, tensors, trainer_json) = load_latest_intact(run_dir, reporter)
    trainer = _trainer_state(trainer_json, checkpoint_dir)
    if trainer.model != config.model:
        raise MmkitError(
            f"checkpoint {checkpoint_dir} belongs to model {trainer.model!r}, but the run is {config.model!r}"
        )
    load_model_state(model, model_state, checkpoint_dir / "model.safetensors")
    load_optimizer_state(optimizer, tensors, trainer.optimizer, checkpoint_dir / "state.safetensors")
    required = [DATA_GENERATOR_KEY] + ([EPOCH_ORDER_KEY, "progress.epoch_loss_sum"] if trainer.batches_in_epoch else [])
    try:
        missing = [key for key in required if key not in tensors]
        if missing:
            raise KeyError(f"{', '.join(missing)} missing")
        if scaler is not None and trainer.scaler:
            scaler.load_state_dict(trainer.scaler)
        restore_rng_state(tensors, cuda_device=cuda_device)
        data_order.set_state(tensors[DATA_GENERATOR_KEY])
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{checkpoint_dir}: training state unusable ({error})") from None
    return checkpoint_dir, trainer, tensors


def load_latest_intact(run_dir: Path, reporter: Reporter) -> tuple[Path, tuple[Any, Any, dict[str, Any]]]:
    """The checkpoint `last` points to, or, when it is damaged, the newest intact one before it
    (with a warning naming the damaged one)."""
    first = resolve_checkpoint(run_dir, "last")  # falls back when the pointer or its target is gone
    try:
        pointed = read_pointer_record(run_dir, "last")["path"]
    except CheckpointError as exc:
        reporter.message(f"warning: {exc}; resuming from {first.name}")
    else:
        if pointed != first.name:
            reporter.message(f"warning: checkpoint {pointed} is damaged (missing, or no manifest.json); "
                             f"resuming from {first.name}")
    candidates = [first] + [p for p in reversed(list_checkpoints(run_dir)) if p != first and p.name < first.name]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            reporter.message(f"warning: checkpoint {path.name} is damaged ({exc}); trying an earlier one")
    raise MmkitError(f"no intact checkpoint in {run_dir / 'checkpoints'}; tried {', '.join(p.name for p in candidates)}")


def _pointer_name(run_dir: Path, name: str) -> str | None:
    try:
        return read_pointer(run_dir, name).name
    except MmkitError:
        return None


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
