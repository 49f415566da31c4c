"""`count_model`: the exact figures users check against the seeds."""

from __future__ import annotations

import pytest

from mmkit.plan.count import count_model


def test_multichannel_matches_the_seed_exactly() -> None:
    report = count_model("multichannel")
    assert report.total_params == 2_365_962
    assert report.trainable_params == 2_365_962
    assert report.per_sample.forward_macs == 2_364_416  # one MAC per weight in a matrix
    assert report.per_sample.forward_flops == 4_728_832
    assert [c.name for c in report.components] == ["color", "brightness", "classifier"]


def test_seed_75_7m_flops_is_macs_at_batch_32() -> None:
    report = count_model("multichannel", batch_size=32)
    assert report.per_batch.forward_macs == 75_661_312
    assert report.per_batch.forward_flops == 2 * 75_661_312


def test_separate_components() -> None:
    report = count_model("separate")
    assert report.total_params == 2_365_972
    assert {c.name: c.params for c in report.components} == {"color": 1_707_274, "brightness": 658_698}
    # same matrices, so the same MACs as multichannel: the seeds' "identical FLOPs" holds
    assert report.per_sample.forward_macs == count_model("multichannel").per_sample.forward_macs


def test_train_flops_follow_autograd() -> None:
    # forward 2·W; backward computes weight grads for every layer (2·W) and input grads for all
    # layers but the first of each stream (the inputs need no gradient)
    report = count_model("multichannel")
    weights_first_layers = 3072 * 512 + 1024 * 512
    expected = 2 * 2_364_416 + 2 * 2_364_416 + 2 * (2_364_416 - weights_first_layers)
    assert report.per_sample.train_flops == expected


def test_per_batch_scales_linearly_for_an_mlp() -> None:
    report = count_model("multichannel", batch_size=8)
    assert report.per_batch.forward_flops == 8 * report.per_sample.forward_flops
    assert report.per_batch.train_flops == 8 * report.per_sample.train_flops


def test_weight_bytes() -> None:
    report = count_model("separate")
    assert report.weights_bytes == {"fp32": 4 * 2_365_972, "fp16": 2 * 2_365_972, "bf16": 2 * 2_365_972}


def test_depth_expands_the_tree() -> None:
    report = count_model("multichannel", depth=2)
    color = report.components[0]
    assert [c.name for c in color.children] == ["color.0", "color.2"]
    assert sum(c.params for c in color.children) == color.params


def test_lfm2_sizes_are_in_the_seed_range() -> None:
    original = count_model("lfm2", "original")
    assert 126_650_000 <= original.total_params <= 171_350_000  # the seed's ~149M ± 15 %
    assert [c.name for c in original.components] == ["audio", "visual", "fusion", "classifier"]
    assert count_model("lfm2", "rtx3050").total_params <= 20_000_000


def test_overrides_change_the_count() -> None:
    assert count_model("multichannel", overrides={"width": 256}).total_params == (
        3072 * 256 + 256 + 256 * 128 + 128 + 1024 * 256 + 256 + 256 * 128 + 128 + 256 * 10 + 10
    )


def test_json_document_has_the_contract_keys() -> None:
    doc = count_model("multichannel").as_dict()
    for key in (
        "model", "size", "total_params", "trainable_params", "components", "macs_per_sample",
        "flops_per_sample", "train_flops_per_sample", "weights_bytes",
    ):
        assert key in doc
    assert set(doc["weights_bytes"]) == {"fp32", "fp16", "bf16"}


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        count_model("multichannel", batch_size=0)


@pytest.mark.parametrize("model", ["multichannel", "clip"])
def test_forward_flops_alone_are_the_full_counts_forward(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the CPU probe and the validation time count the forward alone; it must be the full count's forward
    from mmkit.cache import bypassed
    from mmkit.models import get_model_entry
    from mmkit.models.registry import size_config
    from mmkit.plan import count

    entry = get_model_entry(model)
    _, config = size_config(entry, None)
    monkeypatch.setattr(count, "_COUNTED", {})
    monkeypatch.setattr(count, "_FORWARD", {})
    seen: list[str] = []
    with bypassed():
        forward = count.config_forward_flops(entry, config, forward_hook=lambda m, i, o: seen.append(type(m).__name__))
        full = count.config_flops(entry, config)
    assert forward == full.forward_flops > 0 and full.train_flops > forward
    assert "Linear" in seen or "Conv2d" in seen
