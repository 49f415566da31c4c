"""`mmkit report RUN [RUN2 ...] [-o report.html]`: one self-contained HTML page per run or runs —
resolved config, memory plan, training curves, test metrics, confusion matrix, per-class recall,
checkpoints; several runs get their curves overlaid and their metrics side by side."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmkit.cli.common import console, human_bytes, one_line_errors
from mmkit.errors import MmkitError

if TYPE_CHECKING:
    from mmkit.train.charts import Panel
    from mmkit.train.runsummary import RunSummary

METRICS = (("accuracy", "accuracy"), ("uar", "UAR"), ("war", "WAR"), ("macro_f1", "macro-F1"))


@one_line_errors
def report_cli(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several: curves overlaid, metrics side by side).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    no_memory: Annotated[
        bool, typer.Option("--no-memory", help="Skip simulating the memory plan of runs whose run.json has none.")
    ] = False,
) -> None:
    """Write one self-contained HTML page (inline SVG, no network when viewed) about finished or
    running runs."""
    if len({r.resolve() for r in runs}) != len(runs):
        raise MmkitError("a run is given twice")
    from mmkit.atomic import write_atomic
    from mmkit.train.runsummary import summarize_run

    summaries = [summarize_run(run, simulate_memory=not no_memory) for run in runs]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render_report(summaries).encode())
    console.print(f"wrote {out}", soft_wrap=True)


def render_report(summaries: list[RunSummary]) -> str:
    from mmkit.cli.htmlpage import page

    if len(summaries) == 1:
        s = summaries[0]
        c = s.config
        title = f"mmkit report · {s.name}"
        subtitle = f"{c.model} · size {c.size} · preset {c.preset} · data {c.data} · {c.device} · {c.precision}"
        body = [_status(s), _metrics_section(s), _curves_section([s]), _confusion_section(s), _memory_section(s),
                _checkpoints_section(s), _config_section(s)]
        return page(title, subtitle, body)
    title = f"mmkit report · {len(summaries)} runs"
    subtitle = " · ".join(f"{s.name} ({s.config.model}:{s.config.size})" for s in summaries)
    body = [_side_by_side(summaries), _curves_section(summaries)]
    for s in summaries:
        body.append(f'<h2 id="run-{escape(s.name)}">{escape(s.name)}</h2>{_status(s)}')
        body += [_confusion_section(s, level=3), _memory_section(s, level=3), _checkpoints_section(s, level=3),
                 _config_section(s, level=3)]
    return page(title, subtitle, body)


def _status(s: RunSummary) -> str:
    epochs = s.config.training.epochs
    done = s.history[-1]["epoch"] if s.history else 0
    state = "finished" if s.metrics is not None else f"not finished: {done} of {epochs} epochs"
    return f"<p>{escape(str(s.run_dir))} · {state} · {done} epochs, {s.history[-1]['step'] if s.history else 0} steps</p>"


def _value_cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return "—"
    return f'<span data-metric="{key}" data-value="{value!r}">{value:.4f}</span>'


def _metrics_section(s: RunSummary) -> str:
    from mmkit.cli.htmlpage import table

    if s.metrics is None:
        return "<h2>Test metrics</h2><p>none yet: metrics.json is written when the run finishes</p>"
    m = s.metrics
    rows = [(label, _value_cell(m, key)) for key, label in METRICS]
    rows.append(("test samples", f'<span data-metric="n" data-value="{m.get("n")}">{m.get("n")}</span>'))
    rows.append(("checkpoint tested", f"{escape(str(m.get('checkpoint')))} (epoch {escape(str(m.get('epoch')))})"))
    return f"<h2>Test metrics</h2>{table(('metric', 'test'), rows, raw=True, attrs=' id=test-metrics')}"


def _side_by_side(summaries: list[RunSummary]) -> str:
    from mmkit.cli.htmlpage import table

    rows = []
    for key, label in METRICS:
        rows.append((label, *(_value_cell(s.metrics, key) if s.metrics else "—" for s in summaries)))
    rows.append(("parameters' size", *(escape(s.config.size) for s in summaries)))
    rows.append(("epochs", *(str(s.history[-1]["epoch"]) if s.history else "0" for s in summaries)))
    best = [min((r["val_loss"] for r in s.history if "val_loss" in r), default=None) for s in summaries]
    rows.append(("lowest validation loss", *(f"{b:.4f}" if b is not None else "—" for b in best)))
    return (f"<h2>Test metrics, side by side</h2>"
            f"{table(('metric', *(s.name for s in summaries)), rows, raw=True, attrs=' id=test-metrics')}")


def _overlay(summaries: list[RunSummary]) -> list[Panel]:
    """Each panel of the runs' curves with every run's series, coloured by run."""
    from dataclasses import replace

    from mmkit.train.charts import curve_panels

    panels: dict[str, Panel] = {}
    for k, s in enumerate(summaries):
        for panel in curve_panels(s.history):
            series = tuple(replace(x, label=f"{s.name} · {x.label}", colour=k) for x in panel.series)
            known = panels.get(panel.title)
            panels[panel.title] = replace(panel, series=series) if known is None else \
                replace(known, series=known.series + series)
    return list(panels.values())


def _curves_section(summaries: list[RunSummary]) -> str:
    from mmkit.train.charts import curve_panels, line_chart_svg

    panels = curve_panels(summaries[0].history) if len(summaries) == 1 else _overlay(summaries)
    if not panels:
        return "<h2>Training curves</h2><p>no epoch finished yet</p>"
    charts = "".join(line_chart_svg(p) for p in panels)
    return f'<h2>Training curves</h2><div class="charts" id="curves">{charts}</div>'


def _confusion_section(s: RunSummary, level: int = 2) -> str:
    from mmkit.cli.htmlpage import table
    from mmkit.train.charts import heatmap_svg

    h = f"h{level}"
    if s.metrics is None or "confusion_matrix" not in s.metrics:
        return ""
    m = s.metrics
    classes, recall, f1 = m["classes"], m.get("per_class_recall", {}), m.get("per_class_f1", {})
    rows = []
    for name in classes:
        support = sum(m["confusion_matrix"][classes.index(name)])
        if name in recall:
            bar = f'<span class="bar" style="width:{100 * recall[name]:.0f}px"></span>'
            value = f'<span data-recall="{escape(name)}" data-value="{recall[name]!r}">{recall[name]:.4f}</span>'
            rows.append((escape(name), f"{value} {bar}", f"{f1[name]:.4f}", str(support)))
        else:
            rows.append((escape(name), "— (no samples)", "—", "0"))
    return (f'<{h}>Confusion matrix (test, {m.get("n")} samples)</{h}><div id="confusion">'
            f'{heatmap_svg(m["confusion_matrix"], classes)}</div>'
            f"<{h}>Per-class recall</{h}>{table(('class', 'recall', 'F1', 'samples'), rows, raw=True)}")


def _memory_section(s: RunSummary, level: int = 2) -> str:
    from mmkit.train.charts import stacked_bar_svg

    h = f"h{level}"
    if s.memory is None:
        return f"<{h}>Memory plan</{h}><p>{escape(s.memory_note or 'none')}</p>"
    mem = s.memory
    total = sum(v for _, v in mem.parts)
    budget = f" of a {human_bytes(mem.budget)} budget" if mem.budget else ""
    return (f"<{h}>Memory plan</{h}><p>{human_bytes(total)}{budget}: {escape(mem.source)}</p>"
            f'<div id="memory">{stacked_bar_svg(mem.parts, human_bytes, limit=mem.budget)}</div>')


def _checkpoints_section(s: RunSummary, level: int = 2) -> str:
    from mmkit.cli.htmlpage import table

    h = f"h{level}"
    if not s.checkpoints:
        return f"<{h}>Checkpoints</{h}><p>none complete</p>"
    rows = [(c.name, str(c.step), human_bytes(c.bytes), " ".join(n for n, on in (("best", c.best), ("last", c.last)) if on))
            for c in s.checkpoints]
    return f"<{h}>Checkpoints</{h}>{table(('checkpoint', 'step', 'size', 'pointer'), rows, numeric_from=1)}"


def _config_section(s: RunSummary, level: int = 2) -> str:
    h = f"h{level}"
    text = json.dumps(s.config.model_dump(mode="json"), indent=2)
    return f"<{h}>Resolved config (run.json)</{h}><details><summary>show</summary><pre>{escape(text)}</pre></details>"
