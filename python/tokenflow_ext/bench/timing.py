"""The one timing helper of the project: warm-up, synchronise, median of repeats; peak extra memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _elapsed_ms(fn: Callable[[], object], device: str, loops: int) -> float:
    """Wall time of ``loops`` back-to-back calls (CUDA: between two events), in ms."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) * 1e3


def time_call(fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 5,
              min_sample_ms: float = 20.0, max_seconds: float = 30.0) -> Timing:
    """Median per-call time of ``fn()`` over ``repeats`` samples, after ``warmup`` calls.

    Fast calls are looped inside each sample until it lasts ``min_sample_ms`` (as ``timeit`` does), so
    timer resolution and scheduling noise do not dominate. Stops early (after at least 3 samples) once
    ``max_seconds`` of samples have been spent.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    single = _elapsed_ms(fn, device, 1)
    loops = max(1, int(min_sample_ms / max(single, 1e-3)) + 1) if single < min_sample_ms else 1
    samples: list[float] = []
    spent_ms = single
    for _ in range(repeats):
        samples.append(_elapsed_ms(fn, device, loops) / loops)
        spent_ms += samples[-1] * loops
        if spent_ms > max_seconds * 1e3 and len(samples) >= 3:
            break
    samples.sort()
    quantile = lambda q: samples[min(len(samples) - 1, int(q * (len(samples) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(samples), quantile(0.1), quantile(0.9), len(samples))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so that reused memory shows up in RSS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_memory(fn: Callable[[], object], device: str) -> int | None:
    """Bytes of peak memory ``fn()`` needs above what was in use before the call (None if unmeasurable).

    CUDA: the caching allocator's peak. CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs, or
    sampled every 0.5 ms where that is not writable) minus the RSS before the call.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    if not os.path.exists("/proc/self/status"):
        return None
    _release_free_heap()
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        fn()
        return max(0, _status_kib("VmHWM") - before) * 1024
    except OSError:
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _status_kib("VmRSS"))
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            done.set()
            sampler.join()
        return max(0, peak[0] - before) * 1024


def machine_description(device: str) -> str:
    """A one-line name of the machine: GPU name, or CPU model and core count."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def format_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
