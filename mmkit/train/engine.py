"""The machinery every training recipe (plain, continual) runs on.

- `StepRunner`: one optimizer step over a batch, with the safety rules of every run (out-of-memory
  back-off, a non-finite loss stops the run);
- `Engine`: an epoch's steps as a recipe lays them out (`EpochPlan`), with the learning rate of
  each step, the progress reports, the stop request after each step (SIGINT/SIGTERM on any rank:
  checkpoint, then `TrainingInterrupted`), a checkpoint every `checkpoint_every_steps` steps
  inside an epoch, and at an epoch's end the history record and a checkpoint every
  `checkpoint_every` epochs, at the run's last epoch and at a new best;
- the set-up both recipes share: seeding, the model, the training subset, the run directory.

A recipe decides what an epoch trains on and what it measures at its end; the engine owns the
`RunState` (mmkit.train.state) and everything that makes a stopped run resume exactly.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkit.data.datasets import Dataset, stratified_subset
from mmkit.errors import RunStopped
from mmkit.models.registry import MultimodalModel, build_model
from mmkit.train.checkpoint import checkpoints_dir, last_good, step_dir_name, stop_on_write_failure, write_pointer
from mmkit.train.compile import compile_model
from mmkit.train.config import RunConfig
from mmkit.train.distributed import SINGLE, World, no_sync
from mmkit.train.metrics import ClassificationMetrics
from mmkit.train.report import Reporter, StepRecord
from mmkit.train.rundir import HISTORY_FILE, RUN_FILE, read_history, write_history
from mmkit.train.signals import StopRequest, TrainingInterrupted
from mmkit.train.state import (
    RecipeState,
    Restored,
    RunState,
    Trainables,
    restore_run_checkpoint,
    save_run_checkpoint,
)
from mmkit.train.step import ForwardLoss, training_step

OutOfMemoryError = torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError on torch >= 2.5

Batch = tuple[Mapping[str, torch.Tensor], torch.Tensor, int]  # inputs, labels (this rank's share), global batch size


@dataclass(frozen=True)
class TrainOutcome:
    run_dir: Path
    epochs_done: int
    finished: bool  # False when stopped early by `stop_after_epochs`
    test: ClassificationMetrics | None


# --------------------------------------------------------------------------------------------------
# Set-up shared by the recipes


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from: Python's, torch's, and NumPy's global one (a model's
    own code may draw from it: wav2vec2's SpecAugment masks)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed is 32 bits; mmkit's seeds go up to 2**63 - 1
    torch.manual_seed(seed)


def build_training_model(
    config: RunConfig, device: torch.device, reporter: Reporter, world: World = SINGLE, *, fresh: bool = True,
) -> MultimodalModel:
    """The run's model on `device` (seed first): a `fresh` run's starting weights loaded (`train
    --weights`; a resume's come from its checkpoint), SyncBatchNorm across CUDA ranks, compiled in
    place with `compile` (or a warning and eager mode where torch.compile cannot run)."""
    model = build_model(config.entry, config.model_config_object())
    if fresh and config.weights:
        from mmkit.models.weights import load_weights

        plan = load_weights(model, config.weights["path"])
        if world.is_main:
            reporter.message(plan.describe())
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


def prepare_run_dir(run_dir: Path, config: RunConfig, world: World = SINGLE) -> None:
    """Create the run directory and write run.json (rank 0)."""
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir)


def save_history(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite history.jsonl; a failed write stops the run naming the last intact checkpoint."""
    with stop_on_write_failure(run_dir, str(run_dir / HISTORY_FILE)):
        write_history(run_dir, records)


# --------------------------------------------------------------------------------------------------
# One optimizer step


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
            lower = f"{self.config.training.lr / 10:g}"
            fp32 = "" if self.config.precision == "fp32" else " (or a new run in fp32)"
            raise RunStopped(
                f"loss is {loss.item()} at {where}, step {step}; stopped before any checkpoint with "
                f"non-finite weights; {last_good(self.run_dir)}; a lower lr may avoid it: "
                f"`mmkit resume {self.run_dir} --set lr={lower}`{fp32}"
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


# --------------------------------------------------------------------------------------------------
# The epoch loop


@dataclass(frozen=True)
class EpochPlan:
    """One epoch as a recipe lays it out; the engine runs its steps."""

    epoch: int  # 0-based index in the run
    epochs: int  # epochs in the whole run, for the progress display
    steps: int  # optimizer steps in the epoch
    batches: Callable[[int], Iterable[Batch]]  # the epoch's batches after the first `skip` ones
    learning_rate: Callable[[int], float]  # the lr of the step with this 0-based global index
    where: str  # names the epoch in messages: "epoch 3", "task 2, epoch 1"


@dataclass(frozen=True)
class EpochTotals:
    """What an epoch's steps add up to, for its history record."""

    train_loss: float  # mean over the epoch's samples
    samples: int
    seconds: float  # this process's time in the epoch's steps
    lr: float  # the last step's
    grad_accum: int  # micro-batches per step at the end of the epoch


class Engine:
    """Runs a recipe's epochs (module docstring); `state` is the run's `RunState`.

    `wrap`: what trains in place of the model (DistributedDataParallel), applied after a resume has
    loaded the weights; checkpoints hold the unwrapped model. `recipe`: the recipe's own state,
    saved in every checkpoint. `cuda_device`: a data-parallel process's GPU (its RNG is saved).
    """

    def __init__(
        self, run_dir: Path, config: RunConfig, trainables: Trainables, device: torch.device, reporter: Reporter,
        stop: StopRequest, *, world: World = SINGLE, recipe: RecipeState | None = None,
        forward_loss: ForwardLoss | None = None, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        cuda_device: int | None = None,
    ) -> None:
        self.run_dir, self.trainables, self.device, self.reporter = run_dir, trainables, device, reporter
        self.stop, self.world, self.recipe, self.cuda_device = stop, world, recipe, cuda_device
        self._config, self._forward_loss, self._wrap = config, forward_loss, wrap
        self.state = RunState.fresh(config.training.seed)
        self.history: list[dict[str, Any]] = []
        self.runner: StepRunner | None = None
        self.after_step: Callable[[float], None] | None = None  # told each step's seconds

    @property
    def config(self) -> RunConfig:
        """The run's config; `grad_accum` grows when out of memory halves the micro-batch."""
        return self.runner.config if self.runner is not None else self._config

    def start(self, resume: bool) -> Restored | None:
        """Start the run, or with `resume` continue it from its newest intact checkpoint (history
        cut back to the checkpoint's epochs); returns that checkpoint."""
        restored = None
        history = self.run_dir / HISTORY_FILE
        if resume:
            restored = restore_run_checkpoint(self.run_dir, self._config.model, self.trainables, recipe=self.recipe,
                                              warn=self.reporter.message, cuda_device=self.cuda_device)
            self.state = restored.state
            if self.world.is_main:
                self._check_run_json(restored)
                self.history = [r for r in read_history(self.run_dir) if r["epoch"] <= self.state.epoch]
                save_history(self.run_dir, self.history)  # drop epochs logged after the checkpoint
        elif self.world.is_main and history.exists():
            history.unlink()
        if self.world.is_main:
            self._record_overrides()
        self.world.barrier()  # no rank starts before rank 0 has set the run directory up
        trained = self._wrap(self.trainables.model) if self._wrap is not None else self.trainables.model
        self.runner = StepRunner(self.run_dir, self._config, trained, self.trainables.optimizer,
                                 self.trainables.scaler, self.device, self.reporter, self._forward_loss, self.world)
        return restored

    def _check_run_json(self, restored: Restored) -> None:
        """One warning when run.json, as this process read it (before it wrote anything), is not
        the file the checkpoint was trained with: edited since (checkpoints written before mmkit
        stored the hash are not checked)."""
        stored, read = restored.trainer.run_json_sha256, self._config.source_sha256
        if stored is not None and read is not None and stored != read:
            self.reporter.message(
                f"warning: {self.run_dir / RUN_FILE} changed since checkpoint {restored.checkpoint.name} was written "
                f"(its sha256 differs from the one the checkpoint stores); resuming with the settings it holds now"
            )

    def _record_overrides(self) -> None:
        """The settings this resume changed (`resume --set`): one warning each, and run.json records
        them with the step training goes on from."""
        pending = self._config.pending_overrides()
        if not pending:
            return
        step = self.state.global_step
        stamped = [o.model_copy(update={"at_step": step}) if o.at_step is None else o
                   for o in self._config.resume_overrides]
        self._config = self._config.model_copy(update={"resume_overrides": stamped})
        with stop_on_write_failure(self.run_dir, str(self.run_dir / RUN_FILE)):
            self._config.save(self.run_dir)
        for override in pending:
            self.reporter.message(f"warning: {override.key} {override.old} → {override.new} from step {step} on "
                                  f"(resume --set; recorded in {self.run_dir / RUN_FILE})")

    def train_epoch(self, plan: EpochPlan) -> EpochTotals:
        """Run the steps of `plan`'s epoch (the rest of it, in a resumed epoch)."""
        done = self.state.begin_epoch(plan.epoch)
        self.reporter.epoch_start(plan.epoch + 1, plan.epochs, plan.steps, done=done)
        started, seen_before = time.perf_counter(), self.state.epoch_samples_seen
        for inputs, labels, total in plan.batches(done):
            loss, lr = self._step(plan, inputs, labels, total)
            rate = (self.state.epoch_samples_seen - seen_before) / max(time.perf_counter() - started, 1e-9)
            self.reporter.step(StepRecord(self.state.global_step, plan.epoch + 1, loss, lr, rate))
            if self.after_step is not None:
                self.after_step(self.stop.typical_step_seconds or 0.0)
            self._checkpoint_if_due(plan)
        assert self.runner is not None
        return EpochTotals(
            train_loss=self.state.epoch_train_loss(), samples=self.state.epoch_samples_seen,
            seconds=time.perf_counter() - started, lr=plan.learning_rate(self.state.global_step - 1),
            grad_accum=self.runner.micro_batches,
        )

    def _step(
        self, plan: EpochPlan, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, total: int
    ) -> tuple[float, float]:
        """One optimizer step at the schedule's learning rate, counted in the state; its loss and lr."""
        assert self.runner is not None, "Engine.start first"
        step = self.state.global_step
        lr = plan.learning_rate(step)
        for group in self.trainables.optimizer.param_groups:
            group["lr"] = lr
        self.stop.step_begins(step + 1)
        loss = self.runner.step(inputs, labels, step + 1, plan.where, batch_total=total)
        loss_value = loss.item()  # waits for the device: the step is done
        self.stop.step_ends(time.monotonic() - self.stop.step_started)
        self.state.record_step(total, loss)
        return loss_value, lr

    def _checkpoint_if_due(self, plan: EpochPlan) -> None:
        """After a step: on a stop request (any rank's), checkpoint and raise `TrainingInterrupted`;
        every `checkpoint_every_steps` steps, checkpoint inside the epoch (its end has its own)."""
        signum = self.world.max(self.stop.signal or 0)  # a signal on any rank stops every rank after this step
        every = self.config.training.checkpoint_every_steps
        periodic = every and self.state.global_step % every == 0 and self.state.batches_in_epoch < plan.steps
        if not (signum or periodic):
            return
        path = self.save(protect_best=True)
        if signum:
            raise TrainingInterrupted(signum, path, plan.epoch + 1, self.state.global_step)

    def end_epoch(
        self, record: dict[str, Any], *, last: bool, best: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> Path | None:
        """Log the finished epoch's `record` and checkpoint it when due: every `checkpoint_every`
        epochs, at `last` (the run's last epoch, or where it stops) and at a new best (`best`: the
        extra fields of best.json, which then points to it). History is written first: resume
        cuts back what the checkpoint lacks. Returns the checkpoint written, if any."""
        self.state.end_epoch()
        self.history.append(record)
        if self.world.is_main:
            save_history(self.run_dir, self.history)
        # before the checkpoint: the loggers' points of this epoch are on disk once it is complete
        self.reporter.epoch_end(record)
        path = None
        if self.state.epoch % self.config.training.checkpoint_every == 0 or last or best is not None:
            path = self.save(protect_best=best is None, fields=fields)
            if best is not None and self.world.is_main:
                with stop_on_write_failure(self.run_dir, str(checkpoints_dir(self.run_dir) / "best.json")):
                    write_pointer(self.run_dir, "best", path,
                                  {"epoch": self.state.epoch, "step": self.state.global_step, **best})
        return path

    def save(self, *, protect_best: bool, fields: dict[str, Any] | None = None) -> Path:
        """Checkpoint the run as it stands; rank 0 writes, the others wait until it is complete."""
        path = checkpoints_dir(self.run_dir) / step_dir_name(self.state.global_step)
        # FSDP: every rank takes part in gathering the full state to rank 0
        states = self.trainables.full_states() if self.world.is_main or self.trainables.sharded else None
        if self.world.is_main:
            config = self.config
            path = save_run_checkpoint(
                self.run_dir, {"model": config.model, "size": config.size}, self.trainables, self.state,
                recipe=self.recipe, fields=fields, keep_last=config.training.keep_last, protect_best=protect_best,
                world_size=self.world.size, cuda_device=self.cuda_device, states=states,
            )
        self.world.barrier()
        self.stop.last_checkpoint = path.name
        self.reporter.checkpoint_saved(self.state.global_step)
        return path
