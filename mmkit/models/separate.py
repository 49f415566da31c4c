"""Separate models: one complete classifier per stream, logits summed.

    color      [B, 3072] → 512 → 256 → Linear(256, 10) ┐
                                                       ├ sum → [B, 10]
    brightness [B, 1024] → 512 → 256 → Linear(256, 10) ┘

1,707,274 + 658,698 = 2,365,972 parameters: ten more than `multichannel`, because a Linear over a
concatenation equals the sum of two Linears except for one bias vector (10 values) counted twice.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from mmkit.models.base import InputSpec, MultimodalModel, register_model
from mmkit.models.multichannel import STREAM_LADDER, StreamConfig, stream_mlp


class SeparateConfig(StreamConfig):
    """`mode` is how the two models are trained: `joint` — one loss on the summed logits (the fair
    comparison with multichannel); `independent` — each model its own loss and its own gradient
    clipping, combined only at evaluation (as the first seed describes them). AdamW updates each
    parameter on its own, so one optimizer over both models equals one optimizer per model."""

    mode: Literal["joint", "independent"] = "joint"


class SeparateOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes): the sum, what evaluation uses
    stream_logits: tuple[torch.Tensor, torch.Tensor]  # each model's own logits, for independent losses


class StreamClassifier(nn.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.features = stream_mlp(in_dim, hidden)
        self.head = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class SeparateNet(MultimodalModel):
    def __init__(self, config: SeparateConfig) -> None:
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

    def clip_groups(self) -> list[list[nn.Parameter]] | None:
        """Parameter groups clipped separately (independent mode), or None for one global norm."""
        if self.config.mode == "independent":
            return [list(self.color.parameters()), list(self.brightness.parameters())]
        return None

    def forward(self, color: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor | SeparateOutput:
        color_logits, brightness_logits = self.color(color), self.brightness(brightness)  # (B, C) each
        logits = color_logits + brightness_logits  # (B, num_classes)
        if self.config.mode == "independent" and self.training:
            return SeparateOutput(logits, (color_logits, brightness_logits))
        return logits


@register_model(
    sizes={"default": SeparateConfig()},
    default_size="default",
    ladder=STREAM_LADDER,
    default_data="synthetic-cifar",
)
def separate(config: SeparateConfig) -> SeparateNet:
    """One classifier per stream (colour, brightness), logits summed."""
    return SeparateNet(config)
