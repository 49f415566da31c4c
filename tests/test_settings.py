"""Presets as data, and the precedence defaults < preset file < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmkit.errors import MmkitError
from mmkit.settings import (
    GpuPreset,
    TrainingPreset,
    available_presets,
    builtin_preset_dir,
    load_gpu_preset,
    load_training_preset,
    resolve_training,
)

REQUIRED_GPUS = {
    "rtx3050", "rtx3050-8gb", "gtx1650", "rtx3060", "rtx4090", "t4", "l4",
    "a100-40gb", "a100-80gb", "h100-80gb", "cpu",
}


def test_required_presets_ship() -> None:
    assert REQUIRED_GPUS <= set(available_presets("gpus"))
    assert {"quick", "half-data", "full"} <= set(available_presets("training"))


@pytest.mark.parametrize("name", sorted(available_presets("gpus")))
def test_every_gpu_preset_validates(name: str) -> None:
    gpu = load_gpu_preset(name)
    assert isinstance(gpu, GpuPreset) and gpu.name == name
    assert "fp32" in gpu.precisions
    # a precision is offered exactly when its peak throughput is given
    for precision in ("fp16", "bf16"):
        assert (precision in gpu.precisions) == (getattr(gpu.peak_tflops, precision) is not None)


@pytest.mark.parametrize("name", sorted(available_presets("gpus")))
def test_every_gpu_figure_says_where_it_comes_from(name: str) -> None:
    path = available_presets("gpus")[name]
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith("#"):
            comment = stripped.partition("#")[2].lower()
            assert "source" in comment or "assumption" in comment or stripped.startswith(
                ("display_name", "device_type", "precisions")
            ), f"{path.name}: figure without a source or assumption: {stripped}"


@pytest.mark.parametrize("name", sorted(available_presets("training")))
def test_every_training_preset_validates(name: str) -> None:
    assert isinstance(load_training_preset(name), TrainingPreset)


def test_rtx3050_is_the_4gb_laptop_part() -> None:
    gpu = load_gpu_preset("rtx3050")
    assert gpu.vram_bytes == 4 * 2**30
    lines = gpu.overhead_bytes(peak_tensor_bytes=1000)
    assert set(lines) == {"cuda_context", "workspace", "allocator_reserve"}
    assert lines["allocator_reserve"] == int(1000 * gpu.overhead.allocator_reserve_fraction)


def test_half_data_is_the_seed_recipe() -> None:
    recipe = load_training_preset("half-data")
    assert (recipe.train_fraction, recipe.epochs, recipe.lr) == (0.5, 50, 1e-4)
    assert (recipe.precision, recipe.grad_clip, recipe.batch_size) == ("fp16", 1.0, "auto")
    full = load_training_preset("full")
    assert (full.epochs, full.batch_size, full.train_fraction) == (100, 16, 1.0)


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(MmkitError, match=r"unknown GPU preset 'rtx9999'; valid: .*rtx3050"):
        load_gpu_preset("rtx9999")
    with pytest.raises(MmkitError, match=r"unknown training preset 'nope'; valid: .*half-data"):
        load_training_preset("nope")


def _user_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, name: str, text: str) -> Path:
    (tmp_path / kind).mkdir(parents=True, exist_ok=True)
    path = tmp_path / kind / f"{name}.toml"
    path.write_text(text)
    monkeypatch.setenv("MMKIT_PRESET_PATH", str(tmp_path))
    return path


def test_broken_preset_names_file_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = builtin_preset_dir() / "gpus" / "rtx3050.toml"
    path = _user_presets(
        tmp_path, monkeypatch, "gpus", "mygpu", good.read_text().replace("vram_gib = 4.0", 'vram_gib = "four"')
    )
    with pytest.raises(MmkitError) as exc:
        load_gpu_preset("mygpu")
    message = str(exc.value)
    assert str(path) in message and "'vram_gib'" in message and "\n" not in message


def test_broken_nested_field_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = builtin_preset_dir() / "gpus" / "rtx3050.toml"
    _user_presets(
        tmp_path, monkeypatch, "gpus", "mygpu",
        good.read_text().replace("allocator_reserve_fraction = 0.10", "allocator_reserve_fraction = 1.5"),
    )
    with pytest.raises(MmkitError, match=r"field 'overhead.allocator_reserve_fraction'"):
        load_gpu_preset("mygpu")


def test_invalid_toml_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _user_presets(tmp_path, monkeypatch, "training", "mine", "epochs = = 3\n")
    with pytest.raises(MmkitError, match="invalid TOML") as exc:
        load_training_preset("mine")
    assert str(path) in str(exc.value)


def test_unknown_field_in_preset_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_presets(tmp_path, monkeypatch, "training", "mine", "epochz = 3\n")
    with pytest.raises(MmkitError, match="field 'epochz'"):
        load_training_preset("mine")


def test_user_folder_adds_and_shadows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_presets(tmp_path, monkeypatch, "training", "quick", "epochs = 9\n")
    (tmp_path / "training" / "mine.toml").write_text("epochs = 4\n")
    assert load_training_preset("quick").epochs == 9
    assert load_training_preset("mine").epochs == 4
    assert load_gpu_preset("rtx3050").vram_gib == 4.0  # kinds the user folder lacks still resolve


def test_precedence_defaults_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_presets(tmp_path, monkeypatch, "training", "mine", "epochs = 4\nlr = 0.5\nseed = 3\n")
    resolved = resolve_training("mine")
    assert resolved.weight_decay == 0.01  # built-in default
    assert (resolved.epochs, resolved.lr, resolved.seed) == (4, 0.5, 3)  # preset file
    monkeypatch.setenv("MMKIT_EPOCHS", "6")
    monkeypatch.setenv("MMKIT_LR", "0.25")
    resolved = resolve_training("mine")
    assert (resolved.epochs, resolved.lr, resolved.seed) == (6, 0.25, 3)  # environment over file
    resolved = resolve_training("mine", {"lr": 0.125, "seed": None})
    assert (resolved.epochs, resolved.lr, resolved.seed) == (6, 0.125, 3)  # flags over env; None = not given


def test_bad_environment_value_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKIT_BATCH_SIZE", "lots")
    with pytest.raises(MmkitError, match=r"^MMKIT_BATCH_SIZE=lots: ") as exc:
        resolve_training("quick")
    assert "\n" not in str(exc.value)


def test_auto_batch_size_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKIT_BATCH_SIZE", "auto")
    assert resolve_training("quick").batch_size == "auto"
    monkeypatch.setenv("MMKIT_BATCH_SIZE", "12")
    assert resolve_training("quick").batch_size == 12
