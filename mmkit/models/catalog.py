"""What the command line knows of the models before it loads torch or any family: the built-in
names, and how a `--set` value reads.

`mmkit count nosuch` (or `train`, `memory-plan`) is answered from here in a few milliseconds
instead of after the second or two that importing torch and the families takes. The registry
stays the authority; tests/test_startup.py keeps BUILTIN_MODELS equal to what it registers.
"""

from __future__ import annotations

import json
from typing import Any

from mmkit.errors import unknown_choice

BUILTIN_MODELS = ("clip", "fusion", "lfm2", "multichannel", "separate")


def check_model_name(name: str) -> None:
    """The registry's unknown-model error (same line, same exit code), without loading the registry."""
    if name not in BUILTIN_MODELS:
        raise unknown_choice("model", name, BUILTIN_MODELS)


def parse_override_value(text: str) -> Any:
    """A `--set` value: JSON when it parses (numbers, lists, true/false), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
