"""Class-incremental continual learning for `clip` and `fusion` (the third seed), measured.

    classes ── seeded order ──→ tasks of `classes_per_task` classes (5 × 2 of the 10 fashion classes)
    for each task t:
        `epochs_per_task` epochs over task t's training samples; from the second task on, a batch
        of B holds B − m new samples and m = round(replay_ratio · B) drawn from the replay buffer
        after the last epoch: R[t][j] = test accuracy on task j's classes, for every j (all classes
        are predicted: no task label at test time); then t's classes enter the buffer

Loss: cross-entropy over all classes + `contrastive_weight` × an image-to-prompt contrastive term:
each image against the class prompts ("a photo of a {class}") of the classes in its batch, the
right one as target. One model and one optimizer run through the whole stream; the learning-rate
schedule restarts with each task (warmup then cosine over the task's steps).

Replay buffer: a class-balanced reservoir of dataset indices with room for `buffer_size` samples.
When a task ends, every class seen so far gets an equal share (the first classes one more when
it does not divide); a new class fills its share with a uniform random sample of its training
samples, an old class keeps a prefix of its (already random) members. Memory samples are drawn
without replacement from their own generator. The buffer and that generator are saved in every
checkpoint, so a resumed stream is bitwise identical to a straight one on the CPU.

Steps, stop requests and checkpoints are the shared engine's (mmkit.train.engine), as in plain
training: a checkpoint every `checkpoint_every` epochs and at the last one, every
`checkpoint_every_steps` steps inside an epoch, and on SIGINT/SIGTERM after the current step.

Text-embedding cache (`text_cache`, default on): the class prompts are encoded once per step for
the distinct classes in the batch instead of once per sample (the seed's way: 256 encodings for at
most 10 prompts), and kept across steps while the text encoder cannot change (frozen with
`freeze_text_encoder`, or under no_grad). The logits are the same either way (a test checks).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkit.data.datasets import Dataset, iterate_batches, num_batches
from mmkit.data.tokenizer import encode_batch
from mmkit.errors import MmkitError
from mmkit.models.registry import MultimodalModel
from mmkit.train.checkpoint import CheckpointError, checkpoints_dir, stop_on_write_failure, write_pointer
from mmkit.train.config import RunConfig
from mmkit.train.continual_metrics import ContinualMetrics, continual_metrics
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
from mmkit.train.evaluation import evaluate
from mmkit.train.metrics import ClassificationMetrics
from mmkit.train.report import Reporter
from mmkit.train.rundata import load_run_data
from mmkit.train.rundir import METRICS_FILE, read_history, write_metrics
from mmkit.train.schedule import learning_rate
from mmkit.train.signals import StopRequest
from mmkit.train.state import Restored, Trainables, TrainerState
from mmkit.train.step import build_grad_scaler, build_optimizer

REPLAY_INDICES_KEY = "replay.indices"  # int64 [n]: dataset indices held in memory
REPLAY_CLASSES_KEY = "replay.classes"  # int64 [k]: the classes seen, in arrival order
REPLAY_ORDER_KEY = "rng.replay_order"  # the generator memory batches are drawn from
PROMPT_TEMPLATE = "a photo of a {}"


# --------------------------------------------------------------------------------------------------
# The stream, the buffer, the prompts


def class_incremental_tasks(num_classes: int, classes_per_task: int, tasks: int, seed: int) -> list[list[int]]:
    """`tasks` disjoint groups of `classes_per_task` classes, in a seeded random class order."""
    if tasks * classes_per_task > num_classes:
        raise MmkitError(
            f"{tasks} tasks × {classes_per_task} classes need {tasks * classes_per_task} classes; "
            f"the data has {num_classes}"
        )
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[t * classes_per_task : (t + 1) * classes_per_task] for t in range(tasks)]


class ReplayBuffer:
    """Class-balanced reservoir of dataset indices (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.classes: list[int] = []  # arrival order
        self.members: dict[int, Tensor] = {}  # class → dataset indices, in random order

    def __len__(self) -> int:
        return sum(m.numel() for m in self.members.values())

    def add_classes(self, candidates: Mapping[int, Tensor], generator: torch.Generator) -> None:
        """Make room and take a uniform sample of each new class's `candidates` (dataset indices)."""
        self.classes += [c for c in candidates if c not in self.members]
        if self.capacity == 0:
            return
        base, extra = divmod(self.capacity, len(self.classes))
        for rank, label in enumerate(self.classes):
            share = base + (rank < extra)
            if label in candidates and label not in self.members:
                pool = candidates[label]
                self.members[label] = pool[torch.randperm(pool.numel(), generator=generator)[:share]]
            else:
                self.members[label] = self.members[label][:share]

    def sample(self, k: int, generator: torch.Generator) -> Tensor:
        """`k` dataset indices drawn without replacement (with replacement when k exceeds the buffer)."""
        pool = torch.cat([self.members[c] for c in self.classes if c in self.members])
        if k <= pool.numel():
            return pool[torch.randperm(pool.numel(), generator=generator)[:k]]
        return pool[torch.randint(pool.numel(), (k,), generator=generator)]

    def to_tensors(self) -> dict[str, Tensor]:
        counts = [self.members[c].numel() if c in self.members else 0 for c in self.classes]
        indices = [self.members[c] for c in self.classes if c in self.members]
        return {
            REPLAY_INDICES_KEY: torch.cat(indices) if indices else torch.empty(0, dtype=torch.int64),
            REPLAY_CLASSES_KEY: torch.tensor([self.classes, counts], dtype=torch.int64).reshape(2, -1),
        }

    @classmethod
    def from_tensors(cls, capacity: int, tensors: Mapping[str, Tensor], dataset_size: int) -> ReplayBuffer:
        buffer = cls(capacity)
        indices, table = tensors[REPLAY_INDICES_KEY].to(torch.int64), tensors[REPLAY_CLASSES_KEY].to(torch.int64)
        if table.dim() != 2 or table.shape[0] != 2 or int(table[1].sum()) != indices.numel():
            raise ValueError("replay buffer tensors do not agree")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dataset_size):
            raise ValueError("replay buffer indices outside the dataset")
        start = 0
        for label, count in table.t().tolist():
            buffer.classes.append(label)
            if count:
                buffer.members[label] = indices[start : start + count]
            start += count
        return buffer


class PromptEmbeddings:
    """Joint embeddings of the class prompts, computed for the classes a batch needs.

    `enabled=False` encodes one prompt per sample, as the seed did, and keeps the first of each
    class; the result is the same. `encoded` counts prompts run through the text encoder.
    """

    def __init__(self, prompt_tokens: Tensor, enabled: bool) -> None:
        self.tokens = prompt_tokens  # (num_classes, L)
        self.enabled = enabled
        self.encoded = 0
        self._kept: dict[int, Tensor] = {}

    def for_labels(self, model: MultimodalModel, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(prompt embeddings [U, E] of the U distinct labels, ascending; each sample's row in them [B])."""
        classes, targets = torch.unique(labels, sorted=True, return_inverse=True)
        if not self.enabled:
            per_sample = model.encode_text(self.tokens[labels])  # (B, E)
            self.encoded += labels.numel()
            first = torch.full((classes.numel(),), labels.numel(), dtype=torch.long, device=labels.device)
            first = first.scatter_reduce(0, targets, torch.arange(labels.numel(), device=labels.device), "amin")
            return per_sample[first], targets
        if not self._text_can_change(model):
            missing = [c for c in classes.tolist() if c not in self._kept]
            if missing:
                embeds = model.encode_text(self.tokens[missing])
                self._kept.update({c: e for c, e in zip(missing, embeds, strict=True)})
                self.encoded += len(missing)
            return torch.stack([self._kept[c] for c in classes.tolist()]), targets
        self._kept.clear()  # the text encoder is training: what was kept is stale after this step
        self.encoded += classes.numel()
        return model.encode_text(self.tokens[classes]), targets

    @staticmethod
    def _text_can_change(model: MultimodalModel) -> bool:
        if not torch.is_grad_enabled():
            return False
        text_params = itertools.chain(model.text_encoder.parameters(), model.projection.text.parameters())
        return any(p.requires_grad for p in text_params)


def continual_forward_loss(prompts: PromptEmbeddings, contrastive_weight: float, label_smoothing: float):
    """Cross-entropy + contrastive_weight × image-to-prompt cross-entropy (module docstring)."""

    def forward_loss(model: MultimodalModel, inputs: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        if contrastive_weight == 0:
            output = model(**inputs) if model.text_in_logits else model(image=inputs["image"])
            return F.cross_entropy(output.logits.float(), labels, label_smoothing=label_smoothing)
        prompt_embeds, targets = prompts.for_labels(model, labels)  # (U, E), (B,)
        if model.text_in_logits:  # fusion: the logits read the sample's own text
            output = model(**inputs)
        else:  # clip: the logits come from the image alone
            output = model(image=inputs["image"], text_embeds=prompt_embeds)
        contrastive = model.projection.contrastive_logits(output.image_embeds, prompt_embeds)  # (B, U)
        loss = F.cross_entropy(output.logits.float(), labels, label_smoothing=label_smoothing)
        return loss + contrastive_weight * F.cross_entropy(contrastive.float(), targets)

    return forward_loss


def prompt_tokens(classes: tuple[str, ...], context_length: int) -> Tensor:
    return encode_batch([PROMPT_TEMPLATE.format(name) for name in classes], context_length)


# --------------------------------------------------------------------------------------------------
# The run state continual learning adds, and the stream as epochs


@dataclass
class ContinualState:
    """Continual learning's part of the run state, saved in every checkpoint: the replay buffer,
    the generator memory samples are drawn from, and the rows of the accuracy matrix so far."""

    buffer: ReplayBuffer
    replay_order: torch.Generator
    dataset_size: int  # a restored buffer must index into the dataset
    matrix: list[list[float]] = field(default_factory=list)

    @classmethod
    def fresh(cls, capacity: int, seed: int, dataset_size: int) -> ContinualState:
        """An empty buffer; memory is drawn from a generator seeded `seed + 1` (the data order has `seed`)."""
        return cls(ReplayBuffer(capacity), torch.Generator().manual_seed(seed + 1), dataset_size)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"matrix": self.matrix}

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        return {**self.buffer.to_tensors(), REPLAY_ORDER_KEY: self.replay_order.get_state()}

    def restore(self, trainer: TrainerState, tensors: Mapping[str, Tensor], checkpoint_dir: Path) -> None:
        try:
            self.buffer = ReplayBuffer.from_tensors(self.buffer.capacity, tensors, self.dataset_size)
            self.replay_order.set_state(tensors[REPLAY_ORDER_KEY])
            self.matrix = [[float(a) for a in row] for row in (trainer.model_extra or {})["matrix"]]
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{checkpoint_dir}: continual state unusable ({error})") from None


@dataclass(frozen=True)
class TaskStream:
    """The class-incremental stream laid out as epochs: task t is epochs t·E … t·E + E − 1
    (E = `epochs_per_task`), over its classes' training samples, B − m new samples per batch from
    the second task on (m: the memory part of a batch)."""

    tasks: list[list[int]]  # the classes of each task
    train: list[Tensor]  # each task's training indices
    test: list[Tensor]  # each task's test indices
    batch_size: int
    memory_batch: int
    epochs_per_task: int

    @classmethod
    def build(cls, config: RunConfig, dataset: Dataset) -> TaskStream:
        recipe = config.training
        tasks = class_incremental_tasks(dataset.num_classes, recipe.classes_per_task, recipe.tasks, recipe.seed)
        train_idx, test_idx = train_indices(config, dataset), dataset.indices("test")

        def in_task(idx: Tensor, classes: list[int]) -> Tensor:
            return idx[torch.isin(dataset.labels[idx], torch.tensor(classes))]

        batch_size = int(recipe.batch_size)
        memory_batch = round(recipe.replay_ratio * batch_size) if recipe.buffer_size else 0
        return cls(tasks, [in_task(train_idx, c) for c in tasks], [in_task(test_idx, c) for c in tasks],
                   batch_size, min(memory_batch, batch_size - 1), recipe.epochs_per_task)  # ≥ 1 new sample a batch

    @property
    def epochs(self) -> int:
        return len(self.tasks) * self.epochs_per_task

    def new_per_batch(self, task: int) -> int:
        return self.batch_size - self.memory_batch if task > 0 else self.batch_size

    def steps_per_epoch(self, task: int) -> int:
        return num_batches(len(self.train[task]), self.new_per_batch(task))

    def first_step(self, task: int) -> int:
        """The 0-based global index of task `task`'s first step."""
        return sum(self.steps_per_epoch(t) for t in range(task)) * self.epochs_per_task

    def schedule(self, config: RunConfig, task: int) -> Callable[[int], float]:
        """The learning rate of each 0-based global step of `task`: the schedule restarts with each task."""
        recipe, first = config.training, self.first_step(task)
        task_steps = self.steps_per_epoch(task) * self.epochs_per_task

        def lr_at(step: int) -> float:
            return learning_rate(step - first, base_lr=recipe.lr, total_steps=task_steps,
                                 warmup_steps=round(recipe.warmup_fraction * task_steps), schedule=recipe.schedule,
                                 steps_per_epoch=self.steps_per_epoch(task), restart_epochs=recipe.restart_epochs)

        return lr_at


def replay_batches(
    dataset: Dataset, stream: TaskStream, task: int, memory: ContinualState, data_order: torch.Generator, skip: int,
) -> Iterator[Batch]:
    """Task `task`'s new samples from batch `skip` on, each batch completed from the replay buffer.
    Memory samples are drawn as a batch is taken, so skipped batches draw none."""
    new = iterate_batches(dataset, stream.train[task], stream.new_per_batch(task), shuffle=True, generator=data_order)
    for inputs, labels in itertools.islice(new, skip, None):
        if stream.memory_batch and len(memory.buffer):
            drawn = memory.buffer.sample(stream.memory_batch, memory.replay_order)
            inputs = {k: torch.cat([v, dataset.inputs[k].index_select(0, drawn)]) for k, v in inputs.items()}
            labels = torch.cat([labels, dataset.labels.index_select(0, drawn)])
        yield inputs, labels, labels.shape[0]


# --------------------------------------------------------------------------------------------------
# The run


def train_continual(
    run_dir: Path, config: RunConfig, resume: bool, stop_after_epochs: int | None, reporter: Reporter,
    dataset: Dataset | None, stop: StopRequest,
) -> TrainOutcome:
    """Train `config`'s model through the task stream; `resume` continues from the last checkpoint."""
    recipe = config.training
    device = torch.device(config.device)
    dataset = dataset or load_run_data(config, check_nonfinite=False)[0]  # checked when the run was made
    prepare_run_dir(run_dir, config)
    stream = TaskStream.build(config, dataset)

    seed_everything(recipe.seed)
    model = build_image_text_model(config, device, reporter, fresh=not resume)
    optimizer = build_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    scaler = build_grad_scaler(config.precision, device.type)
    memory = ContinualState.fresh(recipe.buffer_size, recipe.seed, len(dataset))
    prompts = PromptEmbeddings(prompt_tokens(dataset.classes, model.config.context_length).to(device), recipe.text_cache)
    engine = Engine(run_dir, config, Trainables(model, optimizer, scaler), device, reporter, stop, recipe=memory,
                    forward_loss=continual_forward_loss(prompts, recipe.contrastive_weight, recipe.label_smoothing))
    restored = engine.start(resume)

    last_epoch = stream.epochs if stop_after_epochs is None else min(stream.epochs, stop_after_epochs)
    reporter.start(engine.config, _resumed_from(restored, stream) if restored else None, engine.state.global_step)
    model.train()
    path = None
    for epoch in range(engine.state.epoch, last_epoch):
        task, epoch_in_task = divmod(epoch, stream.epochs_per_task)
        plan = EpochPlan(
            epoch, stream.epochs, stream.steps_per_epoch(task),
            lambda skip, task=task: replay_batches(dataset, stream, task, memory, engine.state.data_order, skip),
            stream.schedule(config, task), f"task {task + 1}, epoch {epoch_in_task + 1}",
        )
        totals = engine.train_epoch(plan)
        record: dict[str, Any] = {
            "epoch": epoch + 1, "task": task + 1, "step": engine.state.global_step, "train_loss": totals.train_loss,
            "lr": totals.lr, "grad_accum": totals.grad_accum, "epoch_time": totals.seconds,
            "replay_samples": len(memory.buffer), "samples_per_s": totals.samples / max(totals.seconds, 1e-9),
        }
        if epoch_in_task == stream.epochs_per_task - 1:  # end of the task: a row of R, then the task enters memory
            record["accuracies"] = end_task(model, dataset, stream, task, memory, config, device)
        path = engine.end_epoch(record, last=epoch + 1 == last_epoch)

    finished = last_epoch >= stream.epochs
    test = None
    if finished and path is not None:
        test = final_test(run_dir, config, model, dataset, stream, memory, prompts, path, engine.state.global_step)
    reporter.end(test)
    return TrainOutcome(run_dir, last_epoch, finished, test)


def build_image_text_model(config: RunConfig, device: torch.device, reporter: Reporter, *,
                           fresh: bool = True) -> MultimodalModel:
    """The run's model, which must have a text tower; frozen there with `freeze_text_encoder`."""
    model = build_training_model(config, device, reporter, fresh=fresh)
    if not hasattr(model, "encode_text"):
        raise MmkitError(f"continual training needs an image-text model (clip, fusion); {config.model!r} is not one")
    if config.training.freeze_text_encoder:
        for p in itertools.chain(model.text_encoder.parameters(), model.projection.text.parameters()):
            p.requires_grad_(False)
    return model


def end_task(
    model: MultimodalModel, dataset: Dataset, stream: TaskStream, task: int, memory: ContinualState,
    config: RunConfig, device: torch.device,
) -> list[float]:
    """At a task's end: its row of R (test accuracy on every task's classes), then its classes
    enter the replay buffer. Returns the row."""
    row = [evaluate(model, dataset, idx, batch_size=config.training.eval_batch_size, precision=config.precision,
                    device=device).accuracy for idx in stream.test]
    memory.matrix.append(row)
    learned = stream.train[task]
    memory.buffer.add_classes({c: learned[dataset.labels[learned] == c] for c in stream.tasks[task]},
                              memory.replay_order)
    return row


def final_test(
    run_dir: Path, config: RunConfig, model: MultimodalModel, dataset: Dataset, stream: TaskStream,
    memory: ContinualState, prompts: PromptEmbeddings, last: Path, step: int,
) -> ClassificationMetrics:
    """The last checkpoint is the result (no selection): `best` points to it; test it on every
    class and write metrics.json with the accuracy matrix and its figures."""
    with stop_on_write_failure(run_dir, str(checkpoints_dir(run_dir) / "best.json")):
        write_pointer(run_dir, "best", last, {"epoch": stream.epochs, "step": step})
    test = evaluate(model, dataset, dataset.indices("test"), batch_size=config.training.eval_batch_size,
                    precision=config.precision, device=torch.device(config.device))
    figures = continual_metrics(memory.matrix)
    with stop_on_write_failure(run_dir, str(run_dir / METRICS_FILE)):
        write_metrics(run_dir, test.as_dict("test") | {
            "checkpoint": last.name, "epoch": stream.epochs, "tasks": stream.tasks, "continual": figures.as_dict(),
            "prompts_encoded": prompts.encoded,
        })
    return test


def _resumed_from(restored: Restored, stream: TaskStream) -> str:
    """`step-00000024 (task 3, epoch 5)`, with `, after step 3 of 8` inside an epoch."""
    state = restored.state
    task = state.epoch // stream.epochs_per_task
    inside = f", after step {state.batches_in_epoch} of {stream.steps_per_epoch(task)}" if state.mid_epoch else ""
    return f"{restored.checkpoint.name} (task {task + 1}, epoch {state.epoch + 1}{inside})"


def read_continual_metrics(run_dir: Path) -> ContinualMetrics | None:
    """The accuracy matrix and its figures from a finished continual run's history, else None."""
    rows = [r["accuracies"] for r in read_history(run_dir) if "accuracies" in r]
    return continual_metrics(rows) if rows and len(rows) == len(rows[0]) else None
