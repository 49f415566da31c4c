"""Hugging Face models side by side: accelerate's estimate, mmkit's simulated training peak by
category, and a real CPU training step's measured peak.

    pip install accelerate                              # this script's own dependency (not mmkit's)
    python -m bench.hf_anchor                           # every model at batch 8 and 32; writes bench/results/hf-anchor.{md,json}
    python -m bench.hf_anchor --no-measure              # the estimates and simulations alone (a minute or two)
    python -m bench.hf_anchor --only vit,bert --batches 8
    python -m bench.hf_anchor --render-only             # re-render the table from the JSON

Each model is its type's default config in transformers (the base sizes: CLIP ViT-B/32, SigLIP
base patch16-224, wav2vec2-base, ViT-base patch16-224, BERT-base), built on the meta device as
`mmkit count hf:TYPE` builds it; nothing is downloaded.

accelerate   `accelerate estimate-memory`'s own functions on that meta model: `calculate_maximum_sizes`
             (the weights' bytes) and `estimate_training_usage(bytes, "float32")`, whose largest entry
             is its "Training using Adam" column: 4 × the weights, for any batch.
mmkit        `simulate_training_step` (what `mmkit memory-plan` runs): one steady-state AdamW step,
             fp32, on fake tensors with the CPU's kernels, the peak of live tensor bytes by category.
measured     `measure_training_steps` (what `memory-plan --measure` runs): a warm-up step, then real
             steps on this CPU with every live storage counted at each operator.

Inputs: images 3×224×224; CLIP's text 77 tokens, SigLIP's 64; wav2vec2 one second of 16 kHz audio
(16,000 samples) with LayerDrop off (`layerdrop=0`: the plan is the step that skips no layer, and
a measured step that skipped one would not be comparable); BERT 128 tokens (a common fine-tuning
length; its config allows 512). The dual encoders (CLIP, SigLIP) run their contrastive step (both
towers, the image-to-text logits' cross-entropy); the others their classification head (2 labels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, machine, machine_line

MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {  # key → (label, spec, model settings)
    "clip": ("CLIP ViT-B/32", "hf:clip", {}),
    "siglip": ("SigLIP base", "hf:siglip", {}),
    "wav2vec2": ("wav2vec2-base", "hf:wav2vec2", {"layerdrop": 0.0}),
    "vit": ("ViT-base", "hf:vit", {}),
    "bert": ("BERT-base", "hf:bert", {"seq_len": 128}),
}
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other")


def resolved(spec: str, settings: dict[str, Any]) -> tuple[Any, Any]:
    from mmkit.models.registry import get_model_entry
    from mmkit.models.spec import complete_factory_config

    entry = get_model_entry(spec)
    config = complete_factory_config(entry, entry.sizes["default"].with_kwargs(settings))
    return entry, config


def accelerate_estimate(entry: Any, config: Any) -> dict[str, int]:
    """accelerate's figures for the model mmkit builds (the same config, on the meta device)."""
    from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage

    from mmkit.models.registry import build_model

    with torch.device("meta"):
        net = build_model(entry, config).net  # the library's model itself, not mmkit's wrapper
    total, largest = calculate_maximum_sizes(net)
    usage = estimate_training_usage(total, "float32")
    return {"weights": int(total), "largest_layer": int(largest[0]), "training_adam": int(max(usage.values()))}


def row(key: str, batch: int, measure: bool, steps: int) -> dict[str, Any]:
    from mmkit.plan.memory import StepSettings, measure_training_steps, simulate_training_step

    label, spec, settings = MODELS[key]
    entry, config = resolved(spec, settings)
    step = StepSettings(batch_size=batch, precision="fp32", optimizer="adamw")
    start = time.perf_counter()
    simulated = simulate_training_step(entry, config, step)
    simulate_seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "model": label, "spec": spec, "settings": settings, "batch_size": batch,
        "inputs": {name: list(decl.shape) for name, decl in config.inputs.items()},
        "params": sum(p.numel() for p in _meta_params(entry, config)),
        "accelerate": accelerate_estimate(entry, config),
        "mmkit": {**{c: getattr(simulated, c) for c in CATEGORIES}, "peak_tensors": simulated.peak_tensors,
                  "peak_phase": simulated.peak_phase, "seconds": round(simulate_seconds, 1)},
        "measured": None,
    }
    if measure:
        start = time.perf_counter()
        measured = measure_training_steps(entry, config, step, steps=steps)
        out["measured"] = {"peak_tensors": measured.peak_tensors, "method": measured.method,
                           "step_seconds": [round(s, 2) for s in measured.step_seconds],
                           "seconds": round(time.perf_counter() - start, 1)}
    print(f"bench.hf_anchor: {label} batch {batch}: accelerate {out['accelerate']['training_adam']:,} B, "
          f"mmkit {out['mmkit']['peak_tensors']:,} B"
          + (f", measured {out['measured']['peak_tensors']:,} B" if out["measured"] else ""), file=sys.stderr)
    return out


def _meta_params(entry: Any, config: Any) -> list[torch.Tensor]:
    from mmkit.models.registry import build_model

    with torch.device("meta"):
        return list(build_model(entry, config).parameters())


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def to_markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        f"Measured on {machine_line(info)}; transformers {info.get('transformers', '?')}, accelerate "
        f"{info.get('accelerate', '?')}; fp32, AdamW, MiB unless marked B. **accelerate**: "
        "`estimate_training_usage`'s \"Training using Adam\" (4 × the weights, whatever the batch). **mmkit**: the "
        "simulated peak of live tensors, split by category at that moment (`mmkit memory-plan`). **measured − mmkit**: "
        "a real CPU step's peak of live tensors minus the simulated one, in bytes (\"not measured\": see the text). "
        "**accelerate leaves out**: mmkit's peak minus accelerate's estimate.",
        "",
        "| model | params | batch | accelerate | mmkit peak | weights | grads | optimizer | activations | other "
        "| measured − mmkit | accelerate leaves out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, acc = r["mmkit"], r["accelerate"]["training_adam"]
        measured = r["measured"]["peak_tensors"] if r["measured"] else None
        delta = f"{measured - m['peak_tensors']:+,} B" if measured is not None else "not measured"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch_size']} | {mib(acc)} | {mib(m['peak_tensors'])} | "
            + " | ".join(mib(m[c]) for c in CATEGORIES)
            + f" | {delta} | {mib(m['peak_tensors'] - acc)} ({m['peak_tensors'] - acc:,} B) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hf_anchor", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODELS), help=f"models, comma-separated ({', '.join(MODELS)})")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--no-measure", action="store_true", help="skip the real CPU steps")
    parser.add_argument("--measure-batches", type=int, nargs="*", default=None,
                        help="measure only these batches (default: all of --batches)")
    parser.add_argument("--steps", type=int, default=1, help="measured steps after the warm-up (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true", help="re-render hf-anchor.md from hf-anchor.json")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads((args.out / "hf-anchor.json").read_text())
        (args.out / "hf-anchor.md").write_text(to_markdown(report["rows"], report["machine"]))
        print(to_markdown(report["rows"], report["machine"]))
        return
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; valid: {', '.join(MODELS)}")
    measured_batches = set(args.batches if args.measure_batches is None else args.measure_batches)
    import accelerate
    import transformers

    info = {**machine(), "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    rows = [row(key, batch, not args.no_measure and batch in measured_batches, args.steps)
            for key in keys for batch in args.batches]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf-anchor.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    (args.out / "hf-anchor.md").write_text(to_markdown(rows, info))
    print(to_markdown(rows, info))


if __name__ == "__main__":
    main()
