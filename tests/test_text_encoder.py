"""Tests for latentforge.text_encoder against transformers' CLIPTextModel built in the test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentforge.text_encoder import (
    SD1_TEXT_ENCODER,
    SD2_TEXT_ENCODER,
    TextEncoder,
    TextEncoderConfig,
)

from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

BOS_ID = 49406
EOS_ID = 49407
VOCAB = 49408
PREFIX = "text_model."

# Tolerance for float32 parity; both sides do the same math, so differences are rounding only.
TOL = dict(atol=1e-5, rtol=1e-5)

# Tiny shapes for the two Stable Diffusion generations: (hidden, layers, heads, intermediate, act).
TINY_SHAPES = {
    "sd1_quick_gelu": (32, 3, 4, 37, "quick_gelu"),
    "sd2_gelu": (64, 5, 4, 128, "gelu"),
}


def hf_config(width: int, layers: int, heads: int, mlp_width: int, act: str) -> CLIPTextConfig:
    """A CLIPTextConfig with SD's vocabulary/positions and the given tower shape."""
    return CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp_width,
        hidden_act=act,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,
    )


def our_config(width: int, layers: int, heads: int, mlp_width: int, act: str) -> TextEncoderConfig:
    """The TextEncoderConfig matching hf_config with the same arguments."""
    return TextEncoderConfig(
        vocab_size=VOCAB, max_length=77, width=width, layers=layers, heads=heads, mlp_width=mlp_width, activation=act
    )


def stripped_state_dict(reference: CLIPTextModel) -> dict[str, torch.Tensor]:
    """Reference state dict with 'text_model.' removed and the position_ids buffer dropped."""
    # transformers 4.x keeps the prefix in memory; 5.x flattened the module and only
    # checkpoint files (e.g. SD's text_encoder/model.safetensors) still carry it.
    out = {}
    for key, value in reference.state_dict().items():
        key = key.removeprefix(PREFIX)
        if key == "embeddings.position_ids":
            continue
        out[key] = value
    return out


def randomize_layer_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give layer norms non-trivial affine params so a dropped/misplaced norm is detected."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))


@pytest.fixture(scope="module", params=sorted(TINY_SHAPES))
def pair(request: pytest.FixtureRequest) -> tuple[CLIPTextModel, TextEncoder]:
    """A seeded tiny reference model and a TextEncoder loaded from its weights."""
    shape = TINY_SHAPES[request.param]
    torch.manual_seed(0)
    config = hf_config(*shape)
    config._attn_implementation = "eager"  # independent reference: explicit softmax path
    reference = CLIPTextModel(config).eval()
    randomize_layer_norms(reference, torch.Generator().manual_seed(1))
    ours = TextEncoder(our_config(*shape)).eval()
    ours.load_state_dict(stripped_state_dict(reference), strict=True)
    return reference, ours


def make_ids(pad_id: int, length: int = 77, prompt_lengths: tuple[int, ...] = (5, 40)) -> torch.Tensor:
    """(2, length) CLIP-style ids: BOS, random tokens, EOS, then padding with pad_id."""
    generator = torch.Generator().manual_seed(123)
    rows = []
    for n in prompt_lengths:
        body = torch.randint(0, BOS_ID, (n,), generator=generator)
        row = torch.cat([torch.tensor([BOS_ID]), body, torch.tensor([EOS_ID])])
        row = torch.cat([row, torch.full((length - row.numel(),), pad_id)])
        rows.append(row[:length])
    return torch.stack(rows)


def reference_output(reference: CLIPTextModel, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """What A1111/diffusers take for clip_skip: hidden_states[-clip_skip] after final_layer_norm."""
    out = reference(input_ids=ids, output_hidden_states=True)
    if clip_skip == 1:
        return out.last_hidden_state
    tower = getattr(reference, "text_model", reference)  # transformers 4.x nests the tower
    return tower.final_layer_norm(out.hidden_states[-clip_skip])


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@pytest.mark.parametrize("pad_id", [EOS_ID, 0], ids=["pad_eos", "pad_zero"])
@torch.no_grad()
def test_parity_with_transformers(pair: tuple[CLIPTextModel, TextEncoder], pad_id: int, clip_skip: int) -> None:
    """Full-length (77) outputs match CLIPTextModel for clip_skip 1..3 and both paddings."""
    reference, ours = pair
    ids = make_ids(pad_id)
    expected = reference_output(reference, ids, clip_skip)
    actual = ours(ids, clip_skip=clip_skip)
    assert actual.shape == (2, 77, ours.config.width)
    torch.testing.assert_close(actual, expected, **TOL)


@torch.no_grad()
def test_parity_short_sequence(pair: tuple[CLIPTextModel, TextEncoder]) -> None:
    """Sequences shorter than max_length use the first T positions, like the reference."""
    reference, ours = pair
    ids = make_ids(pad_id=0, length=12, prompt_lengths=(3, 10))
    torch.testing.assert_close(ours(ids), reference(input_ids=ids).last_hidden_state, **TOL)


@torch.no_grad()
def test_attention_is_causal(pair: tuple[CLIPTextModel, TextEncoder]) -> None:
    """Changing tokens after position t leaves outputs at positions <= t unchanged."""
    _, ours = pair
    ids = make_ids(pad_id=0)
    changed = ids.clone()
    changed[:, 50:] = 1234
    a, b = ours(ids), ours(changed)
    torch.testing.assert_close(a[:, :50], b[:, :50], atol=0, rtol=0)
    assert not torch.allclose(a[:, 50:], b[:, 50:])


@torch.no_grad()
def test_clip_skip_does_not_run_later_layers(pair: tuple[CLIPTextModel, TextEncoder]) -> None:
    """clip_skip=k runs exactly layers-k+1 layers."""
    _, ours = pair
    calls: list[int] = []
    handles = [
        layer.register_forward_hook(lambda module, args, output, i=i: calls.append(i))
        for i, layer in enumerate(ours.encoder.layers)
    ]
    try:
        ours(make_ids(pad_id=0), clip_skip=2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(ours.config.layers - 1))


@torch.no_grad()
def test_meta_construction_then_assign_load(pair: tuple[CLIPTextModel, TextEncoder]) -> None:
    """Built on meta and loaded with assign=True, the model runs and matches the reference."""
    reference, ours = pair
    with torch.device("meta"):
        lazy = TextEncoder(ours.config)
    lazy.load_state_dict(stripped_state_dict(reference), strict=True, assign=True)
    ids = make_ids(pad_id=EOS_ID)
    torch.testing.assert_close(lazy(ids), reference(input_ids=ids).last_hidden_state, **TOL)


def test_state_dict_keys_tiny() -> None:
    """Tiny config: keys and shapes equal the reference's minus prefix and position_ids."""
    shape = TINY_SHAPES["sd1_quick_gelu"]
    expected = {k: v.shape for k, v in stripped_state_dict(CLIPTextModel(hf_config(*shape))).items()}
    actual = {k: v.shape for k, v in TextEncoder(our_config(*shape)).state_dict().items()}
    assert actual == expected


def test_prefixed_keys_load_into_transformers_checkpoint_format(tmp_path) -> None:
    """Our state dict with 'text_model.' prepended is a complete CLIPTextModel checkpoint."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    shape = TINY_SHAPES["sd2_gelu"]
    ours = TextEncoder(our_config(*shape))
    hf_config(*shape).save_pretrained(tmp_path)
    tensors = {PREFIX + k: v.contiguous() for k, v in ours.state_dict().items()}
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    reference, info = CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = stripped_state_dict(reference)
    assert loaded.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize(
    ("preset", "shape"),
    [
        (SD1_TEXT_ENCODER, (768, 12, 12, 3072, "quick_gelu")),
        (SD2_TEXT_ENCODER, (1024, 23, 16, 4096, "gelu")),
    ],
    ids=["sd1", "sd2"],
)
def test_state_dict_keys_full_presets_on_meta(preset: TextEncoderConfig, shape: tuple) -> None:
    """Full SD1/SD2 presets built on meta match CLIPTextModel's keys and shapes."""
    assert preset == our_config(*shape)
    with torch.device("meta"):
        reference = CLIPTextModel(hf_config(*shape))
        ours = TextEncoder(preset)
    expected = {k: v.shape for k, v in stripped_state_dict(reference).items()}
    actual = {k: v.shape for k, v in ours.state_dict().items()}
    assert all(v.is_meta for v in ours.state_dict().values())
    assert actual == expected


@pytest.mark.parametrize("clip_skip", [0, -1, 4])
def test_clip_skip_out_of_range(clip_skip: int) -> None:
    """clip_skip outside [1, layers] raises a ValueError naming the range."""
    model = TextEncoder(our_config(*TINY_SHAPES["sd1_quick_gelu"]))
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        model(torch.zeros(1, 4, dtype=torch.long), clip_skip=clip_skip)


def test_clip_skip_upper_bound_is_allowed() -> None:
    """clip_skip == layers is valid: it takes the first layer's output."""
    model = TextEncoder(our_config(*TINY_SHAPES["sd1_quick_gelu"]))
    assert model(torch.zeros(1, 4, dtype=torch.long), clip_skip=3).shape == (1, 4, 32)


@pytest.mark.parametrize(
    "ids",
    [torch.zeros(4, dtype=torch.long), torch.zeros(1, 78, dtype=torch.long), torch.zeros(1, 4)],
    ids=["1d", "too_long", "float"],
)
def test_bad_input_ids(ids: torch.Tensor) -> None:
    """Wrong rank, over-long sequences and float ids are rejected with ValueError."""
    model = TextEncoder(our_config(*TINY_SHAPES["sd1_quick_gelu"]))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 100, "heads": 12}, "divisible by heads"),
        ({"activation": "relu"}, "activation"),
        ({"layers": 0}, "layers"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    """Invalid configs raise ValueError with a message naming the problem."""
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SD1_TEXT_ENCODER, **changes)


def test_presets() -> None:
    """Presets describe the OpenAI ViT-L/14 and the 23-layer OpenCLIP ViT-H text towers."""
    assert SD1_TEXT_ENCODER == TextEncoderConfig()
    assert (SD2_TEXT_ENCODER.width, SD2_TEXT_ENCODER.layers, SD2_TEXT_ENCODER.heads) == (1024, 23, 16)
    assert SD2_TEXT_ENCODER.activation == "gelu" and SD1_TEXT_ENCODER.activation == "quick_gelu"
