"""The torchrun options that `train` and `resume` share, and starting their worker processes.

`mmkit train M --nproc-per-node N ...` checks what it can cheaply (names, the batch split), then
runs torchrun's elastic agent, whose N workers run `python -m mmkit train M ...` with the same
options minus the launcher's. Inside a worker (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) the
options are ignored: the process group is already there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

# torch-free: these options are checked, and `--help` shown, before torch is loaded
from mmkit.errors import MmkitError
from mmkit.train.workers import STRATEGIES, Launch, in_worker

# Typer >= 0.20 vendors click as typer._click; older releases use click itself.
click: Any = getattr(typer.core, "_click", None) or __import__("click")

NprocOption = Annotated[
    int | None,
    typer.Option("--nproc-per-node", min=1, help="Processes on this node, one per GPU (or CPU workers); more than 1 "
                 "starts a data-parallel run through torchrun (DDP; gloo on CPU, nccl on CUDA)."),
]
NnodesOption = Annotated[int | None, typer.Option("--nnodes", min=1, help="Nodes in a multi-node run (with --node-rank and --rdzv-endpoint).")]
NodeRankOption = Annotated[int | None, typer.Option("--node-rank", min=0, help="This node's rank: 0 on the node at --rdzv-endpoint.")]
StrategyOption = Annotated[
    str | None,
    typer.Option("--strategy", help="With several processes: ddp (every process holds the whole model) or fsdp "
                 "(FSDP2: weights, gradients and optimizer state sharded across the processes); one process ignores it."),
]
RdzvOption = Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of node 0, the same on every node.")]

LAUNCH_PARAMS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint")


def requested_launch(nproc_per_node: int | None, nnodes: int | None, node_rank: int | None,
                     rdzv_endpoint: str | None) -> Launch | None:
    """The launch to run from this process, or None (one process, or already a torchrun worker)."""
    launch = Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    launch.validate()
    return launch if launch.requested and not in_worker() else None


def worker_args(command: str, overrides: dict[str, str]) -> list[str]:
    """The current command's arguments as the user gave them, minus the launcher's options, with
    `overrides` (option name → value) set: what every worker runs after `python -m mmkit`."""
    ctx = click.globals.get_current_context()
    args, options = [command], []
    for param in ctx.command.params:
        if param.name in LAUNCH_PARAMS:
            continue
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            args.append(str(value))
            continue
        flag = param.opts[0]
        if flag in overrides:
            options += [flag, overrides[flag]]
            continue
        source = ctx.get_parameter_source(param.name)
        if value is None or source is None or source.name == "DEFAULT":
            continue
        if getattr(param, "is_flag", False):
            options.append(flag if value else param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for item in value:
                options += [flag, str(item)]
        else:
            options += [flag, str(value)]
    return args + options


def run_launch(launch: Launch, command: str, run_dir: Path, overrides: dict[str, str]) -> None:
    """Start the workers and exit with their outcome (one line on stderr when no worker said it)."""
    from mmkit.train.distributed import launch_workers

    outcome = launch_workers(launch, worker_args(command, overrides), str(run_dir))
    if outcome.message:
        print(f"mmkit: error: {outcome.message}", file=sys.stderr)
    raise typer.Exit(outcome.exit_code)


def check_strategy(strategy: str | None) -> None:
    if strategy is not None and strategy not in STRATEGIES:
        raise MmkitError(f"--strategy {strategy!r}: valid: {', '.join(STRATEGIES)}")


def worker_rank() -> int:
    """This process's rank in a torchrun run (0 outside one)."""
    return int(os.environ.get("RANK", "0")) if in_worker() else 0
