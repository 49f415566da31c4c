"""Speed-ups users ask about, measured side by side, with their cost where they have one.

    python -m bench.speedups [--quick] [--only amp,compile,optimizer,batch,text_cache,checkpointing]

amp            fp32 against bf16 autocast, one training step (multichannel at batch 256, lfm2:rtx3050
               at batch 32, on their default data's shapes); and the test accuracy of
               `mmkit train multichannel --preset quick` in each precision (not in --quick)
compile        `--compile` (torch.compile of the model): the first step, compilation included, and
               the steady-state step against eager (multichannel, batch 256; not in --quick)
optimizer      AdamW's step alone with the per-parameter loop (what torch picks on a CPU),
               the multi-tensor `foreach` kernels and the `fused` kernel
batch          multichannel samples/s at batch 32 (the quick preset), 64, 128 and 256
text_cache     the continual text-embedding cache (bench/continual.py's text_cache_speedup)
checkpointing  gradient checkpointing on lfm2:rtx3050 at batch 32: simulated and measured peak
               memory against the step time
Step times are medians of interleaved rounds after a warm-up step on each side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import interleaved, ms, paired_ratio, part_main, quartiles

PARTS = ("amp", "compile", "optimizer", "batch", "text_cache", "checkpointing")


def _prepared(model: str, size: str, **flags: Any) -> Any:
    from mmkit.train.resolve import RunOptions, resolve_run

    return resolve_run(RunOptions(model=model, preset="quick", device="cpu", size=size, **flags))


def step_rig(model: str, size: str, batch_size: int, precision: str = "fp32", *,
             overrides: dict[str, Any] | None = None, compile_model: bool = False,
             optimizer_options: dict[str, Any] | None = None) -> Callable[[], float]:
    """A model on its default data's shapes, seeded, with AdamW as `mmkit train` builds it (fused on a
    CPU) unless `optimizer_options` say otherwise; returns `step() -> seconds`."""
    from mmkit.models.registry import apply_overrides, build_model
    from mmkit.train.engine import seed_everything
    from mmkit.train.step import build_optimizer, training_step

    config = _prepared(model, size).run_config()
    recipe = config.training
    model_config = apply_overrides(config.model_config_object(), overrides or {})
    seed_everything(0)
    net = build_model(config.entry, model_config).train()
    if compile_model:
        net.compile()
    optimizer = (torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, **optimizer_options)
                 if optimizer_options else build_optimizer(net, "adamw", recipe.lr, recipe.weight_decay))
    inputs = net.example_inputs(batch_size, seed=0)
    labels = torch.arange(batch_size) % net.config.num_classes

    def step() -> float:
        start = time.perf_counter()
        training_step(net, optimizer, inputs, labels, precision=precision, grad_clip=recipe.grad_clip,
                      contrastive_weight=recipe.contrastive_weight)
        return time.perf_counter() - start

    return step


def _compare(label_a: str, a: Callable[[], float], label_b: str, b: Callable[[], float], rounds: int) -> dict[str, Any]:
    times = interleaved({label_a: a, label_b: b}, rounds)
    return {label_a: quartiles(times[label_a]), label_b: quartiles(times[label_b]),
            "speedup": paired_ratio(times[label_a], times[label_b]), "rounds": rounds}


# A CPU without bf16 kernels, on this one: torch's own kernels and oneDNN's both capped at AVX2 (the
# variables must be set before torch loads, so these rows are measured in a child process)
AVX2_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def amp_rows(quick: bool) -> list[dict[str, Any]]:
    """fp32 against bf16 autocast on this process's CPU kernels, with the capability they ran at."""
    import os

    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capability = f"{torch.backends.cpu.get_cpu_capability()}" + (f" (oneDNN capped at {capped})" if capped else "")
    rows = []
    for model, size, batch in (("multichannel", "default", 256), ("lfm2", "rtx3050", 32)):
        rounds = 2 if quick else (4 if model == "lfm2" else 8)
        result = _compare("fp32", step_rig(model, size, batch, "fp32"), "bf16", step_rig(model, size, batch, "bf16"),
                          rounds)
        rows.append({"model": f"{model}:{size}", "batch_size": batch, "cpu_capability": capability, **result})
    return rows


def _avx2_rows(quick: bool) -> list[dict[str, Any]]:
    import json
    import os
    import subprocess
    import sys

    code = f"import json; from bench.speedups import amp_rows; print(json.dumps(amp_rows({quick!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **AVX2_ENVIRONMENT})
    return json.loads(done.stdout.strip().splitlines()[-1])


def amp(quick: bool) -> list[dict[str, Any]]:
    rows = amp_rows(quick) + _avx2_rows(quick)
    if not quick:
        import tempfile
        from pathlib import Path

        from mmkit.train.run import train_run

        accuracy = {}
        for precision in ("fp32", "bf16"):
            prepared = _prepared("multichannel", "default", precision=precision)
            with tempfile.TemporaryDirectory(prefix="mmkit-bench-") as tmp:
                start = time.perf_counter()
                outcome = train_run(Path(tmp) / "run", prepared.run_config(), dataset=prepared.dataset)
                accuracy[precision] = {"test_accuracy": outcome.test.accuracy, "seconds": time.perf_counter() - start}
        rows[0]["train_quick"] = accuracy
    return rows


def compile_speedup(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return []
    from mmkit.train.compile import compile_unavailable_reason

    reason = compile_unavailable_reason()
    if reason:
        return [{"model": "multichannel:default", "skipped": reason}]
    eager = step_rig("multichannel", "default", 256)
    compiled = step_rig("multichannel", "default", 256, compile_model=True)
    first = compiled()  # compilation happens here
    result = _compare("eager", eager, "compiled", compiled, 8)
    return [{"model": "multichannel:default", "batch_size": 256, "first_compiled_step_seconds": first, **result}]


def optimizer_kernels(quick: bool) -> list[dict[str, Any]]:
    from mmkit.models.registry import build_model

    rows = []
    for model, size in (("multichannel", "default"), ("lfm2", "rtx3050")):
        config = _prepared(model, size).run_config()
        variants = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        runs = {}
        params_count = 0
        for name, options in variants.items():
            torch.manual_seed(0)
            net = build_model(config.entry, config.model_config_object())
            params = [p for p in net.parameters() if p.requires_grad]
            params_count = sum(p.numel() for p in params)
            for p in params:
                p.grad = torch.randn_like(p)
            try:
                optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **options)
                optimizer.step()
            except (RuntimeError, ValueError) as error:
                rows.append({"model": f"{model}:{size}", "kernel": name, "skipped": str(error)})
                continue
            runs[name] = (lambda o=optimizer: _timed_step(o))
        times = interleaved(runs, 3 if quick else 10)
        base = quartiles(times["for-loop"])["median"] if "for-loop" in times else float("nan")
        for name, t in times.items():
            q = quartiles(t)
            rows.append({"model": f"{model}:{size}", "params": params_count, "kernel": name, "seconds": q,
                         "speedup_vs_for_loop": paired_ratio(times["for-loop"], t) if "for-loop" in times else None,
                         "for_loop_median": base})
    return rows


def _timed_step(optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def batch_scaling(quick: bool) -> list[dict[str, Any]]:
    sizes = (32, 256) if quick else (32, 64, 128, 256)
    runs = {b: step_rig("multichannel", "default", b) for b in sizes}
    times = interleaved({str(b): runs[b] for b in sizes}, 2 if quick else 6)
    rows = []
    for b in sizes:
        q = quartiles(times[str(b)])
        rows.append({"model": "multichannel:default", "batch_size": b, "step_seconds": q,
                     "samples_per_second": b / q["median"]})
    for r in rows:
        r["throughput_vs_batch_32"] = r["samples_per_second"] / rows[0]["samples_per_second"]
    return rows


def text_cache(quick: bool) -> list[dict[str, Any]]:
    from bench.continual import text_cache_speedup

    return text_cache_speedup("fp32", 1 if quick else 3)


def checkpointing(quick: bool) -> list[dict[str, Any]]:
    from mmkit.plan.memory import StepSettings, measure_training_steps, simulate_training_step

    batch = 8 if quick else 32
    config = _prepared("lfm2", "rtx3050").run_config()
    rows, runs = [], {}
    for enabled in (False, True):
        model_config = config.model_config_object().model_copy(update={"gradient_checkpointing": enabled})
        settings = StepSettings(batch_size=batch)
        simulated = simulate_training_step(config.entry, model_config, settings)
        measured = measure_training_steps(config.entry, model_config, settings, steps=1)
        rows.append({"model": "lfm2:rtx3050", "batch_size": batch, "gradient_checkpointing": enabled,
                     "simulated_peak_bytes": simulated.peak_tensors, "measured_peak_bytes": measured.peak_tensors})
        runs["on" if enabled else "off"] = step_rig("lfm2", "rtx3050", batch,
                                                   overrides={"gradient_checkpointing": enabled})
    times = interleaved(runs, 2 if quick else 4)
    for r in rows:
        r["step_seconds"] = quartiles(times["on" if r["gradient_checkpointing"] else "off"])
    off, on = rows
    on["memory_saved"] = 1 - on["measured_peak_bytes"] / off["measured_peak_bytes"]
    on["time_cost"] = paired_ratio(times["on"], times["off"]) - 1
    return rows


RUNNERS = {"amp": amp, "compile": compile_speedup, "optimizer": optimizer_kernels, "batch": batch_scaling,
           "text_cache": text_cache, "checkpointing": checkpointing}


def run(quick: bool = False, only: tuple[str, ...] = PARTS) -> dict[str, Any]:
    part: dict[str, Any] = {}
    for name in only:
        start = time.perf_counter()
        part[name] = RUNNERS[name](quick)
        part.setdefault("seconds", {})[name] = time.perf_counter() - start
    return part


def to_markdown(part: dict[str, Any]) -> str:
    lines: list[str] = []
    if part.get("amp"):
        lines += ["**AMP on the CPU** (bf16 autocast; one training step, median of interleaved rounds):", "",
                  "| model | batch | CPU capability | fp32 | bf16 | speed-up |", "|---|---:|---|---:|---:|---:|"]
        for r in part["amp"]:
            capability = r.get("cpu_capability", "not recorded")  # reports written before it was
            lines.append(f"| {r['model']} | {r['batch_size']} | {capability} | {ms(r['fp32']['median'])} "
                         f"| {ms(r['bf16']['median'])} | ×{r['speedup']:.2f} |")
        train = part["amp"][0].get("train_quick")
        if train:
            lines += ["", f"Accuracy effect, `mmkit train multichannel --preset quick` (seed 0): test accuracy "
                      f"{train['fp32']['test_accuracy']:.3f} in fp32 ({train['fp32']['seconds']:.0f} s), "
                      f"{train['bf16']['test_accuracy']:.3f} in bf16 ({train['bf16']['seconds']:.0f} s)."]
        lines.append("")
    if part.get("compile"):
        r = part["compile"][0]
        if "skipped" in r:
            lines += [f"**`--compile`**: not measured ({r['skipped']}).", ""]
        else:
            lines += [f"**`--compile`** (torch.compile, {r['model']}, batch {r['batch_size']}): first step "
                      f"{ms(r['first_compiled_step_seconds'])} (compilation); then {ms(r['compiled']['median'])} "
                      f"against {ms(r['eager']['median'])} eager: ×{r['speedup']:.2f}.", ""]
    if part.get("optimizer"):
        lines += ["**AdamW kernels** (the optimizer step alone):", "",
                  "| model | parameters | kernel | step | speed-up vs for-loop |", "|---|---:|---|---:|---:|"]
        for r in part["optimizer"]:
            if "skipped" in r:
                lines.append(f"| {r['model']} | | {r['kernel']} | unavailable: {r['skipped'][:80]} | |")
                continue
            lines.append(f"| {r['model']} | {r['params']:,} | {r['kernel']} | {ms(r['seconds']['median'])} "
                         f"| ×{r['speedup_vs_for_loop']:.2f} |")
        lines.append("")
    if part.get("batch"):
        lines += ["**Larger batch** (multichannel, fp32):", "", "| batch | step | samples/s | vs batch 32 |",
                  "|---:|---:|---:|---:|"]
        for r in part["batch"]:
            lines.append(f"| {r['batch_size']} | {ms(r['step_seconds']['median'])} | {r['samples_per_second']:,.0f} "
                         f"| ×{r['throughput_vs_batch_32']:.2f} |")
        lines.append("")
    if part.get("text_cache"):
        lines += ["**Text-embedding cache** (continual clip step, batch 256, `text_cache` on vs off):", "",
                  "| precision | text encoder | cache off | cache on | speed-up | prompts encoded off / on |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in part["text_cache"]:
            lines.append(f"| {r['precision']} | {r['text_encoder']} | {ms(r['step_seconds_no_cache'])} "
                         f"| {ms(r['step_seconds_cache'])} | ×{r['speedup']:.2f} "
                         f"| {r['prompts_encoded_no_cache']} / {r['prompts_encoded_cache']} in {r['steps']} steps |")
        lines.append("")
    if part.get("checkpointing"):
        off, on = part["checkpointing"]
        lines += [f"**Gradient checkpointing** ({on['model']}, batch {on['batch_size']}, fp32):", "",
                  "| checkpointing | simulated peak | measured peak | step |", "|---|---:|---:|---:|"]
        for r in (off, on):
            lines.append(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['simulated_peak_bytes'] / 2**20:,.1f} MiB "
                         f"| {r['measured_peak_bytes'] / 2**20:,.1f} MiB | {ms(r['step_seconds']['median'])} |")
        lines += ["", f"Checkpointing saves {on['memory_saved']:.0%} of the peak for {on['time_cost']:+.0%} step time.", ""]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return part_main(__doc__, run, to_markdown, argv, ("--only", {"default": ",".join(PARTS)}),
                     convert=lambda only: tuple(only.split(",")))


if __name__ == "__main__":
    main()
