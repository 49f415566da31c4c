"""`--compile`: torch.compile of the model, or a warning and eager mode where it cannot run.

The model is compiled in place (`nn.Module.compile`): its `forward` runs through torch.compile,
and the module, its parameters and its `state_dict` keys stay what they were, so checkpoints hold
the plain state (no `_orig_mod.` prefix) and a run trained with `--compile` resumes, evaluates and
compares like any other. Compilation happens during the first training step (and again for the
first validation pass, in eval mode).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import torch
from torch import nn

CXX_CANDIDATES = ("g++", "c++", "clang++")


def compile_unavailable_reason(device_type: str = "cpu") -> str | None:
    """Why torch.compile cannot compile here, or None. Inductor builds C++ kernels on a CPU (it
    needs a C++ compiler) and Triton kernels on CUDA (it needs the triton package)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.version_info >= (3, 14) and not hasattr(torch, "_dynamo"):
        return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} yet"
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs the triton package, which is not installed"
        return None
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else list(CXX_CANDIDATES)
    if not any(shutil.which(c) for c in compilers):
        return f"torch.compile on a CPU needs a C++ compiler ({', '.join(compilers)}: none found)"
    return None


def compile_model(model: nn.Module, device_type: str) -> str | None:
    """Compile `model` in place; returns the warning to show when it stays eager instead."""
    reason = compile_unavailable_reason(device_type)
    if reason is not None:
        return f"warning: --compile: {reason}; training without it"
    model.compile()
    return None
