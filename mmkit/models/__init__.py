"""Model families. Importing this package registers every family with the registry."""

from mmkit.models import clip, fusion, lfm2, multichannel, separate  # noqa: F401  (registration)
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
