"""The one formatter of pydantic validation errors: the first bad field, in one line."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from mmkit.errors import first_error, validation_message


class Recipe(BaseModel):
    lr: float
    batch_size: int | None = None
    hidden: tuple[int, ...] = ()


def invalid(**fields: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Recipe.model_validate(fields)
    return caught.value


def test_the_first_bad_field_is_named_and_the_others_counted() -> None:
    exc = invalid(lr="fast", batch_size="many", hidden=[1, "x"])
    assert first_error(exc).field == "lr"
    assert validation_message("quick.toml", exc) == (
        "quick.toml: field 'lr': Input should be a valid number, unable to parse string as a number (and 2 more)")


def test_a_union_is_one_field_and_list_items_are_dotted() -> None:
    assert first_error(invalid(lr=1.0, batch_size="many")) == (
        "batch_size", "Input should be a valid integer, unable to parse string as an integer")
    assert first_error(invalid(lr=1.0, hidden=[1, "x"])).field == "hidden.1"


def test_a_document_that_is_not_an_object_is_the_file() -> None:
    with pytest.raises(ValidationError) as caught:
        Recipe.model_validate([1, 2])
    assert validation_message("run.json", caught.value).startswith("run.json: field '(file)': ")
