"""Report writers: a plain-text table, Markdown (the committed form) and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from .rows import Row
from .timing import format_bytes

HEADER = ["case", "shape", "dtype", "device", "baseline", "baseline ms", "ours ms", "speedup", "baseline peak",
          "ours peak", "agreement"]


def _cells(row: Row) -> list[str]:
    baseline_ms = "-" if row.baseline_ms is None else f"{row.baseline_ms:.2f}"
    speedup = "-" if row.speedup is None else f"{row.speedup:.2f}x"
    agreement = row.agreement if not row.note else f"{row.note}"
    return [row.family, row.shape, row.dtype, row.device, row.baseline, baseline_ms, f"{row.ours_ms:.2f}", speedup,
            format_bytes(row.baseline_peak), format_bytes(row.ours_peak), agreement]


def text_table(rows: list[Row]) -> str:
    table = [HEADER] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown(rows: list[Row], machine: str, date: str, command: str) -> str:
    out = [f"# tokenflow_ext benchmark: {machine}", "", f"- date: {date}", f"- command: `{command}`",
           "- times: median of repeats after warm-up; peak: extra memory over what was in use before the call "
           "(CPU: peak RSS; CUDA: allocator peak)", "- speedup = baseline time / ours (same run, same machine)", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(out) + "\n"


def to_json(rows: list[Row], machine: str, date: str, command: str) -> str:
    payload = {"machine": machine, "date": date, "command": command,
               "rows": [dict(asdict(row), speedup=row.speedup) for row in rows]}
    return json.dumps(payload, indent=2)
