"""Precision from measurement: on a CPU, a preset's mixed precision runs as bf16 only where the probe
of the model's own layers finds it faster; the probe is cached per machine and layer shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkit.errors import MmkitError
from mmkit.models.registry import get_model_entry, size_config
from mmkit.plan import probe as probe_module
from mmkit.plan.precision import run_precision
from mmkit.plan.probe import LayerShape, dominant, layer_shapes, probe_cpu
from mmkit.train.resolve import RunOptions, resolve_run


class FakeProbe:
    def __init__(self, speedup: float) -> None:
        self.speedup = speedup

    def describe(self) -> str:
        return f"bf16 autocast ×{self.speedup:.2f} the speed of fp32, measured"

    def as_dict(self) -> dict:
        return {"bf16_speedup": self.speedup}


def choose(requested: str, speedup: float, given: bool = False, device_type: str = "cpu",
           supported: tuple[str, ...] = ("fp32", "fp16", "bf16")):
    return run_precision(requested, given=given, device_type=device_type, supported=supported,
                         cpu_probe=lambda: FakeProbe(speedup))


def test_a_preset_runs_bf16_only_where_it_is_faster() -> None:
    fast, slow = choose("fp16", 1.6), choose("fp16", 0.09)
    assert (fast.precision, slow.precision) == ("bf16", "fp32")
    assert "×0.09" in slow.note and "the preset asks fp16" in slow.note
    assert fast.bf16_speedup == 1.6
    assert choose("bf16", 1.05).precision == "fp32"  # within noise: fp32, which is exact


def test_a_precision_the_user_typed_runs_with_a_warning_when_slower() -> None:
    typed = choose("bf16", 0.5, given=True)
    assert typed.precision == "bf16" and "warning" in typed.note and "fp32 would be faster" in typed.note
    assert choose("fp16", 1.5, given=True).precision == "bf16"  # fp16 kernels are very slow on a CPU
    assert "warning" not in choose("bf16", 1.5, given=True).note


def test_fp32_and_cuda_never_probe() -> None:
    def no_probe() -> None:
        raise AssertionError("probed")

    assert run_precision("fp32", given=False, device_type="cpu", supported=(), cpu_probe=no_probe).precision == "fp32"
    cuda = run_precision("fp16", given=False, device_type="cuda", supported=("fp32", "fp16"), cpu_probe=no_probe)
    assert cuda.precision == "fp16" and cuda.note is None
    older = run_precision("bf16", given=False, device_type="cuda", supported=("fp32", "fp16"), cpu_probe=no_probe)
    assert older.precision == "fp16" and "not supported" in older.note
    with pytest.raises(MmkitError, match="does not support bf16"):
        run_precision("bf16", given=True, device_type="cuda", supported=("fp32", "fp16"), cpu_probe=no_probe)


def test_the_probe_times_each_layer_kind_of_the_model() -> None:
    entry = get_model_entry("lfm2")
    _, config = size_config(entry, "w64")
    shapes, flops = layer_shapes(entry, config)
    kinds = {s.kind for s in shapes}
    assert {"Linear", "Conv1d", "Conv2d"} <= kinds  # lfm2: matmuls, 1-D and 2-D convolutions
    assert {s.kind for s in dominant(shapes)} == kinds  # a slow bf16 convolution is never missed
    assert flops >= sum(s.flops_per_call * s.calls for s in shapes) > 0  # FlopCounterMode sees attention too


def scripted_timer(bf16_ratio: float, calls: list[str]):
    def timer(shape: LayerShape, batch: int, precisions: tuple[str, ...]) -> dict[str, float]:
        calls.append(shape.key)
        return {"fp32": 1e-3 * batch, "bf16": 1e-3 * batch * bf16_ratio}

    return timer


@pytest.mark.parametrize(("capability", "bf16_ratio", "expected"), [("AMX", 0.5, "bf16"), ("AVX2", 11.7, "fp32")])
def test_train_chooses_what_the_probe_measures_on_this_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capability: str, bf16_ratio: float, expected: str
) -> None:
    monkeypatch.delenv("MMKIT_CPU_BF16_SPEEDUP")
    monkeypatch.setenv("MMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probe_module, "cpu_capability", lambda: capability)
    calls: list[str] = []
    monkeypatch.setattr(probe_module, "time_layer", scripted_timer(bf16_ratio, calls))
    config = resolve_run(RunOptions(model="multichannel", preset="half-data", device="cpu", size="default",
                                    batch_size=8)).run_config()
    assert config.precision == expected
    assert config.precision_probe["bf16_speedup"] == pytest.approx(1 / bf16_ratio)
    assert any(f"×{1 / bf16_ratio:.2f}" in note for note in config.notes)
    assert calls  # measured, and cached under this machine's capability
    cached = json.loads((tmp_path / "cpu-probe.json").read_text())
    assert [key for key in cached if f", {capability}, " in key]


def test_the_probe_is_measured_once_then_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MMKIT_CPU_BF16_SPEEDUP")
    monkeypatch.setenv("MMKIT_CACHE_DIR", str(tmp_path))
    entry = get_model_entry("multichannel")
    _, config = size_config(entry, "default")
    first = probe_cpu(entry, config)  # real timings on this CPU
    assert not first.cached and first.speedup > 0 and first.coverage == pytest.approx(1.0, abs=0.01)
    assert all(t.seconds["fp32"] > 0 and t.seconds["bf16"] > 0 for t in first.timings)

    def never(shape: LayerShape, batch: int, precisions: tuple[str, ...]) -> dict[str, float]:
        raise AssertionError("timed again")

    again = probe_cpu(entry, config, timer=never)
    assert again.cached and again.speedup == first.speedup
    other = "AMX" if probe_module.cpu_capability() == "AVX2" else "AVX2"
    monkeypatch.setattr(probe_module, "cpu_capability", lambda: other)  # another kernel level: measured anew
    calls: list[str] = []
    assert not probe_cpu(entry, config, timer=scripted_timer(2.0, calls)).cached and calls


@pytest.mark.parametrize(("bf16_ratio", "bf16_everywhere"), [(0.5, True), (11.7, False)])
def test_a_cpu_far_slower_in_bf16_times_the_other_layers_in_fp32_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bf16_ratio: float, bf16_everywhere: bool
) -> None:
    """Where bf16 loses by far on the dominant layer (one call can take seconds), the other layers are
    timed in fp32 and their bf16 time taken at that ratio: the choice and the speed-up are the same."""
    monkeypatch.delenv("MMKIT_CPU_BF16_SPEEDUP")
    monkeypatch.setenv("MMKIT_CACHE_DIR", str(tmp_path))
    asked: list[tuple[str, ...]] = []

    def timer(shape: LayerShape, batch: int, precisions: tuple[str, ...]) -> dict[str, float]:
        asked.append(precisions)
        return {p: 1e-3 * batch * (bf16_ratio if p == "bf16" else 1.0) for p in precisions}

    entry = get_model_entry("lfm2")
    _, config = size_config(entry, entry.default_size)
    probe = probe_cpu(entry, config, timer=timer)
    with_bf16 = [p for p in asked if "bf16" in p]
    assert len(probe.timings) > 1 and probe.speedup == pytest.approx(1 / bf16_ratio)
    assert len(with_bf16) == (len(probe.timings) if bf16_everywhere else 1)
    assert ("bf16 timed on the largest 1" in probe.describe()) is not bf16_everywhere
