"""Pieces every benchmark shares: machine description, process-isolated runs, memory readings, markdown."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"  # git-ignored: generated checkpoints and helper installs
DOC = REPO / "docs" / "benchmarks.md"
THREADS = 2
RESULT_MARKER = "BENCHMARK-RESULT "  # the worker's one JSON line on stdout starts with this
GB = 1e9
PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "latentforge")


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str, path: Sequence[Path] = ()) -> str:
    """Installed version of a distribution (looked up in `path` first when given), or 'not installed'."""
    if path:
        found = list(importlib.metadata.distributions(name=name, path=[str(p) for p in path]))
        if found:
            return found[0].version
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    """Short commit of the working tree, with '+changes' when it differs from that commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "src") else "")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, OS, Python, library versions, date."""
    import psutil

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": psutil.virtual_memory().total / GB,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in PACKAGES},
        "git": git_revision(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def machine_markdown(info: dict[str, Any]) -> str:
    """The machine as a markdown bullet list."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return "\n".join(
        [
            f"- CPU: {info['cpu']}, {info['cores']} cores; RAM {info['ram_gb']:.1f} GB; {info['os']}",
            f"- Python {info['python']}; {versions}",
            f"- latentforge commit {info['git']}; measured {info['date']}",
        ]
    )


# --------------------------------------------------------------------------- inside a worker


def limit_threads(threads: int = THREADS) -> None:
    """Pin torch's intra- and inter-op pools (call before any parallel work)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already started: only possible when something ran before us
        pass


def memory_now() -> dict[str, float]:
    """This process's RSS now (total, anonymous and file-backed) and its peak so far, in GB."""
    status = {}
    with open("/proc/self/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                status[key] = int(value.split()[0]) * 1024 / GB  # kB
    # ru_maxrss is in kilobytes on Linux (bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / GB
    return {"rss": status["VmRSS"], "anon": status["RssAnon"], "file": status["RssFile"], "peak": peak}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def alternate(ways: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each way over `repeats` calls, the ways taking turns (order reversed every other
    turn) after one warm-up call each."""
    for fn in ways.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for turn in range(repeats):
        for name in names if turn % 2 == 0 else reversed(names):
            times[name].append(timed(ways[name])[1])
    return {name: statistics.median(values) for name, values in times.items()}


def relative_error(got: Any, want: Any) -> float:
    """Relative L2 error of a tensor against a float64 reference."""
    return float((got.double() - want).norm() / want.norm())


def cpu_seconds() -> float:
    """User plus system CPU time this process has used so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(result: dict[str, Any]) -> None:
    """Hand a worker's result to the parent: one marked JSON line on stdout."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- from the parent


def worker_env(threads: int = THREADS, pythonpath: Sequence[Path] = ()) -> dict[str, str]:
    """The environment of a worker: thread pools pinned, optional extra import paths first."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"  # no model hub, ever
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_isolated(
    module: str, args: Sequence[str], env: dict[str, str], timeout: float = 1800, interpreter: str | Path = sys.executable,
) -> dict[str, Any]:  # fmt: skip
    """Run `python -m module *args` in a fresh process (of `interpreter`, by default this one's) and return
    the result it emitted."""
    command = [str(interpreter), "-m", module, *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {' '.join(command[1:])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}{proc.stdout[-2000:]}"
        )
    return json.loads(lines[-1].removeprefix(RESULT_MARKER))


def warm_page_cache(path: Path, chunk: int = 64 * 1024 * 1024) -> float:
    """Read a whole file once, untimed by the caller, so every run starts from a warm page cache; seconds."""
    start = time.perf_counter()
    buffer = bytearray(chunk)
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buffer):
            pass
    return time.perf_counter() - start


# --------------------------------------------------------------------------- reporting


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` has one 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [headers, rule, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def replace_section(doc: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Put `body` between `<!-- name:begin -->` and `<!-- name:end -->` in doc, keeping everything else."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"{title}\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, doc)


def publish(
    out: Path, data: dict[str, Any], markdown: str, section: str, to_doc: bool = True,
    doc: Path = DOC, title: str = "# Benchmarks",
) -> None:  # fmt: skip
    """Write the raw results to `out` (JSON), print the markdown, and put it in `doc`'s section."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(markdown)
    if to_doc:
        replace_section(doc, section, markdown, title=title)
        print(f"wrote the '{section}' section of {doc.relative_to(REPO)}; raw results in {out.relative_to(REPO)}")


# --------------------------------------------------------------------------- peak memory of a phase


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, so that a later `peak_rss()` covers only
    what came after (Linux >= 4.0: writing 5 to /proc/self/clear_refs). False where that is unsupported.
    `ru_maxrss` (memory_now()["peak"]) is not reset: it keeps the whole process's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> float:
    """This process's peak RSS (VmHWM) since it started or since the last `reset_peak_rss()`, in GB."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


# --------------------------------------------------------------------------- a measured call in a worker


def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """fn() under torch.no_grad(), and what it took: seconds, CPU seconds (all threads), the 1-minute load
    average right after it, and this process's peak RSS during it in GB, what it held before included (NaN
    where the peak cannot be reset)."""
    import torch

    reset = reset_peak_rss()
    cpu_before = cpu_seconds()
    with torch.no_grad():
        value, seconds = timed(fn)
    stats = {"seconds": seconds, "cpu_s": cpu_seconds() - cpu_before, "loadavg": os.getloadavg()[0]}
    return value, {**stats, "peak_gb": peak_rss() if reset else float("nan")}


def load_then_generate(load: Callable[[], Any], generate: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
    """A whole run in a fresh process: `load()`, then one measured `generate(loaded)`. Its output, and the load
    time, the generation's time, CPU time and load average, the memory after each phase and the generation's
    peak RSS (weights included)."""
    loaded, load_s = timed(load)
    after_load = memory_now()
    value, stats = measured(lambda: generate(loaded))
    return value, {
        "load_s": load_s,
        "txt2img_s": stats["seconds"],
        "cpu_s": stats["cpu_s"],
        "loadavg": stats["loadavg"],
        "memory": {"after_load": after_load, "after_txt2img": memory_now()},
        "txt2img_peak_gb": stats["peak_gb"],
    }


# --------------------------------------------------------------------------- long-lived workers


def serve(handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Worker side of `Worker`: answer each JSON request line on stdin with one `emit`ted result, until stdin closes."""
    for line in sys.stdin:
        if line.strip():
            emit(handle(json.loads(line)))


def serve_calls(calls: dict[str, Callable[[], Any]], save: Callable[[Any, Path], str]) -> None:
    """Worker side of timed operations: answer each {"op": name, "save": path | None} with `measured`'s
    figures for calls[name](), the RSS after it, and where `save` put the output when asked, until stdin closes."""

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        value, result = measured(calls[request["op"]])
        result["rss_gb"] = memory_now()["rss"]
        if request.get("save"):
            result["saved"] = save(value, Path(request["save"]))
        return result

    serve(handle)


class Worker:
    """A long-lived `python -m module *args` driven by requests: one JSON line in, one marked JSON line out.

    Lets a benchmark keep each library loaded in a process of its own and alternate single calls between
    them. The worker's stderr and any unmarked stdout go to `log`. `interpreter` runs it (by default this
    process's Python; another virtual environment's for a library that must not share ours)."""

    def __init__(
        self, module: str, args: Sequence[str], env: dict[str, str], log: Path, interpreter: str | Path = sys.executable,
    ) -> None:  # fmt: skip
        self.name = " ".join([module, *args])
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        self._log = open(log, "a", encoding="utf-8")  # O_APPEND: the worker's stderr appends to the same file
        self.proc = subprocess.Popen(
            [str(interpreter), "-m", module, *args], cwd=REPO, env=env, text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        )  # fmt: skip

    def receive(self) -> dict[str, Any]:
        """The worker's next result (its first one, once it has started, says it is ready)."""
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            if line.startswith(RESULT_MARKER):
                return json.loads(line.removeprefix(RESULT_MARKER))
            self._log.write(line)
            self._log.flush()
        code = self.proc.wait()
        self._log.flush()
        tail = self.log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"worker {self.name} exited (code {code}) without answering; end of {self.log}:\n{tail}")

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its result."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self, timeout: float = 120) -> int:
        """End the worker (closing its stdin ends `serve`); its exit code."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


def abba(items: Sequence[str], turn: int) -> list[str]:
    """The items in order on even turns, reversed on odd ones (ABBA)."""
    return list(items) if turn % 2 == 0 else list(reversed(items))


def ask_in_turn(
    workers: dict[str, Worker], ops: Sequence[str], repeats: int, done: Container[tuple[int, str, str]],
    keep: Callable[[dict[str, Any]], None],
) -> None:  # fmt: skip
    """`repeats` rounds of one call per operation and worker, the workers taking turns call by call (order
    reversed every other call); each result, with its library, op and repeat, goes to `keep`. The
    (repeat, op, library) in `done` are skipped (a resumed run)."""
    for repeat in range(repeats):
        for turn, op in enumerate(ops):
            for library in abba(list(workers), repeat + turn):
                if (repeat, op, library) in done:
                    continue
                result = workers[library].ask({"op": op})
                result.update(library=library, op=op, repeat=repeat)
                keep(result)
