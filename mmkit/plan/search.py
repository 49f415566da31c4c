"""The fastest way to train at an effective batch: a search, not just a fit.

`--target-batch N` asks how to train with N samples per optimizer step as fast as the card allows.
For every precision the device offers and, for families that support it, with and without
activation checkpointing, the fit (mmkit.plan.fit) finds the largest micro-batch that fits; the
micro-batch is then the largest divisor of N at or below it (micro × accumulation = N), its memory
simulated, and its optimizer step's time predicted from the simulated operators (mmkit.plan.timemodel,
from a calibration or datasheet figures, labelled as such). The configurations that fit are ranked by predicted samples/s; each dimension the winner did
not take gets one line saying why it lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mmkit.errors import MmkitError
from mmkit.models.registry import ModelEntry
from mmkit.plan.fit import Candidate, FitResult, evaluate_batch, fit_to_budget
from mmkit.plan.timemodel import device_rates, predict_step
from mmkit.settings import GpuPreset


@dataclass(frozen=True)
class SearchOption:
    """One way to train: precision, checkpointing, micro-batch × accumulation = the target."""

    precision: str
    gradient_checkpointing: bool
    micro_batch: int
    accumulation: int
    total_bytes: int  # simulated peak tensors + overhead lines at the micro-batch
    step_seconds: float  # predicted: one optimizer step (`accumulation` micro-steps)
    fit: FitResult = field(repr=False, compare=False)

    @property
    def samples_per_s(self) -> float:
        return self.micro_batch * self.accumulation / self.step_seconds

    def label(self) -> str:
        checkpointing = "checkpointing" if self.gradient_checkpointing else "no checkpointing"
        return f"{self.precision}, {checkpointing}, micro-batch {self.micro_batch} × {self.accumulation}"

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "gradient_checkpointing": self.gradient_checkpointing,
                "micro_batch": self.micro_batch, "accumulation": self.accumulation, "total": self.total_bytes,
                "step_seconds": self.step_seconds, "samples_per_s": self.samples_per_s}


@dataclass(frozen=True)
class SearchResult:
    target_batch: int
    options: list[SearchOption]  # the configurations that fit, fastest first
    rejected: list[str]  # one line per dimension the winner did not take
    next_micro: Candidate | None  # the next divisor of the target above the winner's micro-batch
    time_source: str = ""  # where the time model's device figures come from (mmkit.plan.timemodel)

    @property
    def winner(self) -> SearchOption:
        return self.options[0]

    def as_dict(self) -> dict[str, Any]:
        return {"target_batch": self.target_batch, "ranked": [o.as_dict() for o in self.options],
                "rejected": self.rejected,
                "next_micro_batch": None if self.next_micro is None else
                {"batch_size": self.next_micro.batch_size, "total": self.next_micro.total,
                 "fits": self.next_micro.fits},
                "method": "memory simulated at each micro-batch; time predicted from the simulated step's "
                          "operators (mmkit.plan.timemodel)", "time_source": self.time_source}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_training_plans(
    entry: ModelEntry, gpu: GpuPreset, *, size: str, target_batch: int, precisions: Sequence[str],
    checkpointing: Sequence[bool], overrides: Mapping[str, Any] | None = None, optimizer: str = "adamw",
    margin: float | None = None,
) -> SearchResult:
    """Every (precision, checkpointing) pair at its largest micro-batch dividing `target_batch`
    that fits `gpu`, ranked by predicted samples/s (ties: less memory first)."""
    if target_batch < 1:
        raise MmkitError(f"--target-batch must be at least 1, got {target_batch}")
    options: list[SearchOption] = []
    failed: list[tuple[str, bool, int]] = []  # (precision, checkpointing, bytes at micro-batch 1)
    for precision in precisions:
        for checkpoint in checkpointing:
            fit = fit_to_budget(entry, gpu, size=size, batch_size="auto", overrides=overrides, precision=precision,
                                optimizer=optimizer, gradient_checkpointing=checkpoint, margin=margin,
                                min_batch_size=1, max_batch_size=target_batch)
            if not fit.chosen.fits:
                failed.append((precision, checkpoint, fit.chosen.total))
                continue
            micro = max(d for d in divisors(target_batch) if d <= fit.batch_size)
            candidate = fit.chosen if micro == fit.batch_size else evaluate_batch(fit, gpu, micro, margin)
            at_micro = replace(fit, batch_size=micro, chosen=candidate, next_batch=None, batch_cap_reached=False)
            options.append(SearchOption(precision, checkpoint, micro, target_batch // micro, candidate.total,
                                        _step_seconds(fit, gpu, precision, micro, candidate) * (target_batch // micro),
                                        at_micro))
    if not options:
        smallest = min(failed, key=lambda f: f[2])
        raise MmkitError(f"nothing fits {gpu.name!r} even at micro-batch 1: {smallest[0]}"
                         f"{' with checkpointing' if smallest[1] else ''} needs {smallest[2] / 2**30:.2f} GiB, "
                         f"the budget is {gpu.budget_bytes(margin) / 2**30:.2f} GiB")
    options.sort(key=lambda o: (o.step_seconds, o.total_bytes))
    winner = options[0]
    next_micro = None
    larger = [d for d in divisors(target_batch) if d > winner.micro_batch]
    if larger:
        next_micro = evaluate_batch(winner.fit, gpu, larger[0], margin)
        options[0] = winner = replace(winner, fit=replace(winner.fit, next_batch=next_micro))
    return SearchResult(target_batch, options, _rejections(options, failed, next_micro, precisions, checkpointing),
                        next_micro, device_rates(gpu).source)


def _step_seconds(fit: FitResult, gpu: GpuPreset, precision: str, micro: int, candidate: Candidate) -> float:
    """Predicted seconds of one micro-step from its simulated operators (mmkit.plan.timemodel; a
    checkpointed model's operators include its recompute)."""
    assert candidate.train is not None
    return predict_step(candidate.train.costs, device_rates(gpu)).seconds


def _rejections(options: list[SearchOption], failed: list[tuple[str, bool, int]], next_micro: Candidate | None,
                precisions: Sequence[str], checkpointing: Sequence[bool]) -> list[str]:
    winner, lines = options[0], []
    for precision in precisions:
        if precision == winner.precision:
            continue
        best = next((o for o in options if o.precision == precision), None)
        lines.append(f"{precision}: " + (f"best {best.label()} predicts {best.samples_per_s:,.0f} samples/s, "
                                         f"{winner.samples_per_s / best.samples_per_s:.2f}× slower"
                                         if best else "does not fit even at micro-batch 1"))
    for checkpoint in checkpointing:
        if checkpoint == winner.gradient_checkpointing:
            continue
        best = next((o for o in options if o.gradient_checkpointing == checkpoint), None)
        what = "checkpointing" if checkpoint else "no checkpointing"
        lines.append(f"{what}: " + (f"best {best.label()} predicts {best.samples_per_s:,.0f} samples/s, "
                                    f"{winner.samples_per_s / best.samples_per_s:.2f}× slower"
                                    if best else "does not fit even at micro-batch 1"))
    if next_micro is None:
        lines.append(f"micro-batch: {winner.micro_batch} is the whole target (accumulation 1)")
    elif not next_micro.fits:
        lines.append(f"micro-batch: the next divisor of {winner.micro_batch * winner.accumulation}, "
                     f"{next_micro.batch_size}, needs {next_micro.total / 2**30:.2f} GiB: over budget")
    return lines
