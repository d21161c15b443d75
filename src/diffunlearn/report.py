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
    """One row per model, one column per prompt (same prompts and seeds in every row).

    The tiles are laid into ONE image drawn on one matplotlib axes, with the captions, row names and
    frames as text and one patch collection: an axes per tile (``plt.subplots`` + ``tight_layout``) cost
    1.4 s for a 4 × 8 grid here; this takes 0.24 s and looks the same.
    """
    import textwrap

    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    plt = matplotlib_pyplot()
    n_rows, n_cols = len(rows), len(captions)
    tiles = [[images[c] for c in range(n_cols)] for images in rows.values()]
    h, w = tiles[0][0].shape[-2:]
    # Tiles of another size (a grid of two resolutions) are resized to the first one's, nearest-neighbour.
    tiles = [[t if t.shape[-2:] == (h, w) else
              torch.nn.functional.interpolate(t[None].float(), size=(h, w), mode="nearest")[0] for t in row]
             for row in tiles]
    size, gap = 1.2, 0.25                                   # inches: a tile, the space between two tiles
    gap_px = max(1, round(w * gap / size))
    step_y, step_x = h + gap_px, w + gap_px                 # pixels from one tile's corner to the next one's
    mosaic = np.ones((n_rows * h + (n_rows - 1) * gap_px, n_cols * w + (n_cols - 1) * gap_px, 3))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = r * step_y, c * step_x
            mosaic[y:y + h, x:x + w] = _to_image(tile)
    left, right, bottom, top = 0.45, 0.1, 0.1, 0.95        # inches around the tiles (top: title + captions)
    scale = size / w                                        # inches per pixel
    width_in, height_in = mosaic.shape[1] * scale, mosaic.shape[0] * scale
    fig = plt.figure(figsize=(width_in + left + right, height_in + top + bottom))
    fig_w, fig_h = fig.get_size_inches()
    ax = fig.add_axes((left / fig_w, bottom / fig_h, width_in / fig_w, height_in / fig_h))
    ax.imshow(mosaic, interpolation="nearest", extent=(0, mosaic.shape[1], mosaic.shape[0], 0))
    ax.set_axis_off()
    frames = PatchCollection([Rectangle((c * step_x, r * step_y), w, h)
                              for r in range(n_rows) for c in range(n_cols)],
                             facecolor="none", edgecolor="black", linewidth=0.8)
    frames.set_clip_on(False)  # the last row's and column's outer edges lie on the axes' border
    ax.add_collection(frames)
    for c, caption in enumerate(captions):
        ax.text(c * step_x + w / 2, -0.6 * gap_px, "\n".join(textwrap.wrap(caption, 18)[:4]), fontsize=6,
                ha="center", va="bottom")
    for r, name in enumerate(rows):
        ax.text(-0.25 * gap_px, r * step_y + h / 2, name, fontsize=10, rotation=90, ha="right", va="center")
    ax.set_xlim(0, mosaic.shape[1])
    ax.set_ylim(mosaic.shape[0], 0)
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / fig_h, va="top")
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

