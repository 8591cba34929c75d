"""Tests for latentforge.prompts: A1111 emphasis parsing, 75-token chunking, weighted encoding.

Sources cited below (AUTOMATIC1111/stable-diffusion-webui):
  [PP]  modules/prompt_parser.py @ 28bd8e14, parse_prompt_attention (docstring doctests, regex)
  [HC]  modules/sd_hijack_clip.py @ 00e09382, FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line,
        next_chunk, empty_chunk, process_tokens
  [EM]  modules/sd_emphasis.py, EmphasisOriginal.after_transformers
  [CD]  modules/sd_samplers_cfg_denoiser.py @ 029adbe5, pad_cond / CFGDenoiser.pad_cond_uncond
  [OC]  modules/sd_hijack_open_clip.py, FrozenOpenCLIPEmbedderWithCustomWords (id_pad = 0)
"""

from __future__ import annotations

import pytest
import torch

from latentforge.prompts import PromptChunks, chunk_prompt, encode_prompt, encode_prompts, parse_emphasis
from latentforge.text_encoder import TextEncoder, TextEncoderConfig
from latentforge.tokenizer import Tokenizer

SD1 = Tokenizer()  # pads with the end token
SD2 = Tokenizer(pad_token="!")  # pads with "!" = 0, like the SD 2.x tokenizer
BOS, EOS = SD1.bos_id, SD1.eos_id
A, B, COMMA = SD1.encode("a")[0], SD1.encode("b")[0], SD1.encode(",")[0]
BREAK_WORD = SD1.encode("break")[0]
LENGTH = 75  # prompt tokens per chunk


def words(n: int) -> str:
    """A prompt of exactly n tokens ("a" is one token)."""
    return " ".join(["a"] * n)


def window(ids: list[int], pad: int = EOS) -> list[int]:
    """A 77-id chunk: start, ids, end, padding."""
    return [BOS, *ids, EOS] + [pad] * (LENGTH - len(ids))


def bodies(chunks: PromptChunks) -> list[list[int]]:
    """Prompt tokens of each chunk, checking the wrapping (start, end-token padding, end) on the way."""
    out = []
    for row in chunks.ids.tolist():
        assert len(row) == 77 and row[0] == BOS and row[-1] == EOS
        body = row[1:-1]
        while body and body[-1] == EOS:
            body.pop()
        out.append(body)
    return out


# --- parse_emphasis ---------------------------------------------------------------------------

# Every example of [PP]'s docstring, with its exact output (weights compared with ==).
A1111_DOCSTRING = [
    # >>> parse_prompt_attention('normal text')  ->  [['normal text', 1.0]]
    ("normal text", [("normal text", 1.0)]),
    # >>> parse_prompt_attention('an (important) word')
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    # >>> parse_prompt_attention('(unbalanced')  ->  [['unbalanced', 1.1]]
    ("(unbalanced", [("unbalanced", 1.1)]),
    # >>> parse_prompt_attention('\(literal\]')  ->  [['(literal]', 1.0]]
    ("\\(literal\\]", [("(literal]", 1.0)]),
    # >>> parse_prompt_attention('(unnecessary)(parens)')  ->  [['unnecessaryparens', 1.1]]
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    # >>> parse_prompt_attention('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).')
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING)
def test_parse_matches_a1111_docstring(text, expected):
    assert parse_emphasis(text) == expected


# Reconstructed from [PP]'s code (regex and loop), not from its docstring.
RULES = [
    ("", [("", 1.0)]),  # "if len(res) == 0: res = [['', 1.0]]"
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]),  # weight regex is ":\s*([+-]?[.\d]+)\s*\)"
    ("(word:-0.5)", [("word", -0.5)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
    ("[a", [("a", 1 / 1.1)]),  # unbalanced "[" closes at the end
    ("(a (b) c)", [("a ", 1.1), ("b", 1.1 * 1.1), (" c", 1.1)]),
    ("((a:1.5))", [("a", 1.5 * 1.1)]),
    ("\\\\", [("\\", 1.0)]),  # \\ is one literal backslash
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
    ("a) b]", [("a) b]", 1.0)]),  # closers with nothing open are text
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # ":1.5)" with no "(" open is text
    ("time: noon", [("time: noon", 1.0)]),
    ("[a:b:0.5]", [("a:b:0.5", 1 / 1.1)]),  # prompt editing is not this function's syntax
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),  # re_break eats the spaces
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # BREAK is case-sensitive
    ("aBREAK b", [("aBREAK b", 1.0)]),  # ... and a word of its own
    ("(BREAK)", [("", 1.1), ("BREAK", -1.1), ("", 1.1)]),  # multiplied markers stop being breaks
]


@pytest.mark.parametrize("text, expected", RULES)
def test_parse_rules(text, expected):
    assert parse_emphasis(text) == expected


def test_parse_rejects_bad_input():
    with pytest.raises(ValueError, match="1.2.3"):  # float('1.2.3') raises in A1111 as well
        parse_emphasis("(a:1.2.3)")
    with pytest.raises(ValueError, match="str"):
        parse_emphasis(None)


# --- chunk_prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("", [[]]),  # [HC] "if chunk.tokens or not chunks: next_chunk(is_last=True)"
        (words(1), [[A]]),
        (words(75), [[A] * 75]),
        (words(76), [[A] * 75, [A]]),
        (words(150), [[A] * 75, [A] * 75]),  # no empty chunk after a full last one
        (words(151), [[A] * 75, [A] * 75, [A]]),
    ],
)
def test_chunk_boundaries(prompt, expected):
    chunks = chunk_prompt(SD1, prompt)
    assert chunks.ids.shape == chunks.weights.shape == (len(expected), 77)
    assert chunks.ids.dtype == torch.long and chunks.weights.dtype == torch.float32
    assert chunks.ids.tolist() == [window(body) for body in expected]
    assert torch.equal(chunks.weights, torch.ones(len(expected), 77))


def test_one_chunk_ids_equal_the_tokenizer():
    for tokenizer in (SD1, SD2):
        for prompt in ("", "a photo of a cat, highly detailed", words(75)):
            assert torch.equal(chunk_prompt(tokenizer, prompt).ids, tokenizer([prompt]))


def comma_prompt(comma_at: int, total: int = 81) -> tuple[str, list[int]]:
    """Prompt of `total` tokens: "a" everywhere except a comma at index `comma_at`."""
    text = words(comma_at) + ", " + words(total - comma_at - 1)
    return text, [A] * comma_at + [COMMA] + [A] * (total - comma_at - 1)


# [HC]: the chunk is full (75) and "len(chunk.tokens) - last_comma <= comma_padding_backtrack"
# (default 20, an opts setting) -> cut after the comma; so commas at index 55..74 move the rest.
@pytest.mark.parametrize(
    "comma_at, cut",
    [
        (10, 75),  # comma early in the chunk: plain cut at 75
        (54, 75),  # 75 - 54 = 21 > 20
        (55, 56),  # 75 - 55 = 20: within the last 20 tokens
        (60, 61),
        (73, 74),
        (74, 75),  # comma is the 75th token: chunk ends with it, same as a plain cut
        (75, 75),  # comma is the 76th token: it opens the next chunk
    ],
)
def test_comma_backtrack(comma_at, cut):
    text, tokens = comma_prompt(comma_at)
    assert SD1.encode(text) == tokens
    assert bodies(chunk_prompt(SD1, text)) == [tokens[:cut], tokens[cut:]]


def test_comma_backtrack_setting():
    text, tokens = comma_prompt(60)
    assert bodies(chunk_prompt(SD1, text, comma_backtrack=0)) == [tokens[:75], tokens[75:]]  # 0 = off
    text, tokens = comma_prompt(70)
    assert bodies(chunk_prompt(SD1, text, comma_backtrack=5)) == [tokens[:71], tokens[71:]]
    text, tokens = comma_prompt(69)
    assert bodies(chunk_prompt(SD1, text, comma_backtrack=5)) == [tokens[:75], tokens[75:]]
    with pytest.raises(ValueError, match="comma_backtrack"):
        chunk_prompt(SD1, "a", comma_backtrack=-1)


def test_comma_backtrack_edge_cases():
    # Only a token after the full chunk triggers the cut: exactly 75 tokens stay one chunk.
    text, tokens = comma_prompt(60, total=75)
    assert bodies(chunk_prompt(SD1, text)) == [tokens]
    # The latest comma counts.
    text = words(50) + ", " + words(9) + ", " + words(20)
    tokens = SD1.encode(text)
    assert tokens[50] == tokens[60] == COMMA and len(tokens) == 81
    assert bodies(chunk_prompt(SD1, text)) == [tokens[:61], tokens[61:]]
    # Moved tokens keep their weights; the shortened chunk is padded with weight 1.
    text = words(65) + ", (b:1.3) " + words(15)
    chunks = chunk_prompt(SD1, text)
    assert bodies(chunks) == [[A] * 65 + [COMMA], [B] + [A] * 15]
    assert chunks.weights[1, 1].item() == pytest.approx(1.3)
    assert torch.equal(chunks.weights[0], torch.ones(77))
    assert torch.equal(chunks.weights[1, 2:], torch.ones(75))


# [HC]: "if text == 'BREAK' and weight == -1: next_chunk()", which pads the current chunk even
# when it is empty; the final chunk is added only "if chunk.tokens or not chunks".
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a BREAK b", [[A], [B]]),
        ("BREAK a", [[], [A]]),
        ("a BREAK", [[A]]),
        ("BREAK", [[]]),
        ("a BREAK BREAK b", [[A], [], [B]]),
        ("a,BREAK,b", [[A, COMMA], [COMMA, B]]),
        (words(75) + " BREAK b", [[A] * 75, [B]]),
        (words(74) + " BREAK " + words(76), [[A] * 74, [A] * 75, [A]]),
        ("a break b", [[A, BREAK_WORD, B]]),
    ],
)
def test_break(prompt, expected):
    chunks = chunk_prompt(SD1, prompt)
    assert chunks.ids.tolist() == [window(body) for body in expected]
    assert torch.equal(chunks.weights, torch.ones(len(expected), 77))


def test_break_resets_the_comma():
    # [HC] next_chunk sets last_comma = -1: a comma late in the chunk that BREAK ended must not
    # cut the next one (if it were remembered, 75 - 60 <= 20 would cut that one after 61 tokens).
    text = words(60) + ", BREAK " + words(80)
    assert bodies(chunk_prompt(SD1, text)) == [[A] * 60 + [COMMA], [A] * 75, [A] * 5]


def test_break_inside_brackets_is_a_word():
    chunks = chunk_prompt(SD1, "(a BREAK b)")
    assert bodies(chunks) == [[A, BREAK_WORD, B]]
    assert chunks.weights[0, 1:4].tolist() == pytest.approx([1.1, -1.1, 1.1])


@pytest.mark.parametrize(
    "prompt, plain, weights",
    [
        ("a (red:1.5) circle", "a red circle", [1.0, 1.5, 1.0]),
        ("((a))", "a", [1.1 * 1.1]),
        ("[a]", "a", [1 / 1.1]),
        ("(a (b) c)", "a b c", [1.1, 1.1 * 1.1, 1.1]),
        ("[a] (b:0.5)", "a b", [1 / 1.1, 0.5]),
        ("(photorealistic:0.8) cat", "photorealistic cat", [0.8, 0.8, 1.0]),  # two tokens, one weight
        ("\\(a\\)", "(a)", [1.0, 1.0, 1.0]),
    ],
)
def test_token_weights(prompt, plain, weights):
    chunks = chunk_prompt(SD1, prompt)
    assert torch.equal(chunks.ids, SD1([plain]))
    expected = torch.ones(1, 77)
    expected[0, 1 : 1 + len(weights)] = torch.tensor(weights)
    assert torch.equal(chunks.weights, expected)


def test_sd2_padding():
    # [HC] process_tokens: "if self.id_end != self.id_pad", everything after the first end token
    # becomes id_pad ([OC]: 0 for OpenCLIP).
    pad = SD2.pad_id
    assert pad == 0
    chunks = chunk_prompt(SD2, words(80))
    assert chunks.ids.tolist() == [window([A] * 75, pad), window([A] * 5, pad)]
    assert chunk_prompt(SD2, "a BREAK b").ids.tolist() == [window([A], pad), window([B], pad)]
    # A literal end token in the text is that first end token: SD 2.x pads over what follows,
    # SD 1.x (pad == end) keeps it.
    assert chunk_prompt(SD2, "a <|endoftext|> b").ids.tolist() == [[BOS, A, EOS] + [pad] * 74]
    assert chunk_prompt(SD1, "a <|endoftext|> b").ids.tolist() == [window([A, EOS, B])]


# --- encode_prompt / encode_prompts ------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = TextEncoder(TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        # The final layer norm would otherwise give every token a mean of ~0, and the mean
        # restoration would divide noise by noise.
        model.final_layer_norm.bias.add_(0.5)
    return model


def run(encoder, ids, clip_skip=1):
    with torch.no_grad():
        return encoder(ids, clip_skip=clip_skip)


@pytest.mark.parametrize("tokenizer", [SD1, SD2], ids=["sd1", "sd2"])
@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "a, b: c", words(75)])
def test_plain_prompt_equals_tokenizer_and_encoder(encoder, tokenizer, clip_skip, prompt):
    with torch.no_grad():
        out = encode_prompt(encoder, tokenizer, prompt, clip_skip=clip_skip)
    assert torch.equal(out, run(encoder, tokenizer([prompt]), clip_skip))


def test_plain_prompt_equality_in_bfloat16(encoder):
    model = TextEncoder(encoder.config)
    model.load_state_dict(encoder.state_dict())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = encode_prompt(model, SD1, "a photo of a cat")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, run(model, SD1(["a photo of a cat"])))


def weighted_reference(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[EM]: original_mean = z.mean(); z = z * multipliers; z = z * (original_mean / z.mean())."""
    weighted = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
    return weighted * (z.mean() / weighted.mean())


def test_mean_restoration(encoder):
    prompt = "a (red circle:2) on [white]"
    chunks = chunk_prompt(SD1, prompt)
    z = run(encoder, SD1(["a red circle on white"]))
    assert torch.equal(chunks.ids, SD1(["a red circle on white"]))
    with torch.no_grad():
        out = encode_prompt(encoder, SD1, prompt)
    assert out.shape == (1, 77, 32)
    torch.testing.assert_close(out, weighted_reference(z, chunks.weights), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mean(), z.mean(), rtol=1e-5, atol=1e-6)
    # The restoration is a real rescale here (not ~1), and weighted tokens stand out by their weight.
    scale = (z.mean() / (z * chunks.weights[..., None]).mean()).item()
    assert abs(scale - 1) > 0.01
    torch.testing.assert_close(out[0, 0], z[0, 0] * scale)
    torch.testing.assert_close(out[0, 2], z[0, 2] * 2 * scale)
    torch.testing.assert_close(out[0, 5], z[0, 5] / 1.1 * scale)


def test_long_prompt_chunks_are_encoded_and_weighted_separately(encoder):
    prompt = "(" + words(10) + ":2) " + words(80)  # 90 tokens: weighted ones all in chunk 0
    chunks = chunk_prompt(SD1, prompt)
    assert chunks.n_chunks == 2
    with torch.no_grad():
        out = encode_prompt(encoder, SD1, prompt)
    assert out.shape == (1, 154, 32)
    z0, z1 = run(encoder, chunks.ids[:1]), run(encoder, chunks.ids[1:])
    torch.testing.assert_close(out[:, :77], weighted_reference(z0, chunks.weights[:1]), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, 77:], z1)  # its own mean, untouched by chunk 0's weights
    assert chunks.ids[1].tolist() == window([A] * 15)


def test_n_chunks_pads_with_empty_prompt(encoder):
    # [CD] pad_cond: torch.cat([tensor, empty.repeat(...)], axis=1), empty = the encoded "" prompt.
    empty = run(encoder, SD1([""]))
    with torch.no_grad():
        out = encode_prompt(encoder, SD1, "a cat", n_chunks=3)
    assert out.shape == (1, 231, 32)
    assert torch.equal(out[:, :77], run(encoder, SD1(["a cat"])))
    assert torch.equal(out[:, 77:154], empty)
    assert torch.equal(out[:, 154:], empty)
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="n_chunks"):
            encode_prompt(encoder, SD1, words(80), n_chunks=bad)


def test_prompt_and_negative_prompt_get_equal_length(encoder):
    prompt, negative = words(100) + ", (masterpiece:1.2)", "ugly, [blurry]"
    with torch.no_grad():
        cond, uncond = encode_prompts(encoder, SD1, [prompt, negative])
        single_cond = encode_prompt(encoder, SD1, prompt)
        single_uncond = encode_prompt(encoder, SD1, negative, n_chunks=2)
    assert cond.shape == uncond.shape == (154, 32)
    assert single_cond.shape == single_uncond.shape == (1, 154, 32)
    # Each row is weighted with its own mean, whatever else is in the batch.
    torch.testing.assert_close(cond, single_cond[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond, single_uncond[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond[77:], run(encoder, SD1([""]))[0], rtol=1e-5, atol=1e-5)


def test_encode_prompts_batch(encoder):
    prompts = ["a cat", words(160), "", "a cat"]
    with torch.no_grad():
        out = encode_prompts(encoder, SD1, prompts, clip_skip=2)
        longer = encode_prompts(encoder, SD1, prompts, clip_skip=2, n_chunks=4)
    assert out.shape == (4, 231, 32)
    assert torch.equal(out[0], out[3])
    torch.testing.assert_close(out[0, :77], run(encoder, SD1(["a cat"]), 2)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], run(encoder, SD1([""]), 2)[0].repeat(3, 1), rtol=1e-5, atol=1e-5)
    assert longer.shape == (4, 308, 32)
    torch.testing.assert_close(longer[:, :231], out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(encoder, SD1, [])
    with pytest.raises(ValueError, match="list"):
        encode_prompts(encoder, SD1, "a cat")


def test_unweighted_prompt_with_zero_mean_is_not_nan():
    """An untrained final LayerNorm gives text vectors of mean exactly 0: plain prompts must pass
    through unchanged (A1111's rescale would be 0 / 0), weighted ones still get rescaled."""
    from latentforge.prompts import _apply_weights

    hidden = torch.randn(2, 77, 8)
    hidden = hidden - hidden.mean(dim=(1, 2), keepdim=True)
    hidden[0] -= hidden[0].mean()  # exactly zero-mean in float32 for row 0
    hidden[0, 0, 0] -= hidden[0].sum()
    assert hidden[0].mean() == 0
    weights = torch.ones(2, 77)
    weights[1, 3] = 1.5
    out = _apply_weights(hidden, weights)
    assert torch.equal(out[0], hidden[0])
    assert torch.isfinite(out).all() and not torch.equal(out[1], hidden[1])
