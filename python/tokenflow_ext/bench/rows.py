"""One report row per (case, baseline), and the comparison loop every case uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .timing import peak_extra_memory, time_call


@dataclass
class Row:
    """One line of the report: the fused op against one baseline on one case."""

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

    @property
    def speedup(self) -> float | None:
        return None if self.baseline_ms is None else self.baseline_ms / self.ours_ms


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_compiled: dict = {}


def compile_once(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built once per function for the whole run (baselines share compiled code)."""
    return _compiled.setdefault(fn, torch.compile(fn, dynamic=False))


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
    ours = time_call(ours_fn, device, repeats=repeats, warmup=warmup)
    common = dict(family=family, shape=shape, dtype=dtype_name(dtype), device=device)
    rows = []
    for name, run in callables.items():
        if name.startswith("fused"):
            continue
        if isinstance(run, str):
            rows.append(Row(**common, baseline=name, baseline_ms=None, ours_ms=ours.median_ms, baseline_peak=None,
                            ours_peak=ours_peak, agreement="-", ok=True, note=run))
            continue
        ok, agreement = check(ours_result, name, run())
        rows.append(Row(**common, baseline=name, baseline_ms=time_call(run, device, repeats=repeats,
                                                                        warmup=warmup).median_ms,
                        ours_ms=ours.median_ms, baseline_peak=peak_extra_memory(run, device), ours_peak=ours_peak,
                        agreement=agreement, ok=ok))
    return rows
