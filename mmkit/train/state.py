"""The state a run carries from one optimizer step to the next, and its checkpoint.

`RunState` holds the counters and random streams every recipe has: the epoch and the optimizer
step, the position inside an interrupted epoch (batches trained, samples seen, the loss summed so
far, the data order the epoch was drawn from), the best validation UAR and its epoch, and the
data-order generator. A recipe with more state (continual learning: the replay buffer, its
generator and the accuracy matrix) adds it as a `RecipeState`. Everything else a checkpoint
needs is live training objects: the model, the optimizer, the GradScaler and the global RNGs,
saved and loaded here alongside. (A micro-batch back-off after out of memory lives in run.json,
which `resume` reads first.)

On disk (the format `resume` has always read; mmkit.train.checkpoint has the layout):

    trainer_state.json  model, size, epoch, global_step, best_uar, best_epoch, world_size,
                        run_json_sha256 (of run.json's bytes when the checkpoint was written),
                        optimizer/scaler metadata; batches_in_epoch and epoch_samples_seen in a
                        mid-epoch checkpoint; the recipe's fields ("matrix", "val", ...)
    state.safetensors   optimizer tensors, rng.* (global RNGs), rng.data_order; rng.epoch_order
                        and progress.epoch_loss_sum in a mid-epoch checkpoint; the recipe's tensors
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError
from torch import Tensor

from mmkit.errors import MmkitError, RunStopped, validation_message
from mmkit.train.checkpoint import (
    CheckpointError,
    checkpoints_dir,
    last_good,
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
    stop_on_write_failure,
    write_pointer,
)
from mmkit.train.rundir import run_json_sha256
from mmkit.train.sharding import full_model_state, full_optimizer_state, is_sharded

DATA_GENERATOR_KEY = "rng.data_order"
EPOCH_ORDER_KEY = "rng.epoch_order"  # data-order state at the start of an interrupted epoch
EPOCH_LOSS_KEY = "progress.epoch_loss_sum"  # the interrupted epoch's loss, summed over its samples


class TrainerState(BaseModel):
    """What `resume` reads from trainer_state.json, checked before any of it is used."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    epoch: NonNegativeInt  # epochs completed; in a mid-epoch checkpoint, the epoch in progress (0-based)
    global_step: NonNegativeInt
    best_uar: float
    best_epoch: NonNegativeInt | None
    batches_in_epoch: NonNegativeInt = 0  # > 0: a mid-epoch checkpoint
    epoch_samples_seen: NonNegativeInt = 0
    world_size: PositiveInt = 1  # processes that wrote it
    run_json_sha256: str | None = None  # run.json's when it was written (None: written before mmkit stored it)
    optimizer: dict[str, Any]
    scaler: dict[str, float | int] | None = None


def read_trainer_state(document: dict[str, Any], checkpoint_dir: Path) -> TrainerState:
    """`document` validated as a `TrainerState`; the first problem names the file and the field."""
    try:
        return TrainerState.model_validate(document)
    except ValidationError as exc:
        raise CheckpointError(validation_message(checkpoint_dir / "trainer_state.json", exc)) from None


class RecipeState(Protocol):
    """What a recipe adds to the run state, saved in the same checkpoint."""

    def checkpoint_fields(self) -> dict[str, Any]:
        """JSON-able fields for trainer_state.json."""
        ...

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Tensors for state.safetensors (keys distinct from `RunState`'s)."""
        ...

    def restore(self, trainer: TrainerState, tensors: Mapping[str, Tensor], checkpoint_dir: Path) -> None:
        """Take the state back from a checkpoint; `CheckpointError` when it is unusable."""
        ...


@dataclass
class RunState:
    """The counters and random streams of a run (module docstring); `epoch` is 0-based."""

    data_order: torch.Generator
    epoch: int = 0  # epochs completed; during an epoch, the one in progress
    global_step: int = 0
    batches_in_epoch: int = 0  # optimizer steps done in the epoch in progress
    epoch_samples_seen: int = 0
    epoch_loss_sum: Tensor = field(default_factory=lambda: torch.zeros(()))
    epoch_order: Tensor | None = None  # data-order state the epoch in progress was drawn from
    best_uar: float = -1.0
    best_epoch: int | None = None  # 1-based, as history.jsonl counts epochs

    @classmethod
    def fresh(cls, seed: int) -> RunState:
        """The state before the first step of a run seeded with `seed`."""
        return cls(data_order=torch.Generator().manual_seed(seed))

    @property
    def mid_epoch(self) -> bool:
        return self.batches_in_epoch > 0

    def begin_epoch(self, epoch: int) -> int:
        """Enter `epoch`; return the batches of it already trained (an interrupted epoch resumes).

        A new epoch remembers the data-order state its order is drawn from; a resumed one puts
        the generator back to that state, so the epoch's order is drawn again, the same.
        """
        if self.mid_epoch:
            assert self.epoch == epoch and self.epoch_order is not None
            self.data_order.set_state(self.epoch_order)
            return self.batches_in_epoch
        self.epoch, self.epoch_order = epoch, self.data_order.get_state()
        self.epoch_samples_seen, self.epoch_loss_sum = 0, torch.zeros(())
        return 0

    def record_step(self, samples: int, loss: Tensor) -> None:
        """One optimizer step over `samples` samples with mean loss `loss` is done."""
        self.global_step += 1
        self.batches_in_epoch += 1
        self.epoch_samples_seen += samples
        self.epoch_loss_sum += loss * samples

    def epoch_train_loss(self) -> float:
        """The mean training loss over the epoch's samples so far."""
        return (self.epoch_loss_sum / max(self.epoch_samples_seen, 1)).item()

    def end_epoch(self) -> None:
        """The epoch in progress is complete."""
        self.epoch += 1
        self.batches_in_epoch, self.epoch_order = 0, None

    def improves(self, uar: float, epoch: int) -> bool:
        """Whether `uar` of `epoch` (1-based) beats the best so far; then it becomes the best."""
        if uar <= self.best_uar:
            return False
        self.best_uar, self.best_epoch = uar, epoch
        return True

    def checkpoint_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"epoch": self.epoch, "best_uar": self.best_uar, "best_epoch": self.best_epoch}
        if self.mid_epoch:
            fields |= {"batches_in_epoch": self.batches_in_epoch, "epoch_samples_seen": self.epoch_samples_seen}
        return fields

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        tensors = {DATA_GENERATOR_KEY: self.data_order.get_state()}
        if self.mid_epoch:
            assert self.epoch_order is not None
            tensors |= {EPOCH_ORDER_KEY: self.epoch_order, EPOCH_LOSS_KEY: self.epoch_loss_sum.clone()}
        return tensors

    @classmethod
    def from_checkpoint(cls, trainer: TrainerState, tensors: Mapping[str, Tensor]) -> RunState:
        """The state a checkpoint holds; `KeyError` / `RuntimeError` when its tensors are unusable."""
        required = [DATA_GENERATOR_KEY] + ([EPOCH_ORDER_KEY, EPOCH_LOSS_KEY] if trainer.batches_in_epoch else [])
        missing = [key for key in required if key not in tensors]
        if missing:
            raise KeyError(f"{', '.join(missing)} missing")
        data_order = torch.Generator()
        data_order.set_state(tensors[DATA_GENERATOR_KEY])
        state = cls(data_order, epoch=trainer.epoch, global_step=trainer.global_step,
                    best_uar=trainer.best_uar, best_epoch=trainer.best_epoch)
        if trainer.batches_in_epoch:
            state.batches_in_epoch, state.epoch_samples_seen = trainer.batches_in_epoch, trainer.epoch_samples_seen
            state.epoch_order = tensors[EPOCH_ORDER_KEY]
            state.epoch_loss_sum = tensors[EPOCH_LOSS_KEY].reshape(()).clone()
        return state


# --------------------------------------------------------------------------------------------------
# Saving and restoring, with the live training objects


@dataclass(frozen=True)
class Trainables:
    """The live objects a checkpoint saves besides the run state."""

    model: torch.nn.Module  # unwrapped (or sharded in place): checkpoints hold the plain model's state_dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None

    @property
    def sharded(self) -> bool:
        """FSDP: the full state must be gathered, by every rank, before rank 0 writes it."""
        return is_sharded(self.model)

    def full_states(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The model's and the optimizer's unsharded state dicts (sharded: gathered to rank 0,
        empty on the other ranks; every rank must call it)."""
        if self.sharded:
            return full_model_state(self.model), full_optimizer_state(self.model, self.optimizer)
        return self.model.state_dict(), self.optimizer.state_dict()


def save_run_checkpoint(
    run_dir: Path, identity: Mapping[str, Any], trainables: Trainables, state: RunState, *,
    recipe: RecipeState | None = None, fields: Mapping[str, Any] | None = None, keep_last: int = 3,
    protect_best: bool = True, world_size: int = 1, cuda_device: int | None = None,
    states: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint of `state.global_step` and point `last` to it; return its path.

    `identity`: the run's model and size. `fields`: more trainer_state.json fields for this
    checkpoint only (the validation figures of an epoch's end). `protect_best`: keep the
    checkpoint `best` points to out of the rotation. `cuda_device`: a data-parallel process's GPU,
    the only one whose RNG state it saves. `states`: the model's and optimizer's full state dicts
    when already gathered (`Trainables.full_states`; default: gathered here).

    Never writes non-finite weights, and a failed write (e.g. a full disk) leaves the previous
    checkpoints and pointers as they were: the save is atomic and rotation runs only after it.
    """
    step = state.global_step
    model_state, optimizer_state = states if states is not None else trainables.full_states()
    bad = next((k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise RunStopped(f"weight {bad!r} is not finite at step {step}; no checkpoint written; {last_good(run_dir)}")
    tensors, optimizer_meta = optimizer_state_to_tensors(optimizer_state)
    tensors |= rng_state_to_tensors(cuda_device=cuda_device) | state.checkpoint_tensors()
    document = {**identity, "global_step": step, **state.checkpoint_fields(), **(fields or {}),
                "world_size": world_size, "run_json_sha256": run_json_sha256(run_dir)}
    if recipe is not None:
        tensors |= recipe.checkpoint_tensors()
        document |= recipe.checkpoint_fields()
    document |= {"optimizer": optimizer_meta,
                 "scaler": trainables.scaler.state_dict() if trainables.scaler is not None else None}
    best = pointer_target(run_dir, "best")
    with stop_on_write_failure(run_dir, f"the checkpoint of step {step}"):
        path = save_checkpoint(run_dir, step, model_state, tensors, document, keep_last=keep_last,
                               protect={best} if best and protect_best else set())
    with stop_on_write_failure(run_dir, str(checkpoints_dir(run_dir) / "last.json")):
        write_pointer(run_dir, "last", path, {"epoch": state.epoch, "step": step})
    return path


@dataclass(frozen=True)
class Restored:
    """A checkpoint `resume` continues from: where it is, what it says, the state it holds."""

    checkpoint: Path
    trainer: TrainerState
    state: RunState


def restore_run_checkpoint(
    run_dir: Path, model_name: str, trainables: Trainables, *, recipe: RecipeState | None = None,
    warn: Callable[[str], None], cuda_device: int | None = None,
) -> Restored:
    """Load the newest intact checkpoint into the model, optimizer, scaler, global RNGs and
    `recipe`; return it with its validated trainer state and its `RunState`."""
    checkpoint_dir, (model_state, tensors, trainer_json) = load_latest_intact(run_dir, warn)
    trainer = read_trainer_state(trainer_json, checkpoint_dir)
    if trainer.model != model_name:
        raise MmkitError(f"checkpoint {checkpoint_dir} belongs to model {trainer.model!r}, but the run is {model_name!r}")
    load_model_state(trainables.model, model_state, checkpoint_dir / "model.safetensors")
    load_optimizer_state(trainables.optimizer, tensors, trainer.optimizer, checkpoint_dir / "state.safetensors",
                         model=trainables.model)
    try:
        state = RunState.from_checkpoint(trainer, tensors)
        if trainables.scaler is not None and trainer.scaler:
            trainables.scaler.load_state_dict(trainer.scaler)
        restore_rng_state(tensors, cuda_device=cuda_device)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{checkpoint_dir}: training state unusable ({error})") from None
    if recipe is not None:
        recipe.restore(trainer, tensors, checkpoint_dir)
    return Restored(checkpoint_dir, trainer, state)


def load_latest_intact(run_dir: Path, warn: Callable[[str], None]) -> tuple[Path, tuple[Any, Any, dict[str, Any]]]:
    """The checkpoint `last` points to, or, when it is damaged, the newest intact one before it
    (with a warning naming the damaged one)."""
    first = resolve_checkpoint(run_dir, "last")  # falls back when the pointer or its target is gone
    try:
        pointed = read_pointer_record(run_dir, "last")["path"]
    except CheckpointError as exc:
        warn(f"warning: {exc}; resuming from {first.name}")
    else:
        if pointed != first.name:
            warn(f"warning: checkpoint {pointed} is damaged (missing, or no manifest.json); resuming from {first.name}")
    candidates = [first] + [p for p in reversed(list_checkpoints(run_dir)) if p != first and p.name < first.name]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            warn(f"warning: checkpoint {path.name} is damaged ({exc}); trying an earlier one")
    raise MmkitError(f"no intact checkpoint in {run_dir / 'checkpoints'}; tried {', '.join(p.name for p in candidates)}")


def pointer_target(run_dir: Path, name: str) -> str | None:
    """The checkpoint directory name `name` ("best", "last") points to, None when there is none."""
    try:
        return read_pointer(run_dir, name).name
    except MmkitError:
        return None
