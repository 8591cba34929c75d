"""Random damage to a small safetensors file: latentforge accepts exactly what the safetensors library accepts.

Every mutated file is judged by the library in the same run (``safetensors.torch.load_file`` and
``safe_open(...).metadata()``). Whatever it refuses, ``read_state_dict`` must refuse with a one-line
CheckpointError naming the file; whatever it reads, ``read_state_dict`` must read to the same names,
dtypes, shapes, bytes and metadata.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.weightfiles import CheckpointError, read_state_dict

Entries = list[tuple[str, object]]  # the header as (key, value) pairs, so that a key can appear twice
CASES_PER_FAMILY = 60
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "F8_E4M3", "F8_E5M2",
          "F8_E8M0", "U16", "U32", "U64", "F4", "F6_E2M3", "F33", "", "f32"]  # fmt: skip


def base_file(folder: Path) -> tuple[bytes, Entries]:
    """A valid file written by the library itself: mixed dtypes, a scalar, an empty tensor, metadata."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(4, 3, generator=gen),
        "h": torch.randn(5, generator=gen).half(),
        "b": torch.randn(3, 2, generator=gen).bfloat16(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "m": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 3),
        "u": torch.arange(7, dtype=torch.uint8),
    }
    path = folder / "base.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "n"})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    return raw[8 + header_len :], list(header.items())


def encode(entries: Entries, data: bytes, length_delta: int = 0, text: Callable[[str], str] = lambda t: t) -> bytes:
    """A file from header pairs and data; `text` edits the JSON text, `length_delta` the length field."""
    body = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}"
    header = text(body).encode("utf-8", "surrogatepass")
    return (len(header) + length_delta).to_bytes(8, "little", signed=False) + header + data


def tensor_entries(entries: Entries) -> list[int]:
    """Indices of the tensor entries (not __metadata__)."""
    return [i for i, (k, _) in enumerate(entries) if k != "__metadata__"]


def with_info(entries: Entries, index: int, **changes: object) -> Entries:
    """A copy of entries with one tensor's info fields changed."""
    out = [(k, dict(v) if isinstance(v, dict) else v) for k, v in entries]
    out[index][1].update(changes)
    return out


# --------------------------------------------------------------------------- mutation families


def duplicate_key(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    i = rng.choice(tensor_entries(entries))
    j = rng.choice(tensor_entries(entries))
    key = entries[i][0]
    twin = (key, entries[j][1]) if rng.random() < 0.7 else (key, entries[i][1])  # same info: still valid
    out = list(entries)
    out.insert(rng.randrange(len(out) + 1), twin)
    return f"duplicate {key!r} with {twin[1]}", encode(out, data)


def shifted_offsets(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    i = rng.choice(tensor_entries(entries))
    begin, end = entries[i][1]["data_offsets"]
    d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    which = rng.choice(["begin", "end", "both"])
    offsets = [begin + d * (which != "end"), end + d * (which != "begin")]
    grow = bytes(rng.choice([0, 0, max(d, 0)]))  # sometimes the data grows to fit
    return f"{entries[i][0]} offsets {offsets} (+{len(grow)} bytes)", encode(with_info(entries, i, data_offsets=offsets), data + grow)


def overlapping_offsets(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    i, j = rng.sample(tensor_entries(entries), 2)
    info_j = entries[j][1]
    changes = {k: info_j[k] for k in ("data_offsets", "shape", "dtype")} if rng.random() < 0.5 else {"data_offsets": info_j["data_offsets"]}
    return f"{entries[i][0]} onto {entries[j][0]}: {changes}", encode(with_info(entries, i, **changes), data)


def hole(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    """Move every tensor from some offset on by a gap, data included: a hole the header does not cover."""
    infos = [v for k, v in entries if k != "__metadata__"]
    cut = rng.choice(sorted({v["data_offsets"][0] for v in infos}))
    gap = rng.choice([1, 2, 4, 8, 16])
    out = [
        (k, v if k == "__metadata__" or v["data_offsets"][0] < cut else {**v, "data_offsets": [o + gap for o in v["data_offsets"]]})
        for k, v in entries
    ]
    return f"hole of {gap} at {cut}", encode(out, data[:cut] + b"\0" * gap + data[cut:])


def wrong_shape(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    i = rng.choice(tensor_entries(entries))
    shape = list(entries[i][1]["shape"])
    n = 1
    for d in shape:
        n *= d
    shape = rng.choice([
        shape + [1], shape[:-1], [n], list(reversed(shape)), shape + [0], [n + 1], [-1], [n, -1],
        [float(n)], [str(n)], None, n, [[n]], [2**64], [True] * len(shape),
    ])  # fmt: skip
    return f"{entries[i][0]} shape {shape!r}", encode(with_info(entries, i, shape=shape), data)


def wrong_dtype(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    i = rng.choice(tensor_entries(entries))
    dtype = rng.choice(DTYPES + [None, 3])
    return f"{entries[i][0]} dtype {dtype!r}", encode(with_info(entries, i, dtype=dtype), data)


def bad_json(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    edits: dict[str, Callable[[str], str]] = {
        "cut": lambda t: t[: rng.randrange(1, len(t))],
        "drop a character": lambda t: (lambda p: t[:p] + t[p + 1 :])(rng.randrange(len(t))),
        "replace a character": lambda t: (lambda p: t[:p] + rng.choice('{}[],:"0 x\\') + t[p + 1 :])(rng.randrange(len(t))),
        "trailing text": lambda t: t + rng.choice(["x", ",", "}", " ", "\n", "\0", "{}"]),
        "leading text": lambda t: rng.choice([" ", "\n", "\t", "\r", "x", "[", "\ufeff"]) + t,
        "NaN": lambda t: t.replace('"shape":[', '"shape":[NaN,', 1),
        "lone surrogate": lambda t: t.replace('"n"', '"\\ud800"', 1),
        "escaped name": lambda t: t.replace('"w"', '"\\u0077"', 1),
        "not an object": lambda t: "[" + t[1:-1] + "]",
        "padding": lambda t: t + " " * rng.randrange(1, 9),
        "deep nesting": lambda t: t[:-1] + ',"x":' + "[" * 2000 + "]" * 2000 + "}",
    }
    name = rng.choice(sorted(edits))
    return f"JSON: {name}", encode(entries, data, text=edits[name])


def metadata_types(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    value = rng.choice([None, 1, 1.5, True, [], ["a"], {}, {"k": "v"}, {"k": 1}, {"k": None}, {"k": ["v"]},
                        {"k": {"a": "b"}}, "text", {"": ""}, {"format": "np", "extra": "x"}])  # fmt: skip
    out = [(k, v) for k, v in entries if k != "__metadata__"]
    if value is not None or rng.random() < 0.5:
        out.insert(rng.randrange(len(out) + 1), ("__metadata__", value))
    if rng.random() < 0.2:
        out.append(("__metadata__", {"late": "wins?"}))
    return f"metadata {value!r}", encode(out, data)


def length_field(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    delta = rng.choice([-9, -8, -2, -1, 1, 2, 7, 8, len(data), len(data) + 1, 10**8, 2**40])
    return f"header length {delta:+d}", encode(entries, data, length_delta=delta)


def data_size(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    delta = rng.choice([-len(data), -64, -9, -8, -1, 1, 8, 64])
    grown = data[: len(data) + delta] if delta < 0 else data + bytes(rng.randrange(256) for _ in range(delta))
    return f"data {delta:+d} bytes", encode(entries, grown)


def benign(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    """Changes the library allows: entry order, extra fields, same-size reinterpretation."""
    out = list(entries)
    rng.shuffle(out)
    i = rng.choice(tensor_entries(out))
    change = rng.choice([{"extra": 1}, {"dtype": {"F32": "I32", "F16": "BF16", "BF16": "F16", "I64": "F64", "U8": "I8"}.get(out[i][1]["dtype"], out[i][1]["dtype"])}, {}])
    return f"shuffled, {out[i][0]} {change}", encode(with_info(out, i, **change), data)


def several(rng: random.Random, entries: Entries, data: bytes) -> tuple[str, bytes]:
    """Two header mutations on top of each other (the second on the first's JSON), then maybe the data."""
    first = rng.choice([shifted_offsets, wrong_dtype, metadata_types, duplicate_key, benign])
    what, raw = first(rng, entries, data)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    second = rng.choice([shifted_offsets, wrong_shape, wrong_dtype, overlapping_offsets, data_size])
    more, raw = second(rng, list(header.items()), raw[8 + header_len :])
    return f"{what}; {more}", raw


FAMILIES = [duplicate_key, shifted_offsets, overlapping_offsets, hole, wrong_shape, wrong_dtype, bad_json,
            metadata_types, length_field, data_size, benign, several]  # fmt: skip


# --------------------------------------------------------------------------- the comparison


def library_reading(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """What the safetensors library reads from the file, or None when it refuses it."""
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception:  # any refusal, whatever its type
        return None
    return tensors, metadata


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes, whatever its dtype (NaN-safe, unlike torch.equal)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_same_verdict(path: Path, what: str) -> bool:
    """Our reading agrees with the library's; returns whether the library accepted the file."""
    expected = library_reading(path)
    if expected is None:
        try:
            read_state_dict(path)  # any exception other than CheckpointError fails the test
        except CheckpointError as exc:
            message = str(exc)
        else:
            pytest.fail(f"{what}: the library refuses this file, we read it")
        assert "\n" not in message and "\r" not in message and path.name in message, (what, message)
        return False
    try:
        tensors, metadata = read_state_dict(path)
    except CheckpointError as exc:
        pytest.fail(f"{what}: the library reads this file, we refuse it: {exc}")
    want_tensors, want_metadata = expected
    assert metadata == want_metadata, what
    assert sorted(tensors) == sorted(want_tensors), what
    for name, want in want_tensors.items():
        got = tensors[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), (what, name)
        assert raw_bytes(got) == raw_bytes(want), (what, name)
    return True


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_we_refuse_and_accept_what_the_safetensors_library_does(tmp_path: Path, family) -> None:
    data, entries = base_file(tmp_path)
    rng = random.Random(f"safetensors-fuzz-{family.__name__}")
    verdicts = []
    for case in range(CASES_PER_FAMILY):
        what, raw = family(rng, entries, data)
        path = tmp_path / f"case-{case}.safetensors"
        path.write_bytes(raw)
        verdicts.append(check_same_verdict(path, what))
        path.unlink()
    # the mutations are real: the benign ones are all accepted, each other family has some refused
    assert all(verdicts) if family is benign else not all(verdicts), family.__name__


def test_base_file_reads_like_the_library(tmp_path: Path) -> None:
    data, entries = base_file(tmp_path)
    path = tmp_path / "same.safetensors"
    path.write_bytes(encode(entries, data))
    assert check_same_verdict(path, "unchanged")
