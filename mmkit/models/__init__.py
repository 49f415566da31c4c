"""Model families. Taking any name below from this package registers every family first.

The package loads lazily: importing `mmkit.models.catalog` (the built-in names the command line
checks) imports neither torch nor a family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmkit.models.registry import (
        InputSpec,
        ModelConfig,
        MultimodalModel,
        create_model,
        get_model_entry,
        list_models,
        logits_of,
        register_model,
        resolve_config,
    )

__all__ = [
    "InputSpec",
    "ModelConfig",
    "MultimodalModel",
    "create_model",
    "get_model_entry",
    "list_models",
    "logits_of",
    "register_model",
    "resolve_config",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mmkit.models import registry

    registry._ensure_families_loaded()
    return getattr(registry, name)
