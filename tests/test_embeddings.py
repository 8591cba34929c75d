"""Textual-inversion embeddings: every file format reads safely, prompts use them as diffusers'
load_textual_inversion does (prompt vectors and a whole image, tiny random SD 1.x and SDXL), and A1111's rules
hold (name matched by its token ids, emphasis, whole at a chunk boundary); bad files and misfits are one line."""

import dataclasses
import json
import os

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import latentforge
from conftest import CONTEXT
from latentforge.adapters.embeddings import Embedding, embedding_problem, read_embedding, vectors_for
from latentforge.conditioning import RefinerConditioner
from latentforge.prompts import _apply_weights, chunk_prompt, embeddings_in, encode_prompt
from latentforge.samplers import DIFFUSERS_SCHEDULERS
from latentforge.weightfiles import CheckpointError, read_pickle, read_state_dict
from test_sdxl import WIDTH_G, WIDTH_L, saved_sdxl

VOCAB = 49408
MAX_DIFF = 2  # out of 255
# Names that the CLIP BPE splits into several tokens: found by their token sequence, not as one token.
ONE, THREE = "zorblaxquux", "qwxzplim-v2"
TEXT = "a photo of {}, on green grass"
NEGATIVE = "blurry {} ugly"


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    """(n, width) random vectors at the scale of the tiny models' token vectors, and clearly not one of them."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


def a1111_pt(path, tensor: torch.Tensor):
    """An A1111 .pt embedding as its trainer saves it (a nested dict with training metadata)."""
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": "something-else",
         "step": 1500, "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "tiny"},
        path,
    )  # fmt: skip
    return path


def a1111_safetensors(path, tensor: torch.Tensor):
    save_file({"emb_params": tensor.contiguous()}, str(path))
    return path


WRITERS = {"pt": a1111_pt, "safetensors": a1111_safetensors}


# --------------------------------------------------------------------------- SD 1.x against diffusers


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return latentforge.load(sd1_folder, dtype="float32", device="cpu")


def diffusers_sd1(folder, embeddings: dict[str, str], scheduler: str | None = None):
    """A fresh diffusers pipeline of the folder with each embedding file loaded under its token."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    if scheduler:
        cls, options = DIFFUSERS_SCHEDULERS[scheduler]
        ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **options)
    ref.set_progress_bar_config(disable=True)
    for token, path in embeddings.items():
        ref.load_textual_inversion(str(path), token=token)
    return ref


@pytest.fixture
def with_embeddings(sd1):
    """Our SD 1.x pipeline, its conditioner's embeddings set for the test and emptied after it."""
    yield sd1
    sd1.conditioner.embeddings = {}


def test_names_split_into_several_tokens(sd1):
    tokenizer = sd1.conditioner.tokenizer
    assert len(tokenizer.encode(ONE)) == 5 and len(tokenizer.encode(THREE)) == 8


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("n", [1, 3])
def test_prompt_vectors_match_diffusers(with_embeddings, sd1_folder, tmp_path, fmt, n):
    name = ONE if n == 1 else THREE
    path = WRITERS[fmt](tmp_path / f"{name}.{fmt}", vectors(n, CONTEXT, seed=n))
    embedding = read_embedding(path)
    assert embedding.name == name and embedding.vectors["text_encoder"].shape == (n, CONTEXT)
    ref = diffusers_sd1(sd1_folder, {"<tok>": path})

    plain, _ = with_embeddings.encode_prompt(TEXT.format(name), None)  # no embeddings: the name is text
    with_embeddings.conditioner.embeddings = {name: embedding}
    cond, uncond = with_embeddings.encode_prompt(TEXT.format(name), NEGATIVE.format(name))
    want, want_negative = ref.encode_prompt(
        TEXT.format("<tok>"), device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=NEGATIVE.format("<tok>"),
    )  # fmt: skip
    torch.testing.assert_close(cond.context, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.context, want_negative, atol=1e-5, rtol=1e-5)
    assert (plain.context - cond.context).abs().max() > 1e-2  # the vectors, not the name's tokens, were read
    # our slots carry the ids diffusers gives its added tokens here: the vocabulary size on
    ids = chunk_prompt(with_embeddings.conditioner.tokenizer, TEXT.format(name), embeddings={name: n}).ids
    theirs = ref.tokenizer(ref.maybe_convert_prompt(TEXT.format("<tok>"), ref.tokenizer), padding="max_length")
    assert ids[0].tolist() == theirs.input_ids and ids[0, 4:4 + n].tolist() == list(range(VOCAB, VOCAB + n))


def test_image_matches_diffusers(with_embeddings, sd1_folder, tmp_path):
    one = a1111_pt(tmp_path / f"{ONE}.pt", vectors(1, CONTEXT, seed=5))
    three = a1111_safetensors(tmp_path / f"{THREE}.safetensors", vectors(3, CONTEXT, seed=6))
    ref = diffusers_sd1(sd1_folder, {"<one>": one, "<three>": three}, scheduler="Euler")
    with_embeddings.conditioner.embeddings = {e.name: e for e in map(read_embedding, (one, three))}
    prompt, negative = f"{THREE} red circle, ({ONE}:1.0)", NEGATIVE.format(ONE)
    image = with_embeddings.generate(prompt, negative_prompt=negative, steps=6, sampler="Euler", cfg_scale=7.5,
                                     seed=21)[0]  # fmt: skip
    want = ref(
        "<three> red circle, <one>", negative_prompt=NEGATIVE.format("<one>"), num_inference_steps=6,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(21),
    ).images[0]  # fmt: skip
    diff = np.abs(np.asarray(image).astype(int) - np.asarray(want).astype(int)).max()
    assert diff <= MAX_DIFF, f"max pixel difference {diff} > {MAX_DIFF}"
    with_embeddings.conditioner.embeddings = {}
    without = with_embeddings.generate(prompt, negative_prompt=negative, steps=6, sampler="Euler", seed=21)[0]
    assert np.abs(np.asarray(without).astype(int) - np.asarray(want).astype(int)).max() > 4 * MAX_DIFF


# --------------------------------------------------------------------------- A1111's prompt rules


def embedding(name: str, n: int, width: int = CONTEXT, seed: int = 0, **more: torch.Tensor) -> Embedding:
    return Embedding(name, {"text_encoder": vectors(n, width, seed), **more}, path=f"{name}.pt")


def test_emphasis_weights_the_embeddings_slots(sd1):
    encoder, tokenizer = sd1.conditioner.text_encoder, sd1.conditioner.tokenizer
    table = {THREE: vectors(3, CONTEXT, seed=1)}
    chunks = chunk_prompt(tokenizer, f"a ({THREE}:1.3) cat", embeddings={THREE: 3})
    assert chunks.ids[0, 2:5].tolist() == [VOCAB, VOCAB + 1, VOCAB + 2]
    assert chunks.weights[0, :7].tolist() == pytest.approx([1, 1, 1.3, 1.3, 1.3, 1, 1])
    with torch.no_grad():
        plain = encode_prompt(encoder, tokenizer, f"a {THREE} cat", embeddings=table)
        weighted = encode_prompt(encoder, tokenizer, f"a ({THREE}:1.3) cat", embeddings=table)
    torch.testing.assert_close(weighted, _apply_weights(plain, chunks.weights), atol=1e-6, rtol=1e-6)
    assert (weighted - plain).abs().max() > 1e-3


def test_an_embedding_that_does_not_fit_opens_the_next_chunk(sd1):
    encoder, tokenizer = sd1.conditioner.text_encoder, sd1.conditioner.tokenizer
    a, slots = tokenizer.encode("a")[0], [VOCAB, VOCAB + 1, VOCAB + 2]
    fits = chunk_prompt(tokenizer, "a " * 72 + THREE, embeddings={THREE: 3})
    assert fits.n_chunks == 1 and fits.ids[0, 73:76].tolist() == slots
    moved = chunk_prompt(tokenizer, "a " * 73 + THREE + " a", embeddings={THREE: 3})
    assert moved.n_chunks == 2
    assert moved.ids[0, 1:75].tolist() == [a] * 73 + [tokenizer.eos_id]  # closed early, padded
    assert moved.ids[1, 1:6].tolist() == [*slots, a, tokenizer.eos_id]  # whole, at the start of the next
    table = {THREE: vectors(3, CONTEXT, seed=2)}
    with torch.no_grad():
        out = encode_prompt(encoder, tokenizer, "a " * 73 + THREE + " a", embeddings=table)
        alone = encode_prompt(encoder, tokenizer, f"{THREE} a", embeddings=table)
    torch.testing.assert_close(out[:, 77:], alone)
    # the comma rule moves an embedding whole, keeping its vectors
    backtracked = chunk_prompt(tokenizer, "a " * 70 + ", " + THREE + " a a", embeddings={THREE: 3})
    assert backtracked.ids[1, 1:7].tolist() == [*slots, a, a, tokenizer.eos_id]


def test_names_match_by_token_sequence_longest_first_ignoring_case(sd1):
    tokenizer = sd1.conditioner.tokenizer
    names = {"blorp": 1, "blorp zing": 2}  # the second's tokens start with the first's
    chunks = chunk_prompt(tokenizer, "a BLORP zing, Blorp", embeddings=names)
    assert chunks.ids[0, 1:7].tolist() == [tokenizer.encode("a")[0], VOCAB + 1, VOCAB + 2,
                                           tokenizer.encode(",")[0], VOCAB, tokenizer.eos_id]  # fmt: skip
    assert embeddings_in(tokenizer, "x (blorp:1.2) BREAK blorp zing, blorp", names) == ["blorp", "blorp zing"]
    assert embeddings_in(tokenizer, "blorpy zin", names) == []
    assert embeddings_in(tokenizer, f"a {ONE}", {ONE: None, THREE: None}) == [ONE]


def test_text_encoder_without_embeddings_is_unchanged(sd1):
    encoder, tokenizer = sd1.conditioner.text_encoder, sd1.conditioner.tokenizer
    ids = tokenizer(["a red circle"])
    with torch.no_grad():
        assert torch.equal(encoder(ids), encoder(ids, extra=vectors(2, CONTEXT, seed=3)))
        assert torch.equal(encode_prompt(encoder, tokenizer, "a red circle", embeddings={}), encoder(ids))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 49410\)"):
        encoder(torch.full((1, 3), VOCAB + 2), extra=vectors(2, CONTEXT, seed=3))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        encoder(torch.full((1, 3), VOCAB))


def test_too_many_vectors_for_a_chunk(sd1):
    with pytest.raises(ValueError, match="'big' has 76 vectors; a prompt chunk holds 1 to 75"):
        chunk_prompt(sd1.conditioner.tokenizer, "big", embeddings={"big": 76})


# --------------------------------------------------------------------------- SDXL and its refiner


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = saved_sdxl(tmp_path_factory.mktemp("sdxl-ti"))
    return folder, latentforge.load(folder, dtype="float32", device="cpu")


def test_sdxl_embedding_matches_diffusers(sdxl, tmp_path):
    folder, ours = sdxl
    clip_l, clip_g = vectors(2, WIDTH_L, seed=7), vectors(2, WIDTH_G, seed=8)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / f"{THREE}.safetensors"))
    loaded = read_embedding(tmp_path / f"{THREE}.safetensors")
    assert torch.equal(loaded.vectors["text_encoder"], clip_l) and torch.equal(loaded.vectors["text_encoder_2"], clip_g)
    assert embedding_problem(loaded, ours.conditioner.models()) is None

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    ref.load_textual_inversion(clip_l, token="<tok>", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(clip_g, token="<tok>", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    ours.conditioner.embeddings = {THREE: loaded}
    try:
        cond, uncond = ours.encode_prompt(TEXT.format(THREE), NEGATIVE.format(THREE), size=(64, 64))
        refiner = RefinerConditioner(ours.conditioner.tokenizer_2, ours.conditioner.text_encoder_2,
                                     ours.conditioner.size_embed_dim, embeddings={THREE: loaded})  # fmt: skip
        assert embedding_problem(loaded, refiner.models()) is None
        refined, _ = refiner(TEXT.format(THREE), NEGATIVE.format(THREE), clip_skip=1, size=(64, 64))
    finally:
        ours.conditioner.embeddings = {}
    embeds, negative, pooled, negative_pooled = ref.encode_prompt(
        TEXT.format("<tok>"), device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=NEGATIVE.format("<tok>"),
    )  # fmt: skip
    torch.testing.assert_close(cond.context, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.context, negative, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.vector[:, :WIDTH_G], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.vector[:, :WIDTH_G], negative_pooled, atol=1e-5, rtol=1e-5)
    # the refiner's bigG reads the clip_g vectors: its context is SDXL's bigG half, its pooled text SDXL's
    torch.testing.assert_close(refined.context, cond.context[..., WIDTH_L:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(refined.vector[:, :WIDTH_G], pooled, atol=1e-5, rtol=1e-5)


def test_misfits_are_named(sd1, sdxl):
    sdxl_one = embedding("style", 2, WIDTH_L, text_encoder_2=vectors(2, WIDTH_G, seed=1))
    assert embedding_problem(sdxl_one, sd1.conditioner.models()) == (
        f"'style' is an SDXL embedding (clip_l {WIDTH_L} + clip_g {WIDTH_G}) and this model is SD 1.x/2.x "
        f"(text width {CONTEXT}): use an embedding made for SD 1.x/2.x"
    )
    sdxl_models = sdxl[1].conditioner.models()
    assert embedding_problem(embedding("old", 1, WIDTH_L), sdxl_models) == (
        f"'old' is an SD 1.x/2.x embedding ({WIDTH_L} wide) and this model is SDXL (clip_l {WIDTH_L} + "
        f"clip_g {WIDTH_G}): use an embedding made for SDXL"
    )
    assert embedding_problem(embedding("wide", 1, 96), sd1.conditioner.models()) == (
        f"'wide' has 96-wide vectors; this model's text encoder is {CONTEXT} wide: "
        "use an embedding made for this model's family"
    )
    narrow_g = embedding("g", 1, WIDTH_L, text_encoder_2=vectors(1, 48, seed=1))
    assert "'g' has 48-wide vectors (clip_g)" in embedding_problem(narrow_g, sdxl_models)
    refiner_models = {"text_encoder": sdxl_models["text_encoder_2"]}
    assert "the SDXL refiner (clip_g 64)" in embedding_problem(embedding("old", 1, WIDTH_G), refiner_models)
    # a conditioner given one it cannot use says so in one line, rather than reading the name as text
    with pytest.raises(ValueError, match="'wide' has 96-wide vectors.*leave 'wide' out") as error:
        vectors_for({"wide": embedding("wide", 1, 96)}, sd1.conditioner.models(), "text_encoder")
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- files


def test_every_format_reads(tmp_path):
    one, three = vectors(1, CONTEXT, seed=1), vectors(3, CONTEXT, seed=2)
    cases = {
        "a.pt": lambda p: a1111_pt(p, torch.nn.Parameter(three)),  # A1111 saves its trained vectors as is
        "b.bin": lambda p: torch.save({"<b>": one[0]}, p),  # diffusers' learned_embeds.bin: one (width,) vector
        "c.safetensors": lambda p: save_file({"<c>": three}, str(p)),
        "d.safetensors": lambda p: a1111_safetensors(p, one.half()),
    }
    for filename, write in cases.items():
        write(tmp_path / filename)
    read = {filename: read_embedding(tmp_path / filename) for filename in cases}
    assert [e.name for e in read.values()] == ["a", "b", "c", "d"]
    assert torch.equal(read["a.pt"].vectors["text_encoder"], three) and read["a.pt"].n_vectors == 3
    assert torch.equal(read["b.bin"].vectors["text_encoder"], one)  # (width,) -> (1, width)
    assert torch.equal(read["c.safetensors"].vectors["text_encoder"], three)
    assert read["d.safetensors"].vectors["text_encoder"].dtype == torch.float16
    assert read["a.pt"].path == os.fspath(tmp_path / "a.pt")


class Exploit:
    def __reduce__(self):
        return os.system, ("echo owned",)


BAD_FILES = {
    "global.pt": ({"string_to_param": {"*": Exploit()}}, r"refuses to run code: the pickle asks for \w+\.system"),
    "nan.safetensors": ({"emb_params": torch.tensor([[0.1, float("nan")]])}, "emb_params holds NaN or infinite values"),
    "inf.pt": ({"string_to_param": {"*": torch.tensor([[float("inf"), 0.0]])}}, r"string_to_param\['\*'\] holds NaN"),
    "keys.safetensors": ({"foo": torch.ones(2), "bar": torch.ones(2)}, r"no embedding vectors \(keys: 'bar', 'foo'\)"),
    "two.pt": ({"string_to_param": {"*": torch.ones(1, 4), "+": torch.ones(1, 4)}}, "must hold one entry, it holds 2"),
    "ints.safetensors": ({"emb_params": torch.ones(1, 4, dtype=torch.int32)}, "holds torch.int32 numbers"),
    "cube.safetensors": ({"emb_params": torch.ones(1, 2, 4)}, r"shape \(1, 2, 4\), not \(vectors, width\)"),
    "empty.safetensors": ({"emb_params": torch.ones(0, 4)}, r"shape \(0, 4\)"),
    "text.pt": ({"string_to_param": {"*": "vectors"}}, r"string_to_param\['\*'\] is a str, not a tensor"),
    "half.safetensors": ({"clip_l": torch.ones(1, 4)}, "an SDXL embedding without 'clip_g'"),
    "uneven.safetensors": ({"clip_l": torch.ones(1, 4), "clip_g": torch.ones(2, 8)}, r"\(clip_l 1 and clip_g 2\)"),
    "list.pt": ([torch.ones(1, 4)], "holds a list, not an embedding's dict"),
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_bad_files_are_one_line(tmp_path, filename):
    data, message = BAD_FILES[filename]
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(data, str(path))
    else:
        torch.save(data, path)
    with pytest.raises(CheckpointError, match=message) as error:
        read_embedding(path)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(path))


def test_read_pickle_keeps_the_nesting_and_refuses_the_same(tmp_path):
    path = a1111_pt(tmp_path / "x.pt", vectors(2, 4, seed=0))
    data = read_pickle(path)
    assert data["string_to_token"] == {"*": 265} and data["step"] == 1500
    assert data["string_to_param"]["*"].shape == (2, 4)
    with pytest.raises(CheckpointError, match="weight 'string_to_token' is a dict, not a tensor"):
        read_state_dict(path)  # unchanged: a flat dict of tensors or nothing
    save_file({"a": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="is a safetensors file, not a PyTorch pickle"):
        read_pickle(tmp_path / "x.safetensors")


def test_embedding_is_a_frozen_record():
    with pytest.raises(dataclasses.FrozenInstanceError):
        embedding("x", 1).name = "y"


# --------------------------------------------------------------------------- through the pipeline's folders


def test_embeddings_folder_in_generate_infotext_and_refusals(sd1_folder, tmp_path, monkeypatch, capsys):
    """The pipeline finds the folder's embeddings by file name in either prompt, writes A1111's "TI hashes",
    and refuses (one line, no image) a prompt naming one made for another width; the CLI does the same."""
    from latentforge.adapters.library import Library
    from latentforge.cli import main
    from latentforge.infotext import parse_infotext
    from latentforge.modelhash import file_sha256

    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    good = a1111_pt(tmp_path / f"{ONE}.pt", vectors(2, CONTEXT, 1))
    a1111_safetensors(tmp_path / "widevec.safetensors", vectors(1, 2 * CONTEXT, 2))
    plain = pipe.generate(TEXT.format("x"), NEGATIVE.format("y"), steps=3, seed=4)[0]
    pipe.library = Library.from_dirs(embedding_dirs=[tmp_path])
    usable, skipped = pipe.embeddings()
    assert list(usable) == [ONE] and list(skipped) == ["widevec"] and "256-wide" in skipped["widevec"]

    image = pipe.generate(TEXT.format("x"), NEGATIVE.format(ONE), steps=3, seed=4)[0]
    assert np.abs(np.asarray(image).astype(int) - np.asarray(plain).astype(int)).max() > 0
    assert parse_infotext(image.info["parameters"])["TI hashes"] == f"{ONE}: {file_sha256(good)[:12]}"
    direct = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    direct.conditioner.embeddings = {ONE: read_embedding(good)}
    assert np.array_equal(np.asarray(direct.generate(TEXT.format("x"), NEGATIVE.format(ONE), steps=3, seed=4)[0]),
                          np.asarray(image))  # fmt: skip
    with pytest.raises(ValueError, match="embedding 'widevec', which this model cannot: .*256-wide") as info:
        pipe.generate(TEXT.format("widevec"), steps=3, seed=4)
    assert "\n" not in str(info.value)

    monkeypatch.chdir(tmp_path)
    args = ["generate", TEXT.format(ONE), "--model", str(sd1_folder), "--steps", "2", "--seed", "1",
            "--dtype", "float32", "--embeddings-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert main([*args[:1], TEXT.format("widevec"), *args[2:]]) == 2
    assert "widevec" in capsys.readouterr().err


def test_server_lists_and_refreshes_embeddings(sd1_folder, tmp_path):
    import requests

    from latentforge.server import ServerThread, Settings, create_app

    a1111_pt(tmp_path / f"{ONE}.pt", vectors(3, CONTEXT, 1))
    settings = Settings(models=[str(sd1_folder)], embedding_dirs=[str(tmp_path)], dtype="float32")
    with ServerThread(create_app(settings)) as url:
        listed = requests.get(f"{url}/sdapi/v1/embeddings", timeout=60).json()
        assert listed["loaded"][ONE] | {} == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                              "shape": CONTEXT, "vectors": 3}  # fmt: skip
        assert listed["skipped"] == {}
        a1111_safetensors(tmp_path / "widevec.safetensors", vectors(1, 2 * CONTEXT, 2))
        assert requests.post(f"{url}/sdapi/v1/refresh-embeddings", timeout=60).status_code == 200
        skipped = requests.get(f"{url}/sdapi/v1/embeddings", timeout=60).json()["skipped"]
        assert list(skipped) == ["widevec"] and "256-wide" in skipped["widevec"]["reason"]
        response = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": TEXT.format(ONE), "steps": 2}, timeout=60)
        assert json.loads(response.json()["info"])["extra_generation_params"]["TI hashes"].startswith(f"{ONE}: ")
