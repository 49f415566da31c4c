"""The one resolution path: what the user asked (`RunOptions`) → what will run (`ResolvedRun`).

`mmkit train`, `mmkit memory-plan`, `mmkit compare` and the torchrun launcher all resolve a request
here, so the planner and the trainer never disagree about what it means:

    memory-plan = resolve, then simulate   train = resolve, then run   compare = resolve × 2

Resolution, in order:
1. the recipe: preset < `MMKIT_*` environment < `--set` < flags (a key given both as a flag and
   with `--set` is refused here, once); a given batch must split over the processes;
2. the model: its registry entry, the size, and the input widths and classes of the data (for
   a built-in dataset from its catalog entry, without generating it);
3. the precision as it will run on the device (mmkit.plan.precision): a preset's fp16 is fp16 +
   GradScaler on CUDA; on a CPU bf16 autocast where a probe of the model's own layers measures it
   faster, else fp32;
4. `auto` size and batch, fitted to the target GPU (`--gpu`, else the preset's `gpu`, else the
   local device) at that precision, with `nproc` processes each holding batch / nproc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from mmkit.data.checks import check_set_matches_data
from mmkit.data.datasets import absolute_data_spec
from mmkit.errors import MmkitError
from mmkit.models.catalog import HF_SETTING_KEYS, is_hf_spec
from mmkit.models.module import FactoryConfig, InputDecl
from mmkit.models.registry import (
    ModelConfig,
    ModelEntry,
    apply_overrides,
    build_model,
    data_overrides,
    family_input_specs,
    get_model_entry,
    size_config,
)
from mmkit.models.spec import complete_factory_config, is_factory
from mmkit.plan.memory import check_states_fit, with_gradient_checkpointing
from mmkit.plan.precision import PrecisionChoice, run_precision
from mmkit.settings import TrainingRecipe, TrainingSettings, resolve_training, setting_source
from mmkit.train.config import RunConfig
from mmkit.train.distributed import check_batch_split
from mmkit.train.rundata import check_data_for_model, data_for_family

if TYPE_CHECKING:
    from mmkit.data.datasets import Dataset
    from mmkit.plan.fit import FitResult
    from mmkit.plan.search import SearchResult
    from mmkit.settings import GpuPreset

TRAINING_KEYS = tuple(TrainingRecipe.model_fields)
FLAG_NAMES = {  # training keys that have a flag of their own, as the user types it
    "batch_size": "--batch-size", "size": "--size", "epochs": "--epochs", "seed": "--seed",
    "train_fraction": "--train-fraction", "compile": "--compile", "precision": "--precision",
    "optimizer": "--optimizer", "gradient_checkpointing": "--grad-checkpointing", "strategy": "--strategy",
}


SET_ALIASES = {"fsdp.wrap": "fsdp_wrap"}  # `--set fsdp.wrap=[Block,...]`


@dataclass(frozen=True)
class RunOptions:
    """What the user asked for; `None` everywhere means "not given" (the preset decides)."""

    model: str
    preset: str = "quick"
    size: str | None = None
    batch_size: int | Literal["auto"] | None = None
    precision: Literal["fp32", "fp16", "bf16", "auto"] | None = None  # auto: searched (with --target-batch)
    optimizer: Literal["adamw", "sgd"] | None = None
    gradient_checkpointing: bool | None = None
    epochs: int | None = None
    seed: int | None = None
    train_fraction: float | None = None
    compile: bool | None = None
    data: str | None = None
    data_seed: int | None = None  # built-in data's generator seed (default: the training seed)
    gpu: str | None = None  # the GPU preset `auto` is fitted to (default: the preset's, else local)
    device: str = "auto"  # where the run trains: auto, cpu, cuda, cuda:N
    set_items: tuple[tuple[str, Any], ...] = ()  # `--set KEY=VALUE`, parsed, in the order given
    nproc: int = 1  # data-parallel processes; a batch is global
    strategy: Literal["ddp", "fsdp"] | None = None  # with several processes: replicate or shard (FSDP2)
    margin: float | None = None  # fraction of VRAM kept free (default: the GPU preset's)
    prefer: Literal["width", "batch"] | None = None  # when size and batch are both auto
    allow_nonfinite: bool = False  # train on data holding NaN or Inf (refused otherwise)
    inputs: tuple[tuple[str, Mapping[str, Any]], ...] = ()  # `--input`: a plain factory's inputs, parsed
    target_batch: int | None = None  # `--target-batch`: search precision, checkpointing and accumulation
    weights: str | None = None  # `--weights`: starting weights (safetensors), loaded before training
    log: tuple[str, ...] = ()  # `--log`: loggers the run writes to (tensorboard, mlflow)

    def flags(self) -> dict[str, Any]:
        """The training settings given as flags (the ones not given are left out)."""
        values = {key: getattr(self, key) for key in FLAG_NAMES}
        if values["precision"] == "auto":  # searched (`--target-batch`), not a setting
            values["precision"] = None
        return {key: value for key, value in values.items() if value is not None}

    def set_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """`--set` split into model settings (`model.KEY`) and training settings; an hf: model also
        takes its `task` and `seq_len` without the prefix."""
        model_keys = HF_SETTING_KEYS if is_hf_spec(self.model) else ()
        return split_set_options(dict(self.set_items), model_keys)


@dataclass(frozen=True)
class ResolvedRun:
    """Everything a request resolves to: what `train` runs and `memory-plan` simulates."""

    options: RunOptions
    entry: ModelEntry
    size: str  # a named size or wN, never "auto"
    config: ModelConfig  # data-derived widths, --set model.* and checkpointing applied
    recipe: TrainingSettings  # batch_size is the global int, size the resolved name
    data: str
    data_seed: int
    input_shapes: dict[str, tuple[int, ...]]
    num_classes: int
    device: str  # the resolved device: cpu, cuda, cuda:N
    precision: PrecisionChoice  # as it runs on `device`
    gpu: GpuPreset | None  # the target `auto` was fitted to (memory-plan: always set)
    fit: FitResult | None  # the fit when size or batch was auto (memory-plan: always)
    auto_size: bool = False  # what the user left to the fit
    auto_batch: bool = False
    notes: tuple[str, ...] = ()
    dataset: Dataset | None = field(default=None, repr=False)
    search: SearchResult | None = None  # the ranked ways to train at `--target-batch`
    weights: dict[str, Any] | None = None  # `--weights`, checked against the model (run.json's `weights`)

    @property
    def batch_size(self) -> int:
        return int(self.recipe.batch_size)

    @property
    def per_process_batch_size(self) -> int:
        return self.batch_size // self.options.nproc

    def fit_record(self) -> dict[str, Any] | None:
        """What `auto` chose and for which GPU (run.json's `fit`)."""
        if self.fit is None or self.gpu is None or not (self.auto_size or self.auto_batch or self.search):
            return None
        record = {"gpu": self.gpu.name, "precision": self.precision.precision, "size": self.size,
                  "batch_size": self.batch_size, "total_bytes": self.fit.chosen.total,
                  "budget_bytes": self.fit.budget_bytes}
        if self.fit.chosen.train is not None:  # the plan's category bar (`mmkit report`)
            record["train"] = self.fit.chosen.train.as_dict()
            record["overhead"] = dict(self.fit.chosen.overhead)
        if self.search is not None:  # the whole choice: what ran, what it beat and why
            record["search"] = self.search.as_dict()
        return record

    def run_config(self) -> RunConfig:
        return RunConfig(
            model=self.entry.name, size=self.size, model_settings=self.config.model_dump(mode="json"),
            preset=self.options.preset, training=TrainingRecipe.model_validate(self.recipe.model_dump()),
            data=absolute_data_spec(self.data), data_seed=self.data_seed, device=self.device, precision=self.precision.precision,
            fit=self.fit_record(), notes=list(self.notes), precision_probe=self.precision.probe,
            model_source=dict(self.entry.source) if self.entry.source else None, weights=self.weights,
            log=list(self.options.log),
        )

    def with_seed(self, seed: int) -> ResolvedRun:
        """The same run with another training seed (compare's seeds: the fit does not depend on it)."""
        return replace(self, recipe=self.recipe.model_copy(update={"seed": seed}),
                       options=replace(self.options, seed=seed))


# --------------------------------------------------------------------------------------------------
# The recipe


def split_set_options(options: Mapping[str, Any], model_keys: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` keys: `model.*` (and `model_keys`) go to the model, the rest are training settings."""
    model, training = {}, {}
    for key, value in options.items():
        key = SET_ALIASES.get(key, key)
        if key.startswith("model.") or key in model_keys:
            model[key.removeprefix("model.")] = value
        elif key in TRAINING_KEYS:
            training[key] = value
        else:
            raise MmkitError(
                f"unknown setting {key!r}; valid: model.<model setting> (e.g. --set model.{key}=...), "
                f"{', '.join(TRAINING_KEYS)}"
            )
    return model, training


def _recipe(options: RunOptions) -> TrainingSettings:
    _, training_sets = options.set_options()
    return resolve_recipe(options.preset, options.flags(), training_sets, options.nproc)


def resolve_recipe(
    preset: str, flags: Mapping[str, Any] | None, training_sets: Mapping[str, Any], world_size: int = 1
) -> TrainingSettings:
    """The training recipe: preset < `--set` settings < the flags the user gave (None: not given).
    Refuses a setting given both ways, and a batch that does not split evenly over the processes."""
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    twice = sorted(key for key in given if key in training_sets)
    if twice:
        key = twice[0]
        flag = FLAG_NAMES.get(key, f"--{key.replace('_', '-')}")
        raise MmkitError(f"{key} is given twice, as {flag} and as --set {key}=...; keep one")
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


def check_request(options: RunOptions, *, planning: bool = False) -> TrainingSettings:
    """What can be checked without data or simulation (before torchrun starts workers).
    `planning`: for memory-plan, which fits what training with several processes cannot yet."""
    get_model_entry(options.model)
    recipe = _recipe(options)
    if recipe.tasks and options.nproc > 1:
        raise MmkitError("continual learning runs in one process; drop --nproc-per-node")
    if not planning:
        _check_sharded_sizes(options, recipe)
    return recipe


def _check_sharded_sizes(options: RunOptions, recipe: TrainingSettings) -> None:
    """Training with FSDP in several processes takes a given size and batch: the sharded step is
    simulated over a fake process group, which the workers (inside their real one) cannot make."""
    if recipe.strategy == "fsdp" and options.nproc > 1 and "auto" in (recipe.size, recipe.batch_size):
        raise MmkitError(
            f"--strategy fsdp with {options.nproc} processes trains a given size and batch (auto is fitted per rank by "
            f"`mmkit memory-plan {options.model} --nproc {options.nproc} --strategy fsdp --batch-size auto`, not yet "
            "inside the workers); give --size and --batch-size"
        )


# --------------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(device: str, *, present: bool = True) -> str:
    """`auto` → cuda when a GPU is here, else cpu. `present=False` (planning) accepts `cuda`
    without a GPU on this machine: the plan is for the GPU preset's device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise MmkitError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    if present and device.startswith("cuda") and not torch.cuda.is_available():
        raise MmkitError(f"--device {device}: no CUDA device is available here")
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


# --------------------------------------------------------------------------------------------------
# Resolution


def resolve_run(options: RunOptions, *, load_data: bool = True, simulate: bool = False) -> ResolvedRun:
    """Resolve `options` as `mmkit train` runs it.

    `load_data=False` (planning) takes a built-in dataset's shapes from its catalog entry instead of
    generating it; `simulate=True` (memory-plan) fits and simulates even when size and batch are
    given, and plans for a `--device cuda` this machine does not have.
    """
    entry = get_model_entry(options.model)
    model_sets, training_sets = options.set_options()
    recipe = _recipe(options)
    if not simulate:
        _check_sharded_sizes(options, recipe)
    if options.weights:  # a pickle or a missing file is refused before any data is read
        from mmkit.models.weights import weight_files

        weight_files(options.weights)
    given = options.flags()
    if recipe.size != "auto":  # an unknown size names the flag, --set or preset it came from
        try:
            size_config(entry, recipe.size)
        except MmkitError as exc:
            raise MmkitError(f"{setting_source(options.preset, 'size', recipe.size, given, training_sets)}: {exc}") from None
    data_spec = options.data or entry.default_data
    data_seed = recipe.seed if options.data_seed is None else options.data_seed
    notes: list[str] = []
    if is_factory(entry):  # a plain factory: its one config settled here, from --input or the data
        entry, recipe, dataset, shapes, num_classes = _factory_model(
            entry, options, recipe, model_sets, data_spec, data_seed, notes, simulate=simulate)
        overrides: dict[str, Any] = {}
    else:
        if options.inputs:
            raise MmkitError(f"--input describes a plain factory's inputs; model {entry.name!r} describes its own "
                             f"({', '.join(family_input_specs(entry))})")
        if data_spec:
            dataset, shapes, num_classes = _data(data_spec, data_seed, load_data)
            from_data = data_overrides(entry, shapes, num_classes)
            check_set_matches_data(data_spec, from_data, model_sets)
        elif simulate:  # a family without data of its own, planned at its sizes' own input widths
            dataset, from_data = None, {}
            shapes = {name: tuple(spec.shape) for name, spec in family_input_specs(entry).items()}
            num_classes = entry.sizes[entry.default_size].num_classes
        else:
            raise MmkitError(f"model {entry.name!r} has no data of its own; give --data (a built-in dataset or a "
                             ".safetensors tensor file)")
        if dataset is not None:  # dtypes, unused tensors, NaN/Inf, labels (mmkit.data.checks)
            dataset, data_notes = data_for_family(entry, dataset, allow_nonfinite=options.allow_nonfinite)
            notes += data_notes
        overrides = {**from_data, **model_sets}

    device = resolve_device(options.device, present=not simulate)
    if not simulate:  # auto: even the smallest point of the ladder must fit (the fit chooses among them)
        checked = str(recipe.size) if recipe.size != "auto" else (f"w{min(entry.ladder)}" if entry.ladder else None)
        check_states_fit(entry, apply_overrides(size_config(entry, checked)[1], overrides), recipe.optimizer, device)
    gpu, gpu_note = _target_gpu(options, recipe, needed=simulate or "auto" in (recipe.size, recipe.batch_size))
    if gpu_note:
        notes.append(gpu_note)
    supported = gpu.precisions if simulate and device.startswith("cuda") and gpu is not None else None
    try:
        choice = choose_precision(entry, str(recipe.size), overrides, recipe.precision,
                                  given="precision" in given or "precision" in training_sets,
                                  device=device, supported=supported)
    except MmkitError as exc:
        raise MmkitError(f"GPU preset {gpu.name!r}: {exc}" if supported else str(exc)) from None
    if choice.note:
        notes.append(choice.note)

    fit, search = None, None
    if options.target_batch is not None:
        gpu = gpu or _target_gpu(options, recipe, needed=True)[0]
        assert gpu is not None
        search, choice, recipe = _search(entry, gpu, recipe, overrides, choice, options, device, notes, simulate=simulate)
        winner = search.winner
        fit = winner.fit
        size_name, config, batch_size = fit.size, fit.config, options.target_batch
    elif gpu is not None:
        fit = _fit(entry, gpu, recipe, overrides, choice.precision, options, plan=simulate)
        size_name, config, batch_size = fit.size, fit.config, fit.batch_size * options.nproc
        if any(v == "auto" for v in (recipe.size, recipe.batch_size)):
            if not fit.chosen.fits and not simulate:
                raise MmkitError(
                    f"nothing fits {gpu.name!r}: {fit.size} at batch {fit.batch_size} needs "
                    f"{fit.chosen.total / 2**30:.2f} GiB, the budget is {fit.budget_bytes / 2**30:.2f} GiB"
                )
            notes.append(_auto_note(fit, gpu, choice.precision, options.nproc))
    else:
        size_name, config = size_config(entry, str(recipe.size))
        config = with_gradient_checkpointing(entry, apply_overrides(config, overrides), recipe.gradient_checkpointing)
        batch_size = int(recipe.batch_size)

    resolved_recipe = recipe.model_copy(update={"batch_size": batch_size, "size": size_name})
    if recipe.tasks:  # continual: the run's epochs are the whole stream's
        _check_continual_model(entry, config, options, recipe, given, training_sets)
        resolved_recipe = resolved_recipe.model_copy(update={"epochs": recipe.tasks * recipe.epochs_per_task})
    weights = _check_weights(entry, config, options.weights) if options.weights else None
    if recipe.fsdp_wrap and recipe.strategy == "fsdp":  # an unknown class name: one line, before any worker
        from mmkit.train.sharding import block_classes

        with torch.device("meta"):
            block_classes(build_model(entry, config), recipe.fsdp_wrap)
    return ResolvedRun(
        options=options, entry=entry, size=size_name, config=config, recipe=resolved_recipe, data=data_spec,
        data_seed=data_seed, input_shapes=shapes, num_classes=num_classes, device=device, precision=choice,
        gpu=gpu, fit=fit, auto_size=recipe.size == "auto", auto_batch=recipe.batch_size == "auto",
        notes=tuple(notes), dataset=dataset, search=search, weights=weights,
    )


def _check_weights(entry: ModelEntry, config: ModelConfig, path: str) -> dict[str, Any]:
    """`--weights`, matched to the model built on the meta device (headers read, no tensor): one line
    when it is a pickle or none of its tensors is the model's. What run.json records."""
    import os

    from mmkit.models.weights import plan_weights

    with torch.device("meta"):
        model = build_model(entry, config)
    plan = plan_weights(model, path)
    return {"path": os.path.abspath(os.path.expanduser(path.removeprefix("hf:"))),
            "files": [str(f.resolve()) for f in plan.files]}


def _factory_model(
    entry: ModelEntry, options: RunOptions, recipe: TrainingSettings, model_sets: Mapping[str, Any], data_spec: str,
    data_seed: int, notes: list[str], *, simulate: bool,
) -> tuple[ModelEntry, TrainingSettings, Dataset | None, dict[str, tuple[int, ...]], int]:
    """A plain factory's entry with its one config settled (keyword arguments, inputs, classes),
    the recipe with the size it has, and the data when there is some (train always needs it)."""
    if recipe.size not in ("auto", "default", entry.default_size):
        raise MmkitError(f"model {entry.name!r} has one size (default), not {recipe.size!r}; "
                         "pass its settings with --set model.KEY=VALUE")
    if recipe.size == "auto":
        given = options.flags()
        _, training_sets = options.set_options()
        if "size" in given or "size" in training_sets:
            raise MmkitError(f"--size auto needs a size ladder, and model {entry.name!r} has one size; register "
                             "it with @register_model (sizes and a ladder) to fit its width, or fit only the batch")
        notes.append(f"size: model {entry.name!r} has one size (no size ladder to fit), so the preset's size "
                     "auto fits only the batch")
        recipe = recipe.model_copy(update={"size": entry.default_size})
    dataset, data_inputs, num_classes = None, None, None
    if data_spec:
        from mmkit.data.datasets import load_dataset
        from mmkit.models.spec import data_input_decls

        dataset = load_dataset(data_spec, seed=data_seed)
        data_inputs, num_classes = data_input_decls(dataset), dataset.num_classes
    elif not simulate:
        raise MmkitError(f"model {entry.name!r}: training needs data; give --data (a built-in dataset or a "
                         ".safetensors tensor file whose tensors are named by forward's parameters)")
    inputs = {name: InputDecl.model_validate(decl) for name, decl in options.inputs}
    base = entry.sizes[entry.default_size]
    assert isinstance(base, FactoryConfig)
    config = complete_factory_config(entry, base.with_kwargs(model_sets), inputs=inputs, data_inputs=data_inputs,
                                     num_classes=num_classes)
    if not simulate:
        config.check_trainable(entry.name)
    if dataset is not None:  # dtypes, unused tensors, NaN/Inf, labels (mmkit.data.checks)
        dataset, data_notes = check_data_for_model(dataset, config.input_specs(), training=True,
                                                   allow_nonfinite=options.allow_nonfinite)
        notes += data_notes
        shapes = {name: shape for name, shape in dataset.input_shapes().items() if name in config.inputs}
        check_data_fits_inputs(entry.name, data_spec, config, shapes)
    else:
        shapes = {name: tuple(decl.shape) for name, decl in config.inputs.items()}
    assert config.num_classes is not None
    entry = replace(entry, sizes={entry.default_size: config})
    return entry, recipe, dataset, shapes, num_classes or config.num_classes


def check_data_fits_inputs(model: str, data: str, config: FactoryConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """`--input` and the data must agree on every input's shape."""
    for name, decl in config.inputs.items():
        if name not in shapes:
            raise MmkitError(f"model {model!r} takes input {name!r}, which data {data!r} does not have "
                             f"(it has {', '.join(sorted(shapes)) or 'none'})")
        if tuple(shapes[name]) != tuple(decl.shape):
            raise MmkitError(f"model {model!r}: input {name!r} is described as {list(decl.shape)}, data {data!r} "
                             f"holds {list(shapes[name])} per sample")


def _data(spec: str, seed: int, load: bool) -> tuple[Dataset | None, dict[str, tuple[int, ...]], int]:
    """The dataset (when `load`), its input shapes and number of classes."""
    from mmkit.data.catalog import BUILTIN_DATASETS

    if not load and spec in BUILTIN_DATASETS:
        info = BUILTIN_DATASETS[spec]
        return None, dict(info.inputs), len(info.classes)
    from mmkit.data.datasets import load_dataset

    dataset = load_dataset(spec, seed=seed)
    return dataset, dataset.input_shapes(), dataset.num_classes


def _target_gpu(options: RunOptions, recipe: TrainingSettings, *, needed: bool) -> tuple[GpuPreset | None, str | None]:
    """The GPU preset fitting and planning use: `--gpu`, else the preset's `gpu`, else the local device."""
    if not needed:
        return None, None
    from mmkit.plan.hardware import resolve_gpu

    return resolve_gpu(options.gpu or recipe.gpu or "auto")


def _fit(entry: ModelEntry, gpu: GpuPreset, recipe: TrainingSettings, overrides: Mapping[str, Any],
         precision: str, options: RunOptions, *, plan: bool) -> FitResult:
    """The fit of a run; `plan` (memory-plan) simulates the inference forward it reports beside the fit's
    confirming steps."""
    from mmkit.plan.fit import fit_to_budget

    batch = recipe.batch_size if recipe.batch_size == "auto" else int(recipe.batch_size) // options.nproc
    return fit_to_budget(
        entry, gpu, size=str(recipe.size), batch_size=batch, overrides=overrides, data_parallel=options.nproc,
        precision=precision, optimizer=recipe.optimizer, gradient_checkpointing=recipe.gradient_checkpointing,
        margin=options.margin, min_batch_size=recipe.min_batch_size, max_batch_size=recipe.max_batch_size,
        prefer=options.prefer or "width", strategy=recipe.strategy,
        fsdp_wrap=tuple(recipe.fsdp_wrap) if recipe.fsdp_wrap else None, inference=plan,
    )


def _search(
    entry: ModelEntry, gpu: GpuPreset, recipe: TrainingSettings, overrides: Mapping[str, Any], choice: PrecisionChoice,
    options: RunOptions, device: str, notes: list[str], *, simulate: bool,
) -> tuple[SearchResult, PrecisionChoice, TrainingSettings]:
    """`--target-batch N`: the ranked ways to train at N samples per optimizer step, and the recipe
    of the winner (its precision, checkpointing, batch N in `grad_accum` micro-batches). What the
    user pinned (`--precision`, `--grad-checkpointing` / `--no-grad-checkpointing`, the same with
    `--set`) is not searched."""
    from mmkit.plan.search import search_training_plans

    given = options.flags()
    _, training_sets = options.set_options()
    if options.nproc > 1:
        raise MmkitError("--target-batch plans one process; drop --nproc-per-node (or give --batch-size)")
    if "batch_size" in given or "batch_size" in training_sets or "grad_accum" in training_sets:
        raise MmkitError("--target-batch chooses the micro-batch and grad_accum itself; drop --batch-size / "
                         "--set grad_accum")
    size = str(recipe.size)
    if size == "auto":
        if "size" in given or "size" in training_sets:
            raise MmkitError("--target-batch compares ways to train one model: give a size (--size NAME), not auto")
        size = entry.default_size
        notes.append(f"size: --target-batch searches at one size, the family's default ({size}); "
                     "give --size to search another")
    pinned = options.precision not in (None, "auto") or "precision" in training_sets
    on_cuda = device.startswith("cuda") or (simulate and gpu.device_type == "cuda" and device.startswith("cuda"))
    precisions = (choice.precision,) if pinned or not on_cuda else tuple(gpu.precisions)
    if not pinned and not on_cuda:
        notes.append(f"precision: on this CPU the probe's choice ({choice.precision}) is the one searched")
    supports = "gradient_checkpointing" in entry.config_class.model_fields
    if "gradient_checkpointing" in given or "gradient_checkpointing" in training_sets or not supports:
        checkpointing: tuple[bool, ...] = (bool(recipe.gradient_checkpointing),)
    else:
        checkpointing = (False, True)
    result = search_training_plans(entry, gpu, size=size, target_batch=int(options.target_batch or 0),
                                   precisions=precisions, checkpointing=checkpointing, overrides=overrides,
                                   optimizer=recipe.optimizer, margin=options.margin)
    winner = result.winner
    notes.append(f"search: {winner.label()} fits {gpu.name} ({winner.total_bytes / 2**30:.2f} GiB) and is "
                 f"predicted fastest of {len(result.options)} ({winner.samples_per_s:,.0f} samples/s predicted)")
    if winner.precision != choice.precision:
        choice = PrecisionChoice(winner.precision, None)
    recipe = recipe.model_copy(update={
        "size": size, "precision": winner.precision, "gradient_checkpointing": winner.gradient_checkpointing,
        "grad_accum": winner.accumulation, "batch_size": result.target_batch})
    return result, choice, recipe


def _auto_note(fit: FitResult, gpu: GpuPreset, precision: str, nproc: int) -> str:
    batch = fit.batch_size * nproc
    per_process = f" ({fit.batch_size} per process × {nproc})" if nproc > 1 else ""
    return (f"auto: size {fit.size}, batch {batch}{per_process}, fitted to {gpu.name} ({precision}): "
            f"{fit.chosen.total / 2**30:.2f} of {fit.budget_bytes / 2**30:.2f} GiB")


def _check_continual_model(entry: ModelEntry, config: ModelConfig, options: RunOptions, recipe: TrainingSettings,
                           given: Mapping[str, Any], training_sets: Mapping[str, Any]) -> None:
    with torch.device("meta"):
        if not hasattr(build_model(entry, config), "encode_text"):
            tasks = setting_source(options.preset, "tasks", recipe.tasks, given, training_sets)
            raise MmkitError(
                f"continual training ({tasks}) needs an image-text model (clip, fusion); {options.model!r} is not one"
            )
