"""The `mmkit` Typer app. Each command lives in its own module and registers here."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
import typer.core
from typer.core import TyperGroup

from mmkit import __version__
from mmkit.cli import calibrate, common, compare, count, data, eval, memory_plan, report, train

# Typer >= 0.20 vendors click as typer._click; older releases use click itself.
click: Any = getattr(typer.core, "_click", None) or __import__("click")


class OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, a missing argument) as one line on stderr, exit code 2,
    like every other mistake a user can make (one line, exit 2)."""

    def main(self, args: Any = None, *rest: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        args = _switch_values(list(sys.argv[1:] if args is None else args))
        return self._main(args, *rest, standalone_mode=standalone_mode, **kwargs)

    def _main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # `mmkit` alone: the help, not an error
            print(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"mmkit: error: {exc.format_message()}{hint}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("mmkit: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


SWITCH_VALUES = {"--grad-checkpointing": {"on": ["--grad-checkpointing"], "off": ["--no-grad-checkpointing"], "auto": []}}


def _switch_values(args: list[str]) -> list[str]:
    """`--grad-checkpointing auto|on|off` as the on/off switch takes it: auto (searched with
    --target-batch, else the preset's) is the switch left out."""
    out: list[str] = []
    i = 0
    while i < len(args):
        values = SWITCH_VALUES.get(args[i])
        if values is not None and i + 1 < len(args) and args[i + 1] in values:
            out += values[args[i + 1]]
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


app = typer.Typer(
    cls=OneLineErrors,
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
app.command(name="calibrate")(calibrate.calibrate_cli)
app.command(name="report")(report.report_cli)
app.add_typer(data.data_app, name="data")


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
    common.FREEZE_IMPORTS = True  # this process is the command (see common.import_for_command)
    try:
        app()
    except Exception as exc:
        from mmkit.settings import MmkitSettings

        if MmkitSettings().debug:
            raise
        from mmkit.cli.launch import worker_rank
        from mmkit.train.workers import in_worker

        rank = f"[rank {worker_rank()}] " if in_worker() else ""  # which process of a torchrun run
        print(
            f"mmkit: internal error: {rank}{type(exc).__name__}: {exc} (set MMKIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
