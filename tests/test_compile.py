"""`--compile`: the flag reaches the run, checkpoints keep plain keys, and where torch.compile cannot
run the run trains eagerly after one warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runhelpers import assert_bitwise_equal, last_model

import mmkit.train.compile as compile_module
from mmkit.models.registry import create_model
from mmkit.train.report import SilentReporter
from mmkit.train.run import train_run
from mmkit.train.resolve import RunOptions, resolve_run

TINY = {"epochs": 1, "train_fraction": 0.02}


class Recorder(SilentReporter):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


def test_the_compile_flag_is_saved_in_run_json_and_conflicts_with_set(tmp_path: Path) -> None:
    config = resolve_run(RunOptions(model="multichannel", preset="quick", device="cpu", **TINY, compile=True)).run_config()
    assert config.training.compile is True
    config.save(tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["training"]["compile"] is True
    from mmkit.errors import MmkitError

    with pytest.raises(MmkitError, match="compile is given twice"):
        resolve_run(RunOptions(model="multichannel", preset="quick", device="cpu", compile=True,
                               set_items=(("compile", True),)))


def test_without_a_compiler_the_run_warns_once_and_trains_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compile_module, "compile_unavailable_reason", lambda device_type="cpu": "no C++ compiler here")
    prepared = resolve_run(RunOptions(model="multichannel", preset="quick", device="cpu", **TINY, compile=True))
    reporter = Recorder()
    outcome = train_run(tmp_path / "run", prepared.run_config(), reporter=reporter, dataset=prepared.dataset)
    assert outcome.finished
    assert reporter.messages == ["warning: --compile: no C++ compiler here; training without it"]
    eager = resolve_run(RunOptions(model="multichannel", preset="quick", device="cpu", **TINY))
    train_run(tmp_path / "eager", eager.run_config(), dataset=eager.dataset)
    assert_bitwise_equal(last_model(tmp_path / "run"), last_model(tmp_path / "eager"))


def test_compile_model_keeps_the_state_dict_keys() -> None:
    if compile_module.compile_unavailable_reason("cpu"):
        pytest.skip("torch.compile cannot run here")
    model = create_model("multichannel")
    keys = list(model.state_dict())
    assert compile_module.compile_model(model, "cpu") is None  # compiles lazily: nothing runs yet
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow
def test_a_compiled_run_checkpoints_plain_weights_and_resumes(tmp_path: Path) -> None:
    if compile_module.compile_unavailable_reason("cpu"):
        pytest.skip("torch.compile cannot run here")
    prepared = resolve_run(RunOptions(model="multichannel", preset="quick", device="cpu", epochs=2,
                                      train_fraction=0.02, compile=True))
    run = tmp_path / "run"
    outcome = train_run(run, prepared.run_config(), stop_after_epochs=1, dataset=prepared.dataset)
    assert not outcome.finished
    weights = last_model(run)
    assert set(weights) == set(create_model("multichannel").state_dict())
    from mmkit.train.config import RunConfig

    resumed = train_run(run, RunConfig.load(run), resume=True)
    assert resumed.finished and resumed.epochs_done == 2
