"""VAE files: every form people download decodes as diffusers' AutoencoderKL does with the same weights; a VAE
applied to a pipeline changes its images to those of a model built with that VAE, and restoring gives the
model's own images back bit for bit; files that are not a fitting VAE are refused in one line."""

import re
import shutil
from dataclasses import replace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from conftest import tiny_diffusers_vae

import latentforge
from latentforge import layouts
from latentforge.adapters.vae_file import VAEState, apply_vae, read_vae, restore_vae
from latentforge.cli import main
from latentforge.pipeline import build
from latentforge.vae import AutoencoderKL
from latentforge.weightfiles import CheckpointError, read_state_dict, write_safetensors

GENERATE = {"prompt": "a red circle", "steps": 3, "sampler": "Euler", "cfg_scale": 5.0, "seed": 42}
CLOSE = {"atol": 1e-5, "rtol": 1e-5}


def random_vae(seed: int, **options) -> diffusers.AutoencoderKL:
    """A tiny diffusers AutoencoderKL in SD's shape, every weight moved off its initial value."""
    torch.manual_seed(seed)
    config = {k: v for k, v in tiny_diffusers_vae().config.items() if not k.startswith("_")}
    vae = diffusers.AutoencoderKL.from_config({**config, **options})
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    return vae.eval()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(the diffusers VAE, its saved AutoencoderKL folder, its weights in LDM names)."""
    vae = random_vae(7)
    folder = tmp_path_factory.mktemp("vae") / "vae-folder"
    vae.save_pretrained(folder)
    config = layouts.vae_config_from_diffusers(vae.config)
    ldm = layouts.vae_from_diffusers(dict(vae.state_dict()), config)
    return vae, folder, {k: v.clone() for k, v in ldm.items()}


def ours(path) -> AutoencoderKL:
    config, tensors = read_vae(path)
    return build(AutoencoderKL, config, tensors, torch.device("cpu"), torch.float32)


def assert_same_vae(model: AutoencoderKL, theirs: diffusers.AutoencoderKL) -> None:
    """Decode (and the encoder's mean) agree with diffusers' to 1e-5."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), theirs.decode(z).sample, **CLOSE)
        torch.testing.assert_close(model.encode(image)[0], theirs.encode(image).latent_dist.mean, **CLOSE)


def from_single_file(path, folder) -> diffusers.AutoencoderKL:
    """diffusers' own reader of single-file VAEs, offline, with the folder's config."""
    return diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), local_files_only=True).eval()


# --------------------------------------------------------------------------------------------- accepted forms


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_ldm_single_file_decodes_as_diffusers_reads_it(ref, tmp_path, prefix):
    vae, folder, ldm = ref
    path = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    write_safetensors({prefix + k: v for k, v in ldm.items()}, path)
    model = ours(path)
    assert_same_vae(model, from_single_file(path, folder))
    assert_same_vae(model, vae)


@pytest.mark.parametrize("name", ["kl-f8-anime2.ckpt", "orangemix.vae.pt"])
def test_pickled_ldm_file_with_training_leftovers(ref, tmp_path, name):
    """An LDM training checkpoint ({"state_dict": ...}): the loss and EMA bookkeeping are ignored by name."""
    vae, folder, ldm = ref
    leftovers = {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(840000),
    }
    path = tmp_path / name
    torch.save({"state_dict": {**ldm, **leftovers}, "global_step": 840000}, path)
    model = ours(path)
    assert_same_vae(model, vae)
    plain = tmp_path / "plain.pt"  # a bare state dict, as many .vae.pt files are
    torch.save(dict(ldm), plain)
    assert_same_vae(ours(plain), from_single_file(plain, folder))


def test_ldm_file_with_linear_attention_weights(ref, tmp_path):
    """LDM names with the attention projections stored (C, C), as some converters write them."""
    vae, _, ldm = ref
    flat = {k: v.flatten(1) if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) else v for k, v in ldm.items()}
    assert any(v.ndim == 2 for v in flat.values())
    path = tmp_path / "converted.safetensors"
    write_safetensors(flat, path)
    assert_same_vae(ours(path), vae)


def test_diffusers_folder_and_model_folder(ref, sd1_folder):
    vae, folder, _ = ref
    assert_same_vae(ours(folder), vae)
    config, _ = read_vae(folder)
    assert config == layouts.vae_config_from_diffusers(vae.config)
    # a whole diffusers model: its vae/
    own = diffusers.AutoencoderKL.from_pretrained(sd1_folder, subfolder="vae", local_files_only=True).eval()
    assert_same_vae(ours(sd1_folder), own)


@pytest.mark.parametrize("legacy", [False, True])
def test_diffusers_named_single_file(ref, tmp_path, legacy):
    vae, folder, _ = ref
    tensors, _ = read_state_dict(folder / "diffusion_pytorch_model.safetensors")
    assert "encoder.down_blocks.0.resnets.0.norm1.weight" in tensors
    if legacy:  # the attention names of older diffusers files
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        tensors = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
                   for k, v in tensors.items()}  # fmt: skip
        assert "encoder.mid_block.attentions.0.query.weight" in tensors
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_safetensors(tensors, path)
    assert_same_vae(ours(path), vae)


def test_whole_checkpoint_gives_its_vae(sd1_folder, tmp_path):
    """A full SD checkpoint passed as a VAE works: its first_stage_model.* part is the VAE."""
    path = tmp_path / "model.safetensors"
    assert main(["convert", str(sd1_folder), str(path)]) == 0
    own = diffusers.AutoencoderKL.from_pretrained(sd1_folder, subfolder="vae", local_files_only=True).eval()
    assert_same_vae(ours(path), own)


# --------------------------------------------------------------------------------------------- applied to a pipeline


def test_apply_changes_images_to_those_of_the_model_with_that_vae(ref, sd1_folder, tmp_path):
    vae, _, ldm = ref
    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    model_vae, model_config = pipe.vae, pipe.config
    before = np.asarray(pipe.generate(**GENERATE)[0])
    path = tmp_path / "new.vae.safetensors"
    write_safetensors({"first_stage_model." + k: v for k, v in ldm.items()}, path)

    previous = apply_vae(pipe, path)
    assert previous == VAEState(model_vae, model_config.vae)
    after = np.asarray(pipe.generate(**GENERATE)[0])
    assert np.abs(after.astype(int) - before.astype(int)).max() > 10, "the new VAE did not change the image"

    # the same model saved with that VAE in its vae/ gives the same image, bit for bit
    swapped = tmp_path / "swapped"
    shutil.copytree(sd1_folder, swapped)
    shutil.rmtree(swapped / "vae")
    vae.save_pretrained(swapped / "vae")
    built = latentforge.load(swapped, dtype="float32", device="cpu")
    assert np.array_equal(after, np.asarray(built.generate(**GENERATE)[0]))
    # and diffusers' pipeline with its vae replaced gives it within rounding
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        sd1_folder, vae=vae, safety_checker=None, local_files_only=True
    )
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    want = theirs(GENERATE["prompt"], num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(42)).images[0]  # fmt: skip
    assert np.abs(after.astype(int) - np.asarray(want).astype(int)).max() <= 2

    restore_vae(pipe, previous)
    assert pipe.vae is model_vae and pipe.config == model_config
    assert np.array_equal(np.asarray(pipe.generate(**GENERATE)[0]), before)


def test_apply_keeps_the_models_scaling_factor_and_dtype(ref, sd1_folder, tmp_path):
    """A folder stating another latent scale (SDXL's) does not change the model's; the VAE is built in the
    pipeline's dtype."""
    folder = ref[1]
    other = tmp_path / "sdxl-like"
    shutil.copytree(folder, other)
    config = (other / "config.json").read_text().replace('"scaling_factor": 0.18215', '"scaling_factor": 0.13025')
    (other / "config.json").write_text(config)
    assert read_vae(other)[0].scaling_factor == 0.13025
    pipe = latentforge.load(sd1_folder, dtype="bfloat16", device="cpu")
    scale = pipe.config.vae.scaling_factor
    apply_vae(pipe, other)
    assert pipe.config.vae.scaling_factor == scale == 0.18215
    assert pipe.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    assert pipe.config.vae == replace(read_vae(other)[0], scaling_factor=scale)


# --------------------------------------------------------------------------------------------- refused, in one line


def refusal(call, path) -> str:
    with pytest.raises(CheckpointError) as e:
        call(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


def test_lora_and_unet_files_say_what_they_look_like(sd1_folder, tmp_path):
    lora = tmp_path / "detail.safetensors"
    write_safetensors({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }, lora)  # fmt: skip
    assert "looks like a LoRA" in refusal(read_vae, lora)
    assert "looks like a UNet" in refusal(read_vae, sd1_folder / "unet" / "diffusion_pytorch_model.safetensors")
    embedding = write(tmp_path / "ti.pt", {"emb_params": torch.zeros(2, 128)})
    assert "looks like a textual-inversion" in refusal(read_vae, embedding)
    assert "holds no weights" in refusal(read_vae, write(tmp_path / "empty.safetensors", {}))


def write(path, tensors):
    if path.suffix == ".pt":
        torch.save(tensors, path)
    else:
        write_safetensors(tensors, path)
    return path


def test_latent_channel_mismatch(sd1_folder, tmp_path):
    folder = tmp_path / "vae8"
    random_vae(1, latent_channels=8).save_pretrained(folder)
    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    model_vae = pipe.vae
    message = refusal(lambda p: apply_vae(pipe, p), folder)
    assert "a VAE with 8 latent channels; this model's latents have 4" in message
    assert pipe.vae is model_vae and pipe.config.vae.latent_channels == 4  # nothing changed


def test_sd3_style_vae_without_quant_convs(tmp_path):
    folder = tmp_path / "vae16"
    random_vae(1, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False).save_pretrained(folder)
    assert "16 latent channels and no quant convs" in refusal(read_vae, folder)
    single = write(tmp_path / "ae.safetensors", read_state_dict(folder / "diffusion_pytorch_model.safetensors")[0])
    assert "16 latent channels and no quant convs" in refusal(read_vae, single)


def test_truncated_file(ref, tmp_path):
    path = write(tmp_path / "vae.safetensors", ref[2])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refusal(read_vae, path)


def test_nan_weights_name_the_first_bad_key(ref, tmp_path):
    tensors = {k: v.clone() for k, v in ref[2].items()}
    tensors["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    message = refusal(read_vae, write(tmp_path / "vae.safetensors", tensors))
    assert "'decoder.conv_out.weight' holds NaN/inf" in message


def test_missing_unexpected_and_misshapen_weights(ref, tmp_path):
    tensors = dict(ref[2])
    missing = {k: v for k, v in tensors.items() if k != "decoder.conv_out.bias"}
    assert "'decoder.conv_out.bias' is missing" in refusal(read_vae, write(tmp_path / "a.safetensors", missing))
    extra = {**tensors, "decoder.extra.weight": torch.zeros(1)}
    assert "'decoder.extra.weight' is unexpected" in refusal(read_vae, write(tmp_path / "b.safetensors", extra))
    stray = {**{"first_stage_model." + k: v for k, v in tensors.items()}, "foo.weight": torch.zeros(1)}
    assert "unexpected weight 'foo.weight'" in refusal(read_vae, write(tmp_path / "c.safetensors", stray))
    shapes = {**tensors, "decoder.conv_out.bias": torch.zeros(5)}
    assert "'decoder.conv_out.bias' has shape (5,)" in refusal(read_vae, write(tmp_path / "d.safetensors", shapes))


def test_missing_path_and_folder_without_config(tmp_path):
    assert "no such file or folder" in refusal(read_vae, tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    assert "without config.json" in refusal(read_vae, tmp_path / "empty")


def test_pipeline_load_vae_infotext_and_cli(ref, sd1_folder, tmp_path, monkeypatch):
    """Pipeline.load_vae swaps the VAE and names it in the infotext as A1111 does ("VAE hash", "VAE"); a second
    file replaces the first and None goes back to the model's own, bit for bit; the CLI's --vae is the same."""
    from latentforge.infotext import parse_infotext
    from latentforge.modelhash import model_hash

    _, _, ldm = ref
    path = tmp_path / "new.vae.safetensors"
    write_safetensors({"first_stage_model." + k: v for k, v in ldm.items()}, path)
    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    own = np.asarray(pipe.generate(**GENERATE)[0])
    pipe.load_vae(path)
    pipe.load_vae(path)  # a second swap keeps the model's own VAE for going back
    image = pipe.generate(**GENERATE)[0]
    params = parse_infotext(image.info["parameters"])
    assert (params["VAE"], params["VAE hash"]) == ("new.vae.safetensors", model_hash(path))
    pipe.load_vae(None)
    back = pipe.generate(**GENERATE)[0]
    assert np.array_equal(own, np.asarray(back)) and "VAE" not in parse_infotext(back.info["parameters"])

    monkeypatch.chdir(tmp_path)
    args = ["generate", "a red circle", "--model", str(sd1_folder), "--steps", "3", "--sampler", "Euler",
            "--cfg-scale", "5", "--seed", "42", "--dtype", "float32", "--vae", str(path)]  # fmt: skip
    assert main(args) == 0
    written = next((tmp_path / "outputs").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(written).convert("RGB")), np.asarray(image))
