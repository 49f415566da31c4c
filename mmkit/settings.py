"""Settings and presets.

Presets are data: TOML files validated by the pydantic models below.
- `gpus/<name>.toml`      a GPU (or the CPU): memory, precisions, peak throughput, overheads.
- `training/<name>.toml`  a training recipe: epochs, lr, precision, batch, data fraction, ...

They are looked up in the folders of `MMKIT_PRESET_PATH` (separated by the OS path separator,
each holding `gpus/` and/or `training/`; earlier folders win), then in the user's presets folder
(`MMKIT_CONFIG_DIR`/presets, default ~/.config/mmkit/presets: where `mmkit calibrate` writes), then
in the built-in folder shipped with mmkit. Precedence of a resolved training configuration (contract):
built-in defaults < preset file < `MMKIT_*` environment < CLI flags.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mmkit.errors import MmkitError, first_error, unknown_choice, validation_message

Precision = Literal["fp32", "fp16", "bf16"]
MIB = 2**20
GIB = 2**30


class MmkitSettings(BaseSettings):
    """Process-wide settings from `MMKIT_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MMKIT_", extra="ignore")

    preset_path: str = ""  # extra preset folders, os.pathsep-separated
    debug: bool = False  # show tracebacks of internal errors
    model: str = "lfm2"  # the model `memory-plan` plans when none is named
    cache_dir: str = ""  # where measured figures are kept (default: $XDG_CACHE_HOME/mmkit or ~/.cache/mmkit)
    # pins the CPU's bf16 speed-up over fp32 instead of measuring it (reproducible scripts and tests);
    # the run says the figure was pinned, not measured
    cpu_bf16_speedup: PositiveFloat | None = None

    config_dir: str = ""  # user presets (`mmkit calibrate` writes here): default $XDG_CONFIG_HOME/mmkit or ~/.config/mmkit

    @property
    def preset_dirs(self) -> list[Path]:
        """MMKIT_PRESET_PATH's folders, then the user's own presets folder."""
        return [*(Path(p).expanduser() for p in self.preset_path.split(os.pathsep) if p.strip()), self.user_preset_dir]

    @property
    def user_preset_dir(self) -> Path:
        if self.config_dir:
            return Path(self.config_dir).expanduser() / "presets"
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mmkit" / "presets"

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmkit"


# --------------------------------------------------------------------------------------------
# Preset schemas


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PeakTflops(_Strict):
    """Peak dense throughput in TFLOP/s (no structured sparsity)."""

    fp32: PositiveFloat
    fp16: PositiveFloat | None = None  # tensor-core fp16 with fp32 accumulate, where there is one
    bf16: PositiveFloat | None = None


class GpuOverhead(_Strict):
    """Memory that live tensors do not show; the planner adds these as labelled lines."""

    cuda_context_mib: NonNegativeFloat  # CUDA context + the kernels torch loads
    workspace_mib: NonNegativeFloat  # cuBLAS / cuDNN workspaces
    allocator_reserve_fraction: float = Field(ge=0, lt=1)  # caching-allocator slack, × peak tensors


class Calibration(_Strict):
    """Figures measured on the device by `mmkit calibrate` (the time model uses them over the datasheet's)."""

    source: str  # what was measured, where and when
    matmul_tflops: dict[Precision, list[tuple[PositiveFloat, PositiveFloat]]]  # (FLOPs per call, TFLOP/s achieved)
    conv_tflops: dict[Precision, list[tuple[PositiveFloat, PositiveFloat]]] = {}  # the same for convolutions
    # the same per layout of a matrix product's operands, keyed "PRECISION LAYOUT" ("bf16 nn": neither transposed)
    matmul_layout_tflops: dict[str, list[tuple[PositiveFloat, PositiveFloat]]] = {}
    bandwidth_gb_s: PositiveFloat  # elementwise operators' bytes read + written per second
    op_gb_s: dict[str, PositiveFloat] = {}  # operators measured on their own (AdamW's step), bytes per second
    seconds_per_op: NonNegativeFloat  # one eager operator in a training step (dispatch, autograd, launch)
    seconds_per_step: NonNegativeFloat = 0.0  # a training step's cost besides its operators (Python, autocast)


class GpuPreset(_Strict):
    name: str
    display_name: str
    device_type: Literal["cuda", "cpu"] = "cuda"
    vram_gib: PositiveFloat  # memory the device has (for `cpu`: the RAM budget mmkit may use)
    margin: float = Field(default=0.05, ge=0, lt=1)  # fraction of vram kept free when fitting
    precisions: tuple[Precision, ...]
    memory_bandwidth_gb_s: PositiveFloat
    peak_tflops: PeakTflops
    overhead: GpuOverhead
    calibration: Calibration | None = None

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gib * GIB)

    def budget_bytes(self, margin: float | None = None) -> int:
        """What a plan may use: `vram × (1 − margin)`."""
        return int(self.vram_bytes * (1 - (self.margin if margin is None else margin)))

    def overhead_bytes(self, peak_tensor_bytes: int) -> dict[str, int]:
        """The non-tensor lines of a memory plan, in bytes."""
        return {
            "cuda_context": int(self.overhead.cuda_context_mib * MIB),
            "workspace": int(self.overhead.workspace_mib * MIB),
            "allocator_reserve": int(peak_tensor_bytes * self.overhead.allocator_reserve_fraction),
        }


MAX_EPOCHS = 1_000_000
MAX_BATCH = 1 << 20  # larger values are typos, not batches
BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH)]


class TrainingRecipe(BaseModel):
    """The fields of a training preset, with the built-in defaults."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    epochs: int = Field(default=10, gt=0, le=MAX_EPOCHS)
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.01, ge=0, le=10)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)  # of all optimizer steps
    optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_size: BatchSize | Literal["auto"] = 32
    min_batch_size: BatchSize = 1  # the smallest batch `auto` may choose
    max_batch_size: BatchSize = 256  # the cap of `auto`
    grad_accum: BatchSize = 1
    size: str = "default"  # a named size, `wN`, or "auto" (fit to the GPU)
    precision: Precision = "fp32"
    grad_clip: PositiveFloat | None = 1.0
    train_fraction: float = Field(default=1.0, gt=0, le=1)  # stratified subset of the train split
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (falls back to eager, with a warning, where it cannot)
    seed: int = Field(default=0, ge=0, lt=2**63)  # torch seeds a generator with a 64-bit integer
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with several processes: replicate (DDP) or shard (FSDP2)
    fsdp_wrap: list[str] | None = None  # FSDP: the module classes sharded as units (None: the model's blocks)
    gpu: str | None = None  # the GPU `auto` size/batch is fitted to (None: the local device)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    schedule: Literal["cosine", "cosine-restarts", "constant"] = "cosine"
    restart_epochs: PositiveInt = 10  # cosine-restarts: length of the first cycle, doubling after
    contrastive_weight: NonNegativeFloat = 0.5  # clip/fusion: weight of the CLIP contrastive term
    checkpoint_every: PositiveInt = 1  # epochs between periodic checkpoints
    checkpoint_every_steps: NonNegativeInt = 0  # also checkpoint inside an epoch every N steps (0: off)
    keep_last: PositiveInt = 3  # periodic checkpoints kept (the best is always kept)
    eval_batch_size: BatchSize = 256
    # continual learning (clip, fusion): tasks > 0 turns it on (mmkit.train.continual)
    tasks: int = Field(default=0, ge=0, le=1000)  # class-incremental tasks; 0: ordinary training
    classes_per_task: PositiveInt = 2
    epochs_per_task: int = Field(default=10, gt=0, le=MAX_EPOCHS)
    buffer_size: int = Field(default=500, ge=0, le=10_000_000)  # replay memory, samples
    replay_ratio: float = Field(default=0.5, ge=0, lt=1)  # fraction of each batch drawn from memory
    text_cache: bool = True  # encode each class prompt once per step, not once per sample
    freeze_text_encoder: bool = False  # keep the text tower fixed (then prompts are encoded once)

    @field_validator("fsdp_wrap", mode="before")
    @classmethod
    def _class_names(cls, value: Any) -> Any:
        """`--set fsdp.wrap=[Block,Head]` arrives as one string: split it into class names."""
        if isinstance(value, str):
            return [name.strip() for name in value.strip().strip("[]").split(",") if name.strip()]
        return value


class TrainingPreset(TrainingRecipe):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str


# --------------------------------------------------------------------------------------------
# Finding and loading presets


def builtin_preset_dir() -> Path:
    """`mmkit/presets` inside an installed wheel, or `presets/` at the root of a source checkout."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "presets", package_dir.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"mmkit's built-in presets are missing (looked in {package_dir})")


def preset_dirs(kind: str) -> list[Path]:
    """Folders searched for presets of `kind`, highest priority first."""
    roots = [*MmkitSettings().preset_dirs, builtin_preset_dir()]
    return [root / kind for root in roots if (root / kind).is_dir()]


def available_presets(kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in preset_dirs(kind):
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise MmkitError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise MmkitError(f"{path}: invalid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise MmkitError(f"{path}: invalid TOML: nested too deeply") from None
    except OSError as exc:
        raise MmkitError(f"{path}: cannot read: {exc.strerror}") from None


def _load(kind: str, name: str, schema: type[BaseModel]) -> Any:
    presets = available_presets(kind)
    if name not in presets:
        raise unknown_choice("GPU preset" if kind == "gpus" else "training preset", name, presets)
    path = presets[name]
    data = read_toml(path)
    data.setdefault("name", name)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise MmkitError(validation_message(path, exc)) from None


def load_gpu_preset(name: str) -> GpuPreset:
    return _load("gpus", name, GpuPreset)


def load_training_preset(name: str) -> TrainingPreset:
    return _load("training", name, TrainingPreset)


# --------------------------------------------------------------------------------------------
# Precedence: defaults < preset file < MMKIT_* environment < flags


class TrainingSettings(BaseSettings, TrainingRecipe):
    """A training recipe resolved from all four layers. Environment: `MMKIT_EPOCHS=3`, ..."""

    model_config = SettingsConfigDict(env_prefix="MMKIT_", extra="forbid")


class _PresetSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def setting_source(preset_name: str, key: str, value: Any, flags: Mapping[str, Any] | None = None,
                   set_options: Mapping[str, Any] | None = None) -> str:
    """Where training setting `key` came from, written as the user gave it: `--batch-size 3`,
    `--set batch_size=3`, `MMKIT_BATCH_SIZE=3`, or `batch_size = 3 in PRESET_FILE`, so
    that an error about the value names what to change."""
    if flags and flags.get(key) is not None:
        return f"--{key.replace('_', '-')}" + ("" if isinstance(value, bool) else f" {value}")
    if set_options and key in set_options:
        return f"--set {key}={value}"
    env = {name.upper(): text for name, text in os.environ.items()}.get(f"MMKIT_{key.upper()}")
    if env is not None:
        return f"MMKIT_{key.upper()}={env}"
    path = available_presets("training").get(preset_name)
    if path is not None and key in read_toml(path):
        return f"{key} = {value} in {path}"
    return f"{key} {value} (the default; preset {preset_name!r} does not set it)"


def resolve_training(preset_name: str, flags: Mapping[str, Any] | None = None,
                     set_options: Mapping[str, Any] | None = None) -> TrainingSettings:
    """The training recipe of `preset_name` with environment, `--set` settings and flags applied
    on top. `flags` holds only the options the user actually gave (None values are dropped);
    `set_options` the training settings given with `--set` (a caller refuses a key given both
    ways). A bad value is reported as the user gave it (`setting_source`).
    """
    preset = load_training_preset(preset_name)
    file_values = preset.model_dump(exclude={"name"}, exclude_unset=True)

    class _Resolved(TrainingSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):  # type: ignore[override]
            return (init_settings, env_settings, _PresetSource(settings_cls, file_values))

    given = {k: v for k, v in (flags or {}).items() if v is not None}
    try:
        resolved = _Resolved(**{**(set_options or {}), **given})
    except ValidationError as exc:
        field, message = first_error(exc)
        if field in given or field in (set_options or {}) or f"MMKIT_{field.upper()}" in map(str.upper, os.environ):
            value = given.get(field, (set_options or {}).get(field))
            source = setting_source(preset_name, field, value, given, set_options)
            raise MmkitError(f"{source}: {message}") from None
        raise MmkitError(validation_message(f"training settings (preset {preset_name!r})", exc)) from None
    return TrainingSettings.model_construct(**resolved.model_dump())

