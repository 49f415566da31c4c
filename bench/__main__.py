"""Run mmkit's benchmark suite and write bench/results/report.{md,json}.

    python -m bench                         # every part (about 5–10 min on a 2-core CPU)
    python -m bench --quick                 # short rounds, to check the wiring (a few minutes)
    python -m bench --only latency,overhead # some parts; the others are kept from the last report
    python -m bench --update-docs           # also rewrite the figures in docs/performance.md
    python -m bench --render-only --update-docs     # re-render report.md and docs/performance.md from report.json

Parts: overhead (mmkit's step vs a raw loop), data_share (batches as a share of an epoch), latency
(count and memory-plan), planner_accuracy (simulated vs measured memory), time_prediction (predicted vs
measured step time, after calibration), speedups (AMP,
--compile, AdamW kernels, batch, text cache, gradient checkpointing) and gpu (CUDA only; without
a GPU the report says so). Goals are ratios or limits measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import data_share, gpu, latency, overhead, planner_accuracy, speedups, time_prediction
from bench.common import RESULTS, machine, machine_line

PARTS = {
    "overhead": (overhead, "Step overhead: mmkit's training step vs a hand-written loop"),
    "data_share": (data_share, "Data share: producing batches as a fraction of an epoch"),
    "latency": (latency, "Latency of the planning commands"),
    "planner_accuracy": (planner_accuracy, "Planner accuracy on the CPU"),
    "time_prediction": (time_prediction, "Time prediction on the CPU"),
    "speedups": (speedups, "Speed-ups"),
    "gpu": (gpu, "GPU rows"),
}
# The page whose figures `--update-docs` rewrites, between BEGIN and END (nothing else on it changes).
PERFORMANCE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
BEGIN, END = "<!-- bench:performance -->", "<!-- /bench:performance -->"
# The README's Performance section: the time-prediction table in short, between its own markers.
README = PERFORMANCE_PAGE.parent.parent / "README.md"
README_BEGIN, README_END = "<!-- bench:time-prediction -->", "<!-- /bench:time-prediction -->"


def run_parts(names: list[str], quick: bool) -> dict[str, Any]:
    results = {}
    for name in names:
        module, _ = PARTS[name]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        info = machine()
        start = time.perf_counter()
        part = module.run(quick)
        seconds = time.perf_counter() - start
        info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
        results[name] = {**part, "machine": info, "seconds": seconds, "quick": quick}
        print(f"bench: {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return results


def sharing_note(report: dict[str, Any]) -> str | None:
    """Say so when other work shared the CPU: load above the core count at a part's start or end."""
    busy = []
    for name, part in report["parts"].items():
        m = part["machine"]
        load = max(m["load_average_1min"], m.get("load_average_1min_end", 0))
        if load > (m["cores"] or 1):
            busy.append(f"{name} {load:.1f}")
    if not busy:
        return None
    cores = next(iter(report["parts"].values()))["machine"]["cores"]
    return (f"Other jobs shared this {cores}-core CPU during the run (1-minute load average, per part: "
            f"{', '.join(busy)}): times are upper bounds and ratios are noisier than on a quiet machine. "
            f"The figures are to be re-measured on a quiet machine with `python -m bench --update-docs`.")


def to_markdown(report: dict[str, Any]) -> str:
    parts = report["parts"]
    first = next(iter(parts.values()))
    runs = report.get("runs") or [{"only": None}]
    how = (f"`python -m bench{' --quick' if report['quick'] else ''}`" if len(runs) == 1 and not runs[0]["only"] else
           f"{len(runs)} runs of `python -m bench` (parts re-measured with `--only`: "
           f"{'; '.join(', '.join(r['only']) for r in runs if r['only'])})")
    machines: dict[str, list[str]] = {}  # parts re-measured later may have run on another machine
    for name, part in parts.items():
        machines.setdefault(machine_line(part["machine"]), []).append(name)
    where = (f" on {machine_line(first['machine'])}" if len(machines) == 1 else
             ": " + "; ".join(f"{', '.join(names)} on {line}" for line, names in machines.items()))
    lines = [f"Measured by {how}{where}. "
             f"Time of the parts, summed: {report['total_seconds'] / 60:.1f} min.", ""]
    if report.get("threads"):
        lines[0] += f" torch threads set to {report['threads']} (`--threads`)."
    note = sharing_note(report)
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["| goal | target | measured | status |", "|---|---|---|---|"]
    notes: dict[str, int] = {}  # note → its number; goals that share a reason share the note
    for name in PARTS:
        for g in parts.get(name, {}).get("goals", []):
            mark = {"met": "met", "missed": "**missed**", "not measured": "not measured"}[g["status"]]
            if g["note"] and g["status"] != "met":
                mark += f" ({notes.setdefault(g['note'], len(notes) + 1)})"
            lines.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {mark} |")
    if notes:
        lines.append("")
        lines += [f"({i}) {n}." for n, i in notes.items()]
    for name, (module, title) in PARTS.items():
        if name in parts:
            lines += ["", f"### {title}", "", module.to_markdown(parts[name])]
    return "\n".join(lines).rstrip() + "\n"


def update_page(markdown: str, page: Path = PERFORMANCE_PAGE, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between the page's `begin` and `end` markers with `markdown`."""
    text = page.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{page}: markers {begin} … {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{markdown}{end}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="short rounds, to check the wiring")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for report.md and report.json")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--update-docs", "--update-readme", dest="update_docs", action="store_true",
                        help="rewrite the figures in docs/performance.md and the README's time-prediction table "
                        "(--update-readme: the old name)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: write report.md (and docs/performance.md with --update-docs) from report.json")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads((args.out / "report.json").read_text())
        return _write(report, args.out, args.update_docs)
    names = list(PARTS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; valid: {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run_parts(names, args.quick)
    total = time.perf_counter() - start
    out_json = args.out / "report.json"
    report: dict[str, Any] = {"quick": args.quick, "threads": args.threads, "parts": {}, "total_seconds": 0.0}
    if args.only and out_json.is_file():  # keep the parts not run now from the last report
        report = json.loads(out_json.read_text())
        report["parts"] = {name: part for name, part in report["parts"].items() if name in PARTS}
    report["parts"].update(results)
    report["parts"] = {name: report["parts"][name] for name in PARTS if name in report["parts"]}
    report["total_seconds"] = sum(p["seconds"] for p in report["parts"].values())
    report["quick"] = any(p["quick"] for p in report["parts"].values())
    report["threads"] = args.threads
    report["runs"] = [*(report.get("runs", []) if args.only else []),
                      {"only": names if args.only else None, "seconds": total, "date": time.strftime("%Y-%m-%d %H:%M")}]
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    _write(report, args.out, args.update_docs)
    print(f"bench: wrote {args.out / 'report.md'} and {out_json} in {total:.0f} s", file=sys.stderr)
    return report


def _write(report: dict[str, Any], out: Path, docs: bool) -> dict[str, Any]:
    markdown = to_markdown(report)
    (out / "report.md").write_text("# mmkit benchmark report\n\n" + markdown)
    if docs:
        update_page(markdown)
        if "time_prediction" in report["parts"]:
            update_page(time_prediction.readme_table(report["parts"]["time_prediction"]), README, README_BEGIN, README_END)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
