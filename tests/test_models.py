"""Every registered model, every named size: builds, counts, runs forward and backward.

Parametrized over `list_models()`, so a new family is tested the day it is registered.
"""

from __future__ import annotations

import pytest
import torch

from mmkit.models import create_model, get_model_entry, list_models, logits_of
from mmkit.models.registry import build_model, size_config
from mmkit.plan.count import count_model

# Above this many parameters the CPU forward/backward runs at the smallest ladder width instead
# (the parameter total is still checked against `count` at full size, on the meta device).
CPU_PARAM_LIMIT = 25_000_000

MODEL_SIZES = [(name, size) for name in list_models() for size in get_model_entry(name).sizes]


def test_the_seed_families_are_registered() -> None:
    assert {"multichannel", "separate", "lfm2", "clip", "fusion"} <= set(list_models())


@pytest.mark.parametrize(("name", "size"), MODEL_SIZES)
def test_param_total_matches_count(name: str, size: str) -> None:
    report = count_model(name, size)
    entry = get_model_entry(name)
    _, config = size_config(entry, size)
    with torch.device("meta"):
        model = build_model(entry, config)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.total_params == sum(c.params for c in report.components)
    assert report.per_sample.forward_flops > 0
    assert report.per_sample.train_flops > report.per_sample.forward_flops


@pytest.mark.parametrize(("name", "size"), MODEL_SIZES)
def test_forward_backward_on_cpu(name: str, size: str) -> None:
    torch.manual_seed(0)
    entry = get_model_entry(name)
    _, config = size_config(entry, size)
    if count_model(name, size).total_params > CPU_PARAM_LIMIT:
        config = config.at_width(entry.ladder[-1])
    model = build_model(entry, config)
    batch = 2
    inputs = model.example_inputs(batch, seed=0)
    assert set(inputs) == set(model.input_specs())
    output = model(**inputs)
    logits = logits_of(output)
    assert logits.shape == (batch, config.num_classes)
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(batch) % config.num_classes)
    # clip and fusion also return contrastive logits [B, B]: training adds a contrastive term,
    # which is what trains their text tower and projections
    contrastive = getattr(output, "contrastive_logits", None)
    if contrastive is not None:
        loss = loss + torch.nn.functional.cross_entropy(contrastive, torch.arange(batch))
    loss.backward()
    reached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert reached == trainable
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

@pytest.mark.parametrize("name", list_models())
def test_every_ladder_width_builds(name: str) -> None:
    entry = get_model_entry(name)
    for width in entry.ladder:
        _, config = size_config(entry, f"w{width}")
        assert config.width == width
        with torch.device("meta"):
            model = build_model(entry, config)
        logits = logits_of(model(**model.example_inputs(1)))
        assert logits.shape == (1, config.num_classes)


@pytest.mark.parametrize("name", list_models())
def test_ladder_param_counts_shrink_with_width(name: str) -> None:
    totals = [count_model(name, f"w{w}").total_params for w in get_model_entry(name).ladder]
    assert totals == sorted(totals, reverse=True)
    assert len(set(totals)) == len(totals)


def test_create_model_dotted_override_of_a_nested_field() -> None:
    with torch.device("meta"):
        model = create_model("lfm2", "rtx3050", **{"fusion.layers": 3, "classifier.hidden": [32, 16]})
    assert model.config.fusion.layers == 3
    assert len(model.fusion.layers) == 3
    assert model.config.classifier.hidden == (32, 16)


def test_create_model_overrides() -> None:
    model = create_model("multichannel", width=128, num_classes=4)
    assert model.config.hidden == (128, 64)
    assert model(**model.example_inputs(3)).shape == (3, 4)

