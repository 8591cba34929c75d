"""The rest of AUTOMATIC1111's API that clients call: the hires fix fields of txt2img, prompt styles, skip,
face-restorers, refresh-checkpoints, memory and cmd-flags; each image equal to Pipeline.generate's alone."""

import base64
import io
import json

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

import latentforge
from latentforge.hires import Hires
from latentforge.server import ServerThread, Settings, create_app
from latentforge.server.jobs import Models

BASE = {"width": 64, "height": 64, "steps": 4, "sampler_name": "Euler", "cfg_scale": 5, "seed": 9}
STYLES = 'name,prompt,negative_prompt\nframed,"a framed picture of {prompt}",blurry\nplain,white background,\n'


@pytest.fixture(scope="module")
def served(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    (root / "styles.csv").write_text(STYLES)
    settings = Settings(models=[str(sd1_folder)], styles_file=str(root / "styles.csv"), api_auth="u:secret")
    with ServerThread(create_app(settings)) as url:
        yield url, latentforge.load(sd1_folder)


def post(url, path, payload):
    return requests.post(f"{url}/sdapi/v1/{path}", json=payload, timeout=120, auth=("u", "secret"))


def get(url, path):
    response = requests.get(f"{url}/sdapi/v1/{path}", timeout=60, auth=("u", "secret"))
    response.raise_for_status()
    return response.json()


def image_of(response, i=0):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][i]))).convert("RGB"))


def test_hires_fields_make_the_pipelines_hires_image(served):
    url, pipe = served
    payload = {**BASE, "prompt": "a red circle", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)",
               "hr_second_pass_steps": 4, "denoising_strength": 0.6, "hr_sampler_name": "DDIM"}  # fmt: skip
    response = post(url, "txt2img", payload)
    assert response.status_code == 200, response.text
    hires = Hires(scale=1.5, upscaler="Latent (bicubic)", steps=4, denoising_strength=0.6, sampler="DDIM")
    want = pipe.generate("a red circle", seed=9, steps=4, sampler="Euler", cfg_scale=5, width=64, height=64, hires=hires)[0]
    assert np.array_equal(image_of(response), np.asarray(want))
    extra = json.loads(response.json()["info"])["extra_generation_params"]
    assert extra["Hires upscaler"] == "Latent (bicubic)" and extra["Hires sampler"] == "DDIM"
    assert json.loads(response.json()["info"])["denoising_strength"] == 0.6
    assert image_of(response).shape == (96, 96, 3)


@pytest.mark.parametrize(
    "fields, loc",
    [
        ({"hr_scale": 0}, "hr_scale"),
        ({"hr_scale": 100}, "hr_scale"),
        ({"hr_upscaler": "4x-Missing"}, "hr_upscaler"),
        ({"hr_upscaler": "../4x"}, "hr_upscaler"),
        ({"hr_sampler_name": "Euler b"}, "hr_sampler_name"),
        ({"denoising_strength": 0}, "denoising_strength"),
        ({"hr_second_pass_steps": 1, "denoising_strength": 0.5}, "hr_second_pass_steps"),
    ],
)
def test_bad_hires_fields_are_422_at_their_field(served, fields, loc):
    url, _ = served
    response = post(url, "txt2img", {**BASE, "prompt": "x", "enable_hr": True, **fields})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == loc and "\n" not in detail["msg"]


def test_prompt_styles_are_listed_and_applied(served):
    url, pipe = served
    assert get(url, "prompt-styles") == [
        {"name": "framed", "prompt": "a framed picture of {prompt}", "negative_prompt": "blurry"},
        {"name": "plain", "prompt": "white background", "negative_prompt": ""},
    ]
    response = post(url, "txt2img", {**BASE, "prompt": "a red circle", "styles": ["framed", "plain"]})
    want = pipe.generate("a framed picture of a red circle, white background", "blurry", seed=9, steps=4,
                         sampler="Euler", cfg_scale=5, width=64, height=64)[0]  # fmt: skip
    assert np.array_equal(image_of(response), np.asarray(want))
    bad = post(url, "txt2img", {**BASE, "prompt": "x", "styles": ["nope"]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "styles"


def test_the_endpoints_a_client_calls_at_connection_time(served):
    """What chat front-ends and editor plugins ask when they connect: each answers, none is a 404."""
    url, _ = served
    for path in ("sd-models", "samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-vae", "loras",
                 "embeddings", "prompt-styles", "face-restorers", "options", "progress", "memory", "cmd-flags",
                 "scripts"):  # fmt: skip
        get(url, path)
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings", "skip", "interrupt"):
        assert post(url, path, {}).status_code == 200, path
    assert get(url, "face-restorers") == []
    memory = get(url, "memory")
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and "error" in memory["cuda"]
    flags = get(url, "cmd-flags")
    assert flags["api_auth"] is True and "secret" not in json.dumps(flags)


def test_skip_drops_the_running_image_and_the_job_goes_on(served):
    url, pipe = served
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), username="u", password="secret")
    import threading
    import time

    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=post(url, "txt2img", {**BASE, "prompt": "a red circle", "steps": 200, "n_iter": 2})),
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 60
    while get(url, "progress")["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    api.skip()
    thread.join(timeout=300)
    images = result["r"].json()["images"]
    assert len(images) == 1  # the first image was dropped, the second made
    want = pipe.generate("a red circle", seed=10, steps=200, sampler="Euler", cfg_scale=5, width=64, height=64)[0]
    assert np.array_equal(image_of(result["r"]), np.asarray(want))


def test_the_rest_of_a1111s_routes_answer(sd1_folder, tmp_path):
    """Listings of parts latentforge has none of are empty; the upscaler files are A1111's Real-ESRGAN models;
    the routes that need a part it lacks (a captioner, embedding and hypernetwork training) are 501 with one
    line saying what to use instead, never a 404."""
    (tmp_path / "upscale").mkdir()
    (tmp_path / "upscale" / "4x-tiny.pth").write_bytes(b"\0")  # listed by name; read only when used
    settings = Settings(models=[str(sd1_folder)], upscaler_dirs=[str(tmp_path / "upscale")])
    with ServerThread(create_app(settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        assert api.get_hypernetworks() == [] and requests.get(f"{url}/sdapi/v1/script-info", timeout=60).json() == []
        assert requests.get(f"{url}/sdapi/v1/extensions", timeout=60).json() == []
        assert api.get_realesrgan_models() == [
            {"name": "4x-tiny", "path": str(tmp_path / "upscale" / "4x-tiny.pth"), "scale": None}
        ]
        for path in ("interrogate", "create/embedding", "train/embedding", "create/hypernetwork", "train/hypernetwork"):
            response = requests.post(f"{url}/sdapi/v1/{path}", json={"image": "", "model": "clip"}, timeout=60)
            assert response.status_code == 501, path
            assert "latentforge" in response.json()["detail"] and "\n" not in response.json()["detail"]
        assert "png-info" in requests.post(f"{url}/sdapi/v1/interrogate", json={}, timeout=60).json()["detail"]


def test_unload_and_reload_checkpoint(sd1_folder):
    """unload-checkpoint frees the model (nothing holds it after); reload-checkpoint and the next request load
    it again, and the image is the one the model makes."""
    import gc
    import weakref

    loads = []

    def loader(path):
        loads.append(latentforge.load(path))
        return loads[-1]

    models = Models([str(sd1_folder)], loader=loader)
    with ServerThread(create_app(Settings(models=[str(sd1_folder)]), models)) as url:
        first = requests.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "prompt": "a red circle"}, timeout=120)
        assert first.status_code == 200 and len(loads) == 1
        freed = weakref.ref(loads.pop())
        assert requests.post(f"{url}/sdapi/v1/unload-checkpoint", timeout=60).json() == {}
        gc.collect()
        assert freed() is None and not models.loaded
        assert requests.post(f"{url}/sdapi/v1/reload-checkpoint", timeout=120).json() == {}
        assert len(loads) == 1 and list(models.loaded) == [models.current]
        again = requests.post(f"{url}/sdapi/v1/txt2img", json={**BASE, "prompt": "a red circle"}, timeout=120)
        assert len(loads) == 1 and np.array_equal(image_of(again), image_of(first))


@pytest.mark.parametrize(
    "fields, loc, says",
    [
        ({"restore_faces": True}, "restore_faces", "no face restorer"),
        ({"script_name": "x/y/z plot"}, "script_name", "runs no scripts ('x/y/z plot')"),
        ({"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts", "no extensions or scripts ('controlnet')"),
        ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name", "same model"),
        ({"enable_hr": True, "hr_scheduler": "karras"}, "hr_scheduler", "needs hr_sampler_name"),
        ({"enable_hr": True, "hr_sampler_name": "Euler", "hr_scheduler": "karras"}, "hr_scheduler", "not available for Euler"),
    ],
)
def test_a_part_latentforge_lacks_is_refused_not_ignored(served, fields, loc, says):
    url, _ = served
    response = post(url, "txt2img", {**BASE, "prompt": "a red circle", **fields})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == loc, response.text
    assert says in response.json()["detail"][0]["msg"]


def test_the_hires_scheduler_and_the_defaults_clients_send(served):
    url, pipe = served
    payload = {**BASE, "prompt": "a red circle", "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 4,
               "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras", "restore_faces": False, "script_name": "",
               "alwayson_scripts": {}, "hr_checkpoint_name": "Use same checkpoint"}  # fmt: skip
    response = post(url, "txt2img", payload)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["extra_generation_params"]["Hires sampler"] == "DPM++ 2M Karras"
