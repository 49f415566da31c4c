"""LFM2 audio-visual emotion recognizer: Conformer audio, CNN + GSCB visual, LFM2 fusion, MLP head.

    audio [B, T_a, n_mels] → conv subsampling (÷4 in time) → Conformer layers → [B, T_a', D] ┐
    video [B, T_v, C, H, W] → frame CNN → GAP → Linear → GSCBs → attention → [B, T_v, D]    ┤
      ┌──────────────────────────────────────────────────────────────────────────────────────┘
      └ fusion: Linear(D, H) per modality + modality embedding → [audio ; video] tokens
        → LFM2 blocks (short conv / GQA, + SwiGLU) → RMSNorm → mean over tokens → Linear(H, out)
        → classifier MLP out → hidden[0] → hidden[1] → num_classes

Top-level children, in order: `audio`, `visual`, `fusion`, `classifier`.

Parameters (exact; each followed by the figure claimed in the RTX 3050 audio-visual emotion
recognition write-up this family reproduces, "the seed's figure"):

    size      audio            visual           fusion           classifier     total
    original  49,862,528 ~50M  15,469,504 ~14M  86,530,688 ~84M  396,040 ~0.4M  152,258,760 ~149M
    rtx3050    1,624,032  ~9M     642,544  ~1M   2,919,680  ~4M   25,288 ~0.03M   5,211,544  ~14M

Where the figures differ, either a faithful design lands a little off the seed's figure, or the
seed's rtx3050 row does not follow from its own dims:
- audio: 8 Conformer layers at D=512 are 8 × 6,058,496 = 48.5M by the published structure; the
  subsampling front end uses D/4 = 128 channels (1.39M) — ESPnet's Conv2dSubsampling uses D
  channels (7.35M at D=512, audio 55.8M); either is a faithful Conformer front end and D/4 matches
  the seed's ~50M. At D=128 the rtx3050 row's ~9M is out of reach: 4 layers are
  4 × 384,128 = 1.5M and any usual front end adds well under 1M.
- visual: a two-conv-per-stage CNN (D/8, D/4, D/2, D channels) with its projection (4.95M at
  D=512), 2 GSCBs (2.1M each) and 2 attention blocks with a 4D FFN (3.15M each): 15.5M, 10 % over
  the seed's ~14M. At D=128 the same design is 0.64M against the seed's ~1M.
- fusion: 4 LFM2 layers at H=1024 (conv, conv, attention, conv) with the SwiGLU width given by
  LFM2's own rule applied to 8H: int(2·8H/3) = 5461 rounded up to a multiple of 256 = 5632, plus
  two D → H input projections and the H → output projection: 86.5M, 3 % over ~84M (rounding 5461
  down to 5376 would give 83.4M). At H=256, 2 layers, the same design is 2.9M against ~4M.
- the seed's rtx3050 total (~14M) is the sum of its own inconsistent branch figures.

Design rules:
- Fusion layer pattern: layer i uses attention when i % 3 == 2 (every third layer, as LFM2 keeps
  about a third of its layers attention); a stack shorter than three layers makes its last layer
  attention, so there is always at least one. `fusion.attention_layers` overrides the rule.
- Fusion attention is bidirectional (tokens are mean-pooled, nothing is generated); the short
  convolutions stay causal as in LFM2. RoPE positions run over the concatenated sequence.
- `at_width(w)`: feature dim w for both branches, audio FFN 4w, subsampling channels w/4, CNN
  channels (w/8, w/4, w/2, w), visual FFN 4w, fusion hidden 2w with SwiGLU width by LFM2's rule on
  8·hidden, fusion output w, classifier (w, w/2); heads = w/64 (fusion: hidden/64, KV heads half
  of those), each lowered to the nearest divisor so head_dim stays whole, at least 1. Depths: the
  original's (audio 8, visual 2 GSCB + 2 attention, fusion 4) when w ≥ 384, else the rtx3050's
  (4, 1 + 1, 2). So `rtx3050.at_width(512) == original`; `original.at_width(128)` differs from
  `rtx3050` only in audio heads (2 by the rule, 4 in the seed's table) — head count does not
  change the parameter count.
- Neither the Conformer (as in torchaudio) nor the visual temporal encoder has positional
  embeddings: the convolution module and the causal GSCB convolutions carry order, and no parameter
  depends on T_a, T_v, H or W (the frame CNN ends in global average pooling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator
from torch import nn

from mmkit.errors import MmkitError
from mmkit.models.base import InputSpec, ModelConfig, MultimodalModel, register_model
from mmkit.models.blocks import (
    ConformerLayer,
    ConvSubsampling,
    GatedShortConvBlock,
    Lfm2Block,
    RMSNorm,
    TransformerBlock,
    largest_divisor_at_most,
    lfm2_ffn_dim,
    run_block,
)

HEAD_DIM_TARGET = 64  # at_width picks heads so that head_dim is about this
FULL_DEPTH_MIN_WIDTH = 384  # at_width uses the original depths from this width up
LFM2_FFN_BASE_MULTIPLIER = 8  # SwiGLU width = LFM2's rule applied to 8·hidden (≈ 16·hidden/3)


class SubConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConformerConfig(SubConfig):
    """Audio branch: convolutional subsampling, then `layers` Conformer layers of width `dim`."""

    dim: PositiveInt = 128
    layers: PositiveInt = 4
    heads: PositiveInt = 4
    ffn_dim: PositiveInt = 512
    conv_kernel: PositiveInt = 31  # depthwise kernel of the convolution module (Gulati et al.)
    subsampling_channels: PositiveInt = 32

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.dim % self.heads:
            raise ValueError(f"audio.heads ({self.heads}) must divide audio.dim ({self.dim})")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"audio.conv_kernel must be odd ('same' padding): {self.conv_kernel}")
        return self


class VisualConfig(SubConfig):
    """Visual branch: per-frame CNN → projection to `dim`, then GSCBs and attention blocks."""

    dim: PositiveInt = 128
    cnn_channels: tuple[PositiveInt, ...] = Field((16, 32, 64, 128), min_length=1)
    gscb_blocks: NonNegativeInt = 1
    attention_blocks: NonNegativeInt = 1
    heads: PositiveInt = 2
    ffn_dim: PositiveInt = 512
    gscb_kernel: PositiveInt = 4  # the seed's causal depthwise kernel

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.dim % self.heads:
            raise ValueError(f"visual.heads ({self.heads}) must divide visual.dim ({self.dim})")
        return self


class FusionConfig(SubConfig):
    """LFM2 fusion stack of width `hidden`; see the module docstring for the layer pattern."""

    hidden: PositiveInt = 256
    layers: PositiveInt = 2
    attention_layers: tuple[NonNegativeInt, ...] | None = None  # None: every third, ≥ 1
    heads: PositiveInt = 4
    kv_heads: PositiveInt = 2
    ffn_dim: PositiveInt = 1536
    conv_kernel: PositiveInt = 3  # LFM2's L_cache
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    output_dim: PositiveInt = 128

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"fusion.heads ({self.heads}) must divide fusion.hidden ({self.hidden}) and "
                f"fusion.kv_heads ({self.kv_heads}) must divide fusion.heads"
            )
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"fusion head_dim {self.hidden // self.heads} must be even for RoPE")
        indices = self.attention_layers or ()
        if any(i >= self.layers for i in indices):
            raise ValueError(
                f"fusion.attention_layers {list(self.attention_layers)} must be below "
                f"fusion.layers ({self.layers})"
            )
        return self

    def attention_layer_indices(self) -> tuple[int, ...]:
        if self.attention_layers is not None:
            return self.attention_layers
        every_third = tuple(i for i in range(self.layers) if i % 3 == 2)
        return every_third or (self.layers - 1,)


class ClassifierConfig(SubConfig):
    """MLP head widths between the fusion output and the class logits."""

    hidden: tuple[PositiveInt, ...] = (128, 64)


class Lfm2Config(ModelConfig):
    """Input shapes (datasets override them), regularisation, and the four branches' configs."""

    num_classes: PositiveInt = 8  # RAVDESS emotions
    n_mels: int = Field(80, ge=7)  # ≥ 7: two unpadded 3×3 stride-2 convolutions
    audio_frames: int = Field(300, ge=7)  # 3 s at a 10 ms hop
    video_frames: PositiveInt = 16
    frame_channels: PositiveInt = 3
    frame_height: PositiveInt = 64
    frame_width: PositiveInt = 64
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = False
    audio: ConformerConfig = ConformerConfig()
    visual: VisualConfig = VisualConfig()
    fusion: FusionConfig = FusionConfig()
    classifier: ClassifierConfig = ClassifierConfig()

    @property
    def width(self) -> int:
        return self.audio.dim

    @classmethod
    def overrides_for_inputs(cls, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        audio, video = shapes["audio"], shapes["video"]
        if len(audio) != 2:
            raise MmkitError(f"input 'audio' must be [frames, n_mels] per sample, got shape {audio}")
        if len(video) != 4:
            raise MmkitError(f"input 'video' must be [frames, channels, height, width] per sample, got shape {video}")
        return {
            "audio_frames": audio[0], "n_mels": audio[1],
            "video_frames": video[0], "frame_channels": video[1],
            "frame_height": video[2], "frame_width": video[3],
        }

    def at_width(self, width: int) -> Self:
        """Every dim rescaled from `width`; depths switch at 384 (rules in the module docstring)."""
        depths = ORIGINAL if width >= FULL_DEPTH_MIN_WIDTH else RTX3050  # whose depths to keep
        heads = largest_divisor_at_most(width, width // HEAD_DIM_TARGET)
        fusion_hidden = 2 * width
        # heads dividing `width` = hidden/2 keep head_dim even, as RoPE rotates pairs
        fusion_heads = largest_divisor_at_most(width, fusion_hidden // HEAD_DIM_TARGET)
        data = self.model_dump()
        # the audio branch keeps the seed's head count of its depth row (8 / 4) unless width / 64
        # is larger, so that both seed rows are points of the ladder
        audio_heads = largest_divisor_at_most(width, max(depths.audio.heads, width // HEAD_DIM_TARGET))
        data["audio"].update(
            dim=width,
            layers=depths.audio.layers,
            heads=audio_heads,
            ffn_dim=4 * width,  # the seed's 4× (512 → 2048)
            subsampling_channels=max(1, width // 4),
        )
        data["visual"].update(
            dim=width,
            cnn_channels=tuple(max(1, width // d) for d in (8, 4, 2, 1)),
            gscb_blocks=depths.visual.gscb_blocks,
            attention_blocks=depths.visual.attention_blocks,
            heads=heads,
            ffn_dim=4 * width,
        )
        data["fusion"].update(
            hidden=fusion_hidden,
            layers=depths.fusion.layers,
            attention_layers=None,
            heads=fusion_heads,
            kv_heads=largest_divisor_at_most(fusion_heads, fusion_heads // 2),
            ffn_dim=lfm2_ffn_dim(LFM2_FFN_BASE_MULTIPLIER * fusion_hidden),
            output_dim=width,
        )
        data["classifier"].update(hidden=(width, max(1, width // 2)))
        return type(self).model_validate(data)


# ----------------------------------------------------------------------------------------------
# Branches


class ConformerEncoder(nn.Module):
    def __init__(self, config: ConformerConfig, n_mels: int, dropout: float, checkpointing: bool):
        super().__init__()
        self.gradient_checkpointing = checkpointing
        self.subsampling = ConvSubsampling(n_mels, config.subsampling_channels, config.dim, dropout)
        self.layers = nn.ModuleList(
            ConformerLayer(config.dim, config.heads, config.ffn_dim, config.conv_kernel, dropout)
            for _ in range(config.layers)
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.subsampling(audio)  # (B, T_a, n_mels) → (B, T_a', D)
        for layer in self.layers:
            x = run_block(layer, x, self.gradient_checkpointing)  # (B, T_a', D)
        return x


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class FrameEncoder(nn.Module):
    """Per-frame CNN: stages of (3×3 stride 2, 3×3) conv-BN-ReLU, global average pool, Linear.

    Each stage halves the resolution; pooling makes the parameters independent of H and W.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += conv_bn_relu(in_channels, out_channels, stride=2)
            layers += conv_bn_relu(out_channels, out_channels, stride=1)
            in_channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h = self.stages(frames)  # (N, C, H, W) → (N, C_last, H/2^s, W/2^s)
        return self.proj(h.mean(dim=(2, 3)))  # (N, D)


class VisualEncoder(nn.Module):
    def __init__(
        self, config: VisualConfig, frame_channels: int, dropout: float, checkpointing: bool
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = checkpointing
        self.frames = FrameEncoder(frame_channels, config.cnn_channels, config.dim)
        gscbs = [
            GatedShortConvBlock(config.dim, config.gscb_kernel, dropout)
            for _ in range(config.gscb_blocks)
        ]
        attention = [
            TransformerBlock(config.dim, config.heads, config.ffn_dim, dropout)
            for _ in range(config.attention_blocks)
        ]
        self.temporal = nn.ModuleList(gscbs + attention)  # local mixing first, then global
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        batch, frames = video.shape[:2]  # (B, T_v, C, H, W)
        x = self.frames(video.flatten(0, 1)).view(batch, frames, -1)  # (B, T_v, D)
        for block in self.temporal:
            x = run_block(block, x, self.gradient_checkpointing)  # (B, T_v, D)
        return self.norm(x)  # (B, T_v, D)


class Lfm2Fusion(nn.Module):
    """[audio ; video] tokens projected to H with modality embeddings → LFM2 blocks → pooled."""

    def __init__(
        self, config: FusionConfig, audio_dim: int, video_dim: int, checkpointing: bool
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = checkpointing
        hidden = config.hidden
        self.audio_proj = nn.Linear(audio_dim, hidden)
        self.video_proj = nn.Linear(video_dim, hidden)
        self.modality_embedding = nn.Parameter(torch.empty(2, hidden))  # row 0 audio, row 1 video
        nn.init.normal_(self.modality_embedding, std=0.02)
        attention_layers = set(config.attention_layer_indices())
        self.layers = nn.ModuleList(
            Lfm2Block(
                hidden,
                config.ffn_dim,
                use_attention=i in attention_layers,
                heads=config.heads,
                kv_heads=config.kv_heads,
                conv_kernel=config.conv_kernel,
                rope_theta=config.rope_theta,
                norm_eps=config.norm_eps,
            )
            for i in range(config.layers)
        )
        self.norm = RMSNorm(hidden, config.norm_eps)
        self.out_proj = nn.Linear(hidden, config.output_dim)

    def forward(self, audio_tokens: torch.Tensor, video_tokens: torch.Tensor) -> torch.Tensor:
        audio = self.audio_proj(audio_tokens) + self.modality_embedding[0]  # (B, T_a', H)
        video = self.video_proj(video_tokens) + self.modality_embedding[1]  # (B, T_v, H)
        x = torch.cat([audio, video], dim=1)  # (B, T_a' + T_v, H)
        for layer in self.layers:
            x = run_block(layer, x, self.gradient_checkpointing)  # (B, T, H)
        pooled = self.norm(x).mean(dim=1)  # (B, H)
        return self.out_proj(pooled)  # (B, output_dim)


class ClassifierHead(nn.Sequential):
    """in → hidden[0] → … → num_classes, GELU and dropout between the Linears."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_classes: int, dropout: float):
        layers: list[nn.Module] = []
        for out_dim in hidden:
            layers += [nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout)]
            in_dim = out_dim
        layers.append(nn.Linear(in_dim, num_classes))
        super().__init__(*layers)


# ----------------------------------------------------------------------------------------------
# Model


class Lfm2EmotionNet(MultimodalModel):
    fsdp_blocks = (ConformerLayer, GatedShortConvBlock, TransformerBlock, Lfm2Block)

    def __init__(self, config: Lfm2Config) -> None:
        super().__init__(config)
        checkpointing = config.gradient_checkpointing
        self.audio = ConformerEncoder(config.audio, config.n_mels, config.dropout, checkpointing)
        self.visual = VisualEncoder(
            config.visual, config.frame_channels, config.dropout, checkpointing
        )
        self.fusion = Lfm2Fusion(config.fusion, config.audio.dim, config.visual.dim, checkpointing)
        self.classifier = ClassifierHead(
            config.fusion.output_dim, config.classifier.hidden, config.num_classes, config.dropout
        )

    def input_specs(self) -> dict[str, InputSpec]:
        c = self.config
        return {
            "audio": InputSpec((c.audio_frames, c.n_mels)),
            "video": InputSpec((c.video_frames, c.frame_channels, c.frame_height, c.frame_width)),
        }

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        audio_tokens = self.audio(audio)  # (B, T_a, n_mels) → (B, T_a', D_a)
        video_tokens = self.visual(video)  # (B, T_v, C, H, W) → (B, T_v, D_v)
        fused = self.fusion(audio_tokens, video_tokens)  # (B, output_dim)
        return self.classifier(fused)  # (B, num_classes)


ORIGINAL = Lfm2Config(
    audio=ConformerConfig(
        dim=512, layers=8, heads=8, ffn_dim=2048, conv_kernel=31, subsampling_channels=128
    ),
    visual=VisualConfig(
        dim=512,
        cnn_channels=(64, 128, 256, 512),
        gscb_blocks=2,
        attention_blocks=2,
        heads=8,
        ffn_dim=2048,
    ),
    fusion=FusionConfig(
        hidden=1024, layers=4, heads=16, kv_heads=8, ffn_dim=5632, output_dim=512
    ),  # layers: conv, conv, attention, conv
    classifier=ClassifierConfig(hidden=(512, 256)),
)

RTX3050 = Lfm2Config(
    audio=ConformerConfig(
        dim=128, layers=4, heads=4, ffn_dim=512, conv_kernel=31, subsampling_channels=32
    ),
    visual=VisualConfig(
        dim=128,
        cnn_channels=(16, 32, 64, 128),
        gscb_blocks=1,
        attention_blocks=1,
        heads=2,
        ffn_dim=512,
    ),
    fusion=FusionConfig(
        hidden=256, layers=2, heads=4, kv_heads=2, ffn_dim=1536, output_dim=128
    ),  # layers: conv, attention
    classifier=ClassifierConfig(hidden=(128, 64)),
)

LFM2_LADDER = (512, 384, 256, 192, 128, 96, 64)  # from the seed's original (512) down


@register_model(
    sizes={"original": ORIGINAL, "rtx3050": RTX3050},
    default_size="rtx3050",
    ladder=LFM2_LADDER,
    default_data="synthetic-av",
)
def lfm2(config: Lfm2Config) -> Lfm2EmotionNet:
    """Audio-visual emotion recognizer: Conformer audio, CNN+GSCB video, LFM2 fusion (RAVDESS)."""
    return Lfm2EmotionNet(config)
