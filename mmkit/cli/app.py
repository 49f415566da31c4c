"""The `mmkit` Typer app. Each command lives in its own module and registers here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mmkit import __version__
from mmkit.cli import compare, count, eval, memory_plan, train

app = typer.Typer(
    name="mmkit",
    help="Build, size, fit, train and honestly compare multimodal PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

app.command(name="count")(count.count_cli)
app.command(name="memory-plan")(memory_plan.memory_plan_cli)
app.command(name="train")(train.train_cli)
app.command(name="resume")(train.resume_cli)
app.command(name="eval")(eval.eval_cli)
app.command(name="compare")(compare.compare_cli)


def _print_version(value: bool) -> None:
    if value:
        print(f"mmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Build, size, fit, train and honestly compare multimodal PyTorch models."""


def main() -> None:
    """Console entry point. Internal errors show a traceback only with MMKIT_DEBUG=1."""
    try:
        app()
    except Exception as exc:
        from mmkit.settings import MmkitSettings

        if MmkitSettings().debug:
            raise
        print(
            f"mmkit: internal error: {type(exc).__name__}: {exc} (set MMKIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
