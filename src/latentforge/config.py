"""What a loaded model is: the configs of its parts and the facts the weights alone cannot tell."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .request import MAX_CFG_SCALE, MIN_CFG_SCALE
from .samplers import get_sampler
from .text_encoder import TextEncoderConfig
from .unet import UNetConfig
from .vae import VAEConfig

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class SamplingDefaults:
    """The settings `generate` uses when a request leaves them out: the model's own best ones.
    Any SD checkpoint gets AUTOMATIC1111's (Euler a, 20 steps, guidance 7); the shipped model
    stores those measured best for it."""

    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, str) or not self.sampler:
            raise ValueError(f"the default sampler must be a sampler name, got {self.sampler!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"the default steps must be a whole number >= 1, got {self.steps!r}")
        get_sampler(self.sampler)  # an unknown name fails here, listing the known ones
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)):
            raise ValueError(f"the default cfg_scale must be a number, got {self.cfg_scale!r}")
        if not MIN_CFG_SCALE <= self.cfg_scale <= MAX_CFG_SCALE:
            raise ValueError(
                f"the default cfg_scale must be between {MIN_CFG_SCALE:g} and {MAX_CFG_SCALE:g}, got {self.cfg_scale!r}"
            )

    @classmethod
    def from_dict(cls, values: object) -> SamplingDefaults:
        """From stored JSON values (sampler, steps, cfg_scale); anything else is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"sampling defaults must be an object of {', '.join(sorted(known))}, got {values!r}")
        return cls(**values)

    def describe(self) -> str:
        """'DPM++ 2M, 12 steps, guidance 5'."""
        return f"{self.sampler}, {self.steps} steps, guidance {self.cfg_scale:g}"


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    prediction_type: str = "epsilon"  # what the UNet predicts: the noise, or v (SD 2.x 768-v)
    pad_token: str = "<|endoftext|>"  # SD 1.x pads prompts with the end token, SD 2.x with "!" (id 0)
    # the diffusers scheduler_config.json of the model, when it came with one (sampling defaults)
    scheduler: dict = field(default_factory=dict, compare=False)
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults, compare=False)
    # SDXL: the second text encoder (OpenCLIP ViT-bigG, with the projection that makes the pooled vector),
    # whose vectors are joined to the first's; its tokenizer pads with "!" (id 0)
    text_encoder_2: TextEncoderConfig | None = None
    pad_token_2: str = "!"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        for name in ("pad_token", "pad_token_2"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a token such as '!', got {getattr(self, name)!r}")
        if self.text_encoder_2 is not None and not self.text_encoder_2.projection_dim:
            raise ValueError("the second text encoder (SDXL's ViT-bigG) needs its projection (projection_dim)")
        if self.unet.adm_in_channels is not None and not (self.text_encoder_2 or self.text_encoder).projection_dim:
            raise ValueError("a UNet with an added vector (SDXL) needs a text encoder with a projection (pooled text)")
        if not isinstance(self.scheduler, dict):
            raise ValueError(f"scheduler must be a diffusers scheduler config (an object), got {self.scheduler!r}")
        if self.unet.context_dim != self.context_width:
            raise ValueError(
                f"the UNet reads {self.unet.context_dim}-wide text vectors but the text encoder"
                f"{'s make' if self.text_encoder_2 else ' makes'} {self.context_width}-wide ones"
            )
        if self.vae.latent_channels != self.unet.out_channels:
            raise ValueError(
                f"the VAE has {self.vae.latent_channels} latent channels but the UNet predicts {self.unet.out_channels}"
            )

    @property
    def context_width(self) -> int:
        """Width of the text vectors the UNet reads: the text encoders' widths joined."""
        return self.text_encoder.width + (self.text_encoder_2.width if self.text_encoder_2 else 0)

    @property
    def version(self) -> str:
        """'sdxl' (two text encoders), 'sdxl-refiner' (one, with a UNet that takes the added vector), 'sd2'
        (OpenCLIP text tower, GELU) or 'sd1' (OpenAI CLIP, quick-GELU)."""
        if self.text_encoder_2 is not None:
            return "sdxl"
        if self.unet.adm_in_channels is not None:
            return "sdxl-refiner"
        return "sd2" if self.text_encoder.activation == "gelu" else "sd1"

    @property
    def max_clip_skip(self) -> int:
        """The largest clip skip: the text encoder's layers, one fewer for SDXL (which reads the penultimate
        layer already)."""
        if self.unet.adm_in_channels is None:
            return self.text_encoder.layers
        return min(t.layers for t in (self.text_encoder, self.text_encoder_2) if t is not None) - 1

    @property
    def refiner(self) -> bool:
        """SDXL's refiner: it continues another model's image (img2img, or the end of an SDXL base's run)."""
        return self.version == "sdxl-refiner"

    @property
    def inpainting(self) -> bool:
        """True for the 9-channel UNet (latents + mask + masked-image latents)."""
        return self.unet.in_channels == 9

    @property
    def native_size(self) -> int:
        """Image side in pixels the model was trained at (512 for SD 1.x, 768 for SD 2.x 768-v, 1024 for SDXL)."""
        return self.unet.sample_size * self.vae.downscale

    def describe(self) -> str:
        """One line for people: version, prediction type, inpainting, native size."""
        kind = " inpainting" if self.inpainting else ""
        return f"{self.version}{kind}, {self.prediction_type}, {self.native_size}x{self.native_size}"

    def to_json(self) -> str:
        """The whole config as JSON (stored in the metadata of the single files latentforge writes)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Inverse of to_json; a malformed config is a ValueError that says which part and field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed latentforge config: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"malformed latentforge config: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"malformed latentforge config: unknown part {unknown[0]!r}")
        try:
            parts = {
                name: _dataclass_from_dict(name, kind, d.get(name))
                for name, kind in (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", TextEncoderConfig))
            }
            if d.get("text_encoder_2") is not None:
                parts["text_encoder_2"] = _dataclass_from_dict("text_encoder_2", TextEncoderConfig, d["text_encoder_2"])
            rest = {k: d[k] for k in ("prediction_type", "pad_token", "pad_token_2", "scheduler") if k in d}
            if "defaults" in d:
                rest["defaults"] = SamplingDefaults.from_dict(d["defaults"])
            return cls(**parts, **rest)
        except ValueError as e:
            raise ValueError(f"malformed latentforge config: {e}") from None


def _dataclass_from_dict(name: str, kind: type, d: object):
    """Build the frozen config dataclass of part `name` from its JSON object (lists become tuples); fields
    left out take their defaults (files written before a field existed), unknown ones are a ValueError."""
    if d is None:
        raise ValueError(f"the {name} part is missing")
    if not isinstance(d, dict):
        raise ValueError(f"{name} must be an object of {kind.__name__} fields, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise ValueError(f"{name} has no field {unknown[0]!r}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
