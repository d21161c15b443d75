"""Reports: tables, image grids and plots (matplotlib, Agg backend, no screen needed)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def matplotlib_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_image(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def image_grid(rows: dict[str, torch.Tensor], captions: Sequence[str], path: Path, title: str) -> None:
    """One row per model, one column per prompt (same prompts and seeds in every row)."""
    import textwrap

    plt = matplotlib_pyplot()
    n_rows, n_cols = len(rows), len(captions)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.45 * n_cols + 0.9, 1.45 * n_rows + 1.3), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(_to_image(images[c]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(captions[c], 18)[:4]), fontsize=6)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff_plot(points: dict[str, dict], path: Path, concept: str) -> None:
    """Forget score (x, lower is better) against alignment (y, higher is better)."""
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for name, m in points.items():
        ax.scatter(m["forget_score"], m["alignment"], s=60, zorder=3)
        ax.annotate(name, (m["forget_score"], m["alignment"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel(f"forget score: samples showing '{concept}' (lower is better)")
    ax.set_ylabel("alignment on held-out remain prompts")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("forgetting vs alignment (best: top left)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DEMO_FIELDS = (("forget_score", "forget score ↓", 3), ("alignment", "alignment ↑", 3), ("digit", "digit", 3),
               ("colour", "colour", 3), ("background", "background", 3), ("quality_fd", "quality FD ↓", 2),
               ("seconds", "seconds", 1))


def markdown_table(methods: dict[str, dict]) -> str:
    """The demo's result table in Markdown (with one ASR column per attack when the models were
    red-teamed): :func:`mean_std_table` with one run per row, so values print plain."""
    attacks = list(dict.fromkeys(a for m in methods.values() for a in m.get("asr", {})))
    nan = float("nan")
    rows = {(name,): [{**m, **{a: m.get("alignment_per_attribute", {}).get(a, nan)
                               for a in ("digit", "colour", "background")}}] for name, m in methods.items()}

    def asr(runs: list[dict]) -> list[str]:
        return [f"{runs[0]['asr'][a]:.3f}" if a in runs[0].get("asr", {}) else "-" for a in attacks]

    return mean_std_table(["model"], rows, DEMO_FIELDS, ([f"ASR {a} ↓" for a in attacks], asr), count=None)


def mean_std(values: list[float], digits: int) -> str:
    """``mean ± std`` (sample std; 0 for one value) with ``digits`` decimals."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def mean_std_table(keys: list[str], rows: dict[tuple[str, ...], list[dict]], fields, extra=None,
                   count: str | None = "seeds") -> str:
    """Markdown: one row per key tuple (e.g. (concept, method)), each field's mean ± std over the runs,
    then ``extra(runs) -> cells`` (e.g. attack success columns) and the number of runs. The one table
    helper of the demo, the class demo and the leaderboard.

    Args:
        keys: the key columns' titles; fields: ``(key, title, digits)`` per number column;
        extra: ``(titles, fn)`` or None.
        count: the title of the run-count column; None = no such column, and every row holds ONE run
            whose values print plain (the single-seed demo).
    """
    titles = [title for _, title, _ in fields] + (list(extra[0]) if extra else [])
    counts = [count] if count is not None else []
    lines = ["| " + " | ".join([*keys, *titles, *counts]) + " |",
             "|" + "---|" * (len(keys) + len(titles) + len(counts))]
    for key, runs in rows.items():
        if count is None:
            cells = [f"{runs[0][k]:.{digits}f}" for k, _, digits in fields]
        else:
            cells = [mean_std([r[k] for r in runs], digits) for k, _, digits in fields]
        if extra:
            cells += extra[1](runs)
        lines.append("| " + " | ".join([*key, *cells, *([str(len(runs))] if count is not None else [])]) + " |")
    return "\n".join(lines)

