"""A loaded Stable Diffusion model: tokenizer, text encoder, UNet and VAE, on one device and dtype."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import checkpoints
from .adapters.addons import AddOns
from .adapters.embeddings import Embedding
from .adapters.library import Library, split_tags
from .adapters.lora import Use
from .adapters.vae_file import VAEState, apply_vae, restore_vae
from .checkpoints import Parts
from .conditioning import ClipConditioner, Cond, Conditioner, RefinerConditioner, SDXLConditioner
from .config import ModelConfig
from .convolution import circular_padding
from .errors import GenerationError
from .guidance import Denoiser, PromptConds, make_denoiser
from .hires import LATENT_MODES, Hires, upscale_image, upscale_latents
from .images import image_to_tensor, tensor_to_images
from .inference import set_inference
from .infotext import GenerationInfo, format_infotext
from .modelhash import cached_hash, cached_model_hash
from .prompt_schedule import PromptPlan, plan_prompts
from .request import check_request
from .samplers import eta_options, get_sampler, img2img_sigmas
from .schedules import NoiseSchedule
from .seeds import initial_noise, make_generator, sampler_generator
from .speed import Shortcuts
from .text_encoder import TextEncoder
from .tiny_decoder import TinyDecoder, read_tiny_decoder
from .tome import set_token_merging
from .tokenizer import Tokenizer
from .unet import SDXL_SIZE_EMBED_DIM, UNet
from .vae import AutoencoderKL, sample_latents
from .upscalers import Upscalers
from .weightfiles import CheckpointError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip

CPUINFO = "/proc/cpuinfo"  # read by native_bfloat16
HIRES_TILED = 2  # hires passes larger than this times the native size (a side) are decoded in tiles

# trained by this project on the shapes world (docs/default-model.md has the recipe and the command)
DEFAULT_MODEL = Path(__file__).parent / "data" / "latentforge-shapes.safetensors"
# the tiny decoder distilled from the shipped model's VAE (docs/default-model.md), loaded with it
DEFAULT_TINY_DECODER = Path(__file__).parent / "data" / "tiny_decoder" / "latentforge-shapes.safetensors"


@dataclass
class Step:
    """What a per-step callback receives: where the run is, and the latents so far (VP form, unscaled)."""

    image_index: int  # which image of the batch
    step: int  # 0-based sampler step
    steps: int  # sampler steps this image runs
    sigma: float
    latents: torch.Tensor  # (1, 4, h, w) the current noisy latents
    denoised: torch.Tensor  # (1, 4, h, w) the predicted clean latents: decode them to watch the image emerge
    pass_no: int = 0  # which pass over the image: 1 is the hires fix's second pass
    passes: int = 1  # passes each image gets: 2 with the hires fix


def in_pass(callback: Callable[[Step], None] | None, pass_no: int, passes: int) -> Callable[[Step], None] | None:
    """`callback` told which pass over the image its steps belong to."""
    if callback is None or passes == 1:
        return callback
    return lambda step: callback(dataclasses.replace(step, pass_no=pass_no, passes=passes))


@dataclass
class Pipeline:
    conditioner: Conditioner  # the model family's prompts -> UNet conditioning (text encoders inside)
    unet: UNet
    vae: AutoencoderKL
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    name: str = ""
    source: Path | None = None  # the checkpoint file or folder, for the infotext's model hash
    # decode latents larger than the model's native size in overlapping native-size tiles (bounded memory
    # for large images; seams blended, the image differs slightly from a whole decode), like diffusers'
    # enable_vae_tiling(); images at the native size or smaller are decoded whole either way
    vae_tiling: bool = False
    # free the text encoders' weights once a prompt is encoded, and read them again from `source` for the next
    # one: the UNet and VAE then run without them in memory (SDXL's two towers: 1.6 GB in bfloat16)
    text_encoders_on_demand: bool = False
    # the add-on folders (`library`), the LoRAs merged into the weights now, the add-on files read
    addons: AddOns = field(default_factory=AddOns)
    # the hires fix's upscalers: the built-ins and the model files of upscalers.folder, by name
    upscalers: Upscalers = field(default_factory=Upscalers)
    vae_file: Path | None = None  # a VAE file used instead of the model's own (see load_vae)
    # a tiny autoencoder decoder (TAESD) of this model's latent space: step previews, and the final decode when
    # a request's speed.tiny_decoder asks (see load_tiny_decoder)
    tiny_decoder: TinyDecoder | None = None
    _own_vae: VAEState | None = field(default=None, repr=False)

    def encode_prompt(
        self, prompt: str | Sequence[str], negative: str | Sequence[str] | None = None, clip_skip: int = 1,
        size: tuple[int, int] | None = None,
    ) -> tuple[Cond, Cond | None]:
        """The prompt's conditioning, and the negative prompt's (None when `negative` is None), in the
        model's dtype; `size` (height, width) defaults to the native size (families that condition on it).
        Several prompts (a sequence) are encoded in one text-encoder batch: a Cond with a row each."""
        return self._encode_texts(prompt, negative, clip_skip, size)

    def encode_plan(
        self, plan: PromptPlan, guided: bool, clip_skip: int = 1, size: tuple[int, int] | None = None
    ) -> PromptConds:
        """The conditioning of each distinct text of a prompt plan (`prompt_schedule`), each encoded once, all in
        one text-encoder batch; the negative texts only when `guided`. A plan that never changes is encoded
        as `encode_prompt` encodes its one prompt."""
        if plan.fixed:
            cond, uncond = self.encode_prompt(plan.texts[0], plan.negatives[0] if guided else None, clip_skip, size)
        else:
            cond, uncond = self._encode_texts(plan.texts, plan.negatives if guided else None, clip_skip, size)
        return PromptConds(plan, cond, uncond)

    def _encode_texts(self, prompts, negatives, clip_skip: int, size: tuple[int, int] | None) -> tuple[Cond, Cond | None]:
        """One prompt and negative prompt (str) through the conditioner, or several of each (sequences) through
        `Conditioner.encode`; in the model's dtype, the text encoders read again first if they were freed."""
        native = self.config.native_size
        if self.text_encoders_on_demand:
            self._load_text_encoders()
        encode = self.conditioner if isinstance(prompts, str) else self.conditioner.encode
        cond, uncond = encode(prompts, negatives, clip_skip=clip_skip, size=size or (native, native))
        if self.text_encoders_on_demand:
            for encoder in self.conditioner.models().values():
                encoder.to("meta")  # the weights' memory goes; the module keeps its shapes
        return cond.to(self.dtype), (None if uncond is None else uncond.to(self.dtype))

    def _load_text_encoders(self) -> None:
        """Read the text encoders' weights again from the model's file or folder, if they were freed."""
        released = [name for name, m in self.conditioner.models().items() if next(m.parameters()).is_meta]
        if not released:
            return
        if self.source is None:
            raise ValueError("text_encoders_on_demand needs a model loaded from a file or folder (pipe.source)")
        config, parts = checkpoints.read_checkpoint(self.source, self.config.prediction_type)
        for name in released:  # the conditioner holds each text encoder under its part's name
            text_config = getattr(config, name)
            setattr(self.conditioner, name, build(TextEncoder, text_config, parts.pop(name), self.device, self.dtype))
        self.addons.merger.remerge(self.models(), released)  # the fresh weights get the merged networks again

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> list[Image.Image]:
        """Latents (B, 4, h, w) as the sampler leaves them -> PIL images (8h x 8w); `tiled` decodes latents
        larger than the native size in tiles even when vae_tiling is off."""
        (x,) = self._run_vae(lambda z: (self._decode(z, tiled),), latents / self.config.vae.scaling_factor)
        self._check_finite(x, "the decoded image")
        return tensor_to_images(x.float().cpu())

    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, 4, h, w) -> quick PIL images for watching a run: the tiny decoder's when one is loaded,
        else the VAE's (`decode`)."""
        if self.tiny_decoder is None:
            return self.decode(latents)
        x = self.tiny_decoder(latents.to(self.device, next(self.tiny_decoder.parameters()).dtype))
        self._check_finite(x, "the tiny decoder's image")
        return tensor_to_images(x.float().cpu())

    def load_tiny_decoder(self, path: str | os.PathLike | None) -> None:
        """Use this tiny decoder file (TAESD's taesd_decoder / taesdxl_decoder, or a diffusers AutoencoderTiny)
        for previews and fast final decodes; None drops it. Its latent channels must be this model's."""
        if path is None:
            self.tiny_decoder = None
            return
        decoder = read_tiny_decoder(path, self.device, self.dtype)
        if decoder.config.latent_channels != self.config.vae.latent_channels:
            raise ValueError(
                f"{path}: this tiny decoder reads {decoder.config.latent_channels}-channel latents, the model makes "
                f"{self.config.vae.latent_channels}; use the tiny decoder of this model's family"
            )
        self.tiny_decoder = set_inference(decoder)

    def _decode(self, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """VAE decode, tiled when vae_tiling is on: tiles of the native latent size, a quarter overlapping."""
        tile = self.config.unet.sample_size
        if (self.vae_tiling or tiled) and max(z.shape[-2:]) > tile:
            return self.vae.decode_tiled(z, tile, tile // 4)
        return self.vae.decode(z)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Image (1, 3, H, W) in [-1, 1] -> scaled latents (1, 4, H/8, W/8), sampled from the posterior."""
        mean, logvar = self._run_vae(self.vae.encode, image)
        return sample_latents(mean.float(), logvar.float(), generator) * self.config.vae.scaling_factor

    def _run_vae(
        self, call: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """`call(x)` in the VAE's dtype. SD's VAE overflows float16 on some latents (inf/NaN: a black image);
        then the VAE moves to float32 for good, with a warning, and the call is made again (as AUTOMATIC1111
        does; diffusers' `force_upcast`)."""
        dtype = self.vae.quant_conv.weight.dtype
        out = call(x.to(self.device, dtype))
        if dtype == torch.float16 and not all(bool(torch.isfinite(o).all()) for o in out):
            warnings.warn(
                "the VAE overflowed in float16 (inf/NaN in its output); it now runs in float32 for this model",
                RuntimeWarning,
                stacklevel=3,
            )
            self.vae.float()
            out = call(x.to(self.device, torch.float32))
        return out

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int | None = None,
        sampler: str | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        init_image: Image.Image | None = None,
        strength: float = 0.75,
        mask: Image.Image | None = None,
        callback: Callable[[Step], None] | None = None,
        clip_skip: int = 1,
        refiner: Pipeline | None = None,
        refiner_switch_at: float = 0.8,
        loras: Mapping[str | os.PathLike, float | tuple[float, float]] | None = None,
        hires: Hires | None = None,
        speed: Shortcuts | None = None,
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        tiling: bool = False,
        eta_noise_seed_delta: int = 0,
        resize_mode: str | int = "Just resize",
        masked_content: str | int = "original",
        inpaint_area: str | bool = "whole picture",
        inpaint_padding: int = 32,
        overlay: bool = False,
        mask_blur: int = 0,
        noise_multiplier: float = 1.0,
        eta: float | None = None,
        rng: str = "CPU",
    ) -> list[Image.Image]:
        """txt2img, img2img (init_image) or inpainting (init_image + mask: white is repainted).

        steps, sampler and cfg_scale left as None are the model's defaults (config.defaults); width and
        height left as None are the init image's size, else the model's native size. A `refiner` (SDXL's)
        takes over the steps whose timestep is below (1 - refiner_switch_at) of the training schedule, as
        A1111's "Refiner switch at" and diffusers' denoising_end / denoising_start split them.

        `loras` ({name in library.loras or file path: weight, or (text-encoder weight, UNet weight)}) and the
        prompts' `<lora:NAME:W>` tags are merged into the weights for this call and the next ones until
        another set is asked for (see `use_loras`); the tags are not encoded as text.

        `hires` (txt2img only) adds A1111's hires fix: each image upscaled (its latents, or the decoded image)
        and refined by an img2img pass at the larger size with the same seed (see hires.py).

        `speed` (speed.Shortcuts, or a preset: speed.preset("fast")) skips work for a shorter run: unconditional
        passes, deep UNet features reused, tokens merged, the tiny decoder. None: nothing skipped.

        Image i of the batch starts from a CPU generator seeded with seed + i, so any image of a batch
        can be made again alone. A1111's seed options (seeds.py): `subseed_strength` above 0 moves each image's
        starting noise toward the noise of `subseed` + i (None: a random variation seed); `seed_resize_from`
        (width, height) starts from the noise the seed makes at that size, centred. `tiling` (A1111's) pads
        every convolution circularly, so that the image tiles seamlessly. `eta_noise_seed_delta` (A1111's ENSD)
        seeds a stochastic sampler's later noise with seed + delta. `resize_mode` is how an init image of another
        size is brought to width x height: A1111's "Just resize", "Crop and resize", "Resize and fill" or "Just
        resize (latent upscale)" (or its numbers 0-3). Inpainting takes A1111's `masked_content` ("fill",
        "original", "latent noise", "latent nothing", or 0-3) and `inpaint_area` "only masked" (the mask's box
        grown by `inpaint_padding` pixels, painted at width x height, default the native size, and pasted back
        through the mask), see inpaint.py; `overlay` puts the init image's unmasked pixels back over a whole-picture
        inpainting, as A1111 does (diffusers does not); `mask_blur` blurs the mask first (A1111's "Mask blur");
        `noise_multiplier` scales the noise an img2img adds to its image (A1111's "Noise multiplier for img2img");
        `eta` the fresh noise's share in Euler a (default 1) and DDIM (default 0), as A1111's Eta. `rng` is A1111's
        random source: "CPU" (torch's CPU generator, the default), "NV" or "GPU" (CUDA's draws, philox.py).

        Returns PIL images whose info["parameters"] is the infotext."""
        request = check_request(
            self, prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
            seed=seed, width=width, height=height, batch_size=batch_size, init_image=init_image, strength=strength,
            mask=mask, clip_skip=clip_skip, refiner=refiner, refiner_switch_at=refiner_switch_at, loras=loras,
            hires=hires, speed=speed, subseed=subseed, subseed_strength=subseed_strength,
            seed_resize_from=seed_resize_from, tiling=tiling, eta_noise_seed_delta=eta_noise_seed_delta,
            resize_mode=resize_mode, masked_content=masked_content, inpaint_area=inpaint_area,
            inpaint_padding=inpaint_padding, overlay=overlay, mask_blur=mask_blur, noise_multiplier=noise_multiplier,
            eta=eta, rng=rng,
        )  # fmt: skip
        pipes = [self, request.refiner]
        convolutions = [m for p in pipes if p is not None for m in (p.unet, p.vae, p.tiny_decoder)]
        with merged_tokens(pipes, request.speed.token_merging), circular_padding(convolutions, request.tiling):
            images = self._generate(request, callback)
        return images if request.paste_back is None else [request.paste_back.paste(image) for image in images]

    def _generate(self, request, callback: Callable[[Step], None] | None) -> list[Image.Image]:
        """generate() for a checked request."""
        spec = get_sampler(request.sampler)
        schedule = NoiseSchedule.from_config(self.config.scheduler or {})
        sigmas = (
            spec.sigmas(schedule, request.steps)
            if request.init_image is None
            else img2img_sigmas(spec, schedule, request.steps, request.strength)
        )
        prompt, negative, tagged = self.addons.without_tags(request.prompt, request.negative_prompt)
        uses = self.use_loras({**request.loras, **tagged})
        words = self._use_embeddings(prompt, negative)
        if request.refiner is not None:
            request.refiner._use_embeddings(prompt, negative)
        # A1111's prompt editing, alternation and AND: the texts each step is guided by (prompt_schedule)
        plan = plan_prompts(prompt, negative, request.steps)
        # the negative prompt is only read by the unconditional pass, which scale 1 skips (unless AND composes)
        guided = request.cfg_scale != 1 or plan.composed
        size = (request.height, request.width)
        conds = self.encode_plan(plan, guided, request.clip_skip, size)
        # with the hires fix, the refiner refines the hires pass
        refine = self._refiner_part(request, spec, schedule, sigmas, plan, guided) if request.hires is None else None
        second = None if request.hires is None else self._second_pass(request, schedule, prompt, negative)
        passes = 1 if second is None else 2
        first_pass, hires_pass = in_pass(callback, 0, passes), in_pass(callback, 1, passes)
        images = []
        for i in range(request.batch_size):
            latents = self._sample(request, spec, schedule, sigmas, conds, request.seed + i, i, first_pass, refine)
            self._check_finite(latents, f"the latents of image {i + 1}")
            if second is not None:
                latents = self._refine_larger(second, latents, schedule, request.seed + i, i, hires_pass)
                self._check_finite(latents, f"the hires pass's latents of image {i + 1}")
            # the model that ran last decodes, as in diffusers' refiner pipeline and A1111's switch
            # a hires pass beyond twice the native size is decoded in tiles (its whole decode's memory grows
            # with the pixels: 2048 x 2048 in SD 1.5 would need some 16 GB)
            # (not with tiling, whose wrap-around would then be each tile's own)
            tiled = (
                second is not None and not request.tiling
                and max(latents.shape[-2:]) > HIRES_TILED * self.config.unet.sample_size
            )  # fmt: skip
            last = request.refiner or self
            image = last.preview(latents)[0] if request.speed.tiny_decoder else last.decode(latents, tiled)[0]
            image.info["parameters"] = format_infotext(self._info(request, spec, i, uses, words))
            images.append(image)
        return images

    def _second_pass(self, request, schedule: NoiseSchedule, prompt: str, negative: str):
        """The hires fix's img2img request (the larger size, its own steps, sampler, guidance and prompts), its
        sampler, sigmas, conditioning, upscaler and the refiner's part of it: made once for every image of the
        batch. A refiner takes over the hires pass's steps past its switch (A1111's default "Hires fix: which
        pass to enable refiner for: second pass")."""
        hires = request.hires
        width, height = hires.size(request.width, request.height, self.config.vae.downscale)
        larger = dataclasses.replace(
            request, width=width, height=height, steps=hires.steps or request.steps,
            sampler=hires.sampler or request.sampler, cfg_scale=request.cfg_scale if hires.cfg_scale is None else hires.cfg_scale,
            strength=hires.denoising_strength, hires=None,
        )  # fmt: skip
        spec = get_sampler(larger.sampler)
        sigmas = img2img_sigmas(spec, schedule, larger.steps, larger.strength)
        hr_prompt = prompt if hires.prompt is None else split_tags(hires.prompt)[0]
        hr_negative = negative if hires.negative_prompt is None else split_tags(hires.negative_prompt)[0]
        # A1111's hires schedule: a step `when` counts on from the first pass's steps, a fraction from 1.0
        plan = plan_prompts(hr_prompt, hr_negative, request.steps, larger.steps)
        guided = larger.cfg_scale != 1 or plan.composed
        conds = self.encode_plan(plan, guided, larger.clip_skip, (height, width))
        refine = self._refiner_part(larger, spec, schedule, sigmas, plan, guided)
        return larger, spec, sigmas, conds, hires.upscaler, refine

    def _refiner_part(
        self, request, spec, schedule: NoiseSchedule, sigmas: torch.Tensor, plan: PromptPlan, guided: bool
    ) -> tuple[int, PromptConds] | None:
        """The refiner's share of a sampler run over `sigmas`: (the step it takes over at, its conditioning of
        the prompt plan at the request's size), or None without a refiner."""
        if request.refiner is None:
            return None
        split = refiner_split(spec, schedule, sigmas, request.refiner_switch_at)
        size = (request.height, request.width)
        return split, request.refiner.encode_plan(plan, guided, request.clip_skip, size)

    def _refine_larger(self, second, latents: torch.Tensor, schedule, seed: int, index: int, callback) -> torch.Tensor:
        """The hires fix for one image: its latents upscaled (latent modes), or decoded, upscaled and encoded
        again, then the img2img pass from them with the image's seed -> the larger image's latents."""
        larger, spec, sigmas, conds, upscaler, refine = second
        if upscaler in LATENT_MODES:
            size = (larger.height // self.config.vae.downscale, larger.width // self.config.vae.downscale)
            init = upscale_latents(latents, upscaler, size)
            return self._sample(larger, spec, schedule, sigmas, conds, seed, index, callback, refine, init)
        image = upscale_image(self.decode(latents)[0], upscaler, (larger.width, larger.height), self.upscalers)
        larger = dataclasses.replace(larger, init_image=image, image_tensor=image_to_tensor(image))
        return self._sample(larger, spec, schedule, sigmas, conds, seed, index, callback, refine)

    def _sample(
        self, request, spec, schedule, sigmas, conds, seed, index, callback, refine=None, init_latents=None
    ) -> torch.Tensor:
        """One image: initial latents from its own seed, the sampler over the guided UNet -> VP latents;
        with `refine` = (split, the refiner's PromptConds), the refiner's guided UNet runs the steps from `split`
        on. `conds` (PromptConds, or (cond, uncond) for every step) may change per step: step i is sigmas[i]'s.
        `init_latents` (scaled latents of the image's size) start an img2img from latents, not an image."""
        g = make_generator(seed, request.seeds.rng)
        h, w = request.height // self.config.vae.downscale, request.width // self.config.vae.downscale
        # the inpainting UNet at full strength starts from pure noise, like txt2img
        from_noise = init_latents is None and (
            request.init_image is None or (self.config.inpainting and request.strength == 1.0)
        )
        extra = blend = None
        if not from_noise and init_latents is None:
            # drawn first, as diffusers does: the posterior sample of the image, then the noise
            init_latents = self.encode_image(request.image_tensor, g)
            if init_latents.shape[-2:] != (h, w):  # A1111's "Just resize (latent upscale)": encoded at its own size
                init_latents = F.interpolate(init_latents, size=(h, w), mode="bilinear")
        shape = (1, self.config.unet.out_channels, h, w)
        noise = initial_noise(shape, seed, g, request.seeds, index, self.config.vae.downscale).to(self.device)
        masked = None if request.mask_tensor is None else F.interpolate(request.mask_tensor, size=(h, w)).to(self.device)
        if init_latents is not None and request.masked_content in ("latent noise", "latent nothing"):  # A1111's
            start = noise if request.masked_content == "latent noise" else torch.zeros_like(noise)
            init_latents = blend_latents(start, masked, init_latents)
        if self.config.inpainting:
            extra = self._inpaint_extra(request, h, w, g)
        elif masked is not None:
            # an ordinary model: keep the image's latents outside the mask (AUTOMATIC1111's way)
            blend = (masked, init_latents)
        if from_noise:
            x = noise * spec.init_noise_sigma(schedule, sigmas)  # pure noise at the schedule's top
        else:
            x = init_latents + noise * sigmas[0] * request.noise_multiplier  # the image, noised to the schedule's start
        g = sampler_generator(seed, g, request.seeds)  # what a stochastic sampler draws from now on
        if not isinstance(conds, PromptConds):
            conds = PromptConds(plan_prompts("", "", 1), *conds)  # one fixed conditioning
        guidance = conds.guidance(request.cfg_scale, extra)
        timestep = functools.partial(spec.timestep, schedule)
        denoise = make_denoiser(self.unet, timestep, self.config.prediction_type, guidance, sigmas, request.speed)
        if blend is not None:
            denoise = keep_unmasked(denoise, *blend)

        def on_step(first: int) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]:
            def report(i: int, x_i: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> None:
                if callback is not None:
                    scale = float(torch.sqrt(1.0 + torch.as_tensor(sigma) ** 2))
                    callback(Step(index, first + i, len(sigmas) - 1, float(sigma), x_i / scale, x0))

            return report

        first = 0
        for model, model_denoise, part in self._runs(request, sigmas, denoise, timestep, refine, blend):
            x = spec(
                model_denoise, x.to(model.device), part, schedule=schedule,
                prediction_type=model.config.prediction_type, generator=g, callback=on_step(first),
                **eta_options(spec, request.eta),
            )  # fmt: skip
            first += len(part) - 1
        latents = x.to(self.device) / torch.sqrt(1.0 + sigmas[-1] ** 2)
        return latents if blend is None else blend_latents(latents, *blend)

    def _runs(
        self, request, sigmas: torch.Tensor, denoise: Denoiser, timestep, refine, blend=None
    ) -> list[tuple[Pipeline, Denoiser, torch.Tensor]]:
        """(model, denoiser, sigmas) of each sampler run: the whole schedule, or this model's steps up to the
        refiner's split and the refiner's from there (a fresh run, as diffusers' refiner pipeline starts
        one); a part with no step is left out. With a mask (`blend`, inpainting with an ordinary model) the
        refiner keeps the unmasked latents too."""
        if refine is None:
            return [(self, denoise, sigmas)]
        split, conds = refine
        refiner = request.refiner
        guided = conds.guidance(request.cfg_scale)
        refined = make_denoiser(refiner.unet, timestep, refiner.config.prediction_type, guided, sigmas, request.speed)
        if blend is not None:
            refined = keep_unmasked(refined, *blend)
        runs = [(self, denoise, sigmas[: split + 1]), (refiner, refined, sigmas[split:])]
        return [run for run in runs if len(run[2]) > 1]

    def _inpaint_extra(self, request, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """The inpainting UNet's extra input: the mask at latent size and the masked image's latents.
        Without an image or a mask it is asked to paint everything (mask of ones, blank image)."""
        image = request.image_tensor
        if image is None:
            image = torch.zeros(1, 3, request.height, request.width)
        full = request.mask_tensor if request.mask_tensor is not None else torch.ones_like(image[:, :1])
        masked = image * (full < 0.5)
        return torch.cat([F.interpolate(full, size=(h, w)).to(self.device), self.encode_image(masked, g)], dim=1)

    def load_vae(self, path: str | os.PathLike | None) -> None:
        """Decode and encode with this VAE file or diffusers VAE folder instead of the model's own (the model's
        latent scale stays); None goes back to the model's own. A file that does not fit changes nothing."""
        if path is None:
            if self._own_vae is not None:
                restore_vae(self, self._own_vae)
            self._own_vae, self.vae_file = None, None
            return
        replaced = apply_vae(self, path)
        self._own_vae = self._own_vae or replaced  # the model's own, kept for going back
        self.vae_file = Path(path)

    @property
    def library(self) -> Library:
        """The add-on folders: `<lora:NAME:W>` in a prompt and `loras={"NAME": W}` are looked up in library.loras,
        embeddings in library.embeddings."""
        return self.addons.library

    @library.setter
    def library(self, library: Library) -> None:
        self.addons.library = library

    def embeddings(self) -> tuple[dict[str, Embedding], dict[str, str]]:
        """The embeddings in library.embeddings this model can use, by name, and those it cannot, with why
        (another family's, damaged); files are read once while unchanged."""
        return self.addons.embeddings(self.conditioner)

    def _use_embeddings(self, prompt: str, negative: str) -> list[Embedding]:
        """Give the conditioner the usable embeddings; those the prompts use (AddOns.use_embeddings)."""
        return self.addons.use_embeddings(self.conditioner, prompt, negative)

    def use_loras(self, loras: Mapping[str | os.PathLike, float | tuple[float, float]]) -> list[Use]:
        """Merge exactly these networks into the weights: {a file path, or a name in library.loras: weight or
        (text-encoder weight, UNet weight)}. The weights they change are kept, so `use_loras({})` (or another
        set) first puts back the model's own values, bit for bit. Asking for what is merged now costs nothing."""
        return self.addons.use_loras(self.models(), self.config.unet, loras)

    def models(self) -> dict[str, nn.Module]:
        """Every network of the model by part name: the family's text encoder(s), "unet", "vae"."""
        return {**self.conditioner.models(), "unet": self.unet, "vae": self.vae}

    def _check_finite(self, x: torch.Tensor, what: str) -> None:
        """A NaN/inf result is an error saying why, never a black image."""
        if not bool(torch.isfinite(x).all()):
            raise GenerationError(f"{what} became NaN/inf: {self._nonfinite_cause()}")

    def _nonfinite_cause(self) -> str:
        """Why a result went NaN/inf: damaged weights, the dtype's range, or the settings."""
        for part, module in self.models().items():
            for key, value in module.state_dict().items():
                if value.is_floating_point() and not value.is_meta and not bool(torch.isfinite(value).all()):
                    return (
                        f"the model's {part} weights hold NaN/inf (first in {key!r}); the checkpoint is damaged: "
                        "re-download or re-export it"
                    )
        if self.dtype != torch.float32:
            name = str(self.dtype).removeprefix("torch.")
            return f"its weights are finite, so the model overflowed in {name}: run it in float32 (--dtype float32)"
        return "its weights are finite and it ran in float32, so the settings drove it out of range: lower cfg_scale"

    def _info(self, request, spec, index: int, uses: list[Use], words: list[Embedding]) -> GenerationInfo:
        """Image `index`'s infotext fields."""
        refiner = request.refiner
        extra = {}
        if words:  # A1111: TI hashes: "name: 12 digits of the file's sha256, ..."
            extra["TI hashes"] = ", ".join(f"{e.name}: {cached_hash(e.path, 'sha256')[:12]}" for e in words)
        if request.hires is not None:
            extra |= request.hires.infotext(request.steps, spec.a1111_name, request.cfg_scale, request.prompt, request.negative_prompt)
        if request.masked_content != "original":
            extra["Masked content"] = request.masked_content
        if request.noise_multiplier != 1:
            extra["Noise multiplier"] = request.noise_multiplier
        eta = eta_options(spec, request.eta).get("eta")
        if eta is not None and eta != spec.eta:  # A1111 writes a non-default eta: "Eta", or "Eta DDIM"
            extra[spec.eta_key] = eta
        if request.paste_back is not None and request.paste_back.box is not None:
            extra |= {"Inpaint area": "Only masked", "Masked area padding": request.inpaint_padding}
        extra |= request.speed.infotext()
        if uses:  # A1111: Lora hashes: "name: 12 digits of its addnet hash, ..."
            extra["Lora hashes"] = ", ".join(f"{u.placed.file.name}: {cached_hash(u.placed.file.path, 'addnet')[:12]}" for u in uses)
        return GenerationInfo(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            sampler=spec.infotext_name,
            schedule_type=spec.schedule,
            cfg_scale=request.cfg_scale,
            seed=request.seed + index,
            **request.seeds.info_fields(index, spec.stochastic or bool(eta)),
            width=request.width,
            height=request.height,
            model_hash=self.model_hash,
            model_name=self.name,
            vae_name=None if self.vae_file is None else self.vae_file.name,
            vae_hash=None if self.vae_file is None else cached_model_hash(self.vae_file),
            denoising_strength=(
                request.hires.denoising_strength if request.hires else request.strength if request.init_image else None
            ),
            clip_skip=request.clip_skip,
            refiner_name=None if refiner is None else refiner.name,
            refiner_hash=None if refiner is None else refiner.model_hash,
            refiner_switch_at=None if refiner is None else request.refiner_switch_at,
            tiling=request.tiling or None,
            mask_blur=request.mask_blur if request.mask_tensor is not None else None,
            extra=extra,
        )

    @functools.cached_property
    def model_hash(self) -> str:
        """A1111's short model hash of the checkpoint, '' when the model was not loaded from a path."""
        return cached_model_hash(self.source) if self.source is not None else ""


@contextlib.contextmanager
def merged_tokens(pipes: list[Pipeline | None], ratio: float):
    """Token merging (tome.py) at `ratio` in these models' UNets for the duration; off again after."""
    unets = [pipe.unet for pipe in pipes if pipe is not None] if ratio else []
    for unet in unets:
        set_token_merging(unet, ratio)
    try:
        yield
    finally:
        for unet in unets:
            set_token_merging(unet, 0.0)


def refiner_split(spec, schedule: NoiseSchedule, sigmas: torch.Tensor, switch_at: float) -> int:
    """How many steps the model runs before its refiner takes over: those whose timestep is at least
    round(T (1 - switch_at)) of the T training steps (diffusers' denoising_end / denoising_start cut-off;
    A1111's refiner switch compares (T - 1 - t) / T with switch_at, the same steps)."""
    cutoff = round(schedule.num_train_timesteps * (1 - switch_at))
    return sum(1 for sigma in sigmas[:-1] if float(spec.timestep(schedule, sigma)) >= cutoff)


def blend_latents(latents: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`latents` where the mask is 1, `kept` where it is 0 (mask (1, 1, h, w), latents (1, 4, h, w))."""
    return kept + mask * (latents - kept)


def keep_unmasked(denoise: Denoiser, mask: torch.Tensor, kept: torch.Tensor) -> Denoiser:
    """Inpainting with an ordinary model: where the mask is 0 the prediction is the original latents."""

    def blended(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return blend_latents(denoise(x, sigma), mask, kept)

    return blended


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is CUDA when there is a GPU, else the CPU; a device this machine lacks is a ValueError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    gpus = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and gpus == 0:
        raise ValueError(f"device {str(device)!r}: PyTorch sees no CUDA GPU on this machine; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise ValueError(f"device {str(device)!r}: this machine has {gpus} CUDA GPU(s), cuda:0 to cuda:{gpus - 1}")
    return device


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX, read from /proc/cpuinfo), where
    oneDNN's bfloat16 convolutions and matmuls run about twice as fast as float32. Elsewhere bfloat16 is
    emulated and slower than float32, and on systems without /proc/cpuinfo this answers False."""
    try:
        with open(CPUINFO, encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device = torch.device("cpu")) -> torch.dtype:
    """'auto' is float16 on CUDA, bfloat16 on a CPU with native bfloat16 (`native_bfloat16`), else float32;
    names like 'bf16' are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bfloat16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'")
    return DTYPES[dtype]


def build(cls: type[nn.Module], config, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    """Make a module on the meta device and adopt the tensors as its weights (emptying `tensors`):
    no random initialisation runs, and no second copy of the weights is made.

    Convolution weights are stored channels-last (NHWC): oneDNN (CPU) and cuDNN run NHWC convolutions
    without reordering, activations then stay NHWC through the network, and the (B, C, H, W) <-> (B, H*W, C)
    reshapes around attention become free views (docs/benchmarks.md, `speed`: up to 20% on the VAE)."""
    with torch.device("meta"):
        module = cls(config)
    weights = {}
    for key in list(tensors):  # pop as we go: a converted tensor never sits beside its source
        value = tensors.pop(key)
        layout = torch.channels_last if value.ndim == 4 else torch.preserve_format
        dtype_here = dtype if value.is_floating_point() else value.dtype
        weights[key] = value.to(device=device, dtype=dtype_here, memory_format=layout)
    module.load_state_dict(weights, strict=True, assign=True)
    return set_inference(module.eval().requires_grad_(False))


def from_parts(
    config: ModelConfig,
    parts: Parts,
    tokenizer: Tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    name: str = "",
    tokenizer_2: Tokenizer | None = None,
) -> Pipeline:
    """Assemble a Pipeline from checked, our-named weights; `tokenizer_2` is SDXL's second (default: the
    shipped vocabulary with the model's padding)."""
    return Pipeline(
        conditioner=build_conditioner(config, parts, tokenizer, tokenizer_2, device, dtype),
        unet=build(UNet, config.unet, parts.pop("unet"), device, dtype),
        vae=build(AutoencoderKL, config.vae, parts.pop("vae"), device, dtype),
        config=config,
        device=device,
        dtype=dtype,
        name=name,
    )


def build_conditioner(
    config: ModelConfig,
    parts: Parts,
    tokenizer: Tokenizer,
    tokenizer_2: Tokenizer | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Conditioner:
    """The model family's prompt encoder, its text encoders built from `parts` (taken out of it)."""
    text_encoder = build(TextEncoder, config.text_encoder, parts.pop("text_encoder"), device, dtype)
    size_embed_dim = config.unet.size_embed_dim or SDXL_SIZE_EMBED_DIM
    if config.refiner:
        return RefinerConditioner(tokenizer, text_encoder, size_embed_dim)
    if config.text_encoder_2 is None:
        return ClipConditioner(tokenizer, text_encoder)
    text_encoder_2 = build(TextEncoder, config.text_encoder_2, parts.pop("text_encoder_2"), device, dtype)
    tokenizer_2 = tokenizer_2 or shipped_tokenizer(config, second=True)
    return SDXLConditioner(tokenizer, text_encoder, tokenizer_2, text_encoder_2, size_embed_dim)


def default_model_path() -> Path:
    """The shipped model's file; a clear error when this copy of the package lacks it."""
    if not DEFAULT_MODEL.is_file():
        raise ValueError(
            f"the default model {DEFAULT_MODEL} is missing from this installation; reinstall latentforge, "
            "or pass the path of a checkpoint file or diffusers folder"
        )
    return DEFAULT_MODEL


def load_tokenizer(path: str | os.PathLike, config: ModelConfig, second: bool = False) -> Tokenizer:
    """The model's own tokenizer/ folder (tokenizer_2/ for SDXL's second) when it has one, else the shipped
    CLIP vocabulary. A tokenizer whose windows are longer than its text encoder's positions is a
    CheckpointError naming its file."""
    folder = Path(path) / checkpoints.tokenizer_folder(config.refiner, second)
    text = config.text_encoder_2 if second else config.text_encoder
    if not folder.is_dir():
        return shipped_tokenizer(config, second)
    tokenizer = Tokenizer.from_pretrained(folder)
    if tokenizer.max_length > text.max_length:
        raise CheckpointError(
            folder / "tokenizer_config.json",
            f"model_max_length {tokenizer.max_length} is more than the text encoder's {text.max_length} positions",
            f"set it to {text.max_length}, as the model's source has it",
        )
    return tokenizer


def shipped_tokenizer(config: ModelConfig, second: bool = False) -> Tokenizer:
    """The shipped CLIP vocabulary with the model's padding and window, for its first (or SDXL's second)
    text encoder."""
    text = config.text_encoder_2 if second else config.text_encoder
    return Tokenizer(pad_token=config.pad_token_2 if second else config.pad_token, max_length=text.max_length)


def load(
    path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    prediction_type: str | None = None,
) -> Pipeline:
    """Load a Stable Diffusion 1.x / 2.x or SDXL model: a single .safetensors/.ckpt file or a diffusers folder;
    None loads the small model that ships in the package (DEFAULT_MODEL, 64 x 64, the shapes world).

    `prediction_type` ("epsilon" or "v_prediction") overrides what the checkpoint implies, for
    the files whose weights cannot tell."""
    if path is None:
        path = default_model_path()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config, parts = checkpoints.read_checkpoint(path, prediction_type)
    tokenizer = load_tokenizer(path, config)
    tokenizer_2 = load_tokenizer(path, config, second=True) if config.text_encoder_2 is not None else None
    pipe = from_parts(config, parts, tokenizer, device, dtype, name=Path(path).stem, tokenizer_2=tokenizer_2)
    pipe.source = Path(path)
    if Path(path) == DEFAULT_MODEL and DEFAULT_TINY_DECODER.is_file():
        pipe.load_tiny_decoder(DEFAULT_TINY_DECODER)
    return pipe
