"""`mmkit memory-plan [MODEL] --gpu G`: simulated peak memory by category, auto size and batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mmkit.cli.common import (
    console,
    err_console,
    human_bytes,
    human_duration,
    import_for_command,
    one_line_errors,
    parse_auto_int,
    parse_set_options,
    print_json,
)
from mmkit.errors import MmkitError
from mmkit.cli.common import MODEL_HELP, InputOption
from mmkit.cli.launch import check_strategy
from mmkit.models.catalog import check_model_name, parse_input_options

if TYPE_CHECKING:
    from mmkit.plan.fit import Candidate
    from mmkit.plan.planner import MemoryPlan
    from mmkit.plan.search import SearchResult
    from mmkit.plan.timing import TimeEstimate
    from mmkit.train.resolve import ResolvedRun, RunOptions

BAR_WIDTH = 30


@one_line_errors
def memory_plan_cli(
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP + " Default: $MMKIT_MODEL or lfm2.")] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", "-g", help="GPU preset, 'auto' (detect CUDA) or 'cpu' (default: as `mmkit "
                                 "train` fits: the preset's target GPU, else the local device).")
    ] = None,
    preset: Annotated[str, typer.Option("--preset", "-p", help="Training preset the defaults come from.")] = "half-data",
    size: Annotated[str | None, typer.Option("--size", "-s", help="Named size, wN, or 'auto'.")] = None,
    batch_size: Annotated[str | None, typer.Option("--batch-size", "-b", help="Batch size or 'auto'.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, fp16 or bf16 (autocast, fp32 master weights).")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="adamw or sgd (momentum 0.9).")] = None,
    grad_checkpointing: Annotated[
        bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Activation checkpointing (lfm2, clip, fusion).")
    ] = None,
    margin: Annotated[float | None, typer.Option("--margin", min=0.0, max=0.99, help="Fraction of VRAM kept free (default: the GPU preset's).")] = None,
    prefer: Annotated[str | None, typer.Option("--prefer", help="When both are auto: 'width' (default) or 'batch'.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting as `mmkit train` does: model.KEY=V or a training key (repeatable).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="Take input shapes and classes from this data (default: the model's, as `train`).")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Also run real steps on the local device and compare.")] = False,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Data-parallel processes (one GPU each): --batch-size is global, each "
                          "process plans its share, plus DDP's gradient buckets.")
    ] = 1,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="With --nproc > 1: ddp (each process holds the whole model) or fsdp "
                                 "(one rank's sharded step simulated over a fake process group).")
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="Where the planned run trains, which sets its precision: auto (as `mmkit "
                          "train` would on this machine), cpu, or cuda (on the --gpu preset's GPU, present here or not).")
    ] = "auto",
    input_: InputOption = None,
    target_batch: Annotated[
        int | None, typer.Option("--target-batch", min=1, help="Samples per optimizer step: search precision (unless "
                                 "--precision is given), activation checkpointing (unless --[no-]grad-checkpointing is "
                                 "given) and micro-batch × accumulation = N, ranked by predicted speed.")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Simulate again instead of reusing cached simulations (MMKIT_NO_CACHE=1).")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Simulate training memory by category on fake tensors and fit size and batch to a GPU:
    the run `mmkit train` would start with the same options, planned without training."""
    from mmkit.settings import MmkitSettings

    if prefer not in (None, "width", "batch"):
        raise MmkitError(f"--prefer must be 'width' or 'batch', got {prefer!r}")
    if precision is not None and precision not in ("fp32", "fp16", "bf16", "auto"):
        raise MmkitError(f"unknown precision {precision!r}; valid: auto (with --target-batch), bf16, fp16, fp32")
    if precision == "auto" and target_batch is None:
        raise MmkitError("--precision auto searches the precisions with --target-batch N; give it, or a precision")
    if optimizer is not None and optimizer not in ("adamw", "sgd"):
        raise MmkitError(f"unknown optimizer {optimizer!r}; valid: adamw, sgd")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise MmkitError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    check_strategy(strategy)
    model = model or MmkitSettings().model
    check_model_name(model)  # a mistyped name is reported before torch loads, and before any note
    import_for_command("mmkit.train.resolve", "mmkit.plan.planner")
    from mmkit.train.resolve import RunOptions, check_request

    options = RunOptions(
        model=model, preset=preset, size=size, batch_size=parse_auto_int(batch_size, "--batch-size"),  # type: ignore[arg-type]
        precision=precision, optimizer=optimizer, gradient_checkpointing=grad_checkpointing,  # type: ignore[arg-type]
        data=data, gpu=gpu, device=device, set_items=tuple(parse_set_options(set_).items()), nproc=nproc,
        margin=margin, prefer=prefer, inputs=parse_input_options(input_), target_batch=target_batch,  # type: ignore[arg-type]
        strategy=strategy,  # type: ignore[arg-type]
    )
    recipe = check_request(options, planning=True)
    if prefer is not None and (target_batch is not None or not (recipe.size == "auto" and recipe.batch_size == "auto")):
        raise MmkitError(
            f"--prefer {prefer} only applies when size and batch are both auto "
            f"(here size {recipe.size}, batch {recipe.batch_size})"
        )
    from mmkit.cache import bypassed

    with bypassed(no_cache):
        plan = plan_request(options, measure=measure)
    for note in plan.notes:  # after every input check: an error stays the only line
        err_console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    if json_output:
        doc = plan.as_dict()
        doc["preset"] = preset
        if plan.search is not None:
            doc["search"] = plan.search.as_dict()
        print_json(doc)
    else:
        render_plan(plan, preset)
        if plan.search is not None:
            render_search(plan.search)


def plan_request(options: RunOptions, *, measure: bool = False) -> MemoryPlan:
    """Resolve `options` exactly as `mmkit train` does (mmkit.train.resolve), then simulate."""
    from mmkit.plan.memory import release_fake_process_group
    from mmkit.train.resolve import resolve_run

    try:
        return _plan_resolved(resolve_run(options, load_data=False, simulate=True), options, measure)
    finally:
        release_fake_process_group()  # a sharded plan's fake ranks


def _plan_resolved(resolved: ResolvedRun, options: RunOptions, measure: bool) -> MemoryPlan:
    from mmkit.data.catalog import BUILTIN_DATASETS
    from mmkit.plan.planner import plan_memory

    assert resolved.fit is not None and resolved.gpu is not None  # simulate=True always fits
    notes = list(resolved.notes)
    if resolved.device == "cpu" and resolved.gpu.device_type == "cuda":
        notes.append(f"planned as `mmkit train` runs on this machine's CPU ({resolved.precision.precision}); "
                     f"--device cuda plans the run on the {resolved.gpu.name} itself")
    if resolved.dataset is not None:
        splits = [len(resolved.dataset.indices(split)) for split in ("train", "val")]
    elif not resolved.data:  # a model described by --input alone: no data, so no epoch
        splits = [resolved.batch_size, 0]
    else:
        info = BUILTIN_DATASETS[resolved.data]
        splits = [info.train, info.val]
    recipe = resolved.recipe
    return plan_memory(
        resolved.fit, resolved.gpu, precision=resolved.precision.precision, optimizer=recipe.optimizer,
        gradient_checkpointing=recipe.gradient_checkpointing, margin=options.margin,
        train_samples=round(splits[0] * recipe.train_fraction), val_samples=splits[1], epochs=recipe.epochs,
        measure=measure, notes=notes, nproc=options.nproc, grad_accum=recipe.grad_accum,
        has_data=bool(resolved.data), search=resolved.search, strategy=recipe.strategy,
    )


def render_search(search: SearchResult) -> None:
    """The ranked ways to train at the target batch, and why each dimension the winner left lost."""
    source = "a calibration" if search.time_source.startswith("calibrated") else "datasheet figures"
    table = Table(title=f"ways to train at {search.target_batch} samples per optimizer step, fastest first "
                        f"(memory simulated, time predicted from {source})", title_justify="left")
    for column in ("", "precision", "checkpointing", "micro × accum", "memory", "step (pred.)", "samples/s (pred.)"):
        table.add_column(column, justify="left" if column in ("", "precision", "checkpointing") else "right")
    for rank, option in enumerate(search.options, start=1):
        table.add_row(str(rank), option.precision, "yes" if option.gradient_checkpointing else "no",
                      f"{option.micro_batch} × {option.accumulation}", human_bytes(option.total_bytes),
                      human_duration(option.step_seconds), f"{option.samples_per_s:,.0f}")
    console.print(table)
    for line in search.rejected:
        console.print(f"  why not: {line}")


def _bar(value: int, budget: int) -> str:
    filled = round(BAR_WIDTH * value / budget) if budget else 0
    return "█" * min(filled, BAR_WIDTH) + ("▶" if filled > BAR_WIDTH else "")


def _why(candidate: Candidate | None, what: str, budget: int) -> str | None:
    if candidate is None:
        return None
    label = f"{what} ({candidate.size}, batch {candidate.batch_size})"
    if not candidate.simulated:
        return f"{label}: model states alone need ≥ {human_bytes(candidate.total)} > budget {human_bytes(budget)}"
    verdict = "fits" if candidate.fits else f"over budget by {human_bytes(candidate.total - budget)}"
    return f"{label} needs {human_bytes(candidate.total)}: {verdict}"


def _time_label(t: TimeEstimate) -> str:
    assert t.step_model is not None  # a plan's time is always the operator time model's
    calibrated = str(t.step_model["source"]).startswith("calibrated")
    return f"[yellow](predicted from {'a calibration' if calibrated else 'datasheet figures'})[/yellow]"


def _time_basis(t: TimeEstimate) -> str:
    assert t.step_model is not None
    return f"{t.step_model['operators']:,} operators of the simulated step; {t.step_model['source']}"


def render_plan(plan: MemoryPlan, preset: str) -> None:
    fit, chosen, gpu = plan.fit, plan.fit.chosen, plan.gpu
    budget = fit.budget_bytes
    auto = lambda flag: " [dim](auto)[/dim]" if flag else ""
    console.print(
        f"[bold]{fit.entry.name}[/bold] · size [bold]{fit.size}[/bold]{auto(fit.auto_size)} · "
        f"batch [bold]{plan.batch_size}[/bold]{auto(fit.auto_batch)}"
        f"{f' ({fit.batch_size} per process × {plan.nproc} processes)' if plan.nproc > 1 else ''} · {plan.precision}"
        f"{' autocast' if plan.precision != 'fp32' else ''} · {plan.optimizer}"
        f"{' · gradient checkpointing' if plan.gradient_checkpointing else ''} · preset {preset}"
    )
    console.print(f"on {gpu.display_name}: {human_bytes(gpu.vram_bytes)}, budget {human_bytes(budget)} "
                  f"(margin {plan.margin:.0%})")

    sharded = plan.strategy == "fsdp"
    title = "training step — peak memory" + (f", per process (batch {fit.batch_size})" if plan.nproc > 1 else "")
    if sharded:
        title += f"; FSDP: weights, gradients and optimizer state are this rank's 1/{plan.nproc} shards"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right", style="dim")
    table.add_column(f"of budget ({human_bytes(budget)})")
    train = chosen.train
    if train is not None:
        labels = {
            "weights": "weights", "gradients": "gradients", "optimizer": "optimizer state",
            "activations": "activations", "other": "other (batch, temporaries)",
        } | ({"all_gather": "all-gather buffers, unsharded weights"} if sharded else {})
        for key, label in labels.items():
            value = getattr(train, key)
            table.add_row(label, f"{value:,}", human_bytes(value), _bar(value, budget))
        table.add_section()
        table.add_row(f"peak tensors [dim](simulated, in {train.peak_phase})[/dim]",
                      f"{train.peak_tensors:,}", human_bytes(train.peak_tensors), _bar(train.peak_tensors, budget))
        overhead_labels = {"cuda_context": "CUDA context", "workspace": "cuBLAS/cuDNN workspace",
                           "allocator_reserve": "allocator reserve"}
        for key, value in chosen.overhead.items():
            label = ("DDP gradient buckets [dim](estimated: one more copy of the gradients)[/dim]"
                     if key == "ddp_gradient_buckets" else f"{overhead_labels.get(key, key)} [dim](preset)[/dim]")
            table.add_row(label, f"{value:,}", human_bytes(value), _bar(value, budget))
    else:
        table.add_row("model states alone (lower bound)", f"{chosen.total:,}", human_bytes(chosen.total),
                      _bar(chosen.total, budget))
    table.add_section()
    style = "green" if chosen.fits else "red"
    table.add_row("[bold]total[/bold]", f"[{style}]{chosen.total:,}[/{style}]", human_bytes(chosen.total),
                  f"[{style}]{_bar(chosen.total, budget)}[/{style}]")
    console.print(table)

    infer = plan.inference_peak + sum(plan.inference_overhead.values())
    console.print(f"inference forward (batch {fit.batch_size}): peak tensors {human_bytes(plan.inference_peak)} "
                  f"+ overhead {human_bytes(sum(plan.inference_overhead.values()))} = {human_bytes(infer)} [dim](simulated)[/dim]")
    if chosen.fits:
        console.print(f"[green]fits[/green]: {human_bytes(chosen.total)} of {human_bytes(budget)} "
                      f"({100 * chosen.total / budget:.1f} % of the budget)")
    else:
        console.print(f"[red]does not fit[/red]: needs {human_bytes(chosen.total)}, budget {human_bytes(budget)}")
    reasons = [
        _why(fit.next_width, "next larger width", budget),
        _why(fit.next_batch, "next larger batch", budget),
    ]
    if fit.auto_size and fit.next_width is None and chosen.fits:
        reasons.append(f"{fit.size} is the largest width of the ladder")
    if fit.batch_cap_reached:
        reasons.append(f"batch {fit.batch_size} is the preset's cap (max_batch_size)")
    for reason in filter(None, reasons):
        console.print(f"  why: {reason}")
    cached = f" ({fit.cached} from the simulation cache; --no-cache simulates again)" if fit.cached else ""
    console.print(f"[dim]{fit.simulations} training steps simulated on fake tensors{cached}.[/dim]")

    if plan.time is not None and not plan.has_data:
        t = plan.time
        console.print(
            f"time {_time_label(t)}: {human_duration(t.step_seconds)} per training step "
            f"[dim]({t.bound}-bound; {_time_basis(t)}; give --data for the time per epoch)[/dim]"
        )
    elif plan.time is not None:
        t = plan.time
        console.print(
            f"time {_time_label(t)}: {t.steps_per_epoch} steps/epoch × {human_duration(t.step_seconds)}"
            f" → {human_duration(t.epoch_seconds)}/epoch, {human_duration(t.total_seconds)} for {t.epochs} epochs "
            f"[dim]({t.bound}-bound; {_time_basis(t)}, {t.train_samples} training samples)[/dim]"
        )
    if plan.measure is not None:
        m = plan.measure
        console.print(
            f"measured on {m.measurement.device}: peak tensors {m.measurement.peak_tensors:,} B vs predicted "
            f"{m.predicted_peak:,} B ({m.error_percent:+.2f} %) [dim]({m.measurement.method})[/dim]"
        )
        console.print(
            f"measured step {human_duration(m.time.step_seconds)} [dim](median of {len(m.measurement.step_seconds)} "
            f"real steps timed without the tracker, {human_duration(m.measurement.spread_seconds[0])}–"
            f"{human_duration(m.measurement.spread_seconds[1])})[/dim] → {human_duration(m.time.epoch_seconds)}/epoch, "
            f"{human_duration(m.time.total_seconds)} for {m.time.epochs} epochs (training steps only)"
        )
