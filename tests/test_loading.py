"""latentforge.load reads what diffusers writes, and the single files it writes load in diffusers.

Every comparison runs diffusers / transformers in the same test on the same tiny random weights."""

import pytest
import torch

import latentforge
from latentforge.weightfiles import CheckpointError, read_state_dict
from latentforge.cli import main

import diffusers
PROMPTS = ["a red circle on the left, white background", "Café crème (1920x1080)! ✨ 東京"]


def reference(folder, kind):
    cls = diffusers.StableDiffusionInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionPipeline
    return cls.from_pretrained(folder, safety_checker=None, local_files_only=True)


def assert_same_model(ours, ref):
    """Token ids, text vectors, UNet output, VAE encode and decode agree to 1e-4."""
    g = torch.Generator().manual_seed(0)
    ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.conditioner.tokenizer(PROMPTS), ids)
    with torch.no_grad():
        close = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.conditioner.text_encoder(ids), ref.text_encoder(ids)[0], **close)
        context = torch.randn(2, 77, ours.config.unet.context_dim, generator=g)
        x = torch.randn(2, ours.config.unet.in_channels, 8, 8, generator=g)
        t = torch.tensor([3, 777])
        torch.testing.assert_close(ours.unet(x, t, context), ref.unet(x, t, encoder_hidden_states=context).sample, **close)
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        mean, logvar = ours.vae.encode(image)
        dist = ref.vae.encode(image).latent_dist
        torch.testing.assert_close(mean, dist.mean, **close)
        torch.testing.assert_close(logvar, dist.logvar, **close)
        torch.testing.assert_close(ours.vae.decode(mean), ref.vae.decode(mean).sample, **close)


def expected_config(kind):
    return {
        "sd1": ("sd1", "epsilon", False, 49407),
        "sd2": ("sd2", "epsilon", False, 0),
        "sd2v": ("sd2", "v_prediction", False, 0),
        "inpaint": ("sd1", "epsilon", True, 49407),
    }[kind]


def test_load_diffusers_folder(diffusers_folder):
    kind, folder = diffusers_folder
    ours = latentforge.load(folder, dtype="float32", device="cpu")
    version, prediction, inpainting, pad = expected_config(kind)
    assert ours.config.version == version
    assert ours.config.prediction_type == prediction and ours.config.inpainting == inpainting
    assert ours.conditioner.tokenizer.pad_id == pad
    assert_same_model(ours, reference(folder, kind))


def test_single_file_round_trip_and_diffusers_reads_it(diffusers_folder, tmp_path):
    kind, folder = diffusers_folder
    path = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), str(path)]) == 0
    tensors, _ = read_state_dict(path)
    text_key = {
        "sd1": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "inpaint": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "sd2v": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    }[kind]
    assert text_key in tensors and "model.diffusion_model.input_blocks.0.0.weight" in tensors

    ref = reference(folder, kind)
    ours = latentforge.load(path, dtype="float32", device="cpu")
    assert ours.config == latentforge.load(folder, device="cpu").config
    assert_same_model(ours, ref)

    # the file is a real original-layout checkpoint: diffusers' own single-file loader reads it
    cls = type(ref)
    from_single = cls.from_single_file(str(path), config=str(folder), local_files_only=True, safety_checker=None)
    assert_same_model(ours, from_single)


def test_single_file_to_diffusers_folder(diffusers_folder, tmp_path):
    kind, folder = diffusers_folder
    path = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), str(path)]) == 0
    assert main(["convert", str(path), str(tmp_path / "back")]) == 0
    back = reference(tmp_path / "back", kind)
    assert back.scheduler.config.prediction_type == expected_config(kind)[1]
    assert_same_model(latentforge.load(path, dtype="float32", device="cpu"), back)


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_convert_changes_dtype(sd1_folder, tmp_path, dtype, torch_dtype):
    folder = sd1_folder
    path = tmp_path / "half.safetensors"
    assert main(["convert", str(folder), str(path), "--dtype", dtype]) == 0
    tensors, _ = read_state_dict(path)
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    half = latentforge.load(path, dtype="float32", device="cpu")
    full = latentforge.load(folder, dtype="float32", device="cpu")
    ids = full.conditioner.tokenizer(PROMPTS)
    with torch.no_grad():
        got, want = half.conditioner.text_encoder(ids), full.conditioner.text_encoder(ids)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_load_in_lower_precision(sd1_folder):
    ours = latentforge.load(sd1_folder, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in ours.unet.parameters()} == {torch.bfloat16}
    cond, uncond = ours.encode_prompt(PROMPTS[0], PROMPTS[1])
    assert cond.context.dtype == uncond.context.dtype == torch.bfloat16


def test_convert_never_overwrites(sd1_folder, tmp_path, capsys):
    folder = sd1_folder
    dst = tmp_path / "taken.safetensors"
    dst.write_bytes(b"precious")
    assert main(["convert", str(folder), str(dst)]) == 2
    assert dst.read_bytes() == b"precious"
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1


def test_prediction_type_override(sd1_folder):
    assert latentforge.load(sd1_folder, device="cpu").config.prediction_type == "epsilon"
    pipe = latentforge.load(sd1_folder, device="cpu", prediction_type="v_prediction")
    assert pipe.config.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file and the cause


def test_broken_config_json(sd1_folder, tmp_path):
    import shutil

    folder = sd1_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "vae" / "config.json").write_text('{"block_out_channels": [32, 32,')
    with pytest.raises(CheckpointError, match=r"vae/config\.json: broken JSON") as e:
        latentforge.load(copy, device="cpu")
    assert "\n" not in str(e.value)


def test_wrong_architecture_single_file(sd1_folder, tmp_path):
    from latentforge.weightfiles import write_safetensors

    folder = sd1_folder
    good = tmp_path / "good.safetensors"
    assert main(["convert", str(folder), str(good)]) == 0
    tensors, metadata = read_state_dict(good)

    foreign = tmp_path / "sdxl.safetensors"  # weights of another architecture altogether
    write_safetensors({"conditioner.embedders.0.transformer.weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="sdxl.safetensors: unexpected weight 'conditioner"):
        latentforge.load(foreign, device="cpu")

    reshaped = dict(tensors)  # one tensor of the wrong shape
    key = "model.diffusion_model.out.2.weight"
    reshaped[key] = torch.zeros(5, *reshaped[key].shape[1:])
    write_safetensors(reshaped, tmp_path / "shape.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"shape.safetensors: unet weights .*'out.2.weight' has shape \(5,"):
        latentforge.load(tmp_path / "shape.safetensors", device="cpu")

    missing = {k: v for k, v in tensors.items() if "decoder.up.1.block.0.conv1" not in k}
    write_safetensors(missing, tmp_path / "missing.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing.safetensors: vae weights .*missing 'decoder.up.1.block.0.conv1"):
        latentforge.load(tmp_path / "missing.safetensors", device="cpu")

    unet_only = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    write_safetensors(unet_only, tmp_path / "unet_only.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"unet_only.safetensors: no vae weights"):
        latentforge.load(tmp_path / "unet_only.safetensors", device="cpu")


def test_cli_bad_file_is_one_line(tmp_path, capsys):
    lfs = tmp_path / "model.ckpt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n")
    assert main(["inspect", str(lfs)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.ckpt" in err and "LFS" in err


def strip_to_foreign_file(path, dst, fmt, global_step=None):
    """Rewrite a latentforge single file as anyone else's: no config metadata, safetensors or .ckpt."""
    from latentforge.weightfiles import write_safetensors

    tensors, _ = read_state_dict(path)
    if fmt == "safetensors":
        write_safetensors(tensors, dst)
    else:  # an LDM training checkpoint: weights under "state_dict", the step count beside them
        torch.save({"state_dict": tensors, "global_step": global_step, "epoch": 3}, dst)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_foreign_single_file_config_inferred_from_tensors(diffusers_folder, tmp_path, fmt):
    """Files without latentforge's metadata load by inferring every config from the tensors."""
    kind, folder = diffusers_folder
    ours_file = tmp_path / "ours.safetensors"
    assert main(["convert", str(folder), str(ours_file)]) == 0
    base_release = kind == "sd2"  # an SD 2.x file is told epsilon only by the base release's step count
    foreign = tmp_path / f"foreign.{fmt}"
    strip_to_foreign_file(ours_file, foreign, fmt, global_step=875000 if base_release else 470000)

    pipe = latentforge.load(foreign, dtype="float32", device="cpu")
    want = latentforge.load(folder, device="cpu").config
    got = pipe.config
    assert (got.version, got.inpainting, got.pad_token) == (want.version, want.inpainting, want.pad_token)
    assert got.vae == want.vae and got.text_encoder == want.text_encoder
    assert got.unet.__class__(**{**got.unet.__dict__, "sample_size": want.unet.sample_size}) == want.unet
    if fmt == "ckpt" or kind != "sd2":  # a safetensors SD 2.x file has no step count: taken as 768-v
        assert got.prediction_type == want.prediction_type
    else:
        assert got.prediction_type == "v_prediction" and got.native_size == 768
    assert_same_model(pipe, reference(folder, kind))


def test_diffusers_folder_with_bin_weights(sd1_folder, tmp_path):
    """Older diffusers folders hold pickled .bin weights; they load through the restricted unpickler."""
    import shutil

    folder = tmp_path / "bin"
    shutil.copytree(sd1_folder, folder)
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        tensors, _ = read_state_dict(folder / part / f"{stem}.safetensors")
        bin_name = "pytorch_model.bin" if part == "text_encoder" else f"{stem}.bin"
        torch.save(tensors, folder / part / bin_name)
        (folder / part / f"{stem}.safetensors").unlink()
    assert_same_model(latentforge.load(folder, dtype="float32", device="cpu"), reference(sd1_folder, "sd1"))


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):  # unpickling this would create the target file
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_malicious_checkpoint_never_runs(tmp_path, name, capsys):
    target = tmp_path / "pwned"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": _Payload(target)}}, tmp_path / name)
    with pytest.raises(CheckpointError, match="refuses to run code") as e:
        latentforge.load(tmp_path / name, device="cpu")
    assert name in str(e.value) and "\n" not in str(e.value)
    assert main(["inspect", str(tmp_path / name)]) == 2
    assert "refuses to run code" in capsys.readouterr().err
    assert not target.exists()


def test_cli_tokenize_prints_77_ids(capsys):
    assert main(["tokenize", "a photo of an astronaut riding a horse"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    ref = transformers_tokenizer()
    assert ids == ref("a photo of an astronaut riding a horse", padding="max_length", max_length=77).input_ids


def transformers_tokenizer():
    import tempfile

    import transformers

    from latentforge.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        Tokenizer().save_pretrained(folder)
        return transformers.CLIPTokenizer.from_pretrained(folder)


def test_cli_inspect(diffusers_folder, capsys):
    kind, folder = diffusers_folder
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    version, prediction, inpainting, _ = expected_config(kind)
    assert f"diffusers folder, {version}{' inpainting' if inpainting else ''}, {prediction}" in out
    assert "unet:" in out and "vae:" in out and "text_encoder:" in out
