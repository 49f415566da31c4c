"""The step-time model: operators' FLOPs and bytes from the simulated step, device figures from a
datasheet or from `mmkit calibrate`."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from mmkit.cli.app import app
from mmkit.models.registry import create_model, get_model_entry
from mmkit.plan import calibrate as calibration
from mmkit.plan.count import count_flops
from mmkit.plan.memory import FakeTrainingRig, StepSettings
from mmkit.plan.timemodel import DeviceRates, predict_step
from mmkit.plan.tracker import OpCosts
from mmkit.settings import load_gpu_preset

runner = CliRunner()


def test_each_operator_is_bound_by_the_slower_of_compute_and_memory_plus_its_dispatch() -> None:
    rates = DeviceRates("calibrated: test", {"fp32": ((1e3, 1e9), (1e6, 1e10))}, bandwidth=1e9, seconds_per_op=1e-6)
    costs = [
        ["mm", "float32", 10**6, 1000, 2],  # compute 1e-4 s > memory 1e-6 s, twice
        ["mm", "float32", 10**3, 10**6, 1],  # memory 1e-3 s > compute 1e-6 s
        ["add", "float32", 0, 10**4, 3],  # memory 1e-5 s, three times
    ]
    step = predict_step(costs, rates)
    assert step.operators == 6
    assert step.parts["compute"] == pytest.approx(2e-4)
    assert step.parts["memory"] == pytest.approx(1e-3 + 3e-5)
    assert step.parts["per_op"] == pytest.approx(6e-6)
    assert step.seconds == pytest.approx(2e-4 + 1e-3 + 3e-5 + 6e-6)
    # between two measured sizes the rate is interpolated in log-log space
    assert rates.matmul_rate("fp32", 10**4.5) == pytest.approx(10**9.5)
    assert rates.matmul_rate("bf16", 1e9) == 1e10  # an unmeasured precision falls back to fp32, clamped


def test_a_random_fill_costs_per_element_whatever_its_dtype() -> None:
    rates = DeviceRates("calibrated: test", {"fp32": ((1.0, 1e9),)}, bandwidth=1e9, seconds_per_op=0.0,
                        op_bandwidth={"bernoulli_": 1e8})
    fp32 = predict_step([["bernoulli_", "float32", 0, 4 * 10**6, 1]], rates)
    bf16 = predict_step([["bernoulli_", "bfloat16", 0, 2 * 10**6, 1]], rates)  # the same million elements
    assert fp32.seconds == pytest.approx(0.04) and bf16.seconds == pytest.approx(0.04)
    add = predict_step([["add", "bfloat16", 0, 2 * 10**6, 1]], rates)  # a plain operator: per byte
    assert add.seconds == pytest.approx(0.002)


def test_a_matmul_is_timed_at_the_rate_of_its_operands_layout() -> None:
    rates = DeviceRates("calibrated: test", {"bf16": ((1.0, 1e10),)}, bandwidth=1e12, seconds_per_op=0.0,
                        matmul_layouts={"bf16 nn": ((1.0, 1e9),)})
    fast = predict_step([["mm:nt", "bfloat16", 10**7, 1, 1]], rates)
    slow = predict_step([["mm:nn", "bfloat16", 10**7, 1, 1]], rates)
    assert fast.seconds == pytest.approx(1e-3) and slow.seconds == pytest.approx(1e-2)
    assert rates.matmul_rate("bf16", 10**7, "mm:tn") == 1e10  # no table for the layout: the precision's


def test_a_linear_layers_three_products_are_recorded_with_their_layouts() -> None:
    layer, x = torch.nn.Linear(8, 4, bias=False), torch.randn(3, 8, requires_grad=True)
    costs = OpCosts()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if func.namespace != "prim":
                costs.record(func, args, kwargs or {}, out)
            return out

    with Record():
        layer(x).backward(torch.randn(3, 4))
    products = {row[0]: row[2] for row in costs.as_list() if row[0].startswith("mm")}
    assert products == {"mm:nt": 2 * 3 * 8 * 4, "mm:nn": 2 * 3 * 8 * 4, "mm:tn": 2 * 3 * 8 * 4}  # x @ w.t(), g @ w, g.t() @ x


def test_the_simulated_operators_carry_the_steps_matmul_flops() -> None:
    entry = get_model_entry("multichannel")
    config = entry.sizes[entry.default_size]
    memory = FakeTrainingRig(entry, config, StepSettings(batch_size=4)).training_step(4)
    model = create_model("multichannel")
    assert sum(flops * calls for _, _, flops, _, calls in memory.costs) == count_flops(model.train(), 4).train_flops
    assert all(op != "device" for op, *_ in memory.costs)  # metadata queries are not operators a device runs
    # clipping runs the multi-tensor kernels of a real CPU step, not the per-parameter loop
    assert any(op == "_foreach_norm" for op, *_ in memory.costs)
    assert sum(calls for op, *_, calls in memory.costs if op == "linalg_vector_norm") == 1  # the norm of the norms


def test_calibrate_writes_a_preset_that_plans_predict_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "MIN_SECONDS", 0.01)
    monkeypatch.setattr(calibration, "LINEAR_SHAPES", ((32, 32, 32), (64, 128, 128)))
    monkeypatch.setattr(calibration, "CONV_SHAPES", ((2, 16, 32, 3),))
    monkeypatch.setattr(calibration, "ELEMENTWISE_ELEMENTS", 1 << 16)
    monkeypatch.setattr(calibration, "OPTIMIZER_PARAMS", 1 << 16)
    result = runner.invoke(app, ["calibrate", "--device", "cpu", "--name", "here", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    preset = load_gpu_preset("here")
    assert preset.calibration is not None and preset.calibration.bandwidth_gb_s > 0
    assert preset.calibration.seconds_per_op > 0 and set(preset.calibration.matmul_tflops) == {"fp32", "bf16"}
    assert set(preset.calibration.matmul_layout_tflops) == {f"{p} {layout}" for p in ("fp32", "bf16")
                                                             for layout in ("nn", "nt", "tn")}
    assert set(preset.calibration.conv_tflops) == {"fp32", "bf16"} and "_fused_adamw_" in preset.calibration.op_gb_s
    assert "gelu" in preset.calibration.op_gb_s and "native_layer_norm" in preset.calibration.op_gb_s
    assert preset.calibration.model_dump(mode="json") == written["calibration"]
    assert preset.vram_gib == load_gpu_preset("cpu").vram_gib  # memory figures from the CPU preset
    plan = runner.invoke(app, ["memory-plan", "multichannel", "--gpu", "here", "--batch-size", "8", "--json"])
    assert plan.exit_code == 0, plan.output
    step_model = json.loads(plan.stdout)["time"]["step_model"]
    assert step_model["source"].startswith("calibrated: mmkit calibrate on") and step_model["step_seconds"] > 0


def test_a_slow_shape_ends_its_precisions_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a device where a shape is slow, larger ones are not measured: calibrate stays a few seconds."""
    monkeypatch.setattr(calibration, "MIN_SECONDS", 0.001)
    monkeypatch.setattr(calibration, "LINEAR_SHAPES", ((8, 16, 16), (16, 32, 32), (32, 64, 64)))
    monkeypatch.setattr(calibration, "SLOW_CALL_SECONDS", 0.0)
    tables, layouts = calibration.matmul_rates(torch.device("cpu"), ("fp32",))
    assert [flops for flops, _ in tables["fp32"]] == [2.0 * 8 * 16 * 16]
    assert set(layouts) == {"fp32 nn", "fp32 nt", "fp32 tn"} and all(len(rows) == 1 for rows in layouts.values())


def test_each_linear_size_is_measured_on_the_square_layer_and_an_mlps_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """At equal FLOPs a kernel can run a narrow weight twice as fast as a wide one (bf16 `g @ w`
    without bf16 instructions): a size's rate is that of the shapes models have, a square Linear
    and a transformer MLP's in → 4 × in and back, measured together."""
    monkeypatch.setattr(calibration, "MIN_SECONDS", 0.001)
    monkeypatch.setattr(calibration, "LINEAR_SHAPES", ((8, 16, 16), (16, 32, 32)))
    measured: list[list[tuple[int, int, int]]] = []
    real = calibration._forward_backward_rates

    def spy(device: torch.device, precision: str, layers: list) -> tuple[dict[str, float], float]:
        measured.append([(x.shape[0], layer.in_features, layer.out_features) for layer, x in layers])
        return real(device, precision, layers)

    monkeypatch.setattr(calibration, "_forward_backward_rates", spy)
    tables, _ = calibration.matmul_rates(torch.device("cpu"), ("fp32",))
    assert measured == [[(8, 16, 16), (8, 8, 32), (8, 32, 8)], [(16, 32, 32), (16, 16, 64), (16, 64, 16)]]
    assert [flops for flops, _ in tables["fp32"]] == [2.0 * 8 * 16 * 16, 2.0 * 16 * 32 * 32]
    assert all(rate > 0 for _, rate in tables["fp32"])


def test_the_rounds_medians_keep_sizes_measured_in_some_rounds_only() -> None:
    rounds = [{"t": [(1.0, 5.0), (2.0, 6.0)]}, {"t": [(1.0, 7.0)]}, {"t": [(1.0, 6.0), (2.0, 8.0)]}]
    assert calibration._medians(rounds) == {"t": [(1.0, 6.0), (2.0, 7.0)]}


def test_calibrate_refuses_a_bad_name() -> None:
    result = runner.invoke(app, ["calibrate", "--name", "../x"])
    assert result.exit_code == 2 and "--name" in result.output
