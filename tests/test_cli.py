"""The command line as a user meets it: help, version, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from mmkit import __version__
from mmkit.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_count() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "count" in result.stdout


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mmkit {__version__}"


def test_count_json_is_one_document_on_stdout() -> None:
    result = invoke("count", "multichannel", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["total_params"] == 2_365_962
    assert doc["macs_per_sample"] == 2_364_416
    assert doc["flops_per_sample"] == 4_728_832


def test_count_separate_json_components() -> None:
    doc = json.loads(invoke("count", "separate", "--json").stdout)
    assert doc["total_params"] == 2_365_972
    assert [c["params"] for c in doc["components"]] == [1_707_274, 658_698]


def test_count_table_labels_macs_and_flops() -> None:
    result = invoke("count", "multichannel", "--batch-size", "32")
    assert result.exit_code == 0
    assert "MACs, forward" in result.stdout
    assert "75,661,312" in result.stdout  # the seed's "~75.7M FLOPs", shown as what it is
    assert "2,365,962" in result.stdout


def test_piped_output_keeps_each_message_on_one_line() -> None:
    """Into a pipe, with no COLUMNS set, nothing is wrapped at 80 columns: grep finds whole phrases."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # (pytest-xdist's workers set it)
    result = subprocess.run([sys.executable, "-m", "mmkit", "count", "multichannel"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    note = next(line for line in lines if line.startswith("Parameters counted on the meta device"))
    assert len(note) > 80 and note.rstrip().endswith("is often MACs.")
    assert "multichannel · size default — compute (exact, see note)" in lines  # a table title, whole
    assert max(len(line) for line in lines if line.startswith("┏")) < 120  # tables as wide as their cells


def test_count_set_with_and_without_model_prefix() -> None:
    a = json.loads(invoke("count", "multichannel", "--set", "model.width=256", "--json").stdout)
    b = json.loads(invoke("count", "multichannel", "--set", "width=256", "--json").stdout)
    assert a["total_params"] == b["total_params"] < 2_365_962


def test_python_dash_m_and_console_script_work() -> None:
    out = subprocess.run([sys.executable, "-m", "mmkit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "count" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mmkit", "count", "nosuch"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_only_the_mmkit_process_freezes_what_a_command_imports(monkeypatch) -> None:
    import gc

    from mmkit.cli import common

    assert gc.get_freeze_count() == 0
    result = invoke("count", "multichannel", "--json")  # in a caller's process (tests, a notebook)
    assert result.exit_code == 0 and gc.get_freeze_count() == 0
    monkeypatch.setattr(common, "FREEZE_IMPORTS", True)  # as mmkit.cli.app.main sets it
    try:
        common.import_for_command("json")
        assert gc.get_freeze_count() > 0 and gc.isenabled()
    finally:
        gc.unfreeze()
