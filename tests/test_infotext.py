"""AUTOMATIC1111's infotext: written in the webui's layout, read by its rule (linear time)."""

import contextlib
import json
import random
import re

import pytest

from latentforge import infotext
from latentforge.infotext import GenerationInfo, format_infotext, parse_infotext

# The webui's own rule (modules/infotext_utils.py, parse_generation_parameters), verbatim: the reference
# that parse_infotext must agree with. Its regex takes time quadratic in the length of the last line.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def info(**overrides) -> GenerationInfo:
    fields = dict(
        prompt="a photo of a cat, (masterpiece:1.2)",
        steps=20,
        sampler="Euler a",
        schedule_type="Automatic",
        cfg_scale=7.0,
        seed=1234,
        width=512,
        height=512,
        model_hash="abcdef1234",
        model_name="v1-5-pruned-emaonly",
        version="latentforge 0.1.0",
    )
    return GenerationInfo(**{**fields, **overrides})


# --------------------------------------------------------------------------- infotext: writing


def test_infotext_txt2img_without_negative_prompt():
    assert format_infotext(info()) == (
        "a photo of a cat, (masterpiece:1.2)\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: abcdef1234, Model: v1-5-pruned-emaonly, Version: latentforge 0.1.0"
    )


def test_infotext_img2img_with_negative_prompt_and_extras_in_a1111_order():
    text = format_infotext(
        info(
            negative_prompt="blurry, lowres",
            sampler="DPM++ 2M",
            schedule_type="Karras",
            cfg_scale=7.5,
            width=768,
            height=512,
            denoising_strength=0.75,
            clip_skip=2,
            mask_blur=4,
        )
    )
    assert text == (
        "a photo of a cat, (masterpiece:1.2)\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 768x512, "
        "Model hash: abcdef1234, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Clip skip: 2, "
        "Mask blur: 4, Version: latentforge 0.1.0"
    )


def test_infotext_leaves_out_what_does_not_apply():
    text = format_infotext(info(model_hash="", model_name=None, clip_skip=1, version=None, denoising_strength=1.0))
    assert text.splitlines()[-1] == (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Denoising strength: 1"
    )


def test_infotext_quotes_values_as_a1111_does():
    extra = {"Lora hashes": "a: 1, b: 2", "Note": 'say "hi"'}
    text = format_infotext(info(model_name="my model, v2: final", extra=extra))
    last = text.splitlines()[-1]
    # json.dumps(ensure_ascii=False) for ",", ":" or a newline; a bare '"' alone is written as it is
    assert 'Model: "my model, v2: final"' in last
    assert 'Lora hashes: "a: 1, b: 2", Note: say "hi", Version: latentforge 0.1.0' in last
    assert format_infotext(info(model_name="ü: 猫")).splitlines()[-1].count('Model: "ü: 猫"') == 1


def test_infotext_extra_keys_keep_a1111_positions():
    # a key the webui places itself keeps its place even when it arrives as an extra
    text = format_infotext(info(extra={"Hires upscale": 2, "Denoising strength": 0.5}, version=None))
    assert text.endswith("Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Hires upscale: 2")


def test_infotext_refiner_as_a1111_writes_it():
    # the webui: extra_generation_params['Refiner'] = the checkpoint's short_title ("name [short hash]"),
    # ['Refiner switch at'] = the fraction, both after "Mask blur" (set before sampling) and before "Version"
    refined = info(refiner_name="sd_xl_refiner_1.0", refiner_hash="7440042bbd", refiner_switch_at=0.8, mask_blur=4)
    assert format_infotext(refined).splitlines()[-1].endswith(
        "Mask blur: 4, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: latentforge 0.1.0"
    )
    no_hash = format_infotext(info(refiner_name="refiner", refiner_hash="", refiner_switch_at=0.5, version=None))
    assert no_hash.endswith("Model: v1-5-pruned-emaonly, Refiner: refiner, Refiner switch at: 0.5")
    # a switch fraction without a refiner names nothing that ran
    assert "Refiner" not in format_infotext(info(refiner_switch_at=0.8))
    parsed = parse_infotext(format_infotext(refined))
    assert parsed["Refiner"] == "sd_xl_refiner_1.0 [7440042bbd]" and parsed["Refiner switch at"] == "0.8"
    quoted = parse_infotext(format_infotext(info(refiner_name="my refiner, v2", refiner_hash="0123456789")))
    assert quoted["Refiner"] == "my refiner, v2 [0123456789]"


# --------------------------------------------------------------------------- infotext: reading


@pytest.mark.parametrize(
    "case",
    [
        info(),
        info(negative_prompt="ugly, blurry"),
        info(prompt="line one\nline two, with: colon", negative_prompt="neg one\nneg two"),
        info(model_name='model, with "quotes": yes', denoising_strength=0.35, clip_skip=2, mask_blur=8),
        info(prompt="一只猫 🐱", negative_prompt="ß", model_name="ünïcode", cfg_scale=4.5, seed=4294967295),
        info(model_name='"quoted"', sampler="DPM++ 2M SDE", schedule_type="Exponential"),
    ],
)
def test_format_then_parse_round_trip(case):
    parsed = parse_infotext(format_infotext(case))
    assert parsed["Prompt"] == case.prompt
    assert parsed["Negative prompt"] == case.negative_prompt
    assert parsed["Steps"] == str(case.steps)
    assert parsed["Sampler"] == case.sampler
    assert parsed["Schedule type"] == case.schedule_type
    assert float(parsed["CFG scale"]) == case.cfg_scale
    assert int(parsed["Seed"]) == case.seed
    assert (parsed["Size-1"], parsed["Size-2"]) == (str(case.width), str(case.height))
    assert parsed["Model hash"] == case.model_hash
    assert parsed["Model"] == case.model_name
    assert parsed["Version"] == case.version
    if case.denoising_strength is not None:
        assert float(parsed["Denoising strength"]) == case.denoising_strength
    assert parsed.get("Clip skip", "1") == str(case.clip_skip)
    if case.mask_blur is not None:
        assert parsed["Mask blur"] == str(case.mask_blur)


def test_parse_a1111_infotext():
    # the example in the webui's parse_generation_parameters docstring, plus a quoted value
    text = (
        "girl with an artist's beret, determined, blue eyes\n"
        "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, '
        'Lora hashes: "add_detail: 7c6bad76eb54", Seed resize from: 768x640'
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "girl with an artist's beret, determined, blue eyes"
    assert parsed["Negative prompt"] == "ugly, fat, (((deformed))), [blurry]"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "Euler a" and parsed["CFG scale"] == "7"
    assert parsed["Model hash"] == "45dee52b"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "512")
    assert (parsed["Seed resize from-1"], parsed["Seed resize from-2"]) == ("768", "640")
    assert "Size" not in parsed


def test_parse_last_line_with_few_pairs_is_prompt():
    parsed = parse_infotext("a cat\nstyle: watercolor, mood: calm")
    assert parsed == {"Prompt": "a cat\nstyle: watercolor, mood: calm", "Negative prompt": ""}


def a1111_parse(text: str) -> dict[str, str]:
    """parse_generation_parameters as the webui writes it (regex and all), without its defaults."""
    *lines, last = text.strip().split("\n")
    if len(A1111_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_RE_PARAM.findall(last):
        if not value:
            continue
        if value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        size = A1111_RE_IMAGESIZE.match(value) if isinstance(value, str) else None
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = str(value)
    return result


# what infotexts hold, and what breaks parsers: quotes, escapes, separators, Unicode letters and spaces
JUNK = 'ab Z_9 \t:,,"\\\\-/\'é猫\u00a0\u2028\r'
KEYS = ["Steps", "Sampler", "CFG scale", "Lora hashes", "Hires upscaler", "Model-hash", "TI/x", "a", "Size"]


def random_value(rng: random.Random) -> str:
    kind = rng.randrange(5)
    text = "".join(rng.choice(JUNK) for _ in range(rng.randrange(12)))
    if kind == 0:  # a quoted value as A1111 writes it: escapes, commas, colons inside
        return json.dumps(text, ensure_ascii=rng.random() < 0.5)
    if kind == 1:  # a quote that is never closed, or closed and followed by more
        return '"' + text + rng.choice(["", '"x', '" ', '\\"'])
    if kind == 2:
        return f"{rng.randrange(2000)}x{rng.randrange(2000)}"
    return text


def random_infotext(rng: random.Random) -> str:
    lines = ["".join(rng.choice(JUNK + "(:1.2)") for _ in range(rng.randrange(30))) for _ in range(rng.randrange(3))]
    if rng.random() < 0.6:
        lines.append("Negative prompt: " + "".join(rng.choice(JUNK) for _ in range(rng.randrange(20))))
        lines += ["more negative, " + random_value(rng)] * rng.randrange(2)
    pairs = [f"{rng.choice(KEYS)}:{rng.choice(['', ' ', '  ', chr(9)])}{random_value(rng)}" for _ in range(rng.randrange(7))]
    last = rng.choice([", ", ",", " , "]).join(pairs)
    if rng.random() < 0.3:  # junk spliced in anywhere
        at = rng.randrange(len(last) + 1)
        last = last[:at] + "".join(rng.choice(JUNK) for _ in range(rng.randrange(8))) + last[at:]
    if rng.random() < 0.5:
        last = "Steps: 20, " + last
    return "\n".join([*lines, last])


def test_parse_agrees_with_the_webuis_regex_on_generated_infotexts():
    rng = random.Random(16)
    with_params = 0
    for _ in range(4000):
        text = random_infotext(rng)
        assert parse_infotext(text) == a1111_parse(text), repr(text)
        with_params += len(A1111_RE_PARAM.findall(text.strip().split("\n")[-1])) >= 3
    assert with_params > 1000  # the generator reaches the parameter lines, not only prompts


def test_pairs_agree_with_the_webuis_findall_on_junk():
    rng = random.Random(7)
    for _ in range(4000):
        line = "".join(rng.choice(JUNK + "k") for _ in range(rng.randrange(40)))
        assert infotext._pairs(line) == A1111_RE_PARAM.findall(line), repr(line)


def adversarial_lines(n: int) -> dict[str, str]:
    """Last lines of about n characters that make the webui's regex quadratic, or stress each branch."""
    rng = random.Random(n)
    return {
        "one word": "a" * n,
        "words and spaces": "ab " * (n // 3),
        "spaces": " " * n + "k",
        "colons": "a:" * (n // 2),
        "commas": "," * n,
        "quotes": '"' * n,
        "unclosed quote": 'kk: "' + "x" * n,
        "backslashes": 'kk: "' + "\\" * n,
        "escaped quotes": 'kk: "' + '\\"' * (n // 2),
        "quote then junk": 'kk: "a" b,' * (n // 10),
        "pairs": "key: value, " * (n // 12),
        "quoted pairs": 'kk: "a\\",b", ' * (n // 14),
        "junk": "".join(rng.choice(JUNK + "k") for _ in range(n)),
    }


def test_parse_examines_each_character_a_bounded_number_of_times(monkeypatch):
    """Linear time, counted: every character the parser looks at is counted by its three scanning helpers,
    and on lines that take the webui's regex quadratic time (80,000 characters: 32 s) the count stays
    within three times the line's length, at every size."""
    examined = [0]

    def counting(helper):
        def run(*args):
            line, start = args[-2], args[-1]
            stop = helper(*args)
            examined[0] += (len(line) if stop < 0 else stop) - start + 1
            return stop

        return run

    for name in ("_scan", "_find_comma", "_closing_quote"):
        monkeypatch.setattr(infotext, name, counting(getattr(infotext, name)))
    for n in (1_000, 10_000, 100_000):
        for name, line in adversarial_lines(n).items():
            examined[0] = 0
            parse_infotext("a prompt\n" + line)
            assert len(line) // 2 <= examined[0] <= 3 * len(line) + 3, (name, n, examined[0])
    for name, line in adversarial_lines(2_000).items():  # and the same answers as the webui
        assert infotext._pairs(line) == A1111_RE_PARAM.findall(line), name
