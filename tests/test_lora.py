"""LoRA files: the images equal diffusers' `load_lora_weights` of the same file (kohya linear and LoCon, with and
without alpha, two stacked, text-encoder-only, UNet-only, SDXL, PEFT), switching restores the weights bit for
bit, and bad files or tags are one line each with nothing applied."""

import pickle

import diffusers
import numpy as np
import pytest
import torch

import latentforge
from conftest import saved_folder
from latentforge.adapters.library import Library, split_tags
from latentforge.adapters.names import kohya_name, patchable_modules
from latentforge.cli import main
from latentforge.layouts import unet_to_diffusers
from latentforge.weightfiles import CheckpointError, read_state_dict, write_safetensors
from test_sdxl import saved_sdxl

PROMPT, NEGATIVE = "a small red circle on the left, white background", "blurry"
MAX_DIFF = 2  # out of 255
STEPS, SEED = 4, 1234
ATTENTION = ("attn1", "attn2", "proj_in", "proj_out", "ff.")  # kohya's default targets in the UNet
RESNET = ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", ".op", "conv")  # LoCon adds these


def targets(pipe, part: str, locon: bool) -> dict:
    """Our module name -> module for the layers a kohya LoRA (or LoCon) trains in `part`."""
    found = patchable_modules(pipe.models()[part])
    if part != "unet":  # kohya trains the attention and MLP layers of each text-encoder block
        return {name: m for name, m in found.items() if name.startswith("encoder.layers.")}
    wanted = ATTENTION + (RESNET if locon else ())
    return {name: m for name, m in found.items() if any(w in name for w in wanted) and "time_embed" not in name}


def kohya_lora(pipe, parts=("text_encoder", "unet"), locon=False, alpha=2.0, rank=4, seed=0, ldm=False) -> dict:
    """Random kohya-format factors for `parts` of `pipe` (diffusers-style UNet names, or LDM ones with `ldm`)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for part in parts:
        for name, module in targets(pipe, part, locon).items():
            weight = module.weight
            key = kohya_name(part, name, pipe.config.unet, ldm=ldm)
            conv = weight.dim() == 4
            down_shape = (rank, weight.shape[1], *weight.shape[2:]) if conv else (rank, weight.shape[1])
            sd[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.2
            sd[f"{key}.lora_up.weight"] = torch.randn((weight.shape[0], rank, *([1, 1] if conv else [])), generator=g) * 0.2
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def save(sd, folder, name):
    path = folder / f"{name}.safetensors"
    write_safetensors(sd, path)
    return path


def pixels(image):
    return np.asarray(image).astype(np.int16)


def assert_same_image(ours, theirs):
    diff = np.abs(pixels(ours) - pixels(theirs)).max()
    assert diff <= MAX_DIFF, f"max pixel difference {diff} > {MAX_DIFF}"


def differ(a, b):
    return np.abs(pixels(a) - pixels(b)).max() > 10


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = saved_folder("sd1", tmp_path_factory)
    ours = latentforge.load(folder, dtype="float32", device="cpu")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ours, ref, tmp_path_factory.mktemp("loras")


def reference_image(ref, files_weights, prompt=PROMPT, negative=NEGATIVE):
    """diffusers' image with each (file, weight) loaded by its own load_lora_weights, then unloaded."""
    names = []
    for i, (path, _) in enumerate(files_weights):
        ref.load_lora_weights(str(path), adapter_name=f"a{i}")
        names.append(f"a{i}")
    ref.set_adapters(names, adapter_weights=[w for _, w in files_weights])
    try:
        return ref(
            prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.0,
            generator=torch.Generator().manual_seed(SEED),
        ).images[0]  # fmt: skip
    finally:
        ref.unload_lora_weights()
        ref.delete_adapters(names)


def ours_image(ours, loras, prompt=PROMPT, negative=NEGATIVE):
    return ours.generate(prompt, negative, steps=STEPS, sampler="Euler", seed=SEED, loras=loras)[0]


CASES = {
    "linear with alpha": dict(alpha=2.0),
    "linear without alpha": dict(alpha=None),
    "LoCon": dict(locon=True, alpha=1.0),
    "text encoder only": dict(parts=("text_encoder",)),
    "UNet only": dict(parts=("unet",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kohya_file_matches_diffusers(sd1, case):
    ours, ref, folder = sd1
    path = save(kohya_lora(ours, **CASES[case]), folder, case.replace(" ", "_"))
    base = ours_image(ours, {})
    image = ours_image(ours, {path: 0.8})
    assert differ(image, base), "the LoRA changed nothing"
    assert_same_image(image, reference_image(ref, [(path, 0.8)]))


def test_two_loras_stacked_with_different_weights(sd1):
    ours, ref, folder = sd1
    first = save(kohya_lora(ours, seed=1), folder, "first")
    second = save(kohya_lora(ours, locon=True, seed=2, alpha=4.0), folder, "second")
    image = ours_image(ours, {first: 0.7, second: -0.4})
    assert differ(image, ours_image(ours, {first: 0.7}))
    assert_same_image(image, reference_image(ref, [(first, 0.7), (second, -0.4)]))


def test_peft_file_matches_diffusers(sd1):
    """diffusers' own PEFT naming (unet.<diffusers path>.lora_A / lora_B, text_encoder.text_model...)."""
    ours, ref, folder = sd1
    kohya = kohya_lora(ours)
    sd = {}
    for part in ("text_encoder", "unet"):
        for name, module in targets(ours, part, False).items():
            key = kohya_name(part, name, ours.config.unet)
            path = (
                next(iter(unet_to_diffusers({name + ".weight": 0}, ours.config.unet))).removesuffix(".weight")
                if part == "unet"
                else "text_model." + name
            )
            sd[f"{part}.{path}.lora_A.weight"] = kohya[f"{key}.lora_down.weight"]
            sd[f"{part}.{path}.lora_B.weight"] = kohya[f"{key}.lora_up.weight"]
    path = save(sd, folder, "peft")
    image = ours_image(ours, {path: 1.0})
    assert differ(image, ours_image(ours, {}))
    assert_same_image(image, reference_image(ref, [(path, 1.0)]))
    # the same factors under kohya names without alpha are the same network
    assert_same_image(image, ours_image(ours, {save(kohya_lora(ours, alpha=None), folder, "same"): 1.0}))


def test_separate_text_encoder_and_unet_weights(sd1):
    ours, _, folder = sd1
    path = save(kohya_lora(ours, seed=3), folder, "split")
    te_only = ours_image(ours, {path: (1.0, 0.0)})
    unet_only = ours_image(ours, {path: (0.0, 1.0)})
    te_file = save(kohya_lora(ours, parts=("text_encoder",), seed=3), folder, "te_part")
    assert np.array_equal(pixels(te_only), pixels(ours_image(ours, {te_file: 1.0})))
    assert differ(te_only, unet_only)


def test_prompt_tags_are_looked_up_in_the_library_and_not_encoded(sd1, tmp_path):
    ours, _, _ = sd1
    path = save(kohya_lora(ours, seed=4), tmp_path, "shapes_v2")
    ours.library = Library.from_dirs([tmp_path])
    try:
        tagged = ours.generate(f"{PROMPT} <lora:shapes_v2:0.6>", NEGATIVE, steps=STEPS, sampler="Euler", seed=SEED)[0]
        split = ours.generate(PROMPT, NEGATIVE, steps=STEPS, sampler="Euler", seed=SEED, loras={path: 0.6})[0]
        assert np.array_equal(pixels(tagged), pixels(split))
        info = tagged.info["parameters"]
        assert info.startswith(f"{PROMPT} <lora:shapes_v2:0.6>\n")  # the infotext keeps the prompt as written
        assert 'Lora hashes: "shapes_v2: ' in info
        named = ours.generate(f"<lora:shapes_v2:te=0.6:unet=0.6>{PROMPT}", NEGATIVE, steps=STEPS, sampler="Euler", seed=SEED)
        assert np.array_equal(pixels(named[0]), pixels(split))
    finally:
        ours.library = Library()
        ours.use_loras({})


def test_switching_restores_the_weights_bit_for_bit(sd1, tmp_path_factory):
    ours, _, folder = sd1
    fresh = latentforge.load(saved_folder("sd1", tmp_path_factory), dtype="float32", device="cpu")
    ours.use_loras({save(kohya_lora(ours, locon=True, seed=5), folder, "a"): 1.0})
    ours.use_loras({save(kohya_lora(ours, seed=6), folder, "b"): -2.0})
    fresh.use_loras({folder / "b.safetensors": -2.0})  # switching a -> b is b alone
    for part, model in fresh.models().items():
        theirs = ours.models()[part].state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items()), part
    fresh.use_loras({})
    ours.use_loras({})
    for part, model in fresh.models().items():
        theirs = ours.models()[part].state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(theirs[key], value), f"{part}.{key} differs after restoring"


def test_bfloat16_model_restores_bit_for_bit(sd1):
    ours, _, folder = sd1
    pipe = latentforge.load(ours.source, dtype="bfloat16", device="cpu")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.use_loras({save(kohya_lora(ours, seed=7), folder, "bf"): 1.0})
    assert any(not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    pipe.use_loras({})
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


# --- SDXL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = saved_sdxl(tmp_path_factory.mktemp("sdxl"))
    ours = latentforge.load(folder, dtype="float32", device="cpu")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ours, ref, tmp_path_factory.mktemp("sdxl-loras")


@pytest.mark.parametrize("locon", [False, True])
def test_sdxl_kohya_file_matches_diffusers(sdxl, locon):
    """SDXL kohya files: LDM-named UNet modules, lora_te1_ / lora_te2_ for the two text encoders."""
    ours, ref, folder = sdxl
    sd = kohya_lora(ours, parts=("text_encoder", "text_encoder_2", "unet"), locon=locon, ldm=True, seed=8)
    assert any(k.startswith("lora_te2_") for k in sd) and any(k.startswith("lora_unet_input_blocks") for k in sd)
    path = save(sd, folder, f"xl{int(locon)}")
    image = ours_image(ours, {path: 0.9})
    assert differ(image, ours_image(ours, {}))
    assert_same_image(image, reference_image(ref, [(path, 0.9)]))


# --- bad input: one line, nothing applied ------------------------------------------------------------


def untouched(pipe, before):
    return all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_sdxl_lora_on_sd15_is_refused(sd1, sdxl):
    ours, _, folder = sd1
    xl, _, _ = sdxl
    path = save(kohya_lora(xl, parts=("text_encoder", "text_encoder_2", "unet"), ldm=True), folder, "xl_on_15")
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match="another model family") as info:
        ours.use_loras({path: 1.0})
    assert "\n" not in str(info.value)
    assert untouched(ours, before)


def test_keys_matching_nothing_are_listed(sd1):
    ours, _, folder = sd1
    sd = kohya_lora(ours, parts=("text_encoder",))
    sd["lora_unet_no_such_block_proj.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_no_such_block_proj.lora_up.weight"] = torch.zeros(8, 4)
    path = save(sd, folder, "lost")
    with pytest.raises(CheckpointError, match="1 of its .* modules match nothing.*lora_unet_no_such_block_proj"):
        ours.use_loras({path: 1.0})


def test_nan_and_unknown_keys_and_incomplete_modules(sd1):
    ours, _, folder = sd1
    sd = kohya_lora(ours, parts=("text_encoder",))
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        ours.use_loras({save(sd, folder, "nan"): 1.0})
    with pytest.raises(CheckpointError, match="model checkpoint, not a LoRA"):
        ours.use_loras({save({"model.diffusion_model.x.weight": torch.zeros(2)}, folder, "ckpt"): 1.0})
    with pytest.raises(CheckpointError, match="not a LoRA / LyCORIS file: keys such as 'x.bias'"):
        ours.use_loras({save({"x.bias": torch.zeros(2), "x.weight": torch.zeros(2)}, folder, "plain"): 1.0})
    half = {k: v for k, v in kohya_lora(ours, parts=("text_encoder",)).items() if not k.endswith("lora_up.weight")}
    with pytest.raises(CheckpointError, match="incomplete"):
        ours.use_loras({save(half, folder, "half"): 1.0})


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_lora_asking_for_a_global_is_refused(sd1, capsys):
    ours, _, folder = sd1
    path = folder / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"lora_te_x.lora_down.weight": Evil()}, f)
    with pytest.raises(CheckpointError) as info:
        ours.use_loras({path: 1.0})
    assert "pwned" not in capsys.readouterr().out
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "tag, message",
    [
        ("<lora:missing:1>", "no LoRA named 'missing'"),
        ("<lora:../secret:1>", "not a name"),
        ("<lora:..\\secret:1>", "not a name"),
        ("<lora:x:heavy>", "not a number"),
        ("<lora:x:1:2:3>", "not a LoRA tag"),
        ("<hypernet:x:1>", "kind of network"),
    ],
)
def test_bad_tags_are_one_line(sd1, tmp_path, tag, message):
    ours, _, _ = sd1
    ours.library = Library.from_dirs([tmp_path])
    try:
        with pytest.raises(ValueError, match=message) as info:
            ours.generate(f"{PROMPT} {tag}", steps=1)
        assert "\n" not in str(info.value)
    finally:
        ours.library = Library()


def test_split_tags():
    assert split_tags("a <lora:x:0.5> b <lyco:y:1:0.25>") == (
        "a  b ",
        [split_tags("<lora:x:0.5>")[1][0], split_tags("<lora:y:1:0.25>")[1][0]],
    )
    assert split_tags("<lora:x>")[1][0].te == 1.0
    tag = split_tags("<lora:x:0.5>")[1][0]
    assert (tag.te, tag.unet) == (0.5, 0.5)
    tag = split_tags("<lora:x:0.5:unet=0>")[1][0]
    assert (tag.te, tag.unet) == (0.5, 0.0)


def test_cli_lora_and_dir(sd1, tmp_path, monkeypatch, capsys):
    ours, _, _ = sd1
    path = save(kohya_lora(ours, seed=9), tmp_path, "cli_lora")
    monkeypatch.chdir(tmp_path)
    common = ["generate", PROMPT, "--model", str(ours.source), "--steps", "2", "--seed", "3", "--dtype", "float32"]
    assert main([*common, "--lora", f"{path}:0.5", "--out", "a"]) == 0
    assert main([common[0], f"{PROMPT} <lora:cli_lora:0.5>", *common[2:], "--lora-dir", str(tmp_path), "--out", "b"]) == 0
    a, b = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    from PIL import Image

    assert np.array_equal(pixels(Image.open(a[0])), pixels(Image.open(b[0])))
    assert main([*common, "--lora", str(tmp_path / "nope.safetensors"), "--out", "c"]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_pt_file_and_older_diffusers_spellings_are_the_same_network(sd1):
    """A kohya dict saved with torch.save (.pt), and diffusers' older `lora.down` / `lora.up` and attention-
    processor (`processor.to_q_lora`) spellings, give the image of the kohya .safetensors file."""
    ours, _, folder = sd1
    kohya = kohya_lora(ours, seed=12, alpha=None)
    want = ours_image(ours, {save(kohya, folder, "spell_ref"): 1.0})
    torch.save(kohya, folder / "spell.pt")
    assert np.array_equal(pixels(ours_image(ours, {folder / "spell.pt": 1.0})), pixels(want))
    older = {}
    for part in ("text_encoder", "unet"):
        for name in targets(ours, part, False):
            key = kohya_name(part, name, ours.config.unet)
            path = (
                next(iter(unet_to_diffusers({name + ".weight": 0}, ours.config.unet))).removesuffix(".weight")
                if part == "unet"
                else "text_model." + name
            )
            for ours_suffix, theirs in (("lora_down", "down"), ("lora_up", "up")):
                spelled = f"{part}.{path}.lora.{theirs}.weight"
                for proj in ("to_q", "to_k", "to_v"):  # the attention-processor form for these
                    if path.endswith(f".{proj}") and part == "unet":
                        spelled = f"unet.{path.removesuffix('.' + proj)}.processor.{proj}_lora.{theirs}.weight"
                older[spelled] = kohya[f"{key}.{ours_suffix}.weight"]
    assert any(".processor.to_q_lora." in k for k in older)
    assert np.array_equal(pixels(ours_image(ours, {save(older, folder, "older"): 1.0})), pixels(want))


def test_text_encoders_on_demand_get_the_lora_again(sd1, tmp_path_factory):
    """Text encoders read again from the file for each prompt get the merged network's changes again."""
    ours, _, folder = sd1
    path = save(kohya_lora(ours, seed=13, parts=("text_encoder",)), folder, "on_demand")
    want = ours_image(ours, {path: 0.9})
    lean = latentforge.load(ours.source, dtype="float32", device="cpu")
    lean.text_encoders_on_demand = True
    for _ in range(2):  # the second prompt is encoded by text encoders read again
        assert np.array_equal(pixels(ours_image(lean, {path: 0.9})), pixels(want))
    lean.use_loras({})
    assert np.array_equal(pixels(ours_image(lean, {})), pixels(ours_image(ours, {})))


def test_lora_saved_by_diffusers_keeps_its_alpha(sd1, tmp_path):
    """A LoRA that diffusers loads and saves again (PEFT keys, its LoraConfig in the file's metadata: lora_alpha
    2 over rank 4, per part) is the same network as the kohya file it came from; broken metadata is one line."""
    from peft.utils import get_peft_model_state_dict

    ours, ref, folder = sd1
    kohya = save(kohya_lora(ours, alpha=2.0, seed=14), folder, "to_resave")
    ref.load_lora_weights(str(kohya), adapter_name="k")
    try:
        ref.save_lora_weights(
            tmp_path, unet_lora_layers=get_peft_model_state_dict(ref.unet, adapter_name="k"),
            text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder, adapter_name="k"),
            unet_lora_adapter_metadata=ref.unet.peft_config["k"].to_dict(),
            text_encoder_lora_adapter_metadata=ref.text_encoder.peft_config["k"].to_dict(),
        )  # fmt: skip
    finally:
        ref.unload_lora_weights()
        ref.delete_adapters(["k"])
    resaved = tmp_path / "pytorch_lora_weights.safetensors"
    want = ours_image(ours, {kohya: 1.0})
    assert differ(want, ours_image(ours, {}))
    assert np.array_equal(pixels(ours_image(ours, {resaved: 1.0})), pixels(want))
    tensors, _ = read_state_dict(resaved)
    broken = tmp_path / "broken.safetensors"
    write_safetensors(dict(tensors), broken, metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(CheckpointError, match="lora_adapter_metadata metadata is not a JSON object"):
        ours.use_loras({broken: 1.0})


def test_inspect_says_which_add_on_a_file_is(sd1, tmp_path, capsys):
    ours, _, folder = sd1
    path = save(kohya_lora(ours, locon=True, rank=3), folder, "inspected")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a LoRA / LyCORIS network" in out and "rank up to 3" in out and "text_encoder, unet" in out
    embedding = tmp_path / "emb.safetensors"
    write_safetensors({"emb_params": torch.zeros(2, 128)}, embedding)
    assert main(["inspect", str(embedding)]) == 0
    assert "textual-inversion embedding 'emb': text_encoder (2, 128)" in capsys.readouterr().out
    vae = tmp_path / "vae.safetensors"
    write_safetensors({f"first_stage_model.{k}": v for k, v in ours.vae.state_dict().items()}, vae)
    assert main(["inspect", str(vae)]) == 0
    assert "a VAE: 4 latent channels" in capsys.readouterr().out
    junk = tmp_path / "junk.safetensors"
    write_safetensors({"x.y": torch.zeros(2), "x.z": torch.zeros(2)}, junk)
    assert main(["inspect", str(junk)]) == 2
    assert "not a Stable Diffusion" in capsys.readouterr().err


def test_the_shipped_star_lora_loads_in_diffusers_with_the_same_image(tmp_path):
    """The LoRA the package ships (trained here, see docs/lora-training.md) is a kohya file that diffusers'
    load_lora_weights reads into the shipped model (written as a diffusers folder) with latentforge's image."""
    from latentforge.checkpoints import read_checkpoint, write_diffusers
    from latentforge.pipeline import DEFAULT_MODEL, shipped_tokenizer

    star = DEFAULT_MODEL.parent / "lora" / "star.safetensors"
    _, metadata = read_state_dict(star)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    config, parts = read_checkpoint(DEFAULT_MODEL)
    write_diffusers(config, dict(parts), tmp_path / "shipped", shipped_tokenizer(config))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "shipped", safety_checker=None, local_files_only=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = latentforge.load(dtype="float32", device="cpu")
    prompt = "a large red star on the left, white background"
    image = ours.generate(prompt, steps=8, sampler="Euler", cfg_scale=3, seed=5, loras={star: 1.0})[0]
    assert differ(image, ours.generate(prompt, steps=8, sampler="Euler", cfg_scale=3, seed=5)[0])
    ref.load_lora_weights(str(star))
    want = ref(prompt, num_inference_steps=8, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert_same_image(image, want)


def test_at_most_a_few_placed_files_are_kept(sd1, monkeypatch):
    """A server that meets many LoRAs keeps only the last KEEP_PLACED read; a dropped one is read again."""
    from latentforge.adapters import addons as addons_module

    ours, _, folder = sd1
    monkeypatch.setattr(addons_module, "KEEP_PLACED", 2)
    paths = [save(kohya_lora(ours, parts=("text_encoder",), seed=20 + i), folder, f"kept{i}") for i in range(3)]
    reads = []
    real = addons_module.read_lora
    monkeypatch.setattr(addons_module, "read_lora", lambda path: reads.append(path.name) or real(path))
    try:
        for path in [*paths, paths[2], paths[0]]:
            ours.use_loras({path: 1.0})
    finally:
        ours.use_loras({})
    assert reads == ["kept0.safetensors", "kept1.safetensors", "kept2.safetensors", "kept0.safetensors"]
    assert len(ours.addons.placed) == 2


def test_lcm_lora_recipe_matches_diffusers(sd1):
    """Few-step sampling as LCM-LoRA users run it: a UNet-only LoCon file (LCM-LoRA's layout: attention, ResNet
    and sampling convolutions), the LCM sampler, 4 steps, guidance 1: the image equals diffusers'
    load_lora_weights + LCMScheduler at guidance_scale 1."""
    ours, ref, folder = sd1
    path = save(kohya_lora(ours, parts=("unet",), locon=True, alpha=4.0, seed=5), folder, "lcm_shaped")
    image = ours.generate(PROMPT, steps=4, sampler="LCM", cfg_scale=1.0, seed=SEED, loras={path: 1.0})[0]
    lcm = diffusers.StableDiffusionPipeline(**ref.components)
    lcm.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    lcm.set_progress_bar_config(disable=True)
    lcm.load_lora_weights(str(path), adapter_name="lcm")
    try:
        want = lcm(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(SEED)).images[0]
    finally:
        lcm.unload_lora_weights()
        lcm.delete_adapters(["lcm"])
    assert differ(image, ours.generate(PROMPT, steps=4, sampler="LCM", cfg_scale=1.0, seed=SEED)[0])
    assert_same_image(image, want)
