"""Live-tensor memory tracking by storage, on fake or real tensors.

`LiveStorageTracker` is a `TorchDispatchMode` that sees every op's outputs, adds the bytes of each
new storage and subtracts them when the storage is freed (a weakref callback), so the running
total is the live tensor memory at every moment and the peak is exact. Each storage carries a
category, and the categories at the moment of the peak are kept:

- weights      parameters and buffers
- gradients    `.grad` of parameters (reclassified by a post-accumulate-grad hook)
- optimizer    persistent optimizer state (exp_avg, exp_avg_sq, momentum buffers, step)
- activations  what the forward pass allocates (kept for backward, or alive at the peak)
- other        the batch, backward temporaries (gradients of activations, recomputed
               activations under checkpointing, FSDP's reduce-scatter input), the optimizer
               step's transient buffers, and autocast's low-precision copies of the weights
- all_gather   FSDP only: the all-gather buffers and the unsharded weights they fill (FSDP
               frees and re-allocates these with `UntypedStorage.resize_`, which is followed)

A sharded (DTensor) tensor counts the storage of its local shard. Under FSDP the gradients are
the sharded ones that the reduce-scatter leaves on each rank (`fsdp_gradients_tracked`).

`memtracker_peak` runs the same step under torch's own `MemTracker`
(`torch.distributed._tools.mem_tracker`, a private API) for cross-checking: both give the same
peak to the byte on every registered model (see the tests). mmkit uses its own tracker by default
because it is several times faster under fake tensors.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other", "all_gather")
PHASE_CATEGORY = {"forward": "activations", "backward": "other", "optimizer": "other", "setup": "other"}
STEP_PHASES = ("forward", "backward", "optimizer")  # a training step's phases (setup is not one)
PRIM_DEVICE = torch.ops.prim.device.default  # a tensor's device query, most of a simulated step's dispatches

# The CUDA caching allocator hands out blocks in multiples of 512 bytes; tracking for a GPU target
# rounds each storage up the same way so that small tensors are not undercounted.
CUDA_ALLOCATION_GRANULE = 512


@dataclass
class _StorageInfo:
    nbytes: int
    category: str


@dataclass(frozen=True)
class PeakSnapshot:
    peak_bytes: int
    by_category: dict[str, int]
    phase: str  # where the peak happened: forward, backward, optimizer


@dataclass(frozen=True)
class PhaseRecord:
    """What one phase of a step did on the tracker, as offsets from the live state it started from:
    the total and each category after every growth, the operators dispatched and their costs.

    A training step's optimizer phase (clipping, the optimizer's step, zero_grad) touches only
    parameters, gradients and optimizer state, so at another batch size it allocates and frees the
    same storages in the same order: `LiveStorageTracker.replay` repeats it from any live state."""

    moments: tuple[tuple[int, tuple[int, ...]], ...]  # (total offset, offsets in CATEGORIES order)
    ops: int
    costs: dict[tuple[str, str, int, int], int]


def _storages(tensors: Iterable[object]) -> list[torch.UntypedStorage]:
    """The storages holding `tensors`' data: a wrapper subclass (DTensor) by its inner tensors."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t):
            inner, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
            out += _storages(getattr(t, name) for name in inner)
        elif isinstance(t, torch.Tensor) and t.layout == torch.strided:
            out.append(t.untyped_storage())
    return out


# The CPU's attention kernels, missing from torch's FLOP registry (which lists the CUDA ones)
_CPU_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu": "forward",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "backward",
}


def flop_formula(func: torch._ops.OpOverload) -> Callable[..., int] | None:
    """How to count one call's FLOPs (torch's FLOP registry, the CPU's attention), or None: no FLOPs."""
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    formula = flop_registry.get(func.overloadpacket)
    if formula is not None:
        return lambda args, kwargs, out: int(formula(*args, **kwargs, out_val=out))
    kind = _CPU_ATTENTION.get(func.overloadpacket.__name__)
    if kind == "forward":
        return lambda args, kwargs, out: int(sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))
    if kind == "backward":
        return lambda args, kwargs, out: int(sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape,
                                                                      args[3].shape))
    return None


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs as `torch.utils.flop_counter.FlopCounterMode` does (its FLOP registry; the CPU's
    attention kernels, which it lacks, besides) without its per-module breakdown, whose module hooks
    cost a quarter of a counted pass."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._formulas: dict[torch._ops.OpOverload, Callable[..., int] | None] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func not in self._formulas:
            self._formulas[func] = flop_formula(func)
        formula = self._formulas[func]
        if formula is None and func.namespace != "prim":  # as FlopCounterMode: count what it decomposes to
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += formula(args, kwargs, out)
        return out


def _tensors(values: Iterable[object]) -> Iterator[torch.Tensor]:
    """The tensors among an operator's arguments or outputs (lists of tensors included)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


# Matrix products and the positions of their two matrix operands. A product is recorded with the layout
# of those operands, `mm:nt` for `x @ w.t()` (n: row-major, t: transposed): kernels for one layout can
# be many times slower than for another (bf16 on a CPU without bf16 instructions, say)
MATMUL_OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}


def split_layout(op: str) -> tuple[str, str]:
    """A recorded operator's name as (operator, layout): `mm:nt` → (`mm`, `nt`); others' layout is ""."""
    base, _, layout = op.partition(":")
    return base, layout


def matmul_layout(a: torch.Tensor, b: torch.Tensor) -> str:
    """`nn`, `nt`, `tn` or `tt`: whether each operand of a matrix product is stored transposed."""
    return "".join("t" if t.dim() >= 2 and t.stride(-2) == 1 and t.stride(-1) != 1 else "n" for t in (a, b))


class OpCosts:
    """What each operator of a step costs a device: its FLOPs and the bytes it reads and writes.

    Metadata queries (`prim::device`) are not operators a device runs and are left out. Calls are
    grouped by (operator, dtype, FLOPs, bytes) with a count, so a step of many repeated layers
    stays small; a matrix product's name carries its operands' layout (`mm:nt`, MATMUL_OPERANDS). A
    view moves no bytes; every other operator is taken to read its tensor inputs and write its
    outputs once (what a roofline model of the step needs).
    """

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str, int, int], int] = {}
        self._ops: dict[torch._ops.OpOverload, tuple[str, bool, Callable[..., int] | None]] = {}

    def record(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object) -> str:
        """One call of `func` (not a `prim` metadata query: the tracker leaves those out); returns the
        name it is recorded under."""
        known = self._ops.get(func)
        if known is None:
            known = self._ops[func] = (func.overloadpacket.__name__, func.is_view, flop_formula(func))
        name, is_view, formula = known
        inputs = [*_tensors(args), *_tensors(kwargs.values())]
        outputs = list(_tensors(out if isinstance(out, (list, tuple)) else (out,)))
        if not is_view and not name.endswith("_") and outputs and inputs:  # an alias (`_unsafe_view`) moves nothing
            sources = {id(t.untyped_storage()) for t in inputs if t.layout == torch.strided}
            is_view = all(t.layout == torch.strided and id(t.untyped_storage()) in sources for t in outputs)
        tensors = [*inputs, *outputs]
        moved = 0 if is_view else sum(t.numel() * t.element_size() for t in tensors)
        operands = MATMUL_OPERANDS.get(name)
        if operands is not None and len(args) > operands[1] and all(isinstance(args[i], torch.Tensor) for i in operands):
            name = f"{name}:{matmul_layout(args[operands[0]], args[operands[1]])}"
        dtype = next((t.dtype for t in tensors if t.dtype.is_floating_point), None)
        key = (name, str(dtype).removeprefix("torch.") if dtype is not None else "other",
               formula(args, kwargs, out) if formula is not None else 0, moved)
        self.calls[key] = self.calls.get(key, 0) + 1
        return name

    def as_list(self) -> list[list]:
        """[[operator, dtype, flops, bytes, calls], ...], largest FLOPs·calls first (JSON-friendly)."""
        return sorted(([*key, n] for key, n in self.calls.items()),
                      key=lambda r: (-r[2] * r[4], -r[3] * r[4], r[0], r[1], r[2], r[3]))


class LiveStorageTracker(TorchDispatchMode):
    """Tracks the live bytes of every tensor storage and the category breakdown at the peak."""

    def __init__(self, granule: int = 1, record_costs: bool = False) -> None:
        super().__init__()
        self.granule = granule
        self.phase = "setup"
        self._info: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = PeakSnapshot(0, dict.fromkeys(CATEGORIES, 0), "setup")
        self.phase_peaks: dict[str, int] = {}  # the peak reached within each phase
        # the live total after each growth within the step's phases, in order: the same model at
        # another batch size grows in the same sequence, each value affine in the batch size
        self.highs: list[int] = []
        self.ops = 0  # operators dispatched: each is at least one kernel launch on a GPU
        self._weight_storages: set[int] = set()
        self.costs: OpCosts | None = OpCosts() if record_costs else None
        self._recording: tuple[int, dict[str, int], int, dict] | None = None  # start_recording's snapshot
        self._moments: list[tuple[int, tuple[int, ...]]] = []

    # -- bookkeeping ------------------------------------------------------------------------
    def _rounded(self, nbytes: int) -> int:
        g = self.granule
        return nbytes if g <= 1 else -(-nbytes // g) * g

    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        info = self._info.get(storage)
        if info is not None:
            return
        nbytes = self._rounded(storage.nbytes())
        info = _StorageInfo(nbytes, category)
        self._info[storage] = info
        key = id(info)

        def _freed(_: weakref.ref, info: _StorageInfo = info, key: int = key) -> None:
            self.current[info.category] -= info.nbytes
            self.total -= info.nbytes
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, _freed)
        self.current[category] += nbytes
        self.total += nbytes
        self._note_peak()

    def _note_peak(self) -> None:
        """After the live total grew: the phase's and the step's peaks, with the categories at the peak."""
        if self.phase in STEP_PHASES:
            self.highs.append(self.total)
        if self._recording is not None:
            total, current, _, _ = self._recording
            self._moments.append((self.total - total, tuple(self.current[c] - current[c] for c in CATEGORIES)))
        if self.total > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.total
        if self.total > self.peak.peak_bytes:
            self.peak = PeakSnapshot(self.total, dict(self.current), self.phase)

    def _resized(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """`storage.resize_` to `nbytes`: FSDP frees an unsharded weight (0) and re-allocates it."""
        info = self._info.get(storage)
        if info is None:
            if nbytes:
                self._add(storage, "all_gather")
            return
        if info.nbytes == 0 and nbytes:  # an unsharded weight, allocated again for its all-gather
            info.category = "all_gather"
        delta = self._rounded(nbytes) - info.nbytes
        info.nbytes += delta
        self.current[info.category] += delta
        self.total += delta
        self._note_peak()

    def __enter__(self) -> LiveStorageTracker:
        tracker, resize = self, torch.UntypedStorage.resize_
        self._resize = resize

        def tracked_resize(storage: torch.UntypedStorage, size: int) -> torch.UntypedStorage:
            out = resize(storage, size)
            tracker._resized(storage, int(size))
            return out

        torch.UntypedStorage.resize_ = tracked_resize  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*exc)

    def _reclassify(self, storage: torch.UntypedStorage, category: str) -> None:
        info = self._info.get(storage)
        if info is None:
            self._add(storage, category)
            return
        if info.category != category:
            self.current[info.category] -= info.nbytes
            self.current[category] += info.nbytes
            info.category = category

    def track(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Register tensors that exist already (weights, optimizer state, the batch)."""
        for storage in _storages(tensors):
            self._reclassify(storage, category)
            if category == "weights":
                self._weight_storages.add(id(self._info[storage]))

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.total)

    # -- a phase recorded and repeated -----------------------------------------------------------
    def start_recording(self) -> None:
        """From here to `stop_recording`, keep what the phase does as offsets from the present state."""
        calls = dict(self.costs.calls) if self.costs is not None else {}
        self._recording, self._moments = (self.total, dict(self.current), self.ops, calls), []

    def stop_recording(self) -> PhaseRecord:
        """What the phase did since `start_recording`."""
        assert self._recording is not None, "stop_recording without start_recording"
        _, _, ops, calls = self._recording
        now = self.costs.calls if self.costs is not None else {}
        costs = {key: n - calls.get(key, 0) for key, n in now.items() if n != calls.get(key, 0)}
        record = PhaseRecord(tuple(self._moments), self.ops - ops, costs)
        self._recording, self._moments = None, []
        return record

    def left_as_found(self, but: str) -> bool:
        """Since `start_recording`: is every category where it was, except `but`, now freed entirely?"""
        assert self._recording is not None
        _, current, _, _ = self._recording
        return self.current[but] == 0 and all(self.current[c] == current[c] for c in CATEGORIES if c != but)

    def replay(self, record: PhaseRecord) -> None:
        """Repeat a recorded phase from the present live state, as its operators would have run it:
        each growth at the same offsets (peaks and `highs` as they note them), the operators and
        their costs counted. The phase's own storages are not made: the live state is left as it is."""
        total, current = self.total, self.current
        collecting = gc.isenabled()
        gc.disable()  # no storage freed meanwhile: its callback would change figures that are put back after
        try:
            for offset, offsets in record.moments:
                self.total = total + offset
                self.current = {c: current[c] + d for c, d in zip(CATEGORIES, offsets, strict=True)}
                self._note_peak()
        finally:
            self.total, self.current = total, current
            if collecting:
                gc.enable()
        self.ops += record.ops
        if self.costs is not None:
            for key, n in record.costs.items():
                self.costs.calls[key] = self.costs.calls.get(key, 0) + n

    # -- dispatch -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is PRIM_DEVICE and isinstance(args[0], FakeTensor) and not args[0].fake_mode.in_kernel_invocation:
            # most of a simulated step's dispatches (autograd and the multi-tensor kernels ask every
            # tensor's device): answered as the fake mode answers them, without dispatching again
            self.ops += 1
            return args[0].fake_device
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func.namespace == "prim":  # a metadata query (prim::device, most of a step's dispatches): no storage
            return out
        if self.costs is not None:
            self.costs.record(func, args, kwargs or {}, out)
        category = PHASE_CATEGORY.get(self.phase, "other")
        if func.namespace == "fsdp" and func is not torch.ops.fsdp.chunk_cat.default:
            # FSDP's all-gather copy-in returns views of the all-gather buffer it fills
            flat, _ = tree_flatten(out)
            for storage in _storages(flat):
                self._reclassify(storage, "all_gather")
            return out
        if func.is_view:
            # a view allocates nothing; a storage first seen here was allocated where no op is
            # dispatched (a collective backend's own staging buffer), outside what is counted
            flat, _ = tree_flatten(out)
            for storage in _storages(flat):
                if self._info.get(storage) is None:
                    return out
        if category == "activations" and func is torch.ops.aten._to_copy.default:
            # autocast's low-precision copy of a weight is not an activation
            source = args[0] if args else None
            if isinstance(source, torch.Tensor):
                info = self._info.get(source.untyped_storage())
                if info is not None and id(info) in self._weight_storages:
                    category = "other"
        flat, _ = tree_flatten(out)
        for storage in _storages(flat):
            self._add(storage, category)
        return out


def track_model_state(
    tracker: LiveStorageTracker, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register weights and optimizer state; reclassify gradients as they are accumulated."""
    tracker.track(model.parameters(), "weights")
    tracker.track(model.buffers(), "weights")
    if optimizer is not None:
        track_optimizer_state(tracker, optimizer)
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            handles.append(
                p.register_post_accumulate_grad_hook(
                    lambda param: tracker.track([param.grad], "gradients")
                )
            )
    return handles


def track_optimizer_state(tracker: LiveStorageTracker, optimizer: torch.optim.Optimizer) -> None:
    state_tensors = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    tracker.track(state_tensors, "optimizer")


@contextlib.contextmanager
def fsdp_gradients_tracked(tracker: LiveStorageTracker) -> Iterator[None]:
    """Under FSDP, classify each rank's sharded gradients as `gradients` as soon as the
    reduce-scatter leaves them (autograd accumulates only into the unsharded weights, whose
    gradients FSDP consumes). Follows FSDP2's internal `foreach_reduce`; without it (another torch)
    the sharded gradients are counted in `other`: the total is the same."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module
    except ImportError:
        yield
        return
    reduce = getattr(group_module, "foreach_reduce", None)
    if reduce is None:
        yield
        return

    def tracked_reduce(fsdp_params: list[Any], *args: Any, **kwargs: Any) -> Any:
        out = reduce(fsdp_params, *args, **kwargs)
        tracker.track([p.sharded_param.grad for p in fsdp_params if p.sharded_param.grad is not None], "gradients")
        return out

    group_module.foreach_reduce = tracked_reduce
    try:
        yield
    finally:
        group_module.foreach_reduce = reduce
