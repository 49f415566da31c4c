"""The README's commands cannot drift: every `mmkit …` line in a fenced block is parsed by the real
command line, and the fast ones (count, memory-plan, data info, version, errors, the quick start)
are run, with the exit code the README shows (2 where it shows `mmkit: error:`).

Synopsis lines (MODEL, [--size S], a|b) are skipped; commands that need files the README assumes
the user has (a RAVDESS folder) or that train for minutes are parsed only.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmkit.cli.app import app

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = {"count", "memory-plan", "--version", "--help"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_|]*$")  # MODEL, RUN, A, B, FILE, G


def documented_commands() -> list[tuple[list[str], bool, int]]:
    """(argv after `mmkit`, whether the README shows it failing, line number) for each command."""
    commands = []
    text = README.read_text(encoding="utf-8")
    for block in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        lines = block.group(1).splitlines()
        start = text.count("\n", 0, block.start()) + 2
        for offset, raw in enumerate(lines):
            line = raw.strip().removeprefix("$ ")
            for part in line.split(" && "):
                part = part.split("  #")[0].split(" # ")[0].strip()
                if not part.startswith("mmkit "):
                    continue
                argv = shlex.split(part)[1:]
                if any("[" in a or "..." in a or "…" in a or PLACEHOLDER.match(a) for a in argv):
                    continue  # a synopsis, not a command
                following = lines[offset + 1] if offset + 1 < len(lines) else ""
                commands.append((argv, following.startswith("mmkit: error:"), start + offset))
    return commands


COMMANDS = documented_commands()


def parse_only(argv: list[str]) -> None:
    """Resolve the subcommand and parse every option with click, without running anything."""
    command = typer.main.get_command(app)
    ctx = command.make_context("mmkit", list(argv))
    while isinstance(command, typer.core.TyperGroup):  # a group: descend into the subcommand
        protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
        name, sub, rest = command.resolve_command(ctx, [*protected, *ctx.args])
        assert sub is not None, f"unknown command {name!r}"
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


def is_fast(argv: list[str]) -> bool:
    return argv[0] in FAST


def test_the_readme_documents_commands() -> None:
    names = {argv[0] for argv, _, _ in COMMANDS}
    assert {"count", "memory-plan", "train", "eval", "compare", "data"} <= names, names
    assert sum(is_fast(argv) for argv, _, _ in COMMANDS) >= 3


def test_the_quick_start_runs_verbatim(tmp_path: Path, monkeypatch) -> None:
    """The quick start's `mmkit` steps, in order, in one folder (the pip steps are CI's install)."""
    text = README.read_text(encoding="utf-8")
    quick_start = text[text.index("## Quick start"):].split("\n## ")[0]
    line = next(ln for ln in quick_start.splitlines() if "pip install . &&" in ln)
    steps = [shlex.split(part)[1:] for part in line.split(" && ") if part.strip().startswith("mmkit ")]
    assert [s[0] for s in steps] == ["train", "eval"], steps
    monkeypatch.chdir(tmp_path)
    for argv in steps:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"mmkit {shlex.join(argv)}\n{result.output}"
    assert (tmp_path / "runs" / "first" / "metrics.json").exists()


@pytest.mark.parametrize(("argv", "fails", "line"), COMMANDS, ids=[f"L{c[2]}" for c in COMMANDS])
def test_readme_command(argv: list[str], fails: bool, line: int, tmp_path: Path, monkeypatch) -> None:
    if fails:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, f"README line {line}: {result.output}"
        assert result.stderr.startswith("mmkit: error:")
        return
    parse_only(argv)
    if is_fast(argv):
        monkeypatch.chdir(tmp_path)  # runs/… and other outputs land in a scratch folder
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"README line {line}: mmkit {shlex.join(argv)}\n{result.output}"
