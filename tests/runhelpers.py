"""What the training tests share: reading a run directory back and comparing weights bitwise."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkit.cli.app import app


def trained_run(folder: Path, args: tuple[str, ...]) -> Path:
    """`mmkit ARGS --out FOLDER/R`, in process; the run directory, after checking it succeeded."""
    run = folder / "R"
    result = CliRunner().invoke(app, [*args, "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


def last_checkpoint(run: Path) -> Path:
    pointer = json.loads((run / "checkpoints" / "last.json").read_text())
    return run / "checkpoints" / pointer["path"]


def last_model(run: Path) -> dict[str, torch.Tensor]:
    return load_file(last_checkpoint(run) / "model.safetensors")


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [record["train_loss"] for record in history(run)]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def forge_manifest(checkpoint: Path) -> None:
    """Recompute manifest.json for whatever the checkpoint's files now hold."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


# `python DRIVER AT mmkit-args...`: runs mmkit and `kill -9`s it before optimizer step number AT
# starts (SIGKILL: no handler, no cleanup, no flush)
KILL_BEFORE_STEP_DRIVER = """
import os, signal, sys
import mmkit.train.engine as engine
from mmkit.cli.app import main

at, calls = int(sys.argv[1]), [0]
step = engine.StepRunner.step

def killing_step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

engine.StepRunner.step = killing_step
sys.argv = ["mmkit", *sys.argv[2:]]
main()
"""


TEST_GPU = """
display_name = "test GPU ({vram} GiB)"
vram_gib = {vram}                 # assumption: a made-up card for tests
margin = 0.05                     # assumption
precisions = ["fp32", "bf16"]     # assumption
memory_bandwidth_gb_s = 100.0     # assumption
[peak_tflops]
fp32 = 1.0                        # assumption
bf16 = 2.0                        # assumption
[overhead]
cuda_context_mib = 16.0           # assumption
workspace_mib = 4.0               # assumption
allocator_reserve_fraction = 0.05 # assumption
"""


def write_test_gpus(folder: Path, vram_gib: dict[str, float]) -> Path:
    """GPU presets `name → VRAM in GiB` under folder/gpus (point MMKIT_PRESET_PATH at folder)."""
    (folder / "gpus").mkdir(parents=True, exist_ok=True)
    for name, vram in vram_gib.items():
        (folder / "gpus" / f"{name}.toml").write_text(TEST_GPU.format(vram=vram))
    return folder
