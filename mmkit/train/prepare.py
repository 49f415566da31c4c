"""From command-line choices to a resolved `RunConfig`: preset, data, model widths, precision,
auto-fitting.

Precision is what runs on the device (mmkit.plan.precision): a preset's fp16 is fp16 autocast +
GradScaler on CUDA; on a CPU it is bf16 autocast where a probe of the model's own layers measures
bf16 faster, else fp32, and the run says which and by how much. Auto size and batch are fitted to
the preset's target GPU (`gpu = "rtx3050"` in half-data) unless `--gpu` names another, at the
precision the run uses, so what `memory-plan` promises is what `train` runs.

With several processes (`world_size`), the batch is global: a given batch must split evenly, and
an `auto` batch is fitted per GPU and multiplied by the number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mmkit.data.checks import check_set_matches_data
from mmkit.data.datasets import Dataset, absolute_data_spec, load_dataset
from mmkit.errors import MmkitError
from mmkit.models.registry import (
    ModelEntry,
    apply_overrides,
    build_model,
    data_overrides,
    get_model_entry,
    size_config,
)
from mmkit.plan.memory import check_states_fit, with_gradient_checkpointing
from mmkit.plan.precision import PrecisionChoice, run_precision
from mmkit.settings import TrainingRecipe, TrainingSettings, resolve_training, setting_source
from mmkit.train.config import RunConfig
from mmkit.train.distributed import check_batch_split
from mmkit.train.rundata import data_for_family

TRAINING_KEYS = tuple(TrainingRecipe.model_fields)


@dataclass(frozen=True)
class PreparedRun:
    config: RunConfig
    dataset: Dataset


def split_set_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` keys: `model.*` go to the model, the rest are training settings."""
    model, training = {}, {}
    for key, value in options.items():
        if key.startswith("model."):
            model[key.removeprefix("model.")] = value
        elif key in TRAINING_KEYS:
            training[key] = value
        else:
            raise MmkitError(
                f"unknown setting {key!r}; valid: model.<model setting>, {', '.join(TRAINING_KEYS)}"
            )
    return model, training


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MmkitError(f"--device {device}: no CUDA device is available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise MmkitError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def local_precisions(device: str) -> tuple[str, ...]:
    """What the run's own device offers: a CUDA GPU has bf16 from compute capability 8 on."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return ("fp32", "fp16", "bf16") if torch.cuda.is_bf16_supported() else ("fp32", "fp16")
    return ("fp32", "fp16", "bf16")


def choose_precision(
    entry: ModelEntry, size: str, overrides: Mapping[str, Any], requested: str, *, given: bool, device: str,
    supported: tuple[str, ...] | None = None,
) -> PrecisionChoice:
    """The precision the run uses on `device` (see mmkit.plan.precision). On a CPU, mixed precision
    is probed on the model at `size` with `overrides` applied; for `auto`, at the widest size of the
    ladder, where fitting starts (the layer kinds are the same at every width)."""
    from mmkit.plan.probe import probe_cpu

    def probe() -> object:
        probed = size if size != "auto" else (f"w{max(entry.ladder)}" if entry.ladder else entry.default_size)
        _, config = size_config(entry, probed)
        return probe_cpu(entry, apply_overrides(config, overrides))

    device_type = "cpu" if device == "cpu" else "cuda"
    return run_precision(requested, given=given, device_type=device_type,
                         supported=supported or local_precisions(device), cpu_probe=probe)


def resolve_recipe(
    preset: str, flags: Mapping[str, Any] | None, training_sets: Mapping[str, Any], world_size: int = 1
) -> TrainingSettings:
    """The training recipe: preset < `--set` settings < the flags the user gave (None: not given).
    Refuses a setting given both ways, and a batch that does not split evenly over the processes."""
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    twice = sorted(key for key in given if key in training_sets)
    if twice:
        key = twice[0]
        raise MmkitError(f"{key} is given twice, as --{key.replace('_', '-')} and as --set {key}=...; keep one")
    recipe = resolve_training(preset, given, training_sets)
    check_continual_length(preset, recipe, given, training_sets)
    if recipe.batch_size != "auto":
        check_batch_split(world_size, int(recipe.batch_size),
                          given_as=setting_source(preset, "batch_size", recipe.batch_size, given, training_sets))
    return recipe


def check_continual_length(preset: str, recipe: TrainingSettings, given: Mapping[str, Any],
                           training_sets: Mapping[str, Any]) -> None:
    """A continual recipe runs tasks × epochs_per_task epochs: refuse an `epochs` it would ignore."""
    if recipe.tasks and ("epochs" in given or "epochs" in training_sets):
        raise MmkitError(
            f"{setting_source(preset, 'epochs', recipe.epochs, given, training_sets)}: a continual recipe trains "
            f"tasks × epochs_per_task epochs ({recipe.tasks} × {recipe.epochs_per_task}; "
            f"{setting_source(preset, 'tasks', recipe.tasks, given, training_sets)}); "
            "set its length with --set epochs_per_task=N"
        )


def prepare_run(
    model: str,
    *,
    preset: str,
    data: str | None = None,
    flags: Mapping[str, Any] | None = None,
    set_options: Mapping[str, Any] | None = None,
    gpu: str | None = None,
    device: str = "auto",
    data_seed: int | None = None,
    world_size: int = 1,
    allow_nonfinite: bool = False,
) -> PreparedRun:
    """Resolve everything a run needs; `flags` are the training options the user gave."""
    entry = get_model_entry(model)
    model_sets, training_sets = split_set_options(set_options or {})
    recipe = resolve_recipe(preset, flags, training_sets, world_size)
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    if recipe.size != "auto":  # an unknown size names the flag, --set or preset it came from
        try:
            size_config(entry, recipe.size)
        except MmkitError as exc:
            raise MmkitError(f"{setting_source(preset, 'size', recipe.size, given, training_sets)}: {exc}") from None
    data_spec = data or entry.default_data
    data_seed = recipe.seed if data_seed is None else data_seed
    dataset = load_dataset(data_spec, seed=data_seed)
    # ---- data and model checks (mmkit.data.checks, mmkit.train.rundata): before any allocation or file
    from_data = data_overrides(entry, dataset.input_shapes(), dataset.num_classes)
    check_set_matches_data(dataset.name, from_data, model_sets)
    dataset, data_notes = data_for_family(entry, dataset, allow_nonfinite=allow_nonfinite)
    overrides = {**from_data, **model_sets}
    device = resolve_device(device)
    # auto: even the smallest point of the ladder must fit (the fit chooses among them)
    checked_size = str(recipe.size) if recipe.size != "auto" else (f"w{min(entry.ladder)}" if entry.ladder else None)
    check_states_fit(entry, apply_overrides(size_config(entry, checked_size)[1], overrides), recipe.optimizer, device)
    # ---- end of checks

    choice = choose_precision(entry, str(recipe.size), overrides, recipe.precision,
                              given="precision" in given or "precision" in training_sets,
                              device=device)
    precision = choice.precision
    notes = [*data_notes, *([choice.note] if choice.note else [])]

    fit_info = None
    if recipe.size == "auto" or recipe.batch_size == "auto":
        from mmkit.plan.fit import fit_to_budget
        from mmkit.plan.hardware import resolve_gpu

        target, gpu_note = resolve_gpu(gpu or recipe.gpu or "auto")
        if gpu_note:
            notes.append(gpu_note)
        target_precision = precision  # fitted at the precision the run uses
        fit = fit_to_budget(
            model, target, size=recipe.size,
            batch_size=recipe.batch_size if recipe.batch_size == "auto" else int(recipe.batch_size) // world_size,
            overrides=overrides, data_parallel=world_size,
            precision=target_precision, optimizer=recipe.optimizer,
            gradient_checkpointing=recipe.gradient_checkpointing,
            min_batch_size=recipe.min_batch_size, max_batch_size=recipe.max_batch_size,
        )
        if not fit.chosen.fits:
            raise MmkitError(
                f"nothing fits {target.name!r}: {fit.size} at batch {fit.batch_size} needs "
                f"{fit.chosen.total / 2**30:.2f} GiB, the budget is {fit.budget_bytes / 2**30:.2f} GiB"
            )
        size_name, config, batch_size = fit.size, fit.config, fit.batch_size * world_size
        fit_info = {
            "gpu": target.name, "precision": target_precision, "size": size_name, "batch_size": batch_size,
            "total_bytes": fit.chosen.total, "budget_bytes": fit.budget_bytes,
        }
        per_gpu = f" ({fit.batch_size} per process × {world_size})" if world_size > 1 else ""
        notes.append(
            f"auto: size {size_name}, batch {batch_size}{per_gpu}, fitted to {target.name} ({target_precision}): "
            f"{fit.chosen.total / 2**30:.2f} of {fit.budget_bytes / 2**30:.2f} GiB"
        )
    else:
        size_name, config = size_config(entry, recipe.size)
        config = with_gradient_checkpointing(
            entry, apply_overrides(config, overrides), recipe.gradient_checkpointing
        )
        batch_size = int(recipe.batch_size)

    resolved = recipe.model_copy(update={"batch_size": batch_size, "size": size_name})
    if recipe.tasks:  # continual: the run's epochs are the whole stream's
        with torch.device("meta"):
            if not hasattr(build_model(entry, config), "encode_text"):
                tasks = setting_source(preset, "tasks", recipe.tasks, given, training_sets)
                raise MmkitError(
                    f"continual training ({tasks}) needs an image-text model (clip, fusion); {model!r} is not one"
                )
        resolved = resolved.model_copy(update={"epochs": recipe.tasks * recipe.epochs_per_task})
    run_config = RunConfig(
        model=model, size=size_name, model_settings=config.model_dump(mode="json"), preset=preset,
        training=TrainingRecipe.model_validate(resolved.model_dump()), data=absolute_data_spec(data_spec),
        data_seed=data_seed,
        device=device,
        precision=precision, fit=fit_info, notes=notes, precision_probe=choice.probe,
    )
    return PreparedRun(run_config, dataset)
