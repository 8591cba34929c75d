"""VAE files: the autoencoders people download to decode (and encode) with instead of a model's own, such as
vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors or a diffusers AutoencoderKL folder.

`read_vae` reads any of these into our (LDM) names with the VAE's config; `apply_vae` puts one into a loaded
Pipeline and returns the VAE it replaced, which `restore_vae` puts back (A1111's "Automatic"/"None").

Accepted:
- a single file (.safetensors, .ckpt, .pt, .bin) in LDM names, with or without the `first_stage_model.` prefix,
  training leftovers (`loss.*`, `model_ema.*`) ignored by name as checkpoints.py ignores them;
- a whole SD checkpoint: its `first_stage_model.*` part is used and its UNet and text encoders are left out
  (using another model's VAE is a thing people do on purpose; any key that is no part of a checkpoint is an error);
- a single file in diffusers names (an AutoencoderKL's diffusion_pytorch_model.safetensors);
- a diffusers AutoencoderKL folder (config.json and weights), or a diffusers model folder, whose vae/ is used.
The attention projections may be stored as 1x1 convs (LDM) or as Linear weights (diffusers, and LDM-named files
converted from diffusers by some tools); both load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import layouts
from ..checkpoints import (
    IGNORED_KEYS,
    IGNORED_PREFIXES,
    TEXT_PREFIXES,
    UNET_PREFIX,
    V_PRED_KEY,
    VAE_PREFIX,
    ZTSNR_KEY,
    _checked,
    _diffusers_weights,
    _read_json,
)
from ..vae import AutoencoderKL, VAEConfig
from ..weightfiles import CheckpointError, check_weights_of, read_state_dict

if TYPE_CHECKING:
    from ..pipeline import Pipeline

Tensors = dict[str, torch.Tensor]

# What a VAE-only LDM file may carry besides the VAE: the autoencoder's training loss (discriminator, LPIPS)
# and EMA copies, which inference never uses.
VAE_LEFTOVERS = ("loss.", "model_ema.")
# The parts of a whole checkpoint other than its VAE, left out when a checkpoint is read as a VAE.
CHECKPOINT_PARTS = (UNET_PREFIX, "cond_stage_model.", "conditioner.", *TEXT_PREFIXES, *IGNORED_PREFIXES)
# diffusers names of an AutoencoderKL's levels and middle; LDM names use down.N / up.N / mid.
DIFFUSERS_MARKS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block.")
# The weights that fix the latent space: the decoder's input (latent channels) and the quant convs.
DECODER_IN = "decoder.conv_in.weight"
POST_QUANT = "post_quant_conv.weight"
FIX = "choose a VAE file made for Stable Diffusion 1.x/2.x or SDXL (such as vae-ft-mse-840000-ema-pruned.safetensors)"
# What a file that is not a VAE looks like, from its key names: (what, a test on one key), first match wins.
LOOKS_LIKE = (
    ("a LoRA / LyCORIS network", lambda k: "lora_" in k or ".hada_" in k or ".lokr_" in k or k.endswith(".alpha")),
    ("a textual-inversion embedding", lambda k: k in ("emb_params", "string_to_param", "clip_l", "clip_g")),
    ("a UNet", lambda k: k.startswith((UNET_PREFIX, "input_blocks.", "down_blocks.", "time_embed", "conv_in."))),
    ("a text encoder", lambda k: k.startswith(("cond_stage_model.", "conditioner.", "text_model.", "transformer."))),
)


@dataclass(frozen=True)
class VAEState:
    """A pipeline's VAE module and its config: what `apply_vae` replaced, for `restore_vae`."""

    vae: AutoencoderKL
    config: VAEConfig


def read_vae(path: str | os.PathLike) -> tuple[VAEConfig, Tensors]:
    """A VAE file or folder -> (its config, its weights in our LDM names), checked strictly against that config.

    The config is the diffusers config.json's for a folder, else inferred from the tensors; its scaling_factor is
    then the folder's or SD 1.x's default (single files do not store one; `apply_vae` keeps the model's)."""
    path = Path(path)
    if path.is_dir():
        config, tensors = _read_folder(path)
    elif path.exists():
        config, tensors = _read_file(path)
    else:
        raise CheckpointError(path, "no such file or folder", "pass a VAE file or a diffusers AutoencoderKL folder")
    check_weights_of(lambda: AutoencoderKL(config), tensors, path, "VAE", FIX)
    return config, tensors


def _read_file(path: Path) -> tuple[VAEConfig, Tensors]:
    """A single file's VAE, in either naming; the config inferred from its tensors."""
    tensors = _vae_part(read_state_dict(path)[0], path)
    _check_quant_convs(tensors, path)
    if any(k.startswith(DIFFUSERS_MARKS) for k in tensors):
        tensors = _checked(path, layouts.vae_from_diffusers, tensors, _diffusers_levels(tensors, path))
    else:
        tensors = layouts._vae_attention_shapes(tensors, conv=True)
    return _checked(path, layouts.infer_vae_config, tensors), tensors


def _read_folder(root: Path) -> tuple[VAEConfig, Tensors]:
    """A diffusers AutoencoderKL folder, or a model folder's vae/; the config from its config.json."""
    folder = root if (root / "config.json").is_file() else root / "vae"
    if not (folder / "config.json").is_file():
        raise CheckpointError(root, "a folder without config.json or vae/config.json", FIX)
    tensors = _diffusers_weights(folder, "vae")
    _check_quant_convs(tensors, folder)
    config = _checked(folder / "config.json", layouts.vae_config_from_diffusers, _read_json(folder / "config.json"))
    return config, _checked(folder, layouts.vae_from_diffusers, tensors, config)


def _vae_part(tensors: Tensors, name: Path) -> Tensors:
    """The VAE's tensors of a file, without `first_stage_model.`: a whole checkpoint's VAE part, or a VAE file's
    weights less its training leftovers. Any key that belongs to neither is an error naming it."""
    if not any(k.startswith(VAE_PREFIX) for k in tensors):
        vae = {k: v for k, v in tensors.items() if not k.startswith(VAE_LEFTOVERS) and k not in IGNORED_KEYS}
        if not any(k.startswith(("encoder.", "decoder.")) for k in vae):
            raise CheckpointError(name, f"not a VAE: {_looks_like(tensors)}", FIX)
        return vae
    vae = {}
    for key, value in tensors.items():
        if key.startswith(VAE_PREFIX) and not key.startswith(IGNORED_PREFIXES):
            vae[key.removeprefix(VAE_PREFIX)] = value
        elif not key.startswith(CHECKPOINT_PARTS) and key not in IGNORED_KEYS and key not in (V_PRED_KEY, ZTSNR_KEY):
            raise CheckpointError(name, f"unexpected weight {key!r} beside the VAE's first_stage_model.* weights", FIX)
    return vae


def _looks_like(tensors: Tensors) -> str:
    """What a file without VAE weights holds, by its key names, for the error that refuses it."""
    if not tensors:
        return "the file holds no weights"
    for what, test in LOOKS_LIKE:
        key = next((k for k in tensors if test(k)), None)
        if key is not None:
            return f"it looks like {what} (weights such as {key!r}), with no encoder.* / decoder.* weights"
    return f"no encoder.* / decoder.* weights (its first weight is {next(iter(tensors))!r})"


def _check_quant_convs(tensors: Tensors, name: Path) -> None:
    """Refuse the VAEs without quant convs (SD3's and Flux's 16-channel ones), saying how many channels they have."""
    if POST_QUANT not in tensors and DECODER_IN in tensors and tensors[DECODER_IN].ndim == 4:
        channels = tensors[DECODER_IN].shape[1]
        raise CheckpointError(
            name, f"a VAE with {channels} latent channels and no quant convs (SD3/Flux-style), which SD 1.x/2.x/SDXL "
            "models cannot use", FIX,
        )  # fmt: skip


def _diffusers_levels(tensors: Tensors, name: Path) -> VAEConfig:
    """A config with the level count and blocks per level of diffusers-named VAE weights: all the key table
    needs (the rest of the config is then inferred from the renamed tensors)."""
    levels = {k.split(".")[2] for k in tensors if k.startswith("encoder.down_blocks.")}
    blocks = {k.split(".")[4] for k in tensors if k.startswith("encoder.down_blocks.0.resnets.")}
    if not levels or not blocks:
        raise CheckpointError(name, "diffusers-named VAE weights without encoder.down_blocks.0.resnets.*", FIX)
    return VAEConfig(channel_mult=(1,) * len(levels), num_res_blocks=len(blocks))


def check_fits(config: VAEConfig, model: VAEConfig, name: str | os.PathLike) -> None:
    """A VAE fits a model when it makes the same latents: channels and downscale, and reads and writes the same
    images. The weights cannot tell SD 1.x's latent space from SDXL's (same shapes): that choice is the user's."""
    pairs = (
        (config.latent_channels, model.latent_channels, "with {} latent channels; this model's latents have {}"),
        (config.downscale, model.downscale, "that makes latents {}x smaller than images; this model's are {}x smaller"),
        (config.in_channels, model.in_channels, "that encodes {}-channel images; this model's have {}"),
        (config.out_channels, model.out_channels, "that decodes {}-channel images; this model's have {}"),
    )
    for got, want, what in pairs:
        if got != want:
            raise CheckpointError(name, "a VAE " + what.format(got, want), FIX)


def apply_vae(pipe: Pipeline, path: str | os.PathLike) -> VAEState:
    """Decode and encode with the VAE of `path` from now on; returns the VAE it replaced, for `restore_vae`.

    The new VAE is built on the pipeline's device in its dtype, and `pipe.config.vae` becomes its config with the
    model's scaling_factor: a latent scale belongs to the model's latent space (SD 1.x/2.x 0.18215, SDXL 0.13025),
    single files do not store one, and a diffusers folder's own `scaling_factor` is ignored for that reason.
    Nothing changes when the file is refused."""
    from ..pipeline import build  # the pipeline module is the one that calls this one

    config, tensors = read_vae(path)
    check_fits(config, pipe.config.vae, path)
    config = replace(config, scaling_factor=pipe.config.vae.scaling_factor)
    previous = VAEState(pipe.vae, pipe.config.vae)
    pipe.vae = build(AutoencoderKL, config, tensors, pipe.device, pipe.dtype)
    pipe.config = replace(pipe.config, vae=config)
    return previous


def restore_vae(pipe: Pipeline, state: VAEState) -> None:
    """Put back a VAE that `apply_vae` replaced (the model's own one: the first `apply_vae`'s return), unchanged."""
    pipe.vae = state.vae
    pipe.config = replace(pipe.config, vae=state.config)
