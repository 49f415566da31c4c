"""The documentation cannot drift: every `mmkit …` line in a fenced block of README.md or of a page in
docs/ is parsed by the real command line, and the fast ones (count, memory-plan, compare --epochs 0,
data info of a built-in set, version, help, and the lines the docs show failing) are run, with the
exit code the page shows (2 where it shows `mmkit: error:`). The README's tour runs verbatim.

A model file a page shows in full (a fenced block whose first line is `# NAME.py`) is written
beside the commands it runs with. Synopsis lines (MODEL, [--size S], a|b) are skipped; commands that need files the docs assume the
user has (a RAVDESS folder) or that train for minutes are parsed only. A command that appears on
several pages runs once (the first time; the others are parsed). The README stays short, its links
and the pages' links lead somewhere, and no page points outside the repository.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmkit.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 300
FAST = {"count", "memory-plan", "--version", "--help"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_|]*$")  # MODEL, RUN, A, B, FILE, G
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def documented_commands(page: Path) -> list[tuple[list[str], bool, int]]:
    """(argv after `mmkit`, whether the page shows it failing, line number) for each command."""
    commands = []
    text = page.read_text(encoding="utf-8")
    for block in FENCE.finditer(text):
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


COMMANDS = [(page, argv, fails, line) for page in PAGES for argv, fails, line in documented_commands(page)]


def first_occurrences() -> set[tuple[str, int]]:
    seen: set[tuple[str, ...]] = set()
    first = set()
    for page, argv, _, line in COMMANDS:
        if tuple(argv) not in seen:
            seen.add(tuple(argv))
            first.add((rel(page), line))
    return first


FIRST = first_occurrences()


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


def documented_files(page: Path) -> dict[str, str]:
    """The files a page shows in full: fenced blocks whose first line is `# NAME.py`."""
    files = {}
    for block in FENCE.finditer(page.read_text(encoding="utf-8")):
        first, _, rest = block.group(1).partition("\n")
        match = re.fullmatch(r"# ([\w.-]+\.py)", first.strip())
        if match:
            files[match.group(1)] = rest
    return files


def is_fast(argv: list[str]) -> bool:
    if "--target-batch" in argv:  # a search simulates every configuration: tests/test_search.py runs it
        return False
    if "fsdp" in argv:  # a sharded plan of a large model takes many seconds: tests/test_fsdp.py runs one
        return False
    if argv[0] == "compare":  # the static block alone takes seconds; training takes minutes
        return "--epochs" in argv and argv[argv.index("--epochs") + 1] == "0"
    if argv[:2] == ["data", "info"]:  # a built-in set is generated in a second or two
        return len(argv) > 2 and argv[2].startswith("synthetic-")
    return argv[0] in FAST


def test_the_docs_document_every_command() -> None:
    names = {argv[0] for _, argv, _, _ in COMMANDS}
    assert {"count", "memory-plan", "train", "resume", "eval", "compare", "data"} <= names, names
    assert sum(is_fast(argv) for _, argv, _, _ in COMMANDS) >= 3
    assert DOCS, "docs/ has no pages"


def tour_steps() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    tour = text[text.index("## A five-minute tour"):].split("\n## ")[0]
    return [shlex.split(line)[2:] for line in tour.splitlines() if line.startswith("$ mmkit ")]


def test_the_tour_shows_the_six_commands() -> None:
    assert [s[0] for s in tour_steps()] == ["count", "memory-plan", "train", "resume", "eval", "compare"]


def test_the_tour_runs_verbatim(tmp_path: Path, monkeypatch) -> None:
    """The tour's train, resume and eval, in order, in one folder (count, memory-plan and compare
    --epochs 0 run as fast commands below)."""
    steps = [s for s in tour_steps() if s[0] in {"train", "resume", "eval"}]
    monkeypatch.chdir(tmp_path)
    for argv in steps:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"mmkit {shlex.join(argv)}\n{result.output}"
    run = tmp_path / steps[0][steps[0].index("--out") + 1]
    assert (run / "metrics.json").exists()


@pytest.mark.parametrize(("page", "argv", "fails", "line"), COMMANDS,
                         ids=[f"{rel(c[0])}:{c[3]}" for c in COMMANDS])
def test_documented_command(page: Path, argv: list[str], fails: bool, line: int, tmp_path: Path,
                            monkeypatch) -> None:
    where = f"{rel(page)} line {line}"
    if fails:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, f"{where}: {result.output}"
        assert result.stderr.startswith("mmkit: error:")
        return
    parse_only(argv)
    if is_fast(argv) and (rel(page), line) in FIRST:
        monkeypatch.chdir(tmp_path)  # runs/… and other outputs land in a scratch folder
        for name, code in documented_files(page).items():  # the model files the page shows
            (tmp_path / name).write_text(code, encoding="utf-8")
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"{where}: mmkit {shlex.join(argv)}\n{result.output}"


def test_the_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        base, n = slug(heading), 0
        while (candidate := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_relative_links_lead_to_files_and_headings_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif not file.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {rel(file)})")
    assert not broken, f"{rel(page)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    assert not [rel(p) for p in DOCS if p.resolve() not in linked]


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_no_page_points_outside_the_repository(page: Path) -> None:
    assert "../shared" not in page.read_text(encoding="utf-8")


def test_the_tests_the_guarantees_name_exist() -> None:
    """Each `tests/FILE.py::NAME` on a page names a test that exists (NAME may end in `*`)."""
    for page in PAGES:
        for file, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+\*?)`", page.read_text(encoding="utf-8")):
            source = (ROOT / file).read_text(encoding="utf-8")
            pattern = "^def " + re.escape(name.rstrip("*")) + ("" if name.endswith("*") else r"\(")
            assert re.search(pattern, source, re.MULTILINE), f"{rel(page)}: {file}::{name} not found"
