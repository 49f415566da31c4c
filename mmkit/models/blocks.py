"""Shared layers for the sequence families: norms, RoPE, attention, Conformer and LFM2 blocks.

Every layer states its parameter count in its docstring, so that a count can be checked by hand
against the published LFM2 and Conformer papers' layer definitions. Shapes: B batch, T sequence length, D (or H) model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, x: torch.Tensor, gradient_checkpointing: bool) -> torch.Tensor:
    """`block(x)`; when checkpointing a training step, recomputed in the backward pass, not kept.

    Dropout masks are replayed exactly (checkpoint restores the RNG state). A caveat worth knowing:
    a BatchNorm inside the block updates its running statistics a second time on recomputation.
    """
    if gradient_checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest d ≤ limit (and ≥ 1) that divides n: a head count that keeps head_dim whole."""
    for d in range(max(1, min(limit, n)), 0, -1):
        if n % d == 0:
            return d
    return 1


# ----------------------------------------------------------------------------------------------
# Norms, positions, feed-forward


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 as in HF `Lfm2RMSNorm`. Parameters: dim."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # (..., dim)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight  # (..., dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (HF `rotate_half` layout) over positions 0..T-1.

    q, k: (B, heads, T, d). The tables are built on the fly (no buffers), so that they follow the
    tensors' device and dtype, meta included, and any sequence length.
    """
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    exponents = torch.arange(0, head_dim, 2, device=q.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (d/2,)
    positions = torch.arange(seq_len, device=q.device, dtype=torch.float32)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, d)
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    q = q * cos + rotate_half(q) * sin  # (B, heads, T, d)
    k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
    return q, k


class SwiGLU(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x), no biases (HF `Lfm2MLP`). Parameters: 3·dim·hidden."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, D)


def lfm2_ffn_dim(base_dim: int, multiple_of: int = 256) -> int:
    """LFM2's `block_auto_adjust_ff_dim`: int(2·base/3), rounded up to a multiple of 256.

    Bias-free SwiGLU has three matrices instead of two, so 2/3 of the base width keeps the
    parameter count of a plain FFN of width `base`.
    """
    reduced = int(2 * base_dim / 3)
    return multiple_of * ((reduced + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------------------------
# Attention


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with biases, the parameter layout of `nn.MultiheadAttention`: 4D² + 4D.

    One fused qkv projection and an output projection, computed with SDPA; no positional terms
    (the Conformer's convolution module and the GSCBs carry position).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide width {dim}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape  # (B, T, D)
        qkv = self.qkv(x).view(batch, seq_len, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, d)
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, T, d)
        attended = attended.transpose(1, 2).reshape(batch, seq_len, dim)  # (B, T, D)
        return self.out(attended)  # (B, T, D)


class GroupedQueryAttention(nn.Module):
    """HF `Lfm2Attention`: GQA, no biases, per-head RMSNorm on q and k (QK-norm) before RoPE.

    Parameters (heads·d = H): 2H² + 2H·kv_heads·d + 2d. Attention here is bidirectional: the
    fused tokens are mean-pooled for classification, so no token has a reason to hide the future
    (HF's causal LM masks it).
    """

    def __init__(
        self, hidden: int, heads: int, kv_heads: int, rope_theta: float, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"need heads | hidden, kv_heads | heads: {hidden} {heads} {kv_heads}")
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = hidden // heads
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape  # (B, T, H)
        q = self.q_proj(x).view(batch, seq_len, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, self.kv_heads, self.head_dim)
        q = self.q_layernorm(q).transpose(1, 2)  # (B, heads, T, d)
        k = self.k_layernorm(k).transpose(1, 2)  # (B, kv_heads, T, d)
        v = v.transpose(1, 2)  # (B, kv_heads, T, d)
        q, k = apply_rope(q, k, self.rope_theta)
        group = self.heads // self.kv_heads  # query heads sharing one key/value head
        k = k.repeat_interleave(group, dim=1)  # (B, heads, T, d)
        v = v.repeat_interleave(group, dim=1)  # (B, heads, T, d)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        attended = attended.transpose(1, 2).reshape(batch, seq_len, self.heads * self.head_dim)
        return self.out_proj(attended)  # (B, T, H)


# ----------------------------------------------------------------------------------------------
# LFM2


class Lfm2ShortConv(nn.Module):
    """HF `Lfm2ShortConv`: double-gated causal short convolution. Parameters: 4H² + kernel·H.

    in_proj H → 3H splits into gates B, C and input x; y = C ⊙ conv(B ⊙ x), with a depthwise
    convolution made causal by padding kernel-1 on both sides and keeping the first T outputs.
    """

    def __init__(self, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        self.in_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.conv = nn.Conv1d(
            hidden, hidden, kernel, groups=hidden, padding=kernel - 1, bias=False
        )
        self.out_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]  # x: (B, T, H)
        gate_b, gate_c, inputs = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)  # each (B, H, T)
        mixed = self.conv(gate_b * inputs)[..., :seq_len]  # (B, H, T): position t sees ≤ t
        return self.out_proj((gate_c * mixed).transpose(1, 2))  # (B, T, H)


class Lfm2Block(nn.Module):
    """HF `Lfm2DecoderLayer`: h += op(RMSNorm(h)); h += SwiGLU(RMSNorm(h)).

    op is the gated short convolution or grouped-query attention.
    """

    def __init__(
        self,
        hidden: int,
        ffn_dim: int,
        use_attention: bool,
        heads: int,
        kv_heads: int,
        conv_kernel: int,
        rope_theta: float,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.operator_norm = RMSNorm(hidden, norm_eps)
        if use_attention:
            self.operator: nn.Module = GroupedQueryAttention(
                hidden, heads, kv_heads, rope_theta, norm_eps
            )
        else:
            self.operator = Lfm2ShortConv(hidden, conv_kernel)
        self.ffn_norm = RMSNorm(hidden, norm_eps)
        self.feed_forward = SwiGLU(hidden, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.operator(self.operator_norm(x))  # (B, T, H)
        return x + self.feed_forward(self.ffn_norm(x))  # (B, T, H)


# ----------------------------------------------------------------------------------------------
# Conformer (Gulati et al. 2020, torchaudio layout)


class ConformerFeedForward(nn.Module):
    """LN → Linear(D, F) → SiLU → dropout → Linear(F, D) → dropout. Parameters: 2DF + F + 3D."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ffn_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, T, D)


class ConformerConvModule(nn.Module):
    """LN → pointwise Conv1d(D, 2D) → GLU → depthwise Conv1d(K, same) → BN → SiLU → pointwise
    Conv1d(D, D) → dropout; all convolutions bias-free as in torchaudio. Parameters: 3D² + DK + 4D.
    """

    def __init__(self, dim: int, kernel: int, dropout: float) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"the depthwise kernel must be odd for 'same' padding, got {kernel}")
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1, bias=False)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        self.batch_norm = nn.BatchNorm1d(dim)
        self.pointwise_out = nn.Conv1d(dim, dim, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).transpose(1, 2)  # (B, D, T)
        h = F.glu(self.pointwise_in(h), dim=1)  # (B, 2D, T) → (B, D, T)
        h = F.silu(self.batch_norm(self.depthwise(h)))  # (B, D, T)
        h = self.pointwise_out(h)  # (B, D, T)
        return self.dropout(h.transpose(1, 2))  # (B, T, D)


class ConformerLayer(nn.Module):
    """x + ½·FFN → x + MHSA(LN x) → x + Conv → x + ½·FFN → LayerNorm.

    Parameters: 7D² + 4DF + DK + 2F + 18D (BatchNorm running statistics are buffers).
    """

    def __init__(
        self, dim: int, heads: int, ffn_dim: int, conv_kernel: int, dropout: float
    ) -> None:
        super().__init__()
        self.ffn1 = ConformerFeedForward(dim, ffn_dim, dropout)
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadSelfAttention(dim, heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.conv = ConformerConvModule(dim, conv_kernel, dropout)
        self.ffn2 = ConformerFeedForward(dim, ffn_dim, dropout)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(x)  # (B, T, D); macaron: two half-step FFNs around the core
        x = x + self.attention_dropout(self.attention(self.attention_norm(x)))  # (B, T, D)
        x = x + self.conv(x)  # (B, T, D)
        x = x + 0.5 * self.ffn2(x)  # (B, T, D)
        return self.final_norm(x)  # (B, T, D)


class ConvSubsampling(nn.Module):
    """Two Conv2d 3×3 stride 2 + ReLU over the (time, mel) plane, then Linear(channels·freq', D).

    The ESPnet `Conv2dSubsampling` layout (no padding): T → ((T−1)//2 − 1)//2 frames, i.e. a
    40 ms token stride from 10 ms frames; 80 mels → 19 frequency bins.
    """

    def __init__(self, n_mels: int, channels: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(),
        )  # fmt: skip
        freq_bins = self.output_length(n_mels)
        self.proj = nn.Linear(channels * freq_bins, dim)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def output_length(length: int) -> int:
        """Length after the two unpadded 3×3 stride-2 convolutions (needs length ≥ 7)."""
        return ((length - 1) // 2 - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x.unsqueeze(1))  # (B, T, n_mels) → (B, C, T', F')
        batch, channels, frames, freq = h.shape
        h = h.permute(0, 2, 1, 3).reshape(batch, frames, channels * freq)  # (B, T', C·F')
        return self.dropout(self.proj(h))  # (B, T', D)


# ----------------------------------------------------------------------------------------------
# Temporal blocks for frame sequences


class GatedShortConvBlock(nn.Module):
    """The seed's GSCB: LN → Linear(D, 3·2D) → split B, C, x → x·σ(B) → causal depthwise conv
    (kernel 4) → ·σ(C) → Linear(2D, D) → dropout → residual.

    Parameters: 2D (LN) + 12D² + 6D (in) + 8D + 2D (conv, kernel 4, bias) + 2D² + D (out).
    """

    expansion = 2  # the gated inner width is 2D

    def __init__(self, dim: int, kernel: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = self.expansion * dim
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 3 * inner)
        self.conv = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1)
        self.out_proj = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]  # x: (B, T, D)
        gate_b, gate_c, inputs = self.in_proj(self.norm(x)).transpose(1, 2).chunk(3, dim=1)
        mixed = inputs * torch.sigmoid(gate_b)  # (B, 2D, T)
        mixed = self.conv(mixed)[..., :seq_len]  # (B, 2D, T), causal
        mixed = (mixed * torch.sigmoid(gate_c)).transpose(1, 2)  # (B, T, 2D)
        return x + self.dropout(self.out_proj(mixed))  # (B, T, D)


class TransformerBlock(nn.Module):
    """Pre-norm: x + MHSA(LN x); x + FFN(LN x) with FFN = Linear → GELU → dropout → Linear.

    Parameters: 4D² + 4D (attention) + 2DF + F + D (FFN) + 4D (two LNs).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadSelfAttention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x)))  # (B, T, D)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))  # (B, T, D)
