"""`mmkit train MODEL` and `mmkit resume RUN`: thin wrappers over `mmkit.train.run.train_run`.

With `--nproc-per-node N` (or the multi-node options) this process launches N workers through
torchrun (see mmkit.cli.launch); each worker, and every process that torchrun starts directly,
joins the process group here and trains its rank's share. Rank 0 alone prints and writes, and
holds the run directory's lock (mmkit.train.rundir.run_lock) while it does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmkit.cli.common import (
    MODEL_HELP,
    AllowChangedModelOption,
    InputOption,
    check_out_dir,
    console,
    one_line_errors,
    parse_auto_int,
    parse_set_options,
)
from mmkit.cli.launch import (
    NnodesOption,
    NodeRankOption,
    NprocOption,
    RdzvOption,
    StrategyOption,
    check_strategy,
    requested_launch,
    run_launch,
)
from mmkit.errors import MmkitError
from mmkit.models.catalog import check_model_name, parse_input_options
from mmkit.train.loggers import check_loggers, open_loggers
from mmkit.train.rundir import RESUME_KEYS, RunLocked, lock_holder, run_lock

if TYPE_CHECKING:
    from mmkit.train.distributed import World


def _default_run_dir(model: str, preset: str, started: float | None = None) -> Path:
    if model.startswith("hf:"):  # runs/hf-NAME-PRESET-TIME, NAME the directory's, type's or repository's
        model = "hf-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model[3:].rstrip("/\\")).name or "model")
    elif ":" in model:  # a spec: runs/FILE-FACTORY-PRESET-TIME
        target, _, attr = model.rpartition(":")
        model = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(target).stem if target.endswith('.py') else target}-{attr}")
    return Path("runs") / f"{model}-{preset}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"


@one_line_errors
def train_cli(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    preset: Annotated[str, typer.Option("--preset", "-p", help="Training preset.")] = "quick",
    data: Annotated[str | None, typer.Option("--data", help="Built-in dataset or a .safetensors tensor file (default: the model's).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (default: the preset's).")] = None,
    batch_size: Annotated[str | None, typer.Option("--batch-size", "-b", help="Batch size or 'auto'.")] = None,
    size: Annotated[str | None, typer.Option("--size", "-s", help="Named size, wN, or 'auto'.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU preset 'auto' is fitted to (default: the preset's target, else the local device).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/MODEL-PRESET-TIME).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for model init, data order and subsets.")] = None,
    train_fraction: Annotated[
        float | None,
        typer.Option("--train-fraction", min=0.0, max=1.0, help="Stratified seeded fraction of the training split (validation and test stay full)."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting: model.KEY=V or a training key (repeatable).")] = None,
    stop_after_epochs: Annotated[
        int | None,
        typer.Option("--stop-after-epochs", min=1, help="Stop after this many epochs, checkpointed and resumable with `mmkit resume`."),
    ] = None,
    compile_: Annotated[
        bool | None,
        typer.Option("--compile", help="torch.compile the model (falls back to eager with a warning where it cannot run).", show_default=False),
    ] = None,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Train on data holding NaN or Inf (refused otherwise).")] = False,
    input_: InputOption = None,
    target_batch: Annotated[
        int | None, typer.Option("--target-batch", min=1, help="Samples per optimizer step: run the fastest "
                                 "precision, checkpointing and micro-batch × accumulation that fit (see memory-plan).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Starting weights: a .safetensors file, a sharded index.json, or a directory "
                     "holding one (save_pretrained's); matched by name and shape. Never a pickle."),
    ] = None,
    log: Annotated[
        list[str] | None,
        typer.Option("--log", help="Also log to tensorboard (RUN/tb/) or mlflow (repeatable; kept by resume).",
                     metavar="tensorboard|mlflow"),
    ] = None,
    nproc_per_node: NprocOption = None,
    strategy: StrategyOption = None,
    nnodes: NnodesOption = None,
    node_rank: NodeRankOption = None,
    rdzv_endpoint: RdzvOption = None,
) -> None:
    """Train a model: AMP, clipping, schedules, progress, safe checkpoints, a final test evaluation.
    --batch-size is the global batch: with N processes each trains on batch / N samples per step."""
    batch = parse_auto_int(batch_size, "--batch-size")
    set_items = tuple(parse_set_options(set_).items())
    inputs = parse_input_options(input_)
    check_strategy(strategy)
    launch = requested_launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    check_model_name(model)  # a mistyped name is reported before torch loads
    loggers = check_loggers(log or [])  # and a logger that is not installed
    from mmkit.train.distributed import process_group
    from mmkit.train.run import train_run
    from mmkit.train.resolve import RunOptions, check_request, resolve_device, resolve_run

    options = RunOptions(
        model=model, preset=preset, size=size, batch_size=batch, epochs=epochs, seed=seed,  # type: ignore[arg-type]
        train_fraction=train_fraction, compile=compile_, data=data, gpu=gpu, device=device, set_items=set_items,
        nproc=launch.world_size if launch is not None else 1, allow_nonfinite=allow_nonfinite, inputs=inputs,
        target_batch=target_batch,
        weights=weights, strategy=strategy, log=loggers,  # type: ignore[arg-type]
    )
    if launch is not None:
        check_request(options)  # once, before any worker starts
        run_dir = out or _default_run_dir(model, preset)  # fixed here: every worker gets the same --out
        _refuse_existing(run_dir)
        run_launch(launch, "train", run_dir, {"--out": str(run_dir)})

    with process_group(resolve_device(device)) as world:
        run_dir = out or _default_run_dir(model, preset, world.broadcast(int(time.time())))
        _refuse_existing(run_dir)
        world.barrier()
        resolved = resolve_run(dataclasses.replace(options, nproc=world.size))  # bad input: nothing written yet
        progress = _progress(world)
        with run_lock(run_dir, world, create=True):  # this process (rank 0) is the run's one writer
            _refuse_run_json(run_dir)  # looked at again: another process may have written it meanwhile
            world.barrier()  # every rank has looked before rank 0 writes run.json
            _prepare_run_dir(run_dir, world)
            with _interruptions(run_dir, progress, world), \
                    open_reporter(progress, run_dir, loggers, world) as reporter:
                outcome = train_run(run_dir, resolved.run_config(), stop_after_epochs=stop_after_epochs,
                                    reporter=reporter, dataset=resolved.dataset, world=world, forecast=True)
            if world.is_main:
                _finish_message(outcome.run_dir, outcome.finished, outcome.epochs_done)


def _refuse_existing(run_dir: Path) -> None:
    """`train --out` of a directory another process is writing (naming its pid), or that holds a run."""
    _refuse_locked(run_dir)  # first: nothing, not even the write check, touches a run being written
    check_out_dir(run_dir)
    _refuse_run_json(run_dir)


def _refuse_run_json(run_dir: Path) -> None:
    if (run_dir / "run.json").exists():
        raise MmkitError(f"{run_dir} already holds a run; continue it with `mmkit resume {run_dir}` or pick another --out")


def _refuse_locked(run_dir: Path) -> None:
    """One line naming the pid of the process writing `run_dir`, if one is (before any work)."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunLocked(run_dir, holder)


def _prepare_run_dir(run_dir: Path, world: World) -> None:
    """Before this process writes the run (rank 0, holding its lock): remove what dead writers left
    behind (their `.tmp-*` / `.old-*` files and checkpoint directories); the other ranks wait for it."""
    from mmkit.train.rundir import remove_stale_run_temp

    if world.is_main:
        remove_stale_run_temp(run_dir)
    world.barrier()


def _repair_pointers(run_dir: Path, reporter: Any) -> None:
    """best.json / last.json are derived state: broken ones are rebuilt from the step directories."""
    from mmkit.train.checkpoint import checkpoints_dir, repair_pointers, stop_on_write_failure

    with stop_on_write_failure(run_dir, f"the pointers in {checkpoints_dir(run_dir)}"):
        warning = repair_pointers(run_dir)
    if warning is not None:
        reporter.message(warning)


def _progress(world: World) -> Any:
    from mmkit.cli.progress import RankReporter, RichReporter

    return RichReporter() if world.is_main else RankReporter(world.rank)


@contextlib.contextmanager
def open_reporter(progress: Any, run_dir: Path, loggers: tuple[str, ...], world: World) -> Iterator[Any]:
    """The progress display and, on rank 0, the run's loggers (`--log`), closed however the run ends."""
    from mmkit.train.report import FanOut

    reporter = FanOut(progress, *(open_loggers(run_dir, loggers) if world.is_main else ()))
    try:
        yield reporter
    finally:
        reporter.close()


@one_line_errors
def resume_cli(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Extend the run to this many epochs in total.")] = None,
    stop_after_epochs: Annotated[int | None, typer.Option("--stop-after-epochs", min=1, help="Stop after this many epochs in total.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help=f"Change a training setting from here on, recorded in run.json: {', '.join(RESUME_KEYS)} (repeatable)."),
    ] = None,
    nproc_per_node: NprocOption = None,
    strategy: StrategyOption = None,
    nnodes: NnodesOption = None,
    node_rank: NodeRankOption = None,
    rdzv_endpoint: RdzvOption = None,
    allow_changed_model: AllowChangedModelOption = False,
) -> None:
    """Continue a run exactly where its last checkpoint left it (model, optimizer, scaler, RNG, data order),
    with the same or another number of processes; --set changes the lr, clipping or length from there on."""
    overrides = parse_set_options(set_)
    check_strategy(strategy)
    if strategy is not None:  # kept in run.json unless given; recorded like --set strategy=...
        if "strategy" in overrides:
            raise MmkitError("strategy is given twice, as --strategy and as --set strategy=...; keep one")
        overrides["strategy"] = strategy
    from mmkit.train.checkpoint import list_checkpoints
    from mmkit.train.config import RunConfig
    from mmkit.train.distributed import process_group
    from mmkit.train.run import train_run

    config = RunConfig.load(run, allow_changed_model=allow_changed_model).with_resume_overrides(overrides, epochs)
    loggers = check_loggers(config.log)  # the run logs where it logged: its packages must be installed
    launch = requested_launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    if launch is not None:
        if config.training.tasks:
            raise MmkitError("continual learning runs in one process; drop --nproc-per-node")
        _check_resume_split(launch.world_size, int(config.training.batch_size))
        _refuse_locked(run)  # before any worker starts
        run_launch(launch, "resume", run, {})

    with process_group(config.device) as world, run_lock(run, world):  # rank 0: the run's one writer
        progress = _progress(world)
        _prepare_run_dir(run, world)
        if world.is_main:
            _repair_pointers(run, progress)
        world.barrier()
        from_checkpoint = bool(list_checkpoints(run))
        if not from_checkpoint and world.is_main:
            progress.message(f"no complete checkpoint in {run} yet: starting the run from step 0 as "
                             f"{run / 'run.json'} describes it")
        with _interruptions(run, progress, world), open_reporter(progress, run, loggers, world) as reporter:
            outcome = train_run(run, config, resume=from_checkpoint, stop_after_epochs=stop_after_epochs,
                                reporter=reporter, world=world, forecast=True)
        if world.is_main:
            _finish_message(outcome.run_dir, outcome.finished, outcome.epochs_done)


def _check_resume_split(world_size: int, batch_size: int) -> None:
    """A resumed run keeps its global batch: the number of processes must divide it."""
    if batch_size % world_size:
        divisors = ", ".join(str(n) for n in range(1, min(batch_size, 64) + 1) if batch_size % n == 0)
        raise MmkitError(f"the run's batch size {batch_size} does not split evenly across {world_size} processes; "
                         f"resume it with a number of processes that divides {batch_size} ({divisors})")


@contextlib.contextmanager
def _interruptions(run_dir: Path, reporter: object, world: World | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM: the loop has checkpointed; say how to continue (rank 0) and exit 130 / 143."""
    from mmkit.train.signals import TrainingInterrupted

    try:
        yield
        return
    except TrainingInterrupted as stop:
        if world is None or world.is_main:
            reporter.progress.stop()  # type: ignore[attr-defined]
            processes = f" --nproc-per-node {world.size}" if world is not None and world.distributed else ""
            console.print(f"{stop}; checkpoint {stop.checkpoint.name} written. "
                          f"Continue with: mmkit resume {run_dir}{processes}", soft_wrap=True)
        code = stop.exit_code
    # raised outside the handler, so that no traceback keeps the training loop's frames (and a
    # data-parallel model holding the process group) alive
    raise typer.Exit(code)


def _finish_message(run_dir: Path, finished: bool, epochs_done: int) -> None:
    if finished:
        console.print(f"run saved in {run_dir} — evaluate with `mmkit eval {run_dir}`", soft_wrap=True)
    else:
        console.print(f"stopped after epoch {epochs_done}; continue with `mmkit resume {run_dir}`", soft_wrap=True)
