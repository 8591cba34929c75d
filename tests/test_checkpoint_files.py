"""Tests for the safe weight-file layer (latentforge.weightfiles)."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentforge import weightfiles
from latentforge.atomic import atomic_path, write_json
from latentforge.weightfiles import (
    CheckpointError,
    detect_format,
    read_state_dict,
    write_safetensors,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    """A small mixed-dtype state dict."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "model.conv.bias": torch.randn(4, generator=gen).half(),
        "model.norm.weight": torch.randn(7, generator=gen).bfloat16(),
        "model.steps": torch.arange(5, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "model.scalar": torch.tensor(3.5),
        "model.empty": torch.zeros(0, 3),
    }


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and values."""
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def assert_one_line_error(exc: CheckpointError, path: Path, *fragments: str) -> str:
    """The message is a single line naming the file and containing every fragment."""
    message = str(exc)
    assert "\n" not in message and "\r" not in message
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def error_for(path: Path, *fragments: str) -> str:
    """read_state_dict(path) must raise a one-line CheckpointError containing fragments."""
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    return assert_one_line_error(info.value, path, *fragments)


# --------------------------------------------------------------------------- round trips


def test_safetensors_round_trip_keeps_dtypes_and_metadata(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    write_safetensors(tensors, path, metadata={"format": "pt", "note": "héllo"})
    loaded, metadata = read_state_dict(path)
    assert_same(loaded, tensors)
    assert metadata == {"format": "pt", "note": "héllo"}
    # Our own writer must produce files upstream safetensors reads identically.
    assert_same(load_file(str(path)), tensors)
    assert detect_format(path) == "safetensors"


def test_mapped_tensors_can_be_changed_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}, path)
    before = path.read_bytes()
    tensors, _ = read_state_dict(path)
    assert tensors["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["b"].dtype == torch.float16
    tensors["w"].mul_(10)  # private copy-on-write pages: the change stays in memory
    assert tensors["w"][1, 2] == 50 and path.read_bytes() == before


def test_misaligned_safetensors_data_is_read_right(tmp_path: Path) -> None:
    """A header whose length leaves the data off a 4-byte boundary (the format allows it) still reads."""
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    header += b" " * ((3 - len(header)) % 4)  # 8 + len(header) is then 3 mod 4
    assert (8 + len(header)) % 4 == 3
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + values.numpy().tobytes())
    tensors, _ = read_state_dict(path)
    assert torch.equal(tensors["x"], values)


def test_write_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors({"a": torch.ones(2)}, path)
    loaded, metadata = read_state_dict(path)
    assert metadata == {}
    assert torch.equal(loaded["a"], torch.ones(2))


def test_write_safetensors_handles_shared_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "whole": base,
        "same": base,  # the very same tensor twice (tied weights)
        "rows": base[1:3],  # contiguous view into shared storage, with an offset
        "transposed": base.t(),  # non-contiguous
        "strided": base[:, ::2],  # non-contiguous
        "expanded": torch.ones(3, 1).expand(3, 4),  # zero stride
    }
    path = tmp_path / "shared.safetensors"
    write_safetensors(tensors, path)
    loaded, _ = read_state_dict(path)
    assert sorted(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key
    assert_same(load_file(str(path)), {k: v.contiguous() for k, v in tensors.items()})
    assert base.stride() == (6, 1)  # inputs untouched


def test_write_safetensors_rejects_bad_input_without_creating_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(TypeError):
        write_safetensors({"a": [1, 2, 3]}, path)  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        write_safetensors({"a": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(TypeError):
        write_safetensors({"a": torch.ones(2)}, path, metadata={"step": 5})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_torch_zip_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.bin"
    torch.save(tensors, path)
    assert detect_format(path) == "torch-zip"
    loaded, metadata = read_state_dict(path)
    assert_same(loaded, tensors)
    assert metadata == {}


def test_legacy_pickle_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.ckpt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "pickle"
    loaded, _ = read_state_dict(path)
    assert_same(loaded, tensors)


@pytest.mark.parametrize("legacy", [False, True])
def test_ldm_checkpoint_unwraps_state_dict(tmp_path: Path, legacy: bool) -> None:
    tensors = sample_tensors()
    path = tmp_path / "sd.ckpt"
    ckpt = {
        "state_dict": tensors,
        "global_step": 470000,
        "epoch": 6,
        "lr": 1e-4,
        "name": "v1",
        "np_step": np.int64(12),
        "optimizer_states": [{"lr": 1e-4}],
    }
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    loaded, metadata = read_state_dict(path)
    assert_same(loaded, tensors)
    assert metadata == {"global_step": 470000, "epoch": 6, "lr": 1e-4, "name": "v1", "np_step": 12}


def test_parameters_come_back_as_plain_tensors(tmp_path: Path) -> None:
    path = tmp_path / "params.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(keep_vars=True), path)
    loaded, _ = read_state_dict(path)
    assert set(loaded) == {"weight", "bias"}
    assert all(type(t) is torch.Tensor for t in loaded.values())


@pytest.fixture
def fake_lightning(monkeypatch: pytest.MonkeyPatch) -> type:
    """A stand-in pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint, removed after saving."""
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    modules = {name: types.ModuleType(name) for name in names}

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss"
            self.best_model_score = torch.tensor(0.25)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    modules[names[-1]].ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return ModelCheckpoint


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_checkpoint_loads_without_importing_lightning(
    tmp_path: Path, fake_lightning: type, monkeypatch: pytest.MonkeyPatch, legacy: bool
) -> None:
    tensors = sample_tensors()
    path = tmp_path / "lightning.ckpt"
    ckpt = {
        "state_dict": tensors,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        # Old Lightning keyed callback state by the class; newer versions pickle instances.
        "callbacks": {fake_lightning: {"best_model_score": torch.tensor(0.5)}, "instance": fake_lightning()},
    }
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    for name in list(sys.modules):
        if name.split(".")[0] == "pytorch_lightning":
            monkeypatch.delitem(sys.modules, name)
    loaded, metadata = read_state_dict(path)
    assert_same(loaded, tensors)
    assert metadata == {"global_step": 470000, "pytorch-lightning_version": "1.4.2"}
    assert "pytorch_lightning" not in sys.modules


# --------------------------------------------------------------------------- detection by bytes


def test_safetensors_named_ckpt_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    save_file({"a": torch.ones(3)}, str(path))
    assert detect_format(path) == "safetensors"
    loaded, _ = read_state_dict(path)
    assert torch.equal(loaded["a"], torch.ones(3))


def test_torch_zip_named_safetensors_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torch.save({"a": torch.ones(3)}, path)
    assert detect_format(path) == "torch-zip"
    loaded, _ = read_state_dict(path)
    assert torch.equal(loaded["a"], torch.ones(3))


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    error_for(tmp_path / "nope.safetensors", "cannot open file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    error_for(path, "empty file")


@pytest.fixture
def good_safetensors(tmp_path: Path) -> bytes:
    """Bytes of a valid safetensors file with a few hundred bytes of tensor data."""
    path = tmp_path / "good.safetensors"
    write_safetensors({"a": torch.randn(64), "b": torch.randn(32)}, path)
    return path.read_bytes()


def test_truncated_safetensors_data(tmp_path: Path, good_safetensors: bytes) -> None:
    header_len = int.from_bytes(good_safetensors[:8], "little")
    cut = good_safetensors[: len(good_safetensors) // 2]
    assert len(cut) > 8 + header_len  # the cut is inside the tensor data
    path = tmp_path / "half.safetensors"
    path.write_bytes(cut)
    data_len = len(cut) - 8 - header_len
    message = error_for(path, "truncated safetensors file", f"file has {data_len}", "re-download")
    assert "384 bytes of tensor data" in message  # (64 + 32) float32


def test_truncated_inside_safetensors_header(tmp_path: Path, good_safetensors: bytes) -> None:
    path = tmp_path / "header.safetensors"
    path.write_bytes(good_safetensors[:20])
    error_for(path, "truncated safetensors file", "re-download")


def test_safetensors_bad_json_header(tmp_path: Path) -> None:
    body = b'{"a": {"dtype": "F32", '
    path = tmp_path / "json.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    error_for(path, "corrupt safetensors file", "invalid JSON", "re-download")


def test_safetensors_offsets_beyond_file(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "offsets.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    error_for(path, "header says 4000 bytes of tensor data, file has 16")


def test_safetensors_offsets_disagree_with_shape(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "shape.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    error_for(path, "corrupt safetensors file", "invalid shape, data type, or offset", "re-download")


def test_git_lfs_pointer(tmp_path: Path) -> None:
    path = tmp_path / "v1-5-pruned.safetensors"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa\n"
        "size 4265146304\n"
    )
    error_for(path, "Git LFS pointer", "git lfs pull")


def test_html_page(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_text("\n  <!DOCTYPE html>\n<html><body>Sign in</body></html>\n")
    error_for(path, "web page")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(7, 256)) * 4)
    error_for(path, "unknown format", "expected .safetensors or a PyTorch .ckpt/.bin")


def test_truncated_torch_zip(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save(sample_tensors(), path)
    path.write_bytes(path.read_bytes()[:300])
    assert detect_format(path) == "torch-zip"
    error_for(path, "cannot read", "re-download")


def test_truncated_legacy_pickle(tmp_path: Path) -> None:
    path = tmp_path / "cut_legacy.ckpt"
    torch.save(sample_tensors(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:200])
    error_for(path, "re-download")


class TouchFile:
    """Pickles into a call that would create `target` when unpickled."""

    def __init__(self, target: Path, how: str) -> None:
        self.target, self.how = target, how

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        if self.how == "system":
            return os.system, (f"touch '{self.target}'",)
        return open, (str(self.target), "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol-5 pickles
@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("container", ["raw-pickle-2", "raw-pickle-5", "torch-zip", "torch-legacy"])
@pytest.mark.parametrize("name", ["evil.ckpt", "evil.safetensors"])
def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, how: str, container: str, name: str
) -> None:
    func = os.system if how == "system" else open
    refused = f"{func.__module__}.{func.__name__}"  # e.g. posix.system, io.open
    # First prove the payload is live: a plain unpickler really creates the file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(TouchFile(probe, how)))
    assert probe.exists()

    target = tmp_path / "pwned"
    # Tensors only in the torch containers: a raw pickle.dumps of a tensor asks for a
    # (refused) torch global of its own, which would be named first.
    weights = {} if container.startswith("raw-pickle") else {"w": torch.ones(2)}
    payload = {"state_dict": {**weights, "evil": TouchFile(target, how)}}
    path = tmp_path / name
    if container.startswith("raw-pickle"):
        path.write_bytes(pickle.dumps(payload, protocol=int(container[-1])))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=container == "torch-zip")
    error_for(path, "refuses to run code", refused)
    assert not target.exists()


def test_non_tensor_value_under_weight_key(tmp_path: Path) -> None:
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": {"ok": torch.ones(1), "model.bad": [1, 2, 3]}}, path)
    error_for(path, "'model.bad'", "not a tensor")


def test_non_dict_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    error_for(path, "not a dict of tensors")


def test_error_is_a_value_error_with_parts(tmp_path: Path) -> None:
    err = CheckpointError(tmp_path / "m.safetensors", "bad\nthing", "fix\n it")
    assert isinstance(err, ValueError)
    assert str(err) == f"{tmp_path / 'm.safetensors'}: bad thing; fix it"
    assert str(CheckpointError("m.ckpt", "cause only")) == "m.ckpt: cause only"


# --------------------------------------------------------------------------- atomic writes


def only_file(folder: Path) -> list[str]:
    """Names in a folder (temp files included, they start with a dot)."""
    return sorted(p.name for p in folder.iterdir())


def test_failure_mid_write_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors({"old": torch.zeros(3)}, path)
    before = path.read_bytes()
    real_bytes = weightfiles._tensor_bytes
    seen: list[Path] = []

    def fail_on_second(tensor: torch.Tensor) -> memoryview:
        seen.extend(tmp_path.glob(".model.safetensors.tmp-*"))  # the temp file exists mid-write
        if len(seen) > 1:
            raise OSError(28, "No space left on device")
        return real_bytes(tensor)

    monkeypatch.setattr(weightfiles, "_tensor_bytes", fail_on_second)
    with pytest.raises(OSError, match="No space left"):
        write_safetensors({"a": torch.ones(4), "b": torch.ones(4)}, path)
    assert seen, "the failure was not injected mid-write"
    assert path.read_bytes() == before
    assert only_file(tmp_path) == ["model.safetensors"]


def test_unserialisable_tensor_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors({"old": torch.zeros(3)}, path)
    before = path.read_bytes()
    # A meta tensor has a dtype and shape (so the header is written) but no data to copy.
    with pytest.raises(Exception):
        write_safetensors({"a": torch.ones(2), "z": torch.empty(4, device="meta")}, path)
    assert path.read_bytes() == before
    assert only_file(tmp_path) == ["model.safetensors"]


def test_failed_fsync_keeps_old_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.json"
    write_json({"version": 1}, path)
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_json({"version": 2}, path)
    assert path.read_bytes() == before
    assert only_file(tmp_path) == ["config.json"]


def test_write_json_round_trip_and_bad_object(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    config = {"in_channels": 4, "block_out_channels": [320, 640], "name": "ünet"}
    write_json(config, path)
    assert json.loads(path.read_text(encoding="utf-8")) == config
    with pytest.raises(TypeError):
        write_json({"bad": object()}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == config
    assert only_file(tmp_path) == ["config.json"]


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temp:
            assert temp.parent == tmp_path and temp.name.startswith(".out.txt.tmp-")
            temp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert only_file(tmp_path) == ["out.txt"]
    with atomic_path(path) as temp:
        temp.write_text("new")
        assert path.read_text() == "old"  # nothing visible until the block succeeds
    assert path.read_text() == "new"
    assert only_file(tmp_path) == ["out.txt"]
