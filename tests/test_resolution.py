"""One resolution path: what `memory-plan` reports is what `train` runs, for every model."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.errors import MmkitError
from mmkit.models.registry import list_models
from mmkit.train.resolve import RunOptions, resolve_run

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "mmkit"
SLOW_FITS = {"lfm2", "clip", "fusion"}  # their auto fits simulate large models: seconds each


def cases() -> list[object]:
    out = []
    for model in list_models():
        for gpu in ("cpu", "rtx3050"):
            for preset in ("half-data", "quick"):
                marks = [pytest.mark.slow] if preset == "half-data" and model in SLOW_FITS else []
                out.append(pytest.param(model, gpu, preset, marks=marks, id=f"{model}-{gpu}-{preset}"))
    return out


@pytest.mark.parametrize(("model", "gpu", "preset"), cases())
def test_memory_plan_reports_what_train_resolves(model: str, gpu: str, preset: str) -> None:
    result = runner.invoke(app, ["memory-plan", model, "--gpu", gpu, "--preset", preset, "--json"])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    resolved = resolve_run(RunOptions(model=model, gpu=gpu, preset=preset))  # what `mmkit train` calls
    config = resolved.run_config()
    assert (planned["size"], planned["batch_size"], planned["precision"], planned["grad_accum"]) == (
        config.size, config.training.batch_size, config.precision, config.training.grad_accum)
    if config.fit is not None:  # an auto size or batch was fitted at the precision the run uses
        assert config.fit["precision"] == config.precision
        assert (config.fit["size"], config.fit["batch_size"]) == (config.size, config.training.batch_size)


def test_the_old_mismatch_is_gone() -> None:
    # fitted at fp32 and run at bf16 before: now both at the precision the run uses (pinned ×2.0 here)
    config = resolve_run(RunOptions(model="multichannel", preset="half-data", gpu="cpu", device="cpu")).run_config()
    assert config.precision == "bf16" and config.fit is not None and config.fit["precision"] == "bf16"


def test_a_setting_given_twice_is_refused_in_one_place() -> None:
    message = "batch_size is given twice, as --batch-size and as --set batch_size=...; keep one"
    with pytest.raises(MmkitError, match="given twice"):
        resolve_run(RunOptions(model="multichannel", batch_size=8, set_items=(("batch_size", 16),)))
    for command in (["train", "multichannel"], ["memory-plan", "multichannel"], ["compare", "multichannel", "separate"]):
        result = runner.invoke(app, [*command, "--batch-size", "8", "--set", "batch_size=16"])
        assert result.exit_code == 2 and message in result.stderr, (command, result.output)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every mmkit module `path` imports, at the top or inside a function (TYPE_CHECKING left out):
    `import m`, `from m import x`, relative imports, and `importlib.import_module("m")`."""
    tree = ast.parse(path.read_text())
    checking = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
                and getattr(stmt.test, "id", getattr(stmt.test, "attr", None)) == "TYPE_CHECKING"
                for node in ast.walk(stmt)}
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            submodules = {f"{module}.{alias.name}" for alias in node.names} & modules
            names.update(submodules)  # `from package import module` imports that module
            if len(submodules) < len(node.names):
                names.add(module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return {name for name in names if name.startswith("mmkit")}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_no_two_modules_of_mmkit_import_each_other() -> None:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path, set(modules)) if m in modules and m != name} for name, path in modules.items()}
    assert "mmkit.models.clip" in graph["mmkit.models.registry"]  # imports inside functions are seen
    reaches = {name: _reachable(graph, name) for name in graph}
    circles = sorted((a, b) for a in graph for b in reaches[a] if a < b and a in reaches[b])
    assert circles == []


def test_the_catalog_knows_the_shapes_the_generators_make() -> None:
    from mmkit.data.catalog import BUILTIN_DATASETS
    from mmkit.data.datasets import load_dataset

    for name, info in BUILTIN_DATASETS.items():
        dataset = load_dataset(name)
        assert dataset.input_shapes() == dict(info.inputs), name
        assert dataset.classes == info.classes, name
