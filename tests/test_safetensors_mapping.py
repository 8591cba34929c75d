"""Open files and memory of safetensors loading: bounded descriptors, pages handed back when a tensor goes."""

from __future__ import annotations

import errno
import mmap
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentforge.weightfiles import CheckpointError, read_state_dict, write_safetensors

OPEN_FILES = 256  # a low but real soft limit (macOS defaults to 256; many Linux services to 1,024)
MiB = 1024 * 1024


def run_with_open_file_limit(code: str) -> str:
    """Run `code` in a fresh Python whose open-file limit is OPEN_FILES; its stdout (it must succeed)."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({OPEN_FILES}, {OPEN_FILES}))\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=None
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_many_tensors_load_under_a_low_open_file_limit(tmp_path: Path) -> None:
    path = tmp_path / "many.safetensors"
    count = 3000  # more than SDXL's ~2,500 tensors, far more than the limit
    write_safetensors({f"t{i}": torch.full((3,), float(i)) for i in range(count)}, path)
    out = run_with_open_file_limit(f"""
        from latentforge.weightfiles import read_state_dict
        tensors, _ = read_state_dict({str(path)!r})  # all of them alive at once
        print(len(tensors), sum(float(t.sum()) for t in tensors.values()))
    """)
    assert out.split() == [str(count), str(float(3 * sum(range(count))))]


def test_shipped_model_loads_under_a_low_open_file_limit() -> None:
    out = run_with_open_file_limit("""
        import latentforge
        from latentforge.pipeline import DEFAULT_MODEL
        pipe = latentforge.load(DEFAULT_MODEL, device="cpu")
        print(sum(p.numel() for p in pipe.unet.parameters()) > 0)
    """)
    assert out.split() == ["True"]


@pytest.mark.parametrize("kind, free", [("safetensors", 0), ("torch-zip", 1)])
def test_running_out_of_open_files_is_not_called_damage(tmp_path: Path, kind: str, free: int) -> None:
    """No descriptor left: our own open fails. One left: torch's mmap load of a zip needs a second one."""
    path = tmp_path / "m.bin"
    if kind == "safetensors":
        write_safetensors({"a": torch.ones(2)}, path)
    else:
        torch.save({"a": torch.ones(2)}, path)
    out = run_with_open_file_limit(f"""
        import os
        from latentforge.weightfiles import CheckpointError, read_state_dict
        read_state_dict({str(path)!r})  # once while descriptors are free: the lazy imports are done
        held = []
        try:
            while True:
                held.append(os.open({str(path)!r}, os.O_RDONLY))
        except OSError:
            pass
        for fd in held[:{free}]:
            os.close(fd)
        try:
            read_state_dict({str(path)!r})
        except CheckpointError as exc:
            print(exc)
    """)
    assert "Too many open files" in out and "ulimit -n" in out and "damaged" not in out, out


def test_open_file_failure_mid_load_is_not_called_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors({"a": torch.ones(2)}, path)

    def no_more_files(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(mmap, "mmap", no_more_files)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "Too many open files" in message and "ulimit -n" in message and "damaged" not in message


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_a_dropped_tensor_leaves_memory_and_its_neighbour_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "two.safetensors"
    a_len = 4 * MiB // 4 + 3  # not a whole number of pages: "a" and "b" share one page
    write_safetensors({"a": torch.ones(a_len), "b": torch.full((4 * MiB // 4,), 2.0)}, path)
    tensors, _ = read_state_dict(path)
    a, b = tensors.pop("a"), tensors.pop("b")
    assert float(a.sum()) == a_len and float(b.sum()) == 2 * MiB  # every page read in
    b[0] = 5.0  # a private change on the page shared with "a"
    both = mapped_kib(path)
    assert both >= 8 * 1024
    del a
    assert mapped_kib(path) <= both - 4 * 1024 + 8  # a's pages are gone (but for the shared page)
    assert float(b[0]) == 5.0 and float(b[1:].sum()) == 2 * (MiB - 1)  # b untouched, its change kept
