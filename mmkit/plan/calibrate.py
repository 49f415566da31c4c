"""`mmkit calibrate`: a few seconds of micro-benchmarks on the local device, written as a GPU preset.

Measured (medians of repeated calls, after a warm-up; CUDA synchronised around each call) in three
rounds one after the other, each figure the median of its rounds (a burst of other work on a shared
machine slows one round, not the result), each as training runs it:
- matmul throughput per precision: a Linear layer's forward and backward (autocast for bf16/fp16)
  at five shapes (the FLOPs of one call decide which measured shape the time model interpolates
  from), all of it and per layout of the operands (the forward's `x @ w.t()`, the input gradient's
  `g @ w`, the weight gradient's `g.t() @ x`: a CPU without bf16 instructions runs one of them
  ten times slower than the others), and the same for a Conv1d at four shapes (convolutions have
  their own kernels); on a device where a shape is slow, larger ones are not measured;
- bandwidth, in the bytes the time model counts (inputs read, outputs written): of simple operators
  (add, mul, copies) together, of casts, GELU, layer norm, softmax, batch norm, dropout's random mask
  and their backward each on its own, of matmuls that stream a weight through a few rows (a small
  batch through a wide layer), and of AdamW's step;
- the cost of one eager operator, and of a step besides its operators: mmkit's own training step of
  two models whose kernels are tiny, 2 and 12 layers deep (the slope and the intercept).

The preset (`local` unless named) copies the base preset's memory figures (the CPU preset, or the
GPU's own when there is one) and adds a `[calibration]` table; `--gpu local` then predicts step
times from the measured figures (mmkit.plan.timemodel) and says so.
"""

from __future__ import annotations

import datetime
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmkit.errors import MmkitError
from mmkit.plan.tracker import OpCosts, split_layout
from mmkit.settings import Calibration, GpuPreset
from mmkit.train.step import AMP_DTYPES, build_optimizer, training_step

LINEAR_SHAPES = ((32, 64, 64), (128, 128, 128), (512, 256, 256), (1024, 512, 512), (2048, 1024, 1024))  # rows, in, out
CONV_SHAPES = ((4, 32, 128, 3), (8, 64, 256, 3), (16, 128, 256, 3), (16, 256, 512, 3))  # batch, channels, length, kernel
ELEMENTWISE_ELEMENTS = 1 << 22
OPTIMIZER_PARAMS = 1 << 22
ROUNDS = 3  # every figure is measured once per round, the rounds one after the other; the median is kept
MIN_SECONDS = 0.07  # per measured figure and round
SLOW_CALL_SECONDS = 0.05  # a layer's forward + backward this slow ends its precision's table (see _rate_tables)
MAX_CALLS = 400


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def median_seconds(fn: Callable[[], object]) -> float:
        fn()
        sync()
        times: list[float] = []
        while sum(times) < MIN_SECONDS and len(times) < MAX_CALLS:
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_seconds


def _autocast(device: torch.device, precision: str) -> Any:
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(precision), enabled=precision in AMP_DTYPES)


Layers = list[tuple[nn.Module, torch.Tensor]]  # layers of one size (FLOPs per call), each with its input


def _forward_backward_rates(device: torch.device, precision: str, layers: Layers) -> tuple[dict[str, float], float]:
    """FLOP/s of the layers' forward + backward (input and weight gradients: 3 × the forward's FLOPs):
    the FLOPs of their matmuls or convolutions over the time of those operators alone, timed one by
    one, as the time model charges them (autocast's casts and each operator's dispatch are charged
    apart, at their bandwidth and the per-operator cost). Keyed "" for all of them, and by the layout
    of matrix products' operands (`nt`: the forward, `nn`: the input gradient, `tn`: the weight
    gradient); with the seconds of the first forward + backward of them all."""
    def step() -> None:
        for layer, x in layers:
            with _autocast(device, precision):
                y = layer(x)
            y.backward(torch.ones_like(y))

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    if first < SLOW_CALL_SECONDS:  # a second warm-up where it is cheap
        step()
    recording = _recorded(device, step, MIN_SECONDS)
    return recording.rates(2, lambda name: {"", split_layout(name)[1]}), first


Table = list[tuple[float, float]]  # (FLOPs of one call, TFLOP/s), by size


def _rate_tables(device: torch.device, precisions: tuple[str, ...],
                 cases: list[tuple[float, Callable[[], Layers]]]) -> tuple[dict[str, Table], dict[str, Table]]:
    """(FLOPs of one forward call, TFLOP/s) per precision, and per "PRECISION LAYOUT" for matrix
    products, over `cases` (FLOPs, a builder of layers of that size and their inputs) from small to
    large; a size's rate is its layers' FLOPs over their time, as if a model ran each once. A
    precision stops growing after a forward + backward that took SLOW_CALL_SECONDS: its rate has
    levelled off, and larger calls on such a slow device would take calibrate minutes."""
    out: dict[str, Table] = {}
    layouts: dict[str, Table] = {}
    for precision in precisions:
        for flops, build in cases:
            rates, seconds = _forward_backward_rates(device, precision, build())
            out.setdefault(precision, []).append((flops, rates.pop("") / 1e12))
            for layout, rate in rates.items():
                layouts.setdefault(f"{precision} {layout}", []).append((flops, rate / 1e12))
            if seconds >= SLOW_CALL_SECONDS:
                break
    return out, layouts


def matmul_rates(device: torch.device, precisions: tuple[str, ...]) -> tuple[dict[str, Table], dict[str, Table]]:
    """(FLOPs of one matmul, TFLOP/s) per precision, and per precision and layout of the operands:
    Linear layers' forward and backward as training runs them (autocast for bf16/fp16, transposed
    operands in backward), at each size of LINEAR_SHAPES three of them: the square one and the pair
    a transformer's MLP has at the same FLOPs (in → 4 × in, then back). Where a kernel's speed
    depends on the operands' aspect at equal FLOPs (bf16 `g @ w` on a CPU without bf16
    instructions: twice as fast for a narrow `w`), a size's rate is that of the three together."""
    def case(m: int, k: int, n: int) -> tuple[float, Callable[[], Layers]]:
        shapes = ((k, n), (k // 2, 2 * n), (2 * k, n // 2))  # all 2·m·k·n FLOPs
        return 2.0 * m * k * n, lambda: [(nn.Linear(a, b, bias=False).to(device),
                                          torch.randn(m, a, device=device, requires_grad=True)) for a, b in shapes]

    return _rate_tables(device, precisions, [case(*shape) for shape in LINEAR_SHAPES])


def conv_rates(device: torch.device, precisions: tuple[str, ...]) -> dict[str, Table]:
    """(FLOPs of one convolution's forward, TFLOP/s) per precision: a Conv1d's forward and backward."""
    def case(batch: int, channels: int, length: int, kernel: int) -> tuple[float, Callable[[], Layers]]:
        return 2.0 * batch * channels * channels * kernel * length, lambda: [(
            nn.Conv1d(channels, channels, kernel, padding=kernel // 2).to(device),
            torch.randn(batch, channels, length, device=device, requires_grad=True))]

    return _rate_tables(device, precisions, [case(*shape) for shape in CONV_SHAPES])[0]


GENERIC_OPS = {"add", "mul", "copy_", "clone", "add_", "mul_", "sum", "fill_", "zeros_like", "ones_like"}


class _Recording(TorchDispatchMode):
    """Each operator dispatched inside it: its costs as the time model counts them (`costs`) and the
    seconds it took, by operator (metadata queries, which OpCosts leaves out, are not timed)."""

    def __init__(self, costs: OpCosts, device: torch.device | None = None) -> None:
        super().__init__()
        self.costs, self.device = costs, device
        self.seconds: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if func.namespace != "prim":
            elapsed = time.perf_counter() - start
            name = self.costs.record(func, args, kwargs or {}, out)
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        return out

    def rates(self, column: int, keys: Callable[[str], Iterable[str]]) -> dict[str, float]:
        """A column of the recorded costs (2: FLOPs, 3: bytes) per second of the operators that have
        any, summed over the operators `keys(name)` puts under each key (none: left out)."""
        amounts: dict[str, float] = {}  # operator → amount over its calls
        for row in self.costs.as_list():
            amounts[row[0]] = amounts.get(row[0], 0) + row[column] * row[4]
        totals: dict[str, list[float]] = {}  # key → [amount, seconds]
        for name, amount in amounts.items():
            if amount:
                for key in keys(name):
                    total = totals.setdefault(key, [0.0, 0.0])
                    total[0] += amount
                    total[1] += self.seconds[name]
        return {key: amount / seconds for key, (amount, seconds) in totals.items() if seconds > 0}


def _recorded(device: torch.device, step: Callable[[], None], seconds: float) -> _Recording:
    """`step` run again and again for `seconds` (at most MAX_CALLS times), recorded operator by operator."""
    recording = _Recording(OpCosts(), device)
    start, calls = time.perf_counter(), 0
    with recording:
        while time.perf_counter() - start < seconds and calls < MAX_CALLS:
            step()
            calls += 1
    return recording


def elementwise_rates(device: torch.device) -> tuple[float, dict[str, float]]:
    """Bandwidth in the bytes the time model counts (inputs read + outputs written): of simple
    operators (add, mul, casts, copies) together, and of each heavier one on its own (GELU, layer
    norm, softmax and their backward; batch norm and dropout's random mask in a second chain), timed
    operator by operator inside small forward + backward passes."""
    x = torch.randn(ELEMENTWISE_ELEMENTS // 256, 256, device=device, requires_grad=True)
    norm = nn.LayerNorm(256).to(device)
    batch_norm = nn.BatchNorm1d(256).to(device)

    def chain() -> None:
        y = torch.nn.functional.gelu(x * 1.5 + x)
        y = norm(y.to(torch.bfloat16).float()).softmax(-1)
        y.backward(torch.ones_like(y))

    def regularizers() -> None:
        y = torch.nn.functional.dropout(batch_norm(x), 0.1, training=True)
        y.backward(torch.ones_like(y))

    def step() -> None:
        chain()
        regularizers()

    start = time.perf_counter()
    while time.perf_counter() - start < 8 * MIN_SECONDS:  # warm-up: the heap grows to the working set once
        step()
    recording = _recorded(device, step, 6 * MIN_SECONDS)
    simple = recording.rates(3, lambda name: {"simple"} if name in GENERIC_OPS else set())["simple"] / 1e9
    heavy = recording.rates(3, lambda name: set() if name in GENERIC_OPS else {name})
    return simple, {name: rate / 1e9 for name, rate in heavy.items()}


THIN_LINEAR = (4, 1024, 1024)  # rows, in, out: a small batch through a wide layer reads its weights, little else


def thin_matmul_gb_s(device: torch.device) -> dict[str, float]:
    """Bandwidth of matmuls that stream a weight through a few rows (a small batch through a wide
    Linear, forward and backward, fp32): `mm` and `addmm` in the bytes the time model counts. A matmul
    is then bound by the slower of its FLOPs at the measured rate and its bytes at this bandwidth."""
    rows, k, n = THIN_LINEAR
    layer = nn.Linear(k, n).to(device)
    x = torch.randn(rows, k, device=device, requires_grad=True)

    def step() -> None:
        layer(x).backward(torch.ones(rows, n, device=device))

    for _ in range(3):
        step()
    recording = _recorded(device, step, MIN_SECONDS)
    by_operator = recording.rates(3, lambda name: {split_layout(name)[0]} & {"mm", "addmm"})  # whatever the layout
    return {op: rate / 1e9 for op, rate in by_operator.items()}


def optimizer_gb_s(device: torch.device) -> float:
    """AdamW's step as training builds it (fused on a CPU), in the bytes the time model counts for it."""
    layer = nn.Linear(OPTIMIZER_PARAMS // 1024, 1024, bias=False).to(device)
    layer.weight.grad = torch.randn_like(layer.weight)
    optimizer = build_optimizer(layer, "adamw", 1e-3, 0.01)
    optimizer.step()
    seconds = _timer(device)(optimizer.step)
    return 4 * layer.weight.numel() * 4 / seconds / 1e9  # parameters, gradients and two moments


class _TinyModel(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16))],
                                 nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def step_costs(device: torch.device) -> tuple[float, float]:
    """(seconds per operator, seconds per step besides its operators): mmkit's own training step
    (forward, loss, backward, clipping, AdamW as training builds it) of two models whose kernels are
    tiny, 2 and 12 layers deep; the slope over the operators they dispatch, and the rest."""
    points = []
    for depth in (2, 12):
        torch.manual_seed(0)
        model = _TinyModel(depth).to(device)
        optimizer = build_optimizer(model, "adamw", 1e-3, 0.01)
        inputs, labels = {"x": torch.randn(4, 16, device=device)}, torch.arange(4, device=device) % 4

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            training_step(model, optimizer, inputs, labels, grad_clip=1.0)

        step()  # creates the optimizer state
        recording = _Recording(OpCosts())
        with recording:
            step()
        points.append((sum(calls for *_, calls in recording.costs.as_list()), _timer(device)(step)))
    (ops1, t1), (ops2, t2) = points
    per_op = max((t2 - t1) / (ops2 - ops1), 0.0)
    return per_op, max(t1 - per_op * ops1, 0.0)


def _steady_allocator(device: torch.device) -> None:
    """Bring the allocator to the state of a process that has trained for a while: glibc raises its
    mmap threshold (up to 32 MiB) each time a block above it is freed, after which tensors below it
    come from the heap without page faults. A fresh process would measure slower operators than the
    training step they predict."""
    if device.type == "cpu":
        for size in (1 << 22, 1 << 23, 1 << 24, 1 << 25):
            torch.empty(size // 4).fill_(0)


def _medians(rounds: list[Any]) -> Any:
    """The rounds' figures, each the median of its measurements (the structure of one round; a
    table's rows keep their FLOPs, an operator measured in some rounds only is kept from those).
    Other work on the machine slows the rounds it overlaps, not the median of three."""
    first = rounds[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for r in rounds for k in r)
        return {k: _medians([r[k] for r in rounds if k in r]) for k in keys}
    if isinstance(first, list):  # [(FLOPs per call, rate), ...]: a size measured in some rounds only, from those
        sizes = sorted({row[0] for r in rounds for row in r})
        return [(size, statistics.median(row[1] for r in rounds for row in r if row[0] == size)) for size in sizes]
    return statistics.median(rounds)


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MmkitError("calibrate --device cuda: no CUDA device is available here")
    return dev


def measure_round(device: str, base: GpuPreset) -> dict[str, Any]:
    """One round of every figure a calibration holds (the fields of `Calibration` but its source)."""
    dev = _device(device)
    precisions = tuple(p for p in base.precisions if p != "fp16" or dev.type == "cuda")
    _steady_allocator(dev)
    simple, heavy = elementwise_rates(dev)
    per_op, per_step = step_costs(dev)
    optimizer_op = "_fused_adamw_" if dev.type == "cpu" else "_foreach_adamw"
    matmul, matmul_layouts = matmul_rates(dev, precisions)
    return {
        "matmul_tflops": matmul, "matmul_layout_tflops": matmul_layouts, "conv_tflops": conv_rates(dev, precisions),
        "bandwidth_gb_s": simple, "op_gb_s": heavy | thin_matmul_gb_s(dev) | {optimizer_op: optimizer_gb_s(dev)},
        "seconds_per_op": per_op, "seconds_per_step": per_step,
    }


def calibrated(device: str, base: GpuPreset, name: str, rounds: list[dict[str, Any]]) -> GpuPreset:
    """`base` renamed `name`, with the calibration the median of `rounds` (`measure_round`'s)."""
    dev = _device(device)
    what = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    calibration = Calibration(
        source=f"mmkit calibrate on {what}, torch {torch.__version__}, {datetime.date.today().isoformat()}",
        **_medians(rounds),
    )
    return base.model_copy(update={"name": name, "display_name": f"{base.display_name}, calibrated here",
                                   "calibration": calibration})


def calibrate(device: str, base: GpuPreset, name: str) -> GpuPreset:
    """Measure `device` (ROUNDS rounds) and return `base` renamed `name` with the measured calibration."""
    return calibrated(device, base, name, [measure_round(device, base) for _ in range(ROUNDS)])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else a quoted one ("bf16 nn")."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def preset_toml(preset: GpuPreset) -> str:
    """The preset as a TOML file the preset loader reads back (top-level keys, then tables)."""
    document = preset.model_dump(mode="json", exclude_none=True, exclude={"name"})
    lines = ["# Written by `mmkit calibrate`: the GPU preset's memory figures and the device's measured speed."]
    tables = {k: v for k, v in document.items() if isinstance(v, dict)}
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items() if k not in tables]
    for table, values in tables.items():
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines += ["", f"[{table}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if k not in nested]
        for sub, sub_values in nested.items():
            lines += ["", f"[{table}.{sub}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in sub_values.items()]
    return "\n".join(lines) + "\n"


def write_preset(preset: GpuPreset, folder: Path) -> Path:
    from mmkit.atomic import write_atomic

    path = folder / "gpus" / f"{preset.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, preset_toml(preset))
    return path
