"""Continual learning: the task stream, the replay buffer, the prompt cache and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runhelpers import KILL_BEFORE_STEP_DRIVER, assert_bitwise_equal, history, last_checkpoint, last_model
from typer.testing import CliRunner

import mmkit.train.engine as engine
from mmkit.cli.app import app
from mmkit.cli.progress import RichReporter
from mmkit.errors import MmkitError
from mmkit.models.registry import create_model
from mmkit.train.continual import (
    PromptEmbeddings,
    ReplayBuffer,
    class_incremental_tasks,
    continual_forward_loss,
    prompt_tokens,
)

runner = CliRunner()
# 3 tasks of 2 classes, 2 epochs each, on a tenth of synthetic-fashion with a small clip: seconds
TINY = ("--preset", "continual", "--size", "w64", "--train-fraction", "0.1", "--batch-size", "32",
        "--set", "tasks=3", "--set", "epochs_per_task=2", "--set", "buffer_size=60", "--set", "precision=fp32")
# its stream: task 1 = epochs 1-2 of 4 steps (steps 1-8), task 2 = epochs 3-4 of 8 (9-24, replay on),
# task 3 = epochs 5-6 of 8 (25-40)
EVERY_5_STEPS = ("--set", "checkpoint_every_steps=5")
TIMINGS: dict[str, float] = {}  # seconds the straight run took on this machine


def test_tasks_are_disjoint_seeded_groups_of_classes() -> None:
    tasks = class_incremental_tasks(10, 2, 5, seed=0)
    assert sorted(c for task in tasks for c in task) == list(range(10))
    assert all(len(task) == 2 for task in tasks)
    assert tasks == class_incremental_tasks(10, 2, 5, seed=0) != class_incremental_tasks(10, 2, 5, seed=1)
    with pytest.raises(MmkitError, match="need 12 classes"):
        class_incremental_tasks(10, 3, 4, seed=0)


def test_replay_buffer_is_class_balanced_and_survives_a_round_trip() -> None:
    generator = torch.Generator().manual_seed(0)
    buffer = ReplayBuffer(10)
    buffer.add_classes({0: torch.arange(0, 100), 1: torch.arange(100, 200)}, generator)
    assert {c: m.numel() for c, m in buffer.members.items()} == {0: 5, 1: 5}
    before = {c: m.clone() for c, m in buffer.members.items()}
    buffer.add_classes({2: torch.arange(200, 300)}, generator)
    # 10 slots over 3 classes: 4 + 3 + 3, the first class to arrive takes the remainder
    assert {c: m.numel() for c, m in buffer.members.items()} == {0: 4, 1: 3, 2: 3}
    assert torch.equal(buffer.members[0], before[0][:4]) and torch.equal(buffer.members[1], before[1][:3])
    assert all(((m >= 100 * c) & (m < 100 * (c + 1))).all() for c, m in buffer.members.items())
    assert len(set(buffer.sample(10, generator).tolist())) == 10  # without replacement
    again = ReplayBuffer.from_tensors(10, buffer.to_tensors(), dataset_size=300)
    assert again.classes == buffer.classes
    assert all(torch.equal(again.members[c], buffer.members[c]) for c in buffer.classes)
    with pytest.raises(ValueError, match="outside the dataset"):
        ReplayBuffer.from_tensors(10, buffer.to_tensors(), dataset_size=200)


@pytest.mark.parametrize("model_name", ["clip", "fusion"])
def test_the_prompt_cache_changes_no_logit_and_encodes_each_class_once(model_name: str) -> None:
    torch.manual_seed(0)
    model = create_model(model_name, "w64", dropout=0.0)
    labels = torch.tensor([3, 1, 3, 3, 0, 1, 3, 0])
    inputs = model.example_inputs(len(labels), seed=1)
    tokens = prompt_tokens(tuple(f"class {i}" for i in range(10)), model.config.context_length)
    cached, per_sample = PromptEmbeddings(tokens, enabled=True), PromptEmbeddings(tokens, enabled=False)
    for grad in (True, False):  # training (the text tower learns) and evaluation
        with torch.set_grad_enabled(grad):
            a, targets_a = cached.for_labels(model, labels)
            b, targets_b = per_sample.for_labels(model, labels)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # 3 prompts encoded vs 8
            assert torch.equal(targets_a, targets_b) and targets_a.tolist() == [2, 1, 2, 2, 0, 1, 2, 0]
            loss_a = continual_forward_loss(cached, 0.3, 0.0)(model, inputs, labels)
            loss_b = continual_forward_loss(per_sample, 0.3, 0.0)(model, inputs, labels)
            torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert per_sample.encoded == 4 * len(labels)
    assert cached.encoded == 2 * 3 + 3  # per step while training; kept across calls under no_grad


def test_a_frozen_text_encoder_encodes_each_prompt_once_for_the_whole_run() -> None:
    model = create_model("clip", "w64")
    for p in [*model.text_encoder.parameters(), *model.projection.text.parameters()]:
        p.requires_grad_(False)
    prompts = PromptEmbeddings(prompt_tokens(tuple("abcdefghij"), model.config.context_length), enabled=True)
    for labels in ([0, 1, 1], [1, 2], [2, 0, 0, 1]):
        prompts.for_labels(model, torch.tensor(labels))
    assert prompts.encoded == 3


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("continual") / "R"
    started = time.perf_counter()
    result = runner.invoke(app, ["train", "clip", *TINY, "--out", str(run)])
    TIMINGS["run"] = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    return run


def test_a_continual_run_writes_the_accuracy_matrix(straight: Path) -> None:
    records = history(straight)
    assert [r["task"] for r in records] == [1, 1, 2, 2, 3, 3]
    rows = [r["accuracies"] for r in records if "accuracies" in r]
    assert len(rows) == 3 and all(len(row) == 3 for row in rows)
    assert rows[0][0] > 0.6  # two classes learned
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["continual"]["matrix"] == rows
    assert len(metrics["tasks"]) == 3 and metrics["prompts_encoded"] > 0
    final = rows[-1]
    assert metrics["continual"]["average_accuracy"] == pytest.approx(sum(final) / 3)
    assert metrics["continual"]["forgetting"] == pytest.approx((rows[0][0] - final[0] + rows[1][1] - final[1]) / 2)
    result = runner.invoke(app, ["eval", str(straight)])
    assert result.exit_code == 0, result.output
    assert "accuracy matrix R" in result.output and "forgetting" in result.output
    document = json.loads(runner.invoke(app, ["eval", str(straight), "--json"]).stdout)
    assert document["continual"]["matrix"] == rows


def test_resume_in_the_middle_of_the_stream_is_exact(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "R"
    result = runner.invoke(app, ["train", "clip", *TINY, "--out", str(run), "--stop-after-epochs", "4"])
    assert result.exit_code == 0, result.output  # stopped after task 2
    assert len([r for r in history(run) if "accuracies" in r]) == 2
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "from step-00000024 (task 3, epoch 5)" in " ".join(result.output.split())
    assert_bitwise_equal(last_model(straight), last_model(run))
    assert json.loads((run / "metrics.json").read_text())["continual"] == \
        json.loads((straight / "metrics.json").read_text())["continual"]


def comparable(records: list[dict]) -> list[dict]:
    """History records without the figures that time the run."""
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "samples_per_s")} for r in records]


@pytest.fixture(scope="module")
def time_limit(straight: Path) -> float:
    """Seconds a process running the whole stream may take here: its start-up, measured, plus
    three times the straight run's measured steps (wall time per step × steps)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mmkit.cli.app"], check=True)
    steps = history(straight)[-1]["step"]
    return time.perf_counter() - started + 3 * steps * (TIMINGS["run"] / steps)




def test_kill_9_mid_task_then_resume_is_bitwise_identical(straight: Path, time_limit: float, tmp_path: Path) -> None:
    run, driver = tmp_path / "R", tmp_path / "driver.py"
    driver.write_text(KILL_BEFORE_STEP_DRIVER)
    # killed before step 14, in task 2's first epoch; the checkpoint of step 10 is its 2nd of 8 steps
    process = subprocess.run(
        [sys.executable, str(driver), "14", "train", "clip", *TINY, *EVERY_5_STEPS, "--out", str(run)],
        capture_output=True, text=True, timeout=time_limit,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    trainer = json.loads((last_checkpoint(run) / "trainer_state.json").read_text())
    assert (trainer["global_step"], trainer["epoch"], trainer["batches_in_epoch"]) == (10, 2, 2)
    assert 13 - trainer["global_step"] <= 5  # steps 11-13 lost, at most the 5 between checkpoints

    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "from step-00000010 (task 2, epoch 3, after step 2 of 8)" in " ".join(result.output.split())
    assert_bitwise_equal(last_model(straight), last_model(run))
    assert comparable(history(run)) == comparable(history(straight))
    assert json.loads((run / "metrics.json").read_text())["continual"] == \
        json.loads((straight / "metrics.json").read_text())["continual"]


def test_sigterm_mid_task_checkpoints_inside_the_epoch_and_resumes_exactly(
    straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during step 27 (3rd of 8 in epoch 5, task 3), then during step 32 (that epoch's
    last): each time the step finishes and is checkpointed, and `resume` goes on from it — the
    step bar at the resumed step, the epoch's lr its last step's."""
    real_step, calls = engine.StepRunner.step, [0]

    def step(self, *args, **kwargs):
        calls[0] += 1  # counted across the three runs below: call N is step N
        if calls[0] in (27, 32):
            os.kill(os.getpid(), signal.SIGTERM)  # caught by mmkit's handler after this step
        return real_step(self, *args, **kwargs)

    real_start, starts = RichReporter.epoch_start, []

    def epoch_start(self, epoch, epochs, steps, done=0):
        starts.append((epoch, done))
        return real_start(self, epoch, epochs, steps, done)

    monkeypatch.setattr(engine.StepRunner, "step", step)
    monkeypatch.setattr(RichReporter, "epoch_start", epoch_start)
    run = tmp_path / "R"
    result = runner.invoke(app, ["train", "clip", *TINY, *EVERY_5_STEPS, "--out", str(run)])
    assert result.exit_code == 143, result.output
    trainer = json.loads((last_checkpoint(run) / "trainer_state.json").read_text())
    assert (trainer["global_step"], trainer["epoch"], trainer["batches_in_epoch"]) == (27, 4, 3)

    starts.clear()
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 143, result.output
    assert "from step-00000027 (task 3, epoch 5, after step 3 of 8)" in " ".join(result.output.split())
    assert starts == [(5, 3)]
    assert last_checkpoint(run).name == "step-00000032"

    starts.clear()
    result = runner.invoke(app, ["resume", str(run)])
    assert result.exit_code == 0, result.output
    assert starts == [(5, 8), (6, 0)]
    assert_bitwise_equal(last_model(straight), last_model(run))
    assert comparable(history(run)) == comparable(history(straight))  # the lr of epoch 5 included


def test_fusion_runs_the_same_stream(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "fusion", *TINY, "--set", "tasks=2", "--out", str(tmp_path / "F")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "F" / "metrics.json").read_text())["continual"]["matrix"]) == 2


def test_continual_needs_an_image_text_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "multichannel", "--preset", "continual", "--out", str(tmp_path / "X")])
    assert result.exit_code == 2
    assert "continual training (tasks = 5 in " in result.stderr and "needs an image-text model" in result.stderr


@pytest.mark.slow
def test_compare_runs_clip_and_fusion_through_the_same_stream(tmp_path: Path) -> None:
    markdown = tmp_path / "table.md"
    result = runner.invoke(app, [
        "compare", "clip", "fusion", "--size", "w64", "--preset", "continual", "--seeds", "1", "--batch-size", "32",
        "--set", "tasks=2", "--set", "epochs_per_task=1", "--set", "buffer_size=40", "--set", "precision=fp32",
        "--set", "train_fraction=0.1", "--device", "cpu", "--json", "--markdown", str(markdown),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["settings"]["set"]["tasks"] == 2
    for side in ("a", "b"):
        learning = doc[side]["learning"]
        assert (learning["tasks"], learning["epochs_per_task"]) == (2, 1)
        run = learning["runs"][0]
        assert len(run["matrix"]) == 2 and len(run["matrix"][0]) == 2
        first, final = run["matrix"][0][0], run["matrix"][1][0]
        assert run["forgetting"] == pytest.approx(first - final)  # two tasks: both definitions agree
        assert run["bwt"] == pytest.approx(final - first)
        assert run["average_accuracy"] == pytest.approx(sum(run["matrix"][1]) / 2)
    text = markdown.read_text()
    assert "2 tasks × 1 epochs" in text and "| forgetting (first-learned − final), mean ± std |" in text
