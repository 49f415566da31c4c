"""`mmkit count MODEL`: exact parameters by component, MACs and FLOPs, weight bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mmkit.cli.common import (
    console,
    human_bytes,
    human_count,
    import_for_command,
    one_line_errors,
    parse_set_options,
    print_json,
)
from mmkit.cli.common import MODEL_HELP, InputOption
from mmkit.models.catalog import BUILTIN_MODELS, check_model_name, entry_point_models, parse_input_options

if TYPE_CHECKING:
    from mmkit.plan.count import ComponentCount, CountReport


def _complete_model(incomplete: str) -> list[str]:
    names = [*BUILTIN_MODELS, *entry_point_models()]  # the shell waits on this: no torch, no package imported
    return [m for m in names if m.startswith(incomplete)]


@one_line_errors
def count_cli(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, autocompletion=_complete_model)],
    size: Annotated[
        str | None, typer.Option("--size", "-s", help="Named size, or wN for the default size at width N.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a model setting: key=value (repeatable), e.g. width=256."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Batch size for the per-batch figures.")
    ] = 1,
    depth: Annotated[int, typer.Option("--depth", "-d", min=1, help="Depth of the parameter tree.")] = 1,
    input_: InputOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Count parameters per component, MACs and FLOPs, and weight bytes — exactly, on the meta device."""
    overrides = parse_set_options(set_, strip_prefix="model.")
    inputs = dict(parse_input_options(input_))
    check_model_name(model)  # a mistyped name is reported before torch loads
    import_for_command("mmkit.plan.count", "torch._dynamo")  # the first Python meta kernel imports torch._dynamo
    from mmkit.plan.count import count_model

    report = count_model(model, size=size, overrides=overrides, batch_size=batch_size, depth=depth, inputs=inputs)
    if json_output:
        print_json(report.as_dict())
    else:
        render_count(report)


def _component_rows(table: Table, components: list[ComponentCount], total: int, indent: int = 0) -> None:
    for c in components:
        share = f"{100 * c.params / total:.1f} %" if total else "-"
        frozen = c.params - c.trainable
        table.add_row(
            "  " * indent + c.name.rsplit(".", 1)[-1] if indent else c.name,
            f"{c.params:,}",
            human_count(c.params),
            share,
            f"{frozen:,}" if frozen else "",
        )
        _component_rows(table, c.children, total, indent + 1)


def render_count(report: CountReport) -> None:
    title = f"{report.model} · size {report.size}"
    params = Table(title=f"{title} — parameters (exact)", title_justify="left")
    params.add_column("component")
    params.add_column("params", justify="right")
    params.add_column("", justify="right", style="dim")
    params.add_column("share", justify="right")
    params.add_column("frozen", justify="right")
    _component_rows(params, report.components, report.total_params)
    params.add_section()
    frozen = report.total_params - report.trainable_params
    params.add_row(
        "total", f"{report.total_params:,}", human_count(report.total_params), "100 %", f"{frozen:,}" if frozen else ""
    )
    console.print(params)

    b = report.per_batch.batch_size
    compute = Table(title=f"{title} — compute (exact, see note)", title_justify="left")
    compute.add_column("")
    compute.add_column("per sample", justify="right")
    if b != 1:
        compute.add_column(f"per batch of {b}", justify="right")

    def row(label: str, per_sample: int, per_batch: int) -> None:
        cells = [f"{per_sample:,}  ({human_count(per_sample)})"]
        if b != 1:
            cells.append(f"{per_batch:,}  ({human_count(per_batch)})")
        compute.add_row(label, *cells)

    s, n = report.per_sample, report.per_batch
    row("MACs, forward", s.forward_macs, n.forward_macs)
    row("FLOPs, forward (= 2 × MACs)", s.forward_flops, n.forward_flops)
    row("FLOPs, forward + backward", s.train_flops, n.train_flops)
    console.print(compute)

    weights = Table(title=f"{title} — weight bytes (exact)", title_justify="left")
    for dtype in report.weights_bytes:
        weights.add_column(dtype, justify="right")
    weights.add_row(*(f"{v:,} B ({human_bytes(v)})" for v in report.weights_bytes.values()))
    console.print(weights)
    console.print(
        "[dim]Parameters counted on the meta device (nothing allocated). FLOPs from torch's "
        "FLOP formulas: matrix products, convolutions and attention, 1 MAC = 2 FLOPs; "
        "elementwise ops are not counted. A figure quoted as “FLOPs” elsewhere is often MACs.[/dim]"
    )
