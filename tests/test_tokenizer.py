"""Tests for latentforge.tokenizer against transformers' CLIPTokenizer built in the test."""

from __future__ import annotations

import gzip
import json
import random
import time
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch

import latentforge
from latentforge.tokenizer import Tokenizer

from transformers import CLIPTokenizer  # noqa: E402

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2
SHIPPED = Path(latentforge.__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

LONG_TEXT = "a highly detailed photo of a red fox in the snow, " * 12

CORPUS = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF AN ASTRONAUT, Trending On ArtStation",
    "masterpiece, best quality, (ultra-detailed:1.2), [[blurry]], {cat|dog}!!!",
    "wow!!! really?! ... -- ;; ::: // \\\\ ~~ ^^ @#$%&*",
    "1920x1080 3.14 1,000,000 -42 007 2024-01-31 8k 4K UHD",
    "café crème, naïve Zoë, Ångström, façade, jalapeño, Straße",
    "e\u0301 a\u0308 o\u0302\u0323 n\u0303",  # combining marks NFC composes
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab",  # conjoining Hangul jamo
    "🤖🎨 a robot painting 🇫🇷 👩\u200d👩\u200d👧 👍🏽 ✨",
    "東京の夜景、ネオンが光る 中文提示词 한국어 문장",
    "Привет, мир! Ελληνικά ΟΔΟΣ ΣΟΦΙΑΣ",
    "مرحبا بالعالم עברית हिन्दी ภาษาไทย",
    "tabs\tand\nnew\r\nlines   and    spaces\u3000ideographic\xa0nbsp",
    "  leading and trailing spaces   ",
    "",
    "   ",
    "it's don't can't we're they've i'm we'll he'd 's 'S IT'S DON'T 'LL",
    "rock'n'roll it''s ' s ''s' 'ss",
    '<b>bold</b> &amp; <a href="x.html">link</a> <br/>',
    "zero\u200bwidth\u200cjoin\u200dx \ufeffbom \u2060wj",
    "ctrl\x00\x01\x07\x1b[0m\x7f \x1c\x1d\x1e\x1f sep \x85 \u2028 \u2029",
    "²½Ⅻ①⑩ ٣٤٥ १२३ １２３ ＡＢＣ ﬁ ﬀ",
    "İstanbul ΑΣ ΣΑΣ ǅ ǈ ß ẞ",
    "snake_case __init__ x_y _",
    "<|startoftext|>a<|endoftext|> <|ENDOFTEXT|> <|endoftext|>!! !<|endoftext|>!",
    "hello! hi!! hey!!! !",
    LONG_TEXT,
]

ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    + [" ", " ", " ", "\t", "\n", "\r", "\xa0", "\u3000", "\u2003", "\x0b", "\x1c", "\x85"]
    + list("éèêëçñüößÆØÅœŒ") + ["e\u0301", "\u0301", "\u0308", "\u20dd"]
    + list("αβγΣσςΩПриветЖжЯ") + list("مرحبאבג")
    + list("東京夜景中文ひらがなカタカナ한국")
    + list("²½Ⅻ①٣१１") + ["\u200b", "\u200d", "\ufeff", "\x00", "\x7f", "\u180e"]
    + ["🤖", "🎨", "👍🏽", "🇫🇷", "✨"]
    + ["'s", "'t", "'re", "'ll", "'S", "<|", "|>", "<|endoftext|>", "<|startoftext|>", "ENDOFTEXT"]
)


def byte_characters() -> list[str]:
    """CLIP's byte-level alphabet in vocabulary order (printable bytes first, then the rest)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def write_reference_files(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt for the shipped CLIP vocabulary, independently of latentforge."""
    lines = gzip.open(SHIPPED, "rt", encoding="utf-8").read().split("\n")[1 : 1 + NUM_MERGES]
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + [line.replace(" ", "") for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return vocab_file, merges_file


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """vocab.json and merges.txt of the shipped vocabulary, written by the test helper."""
    return write_reference_files(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def ref_sd1(reference_files: tuple[Path, Path]) -> CLIPTokenizer:
    """transformers' CLIPTokenizer as Stable Diffusion 1.x uses it (pad with the end token)."""
    return CLIPTokenizer(str(reference_files[0]), str(reference_files[1]))


@pytest.fixture(scope="module")
def ref_sd2(reference_files: tuple[Path, Path]) -> CLIPTokenizer:
    """transformers' CLIPTokenizer as Stable Diffusion 2.x uses it (pad with "!")."""
    return CLIPTokenizer(str(reference_files[0]), str(reference_files[1]), pad_token="!")


@pytest.fixture(scope="module")
def sd1() -> Tokenizer:
    """latentforge tokenizer, SD 1.x padding."""
    return Tokenizer()


@pytest.fixture(scope="module")
def sd2() -> Tokenizer:
    """latentforge tokenizer, SD 2.x padding."""
    return Tokenizer(pad_token="!")


def ref_encode(ref: CLIPTokenizer, text: str) -> list[int]:
    """Reference ids without start/end tokens and without truncation."""
    return ref(text, add_special_tokens=False).input_ids


def ref_batch(ref: CLIPTokenizer, texts: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Reference ids as Stable Diffusion pipelines compute them."""
    out = ref(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids


def call_quietly(tokenizer: Tokenizer, texts: str | list[str]) -> torch.Tensor:
    """Tokenizer call with the truncation warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(texts)


def random_texts(count: int, seed: int) -> list[str]:
    """Random strings over the mixed ALPHABET (seeded, so a failure is reproducible)."""
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(0, 40))) for _ in range(count)]


def test_special_ids_and_size(sd1: Tokenizer, sd2: Tokenizer) -> None:
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id, sd1.vocab_size) == (BOS_ID, EOS_ID, EOS_ID, VOCAB_SIZE)
    assert (sd2.bos_id, sd2.eos_id, sd2.pad_id, sd2.vocab_size) == (BOS_ID, EOS_ID, 0, VOCAB_SIZE)


def test_reference_agrees_on_facts(ref_sd1: CLIPTokenizer, ref_sd2: CLIPTokenizer) -> None:
    assert (ref_sd1.bos_token_id, ref_sd1.eos_token_id, ref_sd1.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert ref_sd2.pad_token_id == 0 and len(ref_sd1) == VOCAB_SIZE


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_encode_matches_reference(text: str, sd1: Tokenizer, sd2: Tokenizer, ref_sd1, ref_sd2) -> None:
    assert sd1.encode(text) == ref_encode(ref_sd1, text)
    assert sd2.encode(text) == ref_encode(ref_sd2, text)


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_padded_batch_matches_reference(which: str, request: pytest.FixtureRequest) -> None:
    ours: Tokenizer = request.getfixturevalue(which)
    ref: CLIPTokenizer = request.getfixturevalue(f"ref_{which}")
    ids = call_quietly(ours, CORPUS)
    assert ids.dtype == torch.long and ids.shape == (len(CORPUS), MAX_LENGTH)
    assert torch.equal(ids, ref_batch(ref, CORPUS))
    assert (ids[:, 0] == BOS_ID).all()
    for row, text in zip(ids.tolist(), CORPUS):  # end token right after the text, then padding
        n = min(len(ours.encode(text)), MAX_LENGTH - 2)
        assert row[n + 1] == EOS_ID and set(row[n + 2 :]) <= {ours.pad_id}


def test_single_string_gives_batch_of_one(sd1: Tokenizer, ref_sd1: CLIPTokenizer) -> None:
    text = "a cat sitting on a windowsill"
    assert torch.equal(sd1(text), ref_batch(ref_sd1, [text]))


def test_truncation_keeps_end_token_and_warns_once(sd1: Tokenizer, ref_sd1: CLIPTokenizer) -> None:
    expected_dropped = len(sd1.encode(LONG_TEXT)) - (MAX_LENGTH - 2)
    assert expected_dropped > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = sd1(LONG_TEXT)
    assert len(caught) == 1
    assert f"dropped {expected_dropped} tokens" in str(caught[0].message)
    assert ids[0, -1].item() == EOS_ID
    assert torch.equal(ids, ref_batch(ref_sd1, [LONG_TEXT]))


def test_batch_with_several_long_prompts_warns_once(sd2: Tokenizer, ref_sd2: CLIPTokenizer) -> None:
    texts = [LONG_TEXT, "short", LONG_TEXT + " and more"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = sd2(texts)
    assert len(caught) == 1 and "2 of 3 prompts" in str(caught[0].message)
    assert torch.equal(ids, ref_batch(ref_sd2, texts))


def test_no_warning_when_text_fits(sd1: Tokenizer) -> None:
    text = " ".join(["cat"] * (MAX_LENGTH - 2))  # exactly fills the sequence
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = sd1([text, ""])
    assert ids[0, -1].item() == EOS_ID and ids[1, 2:].eq(EOS_ID).all()


def test_other_max_length(ref_sd1: CLIPTokenizer) -> None:
    short = Tokenizer(max_length=8)
    texts = ["a b c", "one two three four five six seven eight"]
    assert torch.equal(call_quietly(short, texts), ref_batch(ref_sd1, texts, max_length=8))


def test_random_strings_match_reference(sd1: Tokenizer, sd2: Tokenizer, ref_sd1, ref_sd2) -> None:
    texts = random_texts(400, seed=1234)
    for text in texts:
        assert sd1.encode(text) == ref_encode(ref_sd1, text), repr(text)
        assert sd2.encode(text) == ref_encode(ref_sd2, text), repr(text)
    assert torch.equal(call_quietly(sd1, texts), ref_batch(ref_sd1, texts))
    assert torch.equal(call_quietly(sd2, texts), ref_batch(ref_sd2, texts))


def test_code_point_sweep_matches_reference(sd1: Tokenizer, ref_sd1: CLIPTokenizer) -> None:
    """Every assigned character below U+3400 and a sample above, next to letters, digits, punctuation.

    Characters unassigned in this Python's Unicode database are left out: the reference uses newer
    Unicode tables (characters added since then differ only because of the version gap).
    """
    rng = random.Random(7)
    sample = list(range(0x3400)) + rng.sample(range(0x3400, 0x110000), 12000)
    chars = [chr(c) for c in sample if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    for start in range(0, len(chars), 64):
        text = "".join(f"a{c}b{c}{c}1{c}'s{c}.{c} " for c in chars[start : start + 64])
        if sd1.encode(text) != ref_encode(ref_sd1, text):
            units = [f"a{c}b {c}" for c in chars[start : start + 64]]
            bad = [u[1] for u in units if sd1.encode(u) != ref_encode(ref_sd1, u)]
            pytest.fail(f"code points differ from the reference: {[hex(ord(c)) for c in bad]}")


def test_decode_round_trips_lowercase_ascii(sd1: Tokenizer) -> None:
    rng = random.Random(99)
    for _ in range(200):
        letters = "abcdefghijklmnopqrstuvwxyz"
        text = " ".join("".join(rng.choices(letters, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 15)))
        assert sd1.decode(sd1.encode(text)) == text
        assert sd1.decode(call_quietly(sd1, text)[0]) == sd1.decode(sd1.encode(text)[: MAX_LENGTH - 2])


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_reference(skip: bool, sd1: Tokenizer, ref_sd1: CLIPTokenizer) -> None:
    for text in CORPUS[:-1]:
        ids = call_quietly(sd1, text)[0].tolist()
        assert sd1.decode(ids, skip_special_tokens=skip) == ref_sd1.decode(ids, skip_special_tokens=skip)


def test_decode_rejects_unknown_id(sd1: Tokenizer) -> None:
    with pytest.raises(ValueError, match="not in the vocabulary"):
        sd1.decode([320, VOCAB_SIZE + 5])


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_save_pretrained_loads_in_transformers(pad_token: str, tmp_path: Path) -> None:
    ours = Tokenizer(pad_token=pad_token)
    ours.save_pretrained(tmp_path)
    assert {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    ref = CLIPTokenizer.from_pretrained(str(tmp_path))
    texts = CORPUS + random_texts(50, seed=5)
    assert ref.pad_token == pad_token
    assert torch.equal(call_quietly(ours, texts), ref_batch(ref, texts))
    reloaded = Tokenizer.from_pretrained(tmp_path)
    assert reloaded.pad_id == ours.pad_id and reloaded.max_length == MAX_LENGTH
    assert torch.equal(call_quietly(reloaded, texts), call_quietly(ours, texts))


def test_from_pretrained_reference_folder(reference_files: tuple[Path, Path], sd1: Tokenizer) -> None:
    """A folder holding only vocab.json + merges.txt loads with SD 1.x defaults."""
    loaded = Tokenizer.from_pretrained(reference_files[0].parent)
    assert loaded.pad_id == EOS_ID and loaded.vocab_size == VOCAB_SIZE
    assert torch.equal(call_quietly(loaded, CORPUS), call_quietly(sd1, CORPUS))


def copy_reference(reference_files: tuple[Path, Path], folder: Path) -> Path:
    """Copy vocab.json and merges.txt into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in reference_files:
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


@pytest.mark.parametrize("config_file", ["special_tokens_map.json", "tokenizer_config.json"])
def test_from_pretrained_reads_pad_token(config_file: str, reference_files, tmp_path: Path) -> None:
    folder = copy_reference(reference_files, tmp_path / "tokenizer")
    pad = {"content": "!", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {"pad_token": pad, "model_max_length": 77}
    (folder / config_file).write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_pretrained(folder).pad_id == 0
    assert Tokenizer.from_pretrained(tmp_path).pad_id == 0  # a diffusers model root works too


def added_token(content: str, normalized: bool) -> dict[str, object]:
    """A special token as Hugging Face configs write it."""
    return dict(content=content, lstrip=False, normalized=normalized, rstrip=False, single_word=False)


def hub_style_configs(style: str) -> dict[str, dict]:
    """special_tokens_map.json / tokenizer_config.json as Stable Diffusion repositories ship them."""
    if style == "added_tokens_decoder":  # newer saves: flags live in tokenizer_config.json
        decoder = {
            "49406": {**added_token("<|startoftext|>", True), "special": True},
            "49407": {**added_token("<|endoftext|>", False), "special": True},
        }
        named = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        config = {"added_tokens_decoder": decoder, **named, "pad_token": "<|endoftext|>"}
        special_map = {key: added_token(value, True) for key, value in named.items()}  # ignored
        return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}
    pad = "!" if style == "legacy_sd2" else "<|endoftext|>"
    special_map = {
        "bos_token": added_token("<|startoftext|>", True),
        "eos_token": added_token("<|endoftext|>", True),
        "unk_token": added_token("<|endoftext|>", True),
        "pad_token": pad,
    }
    config = {**special_map, "do_lower_case": True, "model_max_length": 77}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


SPECIAL_TEXTS = [
    "<|startoftext|> <|endoftext|> <|STARTOFTEXT|> <|EndOfText|>",
    "x<|ENDOFTEXT|>!!<|StartOfText|>y <|endoftext|>",
    "<|start of text|> <|endoftext <|ENDOFTEXT|>\u0301 \t<|STARTOFTEXT|>\n",
]


@pytest.mark.parametrize("style", ["legacy_sd1", "legacy_sd2", "added_tokens_decoder"])
def test_from_pretrained_hub_style_folders(style: str, reference_files, tmp_path: Path) -> None:
    """Special tokens saved with "normalized": true are matched case-insensitively, like transformers."""
    folder = copy_reference(reference_files, tmp_path)
    for name, content in hub_style_configs(style).items():
        (folder / name).write_text(json.dumps(content), encoding="utf-8")
    ours = Tokenizer.from_pretrained(folder)
    ref = CLIPTokenizer.from_pretrained(str(folder))
    assert ours.pad_id == ref.pad_token_id
    texts = SPECIAL_TEXTS + CORPUS
    assert [ours.encode(t) for t in texts] == [ref_encode(ref, t) for t in texts]
    assert torch.equal(call_quietly(ours, texts), ref_batch(ref, texts))


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_save_pretrained_keeps_normalized_special_tokens(pad_token: str, tmp_path: Path) -> None:
    ours = Tokenizer(pad_token=pad_token, normalized_special_tokens={"<|startoftext|>", "<|endoftext|>"})
    assert ours.encode("<|ENDOFTEXT|>") == [EOS_ID]
    ours.save_pretrained(tmp_path)
    ref = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert [ours.encode(t) for t in SPECIAL_TEXTS] == [ref_encode(ref, t) for t in SPECIAL_TEXTS]
    reloaded = Tokenizer.from_pretrained(tmp_path)
    assert reloaded.normalized_special_tokens == ours.normalized_special_tokens


@pytest.mark.parametrize("style", ["plain_sd1", "legacy_sd2"])
def test_from_pretrained_transformers_saved_folder(style: str, reference_files, tmp_path: Path) -> None:
    """transformers 5 saves tokenizer.json (no vocab.json/merges.txt); that folder loads too."""
    source = copy_reference(reference_files, tmp_path / "source")
    if style.startswith("plain"):
        Tokenizer(pad_token="!" if style == "plain_sd2" else "<|endoftext|>").save_pretrained(source)
    else:
        for name, content in hub_style_configs(style).items():
            (source / name).write_text(json.dumps(content), encoding="utf-8")
    CLIPTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    ref = CLIPTokenizer.from_pretrained(str(tmp_path / "saved"))
    ours = Tokenizer.from_pretrained(tmp_path / "saved")
    texts = SPECIAL_TEXTS + CORPUS
    assert ours.pad_id == ref.pad_token_id
    assert torch.equal(call_quietly(ours, texts), ref_batch(ref, texts))


def test_from_pretrained_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json does not hold a CLIP BPE model"):
        Tokenizer.from_pretrained(tmp_path)


def test_from_pretrained_missing_merges(reference_files, tmp_path: Path) -> None:
    folder = copy_reference(reference_files, tmp_path)
    (folder / "merges.txt").unlink()
    with pytest.raises(ValueError, match="merges.txt"):
        Tokenizer.from_pretrained(folder)


def test_from_pretrained_missing_vocab(reference_files, tmp_path: Path) -> None:
    folder = copy_reference(reference_files, tmp_path)
    (folder / "vocab.json").unlink()
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_pretrained(folder)


def test_from_pretrained_broken_files(reference_files, tmp_path: Path) -> None:
    folder = copy_reference(reference_files, tmp_path)
    (folder / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_pretrained(folder)
    copy_reference(reference_files, folder)
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nthree parts here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt, line 3"):
        Tokenizer.from_pretrained(folder)
    copy_reference(reference_files, folder)
    (folder / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(folder)


def test_from_pretrained_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_small_custom_vocabulary_matches_reference(tmp_path: Path) -> None:
    """A hand-made vocabulary (bytes, a few merges, specials) agrees with the reference too."""
    chars = byte_characters()
    merges = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("!", "!</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    ours = Tokenizer(vocab, merges, max_length=12)
    ours.save_pretrained(tmp_path)
    ref = CLIPTokenizer.from_pretrained(str(tmp_path))
    texts = ["the cat", "THE CAT!!", "cathe thecat", "a long sentence about the cat"]
    assert [ours.encode(t) for t in texts] == [ref_encode(ref, t) for t in texts]
    assert torch.equal(call_quietly(ours, texts), ref_batch(ref, texts, max_length=12))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="both vocab and merges"):
        Tokenizer(vocab={"a": 0})
    with pytest.raises(ValueError, match="pad token"):
        Tokenizer(pad_token="<|not-a-token|>")
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(max_length=1)
    with pytest.raises(ValueError, match="not in the vocab"):
        Tokenizer({"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, [("a", "b")])
    with pytest.raises(ValueError, match="not special tokens"):
        Tokenizer(normalized_special_tokens={"hello"})
    with pytest.raises(ValueError, match="must be a str"):
        Tokenizer().encode(None)  # type: ignore[arg-type]


def test_default_vocabulary_is_cached() -> None:
    Tokenizer()
    start = time.perf_counter()
    for _ in range(20):
        Tokenizer()
    assert time.perf_counter() - start < 0.5  # parsing the shipped file once takes longer than this
