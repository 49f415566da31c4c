"""`mmkit memory-plan` as users call it: the acceptance cases of the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()


def plan(*args: str) -> dict:
    result = runner.invoke(app, ["memory-plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_seed_case_rtx3050_defaults_to_lfm2_and_fits() -> None:
    doc = plan("--gpu", "rtx3050", "--device", "cuda")  # the run on the GPU itself: the preset's fp16
    assert doc["model"] == "lfm2" and doc["preset"] == "half-data"
    assert doc["fits"] is True
    assert doc["train"]["total"] <= doc["budget_bytes"] < doc["gpu"]["vram_bytes"]
    assert doc["batch_size"] >= 2  # half-data's min_batch_size
    assert doc["auto"] == {"size": True, "batch_size": True}
    assert doc["precision"] == "fp16"
    # maximal: the next batch is simulated and over budget (the ladder has nothing larger)
    assert doc["why"]["next_batch"]["batch_size"] == doc["batch_size"] + 1
    assert doc["why"]["next_batch"]["simulated"] and not doc["why"]["next_batch"]["fits"]
    train = doc["train"]
    categories = ("weights", "gradients", "optimizer", "activations", "other")
    assert sum(train[c] for c in categories) == train["peak_tensors"]
    assert train["total"] == train["peak_tensors"] + train["overhead"]
    assert set(train["overhead_lines"]) == {"cuda_context", "workspace", "allocator_reserve"}
    assert doc["inference"]["total"] == doc["inference"]["peak_tensors"] + doc["inference"]["overhead"]
    assert doc["time"]["total_seconds"] > 0 and doc["time"]["method"].startswith("predicted")
    assert doc["time"]["step_model"]["source"].startswith("datasheet: rtx3050")


def test_h100_trains_the_original_size() -> None:
    doc = plan("lfm2", "--gpu", "h100-80gb")
    assert doc["size"] == "original" and doc["fits"] is True


@pytest.mark.parametrize("model", ["multichannel", "separate"])
def test_adamw_state_is_twice_the_weights(model: str) -> None:
    doc = plan(model, "--gpu", "rtx3050", "--batch-size", "32", "--precision", "fp32")
    train = doc["train"]
    assert abs(train["optimizer"] - 2 * train["weights"]) <= 0.01 * train["weights"]


def test_no_43_percent_saving() -> None:
    args = ("--gpu", "rtx3050", "--batch-size", "32", "--precision", "fp32", "--size", "default")
    mc, sep = plan("multichannel", *args)["train"], plan("separate", *args)["train"]
    assert abs(mc["peak_tensors"] - sep["peak_tensors"]) <= 0.01 * mc["peak_tensors"]


@pytest.mark.parametrize(
    ("model", "size", "batch"), [("multichannel", "default", "512"), ("lfm2", "rtx3050", "4")]
)
def test_measure_on_cpu_agrees_within_3_percent(model: str, size: str, batch: str) -> None:
    doc = plan(model, "--gpu", "rtx3050", "--size", size, "--batch-size", batch,
               "--precision", "fp32", "--optimizer", "adamw", "--measure")
    measure = doc["measure"]
    assert measure["device"] == "cpu"
    assert abs(measure["error_percent"]) <= 3.0
    assert measure["measured_peak_tensors"] > 0 and all(t > 0 for t in measure["step_seconds"])
    assert measure["timed_steps"] == len(measure["step_seconds"]) == 5
    assert measure["step_seconds_p25"] <= measure["step_seconds_median"] <= measure["step_seconds_p75"]


def test_measured_steps_are_timed_without_the_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    """One step runs under the live-storage tracker (the peak); the timed ones run without it."""
    import mmkit.plan.memory as memory

    tracked, timed = [], []
    enter, step = memory.LiveStorageTracker.__enter__, memory.training_step
    monkeypatch.setattr(memory.LiveStorageTracker, "__enter__", lambda self: tracked.append(1) or enter(self))
    monkeypatch.setattr(memory, "training_step", lambda *a, **k: timed.append(k["on_phase"]) or step(*a, **k))
    settings = memory.StepSettings(batch_size=8, precision="fp32")
    from mmkit.models.registry import get_model_entry, size_config

    entry = get_model_entry("multichannel")
    measurement = memory.measure_training_steps(entry, size_config(entry, "default")[1], settings, steps=4)
    assert len(measurement.step_seconds) == 4 and len(tracked) == 1
    # warm-up, the tracked step, then 4 steps with no phase callback (no tracker attached)
    assert len(timed) == 6 and all(getattr(f, "__name__", "") == "<lambda>" for f in (timed[0], *timed[2:]))


def test_environment_chooses_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKIT_MODEL", "multichannel")
    assert plan("--gpu", "rtx3050", "--size", "default", "--batch-size", "8")["model"] == "multichannel"


def test_cpu_plan_runs_the_probed_precision_with_a_note() -> None:
    result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "cpu", "--size", "default",
                                 "--batch-size", "8", "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    # half-data asks for fp16; a CPU runs bf16 where it is faster (the tests pin the speed-up at ×2)
    assert doc["precision"] == "bf16"
    assert any("the preset asks fp16" in note and "pinned" in note for note in doc["notes"])


def test_a_gpu_plan_on_a_cpu_machine_is_what_train_runs_here() -> None:
    result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "rtx3050", "--size", "default",
                                 "--batch-size", "8", "--json"], env={"MMKIT_CPU_BF16_SPEEDUP": "0.5"})
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["precision"] == "fp32"  # bf16 slower here: train would run fp32, so the plan does
    assert any("--device cuda plans the run on the rtx3050 itself" in note for note in doc["notes"])
    on_gpu = plan("multichannel", "--gpu", "rtx3050", "--size", "default", "--batch-size", "8", "--device", "cuda")
    assert on_gpu["precision"] == "fp16"


def test_table_output_labels_what_is_simulated_and_what_is_predicted() -> None:
    result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "rtx3050", "--size", "default",
                                 "--batch-size", "32", "--precision", "fp32"])
    assert result.exit_code == 0
    for text in ("peak tensors", "simulated", "CUDA context", "(preset)", "fits", "predicted from datasheet figures"):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--gpu", "nosuch"), "unknown GPU preset 'nosuch'; valid: "),
        (("nosuch", "--gpu", "rtx3050"), "unknown model 'nosuch'"),
        (("--gpu", "rtx3050", "--preset", "nope"), "unknown training preset 'nope'"),
        (("--gpu", "gtx1650", "--precision", "bf16", "--device", "cuda"), "does not support bf16"),
        (("--gpu", "rtx3050", "--batch-size", "many"), "--batch-size expects a positive integer or 'auto'"),
        (("multichannel", "--gpu", "rtx3050", "--grad-checkpointing"), "does not support gradient checkpointing"),
        (("--gpu", "rtx3050", "--prefer", "speed"), "--prefer must be"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: tuple[str, ...], expected: str) -> None:
    result = runner.invoke(app, ["memory-plan", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_unknown_gpu_lists_the_presets() -> None:
    result = runner.invoke(app, ["memory-plan", "--gpu", "nosuch"])
    assert result.exit_code == 2
    assert "rtx3050" in result.stderr and "h100-80gb" in result.stderr and "cpu" in result.stderr


def test_without_data_the_plan_uses_the_models_default_data_as_train_does() -> None:
    default = plan("lfm2", "--gpu", "rtx3050", "--size", "rtx3050", "--batch-size", "4")
    with_data = plan("lfm2", "--gpu", "rtx3050", "--size", "rtx3050", "--batch-size", "4", "--data", "synthetic-av")
    assert default["train"] == with_data["train"]  # lfm2 trains on synthetic-av unless told otherwise
    assert with_data["time"]["train_samples"] == 960  # half-data's 50 % of 1920


def test_data_gives_the_input_shapes_train_uses(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    n = 12  # shorter clips than synthetic-av's 64 frames: fewer activations
    tensors = {"audio": torch.randn(n, 16, 40), "video": torch.randn(n, 8, 3, 24, 24),
               "label": torch.arange(n) % 8, "split": torch.tensor([0] * 8 + [1] * 2 + [2] * 2, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "short.safetensors")
    default = plan("lfm2", "--gpu", "rtx3050", "--size", "rtx3050", "--batch-size", "4")
    short = plan("lfm2", "--gpu", "rtx3050", "--size", "rtx3050", "--batch-size", "4",
                 "--data", str(tmp_path / "short.safetensors"))
    assert short["train"]["peak_tensors"] < default["train"]["peak_tensors"]
    assert short["time"]["train_samples"] == 4  # half-data's 50 % of 8


def test_data_that_does_not_fit_the_model_is_one_line() -> None:
    result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "rtx3050", "--data", "synthetic-av"])
    assert result.exit_code == 2 and "expects inputs color, brightness" in result.stderr
