"""The data of a run, checked against its model: what `train`, `resume` and `eval` feed the model.

`check_data_for_model` is the one place the data checks of `mmkit.data.checks` meet a model: the
tensors the model takes in the dtypes it takes (others left out, with a note), finite float
inputs in the splits that are used, at least one training sample for a run. `load_run_data` loads a
saved run's data (or other data for `eval --data`) and also checks that its widths and classes
are the trained model's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mmkit.data.checks import check_finite, check_training_samples, fit_inputs
from mmkit.data.core import SPLITS, Dataset
from mmkit.data.datasets import load_dataset
from mmkit.errors import MmkitError
from mmkit.models.registry import InputSpec, ModelEntry, build_model, family_input_specs
from mmkit.train.config import RunConfig


def check_data_for_model(
    dataset: Dataset, specs: Mapping[str, InputSpec], *, splits: Iterable[str] = SPLITS, training: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[Dataset, list[str]]:
    """`dataset` with the model's inputs in the model's dtypes, and the notes saying what changed."""
    dataset, notes = fit_inputs(dataset, {name: spec.dtype for name, spec in specs.items()})
    if training:
        check_training_samples(dataset)
    check_finite(dataset, splits, allow_nonfinite=allow_nonfinite)
    return dataset, notes


def data_for_family(entry: ModelEntry, dataset: Dataset, *, allow_nonfinite: bool = False) -> tuple[Dataset, list[str]]:
    """The checks of a new run of `entry`'s family (train, compare), before its widths are set."""
    return check_data_for_model(dataset, family_input_specs(entry), training=True, allow_nonfinite=allow_nonfinite)


def load_run_data(
    config: RunConfig, data: str | None = None, *, splits: Iterable[str] = SPLITS, check_nonfinite: bool = True,
) -> tuple[Dataset, list[str]]:
    """The run's data (or `data`), checked against the run's model: inputs, widths, classes, dtypes,
    finite values in `splits` (unless not `check_nonfinite`)."""
    spec = data or config.data
    dataset = load_dataset(spec, seed=config.data_seed)
    with torch.device("meta"):
        model = build_model(config.entry, config.model_config_object())
    specs = model.input_specs()
    check_data_fits_model(config, dataset.input_shapes(), dataset.num_classes, spec, specs,
                          model.config.num_classes)
    return check_data_for_model(dataset, specs, splits=splits, allow_nonfinite=not check_nonfinite)


def check_data_fits_model(
    config: RunConfig, shapes: Mapping[str, tuple[int, ...]], num_classes: int, data: str,
    specs: Mapping[str, InputSpec], model_classes: int,
) -> None:
    """One clear error when a dataset's inputs or classes do not match a trained model."""
    expected = {name: tuple(spec.shape) for name, spec in specs.items()}
    given = {name: tuple(shapes[name]) for name in expected if name in shapes}
    if given != expected:
        fmt = lambda d: ", ".join(f"{k} {list(v)}" for k, v in d.items()) or "none"
        have = {k: tuple(v) for k, v in shapes.items()}
        raise MmkitError(
            f"data {data!r} does not fit the run's model {config.model!r}: expected inputs {fmt(expected)}; "
            f"the data has {fmt(have)}"
        )
    if num_classes != model_classes:
        raise MmkitError(
            f"data {data!r} has {num_classes} classes, the run's model {config.model!r} predicts {model_classes}"
        )
