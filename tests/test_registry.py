"""Registry behaviour a user sees: names, sizes, overrides, errors."""

from __future__ import annotations

import pytest
import torch

from mmkit.errors import MmkitError
from mmkit.models import create_model, list_models, resolve_config
from mmkit.models.registry import parse_override_value


def test_unknown_model_lists_valid_choices() -> None:
    with pytest.raises(MmkitError) as exc:
        create_model("nosuch")
    message = str(exc.value)
    assert "nosuch" in message
    for name in list_models():
        assert name in message


def test_unknown_size_lists_named_sizes_and_width_form() -> None:
    with pytest.raises(MmkitError) as exc:
        resolve_config("lfm2", "nosuch")
    message = str(exc.value)
    assert "original" in message and "rtx3050" in message and "w<width>" in message


def test_width_size_spelling() -> None:
    entry, size, config = resolve_config("multichannel", "w256")
    assert size == "w256" and config.hidden == (256, 128)


def test_unknown_override_lists_valid_keys() -> None:
    with pytest.raises(MmkitError, match=r"unknown model setting 'nope'.*hidden"):
        resolve_config("multichannel", overrides={"nope": 1})


def test_invalid_override_value_names_the_field() -> None:
    with pytest.raises(MmkitError, match=r"invalid model setting 'num_classes'"):
        resolve_config("multichannel", overrides={"num_classes": "many"})


def test_override_values_parse_as_json_when_they_can() -> None:
    assert parse_override_value("256") == 256
    assert parse_override_value("3e-4") == pytest.approx(3e-4)
    assert parse_override_value("[128, 64]") == [128, 64]
    assert parse_override_value("true") is True
    assert parse_override_value("adamw") == "adamw"


def test_list_override_reaches_the_model() -> None:
    _, _, config = resolve_config("multichannel", overrides={"hidden": [64, 32]})
    assert config.hidden == (64, 32)


def test_configs_are_frozen() -> None:
    model = create_model("multichannel")
    with pytest.raises(Exception):
        model.config.num_classes = 3  # type: ignore[misc]


def test_example_inputs_are_seeded() -> None:
    model = create_model("multichannel")
    a = model.example_inputs(2, seed=1)
    b = model.example_inputs(2, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_names_the_family_default_size() -> None:
    """The quick preset's `size = "default"` works for a family without a size of that name."""
    from mmkit.models.registry import get_model_entry, size_config

    assert size_config(get_model_entry("lfm2"), "default")[0] == "rtx3050"
    assert size_config(get_model_entry("multichannel"), "default")[0] == "default"
