"""latentforge explain: the page is written, has every section with its images, and its figures are the run's."""

import base64
import io
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import latentforge
from latentforge.adapters.embeddings import read_embedding
from latentforge.cli import main
from latentforge.explain import MISSING, explain, write_page
from latentforge.images import image_to_tensor

SECTIONS = ["parts", "generation", "guidance", "attention", "forward", "latent", "clip"]
PROMPT = "a red circle above a blue square"


class Sections(HTMLParser):
    """The page's sections by id, each with the decoded PNGs of its <img> data URIs."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, list[Image.Image]] = {}
        self.current = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = attrs["id"]
            self.sections[self.current] = []
        elif tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            image = Image.open(io.BytesIO(base64.b64decode(attrs["src"][len(prefix) :])))
            image.load()
            self.sections[self.current].append(image)


def page_sections(path) -> dict[str, list[Image.Image]]:
    parser = Sections()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.sections


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load()


def check_page(path):
    sections = page_sections(path)
    assert list(sections) == SECTIONS
    for name, images in sections.items():
        assert images, f"section {name} has no image"
        assert all(min(image.size) > 50 for image in images)
    html = path.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # nothing to fetch: readable offline


def test_the_page_for_the_shipped_model(tmp_path):
    out = tmp_path / "explain.html"
    assert main(["explain", PROMPT, "--seed", "2", "--out", str(out)]) == 0
    check_page(out)


def test_the_page_for_a_tiny_sd1_model(sd1_folder, tmp_path):
    pipe = latentforge.load(sd1_folder, dtype="float32")
    out = tmp_path / "explain.html"
    run = write_page(pipe, PROMPT, out, seed=1, steps=3)
    check_page(out)
    assert len(run.steps) == 3 and run.shown == [0, 1, 2]  # every step of a short run is drawn
    assert run.context.shape == (77, pipe.config.unet.context_dim)


def test_the_page_for_a_tiny_sdxl_model(tmp_path_factory, tmp_path):
    from test_sdxl import saved_sdxl

    pipe = latentforge.load(saved_sdxl(tmp_path_factory.mktemp("sdxl")), dtype="float32")
    out = tmp_path / "explain.html"
    run = write_page(pipe, PROMPT, out, seed=1, steps=3)
    check_page(out)
    assert run.context.shape == (77, pipe.config.unet.context_dim)  # both towers' vectors, joined
    assert run.attention.sum_error < 1e-4 and run.attention.maps


def pixel_gap(a: Image.Image, b: Image.Image) -> int:
    """The largest difference of two images in levels (0-255): decoded in a batch, a pixel may round by one."""
    return int(np.abs(pixels(a).astype(int) - pixels(b)).max())


def test_the_figures_are_the_run(shipped):
    run = explain(shipped, PROMPT, seed=5)
    # the step images are the decoded latents a plain generation's callback reports
    steps = []
    image = shipped.generate(PROMPT, seed=5, callback=steps.append)[0]
    assert np.array_equal(pixels(image), pixels(run.image))
    assert np.array_equal(pixels(shipped.decode(run.latents)[0]), pixels(image))
    assert run.shown[0] == 0 and run.shown[-1] == len(steps) - 1
    for shown, i in enumerate(run.shown):
        assert pixel_gap(run.step_images[shown], shipped.decode(steps[i].latents)[0]) <= 1
        assert pixel_gap(run.denoised_images[shown], shipped.decode(steps[i].denoised)[0]) <= 1
    assert [s.sigma for s in run.steps] == [s.sigma for s in steps]
    # guidance: the prompt changes the prediction at every step drawn; the default scale's mix is the run's
    # own prediction at that step
    assert run.guidance_steps and set(run.guidance_steps) <= set(run.shown) - {0}
    assert run.scales == [1.0, shipped.config.defaults.cfg_scale, 7.5]
    assert all(float(d.max()) > 0 for d in run.differences)
    for j, i in enumerate(run.guidance_steps):
        assert pixel_gap(run.guidance_images[j][2], run.denoised_images[run.shown.index(i)]) <= 1
    assert not run.scale_runs  # the whole runs at each scale only when asked for
    # forward diffusion's level 0 is the VAE round trip of the input
    z = shipped.encode_image(image_to_tensor(run.source), torch.Generator().manual_seed(5))
    round_trip = pixels(shipped.decode(z)[0])
    assert run.noise_steps[0] is None
    assert np.array_equal(pixels(run.noised_images[0]), round_trip)
    assert np.array_equal(pixels(run.reconstruction), round_trip)
    # the later levels are noisier: further from the clean image
    distances = [np.abs(pixels(im).astype(int) - round_trip).mean() for im in run.noised_images]
    assert distances[0] == 0 and distances[-1] > distances[1]
    # the tokens: start, the prompt, end, then padding, 77 in all
    assert len(run.ids) == 77 and run.ids[0] == run.special["start"]
    assert run.ids[len(PROMPT.split()) + 1] == run.special["end"]
    assert torch.allclose(run.similarity.diagonal(), torch.ones(len(run.variations)), atol=1e-5)


def test_the_guidance_mixes_are_the_unets_two_predictions():
    """Each guidance column: the empty prompt's and the prompt's predicted clean latents at the step's input (the
    latents the step before left), asked of the UNet again here one prompt at a time, and mixed at each scale."""
    from latentforge.guidance import Guidance, make_denoiser
    from latentforge.samplers import get_sampler
    from latentforge.schedules import NoiseSchedule

    pipe = latentforge.load(dtype="float32")
    run = explain(pipe, PROMPT, seed=4)
    cond, uncond = pipe.encode_prompt(PROMPT, "")
    spec = get_sampler(pipe.config.defaults.sampler)
    schedule = NoiseSchedule.from_config(pipe.config.scheduler or {})
    timestep = lambda sigma: spec.timestep(schedule, sigma)  # noqa: E731
    alone = {side: make_denoiser(pipe.unet, timestep, pipe.config.prediction_type, Guidance(c, None, 1.0))
             for side, c in (("uncond", uncond), ("cond", cond))}  # fmt: skip
    for j, i in enumerate(run.guidance_steps):
        before = run.steps[i - 1]
        sigma = torch.tensor(before.sigma)
        x = before.latents * torch.sqrt(1 + sigma**2)
        u, c = alone["uncond"](x, sigma), alone["cond"](x, sigma)
        expected = [u] + [u + s * (c - u) for s in run.scales]  # x0 is affine in the UNet's output
        for got, want in zip(run.guidance_images[j], expected):
            assert pixel_gap(got, pipe.decode(want)[0]) <= 2
        assert torch.allclose(run.differences[j], (c - u).abs().mean(1)[0], atol=1e-4)


def test_guidance_runs_and_fast_decode(shipped, sd1_folder):
    run = explain(shipped, PROMPT, seed=6, guidance_runs=True, fast_decode=True)
    # the same seed generated to the end at each scale
    for got, scale in zip(run.scale_runs, run.scales):
        assert np.array_equal(pixels(got), pixels(shipped.generate(PROMPT, seed=6, cfg_scale=scale)[0]))
    # the figures painted by the tiny decoder; the image and the round trip stay the VAE's
    assert run.decoder == "the tiny decoder (TAESD)"
    for shown, i in enumerate(run.shown):
        assert pixel_gap(run.step_images[shown], shipped.preview(run.steps[i].latents)[0]) <= 1
    assert np.array_equal(pixels(run.image), pixels(shipped.decode(run.latents)[0]))
    assert np.array_equal(pixels(run.noised_images[0]), pixels(run.reconstruction))
    without = latentforge.load(sd1_folder, dtype="float32")
    with pytest.raises(ValueError, match="--tiny-decoder"):
        explain(without, PROMPT, steps=2, fast_decode=True)
    for steps, message in ((2.5, "steps must be a whole number, got 2.5"), (0, "steps must be between 1 and")):
        with pytest.raises(ValueError, match=message):
            explain(shipped, PROMPT, steps=steps)


def test_a_clip_run_adds_images_against_captions(tmp_path_factory, tmp_path, capsys):
    from test_training import tiny

    from latentforge.explain.clip import image_caption_similarity, read_clip
    from latentforge.training.clip import train_clip

    run_dir = tmp_path_factory.mktemp("explain-clip") / "clip"
    train_clip(tiny("clip", steps=2, sample_every=0), run_dir)
    run = explain(latentforge.load(), PROMPT, seed=3, steps=2, clip=run_dir)
    batch = image_caption_similarity(*read_clip(run_dir), seed=3)  # what that CLIP model says of its batch
    assert run.clip.captions == batch.captions and torch.equal(run.clip.similarity, batch.similarity)
    out = tmp_path / "explain.html"
    assert main(["explain", PROMPT, "--steps", "2", "--clip", str(run_dir), "--out", str(out)]) == 0
    check_page(out)
    assert len(page_sections(out)["clip"]) == 3  # the text side, the batch's images, the matrix
    # not a CLIP run: one line, before any generation
    capsys.readouterr()
    assert main(["explain", PROMPT, "--clip", str(tmp_path), "--out", str(tmp_path / "no.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a CLIP training run folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "no.html").exists()
    # the server's --explain-clip: its pages have the same figure; a folder that is no CLIP run fails at start
    import requests

    from latentforge.server import ServerThread, Settings, create_app

    with ServerThread(create_app(Settings(models=[None], explain_clip=str(run_dir)))) as url:
        page = requests.get(f"{url}/explain", params={"prompt": PROMPT, "seed": 3, "steps": 2}, timeout=300)
    parser = Sections()
    parser.feed(page.text)
    assert page.status_code == 200 and len(parser.sections["clip"]) == 3
    with pytest.raises(ValueError, match="not a CLIP training run folder"):
        create_app(Settings(models=[None], explain_clip=str(tmp_path)))


def test_a_long_prompt_shows_its_first_chunk_without_a_warning(shipped, tmp_path, recwarn):
    prompt = "a red circle above a blue square, " * 12  # 12 x 8 = 96 tokens: two chunks of 75
    run = explain(shipped, prompt, seed=1, steps=2)
    assert run.prompt_tokens == 96 and len(run.ids) == 77 and run.ids[76] == run.special["end"]
    assert not [w for w in recwarn if "longer than max_length" in str(w.message)]  # all the tokens were read
    out = tmp_path / "explain.html"
    write_page(shipped, prompt, out, seed=1, steps=2)
    assert "This prompt has 96 tokens" in out.read_text(encoding="utf-8")


def test_emphasis_is_read_as_the_run_reads_it(shipped, tmp_path):
    """The page's tokens are the run's: (red:1.4) is the token red at weight 1.4, not brackets and digits, so
    each attention map sits under its word."""
    plain = explain(shipped, "a red circle above a blue square", seed=1, steps=2)
    run = explain(shipped, "a (red:1.4) circle above a blue square", seed=1, steps=2)
    assert run.ids == plain.ids and run.tokens == plain.tokens
    red = run.tokens.index(next(t for t in run.tokens if t.strip().startswith("red")))
    assert run.weights[red] == pytest.approx(1.4) and sum(w != 1 for w in run.weights) == 1
    out = tmp_path / "explain.html"
    write_page(shipped, "a (red:1.4) circle above a blue square", out, seed=1, steps=2)
    assert "(x1.4)" in out.read_text(encoding="utf-8")


def test_an_embedding_is_listed_by_name_in_the_slots_the_run_gave_it(tmp_path):
    """A textual-inversion embedding of 2 vectors takes 2 slots in the run's window: the page names them
    (shinystyle#0, #1) where the run put them, and the attention maps of the words after it move with them."""
    pipe = latentforge.load()
    width = pipe.conditioner.text_encoder.config.width
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, tmp_path / "shinystyle.safetensors")
    pipe.conditioner.embeddings = {"shinystyle": read_embedding(tmp_path / "shinystyle.safetensors")}
    plain = explain(pipe, "a red circle", seed=1, steps=2)
    run = explain(pipe, "a shinystyle red circle", seed=1, steps=2)
    assert run.tokens[1:6] == [plain.tokens[1], "shinystyle#0", "shinystyle#1", *plain.tokens[2:4]]
    assert run.ids[2:4] == list(range(pipe.conditioner.tokenizer.vocab_size, pipe.conditioner.tokenizer.vocab_size + 2))
    assert run.prompt_tokens == plain.prompt_tokens + 2
    assert run.image.tobytes() != plain.image.tobytes()  # the run read the vectors, not the name as words
    out = tmp_path / "explain.html"
    write_page(pipe, "a shinystyle red circle", out, seed=1, steps=2)
    assert "shinystyle#1" in out.read_text(encoding="utf-8")


def test_an_image_of_ones_own(shipped, tmp_path):
    source = Image.new("RGB", (64, 64), "white")
    source.paste((0, 0, 255), (8, 8, 30, 30))
    run = explain(shipped, PROMPT, seed=0, image=source)
    assert run.source.size == (64, 64)
    # the round trip keeps the blue square in the top-left
    assert pixels(run.reconstruction)[19, 19, 2] > 150 and pixels(run.reconstruction)[19, 19, 0] < 100


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_attention_maps_are_distributions_and_find_the_object(shipped, side):
    run = explain(shipped, f"a small red circle on the {side}, white background", seed=0)
    assert run.attention.sum_error < 1e-4  # every pixel's probabilities over the 77 tokens sum to 1
    assert set(run.attention.maps) == {0, len(run.steps) // 2, len(run.steps) - 1}
    circle = run.tokens.index(next(t for t in run.tokens if t.startswith("circle")))
    total = sum(run.attention.maps[s][circle] / run.attention.layers[s] for s in run.attention.maps)
    width = total.shape[-1]
    on_left = float(total[:, : width // 2].sum() / total.sum())
    assert on_left > 0.5 if side == "left" else on_left < 0.5
    # the judge knows where the object is: the image's red pixels are on that side too
    red = pixels(run.image)
    red = (red[..., 0] > 150) & (red[..., 1] < 100) & (red[..., 2] < 100)
    columns = np.nonzero(red)[1]
    assert len(columns) and (columns.mean() < red.shape[1] / 2) == (side == "left")


def test_text_encoders_freed_after_encoding_are_read_again():
    """With text_encoders_on_demand the towers are freed after each encoding: the page's text figures read them
    again, as a generation does, and give the same numbers."""
    kept = explain(latentforge.load(), PROMPT, seed=1, steps=2)
    pipe = latentforge.load()
    pipe.text_encoders_on_demand = True
    freed = explain(pipe, PROMPT, seed=1, steps=2)
    assert torch.equal(freed.similarity, kept.similarity) and torch.equal(freed.context, kept.context)


def test_the_probe_is_off_by_default_and_changes_nothing(shipped):
    from latentforge.unet import Attention

    assert all(m.probe is None for m in shipped.unet.modules() if isinstance(m, Attention))
    plain = pixels(shipped.generate(PROMPT, seed=3)[0])
    explain(shipped, PROMPT, seed=3)
    assert all(m.probe is None for m in shipped.unet.modules() if isinstance(m, Attention))  # taken off again
    assert np.array_equal(pixels(shipped.generate(PROMPT, seed=3)[0]), plain)


def test_without_matplotlib_one_line_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "explain.html"
    assert main(["explain", PROMPT, "--out", str(out)]) == 2
    assert MISSING in capsys.readouterr().err
    assert not out.exists()


def test_the_server_answers_the_page_for_its_current_model(sd1_folder):
    import requests

    from latentforge.server import ServerThread, Settings, create_app

    with ServerThread(create_app(Settings(models=[str(sd1_folder)]))) as url:
        answer = requests.get(f"{url}/explain", params={"prompt": PROMPT, "seed": 1, "steps": 2}, timeout=300)
        missing = requests.get(f"{url}/explain", timeout=30)
        runs = requests.get(f"{url}/explain", params={"prompt": PROMPT, "steps": 2, "guidance_runs": "true"}, timeout=300)
        no_tiny = requests.get(f"{url}/explain", params={"prompt": PROMPT, "fast_decode": "true"}, timeout=300)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    assert "img-src data:" in answer.headers["content-security-policy"]
    parser = Sections()
    parser.feed(answer.text)
    assert list(parser.sections) == SECTIONS and all(parser.sections.values())
    assert missing.status_code == 422  # the prompt is required
    assert "generated to the end" not in answer.text
    assert runs.status_code == 200 and "the same seed generated to the end at each of those scales" in runs.text
    assert no_tiny.status_code == 422 and "tiny decoder" in no_tiny.json()["detail"][0]["msg"]
