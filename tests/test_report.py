"""`mmkit report`: one self-contained page per run or runs, checked as text and in a headless
Chromium with every network request refused — no console error, nothing fetched, the charts
drawn at a sensible size, the numbers those of metrics.json."""

from __future__ import annotations

import json
import os
import re
from html import unescape
from pathlib import Path

import pytest
from browser import Chromium, find_chromium
from runhelpers import history, trained_run
from typer.testing import CliRunner

from mmkit.cli.app import app

runner = CliRunner()
TINY = ("train", "multichannel", "--preset", "quick", "--epochs", "2", "--train-fraction", "0.05")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished tiny runs (seeds 0 and 1)."""
    return (trained_run(tmp_path_factory.mktemp("first"), TINY),
            trained_run(tmp_path_factory.mktemp("second"), (*TINY, "--seed", "1")))


@pytest.fixture(scope="module")
def single(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = runner.invoke(app, ["report", str(runs[0]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def data_values(page: str, attribute: str) -> dict[str, tuple[float, str]]:
    """`data-ATTRIBUTE="KEY" data-value="V">TEXT` → {KEY: (V, TEXT)}."""
    pattern = rf'data-{attribute}="([^"]+)" data-value="([^"]+)">([^<]*)<'
    return {unescape(k): (float(v), text) for k, v, text in re.findall(pattern, page)}


def test_the_page_is_self_contained_and_holds_the_run(single: Path, runs: tuple[Path, Path]) -> None:
    page = single.read_text()
    for outside in ("http:", "https:", "<script", " src=", "url(", "<link"):
        assert outside not in page, outside  # nothing is fetched when it is viewed
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    shown = data_values(page, "metric")
    for key in ("accuracy", "uar", "war", "macro_f1"):
        assert shown[key] == (metrics[key], f"{metrics[key]:.4f}")
    recall = data_values(page, "recall")
    assert {k: v for k, (v, _) in recall.items()} == metrics["per_class_recall"]
    for name in ("step-00000008", "step-00000016"):  # every checkpoint, with its size
        size = sum(f.stat().st_size for f in (runs[0] / "checkpoints" / name).rglob("*") if f.is_file())
        assert f"<td>{name}</td>" in page and f"{size / 2**20:.2f} MiB" in page
    assert page.count('class="chart"') == 3  # loss, validation scores, learning rate
    assert re.search(r"\d+\.\d\d MiB: simulated now for the run's settings: micro-batch 32, fp32", unescape(page))
    assert "&quot;train_fraction&quot;: 0.05" in page  # the resolved config


def test_several_runs_overlay_their_curves_and_stand_side_by_side(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "both.html"
    result = runner.invoke(app, ["report", *map(str, runs), "-o", str(out), "--no-memory"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    table = page[page.index('id=test-metrics'):page.index("</table>", page.index('id=test-metrics'))]
    uar = re.search(r"<td>UAR</td>(.*?)</tr>", table).group(1)
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', uar)]
    assert values == [json.loads((r / "metrics.json").read_text())["uar"] for r in runs]
    loss_chart = page[page.index('aria-label="loss"'):]
    loss_chart = loss_chart[:loss_chart.index("</svg>")]
    assert loss_chart.count("<polyline") == 4  # train and validation loss of each run
    assert "R · train" in loss_chart and "R · validation" in loss_chart
    assert [r["epoch"] for r in history(runs[1])] == [1, 2]


def test_a_directory_that_is_not_a_run_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "is not an mmkit run: run.json is missing" in result.stderr
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------------------------------------------------------
# In a browser

CHROMIUM = find_chromium()  # read at import: the conftest clears MMKIT_* for each test
SCREENSHOT = os.environ.get("MMKIT_REPORT_SCREENSHOT")  # a PNG path: how docs/report.png is made
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium; "
                                   "or set MMKIT_TEST_CHROMIUM): the report is not checked in a browser")

GEOMETRY = """JSON.stringify([...document.querySelectorAll('svg')].map(svg => {
  const box = svg.getBoundingClientRect();
  return {kind: svg.getAttribute('class'), width: box.width, height: box.height,
          marks: svg.querySelectorAll('polyline, circle, rect').length};
}))"""
VALUES = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('[data-metric], [data-recall]')]
  .map(e => [e.dataset.metric || 'recall:' + e.dataset.recall, e.textContent])))"""


@needs_browser
def test_the_browser_sees_console_errors_and_requests(tmp_path: Path) -> None:
    """The harness itself: a page that logs an error and asks for a remote image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><script>console.error("broken")</script><img src="https://example.com/x.png">'
                   "</body></html>")
    with Chromium(CHROMIUM) as browser:
        browser.open(bad.as_uri())
        assert "broken" in browser.console_errors
        assert "https://example.com/x.png" in browser.requests


@needs_browser
def test_the_report_renders_offline_in_chromium(single: Path, runs: tuple[Path, Path]) -> None:
    with Chromium(CHROMIUM) as browser:
        browser.open(single.as_uri())
        assert browser.console_errors == []
        assert browser.requests == [single.as_uri()]  # the page alone: no image, font or script fetched
        svgs = json.loads(browser.evaluate(GEOMETRY))
        charts = [s for s in svgs if s["kind"] == "chart"]
        assert len(charts) == 3
        for chart in charts:
            assert chart["width"] >= 300 and chart["height"] >= 200 and chart["marks"] >= 3
        (confusion,) = [s for s in svgs if s["kind"] == "confusion"]
        metrics = json.loads((runs[0] / "metrics.json").read_text())
        classes = len(metrics["classes"])
        assert confusion["width"] >= 20 * classes and confusion["height"] >= 20 * classes
        assert confusion["marks"] == classes * classes
        shown = json.loads(browser.evaluate(VALUES))
        for key in ("accuracy", "uar", "war", "macro_f1"):
            assert float(shown[key]) == pytest.approx(metrics[key], abs=5e-5)
        assert int(shown["n"]) == metrics["n"]
        for name, recall in metrics["per_class_recall"].items():
            assert float(shown[f"recall:{name}"]) == pytest.approx(recall, abs=5e-5)
        if SCREENSHOT:
            browser.screenshot(Path(SCREENSHOT),
                               full_height=browser.evaluate("document.body.scrollHeight"))
