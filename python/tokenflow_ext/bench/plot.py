"""Speedup-vs-size plot of a benchmark run (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

from collections import defaultdict


def plot_speedups(rows_with_sizes, path: str, title: str) -> None:
    """One line per (case, baseline): speedup (baseline time / ours) against problem size, log-log."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install 'tokenflow_ext[plot]'") from error
    panels = {"codebook": defaultdict(list), "flow": defaultdict(list)}
    for row, size in rows_with_sizes:
        if row.speedup is not None:
            panel = "flow" if row.family.startswith("flow") else "codebook"
            panels[panel][(row.family, row.dtype, row.baseline)].append((size, row.speedup))
    fig, axes = plt.subplots(1, 2, figsize=(14, 7))
    colors = plt.get_cmap("tab20").colors
    for ax, (name, series) in zip(axes, panels.items()):
        for number, ((family, dtype, baseline), points) in enumerate(sorted(series.items())):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^vD"[number % 5],
                    color=colors[number % len(colors)], label=f"{family} {dtype} vs {baseline}")
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N·K" if name == "codebook" else "elements per tensor")
        ax.set_ylabel("speedup (baseline time / tokenflow_ext time)")
        ax.set_title(f"{name} ops")
        if series:
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
