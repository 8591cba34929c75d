"""A1111's short model hash, of files and diffusers folders, and its cache across processes."""

import hashlib
import os

import pytest

from latentforge import modelhash
from latentforge.modelhash import model_hash
from latentforge.weightfiles import CheckpointError


# --------------------------------------------------------------------------- model hash


def test_model_hash_of_a_file_is_a1111_short_sha256(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several 1 MiB blocks and a partial one
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]


def test_model_hash_of_a_folder_hashes_weight_files_in_sorted_order(tmp_path):
    files = {
        "vae/diffusion_pytorch_model.safetensors": b"vae",
        "unet/diffusion_pytorch_model.safetensors": b"unet",
        "text_encoder/model.safetensors": b"text",
        "unet/config.json": b"{}",  # not weights
        ".cache/x.safetensors": b"hidden",  # skipped
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert model_hash(tmp_path) == hashlib.sha256(b"text" + b"unet" + b"vae").hexdigest()[:10]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weight files"):
        model_hash(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        model_hash(tmp_path / "missing.ckpt")


def test_model_hash_is_remembered_across_calls_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(modelhash.HASH_CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first weights")
    calls = []
    real = modelhash.model_hash
    monkeypatch.setattr(modelhash, "model_hash", lambda p: calls.append(p) or real(p))
    first = modelhash.cached_model_hash(path)
    assert first == hashlib.sha256(b"first weights").hexdigest()[:10] and len(calls) == 1
    assert modelhash.cached_model_hash(path) == first and len(calls) == 1  # read back, not hashed again
    path.write_bytes(b"other weights, another size")
    assert modelhash.cached_model_hash(path) == hashlib.sha256(b"other weights, another size").hexdigest()[:10]
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["corrupt", "unwritable"])
def test_model_hash_cache_that_cannot_be_used_is_ignored(tmp_path, monkeypatch, damage):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    if damage == "corrupt":
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "model-hashes.json").write_text("{not json")
    else:  # the cache folder's place is taken by a file
        cache = tmp_path / "a-file"
        cache.write_text("")
    monkeypatch.setenv(modelhash.HASH_CACHE_ENV, str(cache))
    assert modelhash.cached_model_hash(path) == hashlib.sha256(b"weights").hexdigest()[:10]
    if damage == "corrupt":  # rewritten whole
        assert modelhash.cached_model_hash(path) == hashlib.sha256(b"weights").hexdigest()[:10]
        assert "model.safetensors" in (cache / "model-hashes.json").read_text()
