"""The `lfm2` family: parameter formulas of the LFM2 and Conformer layers, sizes, causality, training step."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import mmkit.models.lfm2  # noqa: F401  (registers the family until mmkit.models imports it)
from mmkit.models.blocks import (
    ConformerLayer,
    GatedShortConvBlock,
    GroupedQueryAttention,
    Lfm2ShortConv,
    lfm2_ffn_dim,
)
from mmkit.models.lfm2 import LFM2_LADDER, ORIGINAL, RTX3050, FusionConfig, Lfm2Config, lfm2
from mmkit.models.registry import create_model, get_model_entry


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_on_meta(config: Lfm2Config) -> torch.nn.Module:
    with torch.device("meta"):
        return lfm2(config)


@pytest.fixture
def one_thread():
    """Tiny CPU steps run faster on one thread, and do not stall when other test runs share the
    two cores (two OpenMP pools spinning on two cores slow each other down many times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides: object) -> Lfm2Config:
    """Width 64 with short inputs: a real CPU training step in well under a second."""
    small = RTX3050.at_width(64)
    data = small.model_dump() | {
        "audio_frames": 40,
        "video_frames": 4,
        "frame_height": 16,
        "frame_width": 16,
    }
    return Lfm2Config.model_validate(data | overrides)


# ---------------------------------------------------------------------------------------------
# Parameter formulas


@pytest.mark.parametrize(
    ("dim", "heads", "ffn", "kernel", "expected"),
    [(512, 8, 2048, 31, 6_058_496), (128, 4, 512, 31, 384_128)],
)
def test_conformer_layer_matches_published_formula(
    dim: int, heads: int, ffn: int, kernel: int, expected: int
) -> None:
    with torch.device("meta"):
        layer = ConformerLayer(dim, heads, ffn_dim=ffn, conv_kernel=kernel, dropout=0.1)
    formula = 7 * dim**2 + 4 * dim * ffn + dim * kernel + 2 * ffn + 18 * dim
    assert formula == expected
    assert n_params(layer) == expected


@pytest.mark.parametrize("hidden", [1024, 256, 48])
def test_lfm2_short_conv_params(hidden: int) -> None:
    with torch.device("meta"):
        op = Lfm2ShortConv(hidden, kernel=3)
    assert n_params(op) == 4 * hidden**2 + 3 * hidden
    if hidden == 1024:
        assert n_params(op) == 4_197_376


def test_gqa_attention_params() -> None:
    hidden, heads, kv_heads = 1024, 16, 8
    head_dim = hidden // heads
    with torch.device("meta"):
        attention = GroupedQueryAttention(hidden, heads, kv_heads, rope_theta=1e6)
    formula = 2 * hidden**2 + 2 * hidden * kv_heads * head_dim + 2 * head_dim
    assert formula == 3_145_856
    assert n_params(attention) == formula


def test_gscb_params() -> None:
    dim = 512
    with torch.device("meta"):
        block = GatedShortConvBlock(dim, kernel=4)
    inner = 2 * dim
    expected = 2 * dim + (dim * 3 * inner + 3 * inner) + (4 * inner + inner) + (inner * dim + dim)
    assert n_params(block) == expected == 2_106_880


def test_lfm2_ffn_dim_rule() -> None:
    assert lfm2_ffn_dim(6656) == 4608  # LFM2-350M: 6656 → 4437 → 4608
    assert lfm2_ffn_dim(8 * 1024) == 5632  # the fusion width at H = 1024


# ---------------------------------------------------------------------------------------------
# Sizes


def component_params(config: Lfm2Config) -> dict[str, int]:
    model = build_on_meta(config)
    return {name: n_params(child) for name, child in model.named_children()}


def test_original_size_components_and_total() -> None:
    parts = component_params(ORIGINAL)
    assert list(parts) == ["audio", "visual", "fusion", "classifier"]
    assert parts == {
        "audio": 49_862_528,  # 8 × 6,058,496 + a 1,394,560 subsampling front end
        "visual": 15_469_504,
        "fusion": 86_530_688,
        "classifier": 396_040,
    }
    assert 126_650_000 <= sum(parts.values()) <= 171_350_000


def test_rtx3050_size_total() -> None:
    parts = component_params(RTX3050)
    assert sum(parts.values()) == 5_211_544
    assert sum(parts.values()) <= 20_000_000


def test_fusion_layer_pattern() -> None:
    def ops(layers: int) -> list[str]:
        config = ORIGINAL.fusion.model_copy(update={"layers": layers})
        attention = config.attention_layer_indices()
        return ["attention" if i in attention else "conv" for i in range(layers)]

    assert ops(1) == ["attention"]
    assert ops(2) == ["conv", "attention"]
    assert ops(4) == ["conv", "conv", "attention", "conv"]
    assert ops(6) == ["conv", "conv", "attention", "conv", "conv", "attention"]
    model = build_on_meta(ORIGINAL)
    built = [type(layer.operator).__name__ for layer in model.fusion.layers]
    assert built == ["Lfm2ShortConv", "Lfm2ShortConv", "GroupedQueryAttention", "Lfm2ShortConv"]


def test_width_rules() -> None:
    assert ORIGINAL.width == 512 and RTX3050.width == 128
    assert RTX3050.at_width(512) == ORIGINAL
    # both seed rows are points of the ladder, whichever row the rescaling starts from
    assert ORIGINAL.at_width(128) == RTX3050
    assert component_params(ORIGINAL.at_width(128)) == component_params(RTX3050)


@pytest.mark.parametrize("width", [*LFM2_LADDER, 67, 5])
def test_ladder_and_odd_widths_build_and_run_on_meta(width: int) -> None:
    config = RTX3050.at_width(width)
    assert config.width == width
    model = build_on_meta(config)
    logits = model(**model.example_inputs(2, device="meta"))
    assert logits.shape == (2, 8)


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValidationError):
        FusionConfig(hidden=256, heads=3)
    with pytest.raises(ValidationError):
        FusionConfig(layers=2, attention_layers=(2,))
    with pytest.raises(ValidationError):
        Lfm2Config(audio_frames=5)
    with pytest.raises(ValidationError):
        FusionConfig(hidden=134, heads=2, kv_heads=1)  # head_dim 67: RoPE needs pairs


def test_registry_entry_and_overrides() -> None:
    entry = get_model_entry("lfm2")
    assert entry.default_size == "rtx3050"
    assert set(entry.sizes) == {"original", "rtx3050"}
    assert entry.ladder == LFM2_LADDER
    assert entry.default_data == "synthetic-av"
    with torch.device("meta"):
        model = create_model("lfm2", "w64", **{"fusion.layers": 3, "video_frames": 8})
    assert len(model.fusion.layers) == 3
    assert model.input_specs()["video"].shape == (8, 3, 64, 64)
    assert model.input_specs()["audio"].shape == (300, 80)


def test_params_do_not_depend_on_input_shapes() -> None:
    other = RTX3050.model_copy(
        update={"audio_frames": 123, "video_frames": 7, "frame_height": 48, "frame_width": 80}
    )
    assert component_params(other) == component_params(RTX3050)
    model = build_on_meta(other)
    assert model(**model.example_inputs(3, device="meta")).shape == (3, 8)


# ---------------------------------------------------------------------------------------------
# Behaviour


@pytest.mark.parametrize("block_class", [Lfm2ShortConv, GatedShortConvBlock])
def test_short_convolutions_are_causal(
    block_class: type[torch.nn.Module], one_thread: None
) -> None:
    torch.manual_seed(0)
    block = block_class(16).eval()
    x = torch.randn(2, 12, 16)
    changed = x.clone()
    cut = 7
    changed[:, cut:] = torch.randn(2, 12 - cut, 16)  # rewrite the future from position 7 on
    with torch.no_grad():
        before, after = block(x), block(changed)
    torch.testing.assert_close(before[:, :cut], after[:, :cut], rtol=0, atol=0)
    assert not torch.allclose(before[:, cut:], after[:, cut:])


def test_training_step_gives_finite_logits_and_gradients_on_all_params(one_thread: None) -> None:
    torch.manual_seed(0)
    model = lfm2(tiny_config()).train()
    inputs = model.example_inputs(2, seed=0)
    logits = model(**inputs)
    assert logits.shape == (2, 8)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 5])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_same_loss_and_gradients(one_thread: None) -> None:
    torch.manual_seed(0)
    plain = lfm2(tiny_config(dropout=0.0)).train()
    checkpointed = lfm2(tiny_config(dropout=0.0, gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    inputs = plain.example_inputs(2, seed=1)
    labels = torch.tensor([3, 1])
    losses = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        losses[name] = torch.nn.functional.cross_entropy(model(**inputs), labels)
        losses[name].backward()
    torch.testing.assert_close(losses["plain"], losses["checkpointed"])
    grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, msg=name)

