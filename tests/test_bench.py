"""The benchmark suite's plumbing: a run writes its report with the expected keys, and the figures in
docs/performance.md are rewritten between its markers. No timing is asserted here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import __main__ as runner  # noqa: E402
from bench import latency  # noqa: E402


def test_a_quick_latency_run_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cheap = [sys.executable, "-c", "pass"]  # the plumbing, not the commands' own time
    monkeypatch.setattr(latency, "COMMANDS", {name: cheap for name in latency.COMMANDS})
    runner.main(["--quick", "--only", "latency", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    part = report["parts"]["latency"]
    assert {r["command"] for r in part["rows"]} == set(latency.COMMANDS)
    for row in part["rows"]:
        assert row["seconds"]["median"] > 0 and row["peak_rss_bytes"] > 0
    assert [g["goal"] for g in part["goals"]] == [
        "`mmkit --version` beyond `python -c pass`", "`mmkit count --help` beyond `python -c pass`",
        "`count lfm2 --size original` beyond `import torch`", "`count lfm2 --size original` peak RSS",
        "`memory-plan --gpu rtx3050` (auto size and batch), cold simulation cache",
        "`memory-plan --gpu rtx3050`, warm simulation cache, beyond `import torch`",
    ]
    assert {"cpu", "cores", "torch", "date"} <= set(part["machine"])
    markdown = (tmp_path / "report.md").read_text()
    assert "| goal | target | measured | status |" in markdown and "### Latency of the planning commands" in markdown


def test_update_page_replaces_only_the_marked_section(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(f"intro\n{runner.BEGIN}\nold figures\n{runner.END}\noutro\n")
    runner.update_page("new figures\n", page)
    assert page.read_text() == f"intro\n{runner.BEGIN}\nnew figures\n{runner.END}\noutro\n"


def test_without_cuda_the_gpu_rows_say_why() -> None:
    from bench import gpu

    if gpu.torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the rows are measured")
    part = gpu.run(quick=True)
    assert part["measured"] is False and "CUDA" in part["reason"]
    assert {g["status"] for g in part["goals"]} == {"not measured"}
    assert gpu.to_markdown(part).startswith("Not measured: no CUDA device")


def test_the_performance_page_has_the_markers() -> None:
    assert runner.PERFORMANCE_PAGE == ROOT / "docs" / "performance.md"
    text = runner.PERFORMANCE_PAGE.read_text()
    assert text.count(runner.BEGIN) == 1 and text.count(runner.END) == 1



def test_the_readmes_time_prediction_table_is_the_benchs(tmp_path: Path) -> None:
    from bench import time_prediction

    text = runner.README.read_text()
    assert text.count(runner.README_BEGIN) == 1 and text.count(runner.README_END) == 1
    rows = [{"model": m, "size": "default", "batch_size": b, "precision": p, "error": e, "old_error": o}
            for m, errors in (("a", (0.1, -0.2, 0.3, 0.05)), ("b", (0.0, 0.15, -0.4, 0.2)))
            for (b, p), e, o in zip([(b, p) for p in ("fp32", "bf16") for b in (4, 16)], errors,
                                    (0.5, -0.6, 0.7, -0.9), strict=True)]
    machine = {"cpu": "CPU", "cores": 2, "torch_threads": 2, "torch": "2", "python": "3", "system": "L", "date": "d"}
    table = time_prediction.readme_table({"rows": rows, "machine": machine})
    assert "| a:default | +10% (+50%) | -20% (-60%) | +30% (+70%) | +5% (-90%) |" in table
    assert "Median \\|error\\| 18%, worst 40% (former estimate: 65%, 90%)" in table
    page = tmp_path / "README.md"
    page.write_text(f"intro\n{runner.README_BEGIN}\nold\n{runner.README_END}\n")
    runner.update_page(table, page, runner.README_BEGIN, runner.README_END)
    assert table in page.read_text()
