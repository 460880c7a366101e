"""Report writers: a plain-text table, Markdown (the committed form) and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from .rows import NOISY_SPEEDUP_RANGE, Row
from .timing import format_bytes

HEADER = ["case", "shape", "dtype", "device", "baseline", "baseline ms", "ours ms", "speedup", "speedup range",
          "baseline peak", "ours peak", "agreement", "trust"]


def _ms(median: float | None, minimum: float | None, p10: float | None, p90: float | None) -> str:
    """``median (min; p10-p90)``."""
    if median is None:
        return "-"
    if minimum is None or p10 is None or p90 is None:
        return f"{median:.2f}"
    return f"{median:.2f} (min {minimum:.2f}; {p10:.2f}-{p90:.2f})"


def _speedup(row: Row) -> str:
    if row.speedup is None:
        return "-"
    return f"{row.speedup:.2f}x" + ("" if row.speedup_min is None else f" (min {row.speedup_min:.2f}x)")


def _cells(row: Row) -> list[str]:
    bounds = row.speedup_range
    trust = "-" if bounds is None else ("NOISY" if row.noisy else "ok")
    agreement = row.agreement if not row.note else f"{row.note}"
    return [row.family, row.shape, row.dtype, row.device, row.baseline,
            _ms(row.baseline_ms, row.baseline_min_ms, row.baseline_p10_ms, row.baseline_p90_ms),
            _ms(row.ours_ms, row.ours_min_ms, row.ours_p10_ms, row.ours_p90_ms), _speedup(row),
            "-" if bounds is None else f"{bounds[0]:.2f}-{bounds[1]:.2f}x",
            format_bytes(row.baseline_peak), format_bytes(row.ours_peak), agreement, trust]


def text_table(rows: list[Row]) -> str:
    table = [HEADER] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def legend(rows: list[Row]) -> str:
    noisy = sum(row.noisy for row in rows)
    one_at_a_time = sorted({row.family for row in rows if not row.interleaved})
    sampling = "ours and each baseline sampled in turns" + (
        f" (except {', '.join(one_at_a_time)}: each implementation built, timed and freed in turn, as they do "
        "not fit in memory together)" if one_at_a_time else "")
    text = (f"times: median (min; p10-p90) per call over the samples, {sampling}. "
            f"speedup = baseline median / ours median (and min / min); speedup range = the lowest and highest "
            f"speedups the p10-p90 ranges allow; NOISY = that range is wider than {NOISY_SPEEDUP_RANGE}x, "
            "so do not trust the row.")
    if noisy:
        text += f" {noisy} of {len(rows)} rows are NOISY."
    return text


def markdown(rows: list[Row], machine: str, date: str, command: str, load: str | None = None) -> str:
    out = [f"# tokenflow_ext benchmark: {machine}", "", f"- date: {date}", f"- command: `{command}`"]
    if load:
        out.append(f"- load: {load}")
    out += [f"- {legend(rows)}",
            "- peak: extra memory over what was in use before the call (CPU: peak RSS; CUDA: allocator peak)", "",
            "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(out) + "\n"


def to_json(rows: list[Row], machine: str, date: str, command: str, load: str | None = None) -> str:
    payload = {"machine": machine, "date": date, "command": command, "load": load,
               "rows": [dict(asdict(row), speedup=row.speedup, speedup_min=row.speedup_min,
                             speedup_range=row.speedup_range, noisy=row.noisy) for row in rows]}
    return json.dumps(payload, indent=2)
