"""How long a run will take, said before its first step and corrected once steps are measured.

On a CPU the figure comes from the model's own layers timed on this CPU (mmkit.plan.probe, the same
cached timings that chose the precision): matmuls and convolutions forward + backward, scaled to
the model's exact FLOPs, plus the optimizer step. On CUDA it is the planner's estimate from the GPU
preset (peak throughput × assumed utilization). Either way the run prints it as a prediction, and
after its first measured steps (the first step, which warms kernels and caches up, is left out)
prints the measured step time and what it means for the epoch and the run.

When a CPU run is predicted to take more than an hour, the forecast names faster choices: fewer
epochs, a training fraction, a smaller size of the model's ladder, each with its predicted time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mmkit.models.registry import ModelConfig, ModelEntry

LONG_RUN_SECONDS = 3600.0  # beyond an hour on a CPU, a newcomer should hear the faster options first
MEASURED_STEPS = 5  # steps 2..6 of a process are timed for the measured figure (step 1 warms up)


@dataclass(frozen=True)
class RunForecast:
    step_seconds: float
    epoch_seconds: float  # training steps + the validation pass
    total_seconds: float  # the epochs still to run
    steps_per_epoch: int
    epochs: int  # epochs still to run
    source: str  # "predicted from ..." or "measured over N steps"
    measured: bool = False
    faster: list[tuple[str, float]] = field(default_factory=list)  # (option, predicted run seconds) when long

    @property
    def long(self) -> bool:
        return self.total_seconds > LONG_RUN_SECONDS


@dataclass(frozen=True)
class _Rates:
    """Per-sample seconds of one training step and of one validation forward, and the optimizer's."""

    train_per_sample: float
    val_per_sample: float
    optimizer: float
    source: str


def _model_figures(entry: ModelEntry, config: ModelConfig) -> tuple[int, int, int]:
    """(parameters, forward FLOPs, training FLOPs) per sample, exact, on the meta device."""
    from mmkit.plan.count import config_flops
    from mmkit.plan.memory import config_param_count

    flops = config_flops(entry, config)
    params = config_param_count(entry, config)
    return params, flops.forward_flops, flops.train_flops


def _cpu_rates(entry: ModelEntry, config: ModelConfig, precision: str) -> _Rates:
    from mmkit.plan.probe import predict_cpu_step, probe_cpu

    probe = probe_cpu(entry, config)
    params, forward, train = _model_figures(entry, config)
    one = predict_cpu_step(probe, precision, 1, params, forward / train if train else 1 / 3)
    return _Rates(one.parts["layers"], one.forward_seconds_per_sample, one.parts["optimizer"],
                  "predicted from the model's layers timed on this CPU")


def _gpu_rates(entry: ModelEntry, config: ModelConfig, precision: str) -> _Rates:
    from mmkit.plan.hardware import resolve_gpu
    from mmkit.plan.timing import ASSUMED_UTILIZATION, peak_tflops

    gpu, _ = resolve_gpu("auto")
    params, forward, train = _model_figures(entry, config)
    rate = peak_tflops(gpu, precision) * 1e12 * ASSUMED_UTILIZATION[gpu.device_type]
    return _Rates(train / rate, forward / rate, 0.0,
                  f"estimated from {gpu.name}'s peak throughput at an assumed "
                  f"{ASSUMED_UTILIZATION[gpu.device_type]:.0%} utilization")


def _rates(entry: ModelEntry, config: ModelConfig, precision: str, device_type: str) -> _Rates:
    return (_cpu_rates if device_type == "cpu" else _gpu_rates)(entry, config, precision)


def _times(rates: _Rates, batch_size: int, train_samples: int, val_samples: int) -> tuple[float, float, int]:
    steps = math.ceil(train_samples / batch_size)
    step = rates.train_per_sample * batch_size + rates.optimizer
    return step, steps * step + val_samples * rates.val_per_sample, steps


def predict_run(
    entry: ModelEntry, config: ModelConfig, *, precision: str, device_type: str, batch_size: int,
    train_samples: int, val_samples: int, epochs: int, size: str, train_fraction: float,
) -> RunForecast:
    """The forecast before the first step; `epochs`: the epochs still to run."""
    rates = _rates(entry, config, precision, device_type)
    step, epoch, steps = _times(rates, batch_size, train_samples, val_samples)
    forecast = RunForecast(step, epoch, epoch * epochs, steps, epochs, rates.source)
    if device_type != "cpu" or not forecast.long:
        return forecast
    faster = []
    fitting_epochs = math.floor(LONG_RUN_SECONDS / epoch) if epoch > 0 else 0
    if 1 <= fitting_epochs < epochs:
        faster.append((f"--epochs {fitting_epochs}", epoch * fitting_epochs))
    train_part = steps * step * epochs
    validation = forecast.total_seconds - train_part  # the full validation split, whatever the fraction
    if train_part > 0 and validation < LONG_RUN_SECONDS:
        fraction = train_fraction * (LONG_RUN_SECONDS - validation) / train_part
        digits = 1 - math.floor(math.log10(fraction)) if fraction > 0 else 0  # two significant digits, down
        fraction = math.floor(fraction * 10**digits) / 10**digits
        if 0 < fraction < train_fraction:
            faster.append((f"--train-fraction {fraction:g}", validation + train_part * fraction / train_fraction))
    smaller = _smaller_size(entry, config, precision, batch_size, train_samples, val_samples, epochs)
    if smaller is not None:
        faster.append(smaller)
    return RunForecast(step, epoch, epoch * epochs, steps, epochs, rates.source, faster=faster)


def _smaller_size(entry: ModelEntry, config: ModelConfig, precision: str, batch_size: int, train_samples: int,
                  val_samples: int, epochs: int) -> tuple[str, float] | None:
    """The widest ladder size below the run's whose whole run is predicted within the hour
    (a narrower model fits wherever a wider one did)."""
    for width in sorted((w for w in entry.ladder if w < config.width), reverse=True):
        rates = _cpu_rates(entry, config.at_width(width), precision)
        _, epoch, _ = _times(rates, batch_size, train_samples, val_samples)
        if epoch * epochs <= LONG_RUN_SECONDS:
            return f"--size w{width}", epoch * epochs
    return None


def measured_forecast(step_seconds: list[float], predicted: RunForecast, val_share: float) -> RunForecast:
    """The forecast from measured steps: their median, the validation pass as predicted
    (`val_share`: the predicted epoch's validation seconds)."""
    ordered = sorted(step_seconds)
    step = ordered[len(ordered) // 2]
    epoch = predicted.steps_per_epoch * step + val_share
    return RunForecast(step, epoch, epoch * predicted.epochs, predicted.steps_per_epoch, predicted.epochs,
                       f"measured over {len(step_seconds)} steps", measured=True)
