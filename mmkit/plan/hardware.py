"""`--gpu auto`: match the local CUDA device to a preset, or describe it from its properties."""

from __future__ import annotations

import re

import torch

from mmkit.settings import GIB, GpuOverhead, GpuPreset, PeakTflops, available_presets, load_gpu_preset

# assumption for an unknown GPU: FP32 lanes per SM and boost clock of a recent NVIDIA part
ASSUMED_FP32_LANES_PER_SM = 128
ASSUMED_BOOST_GHZ = 1.5


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z]*\d+[a-z]*", text.lower()))


def resolve_gpu(name: str) -> tuple[GpuPreset, str | None]:
    """The preset for `--gpu NAME|auto|cpu`, and a note when auto-detection decided something."""
    if name != "auto":
        return load_gpu_preset(name), None
    if not torch.cuda.is_available():
        return load_gpu_preset("cpu"), "--gpu auto: no CUDA device found, planning for the CPU preset"
    props = torch.cuda.get_device_properties(0)
    vram_gib = props.total_memory / GIB
    device_tokens = _tokens(props.name)
    for preset_name in available_presets("gpus"):
        preset = load_gpu_preset(preset_name)
        if preset.device_type != "cuda":
            continue
        model_tokens = _tokens(preset.display_name) - {"4", "8", "12", "16", "24", "40", "80", "gb"}
        if model_tokens and model_tokens <= device_tokens and abs(preset.vram_gib - vram_gib) / preset.vram_gib < 0.1:
            return preset, f"--gpu auto: {props.name} ({vram_gib:.1f} GiB) matched preset {preset_name!r}"
    major, minor = props.major, props.minor
    fp32 = props.multi_processor_count * ASSUMED_FP32_LANES_PER_SM * 2 * ASSUMED_BOOST_GHZ / 1000
    tensor = fp32 * 4 if major >= 7 else None
    preset = GpuPreset(
        name="auto",
        display_name=f"{props.name} (detected; throughput assumed)",
        vram_gib=vram_gib,
        precisions=("fp32", "fp16", "bf16") if major >= 8 else ("fp32", "fp16"),
        memory_bandwidth_gb_s=500.0,  # assumption: unknown device
        peak_tflops=PeakTflops(fp32=fp32, fp16=tensor or fp32 * 2, bf16=tensor if major >= 8 else None),
        overhead=GpuOverhead(cuda_context_mib=400, workspace_mib=32, allocator_reserve_fraction=0.10),
    )
    return preset, (
        f"--gpu auto: {props.name} (sm_{major}{minor}, {vram_gib:.1f} GiB) matches no preset; "
        "memory from the device, throughput and overheads assumed"
    )
