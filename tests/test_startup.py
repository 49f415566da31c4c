"""The command line answers help, version, completion and usage mistakes without loading torch
(nor NumPy, safetensors, transformers, the model families or the data modules): a fresh process
each, as a user's shell starts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmkit import __version__
from mmkit.errors import MmkitError
from mmkit.models.catalog import BUILTIN_MODELS, check_model_name
from mmkit.models.registry import get_model_entry, list_models

# Runs the console entry point with argv, then writes down which heavy modules got imported.
RUNNER = """
import json, sys
report, sys.argv = sys.argv[1], ["mmkit", *sys.argv[2:]]
from mmkit.cli.app import main
code = 0
try:
    main()
except SystemExit as stop:
    code = stop.code
def heavy(name):
    if name.partition(".")[0] in ("torch", "numpy", "safetensors", "transformers", "huggingface_hub"):
        return True
    if name.startswith("mmkit.models."):
        return name != "mmkit.models.catalog"
    return name.startswith("mmkit.data.")
with open(report, "w") as f:
    json.dump(sorted(m for m in sys.modules if heavy(m)), f)
sys.exit(code)
"""

VALID = "valid: " + ", ".join(BUILTIN_MODELS) + " (or a spec: NAME, package.module:factory, path/to/file.py:factory or hf:SPEC)"
Ran = tuple[subprocess.CompletedProcess, list[str]]  # the process, and the heavy modules it imported


def mmkit(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Ran:
    """`mmkit ARGS` in a fresh interpreter: its result and the heavy modules it imported."""
    report = tmp_path / "modules.json"
    result = subprocess.run([sys.executable, "-c", RUNNER, str(report), *args], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=120)
    return result, json.loads(report.read_text())


@pytest.mark.parametrize("args", [
    ("--version",), ("--help",), ("count", "--help"), ("memory-plan", "--help"), ("train", "--help"),
    ("resume", "--help"), ("eval", "--help"), ("compare", "--help"), ("report", "--help"), ("data", "--help"),
    ("data", "prepare", "--help"),
], ids=" ".join)
def test_help_and_version_load_no_torch(tmp_path: Path, args: tuple[str, ...]) -> None:
    result, heavy = mmkit(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert heavy == []
    assert (f"mmkit {__version__}" if args == ("--version",) else "Usage:") in result.stdout


@pytest.mark.parametrize("args", [
    ("count", "multichannel", "--bogus"), ("train",), ("count", "nosuch"), ("train", "nosuch"),
    ("memory-plan", "nosuch"), ("count", "hf:vit", "--bogus"),
], ids=" ".join)
def test_usage_mistakes_are_one_line_without_torch(tmp_path: Path, args: tuple[str, ...]) -> None:
    result, heavy = mmkit(tmp_path, *args)
    assert result.returncode == 2
    assert heavy == []
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("mmkit: error: "), result.stderr
    if "nosuch" in args:
        assert line == f"mmkit: error: unknown model 'nosuch'; {VALID}"


def test_model_names_complete_without_torch(tmp_path: Path) -> None:
    result, heavy = mmkit(tmp_path, env={"_MMKIT_COMPLETE": "complete_bash", "COMP_WORDS": "mmkit count mu",
                                         "COMP_CWORD": "2"})
    assert result.stdout.split() == ["multichannel"]
    assert heavy == []


def test_a_real_command_still_loads_torch_and_works(tmp_path: Path) -> None:
    result, heavy = mmkit(tmp_path, "count", "multichannel", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_params"] == 2_365_962
    assert "torch" in heavy  # the check above sees torch when it is there


def test_python_dash_m_version_imports_no_torch() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmkit", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == f"mmkit {__version__}"
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "mmkit.cli.app" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy", "safetensors")]


def test_builtin_names_match_the_registry() -> None:
    assert list(BUILTIN_MODELS) == list_models()
    with pytest.raises(MmkitError) as early:
        check_model_name("nosuch")
    with pytest.raises(MmkitError) as registry:
        get_model_entry("nosuch")
    assert str(early.value) == str(registry.value)
    check_model_name("lfm2")  # a valid name passes
