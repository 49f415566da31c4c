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

Text-embedding cache (`text_cache`, default on): the class prompts are encoded once per step for
the distinct classes in the batch instead of once per sample (the seed's way: 256 encodings for at
most 10 prompts), and kept across steps while the text encoder cannot change (frozen with
`freeze_text_encoder`, or under no_grad). The logits are the same either way (a test checks).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
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
from mmkit.train.loop import (
    EPOCH_ORDER_KEY,
    Reporter,
    StepRunner,
    TrainingInterrupted,
    TrainOutcome,
    _save_training_checkpoint,
    _write_history,
    build_training_model,
    evaluate,
    restore_training_state,
    seed_everything,
    train_indices,
)
from mmkit.train.rundata import load_run_data
from mmkit.train.rundir import HISTORY_FILE, METRICS_FILE, read_history, write_metrics
from mmkit.train.schedule import learning_rate
from mmkit.train.signals import StopRequest
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
# The loop


def train_continual(
    run_dir: Path, config: RunConfig, resume: bool, stop_after_epochs: int | None, reporter: Reporter,
    dataset: Dataset | None, stop: StopRequest,
) -> TrainOutcome:
    """Train `config`'s model through the task stream; `resume` continues from the last checkpoint."""
    recipe = config.training
    device = torch.device(config.device)
    dataset = dataset or load_run_data(config, check_nonfinite=False)[0]  # checked when the run was made
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir)

    tasks = class_incremental_tasks(dataset.num_classes, recipe.classes_per_task, recipe.tasks, recipe.seed)
    train_idx, test_idx = train_indices(config, dataset), dataset.indices("test")
    in_task = lambda idx, classes: idx[torch.isin(dataset.labels[idx], torch.tensor(classes))]  # noqa: E731
    task_train = [in_task(train_idx, classes) for classes in tasks]
    task_test = [in_task(test_idx, classes) for classes in tasks]
    batch_size, per_task = int(recipe.batch_size), recipe.epochs_per_task
    memory_batch = round(recipe.replay_ratio * batch_size) if recipe.buffer_size else 0
    memory_batch = min(memory_batch, batch_size - 1)  # at least one new sample per batch

    def new_per_batch(task: int) -> int:
        return batch_size - memory_batch if task > 0 else batch_size

    steps_per_epoch = [num_batches(len(task_train[t]), new_per_batch(t)) for t in range(len(tasks))]
    task_first_step = [sum(steps_per_epoch[:t]) * per_task for t in range(len(tasks))]

    seed_everything(recipe.seed)
    model = build_training_model(config, device, reporter)
    if not hasattr(model, "encode_text"):
        raise MmkitError(f"continual training needs an image-text model (clip, fusion); {config.model!r} is not one")
    if recipe.freeze_text_encoder:
        for p in itertools.chain(model.text_encoder.parameters(), model.projection.text.parameters()):
            p.requires_grad_(False)
    optimizer = build_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    scaler = build_grad_scaler(config.precision, device.type)
    data_order = torch.Generator().manual_seed(recipe.seed)
    replay_order = torch.Generator().manual_seed(recipe.seed + 1)
    buffer = ReplayBuffer(recipe.buffer_size)
    prompts = PromptEmbeddings(prompt_tokens(dataset.classes, model.config.context_length).to(device), recipe.text_cache)
    runner = StepRunner(run_dir, config, model, optimizer, scaler, device, reporter,
                        continual_forward_loss(prompts, recipe.contrastive_weight, recipe.label_smoothing))
    start_epoch, global_step, matrix = 0, 0, []
    history: list[dict[str, Any]] = []

    resumed_from, resume_batches, resume_partial = None, 0, (torch.zeros(()), 0)
    if resume:
        checkpoint_dir, trainer, tensors = restore_training_state(
            run_dir, config, model, optimizer, scaler, data_order, reporter
        )
        try:
            buffer = ReplayBuffer.from_tensors(recipe.buffer_size, tensors, len(dataset))
            replay_order.set_state(tensors[REPLAY_ORDER_KEY])
            matrix = [[float(a) for a in row] for row in (trainer.model_extra or {})["matrix"]]
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{checkpoint_dir}: continual state unusable ({error})") from None
        start_epoch, global_step, resume_batches = trainer.epoch, trainer.global_step, trainer.batches_in_epoch
        if resume_batches:
            data_order.set_state(tensors[EPOCH_ORDER_KEY])
            resume_partial = (tensors["progress.epoch_loss_sum"].reshape(()), trainer.epoch_samples_seen)
        history = [r for r in read_history(run_dir) if r["epoch"] <= start_epoch]
        _write_history(run_dir, history)
        resumed_from = f"{checkpoint_dir.name} (task {start_epoch // per_task + 1}, epoch {start_epoch + 1})"
    elif (run_dir / HISTORY_FILE).exists():
        (run_dir / HISTORY_FILE).unlink()

    def save(state: dict[str, Any], extra: dict[str, Tensor]) -> Path:
        tensors = {**buffer.to_tensors(), REPLAY_ORDER_KEY: replay_order.get_state(), **extra}
        path = _save_training_checkpoint(
            run_dir, runner.config, model, optimizer, scaler, data_order, global_step,
            {"best_uar": -1.0, "best_epoch": None, "matrix": matrix, **state}, tensors, protect_best=False,
        )
        stop.last_checkpoint = path.name
        return path

    total_epochs = len(tasks) * per_task
    last_epoch = total_epochs if stop_after_epochs is None else min(total_epochs, stop_after_epochs)
    reporter.start(runner.config, resumed_from)
    model.train()
    path = None
    for epoch in range(start_epoch, last_epoch):
        task, epoch_in_task = divmod(epoch, per_task)
        task_steps = steps_per_epoch[task] * per_task
        reporter.epoch_start(epoch + 1, total_epochs, steps_per_epoch[task])
        epoch_order = data_order.get_state()
        epoch_start, seen, loss_sum = time.perf_counter(), 0, torch.zeros(())
        batches = iterate_batches(dataset, task_train[task], new_per_batch(task), shuffle=True, generator=data_order)
        if resume_batches:
            batches = itertools.islice(batches, resume_batches, None)
            loss_sum, seen = resume_partial[0].clone(), resume_partial[1]
        batches_done, resume_batches = resume_batches, 0
        lr = recipe.lr
        for inputs, labels in batches:
            lr = learning_rate(
                global_step - task_first_step[task], base_lr=recipe.lr, total_steps=task_steps,
                warmup_steps=round(recipe.warmup_fraction * task_steps), schedule=recipe.schedule,
                steps_per_epoch=steps_per_epoch[task], restart_epochs=recipe.restart_epochs,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            if memory_batch and len(buffer):  # replay: the rest of the batch from memory
                memory = buffer.sample(memory_batch, replay_order)
                inputs = {k: torch.cat([v, dataset.inputs[k].index_select(0, memory)]) for k, v in inputs.items()}
                labels = torch.cat([labels, dataset.labels.index_select(0, memory)])
            stop.step_begins(global_step + 1)
            step_loss = runner.step(inputs, labels, global_step + 1, f"task {task + 1}, epoch {epoch_in_task + 1}")
            stop.step_ends(time.monotonic() - stop.step_started)
            global_step, batches_done = global_step + 1, batches_done + 1
            seen += labels.shape[0]
            loss_sum += step_loss * labels.shape[0]
            reporter.step(step_loss.item(), lr, seen / max(time.perf_counter() - epoch_start, 1e-9))
            if stop.signal is not None:
                path = save({"epoch": epoch, "batches_in_epoch": batches_done, "epoch_samples_seen": seen},
                            {EPOCH_ORDER_KEY: epoch_order, "progress.epoch_loss_sum": loss_sum.clone()})
                raise TrainingInterrupted(stop.signal, path, epoch + 1, global_step)

        record: dict[str, Any] = {
            "epoch": epoch + 1, "task": task + 1, "step": global_step,
            "train_loss": (loss_sum / max(seen, 1)).item(), "lr": lr, "grad_accum": runner.micro_batches,
            "epoch_time": time.perf_counter() - epoch_start, "replay_samples": len(buffer),
        }
        record["samples_per_s"] = seen / max(record["epoch_time"], 1e-9)
        if epoch_in_task == per_task - 1:  # end of the task: a row of R, then the task enters memory
            row = [evaluate(model, dataset, idx, batch_size=recipe.eval_batch_size, precision=config.precision,
                            device=device).accuracy for idx in task_test]
            matrix.append(row)
            record["accuracies"] = row
            buffer.add_classes({c: task_train[task][dataset.labels[task_train[task]] == c] for c in tasks[task]},
                               replay_order)
        history.append(record)
        _write_history(run_dir, history)
        path = save({"epoch": epoch + 1}, {})
        reporter.epoch_end(record)

    finished = last_epoch >= total_epochs
    test = None
    if finished and path is not None:
        with stop_on_write_failure(run_dir, str(checkpoints_dir(run_dir) / "best.json")):
            write_pointer(run_dir, "best", path, {"epoch": total_epochs, "step": global_step})  # no selection: the last
        test = evaluate(model, dataset, test_idx, batch_size=recipe.eval_batch_size, precision=config.precision,
                        device=device)
        figures = continual_metrics(matrix)
        with stop_on_write_failure(run_dir, str(run_dir / METRICS_FILE)):
            write_metrics(run_dir, test.as_dict("test") | {
                "checkpoint": path.name, "epoch": total_epochs, "tasks": tasks, "continual": figures.as_dict(),
                "prompts_encoded": prompts.encoded,
            })
    reporter.end(test)
    return TrainOutcome(run_dir, last_epoch, finished, test)


def read_continual_metrics(run_dir: Path) -> ContinualMetrics | None:
    """The accuracy matrix and its figures from a finished continual run's history, else None."""
    rows = [r["accuracies"] for r in read_history(run_dir) if "accuracies" in r]
    return continual_metrics(rows) if rows and len(rows) == len(rows[0]) else None
