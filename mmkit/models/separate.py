"""Separate models: one complete classifier per stream, logits summed.

    color      [B, 3072] → 512 → 256 → Linear(256, 10) ┐
                                                       ├ sum → [B, 10]
    brightness [B, 1024] → 512 → 256 → Linear(256, 10) ┘

1,707,274 + 658,698 = 2,365,972 parameters: ten more than `multichannel`, because a Linear over a
concatenation equals the sum of two Linears except for one bias vector (10 values) counted twice.
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.models.multichannel import STREAM_LADDER, StreamConfig, stream_mlp
from mmkit.models.registry import InputSpec, MultimodalModel, register_model


class StreamClassifier(nn.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.features = stream_mlp(in_dim, hidden)
        self.head = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class SeparateNet(MultimodalModel):
    def __init__(self, config: StreamConfig) -> None:
        super().__init__(config)
        self.color = StreamClassifier(config.color_dim, config.hidden, config.num_classes)
        self.brightness = StreamClassifier(config.brightness_dim, config.hidden, config.num_classes)

    def input_specs(self) -> dict[str, InputSpec]:
        return {
            "color": InputSpec((self.config.color_dim,)),
            "brightness": InputSpec((self.config.brightness_dim,)),
        }

    def stream_logits(self, color: torch.Tensor, brightness: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each model's own logits, for training the two streams independently."""
        return {"color": self.color(color), "brightness": self.brightness(brightness)}

    def forward(self, color: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
        return self.color(color) + self.brightness(brightness)  # (B, num_classes)


@register_model(
    sizes={"default": StreamConfig()},
    default_size="default",
    ladder=STREAM_LADDER,
    default_data="synthetic-cifar",
)
def separate(config: StreamConfig) -> SeparateNet:
    """One classifier per stream (colour, brightness), logits summed."""
    return SeparateNet(config)
