"""Fitting is maximal: the chosen batch fits and one more does not; the next width does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from runhelpers import write_test_gpus

from mmkit.cache import bypassed
from mmkit.models import get_model_entry
from mmkit.models.registry import size_config
from mmkit.plan.fit import fit_to_budget, ladder_sizes
from mmkit.plan.memory import (
    FakeTrainingRig,
    StepSettings,
    config_param_count,
    simulate_training_step,
    states_lower_bound,
)
from mmkit.settings import GpuPreset, load_gpu_preset



@pytest.fixture
def small_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[GpuPreset]:
    monkeypatch.setenv("MMKIT_PRESET_PATH", str(write_test_gpus(tmp_path, {"gpu-100m": 0.1, "gpu-250m": 0.25})))
    return [load_gpu_preset("gpu-100m"), load_gpu_preset("gpu-250m")]


def independent_total(model: str, size: str, batch: int, gpu: GpuPreset, **step: object) -> int:
    """Simulate from scratch, outside the fitter and its cache."""
    entry = get_model_entry(model)
    _, config = size_config(entry, size)
    params = config_param_count(entry, config)
    bound = states_lower_bound(params, "adamw")
    if bound + sum(gpu.overhead_bytes(bound).values()) > gpu.budget_bytes():
        return bound + sum(gpu.overhead_bytes(bound).values())
    memory = simulate_training_step(
        entry, config, StepSettings(batch_size=batch, gpu_target=gpu.device_type == "cuda", **step)
    )
    return memory.peak_tensors + sum(gpu.overhead_bytes(memory.peak_tensors).values())


def assert_maximal(model: str, gpu: GpuPreset, min_batch: int, cap: int, precision: str = "fp32"):
    result = fit_to_budget(get_model_entry(model), gpu, min_batch_size=min_batch, max_batch_size=cap, precision=precision)
    budget = gpu.budget_bytes()
    assert result.chosen.fits
    total = independent_total(model, result.size, result.batch_size, gpu, precision=precision)
    assert total == result.chosen.total <= budget
    if result.batch_size < cap:
        assert independent_total(model, result.size, result.batch_size + 1, gpu, precision=precision) > budget
    ladder = [name for name, _ in ladder_sizes(result.entry, result.entry.sizes[result.entry.default_size], {})]
    position = ladder.index(result.size)
    if position > 0:
        assert independent_total(model, ladder[position - 1], min_batch, gpu, precision=precision) > budget
    return result


@pytest.mark.parametrize("model", ["multichannel", "clip"])
def test_fit_is_maximal_on_two_gpus(model: str, small_gpus: list[GpuPreset]) -> None:
    chosen = [assert_maximal(model, gpu, 1, 4096) for gpu in small_gpus]
    # a bigger card buys a larger width or a larger batch, never less
    (w1, b1), (w2, b2) = [(r.config.width, r.batch_size) for r in chosen]
    assert (w2, b2) > (w1, b1)
    for result in chosen:  # neither choice is trivial: a larger width exists that does not fit
        assert result.next_width is not None and not result.next_width.fits
        assert result.next_batch is not None and not result.next_batch.fits


def test_batch_cap_is_respected(small_gpus: list[GpuPreset]) -> None:
    result = fit_to_budget(get_model_entry("multichannel"), small_gpus[1], size="default", max_batch_size=64)
    assert result.batch_size == 64 and result.batch_cap_reached and result.next_batch is None


def test_fixed_batch_chooses_the_largest_width_that_fits(small_gpus: list[GpuPreset]) -> None:
    result = fit_to_budget(get_model_entry("clip"), small_gpus[0], batch_size=4)
    assert result.batch_size == 4 and not result.auto_batch
    assert result.next_width is not None and not result.next_width.fits


def test_prefer_batch_trades_width_for_batch(small_gpus: list[GpuPreset]) -> None:
    by_width = fit_to_budget(get_model_entry("clip"), small_gpus[0], max_batch_size=4096)
    by_batch = fit_to_budget(get_model_entry("clip"), small_gpus[0], max_batch_size=64, prefer="batch")
    assert by_batch.batch_size >= by_width.batch_size
    assert by_batch.config.width <= by_width.config.width


def test_nothing_fits_is_reported(small_gpus: list[GpuPreset]) -> None:
    result = fit_to_budget(get_model_entry("lfm2"), small_gpus[0], size="original", batch_size=2)
    assert not result.chosen.fits
    assert not result.chosen.simulated  # 152M parameters: ruled out by the model states alone
    assert result.chosen.total > small_gpus[0].budget_bytes()


def test_named_sizes_keep_their_names_on_the_ladder() -> None:
    entry = get_model_entry("lfm2")
    names = [name for name, _ in ladder_sizes(entry, entry.sizes["rtx3050"], {})]
    assert names[0] == "original" and "rtx3050" in names


@pytest.mark.slow
@pytest.mark.parametrize("gpu", ["rtx3050", "gtx1650"])
def test_lfm2_fit_is_maximal_on_real_presets(gpu: str) -> None:
    assert_maximal("lfm2", load_gpu_preset(gpu), 2, 64, precision="fp16")



@pytest.mark.parametrize(("model", "gpu"), [("multichannel", 0), ("clip", 1)])
def test_two_points_predict_the_answer_moment_by_moment(model: str, gpu: int, small_gpus: list[GpuPreset]) -> None:
    # the live total after each allocation is a line in the batch size: batch 2 and the cap predict the
    # largest batch that fits, and one more round (it and the next) confirms it
    result = fit_to_budget(get_model_entry(model), small_gpus[gpu], size="default", max_batch_size=4096)
    assert 2 < result.batch_size < 4096
    simulated = sorted(c.batch_size for c in result.considered if c.simulated)
    assert simulated == [2, result.batch_size, result.batch_size + 1, 4096]
    assert result.chosen.fits and result.next_batch is not None and not result.next_batch.fits
    highs = [c.train.highs for c in result.considered if c.simulated]
    assert highs[0] and all(len(h) == len(highs[0]) for h in highs)


def test_the_inference_forward_runs_beside_the_confirming_round(small_gpus: list[GpuPreset]) -> None:
    entry = get_model_entry("clip")
    with bypassed():
        result = fit_to_budget(entry, small_gpus[1], size="default", max_batch_size=4096, inference=True)
        rig = result.rigs[result.size]
        kept = rig.cached_inference(result.batch_size)
        alone = FakeTrainingRig(entry, result.config, rig.step)._simulate_inference(result.batch_size)
    assert kept == alone > 0
    assert rig.cached_inference(result.batch_size + 1) is None  # only the answer's


def test_batch_one_is_simulated_only_where_two_does_not_fit(small_gpus: list[GpuPreset]) -> None:
    result = fit_to_budget(get_model_entry("multichannel"), small_gpus[1], max_batch_size=4096)
    simulated = {(c.size, c.batch_size): c.fits for c in result.considered if c.simulated}
    wider = result.next_width
    assert wider is not None and simulated[(wider.size, 2)] is False and (wider.size, 1) in simulated
    assert (result.size, 1) not in simulated and result.batch_size > 2
