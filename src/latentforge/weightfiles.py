"""Weight files: format detection from bytes, safe reading and atomic writing of safetensors and PyTorch files.

Handles .safetensors and PyTorch .ckpt/.bin/.pt (zip or legacy pickle) as files of named tensors; it knows
nothing of Stable Diffusion. Nothing from a pickle-based file is ever executed: those go through
``torch.load(weights_only=True)`` with an explicit, small allow-list of extra globals.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import mmap
import os
import pickle
import pickletools
import weakref
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_path
from .errors import FileError, one_line

PathLike = str | os.PathLike[str]

# safetensors itself refuses headers above 100 MB; anything larger is not a safetensors file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LFS_PREFIX = b"version https://git-lfs.github.com/spec"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_REDOWNLOAD = "re-download it"
_REDOWNLOAD_DAMAGED = "the file is damaged: re-download it"

# safetensors dtype names <-> torch dtypes; optional ones only exist in newer torch builds.
_ST_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}
_TORCH_TO_ST: dict[torch.dtype, str] = {dtype: name for name, dtype in _ST_DTYPES.items()}


class CheckpointError(FileError):
    """A weight file that cannot be read safely, or a model folder that cannot be used."""


def check_weights_of(
    build: Callable[[], torch.nn.Module], tensors: Mapping[str, torch.Tensor], name: PathLike, what: str, fix: str
) -> None:
    """Strict loading: `tensors` are exactly the weights of the module `build()` makes (built on the meta device,
    so nothing is allocated), with its shapes, floating-point and finite (NaN/inf weights would make every
    image black); else a CheckpointError naming the first wrong weight as "<what> weight 'key'"."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        key, problem = (missing[0], "missing") if missing else (unexpected[0], "unexpected")
        count = len(missing) + len(unexpected)
        raise CheckpointError(name, f"{what} weight {key!r} is {problem} ({count} weights missing or unexpected)", fix)
    for key, value in tensors.items():
        weight = f"{what} weight {key!r}"
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(name, f"{weight} has shape {tuple(value.shape)}, expected {expected[key]}", fix)
        if not value.is_floating_point():
            raise CheckpointError(name, f"{weight} is {str(value.dtype).removeprefix('torch.')}, not a float")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(name, f"{weight} holds NaN/inf", _REDOWNLOAD_DAMAGED)


# --------------------------------------------------------------------------- format detection


def detect_format(path: PathLike) -> str:
    """Return "safetensors", "torch-zip" or "pickle" from the file's bytes, else raise CheckpointError."""
    head = _read_head(path, 64)
    if not head:
        raise CheckpointError(path, "empty file (0 bytes)", _REDOWNLOAD)
    if head.startswith(_LFS_PREFIX):
        raise CheckpointError(
            path,
            "this is a Git LFS pointer file, not the weights",
            "run `git lfs pull` in the repository (or download the file itself)",
        )
    if head.lstrip().startswith(b"<"):
        raise CheckpointError(
            path,
            "this looks like a web page (HTML), not weights",
            "the download failed or needs a login; download the file itself again",
        )
    if _looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head[0] == _PICKLE_PROTO:
        return "pickle"
    raise CheckpointError(
        path,
        f"unknown format (starts with bytes {head[:8].hex(' ')})",
        "expected .safetensors or a PyTorch .ckpt/.bin",
    )


def _read_head(path: PathLike, size: int) -> bytes:
    """First bytes of a file, with open failures turned into CheckpointError."""
    try:
        with open(path, "rb") as file:
            return file.read(size)
    except IsADirectoryError as exc:
        raise CheckpointError(path, "is a folder, not a weight file") from exc
    except OSError as exc:
        raise CheckpointError(path, f"cannot open file ({exc.strerror or exc})", _fix_for(exc)) from exc


def _looks_like_safetensors(head: bytes) -> bool:
    """Little-endian u64 header length of a plausible size, followed by what starts a JSON object."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    # Only plausibility here (the safetensors library judges the rest): a header cut short is still
    # reported as a truncated safetensors file. JSON may start with whitespace, and the library allows it.
    return 2 <= header_len <= _MAX_HEADER_BYTES and head[8:9] in (b"{", b" ", b"\t", b"\n", b"\r")


# --------------------------------------------------------------------------- reading


def read_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Load (tensors, metadata) from a weight file without ever running code from it."""
    fmt = detect_format(path)
    with _reading(path, fmt):
        if fmt == "safetensors":
            return _read_safetensors(path)
        return _unwrap(path, _load_pickle(path, fmt))


def read_pickle(path: PathLike) -> object:
    """Whatever a PyTorch file holds (nested dicts and lists of tensors and plain values, e.g. an A1111
    embedding), through the same weights-only unpickler as `read_state_dict`, without unwrapping it."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        raise CheckpointError(path, "is a safetensors file, not a PyTorch pickle", "read it with read_state_dict")
    with _reading(path, fmt):
        return _load_pickle(path, fmt)


@contextlib.contextmanager
def _reading(path: PathLike, fmt: str) -> Iterator[None]:
    """Any library failure while reading becomes the same one-line, file-named CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(path, f"cannot read {fmt} file ({_describe(exc)})", _fix_for(exc)) from exc


def _fix_for(exc: Exception) -> str | None:
    """What to do about a failure while reading: limits of the system are not damage to the file."""
    if _out_of_open_files(exc):
        return "too many files are open; raise the limit (`ulimit -n`) or open fewer files at once"
    if isinstance(exc, OSError):
        return "not enough memory to map the file; free some memory" if exc.errno == errno.ENOMEM else None
    return f"the file is damaged; {_REDOWNLOAD}"


def _out_of_open_files(exc: Exception) -> bool:
    """EMFILE or ENFILE, also when a library only names it in its message (torch's file opening does)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    return any(os.strerror(code) in str(exc) for code in (errno.EMFILE, errno.ENFILE))


def _describe(exc: BaseException, limit: int = 200) -> str:
    """'Type: message' of a library error, shortened: some (miniz) run to several sentences."""
    text = one_line(exc)
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Let the safetensors library judge the file, then view each tensor in one private mapping of it.

    Nothing is read yet and nothing is copied. Each tensor's pages are handed back as soon as the
    tensor is dropped (see _release_when_dropped), so converting tensors one by one (dtype, layout)
    keeps one copy of the weights: a float32 file loaded as bfloat16 peaks near the bfloat16 size.
    One mapping and one file descriptor per file, however many tensors. Writes never reach the file."""
    with _safetensors_reference(path) as reference:
        metadata = dict(reference.metadata() or {})
        entries, start = _safetensors_entries(path)
        tensors = {}
        with open(path, "rb") as file:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, info in entries.items():
            if info["dtype"] not in _ST_DTYPES:  # a dtype this torch lacks a name for: safetensors reads it
                tensors[name] = _library_tensor(path, name)
                continue
            begin, end = info["data_offsets"]
            tensors[name] = _view_tensor(mapping, start + begin, end - begin, _ST_DTYPES[info["dtype"]], info["shape"])
    return tensors, metadata


@contextlib.contextmanager
def _safetensors_reference(path: PathLike) -> Iterator[Any]:
    """The file opened by the safetensors library, which checks the whole header against the file.

    That library is the reference for what a valid safetensors file is: whatever it refuses (bad JSON,
    duplicate names, overlapping offsets, holes, shapes that disagree with sizes, a short or long data
    section) is refused here, with its reason."""
    try:
        reference = safe_open(os.fspath(path), framework="numpy")
    except SafetensorError as exc:
        raise _refusal(path, exc) from exc
    except OSError as exc:  # the library words every open failure as FileNotFoundError: ask the system
        _read_head(path, 1)
        raise CheckpointError(path, f"cannot open file ({_describe(exc)})") from exc
    with reference:
        yield reference


def _refusal(path: PathLike, exc: Exception) -> CheckpointError:
    """The library's reason for refusing a file, said as truncation when the file is shorter than its header."""
    shortfall = _shortfall(path)
    if shortfall:
        return CheckpointError(path, f"truncated safetensors file ({shortfall})", _REDOWNLOAD)
    return CheckpointError(path, f"corrupt safetensors file ({_describe(exc)})", _REDOWNLOAD)


def _shortfall(path: PathLike) -> str | None:
    """How much shorter the file is than its header says (wording only: validity is the library's call)."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        if 8 + header_len > file_size:
            return f"header says its JSON is {header_len} bytes, file has {file_size - 8} after the length"
        raw = file.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's limit: the library's reason stands
        return None
    entries = header.values() if isinstance(header, dict) else []
    offsets = [info.get("data_offsets") for info in entries if isinstance(info, dict)]
    ends = [o[1] for o in offsets if isinstance(o, list) and len(o) == 2 and isinstance(o[1], int)]
    needed, data_size = max(ends, default=0), file_size - 8 - header_len
    return f"header says {needed} bytes of tensor data, file has {data_size}" if needed > data_size else None


def _safetensors_entries(path: PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a header the library accepted, and where the data section starts."""
    with open(path, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_len).decode("utf-8"))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _library_tensor(path: PathLike, name: str) -> torch.Tensor:
    """One tensor read by safetensors itself (for dtypes missing from our table)."""
    with safe_open(os.fspath(path), framework="pt", device="cpu") as st:
        return st.get_tensor(name)


def _view_tensor(mapping: mmap.mmap, offset: int, size: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor viewing `size` bytes of the mapping at `offset`; its pages are released when it is dropped."""
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    window = memoryview(mapping)[offset : offset + size]
    _release_when_dropped(window, mapping, offset, size)
    flat = torch.frombuffer(window, dtype=torch.uint8)  # holds `window` until the last view of it goes
    if offset % dtype.itemsize:  # misaligned data (a non-padded header): one copy, the window dropped now
        flat = flat.clone()
    return flat.view(dtype).reshape(shape)


def _release_when_dropped(window: memoryview, mapping: mmap.mmap, offset: int, size: int) -> None:
    """Once nothing views `window` any more, drop the process's pages of the whole pages inside it.

    Safe because tensors of a valid file never overlap: no other tensor sees those pages. Pages shared
    with a neighbouring tensor stay until the mapping itself goes (with the file's last tensor)."""
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (offset + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
        weakref.finalize(window, mapping.madvise, mmap.MADV_DONTNEED, first, last - first).atexit = False


def _load_pickle(path: PathLike, fmt: str) -> object:
    """Load a torch.save file with the weights-only unpickler; a refused global is named in the error."""
    with torch.serialization.safe_globals(_extra_safe_globals()):
        try:
            return _torch_load(os.fspath(path), mmap=fmt == "torch-zip")
        except pickle.UnpicklingError as exc:
            raise _unpickling_error(path, fmt, exc) from exc


def _torch_load(path: str, mmap: bool) -> object:
    """torch.load, weights only, onto the CPU; mmap (zip format only) keeps weights on disk until used."""
    if not path.endswith(".safetensors"):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    # torch.load routes paths named *.safetensors to safetensors by name; we already know from the
    # bytes that this one is a pickle, so hand it an open file (which cannot be mmapped).
    with open(path, "rb") as file:
        return torch.load(file, map_location="cpu", weights_only=True)


def _unwrap(path: PathLike, loaded: object) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Split an LDM/Lightning {"state_dict": ..., "global_step": ...} into tensors and plain metadata."""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(path, f"holds a {type(loaded).__name__}, not a dict of tensors")
    weights, metadata = loaded, {}
    if isinstance(loaded.get("state_dict"), Mapping):
        weights = loaded["state_dict"]
        plain = {key: _plain(value) for key, value in loaded.items() if key != "state_dict"}
        metadata = {str(key): value for key, value in plain.items() if value is not None}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise CheckpointError(path, f"weight key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"weight {key!r} is a {type(value).__name__}, not a tensor")
        # Parameters come back as plain tensors (no copy): callers only want the data.
        tensors[key] = value.detach() if isinstance(value, torch.nn.Parameter) else value
    return tensors, metadata


def _plain(value: object) -> int | float | str | None:
    """The value if it is a plain number or string (numpy scalars unwrapped), else None."""
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, (int, float, str)) else None


# --------------------------------------------------------------------------- pickle allow-list


class _Placeholder:
    """Inert stand-in for a training-time object (e.g. a Lightning callback) inside a checkpoint."""

    def __new__(cls, *args: object, **kwargs: object) -> _Placeholder:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        # Keep the pickled state as data; nothing from the file is ever called.
        self.state = state


def _placeholder_class(module: str, name: str) -> type[_Placeholder]:
    """A _Placeholder subclass that pickles resolve as module.name."""
    return type(name, (_Placeholder,), {"__module__": module, "__qualname__": name})


# Lightning training checkpoints (e.g. the original SD 1.x .ckpt releases) store callback objects
# or classes; they are loaded as placeholders so pytorch_lightning is never imported.
_PLACEHOLDERS: dict[str, type[_Placeholder]] = {
    f"{module}.{name}": _placeholder_class(module, name)
    for module, name in [
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
    ]
}


def _numpy_safe_globals() -> list[tuple[object, str]]:
    """numpy scalars/arrays that some SD checkpoints carry in their training metadata."""
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    entries: list[tuple[object, str]] = [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    # numpy 1 pickles say numpy.core, numpy 2 pickles say numpy._core: accept both spellings.
    for core in ("numpy.core", "numpy._core"):
        entries.append((multiarray.scalar, f"{core}.multiarray.scalar"))
        entries.append((multiarray._reconstruct, f"{core}.multiarray._reconstruct"))
    # Unpickled dtypes are instances of per-type subclasses (e.g. numpy.dtypes.Int64DType),
    # which torch must also allow for their BUILD step; pickles never name these directly.
    dtype_classes = {type(np.dtype(code)) for code in np.typecodes["All"]}
    entries += [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in dtype_classes]
    return entries


def _extra_safe_globals() -> list[tuple[object, str]]:
    """Everything allowed on top of torch's weights-only defaults, as (object, pickled name)."""
    return [(cls, name) for name, cls in _PLACEHOLDERS.items()] + _numpy_safe_globals()


def _unpickling_error(path: PathLike, fmt: str, exc: pickle.UnpicklingError) -> CheckpointError:
    """Name the global the weights-only unpickler refused, or describe why it stopped."""
    refused = _refused_globals(path, fmt)
    if refused:
        return CheckpointError(
            path,
            f"refuses to run code: the pickle asks for {', '.join(refused[:3])}",
            "this file may be malicious; use a .safetensors version of the model instead",
        )
    return CheckpointError(
        path,
        f"cannot load pickle safely ({_torch_detail(str(exc))})",
        "the file is damaged or holds objects other than tensors; "
        "re-download it or use a .safetensors version",
    )


def _refused_globals(path: PathLike, fmt: str) -> list[str]:
    """Globals in the file outside the allowed set, in file order (best effort, for the message)."""
    try:
        # Private torch API, used only to word the error; the check itself is torch's.
        from torch import _weights_only_unpickler as wo

        allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
        with _pickle_stream(path, fmt) as stream:
            found = _pickle_globals(stream, max_pickles=1 if fmt == "torch-zip" else 5)
    except Exception:  # wording only: fall back to torch's own explanation
        return []
    return list(dict.fromkeys(name for name in found if name not in allowed))  # unique, in file order


@contextlib.contextmanager
def _pickle_stream(path: PathLike, fmt: str) -> Iterator[IO[bytes]]:
    """The pickle bytes of a checkpoint: data.pkl inside a torch zip, else the file itself."""
    if fmt != "torch-zip":
        with open(path, "rb") as file:
            yield file
        return
    with zipfile.ZipFile(path) as archive:
        member = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
        yield io.BytesIO(archive.read(member))


_STRING_OPS = {
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"
}
_NO_PUSH_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}


def _pickle_globals(stream: IO[bytes], max_pickles: int) -> list[str]:
    """Every 'module.name' global the pickle(s) import, found by disassembly, never by loading."""
    found: list[str] = []
    recent: list[object] = []  # last values pushed: STACK_GLOBAL takes its names from the two latest
    memo: dict[int, object] = {}
    # Legacy torch files are several pickles in a row (magic, protocol, sys info, data, keys).
    for _ in range(max_pickles):
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", ".", 1))
                elif op.name == "STACK_GLOBAL":
                    found.append(f"{recent[-2]}.{recent[-1]}" if len(recent) >= 2 else "<unknown>")
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in {"PUT", "BINPUT", "LONG_BINPUT"}:
                    memo[arg] = recent[-1] if recent else None
                elif op.name in {"GET", "BINGET", "LONG_BINGET"}:
                    recent.append(memo.get(arg))
                elif op.name not in _NO_PUSH_OPS:
                    recent.append(arg if op.name in _STRING_OPS else None)
                del recent[:-2]
        except ValueError:  # end of the pickles (raw tensor bytes follow) or garbage
            break
    return found


def _torch_detail(message: str) -> str:
    """The informative line of torch's long multi-line weights-only error."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Check the documentation")]
    return lines[-1].removeprefix("WeightsUnpickler error:").strip() if lines else "unknown reason"


# --------------------------------------------------------------------------- writing


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write tensors as .safetensors, streaming one tensor at a time."""
    order, header = _safetensors_layout(tensors, metadata)
    with atomic_path(path) as temp, open(temp, "wb") as file:
        file.write(len(header).to_bytes(8, "little"))
        file.write(header)
        for name in order:
            file.write(_tensor_bytes(tensors[name]))


def _safetensors_layout(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[list[str], bytes]:
    """Data order and the padded JSON header for a set of tensors."""
    for name, tensor in tensors.items():
        _check_writable(name, tensor)
    metadata = metadata or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    # Largest items first, like upstream safetensors, so every tensor stays aligned for mmap.
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _TORCH_TO_ST[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    # Pad with spaces to 8 bytes so the data section starts aligned.
    return order, header + b" " * (-len(header) % 8)


def _check_writable(name: object, tensor: object) -> None:
    """Reject what safetensors cannot hold, before any file is touched."""
    if not isinstance(name, str) or name == "__metadata__":
        raise ValueError(f"invalid tensor name {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name!r} is a {tensor.layout} tensor; only dense tensors can be saved")
    if tensor.dtype not in _TORCH_TO_ST:
        raise TypeError(f"{name!r} has dtype {tensor.dtype}, which safetensors cannot store")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of one tensor; copies only when it is not a dense CPU block."""
    data = tensor.detach().resolve_conj().resolve_neg()
    if data.device.type != "cpu":
        data = data.cpu()
    if not data.is_contiguous():
        data = data.contiguous()
    # A contiguous view (even one sharing storage with other tensors) is written as-is, no copy.
    # Native byte order is safetensors' little-endian on every platform torch ships for.
    return memoryview(data.reshape(-1).view(torch.uint8).numpy())
