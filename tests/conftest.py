"""Shared fixtures: a clean MMKIT_* environment for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing is downloaded in tests: huggingface_hub reads this when it is first imported (hf: models).
os.environ["HF_HUB_OFFLINE"] = "1"

# The CPU's bf16 speed-up decides a preset's precision on a CPU (mmkit.plan.probe). Tests pin it, so
# that every test sees the same precisions on any machine; tests/test_precision.py measures it.
PINNED_BF16_SPEEDUP = "2.0"


@pytest.fixture(autouse=True)
def clean_mmkit_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never see the developer's MMKIT_* variables, their measurement cache, nor their own presets."""
    for key in list(os.environ):
        if key.startswith("MMKIT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MMKIT_CACHE_DIR", str(cache_dir(tmp_path_factory)))
    monkeypatch.setenv("MMKIT_CONFIG_DIR", str(tmp_path_factory.mktemp("mmkit-config")))
    monkeypatch.setenv("MMKIT_CPU_BF16_SPEEDUP", PINNED_BF16_SPEEDUP)


def cache_dir(factory: pytest.TempPathFactory) -> Path:
    """One cache for the session: layer timings measured once are reused, as on a user's machine."""
    path = factory.getbasetemp() / "mmkit-cache"
    path.mkdir(exist_ok=True)
    return path
