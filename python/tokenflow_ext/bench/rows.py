"""One report row per (case, baseline), and the comparison loop every case uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .timing import Timing, peak_extra_memory, time_call, time_interleaved

# A row is flagged NOISY when its speedup is uncertain by more than this factor: the ratio of the highest
# to the lowest speedup its p10-p90 sample ranges allow, (baseline p90 / ours p10) / (baseline p10 / ours p90).
NOISY_SPEEDUP_RANGE = 1.5


@dataclass
class Row:
    """One line of the report: the fused op against one baseline on one case. ``*_ms`` are medians; the
    ``*_min_ms`` and ``*_p10_ms`` / ``*_p90_ms`` fields give the spread of the same samples (ours and the
    baseline are sampled interleaved, unless ``interleaved`` is False: timed one after the other)."""

    family: str
    shape: str
    dtype: str
    device: str
    baseline: str
    baseline_ms: float | None
    ours_ms: float
    baseline_peak: int | None
    ours_peak: int | None
    agreement: str
    ok: bool
    note: str = ""
    extra: dict = field(default_factory=dict)
    ours_min_ms: float | None = None
    ours_p10_ms: float | None = None
    ours_p90_ms: float | None = None
    baseline_min_ms: float | None = None
    baseline_p10_ms: float | None = None
    baseline_p90_ms: float | None = None
    repeats: int | None = None
    interleaved: bool = True

    @property
    def speedup(self) -> float | None:
        """Median baseline time / median ours."""
        return None if self.baseline_ms is None else self.baseline_ms / self.ours_ms

    @property
    def speedup_min(self) -> float | None:
        """Fastest baseline sample / fastest ours: the least load-sensitive estimate."""
        if self.baseline_min_ms is None or self.ours_min_ms is None:
            return None
        return self.baseline_min_ms / self.ours_min_ms

    @property
    def speedup_range(self) -> tuple[float, float] | None:
        """The lowest and highest speedups the p10-p90 ranges allow."""
        if None in (self.baseline_p10_ms, self.baseline_p90_ms, self.ours_p10_ms, self.ours_p90_ms):
            return None
        return self.baseline_p10_ms / self.ours_p90_ms, self.baseline_p90_ms / self.ours_p10_ms

    @property
    def noisy(self) -> bool:
        """The speedup is too uncertain to trust (see ``NOISY_SPEEDUP_RANGE``)."""
        bounds = self.speedup_range
        return bounds is not None and bounds[1] > NOISY_SPEEDUP_RANGE * bounds[0]


def timing_fields(ours: Timing, theirs: Timing | None = None) -> dict:
    """The spread fields of a :class:`Row` from the timings of ours and (optionally) the baseline."""
    fields = dict(ours_ms=ours.median_ms, ours_min_ms=ours.min_ms, ours_p10_ms=ours.p10_ms, ours_p90_ms=ours.p90_ms,
                  repeats=ours.repeats)
    if theirs is not None:
        fields.update(baseline_ms=theirs.median_ms, baseline_min_ms=theirs.min_ms, baseline_p10_ms=theirs.p10_ms,
                      baseline_p90_ms=theirs.p90_ms)
    return fields


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_compiled: dict = {}


def compile_once(fn: Callable, *, fullgraph: bool = False) -> Callable:
    """``torch.compile(fn)``, built once per function for the whole run (baselines share compiled code)."""
    key = (fn, fullgraph)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False, fullgraph=fullgraph)
    return _compiled[key]


def compare_implementations(family: str, shape: str, dtype: torch.dtype, device: str, callables: dict,
                            check: Callable, *, repeats: int, warmup: int = 2) -> list[Row]:
    """Time ``callables["fused"]`` and every other entry (entries named "fused..." are helpers, not baselines).

    ``check(ours_result, name, their_result) -> (ok, agreement text)`` runs before anything is timed.
    An entry whose value is a string is a baseline that cannot run here; the string (e.g. "faiss-cpu not
    installed") becomes its row's note. Rows keep the order of ``callables``.
    """
    ours_fn = callables["fused"]
    ours_result = ours_fn()
    ours_peak = peak_extra_memory(ours_fn, device)
    common = dict(family=family, shape=shape, dtype=dtype_name(dtype), device=device)
    alone: Timing | None = None  # ours timed by itself, only for rows without a runnable baseline
    rows = []
    for name, run in callables.items():
        if name.startswith("fused"):
            continue
        if isinstance(run, str):
            alone = alone or time_call(ours_fn, device, repeats=repeats, warmup=warmup)
            rows.append(Row(**common, baseline=name, baseline_ms=None, baseline_peak=None, ours_peak=ours_peak,
                            agreement="-", ok=True, note=run, **timing_fields(alone)))
            continue
        ok, agreement = check(ours_result, name, run())
        # ours and this baseline sampled in turns, so that load from other processes hits both alike
        ours, theirs = time_interleaved([ours_fn, run], device, repeats=repeats, warmup=warmup)
        rows.append(Row(**common, baseline=name, baseline_peak=peak_extra_memory(run, device), ours_peak=ours_peak,
                        agreement=agreement, ok=ok, **timing_fields(ours, theirs)))
    return rows
