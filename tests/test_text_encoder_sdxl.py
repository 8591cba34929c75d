"""SDXL's use of the text encoder: hidden states without the final norm, the pooled projected vector,
and the CLIPTextModelWithProjection / OpenCLIP layouts, against tiny transformers models built here."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_text_encoder import EOS_ID, TOL, VOCAB, make_ids, randomize_layer_norms
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from latentforge import layouts
from latentforge.text_encoder import SDXL_TEXT_ENCODER_2, TextEncoder, TextEncoderConfig

LAYERS = 3
# A bigG-like tower, tiny: exact GELU, a projection to another width (so a missed transpose cannot fit).
SHAPE = {"hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "intermediate_size": 37}
PROJECTED = {**SHAPE, "hidden_act": "gelu", "projection_dim": 24}
# A ViT-L-like tower, tiny: quick-GELU, no projection.
PLAIN = {**SHAPE, "hidden_act": "quick_gelu"}


def reference_config(eos_token_id: int = EOS_ID, **shape: object) -> CLIPTextConfig:
    """A CLIPTextConfig with CLIP's vocabulary and positions; eos_token_id 2 is what SDXL's published
    text_encoder_2/config.json holds (transformers then pools at the largest id), 49407 the newer rule."""
    config = CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=49406,
                            eos_token_id=eos_token_id, pad_token_id=1, **shape)
    config._attn_implementation = "eager"  # independent reference: explicit softmax path
    return config


def save_reference(model: torch.nn.Module, folder) -> TextEncoder:
    """Save a seeded reference as transformers does, then load ours from the folder through layouts."""
    randomize_layer_norms(model, torch.Generator().manual_seed(1))
    model.save_pretrained(folder)
    config = layouts.text_encoder_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    ours = TextEncoder(config).eval()
    ours.load_state_dict(layouts.text_encoder_from_diffusers(load_file(folder / "model.safetensors")), strict=True)
    return ours


@pytest.fixture(scope="module", params=[EOS_ID, 2], ids=["eos_49407", "eos_2_as_sdxl"])
def projected(request, tmp_path_factory) -> tuple[CLIPTextModelWithProjection, TextEncoder]:
    """A tiny CLIPTextModelWithProjection and our TextEncoder read from its saved folder."""
    torch.manual_seed(0)
    reference = CLIPTextModelWithProjection(reference_config(request.param, **PROJECTED)).eval()
    return reference, save_reference(reference, tmp_path_factory.mktemp("with_projection"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[CLIPTextModel, TextEncoder]:
    """A tiny quick-GELU CLIPTextModel (SDXL's first tower, ViT-L style) and ours read from its folder."""
    torch.manual_seed(0)
    reference = CLIPTextModel(reference_config(**PLAIN)).eval()
    return reference, save_reference(reference, tmp_path_factory.mktemp("plain"))


def reference_hidden_states(reference: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' hidden_states: [0] the embeddings, [i] layer i's output, all before the final norm."""
    return reference(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("pad_id", [0, EOS_ID], ids=["pad_zero", "pad_eos"])
@torch.no_grad()
def test_hidden_states_without_final_norm(projected, pad_id: int) -> None:
    """clip_skip=k without the final norm is transformers' hidden_states[-k]; SDXL's penultimate is k=2."""
    reference, ours = projected
    ids = make_ids(pad_id)
    hidden = reference_hidden_states(reference, ids)
    assert len(hidden) == LAYERS + 1
    for clip_skip in range(1, LAYERS + 1):
        states, pooled = ours.encode(ids, clip_skip, final_norm=False)
        assert pooled is None
        torch.testing.assert_close(states, hidden[-clip_skip], **TOL)
    # the final norm makes a difference, so the comparison above would see a misplaced one
    assert not torch.allclose(ours.encode(ids, 2)[0], hidden[-2], **TOL)


@pytest.mark.parametrize("pad_id", [0, EOS_ID], ids=["pad_zero", "pad_eos"])
@pytest.mark.parametrize("clip_skip", [1, 2, LAYERS])
@torch.no_grad()
def test_pooled_equals_text_embeds(projected, pad_id: int, clip_skip: int) -> None:
    """The pooled vector is text_embeds (last layer, final norm, end token, projection) whatever layer is taken;
    the hidden states returned with it are those returned without it, bit for bit."""
    reference, ours = projected
    ids = make_ids(pad_id)
    states, pooled = ours.encode(ids, clip_skip, final_norm=False, pooled=True)
    assert pooled.shape == (2, PROJECTED["projection_dim"])
    torch.testing.assert_close(pooled, reference(input_ids=ids).text_embeds, **TOL)
    torch.testing.assert_close(states, ours.encode(ids, clip_skip, final_norm=False)[0], atol=0, rtol=0)


@torch.no_grad()
def test_forward_is_encode_with_final_norm(projected) -> None:
    """forward(ids, clip_skip) is encode's hidden states with the final norm (k=1: transformers' last_hidden_state)."""
    reference, ours = projected
    ids = make_ids(0)
    torch.testing.assert_close(ours(ids), reference(input_ids=ids).last_hidden_state, **TOL)
    for clip_skip in (1, 2):
        assert torch.equal(ours(ids, clip_skip), ours.encode(ids, clip_skip)[0])


@pytest.mark.parametrize(("pooled", "clip_skip", "runs"), [(True, 2, list(range(LAYERS))), (False, 2, [0, 1])])
@torch.no_grad()
def test_each_layer_runs_at_most_once(projected, pooled: bool, clip_skip: int, runs: list[int]) -> None:
    """With pooled every layer runs once (none is recomputed); without, layers after the taken one do not run."""
    _, ours = projected
    calls: list[int] = []
    layers = enumerate(ours.encoder.layers)
    handles = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in layers]
    try:
        ours.encode(make_ids(0), clip_skip, final_norm=False, pooled=pooled)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == runs


@torch.no_grad()
def test_quick_gelu_tower_penultimate_without_norm(plain) -> None:
    """SDXL's first tower (CLIPTextModel, quick-GELU): no projection; penultimate without norm = hidden_states[-2]."""
    reference, ours = plain
    assert ours.config.projection_dim is None and ours.text_projection is None
    ids = make_ids(EOS_ID)
    want = reference_hidden_states(reference, ids)[-2]
    torch.testing.assert_close(ours.encode(ids, 2, final_norm=False)[0], want, **TOL)


def test_pooled_without_projection_is_an_error(plain) -> None:
    """Asking a tower without a projection for the pooled vector is a ValueError naming projection_dim."""
    _, ours = plain
    with pytest.raises(ValueError, match="projection_dim"):
        ours.encode(make_ids(0), pooled=True)


@torch.no_grad()
def test_openclip_round_trip_and_transpose(projected) -> None:
    """Our names -> OpenCLIP -> ours gives the same tensors; OpenCLIP's text_projection is the transposed
    Linear weight: the pooled vector computed OpenCLIP's way (x @ P) from those tensors is text_embeds."""
    reference, ours = projected
    sd = ours.state_dict()
    openclip = layouts.text_encoder_to_openclip(sd)
    width, projection = PROJECTED["hidden_size"], PROJECTED["projection_dim"]
    assert openclip["text_projection"].shape == (width, projection)
    back = layouts.text_encoder_from_openclip({**openclip, "logit_scale": torch.tensor(4.6)}, LAYERS, projection=True)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    # SD 2.x's callers keep dropping it
    without = layouts.text_encoder_from_openclip(openclip, LAYERS)
    assert without.keys() == sd.keys() - {"text_projection.weight"}

    ids = make_ids(0)
    last = reference_hidden_states(reference, ids)[-1]
    x = torch.nn.functional.layer_norm(last, (width,), openclip["ln_final.weight"], openclip["ln_final.bias"], 1e-5)
    x = x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ openclip["text_projection"]
    torch.testing.assert_close(x, reference(input_ids=ids).text_embeds, **TOL)


def test_openclip_projection_missing_is_an_error(projected) -> None:
    """projection=True on an OpenCLIP tower without text_projection is a ValueError naming the key."""
    openclip = layouts.text_encoder_to_openclip(projected[1].state_dict())
    del openclip["text_projection"]
    with pytest.raises(ValueError, match="text_projection"):
        layouts.text_encoder_from_openclip(openclip, LAYERS, projection=True)


def test_config_round_trip_and_transformers_loads_our_folder(projected, tmp_path) -> None:
    """Our config and weights written in transformers' layout load into CLIPTextModelWithProjection with no
    missing or unexpected key and give the same text_embeds; the config reads back equal."""
    reference, ours = projected
    written = layouts.text_encoder_config_to_diffusers(ours.config)
    assert written["architectures"] == ["CLIPTextModelWithProjection"] and written["projection_dim"] == 24
    assert layouts.text_encoder_config_from_diffusers(written) == ours.config
    (tmp_path / "config.json").write_text(json.dumps(written))
    tensors = {k: v.contiguous() for k, v in layouts.text_encoder_to_diffusers(ours.state_dict()).items()}
    assert "text_projection.weight" in tensors
    save_file(tensors, tmp_path / "model.safetensors")
    loaded, info = CLIPTextModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = make_ids(0)
    with torch.no_grad():
        want = reference(input_ids=ids).text_embeds
        torch.testing.assert_close(loaded.eval()(input_ids=ids).text_embeds, want, **TOL)


def test_clip_text_model_config_has_no_projection(plain) -> None:
    """A CLIPTextModel's config.json carries a projection_dim (of a CLIP head it lacks): it is not read."""
    written = layouts.text_encoder_config_to_diffusers(plain[1].config)
    assert written["architectures"] == ["CLIPTextModel"] and "projection_dim" in written
    assert layouts.text_encoder_config_from_diffusers(written).projection_dim is None


def test_infer_config_reads_the_projection(projected, plain) -> None:
    """projection_dim is inferred from text_projection.weight; a weight of another input width is refused."""
    for ours, openclip in ((projected[1], True), (plain[1], False)):
        inferred = layouts.infer_text_encoder_config(ours.state_dict(), openclip)
        # heads cannot be read from the tensors (the rule is 64-wide heads); the rest must match
        assert dataclasses.replace(inferred, heads=ours.config.heads) == ours.config
    wrong = {**projected[1].state_dict(), "text_projection.weight": torch.zeros(24, 16)}
    with pytest.raises(ValueError, match="projects 16 channels"):
        layouts.infer_text_encoder_config(wrong, True)


def test_sdxl_preset_matches_bigg_on_meta() -> None:
    """SDXL_TEXT_ENCODER_2 has the keys and shapes of SDXL's text_encoder_2 (ViT-bigG, 32 layers, projection)."""
    bigg = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 5120}
    bigg |= {"hidden_act": "gelu", "projection_dim": 1280}
    with torch.device("meta"):
        reference = CLIPTextModelWithProjection(reference_config(**bigg))
        ours = TextEncoder(SDXL_TEXT_ENCODER_2)
    expected = {k: v.shape for k, v in layouts.text_encoder_from_diffusers(reference.state_dict()).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert layouts.text_encoder_config_to_diffusers(SDXL_TEXT_ENCODER_2)["num_attention_heads"] == 20


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "1280"])
def test_projection_dim_validation(value: object) -> None:
    """projection_dim is a positive int or None."""
    with pytest.raises(ValueError, match="projection_dim"):
        TextEncoderConfig(projection_dim=value)
