"""Every command answers a user's mistake with one line on stderr and exit code 2, never a
traceback: unknown names, broken or absurd presets, conflicting flags, missing paths, not-a-run."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.settings import builtin_preset_dir

runner = CliRunner()

BAD_PRESETS = {
    "training/broken.toml": "epochs = [1,\n",
    "training/negative.toml": "lr = -0.001\n",
    "training/absurd.toml": "batch_size = 1000000000\n",
    "training/typo.toml": "epohcs = 3\n",
    "gpus/broken.toml": "vram_gib = \n",
}


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    presets = root / "presets"
    for name, text in BAD_PRESETS.items():
        (presets / name).parent.mkdir(parents=True, exist_ok=True)
        (presets / name).write_text(text)
    rtx = (builtin_preset_dir() / "gpus" / "rtx3050.toml").read_text()
    (presets / "gpus" / "negative.toml").write_text(rtx.replace("vram_gib = 4.0", "vram_gib = -4.0"))
    run = root / "run"
    result = runner.invoke(app, ["train", "multichannel", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.1",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    (root / "empty").mkdir()
    (root / "a-file").write_text("not a run")
    broken_run = root / "broken-run"
    shutil.copytree(run, broken_run)
    (broken_run / "run.json").write_text("{")
    return {"presets": str(presets), "run": str(run), "empty": str(root / "empty"),
            "file": str(root / "a-file"), "broken_run": str(broken_run), "missing": str(root / "nope.safetensors")}


CASES = {
    # count
    "count/unknown-model": ("count nosuch", "unknown model 'nosuch'; valid: "),
    "count/unknown-size": ("count lfm2 --size nosuch", "unknown size 'nosuch' for model 'lfm2'"),
    "count/unknown-setting": ("count multichannel --set bogus=1", "unknown model setting 'bogus'"),
    "count/negative-width": ("count multichannel --set width=-3", "invalid model setting 'width'"),
    "count/negative-hidden": ("count multichannel --set hidden=[-3,2]", "invalid model setting 'hidden.0'"),
    "count/unknown-option": ("count multichannel --bogus", "No such option: --bogus"),
    # memory-plan
    "memory-plan/unknown-gpu": ("memory-plan --gpu nosuch", "unknown GPU preset 'nosuch'; valid: "),
    "memory-plan/unknown-model": ("memory-plan nosuch --gpu rtx3050", "unknown model 'nosuch'"),
    "memory-plan/unknown-preset": ("memory-plan --preset nosuch", "unknown training preset 'nosuch'"),
    "memory-plan/invalid-toml": ("memory-plan --preset broken", "broken.toml"),
    "memory-plan/invalid-gpu-toml": ("memory-plan --gpu broken", "broken.toml"),
    "memory-plan/negative-vram": ("memory-plan --gpu negative", "vram_gib"),
    "memory-plan/conflicting-flags": ("memory-plan --gpu rtx3050 --batch-size 8 --prefer batch",
                                      "--prefer batch only applies when size and batch are both auto"),
    "memory-plan/margin-out-of-range": ("memory-plan --margin 2", "Invalid value for '--margin'"),
    "memory-plan/missing-data": ("memory-plan multichannel --data {missing}", "data file not found"),
    "memory-plan/bad-precision": ("memory-plan --precision fp8", "unknown precision 'fp8'"),
    "memory-plan/absurd-batch": ("memory-plan --batch-size 2000000", "--batch-size 2000000: Input should be less"),
    # train
    "train/unknown-model": ("train nosuch", "unknown model 'nosuch'"),
    "train/unknown-size": ("train multichannel --size nosuch", "--size nosuch: unknown size 'nosuch'"),
    "train/unknown-size-set": ("train multichannel --set size=nosuch", "--set size=nosuch: unknown size 'nosuch'"),
    "train/unknown-preset": ("train multichannel --preset nosuch", "unknown training preset 'nosuch'"),
    "train/invalid-toml": ("train multichannel --preset broken", "broken.toml"),
    "train/negative-value": ("train multichannel --preset negative", "field 'lr'"),
    "train/absurd-value": ("train multichannel --preset absurd", "field 'batch_size'"),
    "train/unknown-field": ("train multichannel --preset typo", "epohcs"),
    "train/unknown-gpu": ("train lfm2 --batch-size auto --gpu nosuch", "unknown GPU preset 'nosuch'"),
    "train/conflicting-flags": ("train multichannel --batch-size 8 --set batch_size=16",
                                "batch_size is given twice"),
    "train/missing-data": ("train multichannel --data {missing}", "data file not found"),
    "train/unknown-data": ("train multichannel --data nosuch", "unknown dataset 'nosuch'"),
    "train/zero-epochs": ("train multichannel --epochs 0", "Invalid value for '--epochs'"),
    "train/bad-batch": ("train multichannel --batch-size zero", "--batch-size expects a positive integer"),
    # an error about a value names the flag, the --set or the preset file it came from
    "train/zero-fraction": ("train multichannel --train-fraction 0", "--train-fraction 0.0: Input should be greater"),
    "train/zero-fraction-set": ("train multichannel --set train_fraction=0", "--set train_fraction=0: Input should"),
    "train/absurd-batch-flag": ("train multichannel --batch-size 2000000", "--batch-size 2000000: Input should be less"),
    "train/batch-split-flag": ("train multichannel --batch-size 3 --nproc-per-node 2",
                               "--batch-size 3 is the global batch and must split evenly across 2 processes"),
    "train/batch-split-set": ("train multichannel --set batch_size=3 --nproc-per-node 2",
                              "--set batch_size=3 is the global batch"),
    "train/batch-split-preset": ("train multichannel --nproc-per-node 3", "quick.toml is the global batch"),
    "train/continual-epochs": ("train clip --preset continual --epochs 3",
                               "--epochs 3: a continual recipe trains tasks × epochs_per_task epochs (5 × 10;"),
    "train/continual-epochs-set": ("train clip --preset continual --set epochs=3", "--set epochs=3: a continual recipe"),
    "train/continual-other-model": ("train multichannel --set tasks=2", "continual training (--set tasks=2) needs"),
    "train/no-cuda": ("train multichannel --device cuda", "no CUDA device"),
    "train/existing-run": ("train multichannel --out {run}", "already holds a run"),
    "train/missing-model": ("train", "Missing argument 'model'"),
    # resume
    "resume/not-a-run": ("resume {empty}", "is not an mmkit run: run.json is missing"),
    "resume/missing": ("resume {missing}", "run directory not found"),
    "resume/a-file": ("resume {file}", "run directory not found"),
    "resume/broken-run-json": ("resume {broken_run}", "run.json: invalid JSON"),
    "resume/zero-epochs": ("resume {run} --epochs 0", "Invalid value for '--epochs'"),
    "resume/set-batch-size": ("resume {run} --set batch_size=8", "--set batch_size: resume can change only lr, "
                              "grad_clip, epochs, checkpoint_every, checkpoint_every_steps, keep_last, strategy;"),
    "resume/set-model-key": ("resume {run} --set model.width=8", "--set model.width: resume can change only lr,"),
    "resume/set-bad-lr": ("resume {run} --set lr=-1", "--set lr=-1: Input should be greater than 0"),
    "resume/set-zero-epochs": ("resume {run} --set epochs=0", "--set epochs=0: Input should be greater than 0"),
    "resume/set-epochs-twice": ("resume {run} --epochs 2 --set epochs=2", "epochs is given twice, as --epochs and "
                                "as --set epochs=...; keep one"),
    "resume/set-not-key-value": ("resume {run} --set lr", "--set expects key=value, got 'lr'"),
    # eval
    "eval/not-a-run": ("eval {empty}", "is not an mmkit run"),
    "eval/missing-data": ("eval {run} --data {missing}", "data file not found"),
    "eval/unknown-checkpoint": ("eval {run} --checkpoint nosuch", "unknown checkpoint 'nosuch'"),
    "eval/no-such-step": ("eval {run} --checkpoint 99999", "no checkpoint at step 99999"),
    "eval/bad-split": ("eval {run} --split train", "unknown split 'train'; valid: test, val"),
    "eval/other-model-data": ("eval {run} --data synthetic-av", "does not fit the run's model 'multichannel'"),
    # compare
    "compare/unknown-model": ("compare multichannel nosuch", "unknown model 'nosuch'"),
    "compare/unknown-size": ("compare lfm2:nosuch multichannel", "unknown size 'nosuch'"),
    "compare/unknown-preset": ("compare multichannel separate --preset nosuch", "unknown training preset"),
    "compare/missing-data": ("compare multichannel separate --data {missing}", "data file not found"),
    "compare/bad-mode": ("compare multichannel separate --separate-mode weird", "--separate-mode must be"),
    "compare/set-seed": ("compare multichannel separate --set seed=3", "compare trains seeds 0…K−1 itself"),
    "compare/set-size": ("compare multichannel separate --set size=default", "MODEL:SIZE"),
    "compare/one-model": ("compare multichannel", "Missing argument"),
    "compare/continual-epochs": ("compare clip@continual fusion --epochs 2", "--epochs 2: a continual recipe"),
    # anything
    "unknown-command": ("nosuch", "No such command 'nosuch'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(
    case: str, places: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMKIT_PRESET_PATH", places["presets"])
    command, expected = CASES[case]
    result = runner.invoke(app, [word.format(**places) for word in command.split()])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("mmkit: error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == "" and "Traceback" not in result.stderr

