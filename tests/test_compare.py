"""`mmkit compare`: the measured side-by-side, its determinism, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.models import create_model
from mmkit.train.step import compute_loss

runner = CliRunner()


def compare_json(*args: str) -> dict:
    result = runner.invoke(app, ["compare", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    markdown = tmp_path_factory.mktemp("cmp") / "table.md"
    return compare_json("multichannel", "separate", "--markdown", markdown, "--html", markdown.with_suffix(".html")), markdown


def test_defaults_have_every_block(defaults: tuple[dict, Path]) -> None:
    doc, _ = defaults
    a, b = doc["a"], doc["b"]
    assert (a["static"]["params"], b["static"]["params"]) == (2_365_962, 2_365_972)
    assert a["static"]["macs_per_sample"] == b["static"]["macs_per_sample"] == 2_364_416
    for side in (a, b):
        assert side["static"]["train_memory"]["peak_tensors"] > 0
        step = side["speed"]["train_step_seconds"]
        assert step["p25"] <= step["median"] <= step["p75"] and step["n"] >= 10
        assert side["speed"]["measured_peak_tensors"] > 0
        runs = side["learning"]["runs"]
        assert [r["seed"] for r in runs] == [0, 1, 2]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
    ratio = doc["ratios"]["train_step_time"]
    assert ratio == pytest.approx(a["speed"]["train_step_seconds"]["median"] / b["speed"]["train_step_seconds"]["median"])
    assert "verdict" in doc and doc["verdict_metric"] == "accuracy"
    # same parameters, same Adam state: the simulated peaks agree within 1 %
    pa, pb = a["static"]["train_memory"]["peak_tensors"], b["static"]["train_memory"]["peak_tensors"]
    assert abs(pa - pb) <= 0.01 * pa
    # the real step's peak equals the simulated one on the CPU
    assert a["speed"]["measured_peak_tensors"] == pa


def test_markdown_is_the_same_table(defaults: tuple[dict, Path]) -> None:
    doc, markdown = defaults
    text = markdown.read_text()
    assert text.startswith("| | multichannel | separate | A/B |")
    assert "| parameters | 2,365,962 | 2,365,972 | 1.000 |" in text
    assert "Verdict: " in text
    accuracy = doc["a"]["learning"]["accuracy"]
    assert f"{accuracy['mean']:.4f} ± {accuracy['std']:.4f}" in text


def without_wall_times(learning: dict) -> dict:
    """The learning block less its wall-clock times, the only figures that may differ between runs."""
    runs = [{k: v for k, v in run.items() if k != "train_seconds"} for run in learning["runs"]]
    return {**{k: v for k, v in learning.items() if k != "train_seconds"}, "runs": runs}


def test_static_and_learning_numbers_repeat_exactly() -> None:
    args = ("multichannel", "separate", "--seeds", "2", "--epochs", "1", "--set", "train_fraction=0.1")
    first, second = compare_json(*args), compare_json(*args)
    for side in ("a", "b"):
        assert first[side]["static"] == second[side]["static"]
        assert without_wall_times(first[side]["learning"]) == without_wall_times(second[side]["learning"])
        assert all(run["train_seconds"] > 0 for run in first[side]["learning"]["runs"])


def test_static_only_for_two_sizes_of_one_family() -> None:
    doc = compare_json("lfm2:original", "lfm2:rtx3050", "--epochs", "0")
    assert doc["a"]["static"]["size"] == "original" and doc["b"]["static"]["size"] == "rtx3050"
    assert doc["a"]["static"]["params"] > 25 * doc["b"]["static"]["params"]
    assert "speed" not in doc["a"] and "learning" not in doc["a"]


def test_incompatible_inputs_are_one_line() -> None:
    result = runner.invoke(app, ["compare", "multichannel", "lfm2"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "cannot compare multichannel and lfm2" in line and "audio" in line


def test_independent_separate_models_train_on_their_own_losses() -> None:
    torch.manual_seed(0)
    model = create_model("separate", mode="independent", hidden=[16, 8])
    inputs, labels = model.example_inputs(4, seed=0), torch.tensor([0, 1, 2, 3])
    output = model.train()(**inputs)
    color, brightness = output.stream_logits
    expected = torch.nn.functional.cross_entropy(color, labels) + torch.nn.functional.cross_entropy(brightness, labels)
    assert torch.allclose(compute_loss(output, labels), expected)
    assert torch.equal(output.logits, color + brightness)
    assert torch.equal(model.eval()(**inputs), color + brightness)  # evaluation combines them
    assert len(model.clip_groups()) == 2


def test_independent_mode_runs_end_to_end() -> None:
    doc = compare_json("multichannel", "separate", "--separate-mode", "independent", "--seeds", "1", "--epochs", "1")
    assert doc["settings"]["separate_mode"] == "independent"
    assert "one seed only" in doc["verdict"]


@pytest.mark.parametrize(("args", "message"), [
    (("clip@", "fusion"), "expected MODEL, MODEL:SIZE or MODEL[:SIZE]@PRESET"),
    (("clip@continual@fast", "fusion"), "expected MODEL, MODEL:SIZE or MODEL[:SIZE]@PRESET"),
    (("clip@no-such-preset", "fusion", "--epochs", "0"), "no-such-preset"),
    (("multichannel", "separate", "--set", "model.hidden=[8]"), "compare --set takes training settings only"),
    (("multichannel", "separate", "--batch-size", "8", "--set", "batch_size=16"), "batch_size is given twice, as --batch-size and as --set"),
])
def test_bad_specs_and_settings_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = runner.invoke(app, ["compare", *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_html_holds_the_table_and_the_verdict_in_one_self_contained_page(defaults: tuple[dict, Path]) -> None:
    import re
    from html import unescape

    doc, markdown = defaults
    page = markdown.with_suffix(".html").read_text()
    rows = [line.split(" | ") for line in markdown.read_text().splitlines()[2:] if line.startswith("| ") and "**" not in line]
    cells = [[unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", "<td>" + row)]
             for row in re.findall(r"<tr><td>(.*?)</tr>", page)]
    assert [c[:3] for c in cells] == [[r[0][2:], r[1], r[2]] for r in rows]  # every row of the table, in order
    assert f"<b>verdict:</b> {doc['verdict']}" in unescape(page)
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_each_side_may_bring_its_own_recipe(tmp_path: Path) -> None:
    markdown = tmp_path / "table.md"
    doc = compare_json("multichannel@quick", "separate@half-data", "--epochs", "0", "--markdown", markdown)
    assert doc["settings"]["a"] == "multichannel@quick" and doc["settings"]["presets"] == ["quick", "half-data"]
    assert doc["settings"]["same_recipe"] is False
    assert (doc["a"]["recipe"]["precision"], doc["b"]["recipe"]["precision"]) == ("fp32", "bf16")  # fp16 → bf16 on a CPU
    assert doc["settings"]["precision"] is None  # the sides differ: see each side's recipe
    # half-data's auto size and batch are resolved as `mmkit train` resolves them, and said
    batch, size = doc["b"]["recipe"]["batch_size"], doc["b"]["static"]["size"]
    assert f"separate@half-data: auto: size {size}, batch {batch}, fitted to rtx3050 (bf16)" in " ".join(doc["notes"])
    text = markdown.read_text()
    assert f"| recipe (preset, batch, precision) | quick, batch 32, fp32 | half-data, batch {batch}, bf16 |  |" in text
    assert "memory (simulated, each side's batch and precision" in text


def test_names_the_cpu_and_warns_when_the_load_exceeded_the_cores(tmp_path: Path, monkeypatch) -> None:
    samples = iter([0.5, 0.5, 99.0])  # busy only at the third sample
    monkeypatch.setattr("os.getloadavg", lambda: (next(samples, 0.5), 0.0, 0.0))
    markdown = tmp_path / "table.md"
    result = runner.invoke(app, ["compare", "multichannel:w16", "multichannel:w32", "--device", "cpu", "--seeds", "1",
                                 "--epochs", "1", "--set", "train_fraction=0.02", "--json", "--markdown", str(markdown)])
    assert result.exit_code == 0, result.output
    machine = json.loads(result.stdout)["machine"]
    capability = torch.backends.cpu.get_cpu_capability()
    assert machine["cpu_capability"] == capability and machine["cores"] >= 1
    assert machine["max_load_average"] == 99.0 and machine["overloaded"] is True
    warning = next(line for line in result.stderr.splitlines() if "load average" in line)
    assert f"reached 99.00 on {machine['cores']} cores" in warning and "times are unreliable" in warning
    text = markdown.read_text()
    assert f"speed (measured on cpu ({capability}, {machine['cores']} cores);" in text
    assert "Warning: the 1-minute load average reached 99.00" in text


def test_no_load_warning_on_a_quiet_machine(monkeypatch) -> None:
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    result = runner.invoke(app, ["compare", "multichannel:w16", "multichannel:w32", "--device", "cpu", "--seeds", "1",
                                 "--epochs", "1", "--set", "train_fraction=0.02"])
    assert result.exit_code == 0, result.output
    assert "load average" not in result.output
    assert "speed (measured on cpu (" in result.stdout
