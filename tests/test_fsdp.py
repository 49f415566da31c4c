"""Fully sharded data parallel (`--strategy fsdp`, FSDP2) with the gloo backend, two CPU processes.

The runs are the real thing, as in test_ddp: `mmkit train ... --nproc-per-node 2 --strategy fsdp`
(or torchrun), with test_ddp's `sitecustomize` hooks on the workers' path (the files each rank
writes, a SIGTERM to the launcher or a `kill -9` of rank 1 at a chosen step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runhelpers import assert_bitwise_equal, history, last_checkpoint, last_model, losses, trained_run
from safetensors.torch import load_file
from test_ddp import mmkit, relative_l2, run_files, run_workers, words
from torch import nn
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.errors import MmkitError
from mmkit.train.sharding import block_classes, default_block_classes, sharding_units

runner = CliRunner()

# 500 training samples (a tenth of synthetic-cifar's 5000) in global batches of 32: 16 steps per
# epoch, the last one of 20 samples (10 per rank); a checkpoint every 5 steps besides each epoch's.
# Validation and test in 3 batches of up to 384: rank 0 evaluates two, rank 1 one (and one more
# forward in step, for the all-gathers)
TRAIN = ("train", "multichannel", "--preset", "quick", "--epochs", "2", "--train-fraction", "0.1",
         "--set", "checkpoint_every_steps=5", "--set", "eval_batch_size=384")
FSDP = ("--nproc-per-node", "2", "--strategy", "fsdp")
# relative L2 over all weights. Two ranks run each matmul at half the batch and reduce-scatter the
# gradients: float rounding only (measured 6e-7 after 32 AdamW steps on a 2-core EPYC; DDP's test
# allows more for CPUs whose kernels round differently per batch size).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("single"), TRAIN)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted two-process FSDP run, and the folder with what its workers reported."""
    base = tmp_path_factory.mktemp("fsdp")
    run, out = base / "R", base / "hooks"
    done = run_workers(mmkit(*TRAIN, "--out", str(run), *FSDP), run, out)
    assert done.returncode == 0, done.stderr
    assert f"run saved in {run}" in words(done.stdout)
    return run, out


def test_fsdp_matches_one_process_and_only_rank_0_writes(single: Path, sharded: tuple[Path, Path]) -> None:
    run, out = sharded
    assert json.loads((run / "run.json").read_text())["training"]["strategy"] == "fsdp"
    gap = relative_l2(last_model(single), last_model(run))
    print(f"multichannel, 1 process vs FSDP on 2: relative L2 of all weights {gap:.3e}")
    assert gap <= TOLERANCE
    # the checkpoint holds the full (unsharded) weights, gathered: rank 0's final weights are them
    assert_bitwise_equal(load_file(out / "rank0.safetensors"), last_model(run))
    assert last_model(run).keys() == last_model(single).keys()
    # the optimizer state is written as one process writes it (indices, the same tensors)
    meta = json.loads((last_checkpoint(run) / "trainer_state.json").read_text())["optimizer"]
    assert meta == json.loads((last_checkpoint(single) / "trainer_state.json").read_text())["optimizer"]
    assert (out / "writes-rank1.txt").read_text() == ""  # rank 1 wrote nothing in the run directory
    assert run_files(run) == run_files(single)
    # the final test, sharded over the two ranks (3 batches), predicts exactly as `mmkit eval` in one process
    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    alone, sharded_test = json.loads(result.stdout), json.loads((run / "metrics.json").read_text())
    assert alone["confusion_matrix"] == sharded_test["confusion_matrix"] and alone["uar"] == sharded_test["uar"]
    assert [r["world_size"] for r in history(run)] == [2, 2]


def test_sigterm_then_resume_with_fsdp_is_bitwise_the_uninterrupted_run(
    tmp_path: Path, sharded: tuple[Path, Path]
) -> None:
    run = tmp_path / "R"
    stopped = run_workers(mmkit(*TRAIN, "--out", str(run), *FSDP), run, tmp_path / "hooks",
                          DDP_TEST_STOP_AT="13", DDP_TEST_STOP_HOW="sigterm-launcher")
    assert stopped.returncode == 143, stopped.stderr
    assert last_checkpoint(run).name == "step-00000013"
    resumed = run_workers(mmkit("resume", str(run), *FSDP), run, tmp_path / "hooks2")
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(last_model(sharded[0]), last_model(run))
    assert losses(run) == losses(sharded[0])
    assert (tmp_path / "hooks2" / "writes-rank1.txt").read_text() == ""


def test_kill_9_of_one_rank_then_resume_in_one_process(tmp_path: Path, sharded: tuple[Path, Path]) -> None:
    run = tmp_path / "R"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "mmkit", *TRAIN, "--strategy", "fsdp", "--out", str(run)]
    killed = run_workers(torchrun, run, tmp_path / "hooks", DDP_TEST_STOP_AT="23", DDP_TEST_STOP_HOW="kill-rank-1")
    assert killed.returncode != 0 and "exitcode: -9" in killed.stderr
    assert last_checkpoint(run).name == "step-00000020"  # the last periodic checkpoint before step 23

    result = runner.invoke(app, ["resume", str(run)])  # one process: the strategy does not matter
    assert result.exit_code == 0, result.output
    assert "written by 2 processes, continued by 1" in words(result.output)
    gap = relative_l2(last_model(sharded[0]), last_model(run))
    print(f"FSDP on 2 vs FSDP on 2 then 1 process after kill -9: relative L2 {gap:.3e}")
    assert gap <= TOLERANCE
    assert [r["world_size"] for r in history(run)] == [2, 1]


@pytest.mark.slow  # two lfm2 runs, each evaluating 960 clips: ~30 s
def test_lfm2_fsdp_with_checkpointing_matches_one_process(tmp_path: Path) -> None:
    """lfm2 (width 64, activation checkpointing composed with FSDP). Its BatchNorms normalize over
    the samples one forward sees, so the one-process run trains the same halves of each batch as
    micro-batches (grad_accum 2), and the running statistics (each rank's own) are left out. SGD:
    AdamW's first steps turn rounding noise in near-zero gradients into steps of ±lr."""
    args = ("train", "lfm2", "--preset", "quick", "--epochs", "1", "--size", "w64", "--train-fraction", "0.04",
            "--set", "optimizer=sgd", "--set", "gradient_checkpointing=true", "--set", "model.dropout=0.0")
    one = trained_run(tmp_path / "one", (*args, "--set", "grad_accum=2"))
    run = tmp_path / "fsdp"
    done = run_workers(mmkit(*args, "--out", str(run), *FSDP), run, tmp_path / "hooks")
    assert done.returncode == 0, done.stderr
    a, b = last_model(one), last_model(run)
    parameters = [k for k in a if "running_" not in k and "num_batches_tracked" not in k]
    gap = relative_l2({k: a[k] for k in parameters}, {k: b[k] for k in parameters})
    print(f"lfm2 w64, 1 process (2 micro-batches) vs FSDP on 2: relative L2 of the parameters {gap:.3e}")
    assert gap <= TOLERANCE


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.up(x).relu())


class _UserModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(8, 2)


def test_sharding_units_default_to_the_largest_repeated_block_and_can_be_named() -> None:
    model = _UserModel()
    assert default_block_classes(model) == (_Block,)  # not nn.Linear: fewer parameters per instance
    assert sharding_units(model, (_Block,)) == list(reversed(list(model.blocks)))
    assert block_classes(model, ["Linear"]) == (nn.Linear,)
    with pytest.raises(MmkitError, match="--set fsdp.wrap: Blok is not a module class of this model; its classes: "
                                         "Linear, _Block"):
        block_classes(model, ["Blok"])


@pytest.mark.parametrize(("args", "message"), [
    (["--strategy", "zero3"], "--strategy 'zero3': valid: ddp, fsdp"),
    (["--strategy", "fsdp", "--set", "fsdp.wrap=[Nope]"], "--set fsdp.wrap: Nope is not a module class of this model"),
    (["--strategy", "fsdp", "--nproc-per-node", "2", "--batch-size", "auto"], "give --size and --batch-size"),
])
def test_bad_strategy_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, [*TRAIN, "--out", str(tmp_path / "R"), *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "R").exists()


# --------------------------------------------------------------------------------------------------
# Per-rank planning: the simulated step of one rank against the live-storage peak on real gloo ranks

MEASURE_RANK = r'''
import json, os, sys
import torch.distributed as dist
from mmkit.models.registry import get_model_entry, size_config
from mmkit.plan.memory import StepSettings, measure_training_steps

dist.init_process_group("gloo")
peaks = {}
for name, size, batch, checkpointing in json.loads(sys.argv[2]):
    entry = get_model_entry(name)
    config = size_config(entry, size)[1].model_copy(update={"gradient_checkpointing": True} if checkpointing else {})
    step = StepSettings(batch_size=batch, shards=dist.get_world_size())
    peaks[name] = measure_training_steps(entry, config, step, steps=0).peak_tensors
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(peaks, f)
dist.destroy_process_group()
'''

# (model, size, per-rank batch, activation checkpointing)
PLANNED = {2: [("multichannel", "default", 16, False), ("lfm2", "w64", 4, True)],
           4: [("multichannel", "default", 8, False)]}


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_simulated_fsdp_rank_peak_equals_the_peak_on_every_real_gloo_rank(tmp_path: Path, world_size: int) -> None:
    from mmkit.models.registry import get_model_entry, size_config
    from mmkit.plan.memory import StepSettings, config_param_count, simulate_training_step

    script = tmp_path / "measure.py"
    script.write_text(MEASURE_RANK)
    cases = PLANNED[world_size]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
         str(script), str(tmp_path), json.dumps(cases)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    for name, size, batch, checkpointing in cases:
        entry = get_model_entry(name)
        config = size_config(entry, size)[1].model_copy(
            update={"gradient_checkpointing": True} if checkpointing else {})
        simulated = simulate_training_step(entry, config, StepSettings(batch_size=batch, shards=world_size))
        ranks = [m[name] for m in measured]
        print(f"{name} {size}, FSDP on {world_size}, batch {batch} per rank: simulated {simulated.peak_tensors:,} B, "
              f"measured {', '.join(f'{p:,}' for p in ranks)} B")
        assert simulated.all_gather > 0  # the all-gather buffers and unsharded weights are counted
        assert simulated.weights < config_param_count(entry, config) * 4 * 0.6  # weights: the rank's shards
        # usually equal to the byte on every rank holding full-size shards (the last rank's can be shorter), but
        # gloo frees a collective's buffers from its own thread: one can outlive the peak's moment by a few ms
        assert all(abs(p - simulated.peak_tensors) <= 0.03 * p for p in ranks)



def test_memory_plan_fsdp_holds_a_quarter_of_the_model_states_per_rank() -> None:
    def plan(*args: str) -> dict:
        result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "rtx3050", "--size", "default",
                                     "--precision", "fp32", "--batch-size", "64", "--nproc", "4", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    ddp, fsdp = plan(), plan("--strategy", "fsdp")
    assert (ddp["strategy"], fsdp["strategy"], fsdp["per_rank_batch_size"]) == ("ddp", "fsdp", 16)
    # each rank keeps a quarter of every weight and of its AdamW state (dim 0, the last rows padded;
    # each storage rounded up to the CUDA allocator's 512 bytes, as for the GPU it is planned for)
    for states in ("weights", "optimizer"):
        assert fsdp["train"][states] == pytest.approx(ddp["train"][states] / 4, rel=0.01), states
    assert fsdp["train"]["all_gather"] > 0 and ddp["train"]["all_gather"] == 0
    assert "ddp_gradient_buckets" not in fsdp["train"]["overhead_lines"]
    assert "fsdp" in fsdp["method"] and "fsdp" not in ddp["method"]
    assert fsdp["train"]["total"] < ddp["train"]["total"]


@pytest.mark.slow
def test_memory_plan_lfm2_original_on_four_ranks_fsdp_states_are_a_quarter_of_ddps() -> None:
    """The command of docs/fsdp.md: lfm2 `original` on four RTX 3050s, batch auto per rank."""
    import time

    def plan(*args: str) -> tuple[dict, float]:
        start = time.perf_counter()
        result = runner.invoke(app, ["memory-plan", "lfm2", "--size", "original", "--gpu", "rtx3050", "--nproc", "4",
                                     "--batch-size", "auto", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout), time.perf_counter() - start

    (fsdp, seconds), (ddp, _) = plan("--strategy", "fsdp"), plan()
    print(f"memory-plan lfm2 original, 4 ranks, fsdp: {seconds:.1f} s; per-rank weights {fsdp['train']['weights']:,} B "
          f"vs DDP's {ddp['train']['weights']:,} B; optimizer {fsdp['train']['optimizer']:,} vs "
          f"{ddp['train']['optimizer']:,} B; batch per rank {fsdp['per_rank_batch_size']} (DDP: fits {ddp['fits']})")
    for states in ("weights", "optimizer"):
        assert fsdp["train"][states] == pytest.approx(ddp["train"][states] / 4, rel=0.01), states
    assert fsdp["fits"] and not ddp["fits"]  # on a 4 GB card the sharded model trains, the replicated one does not
