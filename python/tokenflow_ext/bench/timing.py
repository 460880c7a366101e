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
    """Per-call times of one implementation over ``repeats`` samples: median, p10, p90, min and max."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    min_ms: float = float("nan")
    max_ms: float = float("nan")

    @property
    def spread(self) -> float:
        """``p90 / p10``: 1.0 for perfectly repeatable samples."""
        return self.p90_ms / self.p10_ms if self.p10_ms > 0 else float("inf")


def summarize(samples: list[float]) -> Timing:
    samples = sorted(samples)
    quantile = lambda q: samples[min(len(samples) - 1, int(q * (len(samples) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(samples), quantile(0.1), quantile(0.9), len(samples), samples[0], samples[-1])


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


def _calibrate(fn: Callable[[], object], device: str, warmup: int, min_sample_ms: float) -> tuple[int, float]:
    """Warm up, then ``(loops per sample, ms of one call)``: fast calls are looped inside each sample until it
    lasts ``min_sample_ms`` (as ``timeit`` does), so timer resolution does not dominate."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    single = _elapsed_ms(fn, device, 1)
    loops = max(1, int(min_sample_ms / max(single, 1e-3)) + 1) if single < min_sample_ms else 1
    return loops, single


def time_call(fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 5,
              min_sample_ms: float = 20.0, max_seconds: float = 30.0) -> Timing:
    """Per-call time of ``fn()`` over ``repeats`` samples, after ``warmup`` calls (one implementation
    alone; comparisons use :func:`time_interleaved`). Stops early (after at least 3 samples) once
    ``max_seconds`` of samples have been spent."""
    return time_interleaved([fn], device, warmup=warmup, repeats=repeats, min_sample_ms=min_sample_ms,
                            max_seconds=max_seconds)[0]


def time_interleaved(fns: list[Callable[[], object]], device: str, *, warmup: int = 2, repeats: int = 5,
                     min_sample_ms: float = 20.0, max_seconds: float = 60.0) -> list[Timing]:
    """Time several implementations of one case with their samples interleaved: round r takes one sample
    of each (in alternating order), so a burst of load from other processes hits all of them instead of
    whichever happened to run then. Stops early (after at least 3 rounds) once ``max_seconds`` are spent."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    plans = [_calibrate(fn, device, warmup, min_sample_ms) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    spent_ms = sum(single for _, single in plans)
    for round_index in range(repeats):
        order = range(len(fns)) if round_index % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            loops = plans[i][0]
            elapsed = _elapsed_ms(fns[i], device, loops)
            samples[i].append(elapsed / loops)
            spent_ms += elapsed
        if spent_ms > max_seconds * 1e3 and round_index + 1 >= 3:
            break
    return [summarize(s) for s in samples]


def machine_load() -> tuple[float, int] | None:
    """``(1-minute load average, CPUs this process may use)``, or None where unknown."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], cpus
    except (AttributeError, OSError):
        return None


def load_warning(threads: int) -> str | None:
    """A warning when other processes compete for the cores (the cause of untrustworthy CPU timings).

    With more runnable threads than cores, a multi-threaded op (``at::parallel_for`` / OpenMP, torch's
    intra-op pool) waits at its barrier for whichever of its threads lost its core, until the scheduler's
    next tick gives it back: measured on a 2-core machine at load 24, a 0.4 ms search took 16 ms (median)
    with 2 threads, in steps of 4 ms (the 250 Hz tick: 12, 16, 20 ms), and 0.4 ms with 1 thread. That is
    where rows stuck at 11.98-12.00 ms, and swings of 0.05x-900x, came from.
    """
    load = machine_load()
    if load is None:
        return None
    average, cpus = load
    if average <= 0.75 * cpus:
        return None
    return (f"load average {average:.1f} on {cpus} CPU(s): other processes compete for the cores, so an op using "
            f"{threads} thread(s) waits for descheduled threads in scheduler ticks (a few ms each) and CPU "
            "timings are unreliable. Rows whose spread is too large are flagged NOISY; prefer an idle machine "
            "(or --threads 1, which avoids the waits but times one core).")


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
