"""Data-parallel training on torch.distributed with the gloo backend, two CPU processes.

Every multi-process run here is the real thing: `mmkit train ... --nproc-per-node 2` (torchrun's
elastic agent in the mmkit process, two `python -m mmkit` workers) or `torchrun -m mmkit train`.
What the tests need to see inside the workers comes from a `sitecustomize` module put on the
workers' PYTHONPATH (nothing in mmkit knows about it): it saves each rank's final weights, records
every file a rank other than 0 writes under the run directory (through Python's audit hooks), and
can stop a run at a chosen optimizer step: SIGTERM to the launcher, or `kill -9` of rank 1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runhelpers import assert_bitwise_equal, history, last_checkpoint, last_model, losses, trained_run
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.data.datasets import load_dataset
from mmkit.errors import MmkitError
from mmkit.models.registry import build_model
from mmkit.settings import builtin_preset_dir
from mmkit.train.config import RunConfig
from mmkit.train.distributed import Launch, World, check_batch_split
from mmkit.train.evaluation import evaluate_with_loss

runner = CliRunner()

# 1000 training samples (a fifth of synthetic-cifar's 5000) in global batches of 32: 32 steps per
# epoch, the last one of 8 samples (4 per rank); a checkpoint every 10 steps besides each epoch's
TRAIN = ("train", "multichannel", "--preset", "quick", "--epochs", "2", "--train-fraction", "0.2",
         "--set", "checkpoint_every_steps=10")
STEPS_PER_EPOCH = 32
# relative: weights (L2 over all of them) and per-epoch training losses. Two processes run each
# matmul at half the batch, and CPU kernels round differently per batch size (oneDNN picks other
# blocking, AMX tiles on CPUs that have them): measured gaps ~1e-5 on an AVX512 EPYC, ~1.5e-3 on
# an AMX Xeon after 64 steps. A wrong gradient average (a sum, or one rank's gradient) gives > 0.1.
TOLERANCE = 5e-3

SITECUSTOMIZE = r'''
import os, signal, sys, time

if "RANK" in os.environ and os.environ.get("DDP_TEST_OUT"):
    out, rank = os.environ["DDP_TEST_OUT"], int(os.environ["RANK"])
    run_dir = os.path.abspath(os.environ["DDP_TEST_RUN"]) + os.sep
    writes = open(os.path.join(out, f"writes-rank{rank}.txt"), "a")

    def audit(event, args):  # every file this process creates, changes or removes in the run directory
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree",
                       "os.truncate", "os.link", "os.symlink"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if (path + os.sep).startswith(run_dir):
                writes.write(f"{event} {path}\n")
                writes.flush()

    sys.addaudithook(audit)

    import mmkit.train.engine as engine
    import mmkit.train.loop as loop
    from safetensors.torch import save_file

    real_final_test = loop.final_test

    def final_test(run_dir, config, model, *args, **kwargs):  # the rank's weights after the last step
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().contiguous()
                 for k, v in model.state_dict().items()}  # a sharded (FSDP) model's weights gathered
        save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
        return real_final_test(run_dir, config, model, *args, **kwargs)

    loop.final_test = final_test

    stop_at, stop_how = int(os.environ.get("DDP_TEST_STOP_AT", "0")), os.environ.get("DDP_TEST_STOP_HOW")
    real_step, calls = engine.StepRunner.step, [0]

    import mmkit.train.signals as signals

    real_handle, received = signals.StopRequest._handle, []

    def handle(self, signum, frame):
        received.append(signum)
        real_handle(self, signum, frame)

    signals.StopRequest._handle = handle

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at and stop_how == "sigterm-launcher" and rank == 0:
            os.kill(os.getppid(), signal.SIGTERM)  # the elastic agent: it passes SIGTERM on to both workers
            deadline = time.monotonic() + 60
            while not received and time.monotonic() < deadline:  # so that the run stops after this step
                time.sleep(0.01)
        if calls[0] == stop_at and stop_how == "kill-rank-1" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, *args, **kwargs)

    engine.StepRunner.step = step
'''


def run_workers(command: list[str], run: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `command` (a launcher) with the test hooks on the workers' path; returns when all exited."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sitecustomize.py").write_text(SITECUSTOMIZE)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_")}
    environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(out), environ.get("PYTHONPATH")])),
                   DDP_TEST_OUT=str(out), DDP_TEST_RUN=str(run), **env)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=300)
    print(f"{' '.join(command[3:6])}...: {time.perf_counter() - start:.1f} s, exit code {done.returncode}")
    return done


def words(text: str) -> str:
    """Output as one line: rich wraps long lines at the terminal width."""
    return " ".join(text.split())


def mmkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmkit", *args]


def relative_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5
    norm = sum((a[k].double() ** 2).sum() for k in a) ** 0.5
    return float(diff / norm)


def relative_loss_gaps(a: list[float], b: list[float]) -> list[float]:
    assert len(a) == len(b)
    return [abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)]


def run_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("single"), TRAIN)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted 2-process run, and the folder with what its workers reported."""
    base = tmp_path_factory.mktemp("two")
    run, out = base / "R", base / "hooks"
    done = run_workers(mmkit(*TRAIN, "--out", str(run), "--nproc-per-node", "2"), run, out)
    assert done.returncode == 0, done.stderr
    assert f"run saved in {run}" in words(done.stdout)
    return run, out


def test_two_processes_end_identical_and_match_one_process(single: Path, two: tuple[Path, Path]) -> None:
    run, out = two
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert_bitwise_equal(rank0, rank1)  # DDP keeps the replicas identical
    assert_bitwise_equal(rank0, last_model(run))  # and the checkpoint is rank 0's model, unwrapped
    assert not any(key.startswith("module.") for key in rank0)

    gap = relative_l2(last_model(single), last_model(run))
    loss_gaps = relative_loss_gaps(losses(single), losses(run))
    print(f"1 vs 2 processes, global batch 32: relative L2 of all weights {gap:.3e}; "
          f"per-epoch training-loss relative gaps {', '.join(f'{g:.3e}' for g in loss_gaps)}")
    assert gap <= TOLERANCE
    assert max(loss_gaps) <= TOLERANCE
    assert [r["step"] for r in history(run)] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert [r["world_size"] for r in history(run)] == [2, 2]
    assert json.loads((run / "run.json").read_text())["training"]["batch_size"] == 32  # global


def test_sharded_evaluation_predicts_exactly_as_the_one_process_evaluation(two: tuple[Path, Path]) -> None:
    run, _ = two
    config = RunConfig.load(run)
    model = build_model(config.entry, config.model_config_object())
    model.load_state_dict(last_model(run))  # the weights after the last epoch, which it validated
    dataset = load_dataset(config.data, seed=config.data_seed)
    val, val_loss = evaluate_with_loss(model, dataset, dataset.indices("val"), batch_size=256,
                                       precision="fp32", device=torch.device("cpu"))
    last = history(run)[-1]
    assert (last["val_accuracy"], last["val_uar"]) == (val.accuracy, val.uar)  # every prediction the same
    # the loss is a float sum over shards: equal up to rounding (matmuls at another batch size)
    assert last["val_loss"] == pytest.approx(val_loss, rel=1e-6)
    # the final test of the best checkpoint (sharded, 2 processes) equals `mmkit eval` (1 process)
    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    alone, sharded = json.loads(result.stdout), json.loads((run / "metrics.json").read_text())
    assert alone["confusion_matrix"] == sharded["confusion_matrix"] and alone["uar"] == sharded["uar"]


def test_only_rank_0_writes_and_the_run_directory_is_clean(single: Path, two: tuple[Path, Path]) -> None:
    run, out = two
    rank0_writes = (out / "writes-rank0.txt").read_text().splitlines()
    assert any("model.safetensors" not in w and "step-" in w for w in rank0_writes)  # the hook sees rank 0
    assert (out / "writes-rank1.txt").read_text() == ""  # rank 1 wrote nothing in the run directory
    # the same files as a one-process run: no duplicate, temporary or partial file
    assert run_files(run) == run_files(single)
    assert not [name for name in run_files(run) if ".tmp" in name or ".old-" in name]
    for step in (run / "checkpoints").glob("step-*"):
        manifest = json.loads((step / "manifest.json").read_text())
        assert sorted(p.name for p in step.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert [r["epoch"] for r in history(run)] == [1, 2]  # one line per epoch, not one per rank
    assert json.loads((run / "metrics.json").read_text())["n"] == 1000


def test_sigterm_to_the_launcher_checkpoints_and_resumes_bitwise(tmp_path: Path, two: tuple[Path, Path]) -> None:
    run = tmp_path / "R"
    stopped = run_workers(mmkit(*TRAIN, "--out", str(run), "--nproc-per-node", "2"), run, tmp_path / "hooks",
                          DDP_TEST_STOP_AT="43", DDP_TEST_STOP_HOW="sigterm-launcher")
    assert stopped.returncode == 143, stopped.stderr
    assert f"mmkit resume {run} --nproc-per-node 2" in words(stopped.stdout)
    trainer = json.loads((last_checkpoint(run) / "trainer_state.json").read_text())
    assert last_checkpoint(run).name == "step-00000043"  # SIGTERM arrived during step 43
    assert trainer["batches_in_epoch"] == 43 - STEPS_PER_EPOCH and trainer["world_size"] == 2
    resumed = run_workers(mmkit("resume", str(run), "--nproc-per-node", "2"), run, tmp_path / "hooks2")
    assert resumed.returncode == 0, resumed.stderr
    # same world size: the same additions in the same order, so bitwise equal
    assert_bitwise_equal(last_model(two[0]), last_model(run))
    assert losses(run) == losses(two[0])
    assert (tmp_path / "hooks2" / "writes-rank1.txt").read_text() == ""


def test_torchrun_kill_9_of_one_rank_stops_the_other_and_resumes_with_one_process(
    tmp_path: Path, two: tuple[Path, Path]
) -> None:
    run = tmp_path / "R"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "mmkit", *TRAIN, "--out", str(run)]
    killed = run_workers(torchrun, run, tmp_path / "hooks", DDP_TEST_STOP_AT="45", DDP_TEST_STOP_HOW="kill-rank-1")
    assert killed.returncode != 0
    assert "exitcode: -9" in killed.stderr  # torchrun's agent saw rank 1 die and stopped rank 0
    assert last_checkpoint(run).name == "step-00000040"  # the last periodic checkpoint before step 45
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

    result = runner.invoke(app, ["resume", str(run)])  # one process now
    assert result.exit_code == 0, result.output
    assert "written by 2 processes, continued by 1" in words(result.output)
    gap = relative_l2(last_model(two[0]), last_model(run))
    loss_gaps = relative_loss_gaps(losses(two[0]), losses(run))
    print(f"2 processes vs 2 then 1 after kill -9: relative L2 {gap:.3e}; loss gaps "
          f"{', '.join(f'{g:.3e}' for g in loss_gaps)}")
    # not bitwise: one process adds the two halves' gradients in another order than DDP's all-reduce
    assert gap <= TOLERANCE and max(loss_gaps) <= TOLERANCE
    assert [r["world_size"] for r in history(run)] == [2, 1]


def test_two_nodes_through_the_static_rendezvous(tmp_path: Path) -> None:
    """The multi-node commands of docs/distributed.md, with both "nodes" on this machine (one process each)."""
    with socket.socket() as probe:  # a free port for node 0's rendezvous store
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "R"
    command = mmkit("train", "multichannel", "--preset", "quick", "--epochs", "1", "--train-fraction", "0.1",
                    "--out", str(run), "--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", f"localhost:{port}")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_")}
    other = subprocess.Popen([*command, "--node-rank", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=environ)
    first = subprocess.run([*command, "--node-rank", "0"], capture_output=True, text=True, env=environ, timeout=300)
    out, _ = other.communicate(timeout=120)
    assert first.returncode == 0 and other.returncode == 0, first.stderr
    assert f"run saved in {run}" in words(first.stdout) and out == ""  # node 1's rank prints nothing
    assert [r["world_size"] for r in history(run)] == [2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc-per-node", "0"], "--nproc-per-node"),
        (["--nproc-per-node", "3"],  # the preset's batch, named as the preset's
         "batch_size = 32 in " + str(builtin_preset_dir() / "training" / "quick.toml") + " is the global batch"),
        (["--nproc-per-node", "2", "--batch-size", "33"], "pick a multiple of 2 (e.g. 32, 34)"),
        (["--nproc-per-node", "2", "--nnodes", "2"], "--nnodes 2 needs --node-rank"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29500"], "--node-rank 2 is outside 0..1"),
        (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "nohostport"], "--rdzv-endpoint expects HOST:PORT"),
        (["--nproc-per-node", "2", "--model-typo"], "No such option"),
    ],
)
def test_bad_launch_options_are_one_line_before_any_process_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    run = tmp_path / "R"
    result = runner.invoke(app, [*TRAIN, "--out", str(run), *args])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not run.exists()


def test_continual_refuses_several_processes(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "clip", "--preset", "continual", "--nproc-per-node", "2",
                                 "--out", str(tmp_path / "R")])
    assert result.exit_code == 2
    assert "continual learning runs in one process" in result.stderr


def test_resume_with_a_world_size_that_does_not_split_the_batch(single: Path) -> None:
    result = runner.invoke(app, ["resume", str(single), "--nproc-per-node", "3"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("the run's batch size 32 does not split evenly across 3 processes; resume it with a number of "
            "processes that divides 32 (1, 2, 4, 8, 16, 32)") in result.stderr


def test_batch_split_rules() -> None:
    check_batch_split(2, 32, 1000)  # last batch 8: 4 per rank
    with pytest.raises(MmkitError, match="last batch of each epoch holds 1 of 993"):
        check_batch_split(2, 32, 993)  # 31 batches of 32 and one of 1
    assert [World(rank, 3).share(10) for rank in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_torchrun_arguments() -> None:
    single_node = Launch(nproc_per_node=4).torchrun_args(["train", "lfm2"])
    assert single_node == ["--nproc-per-node", "4", "--standalone", "--max-restarts", "0", "--module", "mmkit",
                           "train", "lfm2"]
    node = Launch(4, 2, 1, "node0:29500")
    node.validate()
    assert node.world_size == 8
    assert node.torchrun_args(["train", "lfm2"])[:8] == [
        "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500"]


def test_memory_plan_per_process_batch_and_ddp_buckets() -> None:
    def plan(*args: str) -> dict:
        result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "rtx3050", "--size", "default",
                                     "--precision", "fp32", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    one, two = plan("--batch-size", "32"), plan("--batch-size", "64", "--nproc", "2")
    assert (one["nproc"], one["per_rank_batch_size"], one["batch_size"]) == (1, 32, 32)
    assert (two["nproc"], two["per_rank_batch_size"], two["batch_size"]) == (2, 32, 64)
    assert "ddp_gradient_buckets" not in one["train"]["overhead_lines"]
    buckets = two["train"]["overhead_lines"]["ddp_gradient_buckets"]
    assert buckets == 2_365_962 * 4  # one fp32 copy of every gradient
    assert two["train"]["peak_tensors"] == one["train"]["peak_tensors"]  # the same per-process step
    assert two["train"]["total"] == one["train"]["total"] + buckets
    assert "estimated" in two["method"]["ddp_gradient_buckets"]
    result = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "rtx3050", "--batch-size", "63", "--nproc", "2"])
    assert result.exit_code == 2 and "must split evenly across 2 processes" in result.stderr
