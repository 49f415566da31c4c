"""Shared fixtures: a clean MMKIT_* environment for every test."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_mmkit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's MMKIT_* variables."""
    for key in list(os.environ):
        if key.startswith("MMKIT_"):
            monkeypatch.delenv(key)
