"""Training and inference memory, simulated exactly on fake tensors (no allocation, no GPU).

One real training step — the same `training_step` that `mmkit train` runs: forward under
autocast, loss, scaled backward, clipping, optimizer step, zero_grad — executes under
`FakeTensorMode` while `LiveStorageTracker` follows every storage. The step is a *steady-state*
step: the optimizer state exists before it starts, as it does from the second step of training
on, which is where the peak of a run lies.

A step's optimizer phase (clipping, the optimizer's step, zero_grad) touches only parameters,
gradients and optimizer state: at every batch size it allocates and frees the same storages in the
same order. The first step simulated on a rig records it, and the rig's later steps repeat that
record from their own live state instead of dispatching its operators again (the same peaks,
`highs`, operator counts and costs, to the byte: tests/test_memory.py checks every family).

The simulation runs CPU kernels. For a GPU target it also uses the multi-tensor (foreach)
optimizer kernels that torch picks on CUDA, whose temporaries differ from the fused AdamW kernel
(or SGD's per-parameter loop) that training uses on the CPU, and rounds every storage up to the CUDA allocator's 512-byte granule. What tensors cannot show — the CUDA
context, library workspaces, allocator fragmentation — is added from the GPU preset as separate
labelled lines.

A sharded step (`StepSettings.shards` = N > 1, `--strategy fsdp`) is one rank's step of N: the
fake model is sharded with the same `shard_model` that training uses, over a fake process group of
world size N (torch's `fake` backend: collectives return at once, their buffers are allocated
exactly as the real ones), so the rank's weight, gradient and optimizer shards, its all-gather
buffers and unsharded weights, and the reduce-scatter's input are all on the tracker.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mmkit.errors import MmkitError
from mmkit.models.registry import ModelConfig, ModelEntry, MultimodalModel, build_model
from mmkit.cache import cached, lookup, model_key, store
from mmkit.plan.tracker import (
    CATEGORIES,
    CUDA_ALLOCATION_GRANULE,
    STEP_PHASES,
    LiveStorageTracker,
    PhaseRecord,
    fsdp_gradients_tracked,
    track_model_state,
    track_optimizer_state,
)
from mmkit.train.sharding import shard_model
from mmkit.train.step import AMP_DTYPES, build_grad_scaler, build_optimizer, training_step

PLAN_LR = 1e-3  # any positive value: memory does not depend on it
PLAN_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class StepMemory:
    """Live tensor bytes by category at the peak of one training step."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    other: int
    all_gather: int  # FSDP: all-gather buffers and unsharded weights (0 otherwise)
    peak_tensors: int
    peak_phase: str  # forward, backward or optimizer
    phase_peaks: dict[str, int] = field(default_factory=dict)  # the peak within each phase
    ops: int = 0  # operators dispatched in the step
    highs: list[int] = field(default_factory=list, repr=False)  # live total after each growth (tracker.highs)
    # what each operator costs a device, grouped: [[operator, dtype, flops, bytes, calls], ...] (OpCosts)
    costs: list[list] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in CATEGORIES} | {"peak_tensors": self.peak_tensors}


@dataclass(frozen=True)
class StepSettings:
    """What a simulated (or measured) step depends on besides the model config."""

    batch_size: int
    precision: str = "fp32"
    optimizer: str = "adamw"
    gpu_target: bool = False  # CUDA-like optimizer kernels and allocation granule
    grad_clip: float | None = 1.0
    contrastive_weight: float = 0.5  # clip/fusion train with a contrastive term
    shards: int = 1  # FSDP: one rank's step of this many (1: the whole model on one device)
    fsdp_wrap: tuple[str, ...] | None = None  # FSDP's units (`--set fsdp.wrap`; None: the model's blocks)

    @property
    def clip_foreach(self) -> bool | None:
        """Clipping's kernels in the simulated step: the multi-tensor ones torch picks for a real CPU or
        CUDA step's plain tensors (it sends fake tensors down the per-parameter loop); torch's choice for
        sharded parameters (DTensors), as in a real FSDP step."""
        return True if self.shards == 1 else None


def with_gradient_checkpointing(entry: ModelEntry, config: ModelConfig, enabled: bool) -> ModelConfig:
    if not enabled:
        return config
    if "gradient_checkpointing" not in type(config).model_fields:
        supported = "lfm2, clip, fusion"
        raise MmkitError(f"model {entry.name!r} does not support gradient checkpointing ({supported} do)")
    return config.model_copy(update={"gradient_checkpointing": True})


class _SimulatedGradScaler(torch.amp.GradScaler):
    """GradScaler whose `step` does not read the overflow flag.

    A fake tensor has no value, so the real scaler's `found_inf.item()` cannot run; the memory
    of the step is the same whether or not it would have been skipped.
    """

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is not torch.amp.grad_scaler.OptState.UNSCALED:
            self.unscale_(optimizer)
        optimizer.step(*args, **kwargs)
        state["stage"] = torch.amp.grad_scaler.OptState.STEPPED


def _fake_model(entry: ModelEntry, config: ModelConfig, mode: FakeTensorMode) -> MultimodalModel:
    """Build on the meta device (no init work), then give it fake CPU storage under `mode`.

    Initializers such as `trunc_normal_` read values, which fake tensors do not have; memory does
    not depend on the values.
    """
    with torch.device("meta"):
        model = build_model(entry, config)
    with mode:
        _replace_meta_storage(model)
    return model


def _replace_meta_storage(model: MultimodalModel) -> None:
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")


def _labels(model: MultimodalModel, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch_size, device=device) % model.config.num_classes


def _warm_optimizer_state(model: MultimodalModel, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer state as after the first step (zero gradients, one step)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class FakeTrainingRig:
    """A model, its optimizer (state already created) and scaler on fake tensors.

    Built once per model config, on first need, and reused for every simulated batch size: memory
    does not depend on values, and a steady-state step leaves the rig as it found it. Results are
    looked up in the simulation cache (mmkit.cache) first; a rig whose every answer was
    cached never builds its model.
    """

    def __init__(self, entry: ModelEntry, config: ModelConfig, step: StepSettings) -> None:
        self.entry, self.config, self.step = entry, config, step
        self.granule = CUDA_ALLOCATION_GRANULE if step.gpu_target else 1
        self._built = False
        self.cache_hits = 0  # training steps answered by the simulation cache
        self._inference: dict[int, int] = {}  # inference peaks simulated beside training steps
        # the optimizer phase of the first step simulated here, repeated by the next (see PhaseRecord)
        self._optimizer_phase: PhaseRecord | None = None

    def _build(self) -> None:
        if self._built:
            return
        step = self.step
        self.mode = FakeTensorMode()
        self.model = _fake_model(self.entry, self.config, self.mode)
        if step.shards > 1:
            mesh = fake_device_mesh(step.shards)  # outside the fake mode: the mesh holds real rank tensors
            with self.mode:
                shard_model(self.model, step.fsdp_wrap, mesh=mesh)
        with self.mode:
            self.optimizer = build_optimizer(
                self.model, step.optimizer, PLAN_LR, PLAN_WEIGHT_DECAY,
                foreach=True if step.gpu_target else None,
            )
            _warm_optimizer_state(self.model, self.optimizer)
            self.scaler = _SimulatedGradScaler("cpu") if step.precision == "fp16" else None
            if self.scaler is not None:
                self.scaler.scale(torch.ones(()))  # creates the scale and growth tracker, as step 1 does
        self._built = True

    def cache_key(self, batch_size: int) -> dict[str, Any]:
        """Everything a simulated step of this rig at `batch_size` depends on."""
        settings = {k: v for k, v in dataclasses.asdict(self.step).items() if k != "batch_size"}
        return {**model_key(self.entry, self.config), "step": settings, "batch_size": batch_size}

    def cached_training_step(self, batch_size: int) -> StepMemory | None:
        """The simulation cache's answer for `batch_size`, or None (nothing simulated)."""
        memory = lookup("train-step", self.cache_key(batch_size), decode=lambda v: StepMemory(**v))
        self.cache_hits += memory is not None
        return memory

    def _persistent_extras(self) -> list[torch.Tensor]:
        """State that lives across steps but belongs to neither model nor optimizer."""
        if self.scaler is None:
            return []
        return [self.scaler._scale, self.scaler._growth_tracker]

    def training_step(self, batch_size: int) -> StepMemory:
        """Peak live tensor bytes of one steady-state training step, by category."""
        return simulate_batches(self, [batch_size])[0]

    def _simulate(self, batch_size: int) -> StepMemory:
        """One step at `batch_size`. The optimizer phase does the same at every batch size: the first
        step simulated on this rig records it, and the following ones repeat the record instead of
        dispatching its operators again (`LiveStorageTracker.replay`; one rank's sharded step always
        runs it)."""
        self._build()
        model = self.model.train()
        tracker = LiveStorageTracker(self.granule, record_costs=True)
        replay = self._optimizer_phase
        record = replay is None and self.step.shards == 1
        recorded: list[PhaseRecord] = []

        def on_phase(phase: str) -> None:
            if record and phase == "done":
                found = tracker.left_as_found(but="gradients")
                phase_record = tracker.stop_recording()
                if found:  # the phase left the live state as it found it, the gradients freed: repeatable
                    recorded.append(phase_record)
            tracker.set_phase(phase)
            if record and phase == "optimizer":
                tracker.start_recording()

        with self.mode, fsdp_gradients_tracked(tracker):
            handles = track_model_state(tracker, model, self.optimizer)
            tracker.track(self._persistent_extras(), "other")
            try:
                with tracker:
                    inputs = model.example_inputs(batch_size, device="cpu")
                    labels = _labels(model, batch_size, torch.device("cpu"))
                    training_step(
                        model, self.optimizer, inputs, labels,
                        precision=self.step.precision, scaler=self.scaler, grad_clip=self.step.grad_clip,
                        contrastive_weight=self.step.contrastive_weight, on_phase=on_phase,
                        clip_foreach=self.step.clip_foreach,
                        optimizer_phase=None if replay is None else lambda: self._replay(tracker, replay),
                    )
            finally:
                for handle in handles:
                    handle.remove()
        if recorded:
            self._optimizer_phase = recorded[0]
        return _step_memory(tracker)

    def _replay(self, tracker: LiveStorageTracker, record: PhaseRecord) -> None:
        """The recorded optimizer phase again, then its end: zero_grad's freeing of the gradients
        (whose own dispatches the record counted already)."""
        tracker.replay(record)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def inference(self, batch_size: int) -> int:
        """Peak live tensor bytes of one inference forward (eval mode, no autograd)."""
        peak = self.cached_inference(batch_size)
        if peak is None:
            peak = self._simulate_inference(batch_size)
            self.keep_inference(batch_size, peak)
        return peak

    def cached_inference(self, batch_size: int) -> int | None:
        """The inference peak at `batch_size` if this rig or the simulation cache has it, else None."""
        known = self._inference.get(batch_size)
        return known if known is not None else lookup("inference", self.cache_key(batch_size), decode=int)

    def keep_inference(self, batch_size: int, peak: int) -> None:
        """Remember a simulated inference peak here and in the simulation cache."""
        self._inference[batch_size] = peak
        store("inference", self.cache_key(batch_size), peak)

    def _simulate_inference(self, batch_size: int) -> int:
        self._build()
        model = self.model.eval()
        tracker = LiveStorageTracker(self.granule)
        with self.mode:
            tracker.track(model.parameters(), "weights")
            tracker.track(model.buffers(), "weights")
            precision = self.step.precision
            with tracker, torch.no_grad():
                inputs = model.example_inputs(batch_size, device="cpu")
                tracker.set_phase("forward")
                with torch.autocast("cpu", dtype=AMP_DTYPES.get(precision), enabled=precision in AMP_DTYPES):
                    model(**inputs)
        model.train()
        return tracker.peak.peak_bytes


def fake_device_mesh(world_size: int) -> Any:
    """A 1-D DeviceMesh over a fake process group of `world_size` ranks, this process rank 0; kept
    for the process (a plan of another world size replaces it). Refused inside a real distributed
    run, whose process group is the default one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized() and dist.get_backend() != "fake":
        raise MmkitError("a sharded (--strategy fsdp) step is simulated before the processes start: give "
                         "--batch-size (find it with `mmkit memory-plan --nproc N --strategy fsdp --batch-size auto`)")
    if dist.is_initialized() and dist.get_world_size() != world_size:
        dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


def release_fake_process_group() -> None:
    """Destroy the fake process group `fake_device_mesh` made, if any (its rigs are done)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "fake":
        dist.destroy_process_group()


def simulate_batches(
    rig: FakeTrainingRig, batch_sizes: list[int], parallel: bool = True, inference_at: int | None = None,
) -> list[StepMemory]:
    """Simulate several batch sizes on one rig, those the simulation cache holds read from it; with
    two or more cores, forked children take all but the last of the others (results come back as
    JSON over a pipe). A failed child is simulated again here.

    `inference_at`: also the inference forward at that batch (`rig.inference` then answers it), in
    a child of its own beside the training steps, where neither this rig nor the cache has it.
    """
    known = {b: m for b in batch_sizes if (m := rig.cached_training_step(b)) is not None}
    todo = [b for b in batch_sizes if b not in known]
    jobs: list[Callable[[], Any]] = [lambda b=b: dataclasses.asdict(rig._simulate(b)) for b in todo]
    inference = inference_at if todo and inference_at is not None and rig.cached_inference(inference_at) is None else None
    if inference is not None:  # a forward alone is the shortest job: a child's, not the parent's
        jobs.insert(0, functools.partial(rig._simulate_inference, inference))
    results = _run_jobs(rig, jobs, parallel)
    if inference is not None:
        rig.keep_inference(inference, int(results.pop(0)))
    for b, payload in zip(todo, results, strict=True):
        memory = StepMemory(**payload)
        store("train-step", rig.cache_key(b), dataclasses.asdict(memory))
        known[b] = memory
    return [known[b] for b in batch_sizes]


def _run_jobs(rig: FakeTrainingRig, jobs: list[Callable[[], Any]], parallel: bool) -> list[Any]:
    """Each job's JSON-serialisable result: all but the last in forked children, the last here."""
    if len(jobs) < 2 or not parallel or not hasattr(os, "fork") or (os.cpu_count() or 1) < 2:
        return [job() for job in jobs]
    rig._build()  # once, before forking: the children share it
    children = []
    # the children's garbage collections leave the parent's objects alone (and their pages shared), and
    # so do the parent's own while it runs the last job; a process that froze its objects keeps them so
    frozen_before = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        for job in jobs[:-1]:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: run the job, write one JSON document, exit without cleanup handlers
                status = 1
                try:
                    os.close(read_fd)
                    payload = json.dumps(job()).encode()
                    with os.fdopen(write_fd, "wb") as pipe:
                        pipe.write(payload)
                    status = 0
                finally:
                    os._exit(status)
            os.close(write_fd)
            children.append((job, pid, read_fd))
        last = jobs[-1]()
        results = []
        for job, pid, read_fd in children:
            with os.fdopen(read_fd, "rb") as pipe:
                payload = pipe.read()
            _, status = os.waitpid(pid, 0)
            results.append(json.loads(payload) if status == 0 and payload else job())
    finally:
        if not frozen_before:
            gc.unfreeze()
    return [*results, last]


def simulate_training_step(entry: ModelEntry, config: ModelConfig, step: StepSettings) -> StepMemory:
    """Peak live tensor bytes of one steady-state training step, by category, on fake tensors."""
    return FakeTrainingRig(entry, config, step).training_step(step.batch_size)


def _step_memory(tracker: LiveStorageTracker) -> StepMemory:
    peak = tracker.peak
    phases = {p: b for p, b in tracker.phase_peaks.items() if p in STEP_PHASES}
    return StepMemory(**{c: peak.by_category[c] for c in CATEGORIES}, peak_tensors=peak.peak_bytes,
                      peak_phase=peak.phase, phase_peaks=phases, ops=tracker.ops, highs=tracker.highs,
                      costs=tracker.costs.as_list() if tracker.costs is not None else [])


# ---------------------------------------------------------------------------------------------
# Measurement on the local device


@dataclass(frozen=True)
class Measurement:
    device: str
    peak_tensors: int  # CPU: the tracker on real tensors; CUDA: torch.cuda.max_memory_allocated
    method: str
    step_seconds: list[float] = field(default_factory=list)  # real steps, timed without any tracker

    @property
    def median_step_seconds(self) -> float:
        return _quantile(self.step_seconds, 0.5)

    @property
    def spread_seconds(self) -> tuple[float, float]:
        """The 25th and 75th percentiles of the timed steps."""
        return _quantile(self.step_seconds, 0.25), _quantile(self.step_seconds, 0.75)


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (the median of an even count is the mean of the middle two)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


MEASURED_STEPS = 5  # real steps timed by `memory-plan --measure` (median and spread)


def measure_training_steps(
    entry: ModelEntry, config: ModelConfig, step: StepSettings, device: str = "cpu", steps: int = MEASURED_STEPS
) -> Measurement:
    """Peak memory and the time of `steps` real training steps, after one warm-up step.

    On a CPU the peak comes from one step under the live-storage tracker, and the `steps` timed
    steps run after it without any tracker, so that the time is a real step's (`steps=0`: the
    peak alone). On CUDA the allocator's own peak is read and no tracker is needed."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(entry, config).to(dev).train()
    if step.shards > 1:  # one rank of a real FSDP run (the default process group has `shards` ranks)
        shard_model(model, step.fsdp_wrap)
    optimizer = build_optimizer(model, step.optimizer, PLAN_LR, PLAN_WEIGHT_DECAY)
    scaler = build_grad_scaler(step.precision, dev.type)
    inputs = model.example_inputs(step.batch_size, device=dev, seed=0)
    labels = _labels(model, step.batch_size, dev)

    def run_step(on_phase: Any = lambda _: None) -> None:
        training_step(
            model, optimizer, inputs, labels, precision=step.precision, scaler=scaler,
            grad_clip=step.grad_clip, contrastive_weight=step.contrastive_weight, on_phase=on_phase,
        )

    run_step()  # warm-up: creates the optimizer state, as the simulation's steady state assumes
    times: list[float] = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(steps):
            start = time.perf_counter()
            run_step()
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
        return Measurement(device, torch.cuda.max_memory_allocated(dev),
                           "torch.cuda.max_memory_allocated", times)
    # CPU: count live storages of real tensors in one step; the batch was allocated before, count it as well
    tracker = LiveStorageTracker()
    handles = track_model_state(tracker, model, optimizer)
    tracker.track([*inputs.values(), labels], "other")
    if scaler is not None:
        tracker.track([scaler._scale, scaler._growth_tracker], "other")
    track_optimizer_state(tracker, optimizer)
    with tracker, fsdp_gradients_tracked(tracker):
        run_step(tracker.set_phase)
    for handle in handles:
        handle.remove()
    for _ in range(steps):  # timed without the tracker: a real step's time
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return Measurement(device, tracker.peak.peak_bytes,
                       f"live-storage tracker on real tensors (one step); time: {steps} untracked steps", times)


def states_lower_bound(params: int, optimizer: str) -> int:
    """Bytes of weights + gradients + optimizer state alone (fp32 master weights):
    AdamW keeps two states per parameter, SGD with momentum one."""
    states = {"adamw": 2, "sgd": 1}[optimizer]
    return params * 4 * (2 + states)


def config_param_count(entry: ModelEntry, config: ModelConfig) -> int:
    """Trainable parameters, counted on the meta device (cached)."""
    def count() -> int:
        with torch.device("meta"):
            model = build_model(entry, config)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    return cached("params", model_key(entry, config), count)


def device_memory_bytes(device: str) -> int:
    """All the memory of `device`: a CUDA GPU's total, or the machine's RAM for the CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_states_fit(entry: ModelEntry, config: ModelConfig, optimizer: str, device: str) -> None:
    """Refuse, before anything is allocated, a model whose weights + gradients + optimizer state
    alone (`states_lower_bound`, parameters counted on the meta device) exceed `device`'s memory."""
    params = config_param_count(entry, config)
    need, have = states_lower_bound(params, optimizer), device_memory_bytes(device)
    if need > have:
        where = "RAM" if device == "cpu" else f"{device} memory"
        raise MmkitError(
            f"model {entry.name!r} has {params:,} parameters: weights + gradients + {optimizer} state alone need "
            f"{need / 2**30:,.1f} GiB, more than this machine's {have / 2**30:,.1f} GiB of {where}"
        )



def memtracker_training_peak(entry: ModelEntry, config: ModelConfig, step: StepSettings) -> int:
    """The same steady-state step under torch's `MemTracker` (private API), on fake tensors.

    Used to cross-check `LiveStorageTracker`; raises ImportError if the API is gone.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    rig = FakeTrainingRig(entry, config, step)
    rig._build()
    tracker = MemTracker()
    with rig.mode:
        tracker.track_external(rig.model, rig.optimizer)
        with tracker:
            inputs = rig.model.example_inputs(step.batch_size, device="cpu")
            labels = _labels(rig.model, step.batch_size, torch.device("cpu"))
            training_step(
                rig.model, rig.optimizer, inputs, labels, precision=step.precision, scaler=rig.scaler,
                grad_clip=step.grad_clip, contrastive_weight=step.contrastive_weight, clip_foreach=step.clip_foreach,
            )
    snapshot = tracker.get_tracker_snapshot("peak")
    return sum(device_snapshot["Total"] for device_snapshot in snapshot.values())
