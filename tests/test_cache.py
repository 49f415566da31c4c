"""The simulation cache: a repeated plan reuses its simulations, answers the same, and never reads a
result stored under another key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()
ARGS = ["memory-plan", "multichannel", "--gpu", "rtx3050", "--preset", "quick", "--size", "w1024", "--batch-size", "auto",
        "--json"]


def plan(*extra: str) -> dict:
    result = runner.invoke(app, [*ARGS, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def answer(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("simulations_cached", "notes")}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMKIT_CACHE_DIR", str(tmp_path))
    return tmp_path / "simulations"


def test_a_repeated_plan_is_answered_from_the_cache_and_equals_a_fresh_one(cache: Path) -> None:
    cold = plan()
    assert cold["simulations"] >= 2 and cold["simulations_cached"] == 0
    stored = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("train-step-") for name in stored) and any(n.startswith("inference-") for n in stored)
    warm = plan()
    assert warm["simulations_cached"] == warm["simulations"] == cold["simulations"]
    assert answer(warm) == answer(cold)
    bypassed = plan("--no-cache")
    assert bypassed["simulations_cached"] == 0 and answer(bypassed) == answer(cold)
    assert sorted(p.name for p in cache.iterdir()) == stored  # --no-cache neither reads nor writes


def test_a_changed_setting_simulates_again(cache: Path) -> None:
    plan()
    changed = plan("--precision", "fp32", "--batch-size", "8")
    assert changed["simulations_cached"] == 0


def test_a_result_stored_under_another_key_is_not_read(cache: Path) -> None:
    cold = plan()
    for path in cache.glob("train-step-*.json"):  # same file names, other keys: e.g. a hash collision
        document = json.loads(path.read_text())
        document["key"] = document["key"].replace('"batch_size"', '"batch"')
        document["value"]["peak_tensors"] = 1
        path.write_text(json.dumps(document))
    again = plan()
    assert again["simulations_cached"] == 0 and answer(again) == answer(cold)


def test_an_unreadable_cache_costs_a_simulation_not_an_error(cache: Path) -> None:
    plan()
    for path in cache.glob("*.json"):
        path.write_text("{not json")
    again = plan()
    assert again["simulations_cached"] == 0 and again["fits"]
