"""SDXL: a tiny random StableDiffusionXLPipeline, saved by diffusers, loads in latentforge and makes the same
images; single files in SDXL's original key names load, convert both ways, and are detected from their keys."""

import dataclasses

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import latentforge
from conftest import tiny_diffusers_vae
from latentforge import checkpoints
from latentforge.checkpoints import read_checkpoint, single_file_tensors, write_diffusers, write_single_file
from latentforge.cli import main
from latentforge.conditioning import SDXLConditioner
from latentforge.samplers import DIFFUSERS_SCHEDULERS
from latentforge.schedules import NoiseSchedule
from latentforge.tokenizer import Tokenizer
from latentforge.weightfiles import CheckpointError, write_safetensors

PROMPT, NEGATIVE = "a small red circle on the left, white background", "blurry"
WIDTH_L, WIDTH_G, TIME_DIM = 32, 64, 8  # tiny stand-ins for 768, 1280 and 256
MAX_DIFF = 2  # out of 255
SAMPLERS = ["Euler", "Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"]


def tiny_sdxl_components(seed: int = 0, in_channels: int = 4) -> dict:
    """The parts of a StableDiffusionXLPipeline in SDXL's shapes, small and random (9 input channels: the
    SDXL inpainting UNet)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2],
        attention_head_dim=[2, 4],  # heads per level, 16 wide
        use_linear_projection=True,
        cross_attention_dim=WIDTH_L + WIDTH_G,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=WIDTH_G + 6 * TIME_DIM,
        norm_num_groups=32,
    )
    vae = tiny_diffusers_vae(scaling_factor=0.13025)
    common = dict(num_hidden_layers=3, max_position_embeddings=77, vocab_size=49408)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(hidden_size=WIDTH_L, num_attention_heads=2, intermediate_size=64,
                                    hidden_act="quick_gelu", **common)
    )  # fmt: skip
    text_encoder_2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(hidden_size=WIDTH_G, num_attention_heads=4, intermediate_size=128,
                                    hidden_act="gelu", projection_dim=WIDTH_G, pad_token_id=0, **common)
    )  # fmt: skip
    with torch.no_grad():  # move every weight off its init so that no layer can hide behind zeros
        for model in (unet, vae, text_encoder, text_encoder_2):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.03)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )  # fmt: skip
    # SDXL's published scheduler_config.json also carries these, which DDIM reads (its defaults differ)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, scheduler=scheduler)


def saved_sdxl(root, cls=diffusers.StableDiffusionXLPipeline, in_channels=4):
    """A tiny SDXL pipeline of class `cls`, written by diffusers' own save_pretrained under root/model."""
    Tokenizer().save_pretrained(root / "vocab")
    Tokenizer(pad_token="!").save_pretrained(root / "vocab2")
    pipe = cls(
        **tiny_sdxl_components(in_channels=in_channels),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "vocab"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(root / "vocab2"),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return saved_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def loaded(sdxl_folder):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return latentforge.load(sdxl_folder, dtype="float32", device="cpu"), ref


# our sampler name -> diffusers scheduler; Euler a's noise is drawn from the same generator in the same order
SCHEDULERS = {**DIFFUSERS_SCHEDULERS, "Euler a": ("EulerAncestralDiscreteScheduler", {})}


def with_scheduler(ref, sampler):
    cls, options = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **options)
    pipe = diffusers.StableDiffusionXLPipeline(**dict(ref.components, scheduler=scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_image(ours, theirs):
    assert ours.size == theirs.size
    diff = np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int)).max()
    assert diff <= MAX_DIFF, f"max pixel difference {diff} > {MAX_DIFF}"


def test_the_folder_loads_as_sdxl(loaded):
    ours, _ = loaded
    assert ours.config.version == "sdxl" and ours.config.context_width == WIDTH_L + WIDTH_G
    assert isinstance(ours.conditioner, SDXLConditioner) and ours.conditioner.size_embed_dim == TIME_DIM
    assert ours.conditioner.tokenizer.pad_id != 0 and ours.conditioner.tokenizer_2.pad_id == 0
    assert ours.config.vae.scaling_factor == 0.13025
    assert set(ours.models()) == {"text_encoder", "text_encoder_2", "unet", "vae"}


def test_prompt_encoding_matches_diffusers(loaded):
    ours, ref = loaded
    cond, uncond = ours.encode_prompt(PROMPT, NEGATIVE, size=(64, 96))
    embeds, negative, pooled, negative_pooled = ref.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE
    )
    torch.testing.assert_close(cond.context, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.context, negative, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.vector[:, :WIDTH_G], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.vector[:, :WIDTH_G], negative_pooled, atol=1e-5, rtol=1e-5)
    # an empty negative prompt: zeros for its text, its size conditioning kept
    _, empty = ours.encode_prompt(PROMPT, "", size=(64, 96))
    assert not empty.context.any() and not empty.vector[:, :WIDTH_G].any()
    torch.testing.assert_close(empty.vector[:, WIDTH_G:], cond.vector[:, WIDTH_G:])


def test_clip_skip_and_emphasis_reach_both_encoders(loaded):
    ours, ref = loaded
    cond, _ = ours.encode_prompt(PROMPT, None, clip_skip=2, size=(64, 64))
    embeds, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False, clip_skip=1)
    torch.testing.assert_close(cond.context, embeds, atol=1e-5, rtol=1e-5)  # A1111's 2 is diffusers' 1
    torch.testing.assert_close(cond.vector[:, :WIDTH_G], pooled, atol=1e-5, rtol=1e-5)  # pooled: always the last
    plain, _ = ours.encode_prompt("a red circle", None, size=(64, 64))
    weighted, _ = ours.encode_prompt("a (red:1.4) circle", None, size=(64, 64))
    changed = (plain.context - weighted.context).abs().amax(dim=1)[0]  # (WIDTH_L + WIDTH_G,)
    assert changed[:WIDTH_L].max() > 1e-3 and changed[WIDTH_L:].max() > 1e-3


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_txt2img_matches_diffusers(loaded, sampler, negative):
    ours, ref = loaded
    steps, seed = 6, 1234
    image = ours.generate(PROMPT, negative, steps=steps, sampler=sampler, cfg_scale=6.0, seed=seed,
                          width=64, height=96)[0]  # fmt: skip
    want = with_scheduler(ref, sampler)(
        PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=6.0,
        width=64, height=96, generator=torch.Generator().manual_seed(seed),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


def init_picture(width=64, height=96):
    """A smooth coloured picture (an image the VAE encodes to something other than noise)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras"])
def test_img2img_matches_diffusers(loaded, sampler):
    ours, ref = loaded
    init = init_picture()
    image = ours.generate(PROMPT, NEGATIVE, steps=8, sampler=sampler, cfg_scale=6.0, seed=11, init_image=init,
                          strength=0.6)[0]  # fmt: skip
    cls, options = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **options)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**dict(ref.components, scheduler=scheduler))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        PROMPT, negative_prompt=NEGATIVE, image=init, strength=0.6, num_inference_steps=8, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(11),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_unet_matches_diffusers(tmp_path_factory, strength):
    folder = saved_sdxl(tmp_path_factory.mktemp("sdxl-inpaint"), diffusers.StableDiffusionXLInpaintPipeline, 9)
    ours = latentforge.load(folder, dtype="float32", device="cpu")
    assert ours.config.inpainting and ours.config.version == "sdxl"
    ref = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    init = init_picture(64, 64)
    mask = Image.fromarray(np.where(np.arange(64)[None, :] >= 32, 255, 0).astype(np.uint8).repeat(64, 0), "L")
    kwargs = dict(steps=8, sampler="Euler", cfg_scale=6.0, seed=21, init_image=init, mask=mask, strength=strength)
    image = ours.generate(PROMPT, NEGATIVE, **kwargs)[0]
    want = ref(
        PROMPT, negative_prompt=NEGATIVE, image=init, mask_image=mask, strength=strength, num_inference_steps=8,
        guidance_scale=6.0, width=64, height=64, generator=torch.Generator().manual_seed(21),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


def test_default_size_is_the_native_one(loaded):
    ours, _ = loaded
    assert ours.config.native_size == 128  # sample_size 16 x 8 (1024 for the real SDXL's 128)
    assert ours.generate(PROMPT, steps=1, seed=1)[0].size == (128, 128)


def test_single_file_round_trip_in_original_names(loaded, sdxl_folder, tmp_path):
    ours, _ = loaded
    config, parts = read_checkpoint(sdxl_folder)
    names = single_file_tensors(config, parts)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in names)
    assert "conditioner.embedders.1.model.text_projection" in names
    assert not any(k.startswith("cond_stage_model.") for k in names)
    # without our metadata, as everyone else's files: the config comes from the tensors
    path = tmp_path / "sdxl.safetensors"
    write_safetensors(single_file_tensors(config, read_checkpoint(sdxl_folder)[1]), path)
    inferred, _ = read_checkpoint(path)
    assert inferred.version == "sdxl" and inferred.prediction_type == "epsilon"
    assert inferred.text_encoder_2.projection_dim == WIDTH_G and inferred.vae.scaling_factor == 0.13025
    # latentforge's own single file keeps the exact config; it and a diffusers folder written back agree
    ours_file = tmp_path / "ours.safetensors"
    write_single_file(config, read_checkpoint(sdxl_folder)[1], ours_file)
    again = latentforge.load(ours_file, dtype="float32", device="cpu")
    folder = tmp_path / "folder"
    write_diffusers(config, read_checkpoint(ours_file)[1], folder, ours.conditioner.tokenizer,
                    tokenizer_2=ours.conditioner.tokenizer_2)  # fmt: skip
    back = latentforge.load(folder, dtype="float32", device="cpu")
    first = ours.generate(PROMPT, NEGATIVE, steps=3, sampler="Euler", seed=5, width=64, height=64)[0]
    for pipe in (again, back):
        image = pipe.generate(PROMPT, NEGATIVE, steps=3, sampler="Euler", seed=5, width=64, height=64)[0]
        assert np.array_equal(np.asarray(image), np.asarray(first))
    assert diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True) is not None


def test_convert_writes_a_single_file_diffusers_reads(loaded, sdxl_folder, tmp_path):
    ours, ref = loaded
    path = tmp_path / "sdxl.safetensors"
    assert main(["convert", str(sdxl_folder), str(path)]) == 0
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_folder), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(theirs, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    image = ours.generate(PROMPT, NEGATIVE, steps=4, sampler="Euler", cfg_scale=6.0, seed=3, width=64, height=64)[0]
    want = with_scheduler(theirs, "Euler")(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, width=64, height=64,
        generator=torch.Generator().manual_seed(3),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)
    assert main(["convert", str(path), str(tmp_path / "back")]) == 0
    back = latentforge.load(tmp_path / "back", dtype="float32", device="cpu")
    again = back.generate(PROMPT, NEGATIVE, steps=4, sampler="Euler", cfg_scale=6.0, seed=3, width=64, height=64)[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))


@pytest.fixture(scope="module")
def zero_snr_folder(tmp_path_factory):
    """The tiny SDXL with a v-prediction, zero-terminal-SNR schedule sampled at trailing timesteps."""
    root = tmp_path_factory.mktemp("sdxl-ztsnr")
    folder = saved_sdxl(root)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(
        ref.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    diffusers.StableDiffusionXLPipeline(**dict(ref.components, scheduler=scheduler)).save_pretrained(root / "zero")
    return root / "zero"


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "UniPC", "DDIM"])
def test_zero_terminal_snr_v_prediction_matches_diffusers(zero_snr_folder, sampler):
    ours = latentforge.load(zero_snr_folder, dtype="float32", device="cpu")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(zero_snr_folder, local_files_only=True)
    assert ours.config.prediction_type == "v_prediction" and ours.config.scheduler["rescale_betas_zero_snr"]
    image = ours.generate(PROMPT, NEGATIVE, steps=6, sampler=sampler, cfg_scale=6.0, seed=2, width=64, height=64)[0]
    want = with_scheduler(ref, sampler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0, width=64, height=64,
        generator=torch.Generator().manual_seed(2),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


def test_single_file_markers_give_v_prediction_and_zero_snr(zero_snr_folder, tmp_path):
    """A file with `v_pred` and `ztsnr` and no latentforge metadata, as published v-pred/ztsnr SDXL files are,
    gets the schedule and prediction of the diffusers folder it came from (its heads follow SDXL's published
    64-wide rule, which the tiny model does not, so images are not compared here)."""
    config, parts = read_checkpoint(zero_snr_folder)
    tensors = single_file_tensors(config, parts)
    assert "v_pred" in tensors and "ztsnr" in tensors
    path = tmp_path / "vpred-ztsnr.safetensors"
    write_safetensors(tensors, path)
    inferred, _ = read_checkpoint(path)
    assert inferred.prediction_type == "v_prediction" and inferred.unet.size_embed_dim == TIME_DIM
    got, want = NoiseSchedule.from_config(inferred.scheduler), NoiseSchedule.from_config(config.scheduler)
    assert got.rescale_betas_zero_snr and got.timestep_spacing == want.timestep_spacing == "trailing"
    assert torch.equal(got.sigmas, want.sigmas) and torch.isfinite(got.sigmas).all()


def test_v_pred_marker_and_refusals(sdxl_folder, tmp_path, capsys):
    config, parts = read_checkpoint(sdxl_folder)
    tensors = single_file_tensors(dataclasses.replace(config, prediction_type="v_prediction"), parts)
    assert "v_pred" in tensors
    path = tmp_path / "v.safetensors"
    write_safetensors(tensors, path)
    assert read_checkpoint(path)[0].prediction_type == "v_prediction"

    cases = {
        # the base's UNet with only bigG, under the refiner's prefix: the UNet reads both towers' width
        "one_tower": {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in tensors.items()
                      if not k.startswith("conditioner.embedders.0.")},
        "no_bigG": {k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")},
        "mixed": {**tensors, "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)},
    }  # fmt: skip
    messages = {
        "one_tower": rf"added vector \({WIDTH_G + 6 * TIME_DIM} wide\) does not fit {WIDTH_G} of pooled text and 5 size",
        "no_bigG": r"no text_encoder_2 weights \(conditioner.embedders.1.model.\*\)",
        "mixed": r"several model families \(sd1, sdxl\)",
    }
    for case, content in cases.items():
        bad = tmp_path / f"{case}.safetensors"
        write_safetensors(content, bad)
        with pytest.raises(CheckpointError, match=messages[case]):
            read_checkpoint(bad)
        assert main(["inspect", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err


def test_sd15_single_file_still_says_sd1(tmp_path):
    config, parts = checkpoints.read_checkpoint(latentforge.pipeline.DEFAULT_MODEL)
    assert config.version == "sd1" and config.text_encoder_2 is None


# --------------------------------------------------------------------------- the refiner

REFINER_CONTEXT = WIDTH_G  # the refiner reads bigG alone


def tiny_refiner_components(seed: int = 1) -> dict:
    """A StableDiffusionXLImg2ImgPipeline's parts in the refiner's shape: bigG only, aesthetic score."""
    base = tiny_sdxl_components(seed)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 1],
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        cross_attention_dim=REFINER_CONTEXT,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=WIDTH_G + 5 * TIME_DIM,
        norm_num_groups=32,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    return dict(unet=unet, vae=base["vae"], text_encoder_2=base["text_encoder_2"], scheduler=base["scheduler"])


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner")
    Tokenizer(pad_token="!").save_pretrained(root / "vocab2")
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        **tiny_refiner_components(), text_encoder=None, tokenizer=None,
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(root / "vocab2"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def refiner(refiner_folder):
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return latentforge.load(refiner_folder, dtype="float32", device="cpu"), ref


def test_refiner_loads_and_refines_an_image_as_diffusers(refiner):
    ours, ref = refiner
    assert ours.config.version == "sdxl-refiner" and ours.config.context_width == REFINER_CONTEXT
    init = init_picture()
    image = ours.generate(PROMPT, NEGATIVE, steps=8, sampler="Euler", cfg_scale=6.0, seed=4, init_image=init,
                          strength=0.5)[0]  # fmt: skip
    want = ref(
        PROMPT, negative_prompt=NEGATIVE, image=init, strength=0.5, num_inference_steps=8, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(4),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
def test_base_and_refiner_ensemble_matches_diffusers(loaded, refiner, sampler):
    base, base_ref = loaded
    ours_refiner, refiner_ref = refiner
    steps, seed, switch = 10, 8, 0.8
    image = base.generate(PROMPT, NEGATIVE, steps=steps, sampler=sampler, cfg_scale=6.0, seed=seed, width=64,
                          height=64, refiner=ours_refiner, refiner_switch_at=switch)[0]  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    latents = with_scheduler(base_ref, sampler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=6.0, width=64, height=64,
        denoising_end=switch, output_type="latent", generator=generator,
    ).images  # fmt: skip
    cls, options = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, cls).from_config(refiner_ref.scheduler.config, **options)
    second = diffusers.StableDiffusionXLImg2ImgPipeline(
        **dict(refiner_ref.components, scheduler=scheduler), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    second.set_progress_bar_config(disable=True)
    want = second(
        PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=steps, guidance_scale=6.0,
        denoising_start=switch, generator=generator,
    ).images[0]  # fmt: skip
    assert_same_image(image, want)
    alone = base.generate(PROMPT, NEGATIVE, steps=steps, sampler=sampler, cfg_scale=6.0, seed=seed, width=64, height=64)
    assert not np.array_equal(np.asarray(alone[0]), np.asarray(image))  # the refiner did change the picture


def test_a_refiner_inpaints_keeping_the_unmasked_latents(loaded, refiner):
    """A1111's inpainting with an ordinary model keeps the image's latents outside the mask in every prediction;
    with a refiner the refiner's steps keep them too, and the refiner changes the picture."""
    import torch.nn.functional as F

    from latentforge.images import image_to_tensor, mask_to_tensor

    base, _ = loaded
    ours_refiner, _ = refiner
    init = init_picture()
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (16, 16, 48, 64))
    kwargs = dict(steps=8, sampler="Euler", cfg_scale=6.0, seed=3, init_image=init, mask=mask, strength=0.9)
    steps = []
    image = base.generate(PROMPT, NEGATIVE, refiner=ours_refiner, refiner_switch_at=0.5, callback=steps.append,
                          **kwargs)[0]  # fmt: skip
    z = base.encode_image(image_to_tensor(init), torch.Generator().manual_seed(3))  # the image's draw comes first
    keep = (F.interpolate(mask_to_tensor(mask), size=z.shape[-2:]) == 0).expand_as(z)
    assert len(steps) == 7 and 0 < int(keep.sum()) < keep.numel()  # strength 0.9 of 8 steps
    for step in steps:
        assert torch.equal(step.denoised[keep], z[keep])
    alone = base.generate(PROMPT, NEGATIVE, **kwargs)[0]
    assert not np.array_equal(np.asarray(alone), np.asarray(image))  # the refiner did change the picture


def test_the_hires_fix_with_a_refiner_refines_the_hires_pass(loaded, refiner):
    """A1111's default ("Hires fix: which pass to enable refiner for: second pass"): the first pass is the base
    model's alone; in the hires pass the refiner takes the steps whose timestep is below the switch."""
    from latentforge.hires import Hires
    from latentforge.pipeline import refiner_split
    from latentforge.samplers import get_sampler, img2img_sigmas

    base, _ = loaded
    ours_refiner, _ = refiner
    sizes = {"base": [], "refiner": []}  # the latent width of each UNet call
    hooks = [model.unet.register_forward_hook(lambda m, args, out, name=name: sizes[name].append(args[0].shape[-1]))
             for name, model in (("base", base), ("refiner", ours_refiner))]  # fmt: skip
    hires = Hires(scale=2.0, steps=6, denoising_strength=0.7)
    kwargs = dict(steps=5, sampler="Euler", cfg_scale=6.0, seed=2, width=64, height=64, hires=hires)
    try:
        image = base.generate(PROMPT, NEGATIVE, refiner=ours_refiner, refiner_switch_at=0.6, **kwargs)[0]
    finally:
        for hook in hooks:
            hook.remove()
    spec = get_sampler("Euler")
    schedule = NoiseSchedule.from_config(base.config.scheduler)
    sigmas = img2img_sigmas(spec, schedule, 6, 0.7)
    split = refiner_split(spec, schedule, sigmas, 0.6)
    assert 0 < split < len(sigmas) - 1  # the switch falls inside the hires pass
    assert sizes["base"] == [8] * 5 + [16] * split  # the first pass (8 x 8 latents), then the hires pass's first steps
    assert sizes["refiner"] == [16] * (len(sigmas) - 1 - split)
    assert "Refiner: " in image.info["parameters"] and "Hires upscale: 2" in image.info["parameters"]
    alone = base.generate(PROMPT, NEGATIVE, **kwargs)[0]
    assert not np.array_equal(np.asarray(alone), np.asarray(image))


def test_refiner_misuse_is_one_line(loaded, refiner, tmp_path, capsys):
    base, _ = loaded
    ours_refiner, _ = refiner
    with pytest.raises(ValueError, match="an SDXL refiner continues an image: give it an init image"):
        ours_refiner.generate(PROMPT, steps=2)
    sd = latentforge.load(dtype="float32", device="cpu")  # the shipped SD-shaped model
    with pytest.raises(ValueError, match="works in another latent space"):
        base.generate(PROMPT, steps=2, refiner=sd, width=64, height=64)
    with pytest.raises(ValueError, match="refiner_switch_at must be a fraction between 0 and 1"):
        base.generate(PROMPT, steps=2, refiner=ours_refiner, refiner_switch_at=1.0, width=64, height=64)
    path = tmp_path / "refiner.safetensors"
    assert main(["convert", str(ours_refiner.source), str(path)]) == 0
    assert read_checkpoint(path)[0] == ours_refiner.config
    names = single_file_tensors(*read_checkpoint(ours_refiner.source))
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.model."))
               for k in names)  # fmt: skip
    assert main(["generate", PROMPT, "--model", str(path), "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    assert "an SDXL refiner continues an image" in capsys.readouterr().err


def test_text_encoders_on_demand_free_and_read_them_again(sdxl_folder):
    """The towers' memory is freed after each prompt and read again for the next: the images do not change."""
    pipe = latentforge.load(sdxl_folder, dtype="float32", device="cpu")
    kwargs = dict(steps=3, sampler="Euler", cfg_scale=6.0, seed=9, width=64, height=64)
    want = [pipe.generate(prompt, NEGATIVE, **kwargs)[0] for prompt in (PROMPT, "a blue square")]
    pipe.text_encoders_on_demand = True
    for prompt, expected in zip((PROMPT, "a blue square"), want):
        image = pipe.generate(prompt, NEGATIVE, **kwargs)[0]
        assert np.array_equal(np.asarray(image), np.asarray(expected))
        assert all(p.is_meta for m in pipe.conditioner.models().values() for p in m.parameters())
    assert not any(p.is_meta for p in pipe.unet.parameters())
