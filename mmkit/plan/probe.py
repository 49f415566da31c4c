"""The model's own layers, timed for real on this CPU: which precision is faster here, and about
how long a training step takes.

Whether bf16 autocast is faster than fp32 on a CPU is a property of the CPU, not a rule: with
AVX512-BF16 or AMX, oneDNN runs bf16 matmuls and convolutions at up to twice the fp32 rate; without
them torch falls back to reference kernels (a 2-core AVX2 laptop ran one lfm2 training step 11.7
times slower in bf16 than in fp32). So mmkit measures it, once per machine, torch build and layer
shape: the model is run once on the meta device with hooks that record its linear and convolution
layers and the shapes they see; the few layer shapes that carry most of its FLOPs are built for
real and timed forward + backward in fp32 and in bf16 autocast, interleaved, for a few
milliseconds each (where bf16 is over BF16_SLOWER times slower on the first shape, the others are
timed in fp32 only and their bf16 time taken at that ratio: on such a CPU one bf16 call of a large
layer takes seconds). Their FLOP-weighted times give the bf16 speed-up, and, scaled by the model's
whole FLOP count (torch's FLOP formulas, attention included), the time of one training step.

What the layer times leave out, and the step time therefore leaves out: elementwise operators
(norms, activations, softmax), Python dispatch, and data loading. The optimizer step is timed
separately (a fused AdamW step over a flat 1M-parameter tensor, scaled to the model's parameters).

Timings are cached in `MMKIT_CACHE_DIR` (default ~/.cache/mmkit), keyed by the CPU, its capability,
the thread count and the torch build, so a repeated plan or run does not time again.
`MMKIT_CPU_BF16_SPEEDUP` pins the speed-up (for reproducible scripts); the output then says so.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmkit.atomic import write_json_atomic
from mmkit.models.registry import ModelConfig, ModelEntry

PROBED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MAX_PROBED = 4  # the layer shapes timed: a model's FLOPs sit in few distinct shapes (its repeated blocks)
COVERAGE = 0.9  # ... enough of them to carry this share of the hooked layers' FLOPs
PROBE_FLOPS = 5e7  # forward FLOPs of one timed call: ~1 ms at the ~50 GFLOP/s a 2-core CPU sustains
ROUNDS = 3  # interleaved fp32/bf16 rounds after one warm-up call each; the median of each is kept
LONG_CALL_SECONDS = 0.3  # a call this long is its own timing, its first call (slow bf16 kernels take seconds)
MAX_GROWTH = 16  # the fp32 batch grows (doubling) to at most 16 × the probe batch ...
GROWTH_GAIN = 0.85  # ... while each doubling makes a sample at least 15 % cheaper ...
GROWTH_CALL_SECONDS = 0.25  # ... and one call takes less than this
OPTIMIZER_PROBE_PARAMS = 2**20
# bf16 this many times slower than fp32 on the dominant shape (a CPU without bf16 instructions): the other
# shapes are timed in fp32 only, bf16 taken at that ratio (timing them would cost seconds, not change the choice)
BF16_SLOWER = 2.0
CACHE_FILE = "cpu-probe.json"


@dataclass(frozen=True)
class LayerShape:
    """One distinct (layer, input shape) the model uses, and how much of its work that is."""

    kind: str  # "Linear", "Conv2d", ...
    args: tuple[Any, ...]  # what rebuilds the layer: (in, out, bias) or the convolution's arguments
    sample_shape: tuple[int, ...]  # the input of one call, batch dimension dropped
    flops_per_call: int  # forward FLOPs of one call at batch 1
    calls: int  # calls per forward pass

    @property
    def key(self) -> str:
        return f"{self.kind}{self.args}@{'x'.join(map(str, self.sample_shape))}"

    def build(self) -> nn.Module:
        if self.kind == "Linear":
            in_features, out_features, bias = self.args
            return nn.Linear(in_features, out_features, bias=bias)
        in_ch, out_ch, kernel, stride, padding, dilation, groups, bias = self.args
        conv = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}[self.kind]
        return conv(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    bias=bias)


@dataclass(frozen=True)
class LayerTiming:
    layer: LayerShape
    probe_batch: int
    seconds: dict[str, float]  # "fp32" / "bf16": median forward + backward of one call at probe_batch
    fp32_per_sample: float  # fp32 seconds per sample at the batch where it stopped getting cheaper

    def per_sample(self, precision: str) -> float:
        """Seconds of forward + backward of all this shape's calls, for one sample: fp32 as measured
        at an efficient batch, bf16 by the ratio measured at the probe batch."""
        ratio = self.seconds["bf16"] / self.seconds["fp32"] if precision == "bf16" else 1.0
        return self.fp32_per_sample * ratio * self.layer.calls


@dataclass(frozen=True)
class CpuProbe:
    """Measured forward + backward times of a model's dominant layers on this CPU."""

    machine: str  # "AVX2, 2 threads, torch 2.13.0+cpu"
    timings: list[LayerTiming]
    coverage: float  # share of the model's forward FLOPs that the timed shapes carry
    cached: bool  # every timing came from the cache
    pinned_speedup: float | None = None  # MMKIT_CPU_BF16_SPEEDUP: not measured
    optimizer_seconds_per_param: float = 0.0  # fused AdamW, measured
    bf16_shapes_timed: int | None = None  # bf16 timed on these first shapes only (BF16_SLOWER); None: on all

    @property
    def speedup(self) -> float:
        """fp32 time / bf16 time of the timed layers, FLOP-weighted as the model uses them."""
        if self.pinned_speedup is not None:
            return self.pinned_speedup
        fp32 = sum(t.per_sample("fp32") for t in self.timings)
        bf16 = sum(t.per_sample("bf16") for t in self.timings)
        return fp32 / bf16 if bf16 > 0 else 1.0

    def seconds_per_sample(self, precision: str) -> float:
        """Forward + backward of every matmul and convolution, for one sample (coverage-scaled)."""
        kind = "bf16" if precision in ("bf16", "fp16") else "fp32"
        measured = sum(t.per_sample(kind) for t in self.timings)
        if kind == "bf16" and self.pinned_speedup is not None:
            measured = sum(t.per_sample("fp32") for t in self.timings) / self.pinned_speedup
        return measured / max(self.coverage, 1e-9)

    def describe(self) -> str:
        if self.pinned_speedup is not None:
            return f"bf16 speed-up ×{self.pinned_speedup:g} pinned by MMKIT_CPU_BF16_SPEEDUP (not measured)"
        shapes = len(self.timings)
        return (f"bf16 autocast ×{self.speedup:.2f} the speed of fp32, measured on {self.machine} "
                f"({shapes} layer shape{'s' if shapes != 1 else ''}, {self.coverage:.0%} of the model's FLOPs"
                f"{'' if self.bf16_shapes_timed is None else f'; bf16 timed on the largest {self.bf16_shapes_timed}'}"
                f"{', cached' if self.cached else ''})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine, "bf16_speedup": self.speedup, "pinned": self.pinned_speedup is not None,
            "coverage": self.coverage, "cached": self.cached,
            "layers": [{"layer": t.layer.key, "calls": t.layer.calls, "probe_batch": t.probe_batch,
                        "seconds": t.seconds, "fp32_seconds_per_sample": t.fp32_per_sample}
                       for t in self.timings],
        }


def machine_key() -> str:
    """What a CPU timing depends on: the CPU, the kernels torch may use on it, threads, the build."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")  # oneDNN's own cap, which the capability does not show
    return (f"{cpu}, {cpu_capability()}{f' (oneDNN {isa})' if isa else ''}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def cpu_capability() -> str:
    """torch's CPU kernel level: DEFAULT, AVX2, AVX512 (ATEN_CPU_CAPABILITY may lower it)."""
    return str(torch.backends.cpu.get_cpu_capability())


def layer_shapes(entry: ModelEntry, config: ModelConfig) -> tuple[list[LayerShape], int]:
    """The model's linear and convolution calls grouped by shape, largest FLOPs first, and its whole
    forward FLOPs per sample (attention included). Runs on the meta device (cached)."""
    from mmkit.cache import cached, model_key

    return cached(
        "layer-shapes", model_key(entry, config), lambda: _layer_shapes(entry, config),
        encode=lambda v: [[dataclasses.astuple(s) for s in v[0]], v[1]],
        decode=lambda v: ([LayerShape(*_tuples(s)) for s in v[0]], int(v[1])),
    )


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples they were."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _layer_shapes(entry: ModelEntry, config: ModelConfig) -> tuple[list[LayerShape], int]:
    from mmkit.plan.count import config_forward_flops

    seen: dict[str, LayerShape] = {}

    def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if (not isinstance(module, PROBED_LAYERS) or not inputs or not isinstance(inputs[0], torch.Tensor)
                or not isinstance(output, torch.Tensor)):
            return
        shape = _describe(module, tuple(inputs[0].shape[1:]), output)
        if shape is None:
            return
        known = seen.get(shape.key)
        seen[shape.key] = shape if known is None else LayerShape(
            shape.kind, shape.args, shape.sample_shape, shape.flops_per_call, known.calls + 1)

    flops = config_forward_flops(entry, config, forward_hook=record)  # at batch 1
    shapes = sorted(seen.values(), key=lambda s: s.flops_per_call * s.calls, reverse=True)
    return shapes, flops


def _describe(module: nn.Module, sample_shape: tuple[int, ...], output: torch.Tensor) -> LayerShape | None:
    if isinstance(module, nn.Linear):
        rows = math.prod(sample_shape[:-1]) if sample_shape else 1
        return LayerShape("Linear", (module.in_features, module.out_features, module.bias is not None),
                          sample_shape, 2 * rows * module.in_features * module.out_features, 1)
    if isinstance(module.padding, str):  # "same": rebuildable as given
        padding: Any = module.padding
    else:
        padding = tuple(module.padding)
    args = (module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride), padding,
            tuple(module.dilation), module.groups, module.bias is not None)
    per_output = 2 * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    outputs_per_sample = output[0].numel()
    # the torch class, not the module's own (a weight-normed conv is a `ParametrizedConv1d`)
    kind = next(c.__name__ for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, c))
    return LayerShape(kind, args, sample_shape, per_output * outputs_per_sample, 1)


def dominant(shapes: list[LayerShape]) -> list[LayerShape]:
    """The largest shape of each layer kind (a convolution's bf16 kernels can be slow where its
    matmuls are fast), then the largest others until COVERAGE of the hooked FLOPs, MAX_PROBED in all
    unless there are more kinds. `shapes` are sorted by FLOPs, largest first."""
    chosen = [next(s for s in shapes if s.kind == kind) for kind in dict.fromkeys(s.kind for s in shapes)]
    total = sum(s.flops_per_call * s.calls for s in shapes)
    covered = sum(s.flops_per_call * s.calls for s in chosen)
    for shape in shapes:
        if covered >= COVERAGE * total or len(chosen) >= MAX_PROBED:
            break
        if shape not in chosen:
            chosen.append(shape)
            covered += shape.flops_per_call * shape.calls
    return chosen


Timer = Callable[[LayerShape, int, tuple[str, ...]], dict[str, float]]


def time_layer(shape: LayerShape, batch: int, precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    """Median seconds of one forward + backward of `shape` at `batch`, in fp32 and/or in bf16
    autocast, interleaved so that a change of load hits both alike."""
    with torch.random.fork_rng(devices=[]):  # a layer's init draws from the global RNG: leave the run's alone
        torch.manual_seed(0)
        layer = shape.build()
        x = torch.randn((batch, *shape.sample_shape)).requires_grad_()

    def once(precision: str) -> float:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = layer(x)
        y.float().sum().backward()
        return time.perf_counter() - start

    warm_up = {precision: once(precision) for precision in precisions}  # oneDNN builds its kernels on the first call
    # a long call is its own average, its first call included (building the kernels is a small part of it)
    long = {precision: seconds for precision, seconds in warm_up.items() if seconds >= LONG_CALL_SECONDS}
    rounds: dict[str, list[float]] = {precision: [] for precision in precisions if precision not in long}
    for _ in range(ROUNDS if rounds else 0):
        for precision in rounds:
            rounds[precision].append(once(precision))
    return long | {name: statistics.median(values) for name, values in rounds.items()}


def fp32_per_sample(shape: LayerShape, batch: int, seconds: float, timer: Timer) -> float:
    """fp32 seconds per sample at the batch where doubling it stops making a sample cheaper: a
    small probe batch leaves matmul and convolution kernels (the weight gradient above all) short
    of rows, 2-4 times less efficient than a training batch. `seconds`: one call at `batch`."""
    per_sample, first = seconds / batch, batch
    while batch * 2 <= MAX_GROWTH * first and seconds < GROWTH_CALL_SECONDS:
        batch *= 2
        seconds = timer(shape, batch, ("fp32",))["fp32"]
        if seconds / batch > GROWTH_GAIN * per_sample:
            return min(per_sample, seconds / batch)
        per_sample = seconds / batch
    return per_sample


def time_optimizer() -> float:
    """Seconds per parameter of a fused AdamW step (what `mmkit train` uses on a CPU)."""
    param = nn.Parameter(torch.zeros(OPTIMIZER_PROBE_PARAMS))
    param.grad = torch.full_like(param, 1e-3)
    try:
        optimizer = torch.optim.AdamW([param], lr=1e-4, fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW([param], lr=1e-4)
    optimizer.step()  # creates the state
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / OPTIMIZER_PROBE_PARAMS


def probe_batch(shape: LayerShape) -> int:
    return max(1, round(PROBE_FLOPS / max(shape.flops_per_call, 1)))


class _Cache:
    """{machine: {layer key @ batch: seconds}} in one JSON file; unreadable → empty, write best-effort."""

    def __init__(self, path: Path, machine: str) -> None:
        self.path, self.machine = path, machine
        try:
            self.document = json.loads(path.read_text())
            if not isinstance(self.document, dict):
                self.document = {}
        except (OSError, ValueError):
            self.document = {}
        self.dirty = False

    @property
    def entries(self) -> dict[str, Any]:
        machine = self.document.setdefault(self.machine, {})
        return machine if isinstance(machine, dict) else {}

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        entries = self.entries
        entries[key] = value
        self.document[self.machine] = entries
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:  # a cache, not a record: a failed write costs a re-measurement, nothing else
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.document, indent=1, sort_keys=True)
        except OSError:
            pass


def probe_cpu(entry: ModelEntry, config: ModelConfig, *, timer: Timer | None = None) -> CpuProbe:
    """Time the model's dominant layer shapes on this CPU (cached); see the module docstring."""
    from mmkit.settings import MmkitSettings

    timer = timer or time_layer

    settings = MmkitSettings()
    machine = machine_key()
    cache = _Cache(settings.cache_path / CACHE_FILE, machine)
    shapes, forward_flops = layer_shapes(entry, config)
    timed, all_cached = [], True
    slower: float | None = None  # bf16 time / fp32 time of the first shape, when over BF16_SLOWER
    bf16_timed = 0
    for shape in dominant(shapes):
        batch = probe_batch(shape)
        key = f"{shape.key}#b{batch}"
        entry = cache.get(key)
        if not (isinstance(entry, dict) and {"fp32", "bf16", "fp32_per_sample"} <= set(entry)):
            if slower is None:
                seconds = timer(shape, batch, ("fp32", "bf16"))
            else:  # bf16 lost by far on the dominant shape: the others are timed in fp32 and taken at its ratio
                fp32 = timer(shape, batch, ("fp32",))["fp32"]
                seconds = {"fp32": fp32, "bf16": fp32 * slower, "bf16_at_ratio": slower}
            entry = {**seconds, "fp32_per_sample": fp32_per_sample(shape, batch, seconds["fp32"], timer)}
            all_cached = False
            cache.put(key, entry)
        if not timed and entry["bf16"] > BF16_SLOWER * entry["fp32"]:
            slower = entry["bf16"] / entry["fp32"]
        bf16_timed += "bf16_at_ratio" not in entry
        timed.append(LayerTiming(shape, batch, {k: float(entry[k]) for k in ("fp32", "bf16")},
                                 float(entry["fp32_per_sample"])))
    optimizer = cache.get("optimizer.adamw")
    if not isinstance(optimizer, float):
        optimizer, all_cached = time_optimizer(), False
        cache.put("optimizer.adamw", optimizer)
    cache.save()
    covered = sum(t.layer.flops_per_call * t.layer.calls for t in timed)
    return CpuProbe(
        machine=machine, timings=timed, coverage=min(covered / forward_flops, 1.0) if forward_flops else 1.0,
        cached=all_cached, pinned_speedup=settings.cpu_bf16_speedup, optimizer_seconds_per_param=optimizer,
        bf16_shapes_timed=bf16_timed if bf16_timed < len(timed) else None,
    )


@dataclass(frozen=True)
class StepTimePrediction:
    """A training step's time on this CPU from the probe (see the module docstring for what it omits)."""

    step_seconds: float
    forward_seconds_per_sample: float  # for the validation pass
    source: str = "predicted from the model's layers timed on this CPU"
    parts: dict[str, float] = field(default_factory=dict)


def predict_cpu_step(probe: CpuProbe, precision: str, batch_size: int, params: int,
                     forward_share: float) -> StepTimePrediction:
    """`forward_share`: forward FLOPs / training FLOPs (about 1/3), for the validation pass."""
    layers = probe.seconds_per_sample(precision) * batch_size
    optimizer = probe.optimizer_seconds_per_param * params
    return StepTimePrediction(
        step_seconds=layers + optimizer,
        forward_seconds_per_sample=probe.seconds_per_sample(precision) * forward_share,
        parts={"layers": layers, "optimizer": optimizer},
    )

