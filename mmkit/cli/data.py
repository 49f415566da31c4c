"""`mmkit data prepare SOURCE` and `mmkit data info DATA`: real datasets into tensor files, and
what any dataset holds. Thin wrappers over `mmkit.data.formats` and `mmkit.data.datasets`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from mmkit.cli.common import console, err_console, human_bytes, one_line_errors, print_json
from mmkit.errors import MmkitError

T = TypeVar("T")

data_app = typer.Typer(
    name="data",
    help="Prepare real datasets (RAVDESS, CREMA-D, CIFAR-10, Fashion-MNIST) and inspect any dataset.",
    no_args_is_help=True,
)

FORMAT_HELP = "ravdess, crema-d, cifar10 or fashion-mnist (default: detected from the files)."


def _track(items: Sequence[T], description: str) -> Iterator[T]:
    """A rich progress bar on stderr while iterating; nothing when stderr is not a terminal."""
    from rich import progress as bars

    columns = (bars.TextColumn("{task.description}"), bars.BarColumn(), bars.MofNCompleteColumn(),
               bars.TimeElapsedColumn(), bars.TextColumn("ETA"), bars.TimeRemainingColumn())
    with bars.Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        yield from progress.track(items, description=description)


def _split_list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


@data_app.command("prepare")
@one_line_errors
def prepare_cli(
    source: Annotated[Path, typer.Argument(help="The dataset's folder, as its official archive extracts.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Tensor file to write (.safetensors).")],
    fmt: Annotated[str | None, typer.Option("--format", "-f", help=FORMAT_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    channel: Annotated[str | None, typer.Option("--channel", help="RAVDESS vocal channel: speech (default), song or both.")] = None,
    modalities: Annotated[str | None, typer.Option("--modalities", help="RAVDESS/CREMA-D: audio, video or audio,video (default: those with files).")] = None,
    val_actors: Annotated[str | None, typer.Option("--val-actors", help="RAVDESS/CREMA-D validation actors, e.g. 17-20 (default: RAVDESS 17-20, CREMA-D 1073-1081).")] = None,
    test_actors: Annotated[str | None, typer.Option("--test-actors", help="RAVDESS/CREMA-D test actors, e.g. 21-24 (default: RAVDESS 21-24, CREMA-D 1082-1091).")] = None,
    sample_rate: Annotated[int | None, typer.Option("--sample-rate", help="Audio: resample to this rate in Hz (default 16000).")] = None,
    n_mels: Annotated[int | None, typer.Option("--n-mels", help="Audio: mel bands (default 80).")] = None,
    window_ms: Annotated[float | None, typer.Option("--window-ms", help="Audio: STFT window in ms (default 25).")] = None,
    hop_ms: Annotated[float | None, typer.Option("--hop-ms", help="Audio: STFT hop in ms (default 10).")] = None,
    audio_seconds: Annotated[float | None, typer.Option("--audio-seconds", help="Audio: fixed clip length, centre crop or zero pad (default 3.0).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", help="Video: frames per clip, spread uniformly (default 16).")] = None,
    frame_size: Annotated[int | None, typer.Option("--frame-size", help="Video: output height and width in pixels (default 64).")] = None,
    crop_scale: Annotated[float | None, typer.Option("--crop-scale", help="Video: side of the centre (face) crop as a fraction of the shorter side (default 1.0).")] = None,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="CIFAR-10/Fashion-MNIST: stratified share of train set aside for validation (default 0.1).")] = None,
    split_seed: Annotated[int | None, typer.Option("--split-seed", help="CIFAR-10/Fashion-MNIST: seed of that validation draw (default 0).")] = None,
) -> None:
    """Decode a real dataset once into a tensor file (with split, group and classes) for --data."""
    from mmkit.atomic import atomic_path
    from mmkit.data.formats import PrepareOptions, prepare_source
    from mmkit.data.formats.emotion import parse_actors
    from mmkit.data.tensorfile import save_tensor_file

    if out.exists() and not force:
        raise MmkitError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise MmkitError(f"--out {out} is a folder; give a file name such as ravdess.safetensors")
    options = PrepareOptions(
        channel=channel, modalities=_split_list(modalities),
        val_actors=None if val_actors is None else parse_actors(val_actors, "--val-actors"),
        test_actors=None if test_actors is None else parse_actors(test_actors, "--test-actors"),
        sample_rate=sample_rate, n_mels=n_mels, window_ms=window_ms, hop_ms=hop_ms, audio_seconds=audio_seconds,
        frames=frames, frame_size=frame_size, crop_scale=crop_scale, val_fraction=val_fraction, split_seed=split_seed,
    )
    shown: list[str] = []

    def announce(note: str) -> None:
        shown.append(note)
        console.print(note, soft_wrap=True)

    dataset = prepare_source(source, fmt, options, track=_track, announce=announce, name=str(source))
    for note in dataset.notes:
        if note not in shown:
            announce(note)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as partial:  # renamed into place only when complete
        save_tensor_file(partial, dataset.inputs, dataset.labels, dataset.classes, dataset.split, dataset.groups,
                         notes=dataset.notes)
    counts = "/".join(str(len(dataset.indices(s))) for s in ("train", "val", "test"))
    shapes = ", ".join(f"{k} {list(v)}" for k, v in dataset.input_shapes().items())
    console.print(f"wrote {out} ({human_bytes(out.stat().st_size)}): {len(dataset)} samples, {counts} "
                  f"train/val/test, {dataset.num_classes} classes, {shapes}", soft_wrap=True)
    console.print(f"inspect it with `mmkit data info {out}`; train on it with `--data {out}`", soft_wrap=True)


@data_app.command("info")
@one_line_errors
def info_cli(
    data: Annotated[str, typer.Argument(help="A built-in name, a tensor file, or a CIFAR-10 / Fashion-MNIST folder.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Classes, counts per split and class, input shapes, per-group counts and how the data was made."""
    from mmkit.data.catalog import BUILTIN_DATASETS
    from mmkit.data.datasets import load_dataset, summarize

    summary = summarize(load_dataset(data))
    if data in BUILTIN_DATASETS:
        summary["notes"] = [f"built-in procedural dataset {data}: generated from the seed (0 here), no download",
                            *summary["notes"]]
    if json_output:
        print_json(summary)
        return
    _render_info(summary)


def _render_info(summary: dict[str, Any]) -> None:
    splits = list(summary["splits"])
    console.print(f"[bold]{summary['name']}[/]: {summary['n']} samples, {len(summary['classes'])} classes, "
                  f"{human_bytes(summary['bytes'])} in memory", soft_wrap=True)
    for note in summary["notes"]:
        console.print(f"  {note}", soft_wrap=True, markup=False)

    inputs = Table(title="inputs (per sample)")
    for column in ("input", "shape", "dtype"):
        inputs.add_column(column)
    for key, spec in summary["inputs"].items():
        inputs.add_row(key, str(spec["shape"]), spec["dtype"])
    console.print(inputs)

    counts = Table(title="samples per split and class")
    counts.add_column("class")
    for split in [*splits, "total"]:
        counts.add_column(split, justify="right")
    for name in summary["classes"]:
        row = [summary["counts"][split][name] for split in splits]
        counts.add_row(name, *map(str, row), str(sum(row)))
    totals = [summary["splits"][split] for split in splits]
    counts.add_row("[bold]total[/]", *map(str, totals), str(sum(totals)))
    console.print(counts)

    if summary["groups"] is not None:
        groups = Table(title="samples per group (e.g. actor) and split")
        groups.add_column("group")
        for split in splits:
            groups.add_column(split, justify="right")
        for group, per_split in summary["groups"].items():
            groups.add_row(group, *(str(per_split[split]) for split in splits))
        console.print(groups)
        shared = summary["groups_in_several_splits"]
        console.print(f"groups in more than one split: {', '.join(shared) if shared else 'none'}")
