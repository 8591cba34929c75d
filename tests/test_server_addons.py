"""The server's add-on routes and options, driven over HTTP as AUTOMATIC1111's clients do: /sdapi/v1/loras,
refresh-loras, sd-vae, refresh-vae, the sd_vae option and override_settings, `<lora:NAME:W>` in prompts
(never a path), each image equal to the one Pipeline.generate makes alone with the same add-ons."""

import base64
import io
import json

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

import latentforge
from latentforge.server import ServerThread, Settings, create_app
from latentforge.weightfiles import write_safetensors
from test_lora import kohya_lora

SIZE = {"width": 64, "height": 64, "steps": 3, "sampler_name": "Euler", "cfg_scale": 5}


@pytest.fixture(scope="module")
def folders(sd1_folder, tmp_path_factory):
    """A LoRA folder with one LoRA (in a subfolder, with kohya metadata) and a VAE folder with one VAE."""
    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    loras, vaes = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("vaes")
    (loras / "style").mkdir()
    write_safetensors(kohya_lora(pipe, seed=11), loras / "style" / "ink.safetensors", metadata={"ss_network_dim": "4"})
    torch_state = {f"first_stage_model.{k}": v * 1.1 for k, v in pipe.vae.state_dict().items()}
    write_safetensors(torch_state, vaes / "bright.vae.safetensors")
    return pipe, loras, vaes


@pytest.fixture(scope="module")
def url(sd1_folder, folders):
    _, loras, vaes = folders
    settings = Settings(models=[str(sd1_folder)], lora_dirs=[str(loras)], vae_dirs=[str(vaes)], dtype="float32")
    with ServerThread(create_app(settings)) as url:
        yield url


def get(url, path):
    response = requests.get(f"{url}/sdapi/v1/{path}", timeout=60)
    response.raise_for_status()
    return response.json()


def post(url, path, payload):
    return requests.post(f"{url}/sdapi/v1/{path}", json=payload, timeout=120)


def image_of(response):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))


def made_alone(pipe, seed, **kwargs):
    return np.asarray(pipe.generate(seed=seed, width=64, height=64, steps=3, sampler="Euler", cfg_scale=5, **kwargs)[0])


def test_loras_are_listed_with_their_metadata_and_refreshed(url, folders):
    _, loras, _ = folders
    listed = get(url, "loras")
    assert [(e["name"], e["metadata"]) for e in listed] == [("ink", {"ss_network_dim": "4"})]
    assert listed[0]["path"] == str(loras / "style" / "ink.safetensors")
    (loras / "late.safetensors").write_bytes((loras / "style" / "ink.safetensors").read_bytes())
    try:
        assert post(url, "refresh-loras", {}).status_code == 200
        assert sorted(e["name"] for e in get(url, "loras")) == ["ink", "late"]
    finally:
        (loras / "late.safetensors").unlink()
        post(url, "refresh-loras", {})


def test_a_prompt_tag_applies_the_lora_and_the_next_request_goes_without(url, folders):
    pipe, loras, _ = folders
    response = post(url, "txt2img", {"prompt": "a red circle <lora:ink:0.7>", "seed": 5, **SIZE})
    assert response.status_code == 200
    want = made_alone(pipe, 5, prompt="a red circle", loras={loras / "style" / "ink.safetensors": 0.7})
    assert np.array_equal(image_of(response), want)
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"]["Lora hashes"].startswith("ink: ")
    plain = post(url, "txt2img", {"prompt": "a red circle", "seed": 5, **SIZE})
    assert np.array_equal(image_of(plain), made_alone(pipe, 5, prompt="a red circle"))


@pytest.mark.parametrize("tag", ["<lora:../ink:1>", "<lora:style/ink:1>", "<lora:nothing:1>"])
def test_a_tag_is_a_name_in_the_folders_never_a_path(url, tag):
    response = post(url, "txt2img", {"prompt": f"a red circle {tag}", "seed": 5, **SIZE})
    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    assert ("not a name" in message or "no LoRA named" in message) and "\n" not in message


def test_sd_vae_option_and_override_settings(url, folders):
    pipe, _, vaes = folders
    assert get(url, "sd-vae") == [{"model_name": "bright.vae.safetensors", "filename": str(vaes / "bright.vae.safetensors")}]
    own = made_alone(pipe, 6, prompt="a blue square")
    pipe.load_vae(vaes / "bright.vae.safetensors")
    try:
        bright = made_alone(pipe, 6, prompt="a blue square")
    finally:
        pipe.load_vae(None)
    assert np.abs(bright.astype(int) - own.astype(int)).max() > 10

    overridden = post(url, "txt2img", {"prompt": "a blue square", "seed": 6, **SIZE,
                                       "override_settings": {"sd_vae": "bright.vae.safetensors"}})  # fmt: skip
    assert np.array_equal(image_of(overridden), bright)
    assert json.loads(overridden.json()["info"])["sd_vae_name"] == "bright.vae.safetensors"
    assert np.array_equal(image_of(post(url, "txt2img", {"prompt": "a blue square", "seed": 6, **SIZE})), own)

    assert post(url, "options", {"sd_vae": "bright.vae.safetensors"}).status_code == 200
    try:
        assert get(url, "options")["sd_vae"] == "bright.vae.safetensors"
        assert np.array_equal(image_of(post(url, "txt2img", {"prompt": "a blue square", "seed": 6, **SIZE})), bright)
    finally:
        assert post(url, "options", {"sd_vae": "Automatic"}).status_code == 200
    assert np.array_equal(image_of(post(url, "txt2img", {"prompt": "a blue square", "seed": 6, **SIZE})), own)


@pytest.mark.parametrize("value", ["../bright.vae.safetensors", "missing.safetensors", 3])
def test_bad_sd_vae_is_422_and_changes_nothing(url, value):
    response = post(url, "options", {"sd_vae": value})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "sd_vae"
    assert get(url, "options")["sd_vae"] == "Automatic"


def test_the_client_library_lists_loras_and_vaes(url):
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    assert [e["name"] for e in api.get_loras()] == ["ink"]
    assert [e["model_name"] for e in api.get_sd_vae()] == ["bright.vae.safetensors"]
