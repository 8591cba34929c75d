"""The HTTP server with SDXL: a base and its refiner among the configured models, A1111's refiner_checkpoint and
refiner_switch_at on txt2img, and /sdapi/v1/sd-models over an SDXL diffusers folder and single file."""

import base64
import io
import json

import numpy as np
import pytest
import requests
import test_sdxl
from PIL import Image
from test_server import broken_model

import latentforge
from latentforge.cli import main
from latentforge.infotext import parse_infotext
from latentforge.modelhash import model_hash
from latentforge.server import ServerThread, Settings, create_app

# test_sdxl's fixtures, the tiny SDXL base and refiner folders (built once in each module that uses them)
sdxl_folder, refiner_folder = test_sdxl.sdxl_folder, test_sdxl.refiner_folder

ASK = {"prompt": "a red circle", "steps": 4, "seed": 5, "width": 64, "height": 64, "cfg_scale": 5}


@pytest.fixture(scope="module")
def paths(sdxl_folder, refiner_folder, tmp_path_factory):
    """The configured models by name: the base and refiner folders, the base as a single file, a broken file."""
    root = tmp_path_factory.mktemp("sdxl-models")
    (root / "sdxl-base").symlink_to(sdxl_folder, target_is_directory=True)
    (root / "sdxl-refiner").symlink_to(refiner_folder, target_is_directory=True)
    assert main(["convert", str(sdxl_folder), str(root / "sdxl-single.safetensors")]) == 0
    names = ("sdxl-base", "sdxl-refiner", "sdxl-single.safetensors")
    return {**{name: root / name for name in names}, "broken.safetensors": broken_model(root)}


@pytest.fixture(scope="module")
def url(paths):
    settings = Settings(models=[str(path) for path in paths.values()], dtype="float32", device="cpu")
    with ServerThread(create_app(settings)) as url:
        yield url


def post(url, path, payload):
    return requests.post(f"{url}/sdapi/v1/{path}", json=payload, timeout=120)


def test_txt2img_with_a_refiner_names_it_in_the_infotext(url, paths):
    response = post(url, "txt2img", {**ASK, "refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 0.5})
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["images"][0])
    image = Image.open(io.BytesIO(data))
    refiner = f"sdxl-refiner [{model_hash(paths['sdxl-refiner'])}]"
    params = parse_infotext(image.info["parameters"])
    assert params["Model"] == "sdxl-base" and params["Refiner"] == refiner and params["Refiner switch at"] == "0.5"
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"] == {"Refiner": refiner, "Refiner switch at": 0.5}
    # the image the library makes with this refiner and switch
    base = latentforge.load(paths["sdxl-base"], dtype="float32", device="cpu")
    ours = latentforge.load(paths["sdxl-refiner"], dtype="float32", device="cpu")
    want = base.generate(**ASK, refiner=ours, refiner_switch_at=0.5)[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))
    # PNG Info reads the fields back as the webui does
    shown = post(url, "png-info", {"image": base64.b64encode(data).decode()}).json()["parameters"]
    assert shown["Refiner"] == refiner and shown["Refiner switch at"] == "0.5"
    # by its title with the hash, as A1111's clients send it; the switch left out is 0.8
    response = post(url, "txt2img", {**ASK, "refiner_checkpoint": refiner})
    params = parse_infotext(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).info["parameters"])
    assert params["Refiner"] == refiner and params["Refiner switch at"] == "0.8"
    # "" and "None" are no refiner, as in A1111
    for none in ("", "None"):
        info = json.loads(post(url, "txt2img", {**ASK, "refiner_checkpoint": none}).json()["info"])
        assert "Refiner" not in info["infotexts"][0] and info["extra_generation_params"] == {}


def test_refiner_errors(url):
    response = post(url, "txt2img", {**ASK, "refiner_checkpoint": "nope"})
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "refiner_checkpoint"]
    assert detail["msg"].startswith("refiner_checkpoint: unknown model 'nope'; known: sdxl-base, sdxl-refiner")
    response = post(url, "txt2img", {**ASK, "refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 1.5})
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "refiner_switch_at"] and "between 0 and 1" in detail["msg"]
    response = post(url, "txt2img", {**ASK, "refiner_checkpoint": "broken.safetensors"})
    assert response.status_code == 500
    detail = response.json()["detail"]
    assert detail.startswith("cannot load model broken.safetensors: ") and "truncated" in detail and "\n" not in detail


def test_sd_models_lists_sdxl_folders_and_files(url, paths):
    assert post(url, "txt2img", {**ASK, "steps": 1, "refiner_checkpoint": "sdxl-refiner"}).status_code == 200
    assert post(url, "options", {"sd_model_checkpoint": "sdxl-single.safetensors"}).status_code == 200
    try:
        listed = requests.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()
        assert [(m["title"], m["model_name"]) for m in listed] == [
            ("sdxl-base", "sdxl-base"), ("sdxl-refiner", "sdxl-refiner"),
            ("sdxl-single.safetensors", "sdxl-single"), ("broken.safetensors", "broken"),
        ]  # fmt: skip
        hashes = {m["title"]: m["hash"] for m in listed}
        for title in ("sdxl-base", "sdxl-refiner", "sdxl-single.safetensors"):
            assert hashes[title] == model_hash(paths[title])
        assert hashes["sdxl-base"] != hashes["sdxl-single.safetensors"]  # a folder's hash is over its files
        options = requests.get(f"{url}/sdapi/v1/options", timeout=10).json()
        assert options["sd_checkpoint_hash"] == hashes["sdxl-single.safetensors"]
        # the single file as the base, the folder as its refiner
        response = post(url, "txt2img", {**ASK, "steps": 2, "refiner_checkpoint": "sdxl-refiner"})
        params = parse_infotext(json.loads(response.json()["info"])["infotexts"][0])
        assert params["Model"] == "sdxl-single" and params["Model hash"] == hashes["sdxl-single.safetensors"]
        assert params["Refiner"] == f"sdxl-refiner [{hashes['sdxl-refiner']}]"
    finally:
        post(url, "options", {"sd_model_checkpoint": "sdxl-base"})
