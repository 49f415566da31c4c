"""CLIP-style image+text classifier, and the two encoders that `fusion` shares.

    image [B, 1, 28, 28] → LightViT: 4×4 patches (49) + CLS, `depth` blocks → CLS [B, D]
                         → projection.image [B, E] ─→ head → logits [B, num_classes]
                                                   └→ L2-normalize → image_embeds [B, E]
    text  [B, L] ids     → TextEncoder: `text_layers` blocks, pad-masked → masked mean [B, D]
                         → projection.text → L2-normalize → text_embeds [B, E]
    contrastive_logits = exp(logit_scale) · image_embeds @ text_embedsᵀ                  [B, B]

`logits` come from the image alone: classification at test time needs no text (pass `text=None`
and `contrastive_logits`/`text_embeds` are None). The text only shapes the image embedding during
training, through a contrastive term such as `cls_loss + 0.3 · clip_loss(contrastive_logits)`.
So a dataset whose text is the label's class prompt cannot leak the label into `logits`.

Sizes (from the seed multimodal-training-optimizations.md; D = 128, 4 heads, joint E = 128):
    baseline  ViT depth 6; text 3 layers, FFN 4×D; dropout 0.1   (the seed's "before"): 1,864,971
    default   ViT depth 5; text 2 layers, FFN 3×D; dropout 0.05  (the seed's "after"):  1,402,635
The step removes 16.5 % of the image encoder (the seed says 16 %) and 41.8 % of the text encoder,
embeddings included (the seed says 33 %; its blocks alone shrink by 44 %).
`at_width(w)` sets D = E = w and heads = w // 32 (32-wide heads, as at D = 128), keeping every
depth and ratio.

Text padding: id 0 (PAD) and everything after the first EOS are masked out of attention and of the
pooled mean, so extra padding or junk after EOS never changes an output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Self

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmkit.data.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE
from mmkit.errors import MmkitError
from mmkit.models.base import InputSpec, ModelConfig, MultimodalModel, register_model

HEAD_WIDTH = 32  # per-head width of the named sizes (128 / 4 heads); at_width keeps it
CLIP_INIT_TEMPERATURE = 0.07  # CLIP initializes logit_scale to log(1 / 0.07)
CLIP_MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100 to keep training stable
EMBED_INIT_STD = 0.02  # positions, CLS and token embeddings, as in ViT and CLIP


class ImageTextConfig(ModelConfig):
    """Shared by `clip` and `fusion`: a light ViT and a Transformer text encoder of one width."""

    image_size: PositiveInt = 28  # Fashion-MNIST
    in_channels: PositiveInt = 1  # grayscale
    patch_size: PositiveInt = 4  # 28 / 4 = 7 → 7×7 = 49 patches
    embed_width: PositiveInt = 128  # D: token width of both encoders (the ladder's `width`)
    depth: PositiveInt = 5  # ViT blocks
    heads: PositiveInt = 4  # attention heads in every block
    mlp_ratio: PositiveFloat = 4.0  # ViT MLP hidden = mlp_ratio × D
    text_layers: PositiveInt = 2
    text_ffn_mult: PositiveFloat = 3.0  # text FFN hidden = text_ffn_mult × D
    context_length: PositiveInt = 32  # longest token sequence (BOS … EOS included)
    vocab_size: PositiveInt = VOCAB_SIZE  # the byte-level tokenizer's
    embed_dim: PositiveInt = 128  # E: joint image-text embedding
    dropout: float = Field(0.05, ge=0.0, lt=1.0)  # attention, residual, MLP and embedding dropout
    num_classes: PositiveInt = 10
    gradient_checkpointing: bool = False  # recompute each block in backward (training only)

    @model_validator(mode="after")
    def _check_shapes(self) -> Self:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_width % self.heads:
            raise ValueError(f"embed_width {self.embed_width} is not divisible by heads {self.heads}")
        return self

    @property
    def width(self) -> int:
        return self.embed_width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def overrides_for_inputs(cls, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        image, text = shapes["image"], shapes["text"]
        if len(image) != 3 or image[1] != image[2]:
            raise MmkitError(f"input 'image' must be [channels, size, size] per sample, got shape {image}")
        if len(text) != 1:
            raise MmkitError(f"input 'text' must be [tokens] per sample, got shape {text}")
        return {"in_channels": image[0], "image_size": image[1], "context_length": text[0]}

    def at_width(self, width: int) -> Self:
        """Width and joint embedding `width`, 32-wide heads, every depth and ratio unchanged."""
        return self.model_copy(
            update={"embed_width": width, "heads": heads_for_width(width), "embed_dim": width}
        )


def heads_for_width(width: int) -> int:
    """`width // 32` heads (at least one), lowered to a divisor of `width` when it is not one."""
    heads = max(1, width // HEAD_WIDTH)
    while width % heads:
        heads -= 1
    return heads


class ClipConfig(ImageTextConfig):
    """`clip` adds nothing to the shared fields."""


# --------------------------------------------------------------------------- shared blocks


class MultiHeadAttention(nn.Module):
    """Multi-head attention on `scaled_dot_product_attention`.

    Self-attention when `context` is None; otherwise queries come from `tokens` and keys/values
    from `context` (cross-attention). `key_mask` [B, S] is True where a key may be attended to.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = tokens if context is None else context
        batch, num_queries, width = tokens.shape  # (B, T, D)
        num_keys = context.shape[1]  # S
        head_width = width // self.heads
        query = self.query(tokens).view(batch, num_queries, self.heads, head_width).transpose(1, 2)
        key, value = (
            self.key_value(context)  # (B, S, 2D)
            .view(batch, num_keys, 2, self.heads, head_width)
            .permute(2, 0, 3, 1, 4)  # (2, B, H, S, D/H)
        )
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D/H)
        attended = attended.transpose(1, 2).reshape(batch, num_queries, width)  # (B, T, D)
        return self.out(attended)  # (B, T, D)


class FeedForward(nn.Sequential):
    """Linear → GELU → dropout → Linear → dropout."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, width), nn.Dropout(dropout),
        )


class TransformerBlock(nn.Module):
    """Pre-norm block: `x + attention(LN(x))`, then `x + FFN(LN(x))`.

    Parameters: 4D² + 2DF + 9D + F for width D and FFN hidden F (attention 4D² + 4D, FFN
    2DF + F + D, two LayerNorms 4D). With a `context` the attention is cross-attention onto it.
    """

    def __init__(self, width: int, heads: int, ffn_hidden: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = MultiHeadAttention(width, heads, dropout)
        self.residual_dropout = nn.Dropout(dropout)  # on the attention branch (the FFN has its own)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = FeedForward(width, ffn_hidden, dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.attention(self.attention_norm(tokens), context, key_mask)  # (B, T, D)
        tokens = tokens + self.residual_dropout(attended)  # (B, T, D)
        return tokens + self.ffn(self.ffn_norm(tokens))  # (B, T, D)


def run_blocks(
    blocks: Iterable[nn.Module],
    tokens: torch.Tensor,
    gradient_checkpointing: bool,
    **block_kwargs: torch.Tensor | None,
) -> torch.Tensor:
    """Apply `blocks` in turn; with checkpointing (training, grad on) each is recomputed in backward.

    Non-reentrant checkpointing restores the RNG state, so dropout masks match the forward pass.
    """
    for block in blocks:
        if gradient_checkpointing and block.training and torch.is_grad_enabled():
            tokens = checkpoint(block, tokens, use_reentrant=False, **block_kwargs)
        else:
            tokens = block(tokens, **block_kwargs)
    return tokens


# --------------------------------------------------------------------------- encoders


class LightViT(nn.Module):
    """Light ViT: Conv2d patch embedding, CLS token, learned positions, pre-norm blocks, final LN."""

    def __init__(self, config: ImageTextConfig) -> None:
        super().__init__()
        width = config.embed_width
        self.gradient_checkpointing = config.gradient_checkpointing
        self.patch_embed = nn.Conv2d(
            config.in_channels, width, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, width))
        self.position_embed = nn.Parameter(torch.empty(1, 1 + config.num_patches, width))
        nn.init.trunc_normal_(self.cls_token, std=EMBED_INIT_STD)
        nn.init.trunc_normal_(self.position_embed, std=EMBED_INIT_STD)
        self.embed_dropout = nn.Dropout(config.dropout)
        mlp_hidden = round(config.mlp_ratio * width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.heads, mlp_hidden, config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """All output tokens, CLS first: `[B, 1 + num_patches, D]`."""
        patches = self.patch_embed(image)  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, patches], dim=1) + self.position_embed  # (B, 1+N, D)
        tokens = self.embed_dropout(tokens)
        tokens = run_blocks(self.blocks, tokens, self.gradient_checkpointing)  # (B, 1+N, D)
        return self.norm(tokens)  # (B, 1+N, D)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(image)[:, 0]  # (B, D): the CLS token


def text_key_mask(text: torch.Tensor) -> torch.Tensor:
    """True at real tokens `[B, L]`: not PAD and not after the first EOS.

    A row with no real token (all PAD) keeps position 0, so attention always has a key.
    """
    is_eos = (text == EOS_ID).long()  # (B, L)
    after_eos = (is_eos.cumsum(dim=-1) - is_eos) > 0  # (B, L): an EOS lies strictly before
    valid = (text != PAD_ID) & ~after_eos  # (B, L)
    first_position = torch.arange(text.shape[1], device=text.device) == 0  # (L,)
    return valid | (~valid.any(dim=-1, keepdim=True) & first_position)  # (B, L)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `mask` [B, L] is True: `[B, L, D]` → `[B, D]`."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)


class TextEncoder(nn.Module):
    """Token + learned position embeddings, pre-norm blocks with a key-padding mask, final LN."""

    def __init__(self, config: ImageTextConfig) -> None:
        super().__init__()
        width = config.embed_width
        self.context_length = config.context_length
        self.gradient_checkpointing = config.gradient_checkpointing
        self.token_embed = nn.Embedding(config.vocab_size, width)
        self.position_embed = nn.Parameter(torch.empty(1, config.context_length, width))
        nn.init.normal_(self.token_embed.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.position_embed, std=EMBED_INIT_STD)
        self.embed_dropout = nn.Dropout(config.dropout)
        ffn_hidden = round(config.text_ffn_mult * width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.heads, ffn_hidden, config.dropout)
            for _ in range(config.text_layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward_tokens(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output tokens `[B, L, D]` and the real-token mask `[B, L]` (see `text_key_mask`).

        L may be shorter than `context_length` (the first L positions are used), never longer.
        """
        length = text.shape[1]
        if length > self.context_length:
            raise MmkitError(
                f"text has {length} tokens but the model's context_length is {self.context_length}; "
                f"set context_length={length} or shorten the text"
            )
        mask = text_key_mask(text)  # (B, L)
        tokens = self.token_embed(text) + self.position_embed[:, :length]  # (B, L, D)
        tokens = self.embed_dropout(tokens)
        tokens = run_blocks(self.blocks, tokens, self.gradient_checkpointing, key_mask=mask)
        return self.norm(tokens), mask  # (B, L, D), (B, L)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        tokens, mask = self.forward_tokens(text)  # (B, L, D), (B, L)
        return masked_mean(tokens, mask)  # (B, D)


class JointProjection(nn.Module):
    """Both towers into the joint embedding (Linear, no bias), and CLIP's learned temperature."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.image = nn.Linear(width, embed_dim, bias=False)
        self.text = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / CLIP_INIT_TEMPERATURE)))

    def contrastive_logits(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> torch.Tensor:
        """`scale · image_embeds @ text_embedsᵀ`: row i scores image i against every text."""
        scale = self.logit_scale.clamp(max=math.log(CLIP_MAX_LOGIT_SCALE)).exp()  # ()
        return scale * image_embeds @ text_embeds.t()  # (B_image, B_text)


# --------------------------------------------------------------------------- clip


class ClipOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes), from the image alone
    image_embeds: torch.Tensor  # (B, E), unit norm
    text_embeds: torch.Tensor | None  # (B_text, E), unit norm; None without text
    contrastive_logits: torch.Tensor | None  # (B, B_text); None without text


class ClipModel(MultimodalModel):
    fsdp_blocks = (TransformerBlock,)

    config: ClipConfig
    text_in_logits = False  # the class logits come from the image alone

    def __init__(self, config: ClipConfig) -> None:
        super().__init__(config)
        self.image_encoder = LightViT(config)
        self.text_encoder = TextEncoder(config)
        self.projection = JointProjection(config.embed_width, config.embed_dim)
        self.head = nn.Linear(config.embed_dim, config.num_classes)

    def input_specs(self) -> dict[str, InputSpec]:
        config = self.config
        return {
            "image": InputSpec((config.in_channels, config.image_size, config.image_size)),
            "text": InputSpec((config.context_length,), torch.long, high=config.vocab_size),
        }

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint embeddings `[B, E]` of images."""
        return F.normalize(self.projection.image(self.image_encoder(image)), dim=-1)  # (B, E)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint embeddings `[N, E]` of token ids `[N, L]`; what `text_embeds=` takes."""
        return F.normalize(self.projection.text(self.text_encoder(text)), dim=-1)  # (N, E)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor | None = None,
        *,
        text_embeds: torch.Tensor | None = None,
    ) -> ClipOutput:
        """`text_embeds` (from `encode_text`, e.g. cached) replaces `text`; with neither, only the
        image side is computed (`logits` never depend on the text)."""
        image_features = self.projection.image(self.image_encoder(image))  # (B, E)
        # the head reads the projected features before normalization: unit-norm inputs would cap
        # the logits at the head's weight norm and slow down classification training
        logits = self.head(image_features)  # (B, num_classes)
        image_embeds = F.normalize(image_features, dim=-1)  # (B, E)
        if text_embeds is None and text is not None:
            text_embeds = self.encode_text(text)  # (B_text, E)
        contrastive_logits = None
        if text_embeds is not None:
            contrastive_logits = self.projection.contrastive_logits(image_embeds, text_embeds)
        return ClipOutput(logits, image_embeds, text_embeds, contrastive_logits)


def image_text_sizes(config_class: type[ImageTextConfig]) -> dict[str, ImageTextConfig]:
    """The seed's before/after pair; every other field is the config default (D = E = 128)."""
    return {
        "baseline": config_class(depth=6, text_layers=3, text_ffn_mult=4.0, dropout=0.1),
        "default": config_class(depth=5, text_layers=2, text_ffn_mult=3.0, dropout=0.05),
    }


IMAGE_TEXT_LADDER = (512, 384, 256, 192, 128, 96, 64)


@register_model(
    sizes=image_text_sizes(ClipConfig),
    default_size="default",
    ladder=IMAGE_TEXT_LADDER,
    default_data="synthetic-fashion",
)
def clip(config: ClipConfig) -> ClipModel:
    """CLIP-style light ViT + text Transformer; classifies from the image, text as contrastive aid."""
    return ClipModel(config)
