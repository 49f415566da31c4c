"""The `clip` and `fusion` families and the byte-level tokenizer they read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import mmkit.models.clip
import mmkit.models.fusion  # noqa: F401  (registers `fusion`)
from mmkit.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    decode,
    encode,
    encode_batch,
)
from mmkit.errors import MmkitError
from mmkit.models.clip import ClipConfig, ClipOutput, TransformerBlock
from mmkit.models.fusion import FusionOutput
from mmkit.models.registry import create_model, get_model_entry, logits_of

FAMILIES = ["clip", "fusion"]
SMALL = "w32"  # at_width(32): one 32-wide head, every depth of the default size
TEXTS = ["a photo of a sneaker", "a photo of a bag", "ankle boot", "T-shirt / top"]


def small_model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(family, SMALL, **overrides)


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def contrastive_loss(contrastive_logits: torch.Tensor) -> torch.Tensor:
    targets = torch.arange(contrastive_logits.shape[0])
    image_to_text = F.cross_entropy(contrastive_logits, targets)
    text_to_image = F.cross_entropy(contrastive_logits.t(), targets)
    return (image_to_text + text_to_image) / 2


def training_loss(output, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits, labels) + 0.3 * contrastive_loss(output.contrastive_logits)


def assert_outputs_close(first, second, atol: float = 1e-5) -> None:
    for name, a, b in zip(first._fields, first, second, strict=True):
        assert torch.allclose(a, b, atol=atol), name


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["a photo of a sneaker", "áo sơ mi 👕 — Größe", ""])
def test_tokenizer_round_trip_pads_with_zero(text):
    ids = encode(text, 64)
    n_bytes = len(text.encode("utf-8"))
    assert len(ids) == 64
    assert ids[0] == BOS_ID and ids[n_bytes + 1] == EOS_ID
    assert ids[n_bytes + 2 :] == [PAD_ID] * (64 - n_bytes - 2)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert decode(ids) == text


def test_tokenizer_truncates_to_context_length_keeping_eos_and_whole_characters():
    ids = encode("ab👕cd", 7)  # room for 5 bytes; 👕 is 4 bytes and must not be split
    assert len(ids) == 7
    assert ids[0] == BOS_ID and EOS_ID in ids
    assert decode(ids) == "ab"
    long_ids = encode("x" * 100, 32)
    assert long_ids[-1] == EOS_ID and decode(long_ids) == "x" * 30
    with pytest.raises(ValueError, match="context_length"):
        encode("x", 1)


def test_encode_batch_is_a_long_tensor_of_encoded_rows():
    batch = encode_batch(TEXTS, 32)
    assert batch.dtype == torch.long and batch.shape == (len(TEXTS), 32)
    assert [decode(row) for row in batch] == TEXTS
    assert encode_batch([], 32).shape == (0, 32)


# --------------------------------------------------------------------------- sizes and counts


def block_params(width: int, ffn_hidden: int) -> int:
    """One pre-norm block: q, kv and out projections with biases, two LayerNorms, the FFN."""
    attention = 4 * width * width + 4 * width
    ffn = 2 * width * ffn_hidden + ffn_hidden + width
    layer_norms = 2 * 2 * width
    return attention + ffn + layer_norms


def component_params(model: torch.nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}


@pytest.mark.parametrize("family", FAMILIES)
def test_named_sizes_follow_the_seed_and_count_by_formula(family):
    entry = get_model_entry(family)
    assert entry.default_size == "default" and entry.default_data == "synthetic-fashion"
    with torch.device("meta"):
        baseline = entry.build(entry.sizes["baseline"])
        default = entry.build(entry.sizes["default"])
    expected_children = {
        "clip": ["image_encoder", "text_encoder", "projection", "head"],
        "fusion": ["image_encoder", "text_encoder", "cross_attention", "projection", "head"],
    }[family]
    assert [name for name, _ in default.named_children()] == expected_children

    big, small = component_params(baseline), component_params(default)
    assert sum(big.values()) > sum(small.values())
    width = 128
    # text: 3 layers with FFN 4×D → 2 layers with FFN 3×D
    assert big["text_encoder"] - small["text_encoder"] == (
        3 * block_params(width, 4 * width) - 2 * block_params(width, 3 * width)
    )
    text_embeddings = VOCAB_SIZE * width + 32 * width  # tokens + 32 learned positions
    assert small["text_encoder"] == text_embeddings + 2 * block_params(width, 3 * width) + 2 * width
    # ViT: depth 6 → 5, MLP 4×D
    assert big["image_encoder"] - small["image_encoder"] == block_params(width, 4 * width)
    patch_embed = 16 * width + width  # Conv2d(1, D, 4, 4) with bias
    vit_tokens = (1 + 49) * width + width  # positions of CLS + 49 patches, the CLS token
    assert small["image_encoder"] == patch_embed + vit_tokens + 5 * block_params(width, 4 * width) + 2 * width
    assert small["projection"] == 2 * width * 128 + 1  # two bias-free Linears + logit_scale
    if family == "fusion":
        assert small["cross_attention"] == 2 * block_params(width, 4 * width) + 2 * width


def test_at_width_keeps_32_wide_heads_and_depths():
    config = get_model_entry("clip").sizes["default"]
    assert config.width == 128 and config.heads == 4
    for width in get_model_entry("clip").ladder:
        scaled = config.at_width(width)
        assert (scaled.width, scaled.embed_dim, scaled.heads) == (width, width, width // 32)
        assert (scaled.depth, scaled.text_layers) == (config.depth, config.text_layers)
    assert config.at_width(100).heads == 2  # 100 // 32 = 3 does not divide 100
    with pytest.raises(ValidationError, match="divisible"):
        ClipConfig(embed_width=128, heads=3)
    with pytest.raises(MmkitError, match="heads"):
        create_model("clip", heads=3)


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("family", FAMILIES)
def test_small_forward_backward_reaches_every_parameter(family):
    model = small_model(family)
    inputs = model.example_inputs(3, seed=0)
    assert inputs["text"].dtype == torch.long and inputs["text"].shape == (3, 32)
    output = model(**inputs)
    assert isinstance(output, {"clip": ClipOutput, "fusion": FusionOutput}[family])
    assert output.logits.shape == (3, 10) and torch.isfinite(output.logits).all()
    assert output.contrastive_logits.shape == (3, 3)
    assert torch.allclose(output.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    training_loss(output, torch.tensor([0, 4, 9])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_and_tokens_after_eos_do_not_change_outputs(family):
    model = small_model(family).eval()
    image = images(len(TEXTS))
    short = encode_batch(TEXTS, 24)
    reference = model(image, short)
    longer = encode_batch(TEXTS, 32)  # eight more pad tokens per row
    assert_outputs_close(model(image, longer), reference)
    after_eos = torch.arange(32) > (longer == EOS_ID).long().argmax(dim=1, keepdim=True)
    junk = torch.randint(3, VOCAB_SIZE, longer.shape, generator=torch.Generator().manual_seed(2))
    assert_outputs_close(model(image, torch.where(after_eos, junk, longer)), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_all_padding_row_stays_finite(family):
    model = small_model(family).eval()
    text = encode_batch(TEXTS[:2], 32)
    text[1] = PAD_ID
    output = model(images(2), text)
    assert all(torch.isfinite(tensor).all() for tensor in output)


def test_text_longer_than_context_length_is_refused():
    model = small_model("clip")
    with pytest.raises(MmkitError, match="context_length=40"):
        model(images(1), encode_batch(["x"], 40))


def test_clip_logits_do_not_depend_on_the_text():
    model = small_model("clip").eval()
    image = images(4)
    with_text = model(image, encode_batch(TEXTS, 32))
    other_text = model(image, encode_batch(TEXTS[::-1], 32))
    assert torch.equal(with_text.logits, other_text.logits)
    assert not torch.allclose(with_text.contrastive_logits, other_text.contrastive_logits)
    image_only = model(image)
    assert torch.allclose(image_only.logits, with_text.logits)
    assert image_only.text_embeds is None and image_only.contrastive_logits is None


def test_fusion_logits_depend_on_the_text():
    model = small_model("fusion").eval()
    image = images(4)
    with_text = model(image, encode_batch(TEXTS, 32))
    other_text = model(image, encode_batch(TEXTS[::-1], 32))
    assert (with_text.logits - other_text.logits).abs().max() > 1e-4
    assert torch.equal(with_text.image_embeds, other_text.image_embeds)  # unfused image side


def test_clip_accepts_precomputed_text_embeddings():
    model = small_model("clip").eval()
    image, text = images(4), encode_batch(TEXTS, 32)
    cached = model.encode_text(text)
    assert cached.shape == (4, 32)  # embed_dim follows the width: 32 at w32
    assert_outputs_close(model(image, text_embeds=cached), model(image, text), atol=0)
    assert torch.allclose(model.encode_image(image), model(image).image_embeds)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(family):
    plain = small_model(family, dropout=0.0)
    checkpointed = small_model(family, dropout=0.0, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    block_calls = []
    for module in checkpointed.modules():
        if isinstance(module, TransformerBlock):
            module.register_forward_pre_hook(lambda *_: block_calls.append(1))
    n_blocks = sum(isinstance(module, TransformerBlock) for module in checkpointed.modules())
    inputs, labels = plain.example_inputs(3, seed=0), torch.tensor([1, 2, 3])

    losses = []
    for model in (plain, checkpointed):
        loss = training_loss(model(**inputs), labels)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert len(block_calls) == 2 * n_blocks  # forward, then recomputed in backward
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_contract_logits_of(family):
    model = small_model(family).eval()
    assert logits_of(model(**model.example_inputs(2, seed=3))).shape == (2, 10)
