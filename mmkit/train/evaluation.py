"""Evaluation of a model on a split: metrics and mean loss in one pass, the same with any number
of data-parallel processes."""

from __future__ import annotations

import itertools

import torch

from mmkit.data.datasets import Dataset, iterate_batches, num_batches
from mmkit.models.registry import MultimodalModel, logits_of
from mmkit.train.distributed import SINGLE, World
from mmkit.train.metrics import ClassificationMetrics, classification_metrics, confusion_matrix
from mmkit.train.sharding import is_sharded
from mmkit.train.step import AMP_DTYPES


def evaluate_with_loss(
    model: MultimodalModel, dataset: Dataset, indices: torch.Tensor, *, batch_size: int,
    precision: str, device: torch.device, world: World = SINGLE,
) -> tuple[ClassificationMetrics, float]:
    """Metrics and mean cross-entropy on `indices` in one pass (eval mode, no grad).

    With several ranks, rank r evaluates batches r, r + k, r + 2k, ... — the very batches one
    process would form — and the confusion matrix and the per-batch loss sums are all-reduced
    (integers, and sums with zeros), then added in batch order: the result is bitwise the
    single-process one. A sharded (FSDP) model all-gathers its weights in every forward, so its
    ranks run the same number of forwards: a rank out of batches runs its first one again, unused.
    """
    was_training = model.training
    model.eval()
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    batch_losses = torch.zeros(num_batches(len(indices), batch_size) if len(indices) else 0, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(
        device.type, dtype=AMP_DTYPES.get(precision), enabled=precision in AMP_DTYPES
    ):
        batches = iterate_batches(dataset, indices, batch_size, shuffle=False)
        first: dict[str, torch.Tensor] | None = None
        for i, (inputs, labels) in enumerate(itertools.islice(batches, world.rank, None, world.size)):
            first = first or inputs
            logits = logits_of(model(**{k: v.to(device) for k, v in inputs.items()}))
            batch_losses[world.rank + i * world.size] = torch.nn.functional.cross_entropy(
                logits.float(), labels.to(device), reduction="sum"
            ).double().cpu()
            confusion += confusion_matrix(labels, logits.argmax(dim=-1).cpu(), dataset.num_classes)
        if is_sharded(model) and first is not None:  # in step with the ranks that had one batch more
            ours = len(range(world.rank, len(batch_losses), world.size))
            for _ in range(ours, -(-len(batch_losses) // world.size)):
                model(**{k: v.to(device) for k, v in first.items()})
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
