"""Cross-modal fusion classifier: image tokens read the text through cross-attention.

    image [B, 1, 28, 28] → LightViT (from clip) → tokens [B, 1+49, D] (CLS first) ──┐ queries
    text  [B, L] ids     → TextEncoder (from clip) → tokens [B, L, D] + pad mask ───┤ keys/values
                           cross_attention: `cross_layers` pre-norm blocks          ┘
                           (x + CrossAttn(LN(x), text), x + MLP(LN(x))), final LN → [B, 1+49, D]
                           fused CLS [B, D] → head → logits [B, num_classes]

For an optional contrastive term the *unfused* CLS and the masked-mean text tokens are projected
and normalized into `image_embeds`, `text_embeds` and `contrastive_logits` exactly as in `clip`
(the fused CLS has already seen the text, so it cannot be a fair contrastive partner).

Unlike `clip`, the logits depend on the text. If a dataset's text is the class prompt of the label
("a photo of a sneaker"), feeding it at evaluation hands the model the answer: evaluate with text
that does not come from the label (a fixed neutral prompt, or captions independent of the class).

Sizes and `at_width` as in `clip` (baseline / default encoders, D = E = 128), plus
`cross_layers` = 2 cross-attention blocks with an MLP of `mlp_ratio` × D (396,800 parameters at
D = 128): 2,261,771 parameters at baseline, 1,799,435 at default.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from mmkit.models.base import InputSpec, MultimodalModel, register_model
from mmkit.models.clip import (
    IMAGE_TEXT_LADDER,
    ImageTextConfig,
    JointProjection,
    LightViT,
    TextEncoder,
    TransformerBlock,
    image_text_sizes,
    masked_mean,
    run_blocks,
)


class FusionConfig(ImageTextConfig):
    cross_layers: PositiveInt = 2  # image→text cross-attention blocks


class CrossAttentionStack(nn.Module):
    """Pre-norm cross-attention blocks (image queries, text keys/values), then a final LayerNorm.

    Only the queries are normed in each block: the text tokens already leave the text encoder
    through its final LayerNorm.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        width = config.embed_width
        self.gradient_checkpointing = config.gradient_checkpointing
        mlp_hidden = round(config.mlp_ratio * width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.heads, mlp_hidden, config.dropout)
            for _ in range(config.cross_layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        fused = run_blocks(
            self.blocks, image_tokens, self.gradient_checkpointing,
            context=text_tokens, key_mask=text_mask,
        )  # (B, 1+N, D)
        return self.norm(fused)  # (B, 1+N, D)


class FusionOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes), from the image tokens after reading the text
    image_embeds: torch.Tensor  # (B, E), unit norm, from the image alone
    text_embeds: torch.Tensor  # (B, E), unit norm
    contrastive_logits: torch.Tensor  # (B, B)


class FusionModel(MultimodalModel):
    config: FusionConfig
    text_in_logits = True  # the fused CLS has read the sample's text

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        self.image_encoder = LightViT(config)
        self.text_encoder = TextEncoder(config)
        self.cross_attention = CrossAttentionStack(config)
        self.projection = JointProjection(config.embed_width, config.embed_dim)
        self.head = nn.Linear(config.embed_width, config.num_classes)

    def input_specs(self) -> dict[str, InputSpec]:
        config = self.config
        return {
            "image": InputSpec((config.in_channels, config.image_size, config.image_size)),
            "text": InputSpec((config.context_length,), torch.long, high=config.vocab_size),
        }

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint embeddings `[N, E]` of token ids `[N, L]`, as `text_embeds` in `forward`."""
        return F.normalize(self.projection.text(self.text_encoder(text)), dim=-1)  # (N, E)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> FusionOutput:
        image_tokens = self.image_encoder.forward_tokens(image)  # (B, 1+N, D)
        text_tokens, text_mask = self.text_encoder.forward_tokens(text)  # (B, L, D), (B, L)
        fused = self.cross_attention(image_tokens, text_tokens, text_mask)  # (B, 1+N, D)
        logits = self.head(fused[:, 0])  # (B, num_classes): the fused CLS token
        image_embeds = F.normalize(self.projection.image(image_tokens[:, 0]), dim=-1)  # (B, E)
        text_pooled = masked_mean(text_tokens, text_mask)  # (B, D)
        text_embeds = F.normalize(self.projection.text(text_pooled), dim=-1)  # (B, E)
        contrastive_logits = self.projection.contrastive_logits(image_embeds, text_embeds)  # (B, B)
        return FusionOutput(logits, image_embeds, text_embeds, contrastive_logits)


@register_model(
    sizes=image_text_sizes(FusionConfig),
    default_size="default",
    ladder=IMAGE_TEXT_LADDER,
    default_data="synthetic-fashion",
)
def fusion(config: FusionConfig) -> FusionModel:
    """Light ViT image tokens cross-attend to text tokens; the fused CLS token is classified."""
    return FusionModel(config)
