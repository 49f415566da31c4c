"""`--target-batch N`: the planner searches precision, activation checkpointing and micro-batch ×
accumulation = N, ranks what fits by predicted speed, and `train` runs the winner."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from runhelpers import history, write_test_gpus
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()

@pytest.fixture
def tiny_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A 72 MiB card: the multichannel model fits, but not a batch of 256 at once."""
    monkeypatch.setenv("MMKIT_PRESET_PATH", str(write_test_gpus(tmp_path, {"gpu-70m": 0.07})))
    return "gpu-70m"


def plan(*args: str) -> dict:
    result = runner.invoke(app, ["memory-plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_lfm2_on_a_4gb_card_without_bf16_gets_a_ranked_plan_whose_winner_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # --measure takes the real step's peak without timing five more steps after it: the peak is what
    # this checks, and a step of lfm2 at batch 64 takes about 16 s on a 2-core CPU
    from mmkit.plan import memory, planner

    monkeypatch.setattr(planner, "measure_training_steps",
                        functools.partial(memory.measure_training_steps, steps=0))
    doc = plan("lfm2", "--gpu", "gtx1650", "--target-batch", "64", "--precision", "auto", "--grad-checkpointing",
               "auto", "--device", "cuda", "--measure")
    search = doc["search"]
    winner = search["ranked"][0]
    assert winner["micro_batch"] * winner["accumulation"] == 64 and winner["total"] <= doc["budget_bytes"]
    assert {o["precision"] for o in search["ranked"]} == {"fp32", "fp16"}  # the card's precisions, no bf16
    assert {o["gradient_checkpointing"] for o in search["ranked"]} == {False, True}
    # what the plan shows is the winner, and its simulated peak is a real CPU step's at that micro-batch
    assert (doc["precision"], doc["gradient_checkpointing"], doc["per_rank_batch_size"]) == (
        winner["precision"], winner["gradient_checkpointing"], winner["micro_batch"])
    assert search["time_source"].startswith("datasheet: gtx1650")
    measure = doc["measure"]
    if winner["precision"] == "fp32":
        assert measure["measured_peak_tensors"] == measure["predicted_peak_tensors"]
    else:
        assert abs(measure["error_percent"]) <= 3.0


def test_nothing_ranked_below_the_winner_is_predicted_faster_and_the_micro_batch_is_the_largest(tiny_gpu: str) -> None:
    doc = plan("multichannel", "--gpu", tiny_gpu, "--target-batch", "256", "--precision", "auto",
               "--device", "cuda", "--size", "default")
    ranked = doc["search"]["ranked"]
    speeds = [o["samples_per_s"] for o in ranked]
    assert speeds == sorted(speeds, reverse=True) and len(ranked) == 2  # fp32 and bf16; no checkpointing here
    winner = ranked[0]
    assert winner["accumulation"] > 1  # the card cannot hold 256 at once
    following = doc["search"]["next_micro_batch"]
    assert following["batch_size"] > winner["micro_batch"] and 256 % following["batch_size"] == 0
    assert not following["fits"]
    assert any(line.startswith("micro-batch: the next divisor of 256") for line in doc["search"]["rejected"])
    assert any(line.startswith("fp32: ") or line.startswith("bf16: ") for line in doc["search"]["rejected"])


def test_train_runs_the_winner_and_one_optimizer_step_sees_the_target_batch(tiny_gpu: str, tmp_path: Path) -> None:
    run = tmp_path / "R"
    planned = plan("multichannel", "--gpu", tiny_gpu, "--target-batch", "256", "--size", "default",
                   "--preset", "quick", "--set", "train_fraction=0.1")["search"]["ranked"][0]
    result = runner.invoke(app, ["train", "multichannel", "--gpu", tiny_gpu, "--target-batch", "256", "--size",
                                 "default", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.1",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "run.json").read_text())
    assert config["training"]["batch_size"] == 256
    assert config["training"]["grad_accum"] == planned["accumulation"] > 1
    assert config["fit"]["search"]["ranked"][0] == planned | {"step_seconds": config["fit"]["search"]["ranked"][0][
        "step_seconds"], "samples_per_s": config["fit"]["search"]["ranked"][0]["samples_per_s"]}
    train_samples = 500  # a tenth of synthetic-cifar's 5,000 training images
    assert history(run)[0]["step"] == -(-train_samples // 256)  # one optimizer step per 256 samples


@pytest.mark.parametrize(("args", "message"), [
    (("--precision", "auto"), "--precision auto searches the precisions with --target-batch"),
    (("--target-batch", "64", "--batch-size", "32"), "--target-batch chooses the micro-batch"),
    (("--target-batch", "64", "--size", "auto"), "give a size (--size NAME), not auto"),
    (("--target-batch", "64", "--nproc", "2"), "--target-batch plans one process"),
])
def test_search_options_that_contradict_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "rtx3050", *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
