"""The memory simulation: exact against real CPU steps and against torch's MemTracker."""

from __future__ import annotations

import pytest
import torch

from mmkit.cache import bypassed
from mmkit.errors import MmkitError
from mmkit.models import get_model_entry, list_models
from mmkit.models.registry import size_config
from mmkit.plan.memory import (
    FakeTrainingRig,
    StepSettings,
    measure_training_steps,
    memtracker_training_peak,
    simulate_batches,
    simulate_training_step,
    with_gradient_checkpointing,
)
from mmkit.plan.tracker import CATEGORIES, LiveStorageTracker


def small(name: str):
    entry = get_model_entry(name)
    _, config = size_config(entry, f"w{entry.ladder[-1]}")
    return entry, config


@pytest.fixture(autouse=True)
def one_thread():
    """Real CPU steps on tiny models: one thread is faster and keeps timings out of the way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list_models())
def test_simulated_peak_equals_a_real_cpu_step(name: str) -> None:
    entry, config = small(name)
    step = StepSettings(batch_size=4, precision="fp32")
    simulated = simulate_training_step(entry, config, step)
    measured = measure_training_steps(entry, config, step, steps=1)
    assert abs(simulated.peak_tensors - measured.peak_tensors) <= 0.03 * measured.peak_tensors
    assert sum(simulated.as_dict()[c] for c in CATEGORIES) == simulated.peak_tensors


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_simulation_matches_a_real_cpu_step(precision: str) -> None:
    entry, config = small("clip")
    step = StepSettings(batch_size=4, precision=precision)
    simulated = simulate_training_step(entry, config, step).peak_tensors
    measured = measure_training_steps(entry, config, step, steps=1).peak_tensors
    assert abs(simulated - measured) <= 0.03 * measured


@pytest.mark.parametrize("name", list_models())
def test_agrees_with_torch_memtracker_to_the_byte(name: str) -> None:
    entry, config = small(name)
    step = StepSettings(batch_size=2, precision="bf16" if name in ("fusion", "clip") else "fp32")
    assert simulate_training_step(entry, config, step).peak_tensors == memtracker_training_peak(entry, config, step)


def test_adamw_keeps_two_states_sgd_one() -> None:
    entry = get_model_entry("multichannel")
    config = entry.sizes["default"]
    weights = 2_365_962 * 4
    adamw = simulate_training_step(entry, config, StepSettings(batch_size=32, optimizer="adamw"))
    sgd = simulate_training_step(entry, config, StepSettings(batch_size=32, optimizer="sgd"))
    assert adamw.weights == weights
    # persistent state: exp_avg + exp_avg_sq, plus a 4-byte step counter for each of the 10
    # parameter tensors (two Linears per stream and the classifier, weight and bias each)
    assert adamw.optimizer == 2 * weights + 4 * 10
    assert sgd.optimizer == weights  # momentum buffers
    # in the optimizer step the weights, all gradients and both states are alive
    assert adamw.phase_peaks["optimizer"] >= 4 * weights


def test_multichannel_and_separate_need_the_same_memory() -> None:
    """The seed's '43 % training-memory saving' of multichannel does not exist."""
    mc = simulate_training_step(get_model_entry("multichannel"), get_model_entry("multichannel").sizes["default"],
                                StepSettings(batch_size=32))
    sep = simulate_training_step(get_model_entry("separate"), get_model_entry("separate").sizes["default"],
                                 StepSettings(batch_size=32))
    assert abs(mc.peak_tensors - sep.peak_tensors) <= 0.01 * mc.peak_tensors
    assert abs(mc.optimizer - sep.optimizer) <= 0.01 * mc.optimizer


@pytest.mark.parametrize("name", ["lfm2", "clip", "fusion"])
def test_gradient_checkpointing_saves_activation_memory(name: str) -> None:
    entry, config = small(name)
    step = StepSettings(batch_size=8)
    plain = simulate_training_step(entry, config, step)
    checkpointed = simulate_training_step(entry, with_gradient_checkpointing(entry, config, True), step)
    assert checkpointed.activations < plain.activations
    assert checkpointed.weights == plain.weights


def test_checkpointing_unsupported_is_a_user_error() -> None:
    entry = get_model_entry("multichannel")
    with pytest.raises(MmkitError, match="does not support gradient checkpointing"):
        with_gradient_checkpointing(entry, entry.sizes["default"], True)


def test_autocast_shrinks_activations() -> None:
    entry, config = small("lfm2")
    fp32 = simulate_training_step(entry, config, StepSettings(batch_size=8))
    bf16 = simulate_training_step(entry, config, StepSettings(batch_size=8, precision="bf16"))
    assert bf16.activations < fp32.activations
    assert bf16.weights == fp32.weights  # fp32 master weights


def test_gpu_target_rounds_to_the_cuda_allocation_granule() -> None:
    entry = get_model_entry("multichannel")
    config = entry.sizes["default"]
    cpu = simulate_training_step(entry, config, StepSettings(batch_size=32))
    gpu = simulate_training_step(entry, config, StepSettings(batch_size=32, gpu_target=True))
    assert all(getattr(gpu, c) % 512 == 0 for c in CATEGORIES)
    # ten parameter tensors, each rounded up by less than one granule
    assert 0 <= gpu.weights - cpu.weights < 10 * 512
    assert gpu.peak_tensors != cpu.peak_tensors  # foreach kernels allocate differently


def test_memory_is_affine_in_the_batch_size_per_phase() -> None:
    entry, config = small("clip")
    rig = FakeTrainingRig(entry, config, StepSettings(batch_size=1))
    a, b, c = (rig.training_step(n).phase_peaks["backward"] for n in (4, 8, 12))
    assert b - a == c - b


def test_parallel_simulation_equals_sequential() -> None:
    entry, config = small("lfm2")
    rig = FakeTrainingRig(entry, config, StepSettings(batch_size=1))
    parallel = simulate_batches(rig, [2, 3], parallel=True)
    sequential = simulate_batches(rig, [2, 3], parallel=False)
    assert parallel == sequential


@pytest.mark.parametrize("name", list_models())
def test_a_repeated_optimizer_phase_equals_a_simulated_one(name: str) -> None:
    # every family, with the scaler (fp16) and clipping, SGD's loop, and the CPU target's fused AdamW
    entry, config = small(name)
    settings = {"lfm2": StepSettings(1, precision="fp16", gpu_target=True),
                "separate": StepSettings(1, optimizer="sgd", gpu_target=True),
                "multichannel": StepSettings(1, grad_clip=None)}.get(name, StepSettings(1, gpu_target=True))
    with bypassed():
        simulated = FakeTrainingRig(entry, config, settings)._simulate(5)  # a rig's first step runs every operator
        rig = FakeTrainingRig(entry, config, settings)
        rig._simulate(3)
        steps = []
        step = rig.optimizer.step
        rig.optimizer.step = lambda *args, **kwargs: steps.append(1) or step(*args, **kwargs)  # type: ignore[method-assign]
        repeated = rig._simulate(5)
    assert steps == [] and repeated.ops > 0
    assert repeated == simulated  # every category at the peak, each phase's peak, highs, operators and costs


def test_a_phase_that_keeps_a_storage_is_not_left_as_found() -> None:
    tracker = LiveStorageTracker()
    with tracker:
        tracker.set_phase("optimizer")
        tracker.start_recording()
        kept = torch.ones(8)
        scratch = torch.ones(16)
        del scratch
        assert not tracker.left_as_found(but="gradients")
        record = tracker.stop_recording()
    assert kept.numel() == 8
    assert [offset for offset, _ in record.moments] == [32, 96] and record.ops == 2


def test_forked_simulation_unfreezes_only_what_it_froze() -> None:
    import gc

    entry, config = small("multichannel")
    with bypassed():
        simulate_batches(FakeTrainingRig(entry, config, StepSettings(batch_size=1)), [2, 3], parallel=True)
        assert gc.get_freeze_count() == 0  # a caller's process is left as it was
        gc.freeze()  # the mmkit process froze its imports: they stay frozen
        try:
            simulate_batches(FakeTrainingRig(entry, config, StepSettings(batch_size=1)), [4, 5], parallel=True)
            assert gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()


def test_adamw_on_a_cpu_uses_the_fused_kernel_and_gpu_targets_keep_foreach() -> None:
    from mmkit.models.registry import create_model
    from mmkit.train.step import build_optimizer

    model = create_model("multichannel")
    assert build_optimizer(model, "adamw", 1e-3).defaults["fused"] is True
    foreach = build_optimizer(model, "adamw", 1e-3, foreach=True).defaults
    assert foreach["foreach"] is True and not foreach["fused"]
