"""The `latentforge` command: a thin front over the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__


def cmd_tokenize(args: argparse.Namespace) -> None:
    """Print the 77 token ids of a prompt (SD 1.x padding, or SD 2.x with --pad-zero)."""
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer(pad_token="!" if args.pad_zero else "<|endoftext|>")
    ids = tokenizer(args.prompt)[0].tolist()
    print(" ".join(str(i) for i in ids))


def cmd_inspect(args: argparse.Namespace) -> None:
    """Print what a checkpoint is: layout, version, prediction type, part sizes (or which add-on a file is)."""
    from .adapters.library import describe_addon
    from .checkpoints import read_checkpoint
    from .weightfiles import CheckpointError

    try:
        config, parts = read_checkpoint(args.path, args.prediction_type)
    except CheckpointError as error:
        addon = describe_addon(args.path)  # None for anything with a UNet: a checkpoint's own error stands
        if addon is None:
            raise
        print(f"{args.path}: {addon}")
        return
    layout = "diffusers folder" if Path(args.path).is_dir() else "single file"
    print(f"{args.path}: {layout}, {config.describe()}")
    for name, tensors in parts.items():
        count = sum(t.numel() for t in tensors.values())
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        print(f"  {name}: {count / 1e6:.1f}M parameters ({', '.join(dtypes)})")


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert between the single-file and diffusers layouts, and between float dtypes."""
    from .checkpoints import read_checkpoint, write_diffusers, write_single_file
    from .pipeline import DTYPES, load_tokenizer
    from .weightfiles import CheckpointError

    dst = Path(args.dst)
    if dst.exists():
        raise CheckpointError(dst, "already exists", "choose a new destination (nothing is overwritten)")
    layout = args.to or ("single" if dst.suffix == ".safetensors" else "diffusers")
    if layout == "single" and dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: a single-file checkpoint is written as .safetensors; name it {dst.name}.safetensors")
    _check_destination(dst, make_parents=layout == "diffusers")  # before reading: a bad DST fails at once
    dtype = DTYPES[args.dtype] if args.dtype else None
    config, parts = read_checkpoint(args.src, args.prediction_type)
    if layout == "single":
        write_single_file(config, parts, dst, dtype)
    else:
        second = load_tokenizer(args.src, config, second=True) if config.text_encoder_2 is not None else None
        write_diffusers(config, parts, dst, load_tokenizer(args.src, config), dtype, tokenizer_2=second)
    print(f"wrote {dst} ({'single file' if layout == 'single' else 'diffusers folder'}, {config.describe()})")


def _check_destination(dst: Path, make_parents: bool) -> None:
    """A new file or folder can be made at `dst`: its folder exists (or, with make_parents, the nearest
    existing one above it) as a folder this user may write in. Otherwise a FileError naming it."""
    from .errors import FileError

    folder = dst.parent
    if not make_parents and not folder.exists():
        raise FileError(dst, f"the folder {folder} does not exist", "create it first or choose another destination")
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise FileError(dst, f"{folder} is a file, not a folder", "choose another destination")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileError(dst, f"the folder {folder} is not writable", "choose another destination or fix its permissions")


def lora_argument(text: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT] -> (FILE, WEIGHT); the weight defaults to 1 (a colon in the path stays in it)."""
    path, sep, weight = text.rpartition(":")
    if not sep or "/" in weight or "\\" in weight:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise ValueError(f"--lora {text}: {weight!r} is not a weight; write FILE or FILE:0.8") from None


def seed_argument(text: str) -> int | None:
    """--seed N; -1 is A1111's "random", the same as leaving it out."""
    seed = int(text)
    return None if seed == -1 else seed


seed_argument.__name__ = "seed"  # argparse names the type in its message: "invalid seed value: 'x'"


def cmd_generate(args: argparse.Namespace) -> None:
    """txt2img / img2img / inpainting; writes PNGs with their infotext and prints their paths."""
    from tqdm import tqdm

    from . import grid, images, load, pngfiles
    from .adapters.library import Library
    from .styles import apply_styles, read_styles
    from .upscalers import Upscalers

    out = pngfiles.check_output_folder(args.out)  # before any work: a bad --out fails at once
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (the image whose masked part is repainted)")
    if args.preview_every < 0:
        raise ValueError(f"--preview-every must be a number of steps, or 0 for none; got {args.preview_every}")
    init = images.load_image(args.init_image) if args.init_image else None
    mask = images.load_mask(args.mask, init.size) if args.mask else None
    loras = dict(lora_argument(text) for text in args.lora)
    hires = hires_argument(args)
    axes = [grid.parse_axis(text) if text else None for text in (args.x, args.y, args.z)]
    if axes[0] is None and any(axes):
        raise ValueError("--y and --z need an --x axis")
    if axes[0] is not None and args.batch_size != 1:
        raise ValueError("--batch-size with --x: a plot makes one image per cell; vary the seed with --x seed=1-4")
    from_png, notes = png_arguments(args.from_png) if args.from_png else ({}, [])
    png_prompt, png_negative = from_png.pop("prompt", None), from_png.pop("negative_prompt", "")
    if args.prompt is None and png_prompt is None:
        raise ValueError("give a prompt (or --from-png FILE to make an image again from its parameters)")
    prompt = args.prompt if args.prompt is not None else png_prompt
    negative = args.negative_prompt if args.negative_prompt is not None else png_negative
    if args.style:
        prompt, negative = apply_styles(prompt, negative, read_styles(args.styles_file) if args.styles_file else {}, args.style)
    pipe = load(args.model, dtype=args.dtype, device=args.device)
    pipe.vae_tiling = args.vae_tiling
    pipe.text_encoders_on_demand = args.text_encoders_on_demand
    pipe.library = Library.from_dirs(args.lora_dir, args.embeddings_dir)
    pipe.upscalers = Upscalers.from_dirs(args.upscaler_dir, device=pipe.device)
    if args.vae:
        pipe.load_vae(args.vae)
    if args.tiny_decoder:
        pipe.load_tiny_decoder(args.tiny_decoder)
    speed = speed_argument(args)
    refiner = load(args.refiner, dtype=args.dtype, device=args.device) if args.refiner else None
    if refiner is not None:
        refiner.vae_tiling = args.vae_tiling  # the refiner's VAE decodes
        refiner.text_encoders_on_demand = args.text_encoders_on_demand
    previews: dict[int, list] = {}
    bars: dict[int, tqdm] = {}

    def on_step(step) -> None:
        bar = bars.get(step.image_index)
        if bar is None:
            desc = f"image {step.image_index + 1}" + (", hires pass" if step.pass_no else "")
            bar = bars[step.image_index] = tqdm(total=step.steps, desc=desc, unit="step")
        bar.update(1)
        every = args.preview_every
        if every and ((step.step + 1) % every == 0 or step.step + 1 == step.steps):
            label = f"{'hires step' if step.pass_no else 'step'} {step.step + 1}"
            previews.setdefault(step.image_index, []).append((label, pipe.preview(step.denoised)[0]))
        if step.step + 1 == step.steps:
            bar.close()
            del bars[step.image_index]  # a hires pass reports its steps under the same image again

    made_with = from_png.pop("model_hash", None)
    if made_with and pipe.model_hash and made_with != pipe.model_hash:
        notes.append(f"it was made with model hash {made_with}, not this model's {pipe.model_hash}")
    for note in notes:
        print(f"latentforge generate: note: {args.from_png}: {note}", file=sys.stderr)
    call = dict(
        prompt=prompt, negative_prompt=negative, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
        seed=args.seed, width=args.width, height=args.height, batch_size=args.batch_size, init_image=init,
        strength=args.strength, mask=mask, callback=on_step, clip_skip=args.clip_skip, refiner=refiner,
        refiner_switch_at=args.refiner_switch_at, loras=loras, hires=hires, speed=speed, subseed=args.subseed,
        subseed_strength=args.subseed_strength, tiling=args.tiling, eta_noise_seed_delta=args.eta_noise_seed_delta,
        resize_mode=name_or_number(args.resize_mode), masked_content=name_or_number(args.masked_content),
        inpaint_area=args.inpaint_area, inpaint_padding=args.inpaint_padding, mask_blur=args.mask_blur,
        overlay=args.overlay, noise_multiplier=args.noise_multiplier, eta=args.eta, rng=args.rng,
        seed_resize_from=size_argument("--seed-resize-from", args.seed_resize_from, "512x768")
        if args.seed_resize_from else None,
    )  # fmt: skip
    call = from_png | {key: value for key, value in call.items() if value is not None}  # given here wins
    if mask is not None:  # A1111's page: the mask blurred by 4 pixels, the unmasked pixels put back
        call = {"mask_blur": 4, "overlay": True} | call
    if axes[0] is not None:
        save_plot(pipe, call, axes, out)
        return
    results = pipe.generate(**call)
    for i, image in enumerate(results):
        path = pngfiles.save_png(image, out)
        print(path)
        if i in previews:
            labels, frames = zip(*previews[i])
            # the hires pass's frames are larger: every frame at the image's size, so that the strip reads evenly
            frames = [f if f.size == image.size else f.resize(image.size, images.Image.NEAREST) for f in frames]
            strip = images.image_strip(frames, list(labels))
            print(pngfiles.save_png(strip, out, stem=path.stem + "-steps", parameters=image.info["parameters"]))


def png_arguments(path: str) -> tuple[dict, list[str]]:
    """generate()'s arguments from a PNG's infotext (reproduce.generate_args; its "model_hash" too), and notes."""
    from .infotext import parse_infotext
    from .pngfiles import read_infotext
    from .reproduce import generate_args

    text = read_infotext(path)
    if not text:
        raise ValueError(f"{path}: no generation parameters in it (no PNG 'parameters' text); --from-png needs an "
                         "image made by latentforge or AUTOMATIC1111, with its text kept")  # fmt: skip
    params = parse_infotext(text)
    try:
        args, notes = generate_args(params)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return args | {"model_hash": params.get("Model hash")}, notes


def hires_argument(args: argparse.Namespace):
    """The hires fix the --hires-* options ask for (--hires-scale or --hires-resize turns it on), or None."""
    from .hires import Hires

    if args.hires_scale is None and args.hires_resize is None:
        others = [name for name in ("hires_upscaler", "hires_steps", "hires_sampler", "hires_prompt",
                                    "hires_negative_prompt", "hires_cfg_scale", "hires_denoise")
                  if getattr(args, name) is not None]  # fmt: skip
        if others:
            raise ValueError(f"--{others[0].replace('_', '-')} needs --hires-scale or --hires-resize (the hires fix)")
        return None
    resize = None
    if args.hires_resize is not None:
        resize = size_argument("--hires-resize", args.hires_resize, "1024x768 (0 keeps the ratio)")
    return Hires(
        scale=2.0 if args.hires_scale is None else args.hires_scale, resize=resize,
        upscaler=args.hires_upscaler or "Latent", steps=args.hires_steps or 0,
        denoising_strength=0.7 if args.hires_denoise is None else args.hires_denoise, sampler=args.hires_sampler,
        prompt=args.hires_prompt, negative_prompt=args.hires_negative_prompt, cfg_scale=args.hires_cfg_scale,
    )  # fmt: skip


def name_or_number(text: str | None) -> str | int | None:
    """An option A1111 names or numbers (--resize-mode 1, --masked-content fill): digits are its number."""
    return int(text) if text and text.isdigit() else text


def size_argument(flag: str, text: str, example: str) -> tuple[int, int]:
    """A WIDTHxHEIGHT option's (width, height); a malformed one is a ValueError with an example."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"{flag} {text}: write WIDTHxHEIGHT, e.g. {example}")
    return int(width), int(height)


def save_plot(pipe, call: dict, axes: list, out: Path) -> None:
    """An X/Y/Z plot: each cell as its own PNG (its infotext), then the grid PNG, whose infotext is the first
    cell's with the axes added (as A1111's script writes it)."""
    import secrets

    from . import grid, pngfiles
    from .request import MAX_SEED

    def one(**cell):
        image = pipe.generate(**cell)[0]
        print(pngfiles.save_png(image, out))
        return [image]

    seed = secrets.randbelow(MAX_SEED + 1) if call["seed"] is None else call["seed"]  # one seed for every cell
    plot = grid.xyz_plot(one, {**call, "batch_size": 1, "seed": seed}, *axes)
    first = plot.cells[0][0][0].info["parameters"]
    print(pngfiles.save_png(plot.grid, out, stem="grid", parameters=f"{first}, Script: X/Y/Z plot, {grid.axis_names(axes)}"))


def add_speed_options(p: argparse.ArgumentParser) -> None:
    speed = p.add_argument_group("speed (skip work for a shorter run; each changes the image a little, all off by "
                                 "default; figures: docs/benchmarks.md)")  # fmt: skip
    speed.add_argument("--speed", choices=list(PRESET_NAMES), default="default",
                       help="a preset: fast turns on the options below that cost the least, fastest DeepCache too "
                       "(see README)")
    speed.add_argument("--s-min-uncond", type=float, metavar="SIGMA",
                       help="skip the negative prompt's pass on every other step below this noise level (A1111's NGMS)")
    speed.add_argument("--s-min-uncond-all", action="store_true", help="... on every step below it")
    speed.add_argument("--skip-early-cfg", type=float, metavar="F",
                       help="the first fraction F of the steps without the negative prompt's pass")
    speed.add_argument("--deepcache", type=int, metavar="N",
                       help="DeepCache: the whole UNet every N-th call, its top blocks only in between (1: off)")
    speed.add_argument("--deepcache-depth", type=int, metavar="D",
                       help="blocks at the top of each side that run on every call (default: 1)")
    speed.add_argument("--token-merging", type=float, metavar="R",
                       help="merge this share (0..1) of the largest level's self-attention tokens (ToMe)")
    speed.add_argument("--tiny-decoder", metavar="FILE",
                       help="a tiny decoder (TAESD: taesd_decoder for SD 1.x/2.x, taesdxl_decoder for SDXL) for "
                       "previews (the shipped model has its own)")  # fmt: skip
    speed.add_argument("--fast-decode", action="store_true",
                       help="decode the final image with the tiny decoder too (A1111's VAE Decoder: TAESD)")


PRESET_NAMES = ("default", "fast", "fastest")  # speed.PRESETS' names, without importing torch for --help
SPEED_FLAGS = {  # argument -> Shortcuts field
    "s_min_uncond": "s_min_uncond", "s_min_uncond_all": "s_min_uncond_all", "skip_early_cfg": "skip_early_cfg",
    "deepcache": "deepcache_interval", "deepcache_depth": "deepcache_depth", "token_merging": "token_merging",
    "fast_decode": "tiny_decoder",
}  # fmt: skip


def speed_argument(args: argparse.Namespace):
    """The speed options asked for: the preset, with each option given on the command line instead of its value."""
    import dataclasses

    from .speed import preset

    values = {field: getattr(args, flag) for flag, field in SPEED_FLAGS.items()}
    given = {field: value for field, value in values.items() if value is not None and value is not False}  # 0 is given
    return dataclasses.replace(preset(args.speed), **given)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve AUTOMATIC1111's HTTP API and the web page until Ctrl-C."""
    import os

    try:
        from .server import Settings, serve
    except ImportError as e:
        raise ValueError(f"the server needs its extras: pip install 'latentforge[serve]' ({e})") from None
    serve(
        Settings(
            models=args.model or [None],
            host=args.host,
            port=args.port,
            api_auth=args.api_auth or os.environ.get("LATENTFORGE_API_AUTH") or None,
            cors_allow_origins=args.cors_allow_origin or [],
            max_body_bytes=args.max_body_mb * 1024 * 1024,
            dtype=args.dtype,
            device=args.device,
            vae_tiling=args.vae_tiling,
            lora_dirs=args.lora_dir,
            embedding_dirs=args.embeddings_dir,
            vae_dirs=args.vae_dir,
            upscaler_dirs=args.upscaler_dir,
            styles_file=args.styles_file,
            tiny_decoder_dir=args.tiny_decoder_dir,
            explain_clip=args.explain_clip,
        )
    )


def cmd_explain(args: argparse.Namespace) -> None:
    """Write the page that illustrates how the model makes the prompt's image, from a real run."""
    from . import images, load
    from .explain import write_page

    image = images.load_image(args.image) if args.image else None
    pipe = load(args.model, dtype=args.dtype, device=args.device)
    if args.tiny_decoder:
        pipe.load_tiny_decoder(args.tiny_decoder)
    write_page(
        pipe, args.prompt, args.out, seed=args.seed, steps=args.steps, image=image, guidance_runs=args.guidance_runs,
        fast_decode=args.fast_decode, clip=args.clip,
    )  # fmt: skip
    print(args.out)


def cmd_upscale(args: argparse.Namespace) -> None:
    """Upscale images with an ESRGAN / Real-ESRGAN model file or a built-in resize; writes PNGs, keeping each
    input's infotext, and prints their paths."""
    from . import images, pngfiles
    from .pipeline import DTYPES, resolve_device
    from .upscalers import BUILT_IN, Upscalers, upscale

    out = pngfiles.check_output_folder(args.out)  # before any work: a bad --out fails at once
    if args.scale is not None and not 0 < args.scale <= 16:
        raise ValueError(f"--scale must be above 0 and at most 16, got {args.scale}")
    if args.tile < 32:
        raise ValueError(f"--tile must be at least 32 pixels, got {args.tile}")
    upscalers = Upscalers.from_dirs(args.upscaler_dir, device=resolve_device(args.device), dtype=DTYPES[args.dtype])
    name = args.upscaler
    if name not in BUILT_IN and ("/" in name or os.sep in name or Path(name).is_file()):
        model = upscalers.load(Path(name))  # a file given by path (local use; the server takes names only)
    else:
        model = upscalers.get(name)
    inputs = [images.load_image(path) for path in args.images]  # all checked before the first is upscaled
    for path, image in zip(args.images, inputs):
        parameters = pngfiles.read_infotext(path)
        result = upscale(image, model, args.scale, tile=args.tile, overlap=args.tile_overlap)
        print(pngfiles.save_png(result, out, stem=Path(path).stem, parameters=parameters))


def cmd_samplers(args: argparse.Namespace) -> None:
    """List the samplers: AUTOMATIC1111's name, the short name, and the schedule."""
    from .samplers import SPECS

    for spec in SPECS:
        print(f"{spec.a1111_name:<18} {spec.name:<14} schedule: {spec.schedule}")


def cmd_info(args: argparse.Namespace) -> None:
    """Print the generation parameters stored in a PNG (AUTOMATIC1111's infotext)."""
    from .pngfiles import read_infotext

    text = read_infotext(args.image)
    if text is None:
        raise ValueError(f"{args.image}: no generation parameters in this image")
    print(text)


def _cfg_scales(values: list[str] | None) -> tuple[float | None, ...]:
    """--cfg-scale values for eval: numbers, 'default' = None (the model's own)."""
    scales = []
    for value in values or ["1", "default"]:
        if value == "default":
            scales.append(None)
            continue
        try:
            scales.append(float(value))
        except ValueError:
            raise ValueError(f"--cfg-scale must be a number or 'default', got {value!r}") from None
    return tuple(scales)


def cmd_eval(args: argparse.Namespace) -> None:
    """Prompt adherence of a model on the shapes world, as a markdown table (and JSON with --json)."""
    from . import load
    from .atomic import write_json
    from .training.evaluate import evaluate, format_report

    scales = _cfg_scales(args.cfg_scale)
    out = Path(args.json) if args.json else None
    if out is not None and not out.parent.is_dir():
        raise ValueError(f"--json {out}: folder {out.parent} does not exist")
    pipe = load(args.model, dtype=args.dtype, device=args.device)
    if args.tiny_decoder:
        pipe.load_tiny_decoder(args.tiny_decoder)
    speed = speed_argument(args)
    result = evaluate(pipe, args.prompts, args.seed, scales, args.steps, args.sampler, args.two_objects, speed)
    fields = speed.infotext()
    skipped = ", ".join(f"{name}: {value}" for name, value in fields.items()) or "none"
    print(f"model: {pipe.name} ({pipe.config.describe()}; defaults: {pipe.config.defaults.describe()})")
    print(f"skipping work: {skipped}\n")
    print(format_report(result))
    if out is not None:
        write_json({"model": pipe.name, "speed": fields, **result}, out)


def cmd_train(args: argparse.Namespace) -> None:
    """Train the VAE, CLIP or UNet (or all three in order) into a run folder; `export` writes the model."""
    if args.what == "export":
        _export_trained(args)
        return
    from .training import configs, loop
    from .training.clip import train_clip
    from .training.lora import train_lora
    from .training.tiny_decoder import train_tiny_decoder
    from .training.unet import train_all, train_unet
    from .training.vae import train_vae

    if args.what != "unet" and (args.vae or args.text_encoder):
        raise ValueError("--vae and --text-encoder are for `train unet` (`train all` uses its own)")
    run = Path(args.run)
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "data": args.data,
             "cooldown_steps": args.cooldown_steps}
    if args.what == "unet":
        given |= {"vae": args.vae, "text_encoder": args.text_encoder}
    if args.what not in ("lora", "tiny-decoder") and args.base:
        raise ValueError("--base is for `train lora` and `train tiny-decoder`")
    if args.what != "lora" and args.rank is not None:
        raise ValueError("--rank is for `train lora`")
    if args.what in ("lora", "tiny-decoder"):
        given |= {"base": args.base}
    if args.what == "lora":
        given |= {"rank": args.rank}
    dist = loop.setup_distributed()
    try:
        if args.what == "all":
            stages = {
                kind: configs.resolve_config(kind, run / kind, args.config, args.resume, section=True, **given)
                for kind in configs.KINDS
            }
            train_all(run, stages, dist, args.resume)
        else:
            config = configs.resolve_config(args.what, run, args.config, args.resume, **given)
            trainer = {"vae": train_vae, "clip": train_clip, "unet": train_unet, "lora": train_lora,
                       "tiny-decoder": train_tiny_decoder}[args.what]  # fmt: skip
            trainer(config, run, dist, args.resume)
    finally:
        loop.teardown_distributed()
    if dist.main:
        print(f"trained {args.what} in {run}")


def _export_trained(args: argparse.Namespace) -> None:
    """Write a finished `train all` (or UNet) run as one single-file checkpoint."""
    from .checkpoints import write_single_file
    from .pipeline import DTYPES
    from .training.unet import assemble
    from .weightfiles import CheckpointError

    if not args.out:
        raise ValueError("train export needs --out FILE.safetensors")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the model is written as .safetensors; name it {out.name}.safetensors")
    if out.exists():
        raise CheckpointError(out, "already exists", "choose a new destination (nothing is overwritten)")
    config, parts, _ = assemble(
        args.run, args.vae, sampler=args.default_sampler, steps=args.default_steps, cfg_scale=args.default_cfg_scale
    )
    write_single_file(config, parts, out, DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {out} ({config.describe()}; defaults: {config.defaults.describe()})")


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--dtype and --device, as `latentforge.load` takes them."""
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (float16 on CUDA, bfloat16 on a CPU with native bfloat16, else float32), float32, float16 "
        "or bfloat16 (default: auto)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


def add_vae_tiling_option(p: argparse.ArgumentParser) -> None:
    """--vae-tiling, as `Pipeline.vae_tiling`."""
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode images larger than the model's native size in overlapping tiles: bounded memory "
                   "for large images, a slightly different image (seams blended)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentforge", description="Stable Diffusion in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"latentforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="print the 77 CLIP token ids of a prompt")
    p.add_argument("prompt")
    p.add_argument("--pad-zero", action="store_true", help="pad with token 0 as SD 2.x does (default: end token)")
    p.set_defaults(func=cmd_tokenize)

    prediction = dict(
        choices=["epsilon", "v_prediction"],
        help="override what the model predicts, for SD 2.x files whose weights cannot tell",
    )
    p = sub.add_parser("inspect", help="tell what a checkpoint is (version, prediction type, sizes), or which add-on")
    p.add_argument("path", help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--prediction-type", **prediction)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between the single-file and diffusers layouts and float types",
        description="Reads SRC (single file or diffusers folder) and writes DST: a .safetensors name gets "
        "the original single-file layout, any other name a diffusers folder. DST must not exist.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["single", "diffusers"], help="layout of DST (default: from its name)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="store weights as (default: as read)")
    p.add_argument("--prediction-type", **prediction)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("generate", help="make images from a prompt (txt2img, img2img, inpainting)")
    p.add_argument("prompt", nargs="?",
                   help="what to draw; (word:1.3) / [word] emphasis and BREAK as in AUTOMATIC1111")  # fmt: skip
    p.add_argument("--negative-prompt", help="what to steer away from")
    p.add_argument("--from-png", metavar="FILE",
                   help="make an image again from the generation parameters in its PNG (A1111's PNG Info -> Send to "
                   "txt2img); the prompt and options given here replace the file's")  # fmt: skip
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the model shipped in the package)")
    p.add_argument("--sampler", help="sampler name as `latentforge samplers` lists (default: the model's; "
                   "Euler a for SD checkpoints)")  # fmt: skip
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's; 20 for SD checkpoints)")
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale, 0..100; 1 = none (default: the model's; 7 for SD checkpoints)")  # fmt: skip
    p.add_argument("--seed", type=seed_argument,
                   help="0..4294967295, or -1 for random; image i of a batch uses seed + i (default: random)")  # fmt: skip
    size = ("pixels, a multiple of 8, at most 4096; width x height at most 2048 x 2048 on the CPU, 4096 x 4096 on a "
            "GPU (default: the init image's size, else the model's native size)")
    p.add_argument("--width", type=int, help=size)
    p.add_argument("--height", type=int, help=size)
    p.add_argument("--subseed", type=seed_argument, metavar="SEED",
                   help="variation seed: with --subseed-strength, image i's noise moves toward this seed + i's "
                   "(A1111's \"Variation seed\"; default: random)")  # fmt: skip
    p.add_argument("--subseed-strength", type=float, metavar="F",
                   help="how far toward the variation seed's noise, 0..1 (default: 0, no variation)")
    p.add_argument("--seed-resize-from", metavar="WxH",
                   help="start from the noise the seed makes at this size, centred (A1111's \"Resize seed from\")")
    p.add_argument("--eta", type=float, metavar="F",
                   help="the fresh noise's share, 0..1, in Euler a (default 1) and DDIM (default 0), as A1111's Eta")
    p.add_argument("--rng", metavar="SOURCE",
                   help="A1111's random source: CPU (default), NV or GPU (what an NVIDIA card draws, computed here)")
    p.add_argument("--eta-noise-seed-delta", type=int, metavar="N",
                   help="A1111's ENSD setting (e.g. 31337): a stochastic sampler's later noise from seed + N (default: 0)")
    p.add_argument("--tiling", action="store_true", default=None,
                   help="an image that tiles seamlessly (A1111's \"Tiling\": the convolutions wrap around the edges)")
    p.add_argument("--batch-size", type=int, default=1, help="images to make (default: 1)")
    p.add_argument("--init-image", help="start from this image (img2img)")
    p.add_argument("--strength", type=float, help="img2img: how much to change, 0..1 (default: 0.75)")
    p.add_argument("--noise-multiplier", type=float, metavar="F",
                   help="img2img: scale the noise added to the image, 0..2 (A1111's; default: 1)")
    p.add_argument("--resize-mode", metavar="MODE",
                   help="img2img to another size: A1111's 'Just resize' (default), 'Crop and resize', 'Resize and "
                   "fill' or 'Just resize (latent upscale)', or its numbers 0-3")  # fmt: skip
    p.add_argument("--mask", help="inpainting: white is repainted, black kept (same size as --init-image)")
    inpaint = p.add_argument_group("inpainting (with --mask; the defaults are A1111's page's)")
    inpaint.add_argument("--mask-blur", type=int, metavar="PX", help="blur the mask by this radius first (default: 4)")
    inpaint.add_argument("--masked-content", metavar="KIND",
                         help="what the masked part starts from: fill, original (default), latent noise, latent "
                         "nothing (A1111's 0-3)")  # fmt: skip
    inpaint.add_argument("--inpaint-area", metavar="AREA",
                         help="whole picture (default), or only masked: the mask's box painted at the full size and "
                         "pasted back")  # fmt: skip
    inpaint.add_argument("--inpaint-padding", type=int, metavar="PX",
                         help="only masked: pixels around the mask's box (default: 32)")
    inpaint.add_argument("--no-overlay", dest="overlay", action="store_false", default=None,
                         help="keep the whole picture as the VAE paints it, instead of putting the image's unmasked "
                         "pixels back (A1111 puts them back)")  # fmt: skip
    p.add_argument("--clip-skip", type=int,
                   help="text-encoder layers to skip from the end, as A1111 counts (default: 1)")  # fmt: skip
    p.add_argument("--refiner", metavar="FILE",
                   help="SDXL refiner (checkpoint file or diffusers folder) that takes over the last steps, "
                   "loaded with the model's --dtype and --device")  # fmt: skip
    p.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="F",
                   help="fraction of the schedule after which the refiner takes over, as A1111's "
                   "\"Refiner switch at\" (default: 0.8)")  # fmt: skip
    hires = p.add_argument_group("hires fix (txt2img: upscale, then refine at the larger size)")
    hires.add_argument("--hires-scale", type=float, metavar="F", help="second pass at this times the size (turns it on)")
    hires.add_argument("--hires-resize", metavar="WxH", help="second pass at this size instead (turns it on)")
    hires.add_argument("--hires-upscaler", metavar="NAME",
                       help="Latent (default), Latent (antialiased|bicubic|bicubic antialiased|nearest|nearest-exact), "
                       "None, Lanczos, Nearest, or an upscaler model's name in --upscaler-dir")  # fmt: skip
    hires.add_argument("--hires-denoise", type=float, metavar="F", help="the second pass's denoising strength (0.7)")
    hires.add_argument("--hires-steps", type=int, metavar="N", help="the second pass's steps (default: the first's)")
    hires.add_argument("--hires-sampler", metavar="NAME", help="the second pass's sampler (default: the first's)")
    hires.add_argument("--hires-prompt", help="the second pass's prompt (default: the prompt)")
    hires.add_argument("--hires-negative-prompt", help="the second pass's negative prompt (default: the first's)")
    hires.add_argument("--hires-cfg-scale", type=float, help="the second pass's guidance (default: the first's)")
    p.add_argument("--upscaler-dir", action="append", default=[], metavar="DIR",
                   help="folder of ESRGAN / Real-ESRGAN upscaler files, by name for --hires-upscaler (repeatable)")
    plot = p.add_argument_group("X/Y/Z plot (one image per combination, and a labelled grid)")
    plot.add_argument("--x", metavar="KIND=V1,V2", help="an axis: seed, steps, cfg, sampler, prompt_sr (the first "
                      "value is replaced by each), lora=NAME:W1,W2, subseed, subseed_strength; ranges as in A1111: 10-30 (+10), 1-2 [5]")
    plot.add_argument("--y", metavar="KIND=V1,V2", help="a second axis (rows)")
    plot.add_argument("--z", metavar="KIND=V1,V2", help="a third axis (one grid per value, side by side)")
    p.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="apply this prompt style of --styles-file (repeatable, in order)")
    p.add_argument("--styles-file", metavar="CSV", help="AUTOMATIC1111's styles.csv (name,prompt,negative_prompt)")
    p.add_argument("--vae", metavar="FILE", help="decode with this VAE file (or diffusers VAE folder) instead of "
                   "the model's own")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W]",
                   help="merge this LoRA / LyCORIS file with weight W (default 1); repeat for several")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="folder of LoRA files that <lora:NAME:W> in the prompt names (repeatable)")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="folder of textual-inversion embeddings, used where the prompt says their file name")
    p.add_argument("--out", default="outputs", help="folder for the PNGs (default: ./outputs)")
    add_device_options(p)
    add_vae_tiling_option(p)
    p.add_argument("--text-encoders-on-demand", action="store_true",
                   help="free the text encoders once the prompt is encoded (less memory while the UNet and VAE "
                   "run; SDXL: 1.6 GB in bfloat16)")  # fmt: skip
    p.add_argument("--preview-every", type=int, default=0, metavar="N",
                   help="also save a strip of the predicted image after every N steps (by the tiny decoder when "
                   "one is loaded)")  # fmt: skip
    add_speed_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "train",
        help="train the VAE, CLIP text encoder or UNet (or all three), or a LoRA, on the shapes world or a folder",
        description="Trains into the run folder (checkpoints, samples, log.jsonl, the exported part). "
        "Under torchrun it trains data-parallel (gloo on the CPU, NCCL on GPUs), rank 0 writing. "
        "`all` trains vae, clip and unet in RUN/vae, RUN/clip, RUN/unet; `export` writes a finished "
        "run as one .safetensors model that `latentforge generate --model` loads.",
    )
    p.add_argument("what", choices=["vae", "clip", "unet", "lora", "tiny-decoder", "all", "export"])
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="the run folder (under torchrun spell it --run-dir: torchrun reads --run as its --run-path)")
    p.add_argument("--config", help="JSON of config fields to change (for `all`: sections vae, clip, unet)")
    p.add_argument("--steps", type=int, help="optimizer steps in all (default: the config's)")
    p.add_argument("--batch-size", type=int, help="global batch, split across processes (default: the config's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the config's)")
    p.add_argument("--cooldown-steps", type=int,
                   help="decay the lr linearly to 0 over the last N steps (default: the config's, 0 = none)")
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and noise (default: 0)")
    p.add_argument("--data", help="'shapes' (the procedural shapes world) or a folder of images with .txt captions")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint, exactly")
    p.add_argument("--vae", help="unet: the VAE, as its run folder or vae.safetensors; export: a VAE with the "
                   "UNet's encoder and a fine-tuned decoder (train vae with train_encoder false)")  # fmt: skip
    p.add_argument("--text-encoder", help="unet: the text encoder, as a CLIP run folder or text_encoder.safetensors")
    p.add_argument("--base", help="lora: the model to adapt, a checkpoint file or diffusers folder (default: the shipped "
                   "model); the LoRA is written as RUN/<output_name>.safetensors in kohya's format. tiny-decoder: "
                   "the model whose VAE decoder is distilled (default: the shipped model); written as "
                   "RUN/tiny_decoder.safetensors in TAESD's taesd_decoder names")  # fmt: skip
    p.add_argument("--rank", type=int, help="lora: the rank of every LoRA layer (default: the config's, 8)")
    p.add_argument("--out", help="export: the .safetensors file to write")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="export: store weights as")
    p.add_argument("--default-sampler", help="export: the model's default sampler (default: the run's sample_sampler)")
    p.add_argument("--default-steps", type=int, help="export: the model's default steps (default: the run's sample_steps)")
    p.add_argument("--default-cfg-scale", type=float,
                   help="export: the model's default guidance (default: the run's sample_cfg_scale)")  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="measure prompt adherence on the shapes world: generate, read back with an analytic judge",
        description="Generates one image per prompt sampled from the shapes world's grammar (fresh seeds "
        "derived from --seed), reads each back with the analytic judge (colour distances, connected "
        "components, shape masks, centroids) and prints per-attribute, whole-prompt and two-object "
        "relation accuracy at each guidance scale, as a markdown table.",
    )
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the model shipped in the package)")
    p.add_argument("-n", "--prompts", type=int, default=100, help="prompts to judge (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and image seeds (default: 0)")
    p.add_argument("--cfg-scale", action="append", metavar="SCALE",
                   help="a guidance scale to measure, or 'default' (the model's); repeat it "
                   "(default: 1 and default)")  # fmt: skip
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--sampler", help="sampler name (default: the model's)")
    p.add_argument("--two-objects", type=float, default=0.3, metavar="FRACTION",
                   help="share of two-object prompts (default: 0.3)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write every judged prompt and the summary as JSON")
    add_speed_options(p)
    add_device_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "serve",
        help="serve AUTOMATIC1111's HTTP API (/sdapi/v1) and a web page",
        description="Serves the API that AUTOMATIC1111's clients speak (txt2img, img2img, progress, interrupt, "
        "samplers, sd-models, options, png-info, loras, embeddings, sd-vae, upscalers, extras, prompt-styles and the rest "
        "that A1111's clients call) and a web page at /. One generation runs at a time; the others "
        "wait in a queue. Docs: docs/server.md.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--model", action="append", metavar="PATH",
                   help="a checkpoint file or diffusers folder; repeat it to offer several, switched with the "
                   "sd_model_checkpoint option (default: the model shipped in the package)")  # fmt: skip
    p.add_argument("--api-auth", metavar="USER:PASS",
                   help="require HTTP Basic auth on every route (or set LATENTFORGE_API_AUTH)")  # fmt: skip
    p.add_argument("--cors-allow-origin", action="append", metavar="ORIGIN",
                   help="allow cross-origin requests from this origin, e.g. http://localhost:3000 (repeatable)")  # fmt: skip
    p.add_argument("--max-body-mb", type=int, default=32, help="largest request body in MiB (default: 32)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="folder of LoRA files, named in prompts as <lora:NAME:W> (repeatable; /sdapi/v1/loras)")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="folder of textual-inversion embeddings (repeatable; /sdapi/v1/embeddings)")
    p.add_argument("--vae-dir", action="append", default=[], metavar="DIR",
                   help="folder of VAE files, chosen with the sd_vae option (repeatable; /sdapi/v1/sd-vae)")
    p.add_argument("--upscaler-dir", action="append", default=[], metavar="DIR",
                   help="folder of ESRGAN / Real-ESRGAN upscaler files (repeatable; /sdapi/v1/upscalers)")
    p.add_argument("--styles-file", metavar="CSV",
                   help="AUTOMATIC1111's styles.csv (name,prompt,negative_prompt): the styles requests may name")
    p.add_argument("--tiny-decoder-dir", metavar="DIR",
                   help="A1111's VAE-approx folder: taesd_decoder.safetensors / .pth (SD 1.x/2.x) and taesdxl_decoder "
                   "(SDXL) draw the live previews, and the image when sd_vae_decode_method is TAESD")  # fmt: skip
    p.add_argument("--explain-clip", metavar="RUN",
                   help="a `latentforge train clip` run folder: /explain pages get its images-against-captions figure "
                   "(explain's --clip)")  # fmt: skip
    add_device_options(p)
    add_vae_tiling_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "explain",
        help="write an HTML page that illustrates, from a real run, how the model makes the prompt's image",
        description="Generates the prompt once with probes and writes one self-contained page (images embedded, "
        "readable offline): tokens and text vectors, the steps, guidance, cross-attention maps, forward diffusion, "
        "the latent space and CLIP (its text side; images against captions with --clip). Needs matplotlib: "
        "pip install 'latentforge[explain]'.",
    )
    p.add_argument("prompt")
    p.add_argument("--model", metavar="PATH", help="a checkpoint file or diffusers folder (default: the shipped model)")
    p.add_argument("--seed", type=int, default=0, help="the seed (default: 0)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--image", metavar="FILE", help="an image for the forward-diffusion and latent-space figures "
                   "(default: the generated one)")  # fmt: skip
    p.add_argument("--out", default="explain.html", help="the page to write (default: ./explain.html)")
    p.add_argument("--guidance-runs", action="store_true", help="also generate the seed to the end at guidance 1 and "
                   "a high guidance (two more generations; the page otherwise mixes one run's predictions)")  # fmt: skip
    p.add_argument("--tiny-decoder", metavar="FILE",
                   help="a tiny decoder (TAESD: taesd_decoder for SD 1.x/2.x) for --fast-decode (the shipped model has its own)")
    p.add_argument("--fast-decode", action="store_true", help="paint the step, guidance and noise-level figures with "
                   "the tiny decoder (much cheaper on large models; the image and its VAE round trip stay the VAE's)")  # fmt: skip
    p.add_argument("--clip", metavar="RUN", help="a CLIP training run folder (latentforge train clip): its image "
                   "tower measures held-out images against their captions")  # fmt: skip
    add_device_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "upscale",
        help="upscale images with an ESRGAN / Real-ESRGAN model file (.pth, .safetensors) or a plain resize",
        description="Runs an RRDBNet upscaler (4x-UltraSharp, RealESRGAN_x4plus, RealESRGAN_x2plus, ...; both key "
        "layouts, the architecture read from the file) in overlapping tiles, or resizes with Lanczos / Nearest. "
        "A scale other than the model's own runs it again while the image is smaller (at most 3 times) and "
        "resizes the result with Lanczos, as AUTOMATIC1111 does. Writes one PNG per image, with its infotext.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--upscaler", required=True, metavar="NAME_OR_FILE",
                   help="a model file, the name of one in an --upscaler-dir, or None, Lanczos, Nearest")  # fmt: skip
    p.add_argument("--scale", type=float, help="output size / input size (default: the model's own scale)")
    p.add_argument("--upscaler-dir", action="append", default=[], metavar="DIR",
                   help="folder of upscaler model files, named by their file name without extension (repeatable)")
    p.add_argument("--tile", type=int, default=192, help="input pixels per tile side (default: 192)")
    p.add_argument("--tile-overlap", type=int, default=16,
                   help="input pixels neighbouring tiles share, blended across (default: 16)")  # fmt: skip
    p.add_argument("--out", default="outputs", help="folder for the PNGs (default: ./outputs)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the model's float type (default: float32)")  # fmt: skip
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("samplers", help="list the samplers")
    p.set_defaults(func=cmd_samplers)

    p = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    p.add_argument("image")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # user input problems: one line, no traceback
        print(f"latentforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left
        print(f"latentforge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
