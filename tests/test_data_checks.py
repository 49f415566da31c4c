"""Bad data and bad settings are refused before the first step, in one line with exit code 2:
dtypes, tensors the model does not take, NaN/Inf, labels, a split without training samples,
`--set` values against the data, `--seed`, a model too large for the machine, unusable `--out`
paths; and run.json's data path works from any directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()
N = 60
TRAIN = ["train", "multichannel", "--preset", "quick", "--epochs", "1"]


def write_data(path: Path, *, color: torch.Tensor | None = None, classes: bool = True,
               **extra: torch.Tensor) -> str:
    """A tiny multichannel tensor file: color [N, 6], brightness [N, 2], 3 classes."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "color": torch.randn(N, 6, generator=generator) if color is None else color,
        "brightness": torch.randn(N, 2, generator=generator),
        "label": torch.arange(N) % 3,
        **extra,
    }
    save_file(tensors, str(path), metadata={"classes": json.dumps(["a", "b", "c"])} if classes else None)
    return str(path)


def invoke(args: list[str]):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *fragments: str) -> str:
    """The command stopped with one `mmkit: error:` line holding every fragment, exit code 2."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("mmkit: error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output and "internal error" not in result.output
    return errors[0]


@pytest.fixture
def data(tmp_path: Path) -> str:
    return write_data(tmp_path / "ok.safetensors")


# ---- dtypes and tensors the model does not take


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_another_float_dtype_is_converted_once_with_a_note(tmp_path: Path, dtype: torch.dtype) -> None:
    path = write_data(tmp_path / "f.safetensors", color=torch.randn(N, 6).to(dtype))
    result = invoke([*TRAIN, "--data", path, "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.output
    note = f"converted once to the model's dtypes: color {str(dtype).removeprefix('torch.')} → float32"
    assert note in result.output
    assert note in " ".join(json.loads((tmp_path / "run" / "run.json").read_text())["notes"])
    evaluated = invoke(["eval", tmp_path / "run", "--json"])  # eval converts the same way
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64])
def test_non_float_data_for_a_float_input_is_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    path = write_data(tmp_path / "i.safetensors", color=(torch.rand(N, 6) > 0.5).to(dtype))
    result = invoke([*TRAIN, "--data", path, "--out", tmp_path / "run"])
    refused(result, "tensor 'color'", str(dtype).removeprefix("torch."), "floating-point")
    assert not (tmp_path / "run").exists()


def test_tensors_no_input_takes_are_noted_once_and_ignored(tmp_path: Path) -> None:
    path = write_data(tmp_path / "extra.safetensors", depth=torch.randn(N, 4), mask=torch.ones(N, 2))
    result = invoke([*TRAIN, "--data", path, "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("ignoring tensors no input of the model takes: depth, mask") == 1
    resumed = invoke(["resume", tmp_path / "run", "--epochs", "2"])  # resume reads the file again
    assert resumed.exit_code == 0, resumed.output
    evaluated = invoke(["eval", tmp_path / "run", "--json"])
    assert evaluated.exit_code == 0, evaluated.output


# ---- labels and --set values against the data


def test_a_huge_label_without_classes_metadata_is_refused(tmp_path: Path) -> None:
    labels = torch.arange(N) % 3
    labels[5] = 2**40
    path = tmp_path / "big.safetensors"
    save_file({"color": torch.randn(N, 6), "brightness": torch.randn(N, 2), "label": labels}, str(path))
    result = invoke([*TRAIN, "--data", path, "--out", tmp_path / "run"])
    refused(result, str(path), str(2**40), "classes")


@pytest.mark.parametrize(("setting", "named"), [
    ("model.num_classes=2", ("num_classes=2", "num_classes=3")),
    ("model.color_dim=5", ("color_dim=5", "color_dim=6")),
])
def test_a_set_value_against_the_data_is_refused(tmp_path: Path, data: str, setting: str, named) -> None:
    result = invoke([*TRAIN, "--data", data, "--out", tmp_path / "run", "--set", setting])
    refused(result, *named)
    assert not (tmp_path / "run").exists()


def test_a_seed_outside_64_bits_is_refused(tmp_path: Path, data: str) -> None:
    for seed in (2**64, 2**63, -1):
        result = invoke([*TRAIN, "--data", data, "--out", tmp_path / "run", "--seed", seed])
        refused(result, "--seed")
    assert invoke([*TRAIN, "--data", data, "--out", tmp_path / "run", "--seed", 2**63 - 1]).exit_code == 0


def test_a_model_whose_states_exceed_the_machine_is_refused_before_allocation(tmp_path: Path) -> None:
    result = invoke([*TRAIN, "--out", tmp_path / "run", "--set", "model.hidden=[100000000,1]"])
    refused(result, "parameters", "GiB", "RAM")
    assert not (tmp_path / "run").exists()


# ---- NaN / Inf


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_nonfinite_inputs_are_refused_naming_tensor_split_and_sample(tmp_path: Path, value: float, word: str) -> None:
    color = torch.randn(N, 6)
    split = torch.zeros(N, dtype=torch.uint8)
    split[40:50], split[50:] = 1, 2
    color[43, 2] = value
    color[57, 0] = value
    path = write_data(tmp_path / "bad.safetensors", color=color, split=split)
    result = invoke([*TRAIN, "--data", path, "--out", tmp_path / "run"])
    refused(result, "tensor 'color'", word, "sample 43 (val split)", "and 1 more", "--allow-nonfinite")
    assert not (tmp_path / "run").exists()


def test_nonfinite_check_for_eval_and_compare_and_allow_nonfinite(tmp_path: Path, data: str) -> None:
    color = torch.randn(N, 6)
    split = torch.zeros(N, dtype=torch.uint8)
    split[40:50], split[50:] = 1, 2
    color[52, 1] = float("nan")  # a test sample
    bad = write_data(tmp_path / "bad.safetensors", color=color, split=split)
    assert invoke([*TRAIN, "--data", data, "--out", tmp_path / "run"]).exit_code == 0
    refused(invoke(["eval", tmp_path / "run", "--data", bad]), "sample 52 (test split)")
    assert invoke(["eval", tmp_path / "run", "--data", bad, "--split", "val"]).exit_code == 0  # val is finite
    assert invoke(["eval", tmp_path / "run", "--data", bad, "--allow-nonfinite"]).exit_code == 0
    compare = ["compare", "multichannel", "separate", "--data", bad, "--epochs", "0", "--seeds", "1"]
    refused(invoke(compare), "sample 52 (test split)")
    allowed = invoke([*TRAIN, "--data", bad, "--out", tmp_path / "allowed", "--allow-nonfinite"])
    assert "sample 52" not in allowed.output and (tmp_path / "allowed" / "run.json").exists()


# ---- splits


def test_a_val_split_holding_every_sample_is_refused_before_any_step(tmp_path: Path) -> None:
    path = write_data(tmp_path / "allval.safetensors", split=torch.ones(N, dtype=torch.uint8))
    result = invoke([*TRAIN, "--data", path, "--out", tmp_path / "run"])
    refused(result, "no training samples", "val 60")
    assert not (tmp_path / "run").exists()


# ---- --out


def test_unusable_out_paths_are_refused(tmp_path: Path, data: str) -> None:
    (tmp_path / "a-file").write_text("x")
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    cases = {
        tmp_path / "a-file": "is a file",
        tmp_path / "a-file" / "run": "a-file is a file",
        tmp_path / "loop-a": "symlink loop",
        tmp_path / "loop-a" / "run": "symlink loop",
    }
    for out, problem in cases.items():
        refused(invoke([*TRAIN, "--data", data, "--out", out]), f"--out {out}", problem)
    assert (tmp_path / "a-file").read_text() == "x"


def test_an_out_on_a_read_only_place_is_refused(tmp_path: Path, data: str) -> None:
    if os.geteuid() != 0:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    elif _refuses_a_directory(Path("/sys")):  # root writes anywhere chmod allows: use a read-only mount
        read_only = Path("/sys")
    else:
        pytest.skip("no read-only place to write to (root, and /sys takes new directories)")
    out = read_only / "run"
    refused(invoke([*TRAIN, "--data", data, "--out", out]), f"--out {out}", "cannot write")


def _refuses_a_directory(where: Path) -> bool:
    try:
        (where / "mmkit-probe").mkdir()
    except OSError:
        return True
    (where / "mmkit-probe").rmdir()
    return False


# ---- run.json's data path


def test_a_relative_data_path_resumes_and_evaluates_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_data(tmp_path / "a" / "mc.safetensors")
    monkeypatch.chdir(tmp_path / "a")
    assert invoke([*TRAIN, "--data", "mc.safetensors", "--out", "runs/x"]).exit_code == 0
    run_json = tmp_path / "a" / "runs" / "x" / "run.json"
    assert json.loads(run_json.read_text())["data"] == str(tmp_path / "a" / "mc.safetensors")
    monkeypatch.chdir(tmp_path / "b")
    assert invoke(["eval", "../a/runs/x", "--json"]).exit_code == 0
    assert invoke(["resume", "../a/runs/x", "--epochs", "2"]).exit_code == 0


def test_a_relative_data_path_of_an_older_run_is_found_above_the_run_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_data(tmp_path / "a" / "mc.safetensors")
    monkeypatch.chdir(tmp_path / "a")
    assert invoke([*TRAIN, "--data", "mc.safetensors", "--out", "runs/x"]).exit_code == 0
    run_json = tmp_path / "a" / "runs" / "x" / "run.json"
    document = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**document, "data": "mc.safetensors"}))  # as mmkit 0.1.0 wrote it
    monkeypatch.chdir(tmp_path / "b")
    result = invoke(["eval", "../a/runs/x", "--json"])
    assert result.exit_code == 0, result.output
    assert f"relative data path 'mc.safetensors', not found from here; using {tmp_path / 'a' / 'mc.safetensors'}" \
        in result.output
