"""The two checkpoint layouts people have, and the one place that maps between them.

Our modules carry the original CompVis/LDM names (UNet, VAE) and the Hugging Face CLIP names (text
encoder), which is what SD 1.x single files contain. This module holds:

- the key tables between our names and the diffusers names, built from a model config, as lists
  of (our module prefix, diffusers module prefix, inner renames) plus the few tensor reshapes;
- the OpenCLIP text tower names that SD 2.x single files use;
- the translation of configs to and from diffusers' `config.json` files;
- the inference of every config from the tensors of a single-file checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .text_encoder import SD1_TEXT_ENCODER, SD2_TEXT_ENCODER, TextEncoderConfig
from .unet import SDXL_SIZE_EMBED_DIM, UNetConfig, depth_fields
from .vae import VAEConfig

Tensors = dict[str, torch.Tensor]

# -------------------------------------------------------------------------------------------------
# Key tables

# Inner renames for blocks whose parts are named differently in the two layouts.
UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Older diffusers VAE files name the attention parts differently; accepted when reading.
VAE_ATTENTION_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class Entry:
    ours: str  # module prefix in our names
    theirs: str  # module prefix in diffusers names
    inner: dict[str, str] | None = None  # renames below the prefix; None: the same names


def unet_table(c: UNetConfig) -> list[Entry]:
    """Our (LDM) UNet module prefixes and their diffusers counterparts."""
    t = [
        Entry("time_embed.0", "time_embedding.linear_1"),
        Entry("time_embed.2", "time_embedding.linear_2"),
        Entry("input_blocks.0.0", "conv_in"),
        Entry("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
        Entry("out.0", "conv_norm_out"),
        Entry("out.2", "conv_out"),
    ]
    if c.middle_depth:  # else the middle block is its one ResNet block (diffusers' UNetMidBlock2D)
        t += [
            Entry("middle_block.1", "mid_block.attentions.0"),
            Entry("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
        ]
    if c.adm_in_channels is not None:  # the added vector's embedding (diffusers' text_time add_embedding)
        t += [Entry("label_emb.0.0", "add_embedding.linear_1"), Entry("label_emb.0.2", "add_embedding.linear_2")]
    # a block's transformer_blocks.N are numbered alike in both layouts: its depth only decides whether it has one
    levels = len(c.channel_mult)
    input_depths, output_depths = iter(c.input_depths), iter(c.output_depths)
    idx = 1
    for level in range(levels):
        for j in range(c.num_res_blocks):
            t.append(Entry(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET))
            if next(input_depths):
                t.append(Entry(f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}"))
            idx += 1
        if level != levels - 1:
            t.append(Entry(f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            idx += 1
    idx = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(c.num_res_blocks + 1):
            t.append(Entry(f"output_blocks.{idx}.0", f"up_blocks.{up}.resnets.{j}", UNET_RESNET))
            slot = 1
            if next(output_depths):
                t.append(Entry(f"output_blocks.{idx}.1", f"up_blocks.{up}.attentions.{j}"))
                slot = 2
            if level != 0 and j == c.num_res_blocks:
                t.append(Entry(f"output_blocks.{idx}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
            idx += 1
    return t


def vae_table(c: VAEConfig) -> list[Entry]:
    """Our (LDM) VAE module prefixes and their diffusers counterparts."""
    t = [Entry("quant_conv", "quant_conv"), Entry("post_quant_conv", "post_quant_conv")]
    levels = len(c.channel_mult)
    for part in ("encoder", "decoder"):
        t += [
            Entry(f"{part}.conv_in", f"{part}.conv_in"),
            Entry(f"{part}.conv_out", f"{part}.conv_out"),
            Entry(f"{part}.norm_out", f"{part}.conv_norm_out"),
            Entry(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
            Entry(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION),
            Entry(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
        ]
    for level in range(levels):
        for j in range(c.num_res_blocks):
            t.append(Entry(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET))
        if level != levels - 1:
            t.append(Entry(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
        up = levels - 1 - level  # diffusers counts the decoder's levels from the bottom
        for j in range(c.num_res_blocks + 1):
            t.append(Entry(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET))
        if level != 0:
            t.append(Entry(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return t


def _split(key: str, prefixes: dict[str, Entry]) -> tuple[Entry, str]:
    """The entry whose prefix is the longest one that `key` starts with, and the rest of the key."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        entry = prefixes.get(".".join(parts[:n]))
        if entry is not None:
            return entry, ".".join(parts[n:])
    raise KeyError(key)


def _rename_inner(rest: str, inner: dict[str, str] | None) -> str:
    if inner is None:
        return rest
    for src, dst in inner.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    raise KeyError(rest)


def _rename(sd: Tensors, table: list[Entry], to_diffusers: bool) -> Tensors:
    """Rename every key through the table; a key the table does not cover is an error that names it."""
    if to_diffusers:
        prefixes = {e.ours: e for e in table}
    else:
        prefixes = {e.theirs: Entry(e.theirs, e.ours, e.inner and {v: k for k, v in e.inner.items()}) for e in table}
    out = {}
    for key, value in sd.items():
        try:
            entry, rest = _split(key, prefixes)
            new = entry.theirs + "." + _rename_inner(rest, entry.inner)
        except KeyError:
            raise ValueError(f"unexpected key {key!r}: no such weight in this model's layout") from None
        out[new] = value
    return out


def _vae_attention_shapes(sd: Tensors, conv: bool) -> Tensors:
    """The VAE's attention projections are 1x1 convs in LDM ([C, C, 1, 1]) and Linear in diffusers ([C, C])."""
    pattern = re.compile(r"(en|de)coder\.mid(\.attn_1\.(q|k|v|proj_out)|_block\.attentions\.0\.to_(q|k|v|out\.0))\.weight$")
    out = {}
    for key, value in sd.items():
        if pattern.search(key):
            value = value.reshape(*value.shape[:2], 1, 1) if conv and value.ndim == 2 else value
            value = value.reshape(value.shape[:2]) if not conv and value.ndim == 4 else value
        out[key] = value
    return out


def unet_to_diffusers(sd: Tensors, c: UNetConfig) -> Tensors:
    """Our UNet state dict -> diffusers UNet2DConditionModel names."""
    return _rename(sd, unet_table(c), to_diffusers=True)


def unet_from_diffusers(sd: Tensors, c: UNetConfig) -> Tensors:
    """diffusers UNet2DConditionModel state dict -> our names."""
    return _rename(sd, unet_table(c), to_diffusers=False)


def vae_to_diffusers(sd: Tensors, c: VAEConfig) -> Tensors:
    """Our VAE state dict -> diffusers AutoencoderKL names (attention as Linear weights)."""
    return _vae_attention_shapes(_rename(sd, vae_table(c), to_diffusers=True), conv=False)


def vae_from_diffusers(sd: Tensors, c: VAEConfig) -> Tensors:
    """diffusers AutoencoderKL state dict (current or legacy attention names) -> our names."""
    legacy = re.compile(r"\.attentions\.0\.(query|key|value|proj_attn)\.")
    sd = {legacy.sub(lambda m: f".attentions.0.{VAE_ATTENTION_LEGACY[m.group(1)]}.", k): v for k, v in sd.items()}
    return _vae_attention_shapes(_rename(sd, vae_table(c), to_diffusers=False), conv=True)


def text_encoder_to_diffusers(sd: Tensors) -> Tensors:
    """Our text encoder state dict -> transformers CLIPTextModel (or CLIPTextModelWithProjection) names;
    the projection sits beside the `text_model.` tower, so its key keeps no prefix."""
    return {k if k == PROJECTION else "text_model." + k: v for k, v in sd.items()}


def text_encoder_from_diffusers(sd: Tensors) -> Tensors:
    """transformers CLIPTextModel(WithProjection) state dict -> our names (the position_ids buffer is dropped).

    Files written by transformers 4 (all published SD folders) prefix every key with `text_model.`;
    transformers 5 keeps a CLIPTextModel without it. Both are read. `text_projection.weight` (SDXL's
    second tower) has no prefix in either."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


# -------------------------------------------------------------------------------------------------
# OpenCLIP text tower (SD 2.x single files, under cond_stage_model.model.)

OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# The contrastive head's temperature, which Stable Diffusion never uses.
OPENCLIP_UNUSED = ("logit_scale",)
# The projection of the pooled vector: OpenCLIP stores a (width, proj) matrix used as x @ P, we (and
# transformers) a Linear weight (proj, width), its transpose. SDXL uses it; SD 2.x does not.
OPENCLIP_PROJECTION = "text_projection"
PROJECTION = "text_projection.weight"


def text_encoder_from_openclip(sd: Tensors, layers: int, projection: bool = False) -> Tensors:
    """OpenCLIP text tower -> our names. Keeps the first `layers` blocks: SD 2.x takes the
    penultimate layer, so the 24th block of a ViT-H file is never used (diffusers drops it too);
    SDXL's bigG uses all 32. With `projection` (SDXL) `text_projection` is kept, transposed; without
    (SD 2.x) it is dropped."""
    if projection and OPENCLIP_PROJECTION not in sd:
        raise ValueError(f"the OpenCLIP text encoder has no {OPENCLIP_PROJECTION!r}, which SDXL's second one needs")
    out = {}
    for key, value in sd.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
            continue
        if key == OPENCLIP_PROJECTION:
            if projection:
                out[PROJECTION] = value.t().contiguous()
            continue
        if key in OPENCLIP_UNUSED:
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)", key)
        if m is None:
            raise ValueError(f"unexpected key {key!r} in the OpenCLIP text encoder")
        i, part, kind = int(m.group(1)), m.group(2), m.group(3)
        if i >= layers:
            continue
        prefix = f"encoder.layers.{i}."
        if kind.startswith("in_proj_"):  # q, k and v stacked in one tensor
            suffix = kind.removeprefix("in_proj_")
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{suffix}"] = chunk
        elif part in OPENCLIP_LAYER:
            out[f"{prefix}{OPENCLIP_LAYER[part]}.{kind}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in the OpenCLIP text encoder")
    return out


def text_encoder_to_openclip(sd: Tensors) -> Tensors:
    """Our text encoder names -> OpenCLIP text tower names (q, k, v stacked again; a projection,
    if the model has one, as OpenCLIP's transposed `text_projection`)."""
    top = {v: k for k, v in OPENCLIP_TOP.items()}
    layer = {v: k for k, v in OPENCLIP_LAYER.items()}
    out: Tensors = {}
    stacks: dict[str, list] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        if key == PROJECTION:
            out[OPENCLIP_PROJECTION] = value.t().contiguous()
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise ValueError(f"unexpected text encoder key {key!r}")
        i, part, kind = m.groups()
        prefix = f"transformer.resblocks.{i}."
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            stacks.setdefault(f"{prefix}attn.in_proj_{kind}", [None] * 3)["qkv".index(part[10])] = value
        else:
            out[f"{prefix}{layer[part]}.{kind}"] = value
    for key, parts in stacks.items():
        out[key] = torch.cat(parts, dim=0)
    return out


# -------------------------------------------------------------------------------------------------
# Configs <-> diffusers config.json


def _diffusers_depths(c: UNetConfig) -> dict:
    """The depth fields of a diffusers config: transformer_layers_per_block (per level, an int or one depth per
    block; 0 where a level has no attention) and, where the up path is not its mirror, the per-block
    reverse_transformer_layers_per_block (per up level). diffusers' middle block takes the first depth of the
    last level, which without attention holds the middle's alone."""
    if (c.transformer_depth_input, c.transformer_depth_middle, c.transformer_depth_output) == (None, None, None):
        return {"transformer_layers_per_block": c.transformer_depth}
    n, levels = c.num_res_blocks, len(c.channel_mult)
    down: list = [c.input_depths[i * n : (i + 1) * n] for i in range(levels)]
    down = [depths[0] if len(set(depths)) == 1 else list(depths) for depths in down]
    if levels - 1 not in c.attention_levels:
        down[-1] = c.middle_depth
    last = down[-1] if _is_int(down[-1]) else down[-1][0]
    if c.middle_depth and last != c.middle_depth:
        raise ValueError(
            f"a middle transformer of depth {c.middle_depth} under a last level of depth {last} cannot be written "
            "as a diffusers config (its middle block takes the last level's depth)"
        )
    up = [list(c.output_depths[i * (n + 1) : (i + 1) * (n + 1)]) for i in range(levels)]
    mirror = [[d if level in c.attention_levels else 0] * (n + 1) for level, d in reversed(list(enumerate(down)))]
    out = {"transformer_layers_per_block": down}
    if mirror != up:  # (a level given per block is never its own mirror: diffusers wants n + 1 depths up)
        out["reverse_transformer_layers_per_block"] = up
    return out


def unet_config_to_diffusers(c: UNetConfig) -> dict:
    """UNetConfig -> the config.json of a diffusers UNet2DConditionModel. A UNet with an added vector gets
    SDXL's "text_time" embedding, which needs size_embed_dim."""
    levels = range(len(c.channel_mult))
    heads = [c.heads_at(ch) for ch in c.level_channels]
    added = {}
    if c.adm_in_channels is not None:
        if c.size_embed_dim is None:
            raise ValueError("a UNet with an added vector needs size_embed_dim to be written as a diffusers config")
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": c.size_embed_dim,
            "projection_class_embeddings_input_dim": c.adm_in_channels,
        }
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": c.sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": c.level_channels,
        "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if c.middle_depth else "UNetMidBlock2D",
        "cross_attention_dim": c.context_dim,
        # diffusers' historical misnomer: for SD this field holds the number of heads
        "attention_head_dim": heads[0] if c.num_heads is not None else heads,
        "use_linear_projection": c.use_linear_projection,
        **_diffusers_depths(c),
        **added,
        "norm_num_groups": c.norm_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
    }


# diffusers UNet options that this UNet does not implement; a config that sets them is refused.
_UNET_UNSUPPORTED = {
    "class_embed_type": None,
    "time_embedding_type": "positional",
    "encoder_hid_dim": None,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}
_UNET_BLOCKS = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}

# The config.json fields are read through these, so that a missing or malformed one is a ValueError naming
# the field (the caller names the file) instead of a KeyError or TypeError deep inside; a null is "not set".
_REQUIRED = object()


def _get(d: dict, key: str, default: object = _REQUIRED) -> object:
    value = d.get(key)
    if value is not None:
        return value
    if default is _REQUIRED:
        raise ValueError(f"the field {key!r} is missing")
    return default


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(d: dict, key: str, default: object = _REQUIRED) -> int:
    value = _get(d, key, default)
    if not _is_int(value) or value < 1:
        raise ValueError(f"{key} must be a positive whole number, got {value!r}")
    return value


def _positive_ints(d: dict, key: str, default: object = _REQUIRED) -> list[int]:
    value = _get(d, key, default)
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) and v > 0 for v in value):
        raise ValueError(f"{key} must be a list of one or more positive whole numbers, got {value!r}")
    return list(value)


def _names(d: dict, key: str, known: set[str] | dict[str, str]) -> list[str]:
    value = _get(d, key)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of one or more block names, got {value!r}")
    unknown = [v for v in value if v not in known]
    if unknown:
        supported = ", ".join(sorted(known))
        raise ValueError(f"{key}: {unknown[0]!r} is not supported (Stable Diffusion 1.x/2.x use {supported})")
    return list(value)


def _flag(d: dict, key: str, default: bool) -> bool:
    value = _get(d, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _number(d: dict, key: str, default: float) -> float:
    value = _get(d, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def _check_class(d: dict, key: str, wanted: str, what: str) -> None:
    """A config that names its class names ours; a ControlNet's or another UNet's config is no SD part."""
    got = d.get(key)
    got = got[0] if key == "architectures" and isinstance(got, list) and len(got) == 1 else got
    if got is not None and got != wanted:
        raise ValueError(f"{key} is {got!r}, not {wanted!r}: this is not the config of a Stable Diffusion {what}")


def _refuse_unsupported(d: dict, supported: dict, what: str) -> None:
    """An option set to anything but the one value these models have is a ValueError naming it."""
    for key, want in supported.items():
        got = d.get(key, want)
        if got != want:
            raise ValueError(f"{key}={got!r} is not supported (Stable Diffusion 1.x/2.x {what} use {want!r})")


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """The config.json of a diffusers UNet2DConditionModel -> UNetConfig. A missing or malformed field, or an
    option this UNet does not implement, is a ValueError naming the field (the caller names the file)."""
    _check_class(d, "_class_name", "UNet2DConditionModel", "UNet")
    _refuse_unsupported(d, _UNET_UNSUPPORTED, "UNets")
    # upcast_attention (SD 2.1: true) asks for float32 attention scores in float16 models. Accepted either
    # way: the attention here is SDPA, whose kernels accumulate q k^T in float32 (diffusers' default
    # AttnProcessor2_0 calls SDPA and ignores the flag too), or the blocked bfloat16 path (float32's range).
    _flag(d, "upcast_attention", False)
    down = _names(d, "down_block_types", _UNET_BLOCKS)
    up = _names(d, "up_block_types", set(_UNET_BLOCKS.values()))
    if list(reversed(up)) != [_UNET_BLOCKS[k] for k in down]:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
    attention = tuple(i for i, kind in enumerate(down) if kind.startswith("CrossAttn"))
    widths = _positive_ints(d, "block_out_channels")
    if len(widths) != len(down):
        raise ValueError(f"block_out_channels has {len(widths)} levels but down_block_types {len(down)}")
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    key = "num_attention_heads" if d.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _get(d, key, 8)
    if _is_int(heads):
        num_heads, head_dim = _positive_int(d, key, 8), None
    else:
        heads = _positive_ints(d, key)
        if len(heads) != len(widths) or any(w % h for w, h in zip(widths, heads)):
            raise ValueError(f"{key} {heads} must give each level of block_out_channels {widths} a whole head width")
        dims = {w // h for w, h in zip(widths, heads)}
        if len(dims) != 1:
            raise ValueError(f"per-level heads {heads} do not share one head width")
        num_heads, head_dim = None, dims.pop()
    added = d.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise ValueError(f"addition_embed_type={added!r} is not supported (SDXL: 'text_time'; SD 1.x/2.x: none)")
    text_time = added == "text_time"
    res = _positive_int(d, "layers_per_block", 2)
    return UNetConfig(
        in_channels=_positive_int(d, "in_channels", 4),
        out_channels=_positive_int(d, "out_channels", 4),
        model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=res,
        attention_levels=attention,
        num_heads=num_heads,
        head_dim=head_dim,
        **_depths_from_diffusers(d, attention, len(widths), res),
        context_dim=_positive_int(d, "cross_attention_dim", 768),
        use_linear_projection=_flag(d, "use_linear_projection", False),
        norm_groups=_positive_int(d, "norm_num_groups", 32),
        sample_size=_positive_int(d, "sample_size", 64),
        adm_in_channels=_positive_int(d, "projection_class_embeddings_input_dim") if text_time else None,
        size_embed_dim=_positive_int(d, "addition_time_embed_dim") if text_time else None,
    )


_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")  # the second: one ResNet block (SSD-1B, Vega)


def _level_depths(value: object, key: str, blocks: int) -> list[int]:
    """One level's entry of a diffusers depth list: an int for all its blocks, or one depth per block."""
    if _is_int(value) and value >= 0:
        return [value] * blocks
    if isinstance(value, (list, tuple)) and len(value) == blocks and all(_is_int(v) and v >= 0 for v in value):
        return list(value)
    raise ValueError(f"{key}: each level's depth must be a whole number >= 0 or {blocks} of them, got {value!r}")


def _depths_from_diffusers(d: dict, attention: tuple[int, ...], levels: int, res: int) -> dict[str, object]:
    """UNetConfig's depth fields from transformer_layers_per_block (an int, or per level an int or one depth per
    block), reverse_transformer_layers_per_block (per up level) and mid_block_type. A level without attention
    has no transformers whatever its entry says (DownBlock2D ignores it); one with attention needs depths >= 1
    (diffusers would build a transformer of no blocks, LDM none at all)."""
    key, rkey = "transformer_layers_per_block", "reverse_transformer_layers_per_block"
    down = _get(d, key, 1)
    down = [down] * levels if _is_int(down) else down
    if not isinstance(down, (list, tuple)) or len(down) != levels:
        raise ValueError(f"{key} must be a whole number or one entry per level ({levels}), got {down!r}")
    reverse = d.get(rkey)
    if reverse is None:
        if any(not _is_int(v) for v in down):
            raise ValueError(f"{key} gives depths per block but {rkey} is missing")
        reverse = list(reversed(down))
    elif not isinstance(reverse, (list, tuple)) or len(reverse) != levels:
        raise ValueError(f"{rkey} must have one entry per level ({levels}), got {reverse!r}")
    mid = d.get("mid_block_type", _MID_BLOCKS[0])  # null: no middle block, which no SD UNet lacks
    if mid not in _MID_BLOCKS:
        raise ValueError(f"mid_block_type={mid!r} is not supported (SD UNets use {' or '.join(_MID_BLOCKS)})")
    down_levels = [_level_depths(v, key, res) for v in down]
    up_levels = [_level_depths(v, rkey, res + 1) for v in reverse]
    middle = down_levels[-1][0] if mid == _MID_BLOCKS[0] else 0
    if mid == _MID_BLOCKS[0] and middle == 0:
        raise ValueError(f"{key}: a middle transformer of depth 0 is not supported")
    inputs = [(level, x) for level, depths in enumerate(down_levels) for x in depths]
    outputs = [(levels - 1 - u, x) for u, depths in enumerate(up_levels) for x in depths]
    for name, blocks in ((key, inputs), (rkey if d.get(rkey) is not None else key, outputs)):
        for level, x in blocks:
            if level in attention and x == 0:
                raise ValueError(f"{name}: a transformer of depth 0 at level {level} is not supported")
    inputs = [x if level in attention else 0 for level, x in inputs]
    outputs = [x if level in attention else 0 for level, x in outputs]
    return depth_fields(inputs, middle, outputs)


def vae_config_to_diffusers(c: VAEConfig) -> dict:
    """VAEConfig -> the config.json of a diffusers AutoencoderKL."""
    n = len(c.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "latent_channels": c.latent_channels,
        "block_out_channels": [c.base_channels * m for m in c.channel_mult],
        "layers_per_block": c.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": c.norm_groups,
        "act_fn": "silu",
        "scaling_factor": c.scaling_factor,
        "sample_size": 512,
    }


# diffusers AutoencoderKL options that the SD VAE does not have; a config that sets them is refused.
_VAE_UNSUPPORTED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    """The config.json of a diffusers AutoencoderKL -> VAEConfig; a missing or malformed field, or an option
    the SD VAE does not have, is a ValueError naming the field (the caller names the file)."""
    _check_class(d, "_class_name", "AutoencoderKL", "VAE")
    _refuse_unsupported(d, _VAE_UNSUPPORTED, "VAEs")
    if d.get("shift_factor") not in (None, 0, 0.0):
        raise ValueError(f"shift_factor={d['shift_factor']!r} is not supported (SD 1.x/2.x VAEs have none)")
    widths = _positive_ints(d, "block_out_channels", [64])
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if d.get(key) is not None and len(_names(d, key, {kind: kind})) != len(widths):
            raise ValueError(f"{key} has {len(d[key])} levels but block_out_channels {len(widths)}")
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    return VAEConfig(
        in_channels=_positive_int(d, "in_channels", 3),
        out_channels=_positive_int(d, "out_channels", 3),
        latent_channels=_positive_int(d, "latent_channels", 4),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=_positive_int(d, "layers_per_block", 1),
        norm_groups=_positive_int(d, "norm_num_groups", 32),
        scaling_factor=_number(d, "scaling_factor", 0.18215),
    )


def text_encoder_config_to_diffusers(c: TextEncoderConfig) -> dict:
    """TextEncoderConfig -> the config.json of a transformers CLIPTextModel, or with a projection_dim
    a CLIPTextModelWithProjection (SDXL's text_encoder_2)."""
    projection = c.projection_dim is not None
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_length,
        "hidden_size": c.width,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "intermediate_size": c.mlp_width,
        "hidden_act": c.activation,
        "layer_norm_eps": c.eps,
        "projection_dim": c.projection_dim if projection else c.width,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


def text_encoder_config_from_diffusers(d: dict) -> TextEncoderConfig:
    """The config.json of a transformers CLIPTextModel or CLIPTextModelWithProjection -> TextEncoderConfig;
    a missing or malformed field is a ValueError naming it (the caller names the file). A CLIPTextModel's
    projection_dim belongs to a CLIP head it does not have, so only the WithProjection class keeps one."""
    projection = d.get("architectures") == ["CLIPTextModelWithProjection"]
    if not projection:
        _check_class(d, "architectures", "CLIPTextModel", "text encoder (CLIPTextModel)")
    _check_class(d, "model_type", "clip_text_model", "text encoder (CLIPTextModel)")
    activation = _get(d, "hidden_act", "quick_gelu")
    if not isinstance(activation, str):
        raise ValueError(f"hidden_act must be an activation name such as 'quick_gelu', got {activation!r}")
    return TextEncoderConfig(
        vocab_size=_positive_int(d, "vocab_size", 49408),
        max_length=_positive_int(d, "max_position_embeddings", 77),
        width=_positive_int(d, "hidden_size"),
        layers=_positive_int(d, "num_hidden_layers"),
        heads=_positive_int(d, "num_attention_heads"),
        mlp_width=_positive_int(d, "intermediate_size"),
        activation=activation,
        eps=_number(d, "layer_norm_eps", 1e-5),
        projection_dim=_positive_int(d, "projection_dim") if projection else None,
    )


# -------------------------------------------------------------------------------------------------
# Configs inferred from the tensors of a single file (original layout, prefixes already removed)


def _shape(sd: Tensors, key: str, what: str, ndim: int | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a weight a config is read from, with `ndim` dimensions (one of them); missing, another
    number of dimensions, or a dimension of size 0 (a zero-width model) is a ValueError naming it."""
    if key not in sd:
        raise ValueError(f"not a Stable Diffusion {what}: weight {key!r} is missing")
    shape = tuple(sd[key].shape)
    if len(shape) not in (ndim if isinstance(ndim, tuple) else (ndim,)) or 0 in shape:
        raise ValueError(f"{what} weight {key!r} has shape {shape}, which no Stable Diffusion {what} has")
    return shape




def _depth(sd: Tensors, prefix: str) -> int:
    """How many transformer blocks the spatial transformer at `prefix` has (0: none there)."""
    start = prefix + ".transformer_blocks."
    return len({k[len(start) :].split(".")[0] for k in sd if k.startswith(start)})


def infer_unet_config(
    sd: Tensors, head_dim: int | None = None, size_embed_dim: int = SDXL_SIZE_EMBED_DIM
) -> UNetConfig:
    """UNetConfig from the tensors of an LDM UNet (keys without `model.diffusion_model.`). The weights cannot tell
    how attention splits into heads: `head_dim` is the heads' width (SD 2.x: 64); None is the family's as far
    as the tensors tell it: SDXL's 64 where there is an added vector (label_emb), else SD 1.x's eight heads.
    With an added vector, `size_embed_dim` is taken as SDXL's."""
    model_ch, in_ch = _shape(sd, "input_blocks.0.0.weight", "UNet", 4)[:2]
    out_ch = _shape(sd, "out.2.weight", "UNet", 4)[0]
    # walk the input blocks: a block with `.0.op` is a downsampler, which ends a level
    numbers = {k.split(".")[1] for k in sd if k.startswith("input_blocks.")}
    blocks = sorted(int(n) for n in numbers if n.isdigit())  # any other key is refused by check_parts
    levels: list[list[int]] = [[]]
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(i)
    if not all(levels):
        raise ValueError("not a Stable Diffusion UNet: a level of input_blocks without ResNet blocks")
    res_blocks = len(levels[0])
    widths = [_shape(sd, f"input_blocks.{lv[0]}.0.out_layers.3.weight", "UNet", 4)[0] for lv in levels]
    attention = tuple(n for n, lv in enumerate(levels) if f"input_blocks.{lv[0]}.1.norm.weight" in sd)
    # each block's depth is its count of transformer_blocks; the first transformer tells the text width
    transformers = [f"input_blocks.{i}.1" for lv in levels for i in lv] + ["middle_block.1"]
    first = next((p for p in transformers if f"{p}.proj_in.weight" in sd), "middle_block.1")
    context_dim = _shape(sd, f"{first}.transformer_blocks.0.attn2.to_k.weight", "UNet", 2)[1]
    linear = len(_shape(sd, f"{first}.proj_in.weight", "UNet", (2, 4))) == 2
    outputs = len(levels) * (res_blocks + 1)
    depths = depth_fields(
        [_depth(sd, p) for p in transformers[:-1]],
        _depth(sd, "middle_block.1"),
        [_depth(sd, f"output_blocks.{i}.1") for i in range(outputs)],
    )
    adm = _shape(sd, "label_emb.0.0.weight", "UNet", 2)[1] if "label_emb.0.0.weight" in sd else None
    if head_dim is None and adm is not None:
        head_dim = 64
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=model_ch,
        channel_mult=tuple(w // model_ch for w in widths),
        num_res_blocks=res_blocks,
        attention_levels=attention,
        **depths,
        context_dim=context_dim,
        use_linear_projection=linear,
        norm_groups=32,
        num_heads=8 if head_dim is None else None,
        head_dim=head_dim,
        adm_in_channels=adm,
        size_embed_dim=size_embed_dim if adm is not None else None,
    )


def infer_vae_config(sd: Tensors) -> VAEConfig:
    """VAEConfig from the tensors of an LDM VAE (keys without `first_stage_model.`)."""
    base, in_ch = _shape(sd, "encoder.conv_in.weight", "VAE", 4)[:2]
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    widths = [_shape(sd, f"encoder.down.{i}.block.0.conv2.weight", "VAE", 4)[0] for i in range(levels)]
    res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    return VAEConfig(
        in_channels=in_ch,
        out_channels=_shape(sd, "decoder.conv_out.weight", "VAE", 4)[0],
        latent_channels=_shape(sd, "post_quant_conv.weight", "VAE", 4)[0],
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=res_blocks,
    )


def infer_text_encoder_config(sd: Tensors, openclip: bool) -> TextEncoderConfig:
    """TextEncoderConfig from our-named text encoder tensors (after any OpenCLIP conversion);
    an OpenCLIP tower (SD 2.x, SDXL's bigG) uses GELU, OpenAI's (SD 1.x) quick-GELU; all 64-wide heads;
    a `text_projection.weight` (SDXL's bigG) gives projection_dim."""
    vocab, width = _shape(sd, "embeddings.token_embedding.weight", "text encoder", 2)
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    projection_dim = None
    if PROJECTION in sd:
        projection_dim, projected = _shape(sd, PROJECTION, "text encoder", 2)
        if projected != width:
            raise ValueError(
                f"text encoder weight {PROJECTION!r} projects {projected} channels, not the {width} it has"
            )
    return replace(
        SD2_TEXT_ENCODER if openclip else SD1_TEXT_ENCODER,
        vocab_size=vocab,
        max_length=_shape(sd, "embeddings.position_embedding.weight", "text encoder", 2)[0],
        width=width,
        layers=layers,
        heads=max(1, width // 64),
        mlp_width=_shape(sd, "encoder.layers.0.mlp.fc1.weight", "text encoder", 2)[0],
        projection_dim=projection_dim,
    )
