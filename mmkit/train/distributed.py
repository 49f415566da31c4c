"""Data-parallel training on torch.distributed: the process group, DDP wrapping, the collectives the
loop needs, and starting the worker processes through torchrun's elastic agent.

    mmkit train M --nproc-per-node N      this process becomes the launcher: it runs
                                          `torch.distributed.run` (torchrun) in-process, which
                                          starts N workers `python -m mmkit train M ...`
    torchrun --nproc-per-node N -m mmkit train M ...   the same, started by torchrun itself

Inside a worker (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) `World` holds the
rank and the collectives; outside one it is the single process (rank 0 of 1) and every collective
is a no-op, so the training loop reads the same either way.

The global batch (`--batch-size`, what one optimizer step sees) is split evenly across the ranks:
every rank draws the same seeded permutation, and rank r trains on the r-th contiguous slice of
each global batch. DDP averages the gradients of the ranks; each rank's loss is weighted by its
share of the batch, so the averaged gradient is the gradient of the global batch's mean loss — the
single-process update, up to the order of floating-point additions.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmkit.errors import MmkitError
from mmkit.train.workers import Launch, in_worker  # torch-free, for the command line's early checks


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size` (1 and 0 outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo (CPU) or nccl (CUDA); None: a single process

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, configured: str) -> torch.device:
        """The run's device for this rank: with CUDA, one GPU per local rank."""
        if self.distributed and configured.startswith("cuda"):
            return torch.device("cuda", self.local_rank)
        return torch.device(configured)

    def _comm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(f"cuda:{self.local_rank}") if self.backend == "nccl" else tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over all ranks (a new CPU tensor; the input when single)."""
        if not self.distributed:
            return tensor
        work = self._comm(tensor.clone())
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.cpu()

    def max(self, value: int) -> int:
        """The largest `value` over all ranks."""
        if not self.distributed:
            return value
        work = self._comm(torch.tensor([value], dtype=torch.int64))
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return int(work.item())

    def broadcast(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        work = self._comm(torch.tensor([value], dtype=torch.int64))
        dist.broadcast(work, src=0)
        return int(work.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of a batch of `n` samples."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def wrap(self, model: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
        """`model` in DistributedDataParallel (the model itself in a single process).

        DDP broadcasts rank 0's parameters and buffers at construction and all-reduces (averages)
        the gradients during backward, in buckets of 25 MiB (the first one 1 MiB).
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


SINGLE = World()


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Accumulate gradients locally, without the all-reduce (DDP) or reduce-scatter (FSDP), for
    non-final micro-batches."""
    from torch.nn.parallel import DistributedDataParallel

    from mmkit.train.sharding import gradient_sync_paused, is_sharded

    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return gradient_sync_paused(model) if is_sharded(model) else contextlib.nullcontext()


def check_batch_split(world_size: int, batch_size: int, train_samples: int | None = None,
                      given_as: str | None = None) -> None:
    """The global batch must split evenly, and the epoch's last (smaller) batch must give every
    rank at least one sample. `given_as` names where the batch came from (default `--batch-size N`)."""
    if world_size < 1:
        raise MmkitError(f"the number of processes must be at least 1, got {world_size}")
    if batch_size % world_size:
        lower, upper = batch_size // world_size * world_size, -(-batch_size // world_size) * world_size
        choices = ", ".join(str(b) for b in dict.fromkeys((lower, upper)) if b > 0)
        given_as = given_as or f"--batch-size {batch_size}"
        raise MmkitError(
            f"{given_as} is the global batch and must split evenly across {world_size} "
            f"processes; pick a multiple of {world_size} (e.g. {choices})"
        )
    if train_samples is not None:
        last = train_samples % batch_size
        if 0 < last < world_size:
            raise MmkitError(
                f"the last batch of each epoch holds {last} of {train_samples} training samples, fewer than the "
                f"{world_size} processes; change --batch-size or --train-fraction"
            )


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) for the duration; a single
    process outside torchrun."""
    if not in_worker():
        yield SINGLE
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if size == 1:
        yield World(rank, size, local_rank, None)
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield World(rank, size, local_rank, backend)
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        # DDP's reducer holds the process group; free it (it sits in reference cycles) while the
        # interpreter is fully alive, not during its finalization
        gc.collect()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Launching: `mmkit train ... --nproc-per-node N` runs torchrun's elastic agent in this process


@dataclass(frozen=True)
class LaunchOutcome:
    exit_code: int
    message: str | None  # what the launcher should say (None: the workers have said it)


def launch_workers(launch: Launch, worker_args: Sequence[str], run_dir: str) -> LaunchOutcome:
    """Run the workers under torchrun's elastic agent and wait for them.

    When one worker dies, the agent stops the others (SIGTERM, then SIGKILL after 30 s); a SIGINT
    or SIGTERM to this process is passed on to the workers, which checkpoint and exit.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun would set this (and warn): one intra-op thread per worker unless the user chose
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    resume = f"mmkit resume {run_dir} --nproc-per-node {launch.nproc_per_node or 1}"
    try:
        run(parse_args(launch.torchrun_args(worker_args)))
    except SignalException as stop:
        return LaunchOutcome(128 + int(stop.sigval), None)  # rank 0 has said how to continue
    except ChildFailedError as failed:
        codes = {f.exitcode for f in failed.failures.values()}
        if codes <= {128 + signal.SIGINT, 128 + signal.SIGTERM}:
            return LaunchOutcome(max(codes), None)  # interrupted: checkpointed, rank 0 has said so
        rank, failure = failed.get_first_failure()
        if failure.exitcode in (1, 2) and 0 in failed.failures and failed.failures[0].exitcode == failure.exitcode:
            return LaunchOutcome(failure.exitcode, None)  # an mmkit error, printed by rank 0
        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        return LaunchOutcome(
            1, f"process rank {rank} (pid {failure.pid}) {how}; torchrun stopped the other processes; "
               f"the checkpoints written so far are intact: continue with `{resume}`",
        )
    return LaunchOutcome(0, None)
