"""Multichannel network: two stream MLPs whose features are concatenated into one classifier.

    color      [B, 3072] → Linear 512 → ReLU → Linear 256 → ReLU ┐
                                                                ├ concat [B, 512] → Linear(512, 10)
    brightness [B, 1024] → Linear 512 → ReLU → Linear 256 → ReLU ┘

At the default size: 2,365,962 parameters (the first seed's figure, which is right).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import torch
from pydantic import PositiveInt
from torch import nn

from mmkit.errors import MmkitError
from mmkit.models.base import InputSpec, ModelConfig, MultimodalModel, register_model


class StreamConfig(ModelConfig):
    """Shared by `multichannel` and `separate`: the same two streams, fused differently."""

    color_dim: PositiveInt = 3072  # 32×32×3 pixels
    brightness_dim: PositiveInt = 1024  # 32×32 luma
    hidden: tuple[PositiveInt, PositiveInt] = (512, 256)
    num_classes: PositiveInt = 10

    @property
    def width(self) -> int:
        return self.hidden[0]

    def at_width(self, width: int) -> Self:
        # the second layer keeps the seed's 2:1 taper
        return self.model_copy(update={"hidden": (width, max(1, width // 2))})

    @classmethod
    def overrides_for_inputs(cls, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        for name in ("color", "brightness"):
            if len(shapes[name]) != 1:
                raise MmkitError(f"input {name!r} must be a flat vector per sample, got shape {shapes[name]}")
        return {"color_dim": shapes["color"][0], "brightness_dim": shapes["brightness"][0]}


def stream_mlp(in_dim: int, hidden: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU()
    )


class MultichannelNet(MultimodalModel):
    fsdp_blocks = (nn.Sequential,)  # the two stream MLPs

    def __init__(self, config: StreamConfig) -> None:
        super().__init__(config)
        self.color = stream_mlp(config.color_dim, config.hidden)
        self.brightness = stream_mlp(config.brightness_dim, config.hidden)
        self.classifier = nn.Linear(2 * config.hidden[1], config.num_classes)

    def input_specs(self) -> dict[str, InputSpec]:
        return {
            "color": InputSpec((self.config.color_dim,)),
            "brightness": InputSpec((self.config.brightness_dim,)),
        }

    def forward(self, color: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.color(color), self.brightness(brightness)], dim=-1)  # (B, 2·h2)
        return self.classifier(features)  # (B, num_classes)


STREAM_LADDER = (2048, 1536, 1024, 768, 512, 384, 256, 128, 64)


@register_model(
    sizes={"default": StreamConfig()},
    default_size="default",
    ladder=STREAM_LADDER,
    default_data="synthetic-cifar",
)
def multichannel(config: StreamConfig) -> MultichannelNet:
    """Colour and brightness streams, concatenated into one shared classifier."""
    return MultichannelNet(config)
