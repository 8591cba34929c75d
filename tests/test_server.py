"""The HTTP server, driven on a loopback port by AUTOMATIC1111's own client library (webuiapi).

A real uvicorn server runs in a thread over two names of the tiny SD 1.x folder (conftest), or, for
the command and auth, `latentforge serve` in a subprocess. Every image is checked against the one
Pipeline.generate makes alone with the same seed.
"""

import base64
import http.client
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image, ImageFile, ImageOps

import latentforge
from latentforge.server import ServerThread, Settings, create_app
from latentforge.request import MAX_PROMPT_CHARS
from latentforge.server.a1111 import MAX_INIT_IMAGES

SIZE = {"width": 64, "height": 64}
ALLOWED = "http://allowed.example"


@pytest.fixture(scope="module")
def models(sd1_folder, tmp_path_factory):
    """Two model names (alpha, beta) for the same tiny folder, to switch between."""
    root = tmp_path_factory.mktemp("models")
    for name in ("alpha", "beta"):
        (root / name).symlink_to(sd1_folder, target_is_directory=True)
    return [str(root / "alpha"), str(root / "beta")]


@pytest.fixture(scope="module")
def url(models):
    settings = Settings(models=models, max_body_bytes=1024 * 1024, cors_allow_origins=[ALLOWED])
    with ServerThread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def api(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return latentforge.load(sd1_folder)


def made_alone(pipe, seed, **kwargs):
    """The image Pipeline.generate makes with this seed, as a uint8 array."""
    return np.asarray(pipe.generate(seed=seed, **SIZE, **kwargs)[0])


def pixels(image):
    return np.asarray(image.convert("RGB"))


def post(url, path, payload, **kwargs):
    return requests.post(f"{url}/sdapi/v1/{path}", json=payload, timeout=60, **kwargs)


def wait_for(condition, timeout=30.0):
    """Poll until condition() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def in_thread(function, *args, **kwargs):
    """Run function in a thread; returns the thread, whose .result holds the return value or exception."""

    def run():
        try:
            thread.result = function(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- handed to the test, which looks at it
            thread.result = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_txt2img_returns_each_seeds_image_with_its_infotext(api, pipe):
    result = api.txt2img(
        prompt="a red circle", negative_prompt="blue", seed=7, steps=6, cfg_scale=5, batch_size=2,
        sampler_name="DPM++ 2M", scheduler="karras", restore_faces=False, **SIZE,
    )  # fmt: skip
    assert len(result.images) == 2
    assert result.info["all_seeds"] == [7, 8]
    assert result.info["sampler_name"] == "DPM++ 2M" and result.info["scheduler"] == "Karras"
    assert (result.info["steps"], result.info["cfg_scale"], result.info["width"]) == (6, 5.0, 64)
    assert result.info["sd_model_name"] == "alpha" and len(result.info["sd_model_hash"]) == 10
    assert result.parameters["prompt"] == "a red circle" and result.parameters["restore_faces"] is False
    for i, image in enumerate(result.images):
        assert image.info["parameters"] == result.info["infotexts"][i]
        assert f"Seed: {7 + i}," in image.info["parameters"]
        expected = made_alone(pipe, 7 + i, prompt="a red circle", negative_prompt="blue", steps=6, cfg_scale=5,
                              sampler="DPM++ 2M Karras")  # fmt: skip
        assert np.array_equal(pixels(image), expected)


def test_fields_left_out_are_the_models_defaults(url, pipe):
    response = post(url, "txt2img", {"prompt": "a square", "seed": 3})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    defaults = pipe.config.defaults
    assert (info["steps"], info["cfg_scale"]) == (defaults.steps, defaults.cfg_scale)
    assert info["width"] == info["height"] == pipe.config.native_size
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert np.array_equal(pixels(image), np.asarray(pipe.generate("a square", seed=3)[0]))


def test_img2img_inpainting_with_inverted_mask(api, pipe):
    init = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    result = api.img2img(
        images=[init], mask_image=mask, inpainting_mask_invert=1, mask_blur=0, denoising_strength=0.6,
        prompt="a blue triangle", seed=3, steps=10, **SIZE,
    )  # fmt: skip
    assert "Denoising strength: 0.6" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # not echoed back unless include_init_images
    # webuiapi sends A1111's API defaults: masked content "fill", only the masked part (no padding), pasted back
    expected = made_alone(pipe, 3, prompt="a blue triangle", steps=10, init_image=init, mask=ImageOps.invert(mask),
                          strength=0.6, masked_content="fill", inpaint_area="only masked", inpaint_padding=0,
                          overlay=True)  # fmt: skip
    assert "Masked content: fill, Inpaint area: Only masked, Masked area padding: 0" in result.info["infotexts"][0]
    assert np.array_equal(pixels(result.image), expected)


def test_img2img_takes_base64_without_data_prefix(url, pipe):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    payload = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "x", "seed": 1, "steps": 4}
    response = post(url, "img2img", payload)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert np.array_equal(pixels(image), made_alone(pipe, 1, prompt="x", steps=4, init_image=init))


def test_png_info_reads_the_infotext(api):
    image = api.txt2img(prompt="two circles, (red:1.2)", seed=9, steps=2, **SIZE).image
    info = api.png_info(image)
    assert info.info == image.info["parameters"]
    assert info.parameters["Prompt"] == "two circles, (red:1.2)" and info.parameters["Seed"] == "9"


def test_progress_then_interrupt_stops_only_the_running_job(api, pipe):
    long = in_thread(api.txt2img, prompt="slow", seed=1, steps=1000, **SIZE)
    seen = wait_for(lambda: (p := api.get_progress())["current_image"] and p["state"]["sampling_step"] > 0 and p)
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    assert seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 1000
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size == (64, 64)
    queued = in_thread(api.txt2img, prompt="next", seed=2, steps=3, **SIZE)
    wait_for(lambda: api.get_progress()["state"]["queued"] == 1)
    assert api.interrupt() == {}
    long.join(timeout=10)
    queued.join(timeout=30)
    assert not long.is_alive() and long.result.images == []  # stopped long before its 1000 steps
    assert np.array_equal(pixels(queued.result.image), made_alone(pipe, 2, prompt="next", steps=3))
    assert api.get_progress()["progress"] == 0


def test_concurrent_requests_each_get_their_own_seed(api, pipe):
    jobs = {seed: in_thread(api.txt2img, prompt=f"circle {seed}", seed=seed, steps=8, **SIZE) for seed in (11, 12)}
    for seed, job in jobs.items():
        job.join(timeout=60)
        assert np.array_equal(pixels(job.result.image), made_alone(pipe, seed, prompt=f"circle {seed}", steps=8))


def test_a_client_that_disconnects_leaves_the_queue(url, api):
    long = in_thread(api.txt2img, prompt="slow", seed=1, steps=1000, **SIZE)
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 0)
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    connection.request("POST", "/sdapi/v1/txt2img", json.dumps({"prompt": "gone", "steps": 5}),
                       {"Content-Type": "application/json"})  # fmt: skip
    wait_for(lambda: api.get_progress()["state"]["queued"] == 1)
    connection.close()
    wait_for(lambda: api.get_progress()["state"]["queued"] == 0, timeout=5)
    api.interrupt()
    long.join(timeout=10)
    assert not long.is_alive()


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("txt2img", {"steps": 0}, ["steps"]),
        ("txt2img", {"steps": "many"}, ["steps"]),
        ("txt2img", {"width": 65}, ["width"]),
        ("txt2img", {"seed": -2}, ["seed"]),
        ("txt2img", {"batch_size": 0}, ["batch_size"]),
        ("txt2img", {"cfg_scale": "high"}, ["cfg_scale"]),
        ("txt2img", {"sampler_name": "Euler b"}, ["sampler_name"]),
        ("txt2img", {"sampler_name": "Euler", "scheduler": "karras"}, ["scheduler"]),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, ["override_settings", "sd_model_checkpoint"]),
        ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 9}}, ["override_settings", "CLIP_stop_at_last_layers"]),
        ("img2img", {"init_images": ["not base64!"]}, ["init_images", "0"]),
        ("img2img", {"init_images": []}, ["init_images"]),
        ("img2img", {"init_images": [base64.b64encode(b"GIF89a...").decode()]}, ["init_images", "0"]),
        ("img2img", {"mask_blur": -1}, ["mask_blur"]),
        ("img2img", {"denoising_strength": 1.5}, ["denoising_strength"]),
        ("img2img", {"negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, ["negative_prompt"]),
    ],
)  # fmt: skip
def test_bad_fields_are_422_naming_the_field(url, path, payload, field):
    if path == "img2img":
        payload = {"init_images": [webuiapi.b64_img(Image.new("RGB", (64, 64)))], **payload}
    response = post(url, path, {"prompt": "x", "steps": 2, **payload})
    assert response.status_code == 422, response.text
    assert [error["loc"][1:] for error in response.json()["detail"]] == [field]


def test_the_client_library_sees_a_422(api):
    with pytest.raises(RuntimeError, match="422") as error:
        api.txt2img(prompt="x", steps=2, width=500, height=64)
    assert "width must be a multiple of 8" in str(error.value)


def png_claiming(width, height):
    """A PNG whose header declares width x height (its data is a few bytes: a decompression bomb's shape)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def test_an_image_claiming_100000_by_100000_is_refused_before_decoding(url):
    payload = {"init_images": [base64.b64encode(png_claiming(100000, 100000)).decode()], "prompt": "x"}
    response = post(url, "img2img", payload)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "init_images", "0"] and "100000x100000" in error["msg"]


def test_img2img_checks_every_image_header_before_decoding_any(url, monkeypatch):
    """Six 8192 x 8192 PNGs of 11 KB each took a server from 0.47 to 2.45 GB: now no image is decoded
    until every header (the mask's too) is within the limit, and at most MAX_INIT_IMAGES are taken."""
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))
    small = webuiapi.b64_img(Image.new("RGB", (64, 64)))
    huge = base64.b64encode(png_claiming(8193, 8192)).decode()  # one row over 8192 x 8192
    refused = {
        ("init_images", "2"): {"init_images": [small, small, huge]},
        ("mask",): {"init_images": [small, small], "mask": huge},
        ("init_images",): {"init_images": [small] * (MAX_INIT_IMAGES + 1)},
    }
    for loc, payload in refused.items():
        response = post(url, "img2img", {"prompt": "x", "steps": 1, **payload})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert tuple(error["loc"][1:]) == loc and "\n" not in error["msg"]
        assert "8193x8192" in error["msg"] or f"at most {MAX_INIT_IMAGES}" in error["msg"], error["msg"]
    assert decoded == []
    accepted = post(url, "img2img", {"prompt": "x", "steps": 2, "init_images": [small] * MAX_INIT_IMAGES, **SIZE})
    assert accepted.status_code == 200, accepted.text
    assert decoded and set(decoded) == {(64, 64)}  # the spy sees the decoding it was kept from above


def test_prompt_length_is_bounded(url):
    longest = post(url, "txt2img", {"prompt": "a " * (MAX_PROMPT_CHARS // 2), "steps": 1, **SIZE})
    assert longest.status_code == 200, longest.text
    response = post(url, "txt2img", {"prompt": "a" * (MAX_PROMPT_CHARS + 1), "steps": 1, **SIZE})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and str(MAX_PROMPT_CHARS) in error["msg"]


def test_png_info_answers_the_largest_infotext(url):
    """A 1 MB infotext (Pillow's cap on a text chunk) in a PNG of a few kB: the last line made of what
    takes the webui's regex quadratic time; parsed in linear time (tests/test_infotext.py counts it)."""
    last = "Steps: 20, Sampler: Euler, Seed: 1, " + 'kk: "a,' * 130_000
    text = "a prompt\n" + last
    chunk = b"parameters\0\0" + zlib.compress(text.encode(), 9)
    image = io.BytesIO()
    Image.new("RGB", (1, 1)).save(image, format="PNG")
    data = image.getvalue()
    png = data[:33] + struct.pack(">I", len(chunk)) + b"zTXt" + chunk + struct.pack(">I", zlib.crc32(b"zTXt" + chunk))
    response = post(url, "png-info", {"image": base64.b64encode(png + data[33:]).decode()})
    assert response.status_code == 200 and len(png) < 10_000
    answer = response.json()
    assert answer["info"] == text
    assert answer["parameters"] == {"Prompt": "a prompt", "Negative prompt": "", "Steps": "20", "Sampler": "Euler",
                                    "Seed": "1", "kk": '"a'}  # fmt: skip


def test_oversize_bodies_are_refused(url):
    big = {"prompt": "x" * (2 * 1024 * 1024)}
    assert post(url, "txt2img", big).status_code == 413
    chunked = (b"x" * 65536 for _ in range(32))  # no Content-Length: counted as it arrives
    response = requests.post(f"{url}/sdapi/v1/txt2img", data=chunked, timeout=30)
    assert response.status_code == 413


def test_cross_origin_requests_are_refused_unless_allowed(url):
    ok = {"prompt": "x", "steps": 1, **SIZE}
    evil = post(url, "txt2img", ok, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
    assert post(url, "txt2img", ok, headers={"Origin": url}).status_code == 200  # the page's own origin
    allowed = post(url, "txt2img", ok, headers={"Origin": ALLOWED})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
    preflight = requests.options(
        f"{url}/sdapi/v1/txt2img", timeout=10,
        headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own Host and Origin
    port = url.rsplit(":", 1)[1]
    rebound = f"evil.example:{port}"
    response = post(url, "txt2img", ok, headers={"Host": rebound, "Origin": f"http://{rebound}"})
    assert response.status_code == 403


def test_models_and_switching_them_by_option(api, url):
    assert api.util_get_model_names() == ["alpha", "beta"]
    assert api.util_get_current_model() == "alpha"
    api.util_set_model("beta")
    try:
        assert api.util_get_current_model() == "beta"
        assert api.txt2img(prompt="x", steps=1, **SIZE).info["sd_model_name"] == "beta"
        override = {"sd_model_checkpoint": "alpha"}
        assert api.txt2img(prompt="x", steps=1, override_settings=override, **SIZE).info["sd_model_name"] == "alpha"
    finally:
        api.set_options({"sd_model_checkpoint": "alpha"})
    response = post(url, "options", {"sd_model_checkpoint": "gamma"})
    assert response.status_code == 422 and "unknown model 'gamma'" in response.text


def broken_model(folder):
    """A model file cut short: a safetensors header that promises more tensor data than there is."""
    from safetensors.numpy import save_file

    path = folder / "broken.safetensors"
    save_file({"weight": np.zeros(4096, np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-1000])
    return path


def test_a_file_that_cannot_be_read_drops_no_loaded_model(sd1_folder, tmp_path):
    """With room for one model, switching to a broken file is refused before the loaded one makes room:
    the current model stays in memory (no second load), and a good switch still drops it."""
    from latentforge.server.jobs import ModelError, Models

    loads = []
    other = tmp_path / "other"
    other.symlink_to(sd1_folder, target_is_directory=True)
    models = Models([str(sd1_folder), str(broken_model(tmp_path)), str(other)], keep=1,
                    loader=lambda path: loads.append(path) or latentforge.load(path))  # fmt: skip
    first = models.get("model")
    with pytest.raises(ModelError, match="cannot load model broken.safetensors: .*truncated"):
        models.select("broken")
    assert models.current == "model" and models.loaded["model"] is first and len(loads) == 1
    models.select("other")
    assert list(models.loaded) == ["other"] and len(loads) == 2


def test_a_model_that_fails_to_load_leaves_the_current_one(sd1_folder, tmp_path):
    settings = Settings(models=[str(sd1_folder), str(broken_model(tmp_path))])
    with ServerThread(create_app(settings)) as url:
        response = post(url, "options", {"sd_model_checkpoint": "broken.safetensors", "CLIP_stop_at_last_layers": 2})
        assert response.status_code == 500
        detail = response.json()["detail"]
        assert detail.startswith("cannot load model broken.safetensors: ") and "truncated" in detail
        assert "\n" not in detail
        options = requests.get(f"{url}/sdapi/v1/options", timeout=10).json()
        assert (options["sd_model_checkpoint"], options["CLIP_stop_at_last_layers"]) == ("model", 1)
        override = {"sd_model_checkpoint": "broken"}
        response = post(url, "txt2img", {"prompt": "x", "steps": 1, "override_settings": override, **SIZE})
        assert response.status_code == 500 and "truncated" in response.json()["detail"]
        after = post(url, "txt2img", {"prompt": "x", "steps": 1, **SIZE})
        assert after.status_code == 200 and json.loads(after.json()["info"])["sd_model_name"] == "model"


def test_serve_with_a_broken_first_model_prints_one_line(tmp_path, capsys):
    from latentforge import cli

    path = broken_model(tmp_path)
    assert cli.main(["serve", "--model", str(path), "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"latentforge serve: error: cannot load model broken.safetensors: {path}: truncated")


def test_samplers_and_schedulers_are_listed(api):
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"} <= set(samplers)
    assert api.util_get_scheduler_names() == ["automatic", "karras"]


def test_the_web_page_is_served(url):
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and 'id="prompt"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert requests.get(f"{url}/app.js", timeout=10).headers["content-type"].startswith("text/javascript")
    assert requests.get(f"{url}/static/../server.py", timeout=10).status_code == 404


def test_serve_command_requires_credentials_with_api_auth(sd1_folder):
    command = [sys.executable, "-m", "latentforge.cli", "serve", "--model", str(sd1_folder), "--port", "0",
               "--api-auth", "user:s3cret"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    lines = []
    reader = in_thread(lambda: [lines.append(line) for line in server.stdout])
    try:
        # uvicorn names the free port it took (port 0): no guessing, no race for a port
        started = wait_for(lambda: re.search(r"running on (http://127\.0\.0\.1:\d+)", "".join(lines)), timeout=120)
        url = started.group(1)
        refused = requests.get(f"{url}/sdapi/v1/options", timeout=10)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert requests.get(url, timeout=10).status_code == 401  # every route, the page too
        assert requests.get(url, auth=("user", "wrong"), timeout=10).status_code == 401
        assert requests.get(url, auth=("user", "s3cret"), timeout=10).status_code == 200
        cross = {"Origin": "http://evil.example"}
        assert post(url, "interrupt", {}, auth=("user", "s3cret"), headers=cross).status_code == 403
        api = webuiapi.WebUIApi(port=int(url.rsplit(":", 1)[1]), username="user", password="s3cret")
        assert api.txt2img(prompt="x", seed=1, steps=2, **SIZE).info["all_seeds"] == [1]
    finally:
        server.terminate()
        server.wait(timeout=30)
        reader.join(timeout=10)
    # a clean shutdown on SIGTERM (uvicorn then exits by the signal it caught)
    assert server.returncode in (0, -signal.SIGTERM) and "shutdown complete" in "".join(lines), "".join(lines)


def test_vae_tiling_reaches_the_models_the_server_loads(sd1_folder, monkeypatch):
    """`latentforge serve --vae-tiling` loads every model with Pipeline.vae_tiling on: a 128 x 128 txt2img
    over HTTP is the image a tiling pipeline makes alone, not the whole-decode one."""
    from latentforge import cli, server

    started = []
    monkeypatch.setattr(server, "serve", started.append)
    assert cli.main(["serve", "--model", str(sd1_folder), "--vae-tiling"]) == 0
    assert started[0].vae_tiling and not Settings().vae_tiling
    tiled, whole = latentforge.load(sd1_folder), latentforge.load(sd1_folder)
    tiled.vae_tiling = True
    request = {"prompt": "a red circle", "steps": 2, "cfg_scale": 5, "width": 128, "height": 128}
    want, untiled = (np.asarray(p.generate(seed=5, sampler="Euler a", **request)[0]) for p in (tiled, whole))
    assert not np.array_equal(want, untiled)
    with ServerThread(create_app(started[0])) as url:
        host, port = url.removeprefix("http://").split(":")
        result = webuiapi.WebUIApi(host=host, port=int(port)).txt2img(seed=5, sampler_name="Euler a", **request)
    np.testing.assert_array_equal(pixels(result.image), want)
