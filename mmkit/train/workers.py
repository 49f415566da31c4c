"""Worker processes: whether this process is one of torchrun's workers, and the torchrun options a
command was given (`Launch`), checked before any worker starts.

Torch-free on purpose: `mmkit train`/`resume` validate these options, and every error line asks
for this process's rank, before torch is loaded (mmkit.train.distributed does the launching).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from mmkit.errors import MmkitError

WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun for every worker
STRATEGIES = ("ddp", "fsdp")  # data parallel: replicated (DDP) or fully sharded (FSDP2) model


def in_worker() -> bool:
    """True inside a process that torchrun (or `mmkit ... --nproc-per-node`) started."""
    return all(key in os.environ for key in WORKER_ENV)


@dataclass(frozen=True)
class Launch:
    """The torchrun options a command was given."""

    nproc_per_node: int | None = None
    nnodes: int | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None

    @property
    def requested(self) -> bool:
        """More than one process, here or on other nodes."""
        return (self.nproc_per_node or 1) > 1 or (self.nnodes or 1) > 1 or self.rdzv_endpoint is not None

    def validate(self) -> None:
        nodes = self.nnodes or 1
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise MmkitError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if nodes < 1:
            raise MmkitError(f"--nnodes must be at least 1, got {nodes}")
        if nodes > 1 and (self.node_rank is None or self.rdzv_endpoint is None):
            raise MmkitError(
                f"--nnodes {nodes} needs --node-rank (0 on the node at --rdzv-endpoint, 1..{nodes - 1} on the "
                f"others) and --rdzv-endpoint HOST:PORT, the same on every node"
            )
        if self.node_rank is not None and not 0 <= self.node_rank < nodes:
            raise MmkitError(f"--node-rank {self.node_rank} is outside 0..{nodes - 1} for --nnodes {nodes}")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise MmkitError(f"--rdzv-endpoint expects HOST:PORT (e.g. node0:29500), got {self.rdzv_endpoint!r}")

    @property
    def world_size(self) -> int:
        return (self.nproc_per_node or 1) * (self.nnodes or 1)

    def torchrun_args(self, worker_args: Sequence[str]) -> list[str]:
        """`torchrun` arguments that start `python -m mmkit WORKER_ARGS` in every worker."""
        args = ["--nproc-per-node", str(self.nproc_per_node or 1)]
        if (self.nnodes or 1) == 1 and self.rdzv_endpoint is None:
            args.append("--standalone")  # a free local port: runs side by side never collide
        else:  # static rendezvous: node 0 hosts the store at the endpoint
            args += ["--nnodes", str(self.nnodes or 1), "--node-rank", str(self.node_rank or 0),
                     "--rdzv-endpoint", str(self.rdzv_endpoint)]
        return [*args, "--max-restarts", "0", "--module", "mmkit", *worker_args]
