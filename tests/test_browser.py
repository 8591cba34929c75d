"""The web page in headless Chromium (Debian's `chromium` package, driven by Playwright; no browser
download): type a prompt, press Generate, watch the progress and the step previews, see the image.

Without Playwright or Chromium this test fails, saying what to install: it is never skipped.
"""

import base64
import contextlib
import io
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from latentforge.server import ServerThread, Settings, create_app

# Chromium as Debian installs it (apt-get install chromium); LATENTFORGE_CHROMIUM names another binary
CHROMIUM = os.environ.get("LATENTFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# headless as root in a sandbox with no network: no GPU, no sandbox, none of Chromium's own connections
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


def playwright_or_fail():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright (in the test extras)")
    if CHROMIUM is None:
        pytest.fail("the browser test needs Chromium: apt-get install -y chromium (or set LATENTFORGE_CHROMIUM)")
    return sync_playwright


@contextlib.contextmanager
def opened_page(settings: Settings, path: str = "/"):
    """A page (`path`) of a server with these settings, in headless Chromium; no page error may happen meanwhile."""
    sync_playwright = playwright_or_fail()
    errors = []
    with ServerThread(create_app(settings)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + path)
            yield page
        finally:
            browser.close()
    assert errors == []



def generated_caption(page) -> str:
    """Press Generate, wait for the image in the gallery, and return its caption (the infotext)."""
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=120_000)
    return page.inner_text("#gallery figcaption")

def test_the_page_generates_an_image_with_live_progress(sd1_folder, tmp_path):
    sync_playwright = playwright_or_fail()
    app = create_app(Settings(models=[str(sd1_folder)]))
    errors = []
    with ServerThread(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(bypass_csp=True)  # the page forbids eval, which wait_for_function uses
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_selector("#sampler option[value='DPM++ 2M']", state="attached")
            page.fill("#prompt", "a red circle")
            page.fill("#steps", "300")  # long enough (a few seconds) to watch it run
            page.fill("#seed", "7")
            page.select_option("#sampler", "Euler")
            page.click("#generate")
            page.wait_for_function("0 < document.getElementById('progress').value")
            assert "step" in page.inner_text("#status")
            page.wait_for_selector("#frames img")  # a step preview: the image emerging from noise
            assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
            page.wait_for_selector("#gallery figure img", timeout=120_000)
            page.screenshot(path=tmp_path / "page.png", full_page=True)  # to look at, when it fails
            caption = page.inner_text("#gallery figcaption")
            assert caption.startswith("a red circle") and "Seed: 7," in caption and "Sampler: Euler," in caption
            assert page.eval_on_selector("#gallery img", "image => image.naturalWidth") == 64
            assert page.inner_text("#status") == "done" and page.is_enabled("#generate")
        finally:
            browser.close()
    assert errors == []


def test_the_page_lists_loras_and_embeddings_and_inserts_them(sd1_folder, tmp_path):
    """Names from the folders become buttons (as text, never markup) that insert `<lora:NAME:1>` or the
    embedding's name at the cursor; the image made from that prompt names the LoRA in its infotext."""
    import torch

    import latentforge
    from latentforge.weightfiles import write_safetensors
    from test_lora import kohya_lora

    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    write_safetensors(kohya_lora(pipe, seed=1), loras / "ink&amp;.safetensors")
    write_safetensors({"emb_params": torch.randn(2, pipe.config.text_encoder.width) * 0.05}, embeddings / "zorblax.safetensors")
    settings = Settings(models=[str(sd1_folder)], lora_dirs=[str(loras)], embedding_dirs=[str(embeddings)])
    with opened_page(settings) as page:
        page.wait_for_selector("#loras .chip", state="attached")
        page.click("#networks summary")
        assert page.inner_text("#loras .chip") == "ink&amp;" and page.inner_text("#embeddings .chip") == "zorblax"
        page.fill("#prompt", "a red circle")
        page.click("#loras .chip")
        page.click("#embeddings .chip")
        assert page.input_value("#prompt") == "a red circle <lora:ink&amp;:1> zorblax"
        page.fill("#steps", "2")
        caption = generated_caption(page)
        assert 'Lora hashes: "ink&amp;: ' in caption and "TI hashes" in caption


def test_the_page_runs_the_hires_fix(sd1_folder, tmp_path):
    """The hires panel's settings reach txt2img: the image comes back at the larger size, with A1111's hires
    entries in its infotext."""
    with opened_page(Settings(models=[str(sd1_folder)])) as page:
        page.wait_for_selector("#hr_upscaler option[value='Lanczos']", state="attached")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "4")
        page.click("#hires summary")
        page.check("#enable_hr")
        page.fill("#hr_scale", "1.5")
        page.select_option("#hr_upscaler", "Latent (bicubic)")
        caption = generated_caption(page)
        assert "Hires upscale: 1.5" in caption and "Hires upscaler: Latent (bicubic)" in caption
        assert page.eval_on_selector("#gallery img", "image => image.naturalWidth") == 96


def test_a_pngs_parameters_fill_the_form(sd1_folder, tmp_path):
    """A1111's PNG Info -> Send to txt2img: choosing a PNG fills the prompts, settings and seeds from its
    infotext, and Generate makes that image's settings again."""
    text = ("a blue square\nNegative prompt: blurry\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 4.5, Seed: 77, Size: 64x64, Variation seed: 5, Variation seed strength: 0.25, Tiling: True")  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(tmp_path / "made.png", pnginfo=info)
    with opened_page(Settings(models=[str(sd1_folder)])) as page:
        page.wait_for_selector("#sampler option[value='DPM++ 2M Karras']", state="attached")
        page.set_input_files("#png", str(tmp_path / "made.png"))
        deadline = time.monotonic() + 30  # polled here: the page's CSP forbids wait_for_function's eval
        while page.input_value("#prompt") != "a blue square" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert page.input_value("#negative_prompt") == "blurry" and page.input_value("#sampler") == "DPM++ 2M Karras"
        assert (page.input_value("#steps"), page.input_value("#seed"), page.input_value("#subseed")) == ("5", "77", "5")
        assert page.is_checked("#tiling") and page.input_value("#randn_source") == "GPU"  # A1111's default
        caption = generated_caption(page)
        for part in ("Steps: 5, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 77",
                     "Variation seed: 5, Variation seed strength: 0.25", "RNG: GPU, Tiling: True"):  # fmt: skip
            assert part in caption
        Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
        page.set_input_files("#png", str(tmp_path / "plain.png"))
        page.wait_for_selector("#error:not([hidden])")
        assert "plain.png: no generation parameters in it" in page.text_content("#error")


def test_the_page_inpaints_an_image_of_ones_own(sd1_folder, tmp_path):
    """The img2img panel: an image and a mask go to /img2img with the panel's settings (A1111's page defaults:
    original content, whole picture, mask blur 4), and the unmasked pixels come back as they were."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    hole = Image.new("L", (64, 64))
    hole.paste(255, (16, 16, 48, 48))
    hole.save(tmp_path / "hole.png")
    with opened_page(Settings(models=[str(sd1_folder)])) as page:
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "4")
        page.click("#img2img summary")
        page.set_input_files("#init_image", str(tmp_path / "picture.png"))
        page.set_input_files("#mask", str(tmp_path / "hole.png"))
        page.fill("#img2img_strength", "0.6")
        page.fill("#mask_blur", "0")
        caption = generated_caption(page)
        assert "Denoising strength: 0.6" in caption and "Mask blur: 0" in caption and "Masked content" not in caption
        shown = page.get_attribute("#gallery figure img", "src")
    made = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))).convert("RGB"))
    outside = np.asarray(hole) == 0
    assert np.array_equal(made[outside], np.asarray(picture)[outside])  # put back, as A1111 does


def test_the_page_sends_the_variation_seed(sd1_folder):
    """The variation panel's seed, strength and seed-resize size reach txt2img and the image's infotext."""
    with opened_page(Settings(models=[str(sd1_folder)])) as page:
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "4")
        page.click("#variation summary")
        page.fill("#subseed", "77")
        page.fill("#subseed_strength", "0.25")
        page.fill("#seed_resize_from_w", "48")
        page.fill("#seed_resize_from_h", "72")
        caption = generated_caption(page)
        assert "Variation seed: 77, Variation seed strength: 0.25, Seed resize from: 48x72" in caption


def test_the_page_hands_the_last_steps_to_a_refiner(sd1_folder, tmp_path):
    """The refiner panel lists the configured models; choosing one sends refiner_checkpoint and
    refiner_switch_at, and the image's infotext names the refiner as A1111 writes it."""
    for name in ("base", "finisher"):
        (tmp_path / name).symlink_to(sd1_folder, target_is_directory=True)
    settings = Settings(models=[str(tmp_path / "base"), str(tmp_path / "finisher")])
    with opened_page(settings) as page:
        page.wait_for_selector("#refiner_checkpoint option[value='finisher']", state="attached")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "4")
        page.click("#refiner summary")
        page.select_option("#refiner_checkpoint", "finisher")
        page.fill("#refiner_switch_at", "0.5")
        caption = generated_caption(page)
        assert "Refiner: finisher [" in caption and "Refiner switch at: 0.5" in caption


@pytest.mark.parametrize("model", ["shipped", "tiny sd1"])
def test_the_explain_page_opens_with_every_section_and_its_images(model, sd1_folder):
    console = []
    path = "/explain?prompt=a%20red%20circle%20above%20a%20blue%20square&seed=3&steps=3"
    settings = Settings() if model == "shipped" else Settings(models=[str(sd1_folder)])
    with opened_page(settings, path) as page:
        page.on("console", lambda message: console.append(message.text) if message.type == "error" else None)
        page.reload()  # again, with the console listened to
        sections = page.locator("section")
        assert sections.evaluate_all("s => s.map(e => e.id)") == [
            "parts", "generation", "guidance", "attention", "forward", "latent", "clip"
        ]  # fmt: skip
        for i in range(sections.count()):
            images = sections.nth(i).locator("img")
            assert images.count() >= 1
            # every image decoded: a data URI the page's policy allows, drawn at its size
            assert images.evaluate_all("s => s.every(i => i.complete && i.naturalWidth > 50)")
    assert console == []


def test_the_explain_button_opens_the_page_for_the_prompt(sd1_folder):
    with opened_page(Settings(models=[str(sd1_folder)])) as page:
        page.fill("#prompt", "a blue square")
        page.fill("#seed", "4")
        page.fill("#steps", "2")
        with page.context.expect_page() as opened:
            page.click("#explain")
        explained = opened.value
        explained.wait_for_selector("section#clip", timeout=120_000)
        assert "prompt=a+blue+square" in explained.url and "seed=4" in explained.url and "steps=2" in explained.url
        assert explained.locator("section").count() == 7


def test_the_fast_box_asks_for_the_fast_preset(sd1_folder):
    """Ticking Fast sends override_settings.speed_preset = fast: the image's infotext carries the preset's options."""
    from latentforge.speed import PRESETS

    with opened_page(Settings(models=[str(sd1_folder)])) as page:
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "4")
        page.check("#fast")
        caption = generated_caption(page)
        fast = PRESETS["fast"]
        assert f"NGMS: {fast.s_min_uncond:g}" in caption and f"Token merging ratio: {fast.token_merging:g}" in caption
