"""`mmkit compare A B`: static (exact), speed (measured) and learning (measured) side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from mmkit.cli.common import (
    console,
    err_console,
    human_bytes,
    human_count,
    one_line_errors,
    parse_set_options,
    print_json,
)
from mmkit.errors import MmkitError

Row = tuple[str, str, str, str]  # label, A, B, A/B (a label alone is a section heading)


@one_line_errors
def compare_cli(
    a: Annotated[str, typer.Argument(help="First model: MODEL, MODEL:SIZE or MODEL[:SIZE]@PRESET.")],
    b: Annotated[str, typer.Argument(help="Second model, the same forms.")],
    data: Annotated[str | None, typer.Option("--data", help="Data both models are trained on (default: A's).")] = None,
    size: Annotated[str | None, typer.Option("--size", "-s", help="Size for specs without :SIZE.")] = None,
    preset: Annotated[str, typer.Option("--preset", "-p", help="Training recipe for the learning block.")] = "quick",
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Batch (default: the preset's).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=0, help="Epochs per run; 0 = static block only.")] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Training seeds per model.")] = 3,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, fp16 or bf16 (default: the preset's).")] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="GPU preset for the simulated memory (default: the local device); an "
                                 "'auto' size or batch is fitted to it (default: as `mmkit train` fits).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (speed and learning).")] = "auto",
    separate_mode: Annotated[str, typer.Option("--separate-mode", help="How `separate` trains: joint or independent.")] = "joint",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the table as Markdown to FILE.")] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the table and verdict as a self-contained HTML page to FILE.")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a training setting for both, KEY=V (repeatable).")] = None,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Compare on data holding NaN or Inf (refused otherwise).")] = False,
) -> None:
    """Compare two models on the same data: exact counts, simulated memory, measured speed and learning.

    A spec is MODEL, MODEL:SIZE or MODEL[:SIZE]@PRESET (that side's own training recipe).

    Static and learning numbers repeat exactly on the same machine and torch build; only timings vary.
    """
    from mmkit.train.compare import compare, load_warning

    if separate_mode not in ("joint", "independent"):
        raise MmkitError(f"--separate-mode must be 'joint' or 'independent', got {separate_mode!r}")
    if precision is not None and precision not in ("fp32", "fp16", "bf16"):
        raise MmkitError(f"unknown precision {precision!r}; valid: bf16, fp16, fp32")
    with err_console.status("comparing") as status:
        result = compare(
            a, b, data=data, size=size, preset=preset, batch_size=batch_size, epochs=epochs, seeds=seeds,
            precision=precision, gpu=gpu, device=device, separate_mode=separate_mode,
            set_options=parse_set_options(set_), progress=lambda text: status.update(text),
            allow_nonfinite=allow_nonfinite,
        )
    for note in result.get("notes", []):  # what `auto` and the precision choice decided, on stderr
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    rows = table_rows(result)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(result, rows))
    if html is not None:
        from mmkit.atomic import write_atomic

        html.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(html, to_html(result, rows).encode())
    if json_output:
        print_json(result)
    else:
        table = Table(title=f"mmkit compare {result['settings']['a']} {result['settings']['b']}", title_justify="left")
        for column, justify in (("", "left"), (result["settings"]["a"], "right"), (result["settings"]["b"], "right"), ("A/B", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for label, va, vb, ratio in rows:
            if not va and not vb:
                table.add_section()
                table.add_row(f"[bold]{escape(label)}[/bold]", "", "", "")
            else:
                table.add_row(escape(label), escape(va), escape(vb), ratio)
        console.print(table)
        if "verdict" in result:
            console.print(f"[bold]verdict:[/bold] {escape(result['verdict'])}")
        for written in (markdown, html):
            if written is not None:
                console.print(f"wrote {written}")
    warning = load_warning(result.get("machine", {}))
    if warning:  # on stderr, so that --json stays one document
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.3f}" if y else "-"


def _machine(result: dict[str, Any]) -> str:
    """`cpu (AVX512, 2 cores)` on a CPU, else the device."""
    device, machine = result["settings"]["device"], result.get("machine", {})
    if device != "cpu":
        return device
    details = [machine["cpu_capability"]] if machine.get("cpu_capability") else []
    if machine.get("cores"):
        details.append(f"{machine['cores']} cores")
    return f"cpu ({', '.join(details)})" if details else "cpu"


def _recipe(side: dict[str, Any]) -> str:
    r = side["recipe"]
    return f"{r['preset']}, batch {r['batch_size']}, {r['precision']}"


def _mean_std_row(label: str, a: dict[str, Any], b: dict[str, Any], fmt: str = ".4f") -> Row:
    return (label, f"{a['mean']:{fmt}} ± {a['std']:{fmt}}", f"{b['mean']:{fmt}} ± {b['std']:{fmt}}",
            _ratio(a["mean"], b["mean"]))


def table_rows(result: dict[str, Any]) -> list[Row]:
    s, a, b = result["settings"], result["a"], result["b"]
    sa, sb = a["static"], b["static"]
    same = s["batch_size"] is not None and s["precision"] is not None
    at = f"batch {s['batch_size']}, {s['precision']}" if same else "each side's batch and precision"
    rows: list[Row] = [("static (exact)", "", "", "")]
    if not s["same_recipe"]:
        rows.append(("recipe (preset, batch, precision)", _recipe(a), _recipe(b), ""))
    rows += [
        ("size", sa["size"], sb["size"], ""),
        ("parameters", f"{sa['params']:,}", f"{sb['params']:,}", _ratio(sa["params"], sb["params"])),
        ("MACs / sample, forward", f"{sa['macs_per_sample']:,}", f"{sb['macs_per_sample']:,}",
         _ratio(sa["macs_per_sample"], sb["macs_per_sample"])),
        ("FLOPs / sample, forward + backward", human_count(sa["train_flops_per_sample"]),
         human_count(sb["train_flops_per_sample"]), _ratio(sa["train_flops_per_sample"], sb["train_flops_per_sample"])),
        ("weights, fp32", human_bytes(sa["weights_bytes"]["fp32"]), human_bytes(sb["weights_bytes"]["fp32"]),
         _ratio(sa["weights_bytes"]["fp32"], sb["weights_bytes"]["fp32"])),
        (f"memory (simulated, {at}, {s['gpu']})", "", "", ""),
    ]
    for key, label in (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
                       ("activations", "activations"), ("other", "other (batch, temporaries)"),
                       ("peak_tensors", "training peak tensors")):
        va, vb = sa["train_memory"][key], sb["train_memory"][key]
        rows.append((label, f"{va:,} B", f"{vb:,} B", _ratio(va, vb)))
    rows.append(("inference peak tensors", f"{sa['inference_peak_tensors']:,} B", f"{sb['inference_peak_tensors']:,} B",
                 _ratio(sa["inference_peak_tensors"], sb["inference_peak_tensors"])))
    if "speed" in a:
        rows.append((f"speed (measured on {_machine(result)}; median [p25–p75] of interleaved rounds)", "", "", ""))
        ta, tb = a["speed"]["train_step_seconds"], b["speed"]["train_step_seconds"]
        fmt_t = lambda q: f"{q['median'] * 1000:.2f} ms [{q['p25'] * 1000:.2f}–{q['p75'] * 1000:.2f}]"
        fmt_i = lambda q: f"{q['median']:,.0f}/s [{q['p25']:,.0f}–{q['p75']:,.0f}]"
        step_label = f"training step, batch {s['batch_size']}" if same else "training step, each side's batch"
        rows.append((step_label, fmt_t(ta), fmt_t(tb), _ratio(ta["median"], tb["median"])))
        if not same:
            qa, qb = a["speed"]["train_samples_per_s"], b["speed"]["train_samples_per_s"]
            rows.append(("training throughput", fmt_i(qa), fmt_i(qb), _ratio(qa["median"], qb["median"])))
        ia, ib = a["speed"]["inference_samples_per_s"], b["speed"]["inference_samples_per_s"]
        rows.append(("inference throughput", fmt_i(ia), fmt_i(ib), _ratio(ia["median"], ib["median"])))
        pa, pb = a["speed"]["measured_peak_tensors"], b["speed"]["measured_peak_tensors"]
        rows.append(("measured peak tensors, real step", f"{pa:,} B", f"{pb:,} B", _ratio(pa, pb)))
    if "learning" in a:
        la, lb = a["learning"], b["learning"]
        if la["tasks"]:
            length = (f"{la['tasks']} tasks × {la['epochs_per_task']} epochs" if
                      (la["tasks"], la["epochs_per_task"]) == (lb["tasks"], lb["epochs_per_task"]) else
                      "each side's tasks × epochs")
        else:
            length = f"{s['epochs']} epochs" if s["epochs"] is not None else "each side's epochs"
        recipe = f"preset {s['preset']}" if s["same_recipe"] else "each side's preset"
        rows.append((f"learning (measured; {s['seeds']} seeds × {length}, {recipe}, {s['data']})", "", "", ""))
        rows.append(_mean_std_row("training time, s (wall)", la["train_seconds"], lb["train_seconds"], ".1f"))
        if "peak_memory_allocated" in la:
            ma, mb = la["peak_memory_allocated"]["mean"], lb["peak_memory_allocated"]["mean"]
            rows.append(("peak CUDA memory allocated, training", human_bytes(int(ma)), human_bytes(int(mb)),
                         _ratio(ma, mb)))
        for metric in ("accuracy", "uar"):
            rows.append(_mean_std_row(f"test {metric}, mean ± std", la[metric], lb[metric]))
        if "average_accuracy" in la and "average_accuracy" in lb:
            for key, label in (("average_accuracy", "average accuracy over tasks"),
                               ("forgetting", "forgetting (first-learned − final)"),
                               ("forgetting_max", "forgetting (best earlier − final)"),
                               ("bwt", "backward transfer")):
                rows.append(_mean_std_row(f"{label}, mean ± std", la[key], lb[key]))
        rows.append(("test accuracy per seed", " ".join(f"{v:.3f}" for v in la["accuracy"]["values"]),
                     " ".join(f"{v:.3f}" for v in lb["accuracy"]["values"]), ""))
    return rows


def to_markdown(result: dict[str, Any], rows: list[Row]) -> str:
    s = result["settings"]
    lines = [f"| | {s['a']} | {s['b']} | A/B |", "|---|---:|---:|---:|"]
    for label, va, vb, ratio in rows:
        if not va and not vb:
            lines.append(f"| **{label}** | | | |")
        else:
            lines.append(f"| {label} | {va} | {vb} | {ratio} |")
    if "verdict" in result:
        lines += ["", f"Verdict: {result['verdict']}"]
    from mmkit.train.compare import load_warning

    warning = load_warning(result.get("machine", {}))
    if warning:
        lines += ["", f"Warning: {warning}"]
    return "\n".join(lines) + "\n"


def to_html(result: dict[str, Any], rows: list[Row]) -> str:
    """The table and the verdict as a self-contained page (the same kind as `mmkit report`'s)."""
    from html import escape as html_escape

    from mmkit.cli.htmlpage import page
    from mmkit.train.compare import load_warning

    s = result["settings"]
    cells = []
    for label, va, vb, ratio in rows:
        if not va and not vb:
            cells.append(f'<tr class="section"><td colspan="4">{html_escape(label)}</td></tr>')
        else:
            cells.append(f"<tr><td>{html_escape(label)}</td>" + "".join(
                f'<td class="num">{html_escape(v)}</td>' for v in (va, vb, ratio)) + "</tr>")
    head = "".join(f'<th class="{"num" if i else ""}">{html_escape(h)}</th>'
                   for i, h in enumerate(("", s["a"], s["b"], "A/B")))
    body = [f'<table id="compare"><thead><tr>{head}</tr></thead><tbody>{"".join(cells)}</tbody></table>']
    if "verdict" in result:
        body.append(f'<p class="verdict" id="verdict"><b>verdict:</b> {html_escape(result["verdict"])}</p>')
    warning = load_warning(result.get("machine", {}))
    if warning:
        body.append(f'<p class="warning"><b>warning:</b> {html_escape(warning)}</p>')
    body += [f"<p>note: {html_escape(note)}</p>" for note in result.get("notes", [])]
    return page(f"mmkit compare {s['a']} {s['b']}", f"data {s['data']} · preset {s['preset']}", body)
