"""Training recipes: one dataclass per trainer, read from and written to JSON.

The defaults are the recipe of the shipped model (docs/default-model.md): the 64 x 64 shapes world on
a 2-core CPU. Seconds per step measured on that shared machine with OMP_NUM_THREADS=1 (two threads
there were often several times slower, as the cores are shared) are noted on each class; with
`torchrun --nproc_per_node 2` (one thread each) the VAE ran at ~0.6 s/step. `batch_size` is always
the global batch: under torchrun it is split evenly across the ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..text_encoder import TextEncoderConfig
from ..tiny_decoder import TinyDecoderConfig
from ..unet import UNetConfig
from ..vae import VAEConfig
from .world import ALL_KINDS, check_fraction, check_kinds

KINDS = ("vae", "clip", "unet")
CONFIG_FILE = "config.json"  # the config a run was started with, in its run folder
# path fields that a run's config.json keeps relative to the run folder
RUN_RELATIVE = ("vae", "text_encoder", "init", "base")


@dataclass
class TrainConfig:
    """What every trainer shares: optimisation, schedule of saves and samples, data, seed."""

    steps: int = 2000  # optimizer steps in all
    batch_size: int = 32  # global batch, split evenly across the ranks
    lr: float = 2e-4  # AdamW peak learning rate (constant between the warm-up and the cooldown)
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    cooldown_steps: int = 0  # linear decay from lr to 0 over the last cooldown_steps steps (0 = none)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # clip the gradient norm to this (0 = no clipping)
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = none)
    save_every: int = 250  # steps between checkpoints (the last step is always saved)
    sample_every: int = 250  # steps between sample images / held-out metrics (0 = only at the end)
    keep_checkpoints: int = 1  # checkpoints kept in the run folder (older ones are deleted)
    log_every: int = 10  # steps between lines of log.jsonl
    seed: int = 0  # model initialisation, data order and every random draw of training
    data: str = "shapes"  # "shapes" (the procedural shapes world) or a folder of images with .txt captions
    image_size: int = 64  # training images are image_size x image_size pixels
    two_objects_fraction: float = 0.3  # shapes world: the share of two-object scenes (training and held-out)

    def __post_init__(self) -> None:
        """Reject values the loop cannot run with."""
        for name in ("steps", "batch_size", "save_every", "keep_checkpoints", "log_every", "image_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "cooldown_steps", "sample_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        if not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        check_fraction(self.two_objects_fraction)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")
        self.betas = tuple(self.betas)


@dataclass
class VAETrainConfig(TrainConfig):
    """KL autoencoder: reconstruction + a small KL term. Default: ~1.1 s/step on the 2-core CPU (batch 16)."""

    # 64 px -> 8x8x4. Four channels per GroupNorm group, as in SD's VAE (128 / 32): with one channel
    # per group (32 groups of 32) every feature map is normalised on its own, which throws away the
    # ratios between channels that colour lives in, and colours were still wrong after 1000 steps
    model: VAEConfig = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=8)
    batch_size: int = 16
    lr: float = 4.5e-4
    steps: int = 3500
    recon_loss: str = "l1"  # "l1" or "mse", mean over pixels
    # KL weight as LDM counts it (KL summed over latents, reconstruction summed over pixels); both are
    # divided by the pixel count here, so the trade-off is LDM's
    kl_weight: float = 1e-6
    scale_batches: int = 8  # batches of data encoded after training to measure the latent std
    init: str = ""  # start from this VAE (run folder or vae.safetensors) instead of random weights
    # False: the encoder stays as init left it, so its latent space (and scaling_factor) are kept and
    # a UNet trained on them stays valid while the decoder learns on (decoder fine-tuning, as
    # Stability AI made the ft-MSE VAE); needs init
    train_encoder: bool = True
    sample_count: int = 8  # held-out images shown with their reconstructions

    def __post_init__(self) -> None:
        """Check the VAE-specific fields too."""
        super().__post_init__()
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")
        _check_int("scale_batches", self.scale_batches, 1)
        _check_int("sample_count", self.sample_count, 1)
        if not self.train_encoder and not self.init:
            raise ValueError("train_encoder false (decoder fine-tuning) needs init: the VAE whose encoder is kept")
        if self.image_size % self.model.downscale:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE's {self.model.downscale}")


@dataclass(frozen=True)
class ImageEncoderConfig:
    """The CLIP trainer's small CNN image tower."""

    channels: tuple[int, ...] = (32, 64, 128, 256)  # width of each stage; every stage halves H and W
    norm_groups: int = 8  # GroupNorm groups (per-sample statistics: no batch coupling across ranks)
    pooled_size: int = 4  # features are average-pooled to pooled_size x pooled_size, then flattened


@dataclass
class CLIPTrainConfig(TrainConfig):
    """Text tower + small image tower, symmetric InfoNCE. Default: ~0.65 s/step on the 2-core CPU (batch 64)."""

    # 77 tokens, quick-GELU; 192 wide so that the shipped model, whose 49408 x width token table is its
    # largest tensor, stays under 50 MB in float16
    text: TextEncoderConfig = TextEncoderConfig(width=192, layers=4, heads=3, mlp_width=768)
    image: ImageEncoderConfig = ImageEncoderConfig()
    embed_dim: int = 192  # shared embedding width of the two projections
    batch_size: int = 64  # contrastive batch (gathered across ranks: the loss sees the global batch)
    lr: float = 5e-4
    weight_decay: float = 0.1
    steps: int = 1500
    init_logit_scale: float = math.log(1 / 0.07)  # learned temperature, as log(1 / T)
    max_logit_scale: float = math.log(100.0)  # clamp: the logits are scaled by at most 100
    eval_count: int = 64  # held-out pairs for caption -> image retrieval accuracy
    sample_count: int = 6  # held-out captions shown with the image each retrieves
    # batches of scene / twin pairs (ShapesWorld twins): each two-object scene beside the same objects
    # swapped, each single object beside itself elsewhere, captioned alike. Random batches almost never
    # hold such a pair, so without them the text tower may treat "above" and "below" as one word
    hard_negatives: bool = False
    init: str = ""  # start from this CLIP run's latest checkpoint (both towers) instead of random weights

    def __post_init__(self) -> None:
        """Check the CLIP-specific fields too."""
        super().__post_init__()
        if self.hard_negatives and self.data != "shapes":
            raise ValueError(f"hard_negatives needs the shapes world (data 'shapes'), got data {self.data!r}: "
                             "a caption folder has no twin scenes")  # fmt: skip
        if self.hard_negatives and self.batch_size % 2:
            raise ValueError(
                f"hard_negatives pairs each scene with its twin: batch_size must be even, got {self.batch_size}"
            )


@dataclass
class UNetTrainConfig(TrainConfig):
    """Noise prediction on VAE latents, frozen text encoder. Default: ~0.75 s/step on the 2-core CPU (batch 32)."""

    # context_dim and sample_size are set from the text encoder's width and image_size / the VAE's downscale
    model: UNetConfig = UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
        num_heads=4, context_dim=192, sample_size=8, norm_groups=16,
    )  # fmt: skip
    lr: float = 4e-4
    steps: int = 6000
    ema_decay: float = 0.999  # the sample images and the exported UNet use the EMA weights
    uncond_prob: float = 0.1  # captions replaced by "" this often (classifier-free guidance)
    vae: str = ""  # VAE run folder or exported file (required; --vae)
    text_encoder: str = ""  # CLIP run folder or exported text-encoder file (required; --text-encoder)
    init: str = ""  # start from this UNet (run folder or unet.safetensors: its EMA weights) instead of random
    sample_count: int = 4  # held-out captions drawn as sample prompts
    sample_seeds: int = 2  # images per sample prompt
    sample_steps: int = 20
    sample_sampler: str = "DPM++ 2M"
    sample_cfg_scale: float = 5.0

    def __post_init__(self) -> None:
        """Check the UNet-specific fields too."""
        super().__post_init__()
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob!r}")


@dataclass
class LoraTrainConfig(TrainConfig):
    """A LoRA (training/lora.py) on a frozen model. Default: the star on the shipped model, the shapes world
    with stars mixed in (docs/lora-training.md)."""

    base: str = ""  # the model to adapt: a single file or diffusers folder ("" = the shipped model; --base)
    rank: int = 8  # the low-rank width of every LoRA layer (--rank)
    alpha: float = 8.0  # the update is scaled by alpha / rank
    train_text_encoder: bool = True  # LoRA on the text encoder's attention and MLP too, not only the UNet's
    kinds: tuple[str, ...] = ALL_KINDS  # shapes world: the kinds objects are drawn from (stars among the old ones)
    output_name: str = "star"  # the file is RUN/<output_name>.safetensors; also its ss_output_name
    uncond_prob: float = 0.1  # captions replaced by "" this often, as the base was trained (guidance)
    lr: float = 1e-3
    steps: int = 1500
    warmup_steps: int = 50
    sample_every: int = 500
    sample_kind: str = "star"  # sample prompts ask for this kind; reports the share judged as one ("" = none)
    sample_count: int = 8  # sample prompts
    started_at: float = 0.0  # when the run began (unix time; set by the trainer, kept on resume)

    def __post_init__(self) -> None:
        """Check the LoRA-specific fields too."""
        super().__post_init__()
        _check_int("rank", self.rank, 1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        self.kinds = check_kinds(self.kinds)
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob!r}")
        if self.sample_kind and self.sample_kind not in ALL_KINDS:
            raise ValueError(f"sample_kind must be one of {', '.join(ALL_KINDS)} or '', got {self.sample_kind!r}")
        _check_int("sample_count", self.sample_count, 1)
        if not self.output_name or any(c in self.output_name for c in '/\\:'):
            raise ValueError(f"output_name must be a plain file name (no folders), got {self.output_name!r}")


@dataclass
class TinyDecoderTrainConfig(TrainConfig):
    """A tiny decoder (TAESD, tiny_decoder.py) distilled from a frozen model's full VAE decoder
    (training/tiny_decoder.py): L1 + mse_weight * MSE between the two decoders' images of the same latents."""

    model: TinyDecoderConfig = TinyDecoderConfig()  # latent_channels is set from the base model's VAE
    base: str = ""  # the model whose VAE is distilled: a single file or diffusers folder ("" = the shipped model)
    batch_size: int = 16
    lr: float = 1e-3
    steps: int = 1000  # the shipped tiny decoder's recipe: ~1.6 s/step on the 2-core CPU, one thread
    warmup_steps: int = 50
    cooldown_steps: int = 250
    mse_weight: float = 1.0
    sample_count: int = 8  # held-out images shown with both decoders' images
    heldout_count: int = 64  # held-out images whose mean per-pixel difference is reported

    def __post_init__(self) -> None:
        """Check the tiny-decoder fields too."""
        super().__post_init__()
        _check_int("sample_count", self.sample_count, 1)
        _check_int("heldout_count", self.heldout_count, 1)
        if isinstance(self.mse_weight, bool) or not isinstance(self.mse_weight, int | float) or self.mse_weight < 0:
            raise ValueError(f"mse_weight must be a number >= 0, got {self.mse_weight!r}")


CONFIGS: dict[str, type[TrainConfig]] = {
    "vae": VAETrainConfig, "clip": CLIPTrainConfig, "unet": UNetTrainConfig, "lora": LoraTrainConfig,
    "tiny-decoder": TinyDecoderTrainConfig,
}  # fmt: skip


def _check_int(name: str, value: object, low: int) -> None:
    """Raise ValueError unless value is an int >= low (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON values (nested model configs as objects)."""
    return dataclasses.asdict(config)


def config_from_dict(kind: str, values: dict[str, Any]) -> TrainConfig:
    """Build the `kind` trainer's config from JSON values; missing keys keep their defaults, unknown ones fail."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown trainer {kind!r}; expected one of {', '.join(CONFIGS)}")
    return _build(CONFIGS[kind], values, kind)


def _build(cls: type, values: dict[str, Any], where: str, base: Any = None) -> Any:
    """A dataclass from a dict, starting from `base` (else the class defaults): nested dataclasses
    start from the parent's default for that field, so a JSON object need only name what changes."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            value = _build(kind, value, f"{where}.{name}", fields[name].default)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(kind: str, path: str | Path, section: bool = False) -> TrainConfig:
    """Read a trainer config from a JSON file: an object of the fields to change, or with `section`
    (a `train all` file) an object with one such object per trainer ("vae", "clip", "unet")."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if section:
        if not isinstance(values, dict) or set(values) - set(KINDS):
            raise ValueError(f"{path}: a `train all` config is an object with sections {', '.join(KINDS)}")
        values = values.get(kind, {})
    return config_from_dict(kind, values)


def run_relative(path: str | Path, run_dir: str | Path) -> str:
    """A path as a run's config.json keeps it: relative to the run folder."""
    return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())


def load_run_config(kind: str, run_dir: str | Path) -> TrainConfig:
    """The config.json of a run folder, its run-relative paths made usable from the working directory."""
    config = load_config(kind, Path(run_dir) / CONFIG_FILE)
    paths = {
        name: str(Path(run_dir) / getattr(config, name))
        for name in RUN_RELATIVE
        if getattr(config, name, "") and not Path(getattr(config, name)).is_absolute()
    }
    return dataclasses.replace(config, **paths)


def resolve_config(
    kind: str, run_dir: str | Path, config_file: str | None, resume: bool, section: bool = False, **overrides: Any
) -> TrainConfig:
    """The config of `latentforge train KIND`: the run's own config.json when resuming, else the --config
    file, else the defaults; then the options given on the command line (None = not given)."""
    if resume and (Path(run_dir) / CONFIG_FILE).is_file():
        if config_file:
            raise ValueError("--config cannot be combined with --resume: the run's config.json is used "
                             "(change steps, batch size, lr with their options)")  # fmt: skip
        config = load_run_config(kind, run_dir)
    elif config_file:
        config = load_config(kind, config_file, section)
    else:
        config = CONFIGS[kind]()
    return with_overrides(config, **overrides)


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """A copy with the given fields changed; None values are ignored (options not given on the command line)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config



def model_config(cls: type, values: dict[str, Any]) -> Any:
    """A model config (VAEConfig, UNetConfig, TextEncoderConfig, ...) from JSON values, lists as tuples."""
    return _build(cls, values, cls.__name__)
