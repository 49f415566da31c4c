"""Fitting: the largest width, then the largest batch, whose simulated total fits the budget.

`fit_to_budget` walks the family's size ladder from the largest width down. A width whose model
states alone (fp32 weights + gradients + optimizer state) cannot fit is rejected without
simulation. For the largest width that fits at the minimum batch, the batch search simulates batch
2 and the cap, extrapolates the live total after each allocation of the step (each a line in the
batch size) to the largest batch b whose step stays within the budget, then confirms b by
simulating b and b + 1, falling back to bisection when the prediction is off. Every reported
number is a simulation, never the affine guess.

The run's resolution (mmkit.train.resolve) calls `fit_to_budget` when size or batch is `auto`,
and always for `memory-plan`, so both answer from the same fit.

Data parallel (`data_parallel=N` processes, one GPU each): every number is per GPU — the batch is
the per-rank share of the global batch — and each candidate carries one more overhead line,
`ddp_gradient_buckets`: DistributedDataParallel all-reduces gradients through flat bucket
buffers (25 MiB each, the first 1 MiB) that together hold one copy of every trainable gradient,
in the parameters' dtype (fp32 master weights here), allocated when the model is wrapped and kept
for the whole run. It is an estimate from the parameter count (DDP is not simulated).
With `strategy="fsdp"` each candidate is one rank's sharded step, simulated over a fake process
group of `data_parallel` ranks (mmkit.plan.memory): the model states are that rank's shards, the
all-gather buffers are simulated, and there are no DDP buckets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mmkit.errors import MmkitError
from mmkit.models.registry import ModelConfig, ModelEntry, apply_overrides, size_config
from mmkit.plan.memory import (
    FakeTrainingRig,
    StepMemory,
    StepSettings,
    config_param_count,
    simulate_batches,
    states_lower_bound,
    with_gradient_checkpointing,
)
from mmkit.settings import GpuPreset

Prefer = Literal["width", "batch"]
# batches closer than this bracket the answer too tightly for a slope (the CUDA allocator's rounding)
NARROW_BRACKET = 8
DDP_GRADIENT_BYTES = 4  # per trainable parameter: buckets hold gradients in the fp32 parameters' dtype


@dataclass(frozen=True)
class Candidate:
    """One (size, batch) point and what it needs."""

    size: str
    width: int | None  # None: a plain factory (no size ladder)
    batch_size: int
    total: int  # peak tensors + overhead lines (or the model-states lower bound, when not simulated)
    fits: bool
    simulated: bool  # False: rejected by model states alone, `total` is a lower bound
    train: StepMemory | None = None
    overhead: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FitResult:
    entry: ModelEntry
    size: str
    config: ModelConfig
    batch_size: int
    chosen: Candidate
    budget_bytes: int
    auto_size: bool
    auto_batch: bool
    next_width: Candidate | None  # the next larger ladder width at the minimum batch
    next_batch: Candidate | None  # batch + 1 at the chosen size
    batch_cap_reached: bool
    simulations: int  # training steps evaluated, `cached` of them answered by the simulation cache
    considered: list[Candidate]
    rigs: dict[str, FakeTrainingRig] = field(default_factory=dict, repr=False)  # for reuse
    cached: int = 0


class _Evaluator:
    """Simulates (size, batch) points once each and remembers them."""

    def __init__(
        self, entry: ModelEntry, gpu: GpuPreset, budget: int, step: StepSettings, data_parallel: int = 1,
        inference: bool = False,
    ) -> None:
        self.entry, self.gpu, self.budget, self.step = entry, gpu, budget, step
        self.data_parallel = data_parallel
        self.inference = inference  # simulate the inference forward at each candidate answer, beside its step
        self.cache: dict[tuple[str, int], Candidate] = {}
        self.simulations = 0
        self._params: dict[str, int] = {}
        self.rigs: dict[str, FakeTrainingRig] = {}

    def __call__(self, size: str, config: ModelConfig, batch_size: int) -> Candidate:
        return self.many(size, config, [batch_size])[0]

    def extra_overhead(self, size: str) -> dict[str, int]:
        """Overhead lines that do not depend on the batch: DDP's gradient buckets (estimated)."""
        if self.data_parallel <= 1 or self.step.shards > 1:
            return {}
        return {"ddp_gradient_buckets": self._params[size] * DDP_GRADIENT_BYTES}

    def many(self, size: str, config: ModelConfig, batch_sizes: list[int], answer: int | None = None) -> list[Candidate]:
        """Evaluate several batch sizes of one size; uncached simulations run in parallel. `answer`:
        the batch these simulations would confirm as the fit's answer (its inference forward runs
        beside them when asked for)."""
        if size not in self._params:
            self._params[size] = config_param_count(self.entry, config)
        extra = self.extra_overhead(size)
        bound = states_lower_bound(self._params[size], self.step.optimizer) // self.step.shards
        bound_total = bound + sum(self.gpu.overhead_bytes(bound).values()) + sum(extra.values())
        todo = sorted({b for b in batch_sizes if (size, b) not in self.cache})
        if todo and bound_total > self.budget:
            for b in todo:
                self.cache[(size, b)] = Candidate(size, config.width, b, bound_total, False, False)
        elif todo:
            if size not in self.rigs:
                self.rigs[size] = FakeTrainingRig(self.entry, config, self.step)
            inference_at = answer if self.inference else None
            for b, memory in zip(todo, simulate_batches(self.rigs[size], todo, inference_at=inference_at), strict=True):
                self.simulations += 1
                overhead = self.gpu.overhead_bytes(memory.peak_tensors) | extra
                total = memory.peak_tensors + sum(overhead.values())
                self.cache[(size, b)] = Candidate(
                    size, config.width, b, total, total <= self.budget, True, memory, overhead
                )
        return [self.cache[(size, b)] for b in batch_sizes]


def _max_batch(evaluate: _Evaluator, size: str, config: ModelConfig, low: int, cap: int) -> int:
    """Largest batch in [low, cap] that fits, given that `low` fits.

    Probes come in pairs (b, b + 1) so that the two cores simulate them at once: when the affine
    prediction b is right, one round confirms that b fits and b + 1 does not.
    """
    fit_hi, fail_lo = low, None
    while True:
        for (s, b), candidate in evaluate.cache.items():  # everything known about this size
            if s != size or not low <= b <= cap:
                continue
            if candidate.fits:
                fit_hi = max(fit_hi, b)
            elif fail_lo is None or b < fail_lo:
                fail_lo = b
        upper = cap if fail_lo is None else fail_lo - 1
        if fit_hi >= upper:
            return fit_hi
        guess = _affine_guess(evaluate, size, fit_hi)
        if guess is None:  # one point only: double
            guess = 2 * fit_hi
        probe = min(max(guess, fit_hi + 1), upper)
        if (size, probe) in evaluate.cache or (probe + 1 <= upper and (size, probe + 1) in evaluate.cache):
            probe = (fit_hi + upper + 1) // 2  # the affine model was wrong once already: bisect
        evaluate.many(size, config, [probe, probe + 1] if probe < upper else [probe], answer=probe)


def _affine_guess(evaluate: _Evaluator, size: str, fit_hi: int) -> int | None:
    """Largest batch predicted to fit, from the tightest bracket of simulated batches of `size` (the
    largest that fits and the smallest that does not), or else its smallest and largest: a wide base,
    since the CUDA allocator's rounding makes nearby batches a poor slope.

    Two steps of one model at batch sizes from 2 up allocate in the same sequence, and the live
    total after each allocation is affine in the batch size (up to the allocator's rounding): the
    step's peak is the largest of these lines, so each moment is extrapolated on its own. Where the
    sequences differ (batch 1: a transpose of a dimension of size 1 needs no copy), each phase's
    peak (forward, backward, optimizer) is extrapolated instead.
    """
    points = sorted(
        (b, c.train, c.fits) for (s, b), c in evaluate.cache.items() if s == size and c.train is not None
    )
    if len(points) < 2:
        return None
    fitting = [(b, m) for b, m, fits in points if fits]
    failing = [(b, m) for b, m, fits in points if not fits]
    if fitting and failing and failing[0][0] - fitting[-1][0] > NARROW_BRACKET:
        (b1, m1), (b2, m2) = fitting[-1], failing[0]  # the tightest bracket: interpolate
    else:
        (b1, m1), (b2, m2) = (points[0][:2], points[-1][:2])
    reserve = evaluate.gpu.overhead.allocator_reserve_fraction
    fixed = sum(evaluate.gpu.overhead_bytes(0).values()) + sum(evaluate.extra_overhead(size).values())
    peak_budget = (evaluate.budget - fixed) / (1 + reserve)  # total = peak·(1 + reserve) + fixed
    if m1.highs and len(m1.highs) == len(m2.highs):  # the same step, moment by moment
        pairs = zip(m1.highs, m2.highs, strict=True)
    else:  # another sequence of allocations: phase by phase
        pairs = ((p1, m2.phase_peaks[phase]) for phase, p1 in m1.phase_peaks.items() if phase in m2.phase_peaks)
    limits = [
        b2 + math.floor((peak_budget - y2) / slope) for y1, y2 in pairs if (slope := (y2 - y1) / (b2 - b1)) > 0
    ]
    return max(min(limits), fit_hi) if limits else None


def evaluate_batch(fit: FitResult, gpu: GpuPreset, batch_size: int, margin: float | None = None) -> Candidate:
    """Another batch size at `fit`'s chosen size and settings, simulated on the rig the fit built
    (one process: no DDP buckets)."""
    for known in fit.considered:
        if known.size == fit.size and known.batch_size == batch_size:
            return known
    memory = fit.rigs[fit.size].training_step(batch_size)  # a size that fits was simulated on this rig
    overhead = gpu.overhead_bytes(memory.peak_tensors)
    total = memory.peak_tensors + sum(overhead.values())
    return Candidate(fit.size, fit.config.width, batch_size, total, total <= gpu.budget_bytes(margin), True, memory,
                     overhead)


def ladder_sizes(entry: ModelEntry, base: ModelConfig, overrides: Mapping[str, Any]) -> list[tuple[str, ModelConfig]]:
    """The ladder as (size name, config), largest first; named sizes keep their names."""
    named = {config: name for name, config in entry.sizes.items()}
    out = []
    for width in entry.ladder:
        rescaled = base.at_width(width)
        name = named.get(rescaled.model_copy(update={"gradient_checkpointing": False})
                         if "gradient_checkpointing" in type(rescaled).model_fields else rescaled, f"w{width}")
        out.append((name, apply_overrides(rescaled, overrides)))
    return out


def fit_to_budget(
    entry: ModelEntry,
    gpu: GpuPreset,
    *,
    size: str = "auto",
    batch_size: int | Literal["auto"] = "auto",
    overrides: Mapping[str, Any] | None = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    margin: float | None = None,
    min_batch_size: int = 1,
    max_batch_size: int = 256,
    prefer: Prefer = "width",
    data_parallel: int = 1,
    strategy: str = "ddp",
    fsdp_wrap: tuple[str, ...] | None = None,
    inference: bool = False,
) -> FitResult:
    """Choose size and batch (where `auto`) so that the simulated total fits `gpu`'s budget.

    With `data_parallel` > 1 the batch is per GPU (the per-rank share) and the DDP gradient
    buckets are added to every candidate (with `strategy="fsdp"`, one rank's sharded step is
    simulated instead, units `fsdp_wrap` or the model's blocks). `size` is a named size or wN of `entry`, or `auto` (the
    ladder); `overrides` (data widths, model settings) are applied to every width. With `inference`,
    the inference forward at the batch a round of simulations is to confirm runs beside them (the
    chosen size's rig then answers `inference(batch_size)` at once).
    """
    overrides = dict(overrides or {})
    if min_batch_size > max_batch_size:
        raise MmkitError(f"min_batch_size ({min_batch_size}) is above max_batch_size ({max_batch_size})")
    budget = gpu.budget_bytes(margin)
    step = StepSettings(
        batch_size=1, precision=precision, optimizer=optimizer, gpu_target=gpu.device_type == "cuda",
        shards=data_parallel if strategy == "fsdp" else 1, fsdp_wrap=fsdp_wrap,
    )
    evaluate = _Evaluator(entry, gpu, budget, step, data_parallel, inference)

    auto_size = size == "auto"
    if auto_size:
        base = with_gradient_checkpointing(entry, entry.sizes[entry.default_size], gradient_checkpointing)
        sizes = ladder_sizes(entry, base, overrides)
    else:
        name, config = size_config(entry, size)
        config = with_gradient_checkpointing(entry, apply_overrides(config, overrides), gradient_checkpointing)
        sizes = [(name, config)]
    auto_batch = batch_size == "auto"
    low = min_batch_size if auto_batch else int(batch_size)
    cap = max_batch_size if auto_batch else int(batch_size)

    # batch 1 is no point of the line the other batches lie on (a transpose of a dimension of size 1
    # needs no copy, so its step allocates in another sequence): the search starts from 2, and
    # simulates batch 1 only where 2 does not fit (memory grows with the batch)
    first = low if low > 1 or cap < 2 or not auto_batch else 2

    def fits_at_low(name: str, config: ModelConfig) -> bool:
        # the second batch is speculative: the cap, which ends the search if it fits and otherwise
        # brackets the answer, so that the affine model interpolates rather than extrapolates
        probes = [first, cap] if cap > first else [first]
        answer = None if auto_batch else first
        return evaluate.many(name, config, probes, answer)[0].fits or (first > low and evaluate(name, config, low).fits)

    chosen_index, chosen_batch, fits = None, low, False
    best: tuple[int, int] | None = None  # (batch, index) for prefer=batch
    for index, (name, config) in enumerate(sizes):
        if not fits_at_low(name, config):
            continue
        fits = True
        if prefer == "width" or not auto_batch:
            chosen_index = index
            break
        batch = _max_batch(evaluate, name, config, low, cap)
        if best is None or batch > best[0]:
            best = (batch, index)
        if batch == cap:
            break
    if prefer == "batch" and auto_batch and best is not None:
        chosen_batch, chosen_index = best
    if chosen_index is None:
        chosen_index = len(sizes) - 1  # nothing fits: report the smallest candidate
    name, config = sizes[chosen_index]
    if fits and auto_batch and prefer == "width":
        chosen_batch = _max_batch(evaluate, name, config, low, cap)
    chosen = evaluate(name, config, chosen_batch)

    next_width = None
    if auto_size and chosen_index > 0:
        above_name, above_config = sizes[chosen_index - 1]
        next_width = evaluate(above_name, above_config, low)
    next_batch = None
    if auto_batch and fits and chosen_batch < cap:
        next_batch = evaluate(name, config, chosen_batch + 1)

    return FitResult(
        entry=entry,
        size=name,
        config=config,
        batch_size=chosen_batch,
        chosen=chosen,
        budget_bytes=budget,
        auto_size=auto_size,
        auto_batch=auto_batch,
        next_width=next_width,
        next_batch=next_batch,
        batch_cap_reached=auto_batch and fits and chosen_batch == cap,
        simulations=evaluate.simulations,
        considered=list(evaluate.cache.values()),
        rigs=evaluate.rigs,
        cached=sum(rig.cache_hits for rig in evaluate.rigs.values()),
    )
