"""Measured latency: candidate blocks and whole networks timed on the run's device.

CPU: ``time.perf_counter`` around each call with a fixed thread count, with glibc's malloc keeping
freed memory (:func:`keep_freed_memory`). CUDA: CUDA events, optional replay of one captured CUDA
graph per call. Both: warm-up, then the median of repeats; calls timed together (a network and its
blocks, a teacher and its student) are timed in turn. Candidate blocks are timed in turn with their
teacher-shaped block, and the ratio is kept in a persisted table keyed by timing method, device,
torch version, dtype, batch, how the blocks ran (runtime, CUDA graphs and kernel choice; CPU
threads), teacher, block and genome, so a block is timed once per device and way of running it,
and a later run (or a resumed one) reads the same figure.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch

from pyevo.runfolder import atomic_write_text

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device_name(device: torch.device | str) -> str:
    """A name for the timing device that tells machines apart (CPU model or GPU name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return model


# Part of every latency table key: changed whenever the way blocks are timed changes, so that a
# persisted table never mixes timings taken one way with timings taken another.
TIMING_METHOD = "ratio-to-teacher-block,kept-heap"

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_heap_kept = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    By default glibc unmaps large freed buffers and trims the heap, and it moves its thresholds
    according to the sizes it has seen. The next call then page-faults its buffers back in. On a
    virtual machine that can cost more than the arithmetic, and it depends on what ran just before:
    the same block alone took 22 to 46 ms from one minute to the next
    (experiments/latency_estimate.md). With freed memory kept, every call after the warm-up reuses
    warm pages, as in a long-running inference process. This sets process-wide options, once, and
    is irreversible; the only cost is that memory stays with the process. Returns whether it applied
    (it applies with glibc only).
    """
    global _heap_kept
    if not _heap_kept and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        # The largest mmap threshold glibc accepts on 64-bit: buffers up to 32 MiB come from the heap.
        _heap_kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _heap_kept


@contextlib.contextmanager
def cpu_threads(count: int):
    """Fix torch's intra-op thread count while timing, then restore it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_call(fn: Callable[[], Any], device: torch.device | str, warmup: int, repeats: int,
              threads: int = 2, cuda_graph: bool = False) -> float:
    """Median wall time of ``fn()`` in milliseconds on ``device``."""
    return time_calls({"call": fn}, device, warmup, repeats, threads, cuda_graph)["call"]


def time_calls(fns: Mapping[Any, Callable[[], Any]], device: torch.device | str, warmup: int, repeats: int,
               threads: int = 2, cuda_graph: bool | Collection = False) -> dict[Any, float]:
    """Median wall time in milliseconds of each of ``fns`` on ``device``, timed in turn.

    ``cuda_graph``: on CUDA, replay one captured graph per call for every call (``True``) or for the
    calls named in a collection.

    Each repeat times every call once before the next repeat begins, so a slow spell of a shared
    machine (another job, a throttled clock) falls on all of them alike. Their ratios and
    differences, such as a network's stem (the whole network minus its blocks), then stay
    meaningful even when the absolute times drift from one minute to the next.
    """
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        if device.type == "cuda":
            _time_cuda(fns, times, device, warmup, repeats, cuda_graph)
        else:
            keep_freed_memory()
            with cpu_threads(threads):
                for _ in range(warmup):
                    for fn in fns.values():
                        fn()
                for _ in range(repeats):
                    for name, fn in fns.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _time_cuda(fns, times, device, warmup, repeats, cuda_graph) -> None:
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(warmup, 1)):
                for fn in fns.values():
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        calls = dict(fns)
        if cuda_graph:
            for name, fn in fns.items():
                if cuda_graph is not True and name not in cuda_graph:
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                calls[name] = graph.replay
                graph.replay()
        torch.cuda.synchronize()
        for _ in range(repeats):
            for name, call in calls.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))


def fingerprint(config: dict) -> str:
    """A short stable hash of a model config, so tables of different teachers never mix."""
    text = json.dumps({k: v for k, v in sorted(config.items()) if not k.startswith("_")},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class LatencyCacheError(ValueError):
    """The latency cache a user named (``latency.cache``) cannot be read as a table or cannot be written."""


def _read_cache(path: Path) -> dict[str, float]:
    """The entries of the cache file at ``path`` ({} when there is none), or a LatencyCacheError in one line.

    A file that is not a JSON object of numbers is refused rather than replaced: it is the user's file
    (another tool's, or a table edited by hand), and nothing pyevo did not write is overwritten."""
    if not path.exists():
        return {}
    fix = "move it away (pyevo re-times what it needs) or set latency.cache to another file"
    if not path.is_file():
        raise LatencyCacheError(f"latency.cache {path} is not a file; {fix}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LatencyCacheError(f"latency.cache {path} is not valid JSON ({getattr(error, 'msg', error)}); "
                                f"{fix}") from None
    except OSError as error:
        raise LatencyCacheError(f"latency.cache {path} cannot be read ({error.strerror or error}); {fix}") from None
    if not isinstance(data, dict):
        raise LatencyCacheError(f"latency.cache {path} must hold a JSON object (a pyevo latency table), not a "
                                f"{type(data).__name__}; {fix}")
    bad = next((key for key, value in data.items()
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)), None)
    if bad is not None:
        raise LatencyCacheError(f"latency.cache {path} is not a pyevo latency table (entry {bad!r} is "
                                f"{data[bad]!r}, not a finite number); {fix}")
    return data


def _check_writable(path: Path) -> None:
    """Refuse, before any work, a cache that could not be written at the end: its folder (or the nearest
    existing one above it) must take a new file (the lock file and the atomic write's temporary)."""
    from pyevo.runfolder import folder_write_error

    problem = folder_write_error(path.parent)
    if problem is not None:
        raise LatencyCacheError(f"latency.cache {path} cannot be written: {problem}; set latency.cache to a "
                                "writable file (\"\" keeps the table in the run folder)")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``<cache>.lock`` beside the cache, held while it is read, merged and
    replaced, so two processes saving at once both keep their entries."""
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # the user's usual mode (0666 less the umask)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def timing_setup(device: torch.device | str, threads: int, runtime: str, cuda_graph: bool) -> str:
    """The part of a latency table key that says how blocks ran while timed, beyond device, dtype and
    batch: on CUDA the runtime, whether graphs were replayed and the ops' kernel choices on this GPU
    (a digest of the measured table's entries for it, so a changed table re-times); on the CPU the
    thread count and the runtime as it runs there (the lean one runs the modules as they are, so both
    runtimes share one figure)."""
    from pyevo.runtime import replays_graphs

    if torch.device(device).type == "cuda":
        from pyevo.ops import kernel_choice_digest

        graphs = replays_graphs(runtime, cuda_graph, device)
        return f"{runtime},graph{int(graphs)},kernels-{kernel_choice_digest(device)}"
    return f"modules,threads{threads}"


class LatencyTable:
    """Block latencies relative to the teacher-shaped block, keyed by timing method, device, torch,
    dtype, batch, how the blocks ran (:func:`timing_setup`), teacher, block and genome.

    Persisted as JSON, shared by every run on the machine, so every run on the same device reuses a
    measurement. A ratio of two blocks timed in turn holds when the machine as a whole runs faster or
    slower than when it was stored; milliseconds would not. The file is checked when the table is
    opened (a JSON object of numbers, in a folder that takes new files: else a
    :class:`LatencyCacheError`, before any work) and saved by read-merge-write under a lock on
    ``<cache>.lock``, written atomically: runs that time different entries at the same time all keep
    theirs.
    """

    def __init__(self, path: str | Path | None, device: torch.device | str, dtype: str, batch: int,
                 teacher_id: str, *, setup: str, writes: bool = True):
        self.path = Path(path).expanduser() if path else None
        self.prefix = "|".join([TIMING_METHOD, device_name(device), f"torch{torch.__version__}", dtype, f"b{batch}",
                                setup, teacher_id])
        self.entries: dict[str, float] = {}
        self._measured: set[str] = set()  # keys this process put (they win over the file's on save)
        if self.path is not None:
            self.entries = _read_cache(self.path)
            if writes:  # under torchrun only rank 0 saves the table (and must be able to)
                _check_writable(self.path)

    def key(self, block: str, genome: str) -> str:
        return f"{self.prefix}|{block}|{genome}"

    def get(self, block: str, genome: str) -> float | None:
        return self.entries.get(self.key(block, genome))

    def put(self, block: str, genome: str, ratio: float) -> None:
        key = self.key(block, genome)
        self.entries[key] = float(ratio)
        self._measured.add(key)

    def lookup(self, block: str, genome: str, measure: Callable[[], float]) -> float:
        """The stored ratio, or ``measure()`` stored for next time."""
        value = self.get(block, genome)
        if value is None:
            value = measure()
            self.put(block, genome, value)
        return value

    def save(self) -> None:
        """Merge this table into the file: under the lock, what other runs saved meanwhile is read back and
        kept, this process's own measurements (and entries the file lacks) are added, and the result
        replaces the file atomically. This table then holds the merged entries too."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            merged = _read_cache(self.path)
            merged.update({key: value for key, value in self.entries.items()
                           if key in self._measured or key not in merged})
            atomic_write_text(self.path, json.dumps(merged, indent=0, sort_keys=True))
        self.entries = merged
