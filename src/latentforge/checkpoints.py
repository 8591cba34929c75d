"""Stable Diffusion checkpoints: the single-file (CompVis/LDM) layout and the diffusers folder layout.

Both are read into `Parts`: our-named tensors for "unet", "vae" and "text_encoder", using the key tables of
`layouts.py`; the model's config is inferred from its tensors, and loading is strict. The files themselves
are read and written by `weightfiles.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch

from . import layouts
from .atomic import write_json
from .config import PREDICTION_TYPES, ModelConfig, SamplingDefaults
from .schedules import NoiseSchedule
from .weightfiles import CheckpointError, read_state_dict, write_safetensors

Parts = dict[str, dict[str, torch.Tensor]]
COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = (*COMPONENTS, "text_encoder_2")
CONFIG_METADATA_KEY = "latentforge_config"  # our ModelConfig, in the metadata of files we write

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")  # SD 1.x
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL's ViT-L
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's ViT-bigG
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner's only text encoder
# single-file text-tower prefixes -> (our component, the family that uses it)
TEXT_PREFIXES = {
    CLIP_PREFIXES[0]: ("text_encoder", "sd1"),
    CLIP_PREFIXES[1]: ("text_encoder", "sd1"),
    OPENCLIP_PREFIX: ("text_encoder", "sd2"),
    SDXL_CLIP_PREFIX: ("text_encoder", "sdxl"),
    SDXL_OPENCLIP_PREFIX: ("text_encoder_2", "sdxl"),
    REFINER_OPENCLIP_PREFIX: ("text_encoder", "sdxl-refiner"),
}
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # empty marker tensors of v-prediction (zero terminal SNR) SDXL files
SDXL_VAE_SCALE = 0.13025  # SDXL's VAE latent scale (the weights cannot tell it)
SDXL_SAMPLE_SIZE = 128  # latents of SDXL's native 1024 x 1024
# Training leftovers in single files that inference never uses: the noise schedule buffers of the
# LDM wrapper, EMA copies and the autoencoder's training loss.
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates",
}  # fmt: skip
NOT_SD = "not a Stable Diffusion 1.x/2.x or SDXL checkpoint (SD3 and others are not supported)"
SD2_BASE_GLOBAL_STEP = 875000  # the 512-px epsilon SD 2.x base releases; other SD 2.x files are 768-v
VIT_H_BLOCKS = 24  # blocks of the OpenCLIP ViT-H text tower; SD 2.x uses the first 23

DIFFUSERS_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
DIFFUSERS_BIN = {
    "unet": "diffusion_pytorch_model.bin",
    "vae": "diffusion_pytorch_model.bin",
    "text_encoder": "pytorch_model.bin",
    "text_encoder_2": "pytorch_model.bin",
}
# Stable Diffusion's published scheduler: what a folder without scheduler/ gets
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "clip_sample": False,
}


def _split_single_file(tensors: dict[str, torch.Tensor], name: str) -> tuple[Parts, str]:
    """Sort a single file's tensors by component, prefixes removed (text towers still in their own naming);
    also the family its keys say: "sd1", "sd2", "sdxl" or "sdxl-refiner"."""
    parts: Parts = {}
    families = set()
    for key, value in tensors.items():
        if key.startswith(UNET_PREFIX):
            parts.setdefault("unet", {})[key.removeprefix(UNET_PREFIX)] = value
        elif key.startswith(VAE_PREFIX) and not key.startswith(IGNORED_PREFIXES):
            parts.setdefault("vae", {})[key.removeprefix(VAE_PREFIX)] = value
        elif prefix := next((p for p in TEXT_PREFIXES if key.startswith(p)), None):
            component, family = TEXT_PREFIXES[prefix]
            families.add(family)
            if not key.endswith("position_ids"):
                parts.setdefault(component, {})[key.removeprefix(prefix)] = value
        elif key not in (V_PRED_KEY, ZTSNR_KEY) and key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES):
            raise CheckpointError(name, f"unexpected weight {key!r}", NOT_SD)
    if len(families) > 1:
        several = ", ".join(sorted(families))
        raise CheckpointError(name, f"holds the text encoders of several model families ({several})", NOT_SD)
    family = families.pop() if families else "sd1"
    needed = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model."}
    if family == "sdxl":
        needed = {**needed, "text_encoder": SDXL_CLIP_PREFIX, "text_encoder_2": SDXL_OPENCLIP_PREFIX}
    elif family == "sdxl-refiner":
        needed = {**needed, "text_encoder": REFINER_OPENCLIP_PREFIX}
    for component, prefix in needed.items():
        if not parts.get(component):
            raise CheckpointError(name, f"no {component} weights ({prefix}*)", "a complete checkpoint is needed")
    return parts, family


def read_single_file(path: str | os.PathLike, prediction_type: str | None = None) -> tuple[ModelConfig, Parts]:
    """Read an original-layout .safetensors/.ckpt into our names, with its config inferred from the tensors."""
    name = os.fspath(path)
    tensors, metadata = read_state_dict(path)
    markers = {key for key in (V_PRED_KEY, ZTSNR_KEY) if key in tensors}
    parts, family = _split_single_file(tensors, name)
    del tensors
    stored = metadata.get(CONFIG_METADATA_KEY)
    if stored is not None:  # written by latentforge: the config is exact, heads included
        try:
            config = ModelConfig.from_json(stored)
        except ValueError as e:
            fix = f"its {CONFIG_METADATA_KEY} metadata is damaged; convert the model again from its source"
            raise CheckpointError(name, str(e), fix) from None
    try:
        _text_from_openclip(parts, family, config if stored is not None else None)
        if stored is None:
            config = _infer_config(parts, metadata, family, markers)
    except ValueError as e:
        raise CheckpointError(name, str(e)) from None
    if prediction_type is not None:
        config = replace(config, prediction_type=prediction_type)
    check_parts(config, parts, name)
    return config, parts


def _text_from_openclip(parts: Parts, family: str, config: ModelConfig | None) -> None:
    """Rename the OpenCLIP text towers of `parts` in place: SD 2.x's (without its unused last block) and
    SDXL's bigG, of the base or the refiner (all blocks, and its projection)."""
    if family == "sd2":
        text = parts["text_encoder"]
        layers = config.text_encoder.layers if config is not None else openclip_layers_used(text)
        parts["text_encoder"] = layouts.text_encoder_from_openclip(text, layers)
    elif family in ("sdxl", "sdxl-refiner"):
        component = "text_encoder_2" if family == "sdxl" else "text_encoder"
        text = parts[component]
        parts[component] = layouts.text_encoder_from_openclip(text, _openclip_blocks(text), projection=True)


def openclip_layers_used(tensors: dict[str, torch.Tensor]) -> int:
    """How many blocks of an OpenCLIP text tower SD 2.x runs: released files hold all 24 ViT-H blocks
    and read the penultimate one's output; files converted from diffusers hold only the 23 used."""
    blocks = _openclip_blocks(tensors)
    return blocks - 1 if blocks == VIT_H_BLOCKS else blocks


def _openclip_blocks(tensors: dict[str, torch.Tensor]) -> int:
    """The number of transformer blocks of an OpenCLIP text tower, from its OpenCLIP-named tensors."""
    return len({k.split(".")[2] for k in tensors if k.startswith("transformer.resblocks.")})


def _infer_config(parts: Parts, metadata: dict, family: str, markers: set[str] = frozenset()) -> ModelConfig:
    """A single file's ModelConfig from its tensors and its family ("sd1", "sd2", "sdxl", "sdxl-refiner"), and
    the marker keys it carries (SDXL's `v_pred`, `ztsnr`)."""
    if family.startswith("sdxl"):
        return _infer_sdxl_config(parts, markers)
    sd2 = family == "sd2"
    unet = layouts.infer_unet_config(parts["unet"], head_dim=64 if sd2 else None)
    text = layouts.infer_text_encoder_config(parts["text_encoder"], sd2)
    # the weights cannot tell epsilon from v; the SD 2.x base release is known by its training step
    v = sd2 and metadata.get("global_step") != SD2_BASE_GLOBAL_STEP and unet.in_channels == 4
    if v:
        unet = replace(unet, sample_size=96)  # the 768-v models
    return ModelConfig(
        unet=unet,
        vae=layouts.infer_vae_config(parts["vae"]),
        text_encoder=text,
        prediction_type="v_prediction" if v else "epsilon",
        pad_token="!" if sd2 else "<|endoftext|>",
    )


def _infer_sdxl_config(parts: Parts, markers: set[str]) -> ModelConfig:
    """The ModelConfig of an SDXL base or refiner from its tensors: 64-wide heads, 1024 px, the VAE scale
    0.13025; v-prediction only when the file carries the `v_pred` marker, and with `ztsnr` the zero-terminal-SNR
    schedule, sampled with "trailing" timesteps so that the first step is the pure-noise one. The refiner's one
    text encoder is bigG (OpenCLIP names, "!" padding); the base's first is ViT-L. The size embeddings' width
    is what the added vector leaves beside the pooled text: (adm - pooled) / 6 numbers (5 for the refiner)."""
    refiner = "text_encoder_2" not in parts
    text = layouts.infer_text_encoder_config(parts["text_encoder"], refiner)
    text_2 = None if refiner else layouts.infer_text_encoder_config(parts["text_encoder_2"], True)
    unet = layouts.infer_unet_config(parts["unet"])
    pooled, numbers = (text_2 or text).projection_dim or 0, 5 if refiner else 6
    size_embed_dim, rest = divmod((unet.adm_in_channels or 0) - pooled, numbers)
    if rest or size_embed_dim < 1:
        raise ValueError(
            f"the UNet's added vector ({unet.adm_in_channels} wide) does not fit {pooled} of pooled text and "
            f"{numbers} size numbers; not an SDXL {'refiner' if refiner else 'base'} model"
        )
    scheduler = {}
    if ZTSNR_KEY in markers:
        scheduler = {**SD_SCHEDULER, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return ModelConfig(
        unet=replace(unet, sample_size=SDXL_SAMPLE_SIZE, size_embed_dim=size_embed_dim),
        vae=replace(layouts.infer_vae_config(parts["vae"]), scaling_factor=SDXL_VAE_SCALE),
        text_encoder=text,
        text_encoder_2=text_2,
        prediction_type="v_prediction" if V_PRED_KEY in markers else "epsilon",
        pad_token="!" if refiner else "<|endoftext|>",
        pad_token_2="!",
        scheduler=scheduler,
    )


def check_parts(config: ModelConfig, parts: Parts, name: str) -> None:
    """Strict loading: every weight the models need is present with its shape and a floating-point type,
    and nothing else."""
    from .text_encoder import TextEncoder
    from .unet import UNet
    from .vae import AutoencoderKL

    builders = {"unet": (UNet, config.unet), "vae": (AutoencoderKL, config.vae), "text_encoder": (TextEncoder, config.text_encoder)}
    if config.text_encoder_2 is not None:
        builders["text_encoder_2"] = (TextEncoder, config.text_encoder_2)
    extra = sorted(parts.keys() - builders.keys())
    if extra:
        raise CheckpointError(name, f"{extra[0]} weights, which a {config.describe()} model does not have")
    for component, (cls, cfg) in builders.items():
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
        got = parts.get(component, {})
        missing = sorted(expected.keys() - got.keys())
        unexpected = sorted(got.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & got.keys() if tuple(got[k].shape) != expected[k])
        problems = []
        if missing:
            problems.append(f"missing {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            problems.append(f"{k!r} has shape {tuple(got[k].shape)}, expected {expected[k]} ({len(wrong)} such)")
        if problems:
            raise CheckpointError(name, f"{component} weights do not fit a {config.describe()} model: " + "; ".join(problems))
        # every weight of these models is a float: an integer one would load and fail at the first step
        not_float = sorted(k for k, v in got.items() if not v.is_floating_point())
        if not_float:
            k = not_float[0]
            raise CheckpointError(
                name,
                f"{component} weight {k!r} is {str(got[k].dtype).removeprefix('torch.')}, not a floating-point "
                f"type ({len(not_float)} such)",
                "the file is damaged or not a Stable Diffusion model; convert it again from its source",
            )


def _few(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _read_json(path: Path) -> dict:
    """A diffusers config file; a missing or broken one is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "missing", "a diffusers model folder needs this file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"broken JSON ({e})", "restore the file from the model's source") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _diffusers_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """Read one component's weights: .safetensors preferred, then .bin (restricted unpickling), or shards."""
    stem = DIFFUSERS_WEIGHTS[component]
    candidates = [f"{stem}.safetensors", DIFFUSERS_BIN[component], f"{stem}.fp16.safetensors"]
    for file in candidates:
        if (folder / file).is_file():
            return read_state_dict(folder / file)[0]
    for index in (f"{stem}.safetensors.index.json", DIFFUSERS_BIN[component] + ".index.json"):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(folder / index, "weight_map must map weight names to shard files", "re-download it")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(read_state_dict(folder / shard)[0])
            return tensors
    raise CheckpointError(folder, f"no weights found (looked for {', '.join(candidates)})")


def read_diffusers(folder: str | os.PathLike, prediction_type: str | None = None) -> tuple[ModelConfig, Parts]:
    """Read a diffusers Stable Diffusion folder into our names, configs from its config.json files."""
    root = Path(folder)
    index = _read_json(root / "model_index.json")
    if "unet" not in index or "vae" not in index or "text_encoder" not in index:
        raise CheckpointError(root / "model_index.json", "not a Stable Diffusion pipeline (needs unet, vae, text_encoder)")
    refiner = index.get("text_encoder") == [None, None] and bool(index.get("text_encoder_2"))
    components = SDXL_COMPONENTS if index.get("text_encoder_2") and not refiner else COMPONENTS
    # our component -> its folder: the refiner's one text encoder (and tokenizer) are diffusers' second
    folders = {c: c for c in components} | ({"text_encoder": "text_encoder_2"} if refiner else {})
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else dict(SD_SCHEDULER)
    # each file's values are checked where they are read, so that an error names that file
    readers = {
        "unet": layouts.unet_config_from_diffusers,
        "vae": layouts.vae_config_from_diffusers,
        "text_encoder": layouts.text_encoder_config_from_diffusers,
        "text_encoder_2": layouts.text_encoder_config_from_diffusers,
    }
    configs = {}
    for component in components:
        read = readers[component]
        path = root / folders[component] / "config.json"
        configs[component] = _checked(path, read, _read_json(path))
    _checked(scheduler_path, NoiseSchedule.from_config, scheduler)
    if prediction_type is None:
        prediction_type = _checked(scheduler_path, _prediction_type, scheduler.get("prediction_type", "epsilon"))
    defaults = _checked(root / "model_index.json", SamplingDefaults.from_dict, index.get("_latentforge_defaults", {}))
    weights = {c: _diffusers_weights(root / folders[c], c) for c in components}
    parts = {
        "unet": _checked(root / "unet", layouts.unet_from_diffusers, weights.pop("unet"), configs["unet"]),
        "vae": _checked(root / "vae", layouts.vae_from_diffusers, weights.pop("vae"), configs["vae"]),
    }
    for text in components[2:]:
        parts[text] = layouts.text_encoder_from_diffusers(weights.pop(text))
    second = {}
    if "text_encoder_2" in components:
        second = dict(text_encoder_2=configs["text_encoder_2"], pad_token_2=_tokenizer_pad_token(root / "tokenizer_2"))
    tokenizer = root / tokenizer_folder(refiner, second=False)
    config = _checked(
        root, ModelConfig, unet=configs["unet"], vae=configs["vae"], text_encoder=configs["text_encoder"],
        prediction_type=prediction_type, pad_token=_tokenizer_pad_token(tokenizer), scheduler=scheduler,
        defaults=defaults, **second,
    )  # fmt: skip
    check_parts(config, parts, root)
    return config, parts


def tokenizer_folder(refiner: bool, second: bool) -> str:
    """The diffusers folder of a model's first (or SDXL's second) tokenizer: the refiner's only one is
    diffusers' tokenizer_2/."""
    return "tokenizer_2" if second or refiner else "tokenizer"


T = TypeVar("T")


def _checked(path: Path, function: Callable[..., T], *args: object, **kwargs: object) -> T:
    """function(*args, **kwargs), with a ValueError turned into a CheckpointError naming `path`."""
    try:
        return function(*args, **kwargs)
    except CheckpointError:
        raise
    except ValueError as e:
        fix = "restore the file from the model's source, or use a Stable Diffusion 1.x/2.x model"
        raise CheckpointError(path, str(e), fix if path.suffix == ".json" else None) from None


def _prediction_type(value: object) -> str:
    if value not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {value!r}")
    return value


def _tokenizer_pad_token(folder: Path) -> str:
    """The pad token a diffusers tokenizer/ folder declares (SD 2.x: "!"), else the end token."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).is_file():
            pad = _read_json(folder / file).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad and not isinstance(pad, str):
                raise CheckpointError(folder / file, f"pad_token must be a token such as '!', got {pad!r}")
            if pad:
                return pad
    return "<|endoftext|>"


def read_checkpoint(path: str | os.PathLike, prediction_type: str | None = None) -> tuple[ModelConfig, Parts]:
    """Read either layout: a folder is a diffusers model, a file a single-file checkpoint."""
    path = Path(path)
    if path.is_dir():
        return read_diffusers(path, prediction_type)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    return read_single_file(path, prediction_type)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def single_file_tensors(config: ModelConfig, parts: Parts) -> dict[str, torch.Tensor]:
    """Our-named parts -> the original (CompVis/LDM) single-file keys; SD 2.x text in OpenCLIP names."""
    tensors = {UNET_PREFIX + k: v for k, v in parts["unet"].items()}
    tensors.update({VAE_PREFIX + k: v for k, v in parts["vae"].items()})
    if config.version == "sd2":
        text = layouts.text_encoder_to_openclip(parts["text_encoder"])
        tensors.update({OPENCLIP_PREFIX + k: v for k, v in text.items()})
    elif config.version == "sdxl":
        tensors.update({SDXL_CLIP_PREFIX + k: v for k, v in parts["text_encoder"].items()})
        text = layouts.text_encoder_to_openclip(parts["text_encoder_2"])
        tensors.update({SDXL_OPENCLIP_PREFIX + k: v for k, v in text.items()})
    elif config.version == "sdxl-refiner":
        text = layouts.text_encoder_to_openclip(parts["text_encoder"])
        tensors.update({REFINER_OPENCLIP_PREFIX + k: v for k, v in text.items()})
    else:
        tensors.update({CLIP_PREFIXES[0] + k: v for k, v in parts["text_encoder"].items()})
    if config.version.startswith("sdxl"):  # the markers other tools read
        if config.prediction_type == "v_prediction":
            tensors[V_PRED_KEY] = torch.zeros(0)
        if config.scheduler.get("rescale_betas_zero_snr"):
            tensors[ZTSNR_KEY] = torch.zeros(0)
    return tensors


def write_single_file(config: ModelConfig, parts: Parts, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write the original layout as one .safetensors, our config in its metadata."""
    tensors = _cast(single_file_tensors(config, parts), dtype)
    write_safetensors(tensors, path, metadata={CONFIG_METADATA_KEY: config.to_json()})


def write_diffusers(
    config: ModelConfig,
    parts: Parts,
    folder: str | os.PathLike,
    tokenizer,
    dtype: torch.dtype | None = None,
    tokenizer_2=None,
) -> None:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL
    also text_encoder_2/ and tokenizer_2/, which `tokenizer_2` must then be).

    It is assembled under a temporary name beside `folder` and renamed into place at the end, so an
    interrupted write leaves no half-made model."""
    folder = Path(folder)
    if folder.exists():
        raise CheckpointError(folder, "already exists", "choose a new destination (nothing is overwritten)")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        _write_diffusers_tree(config, parts, tmp, {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}, dtype)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _default_scheduler(config: ModelConfig) -> dict:
    """SD's published schedule for a model that came without one, as the diffusers scheduler that runs
    the model's default sampler when there is one (else SD's PNDM)."""
    from .samplers import DIFFUSERS_SCHEDULERS

    cls, options = DIFFUSERS_SCHEDULERS.get(config.defaults.sampler, (SD_SCHEDULER["_class_name"], {}))
    return {**SD_SCHEDULER, "_class_name": cls, **options}


def _write_diffusers_tree(
    config: ModelConfig, parts: Parts, root: Path, tokenizers: dict, dtype: torch.dtype | None
) -> None:
    from . import __version__

    sdxl, refiner = config.text_encoder_2 is not None, config.refiner
    if sdxl and tokenizers["tokenizer_2"] is None:
        raise ValueError("an SDXL model is written with both tokenizers (tokenizer_2 is missing)")
    scheduler = {**(config.scheduler or _default_scheduler(config)), "prediction_type": config.prediction_type}
    index = {
        "_class_name": _pipeline_class(config),
        "_diffusers_version": "0.30.0",
        "_latentforge_version": __version__,
        "_latentforge_defaults": dataclasses.asdict(config.defaults),  # "_" keys are not read by diffusers
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler.get("_class_name", "PNDMScheduler")],
    }
    # our component -> its folder (the refiner's one text encoder is diffusers' second)
    folders = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder_2" if refiner else "text_encoder"}
    if sdxl or refiner:  # SDXL's pipelines have no safety checker
        second = ["transformers", "CLIPTextModelWithProjection"]
        index.update(text_encoder_2=second, tokenizer_2=["transformers", "CLIPTokenizer"])
        # an empty negative prompt is zeros for the base; the refiner's published pipeline encodes it
        index.update(force_zeros_for_empty_prompt=not refiner, requires_aesthetics_score=refiner)
        if refiner:
            index.update(text_encoder=[None, None], tokenizer=[None, None])
            tokenizers = {"tokenizer_2": tokenizers["tokenizer"]}
        else:
            folders["text_encoder_2"] = "text_encoder_2"
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    root.mkdir(parents=True)
    write_json(index, root / "model_index.json")
    for component, folder in folders.items():
        cfg = getattr(config, component)
        if component == "unet":
            weights, cfg_json = layouts.unet_to_diffusers(parts[component], cfg), layouts.unet_config_to_diffusers(cfg)
        elif component == "vae":
            weights, cfg_json = layouts.vae_to_diffusers(parts[component], cfg), layouts.vae_config_to_diffusers(cfg)
        else:
            weights = layouts.text_encoder_to_diffusers(parts[component])
            cfg_json = layouts.text_encoder_config_to_diffusers(cfg)
        (root / folder).mkdir()
        write_json(cfg_json, root / folder / "config.json")
        write_safetensors(_cast(weights, dtype), root / folder / f"{DIFFUSERS_WEIGHTS[component]}.safetensors")
    (root / "scheduler").mkdir()
    write_json(scheduler, root / "scheduler" / "scheduler_config.json")
    for name, tokenizer in tokenizers.items():
        if tokenizer is not None:
            tokenizer.save_pretrained(root / name)


def _pipeline_class(config: ModelConfig) -> str:
    """The diffusers pipeline class a model's folder names: SD or SDXL, txt2img or inpainting; the refiner's
    is SDXL's img2img pipeline."""
    if config.refiner:
        return "StableDiffusionXLImg2ImgPipeline"
    family = "StableDiffusionXL" if config.text_encoder_2 is not None else "StableDiffusion"
    return f"{family}InpaintPipeline" if config.inpainting else f"{family}Pipeline"
