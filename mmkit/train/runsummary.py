"""Everything `mmkit report` shows about one run, read from its directory: the resolved config, the
history, the test metrics, the checkpoints with their sizes, and the memory plan of its training
step — the one `auto` fitted (run.json's `fit`), else simulated now for the run's settings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkit.errors import MmkitError
from mmkit.train.checkpoint import list_checkpoints, step_of
from mmkit.train.config import RunConfig
from mmkit.train.rundir import METRICS_FILE, read_history
from mmkit.train.state import pointer_target


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int
    bytes: int  # every file of the step directory
    best: bool
    last: bool


@dataclass(frozen=True)
class MemoryBreakdown:
    parts: tuple[tuple[str, int], ...]  # category → bytes at the step's peak, then overhead lines
    budget: int | None  # the GPU budget `auto` fitted to, if it did
    source: str  # where the numbers come from, in words


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    config: RunConfig
    history: list[dict[str, Any]]
    metrics: dict[str, Any] | None  # metrics.json: None until the run has finished
    checkpoints: tuple[CheckpointInfo, ...]
    memory: MemoryBreakdown | None
    memory_note: str | None = None  # why there is no memory plan

    @property
    def name(self) -> str:
        return self.run_dir.name


def summarize_run(run_dir: Path, *, simulate_memory: bool = True) -> RunSummary:
    """Read the run in `run_dir` (refused in one line when it is not a run)."""
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir, allow_changed_model=True)
    metrics_path = run_dir / METRICS_FILE
    metrics = None
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MmkitError(f"{metrics_path}: invalid JSON: {exc}") from None
    memory, note = _memory(config, simulate_memory)
    return RunSummary(run_dir, config, read_history(run_dir), metrics, _checkpoints(run_dir), memory, note)


def _checkpoints(run_dir: Path) -> tuple[CheckpointInfo, ...]:
    best, last = pointer_target(run_dir, "best"), pointer_target(run_dir, "last")
    found = []
    for path in list_checkpoints(run_dir):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append(CheckpointInfo(path.name, step_of(path), size, path.name == best, path.name == last))
    return tuple(found)


def _memory(config: RunConfig, simulate: bool) -> tuple[MemoryBreakdown | None, str | None]:
    from mmkit.plan.tracker import CATEGORIES

    fit = config.fit or {}
    train = fit.get("train")
    if isinstance(train, dict):
        parts = [(c, int(train.get(c, 0))) for c in CATEGORIES]
        parts += [(f"overhead: {k}", int(v)) for k, v in (fit.get("overhead") or {}).items()]
        return MemoryBreakdown(tuple(parts), fit.get("budget_bytes"),
                               f"the plan `auto` fitted to {fit.get('gpu')} when the run was made "
                               f"(batch {fit.get('batch_size')}, {fit.get('precision')})"), None
    if not simulate:
        return None, "not simulated (--no-memory)"
    from mmkit.plan.memory import StepSettings, simulate_training_step

    recipe = config.training
    micro_batch = math.ceil(int(recipe.batch_size) / recipe.grad_accum)
    step = StepSettings(batch_size=micro_batch, precision=config.precision, optimizer=recipe.optimizer,
                        gpu_target=config.device.startswith("cuda"), grad_clip=recipe.grad_clip,
                        contrastive_weight=recipe.contrastive_weight)
    try:
        memory = simulate_training_step(config.entry, config.model_config_object(), step)
    except (MmkitError, RuntimeError, NotImplementedError) as exc:
        return None, f"could not be simulated: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    parts = tuple((c, int(getattr(memory, c))) for c in CATEGORIES)
    return MemoryBreakdown(parts, None, f"simulated now for the run's settings: micro-batch {micro_batch}, "
                                        f"{config.precision}, {recipe.optimizer}, on {config.device} "
                                        f"(live tensors at the peak of one training step, phase "
                                        f"{memory.peak_phase})"), None

