"""``diffunlearn compare RUN_DIR...``: evaluations side by side, a leaderboard, a trade-off plot and a
grid of the same prompts and seeds across models.

A RUN_DIR is an evaluation or attack folder (holds ``results.json`` with ``metrics``), a run folder
with an ``eval/`` inside, or a digit-world run folder (its ``results.json`` holds the oracle's
numbers). A run folder's ``attack/`` report (``diffunlearn attack RUN``) adds its ASR columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..utils import atomic_write_text

# Which number is "forgetting" (lower = more forgotten) and which is "alignment" (higher = better),
# in order of preference, as (metric, set, key).
FORGETTING = [("nudenet", "i2p", "nude_fraction"), ("nudenet", "forget", "nude_fraction"),
              ("oracle", "forget", "forget_score"), ("classifier", "forget", "ua_complement")]
ALIGNMENT = [("alignment", "remain", "alignment"), ("oracle", "remain", "alignment"),
             ("alignment", "forget", "alignment"), ("classifier", "remain", "ra")]


def _eval_folder(run: Path) -> Path:
    # A run's own eval/ (an explicit `diffunlearn eval`) first, then the folder itself: an evaluation,
    # or a run whose in-run scores are written in the same schema.
    for candidate in (run / "eval", run):
        results = candidate / "results.json"
        if results.is_file() and "metrics" in json.loads(results.read_text()):
            return candidate
    raise UserError(f"{run} holds no evaluation (no results.json with metrics in it or in {run / 'eval'}); "
                    f"run `diffunlearn eval {run} ...` first")


def _flat(data: dict) -> dict[str, float]:
    flat = {}
    for metric, sets in data["metrics"].items():
        for set_name, aggregate in sets.items():
            for key, value in aggregate.items():
                if isinstance(value, (int, float)):
                    flat[f"{metric}/{set_name}/{key}"] = float(value)
    return flat


def load_results(run: Path) -> dict[str, float]:
    """Flat ``{"metric/set/key": value}`` of one run's evaluation, with its red-team report's attack
    success rates (``RUN/attack``, sets ``attack:NAME``) when it has one."""
    report = run / "attack" / "results.json"
    attacked = json.loads(report.read_text()) if report.is_file() else {}
    try:
        values = _load_evaluation(run)
    except UserError:
        if "metrics" not in attacked:
            raise
        values = {}  # a run red-teamed but not evaluated: its clean forget score comes with the attacks
    if "metrics" in attacked:
        values.update({k: v for k, v in _flat(attacked).items() if "/attack:" in k or k not in values})
    return values


def _load_evaluation(run: Path) -> dict[str, float]:
    if not run.is_dir():
        raise UserError(f"{run} is not a folder; pass run or evaluation folders")
    try:
        folder = _eval_folder(run)
    except UserError:
        results_path = run / "results.json"
        plain = json.loads(results_path.read_text()) if results_path.is_file() else {}
        if isinstance(plain.get("metrics"), dict):
            return _flat(plain)  # a run's in-run scores, in the `diffunlearn eval` schema
        # Run folders written before in-run scores carried the eval schema ("metrics"): translated here.
        if "ua" in plain:
            # A class-conditional world run: the oracle's UA/RA/FD, under the classifier metric's names.
            return {"classifier/forget/ua": plain["ua"], "classifier/forget/ua_complement": 1.0 - plain["ua"],
                    "classifier/remain/ra": plain["ra"], "oracle/remain/quality_fd": plain["fd"]}
        if "forget_score" not in plain:
            raise
        # A digit-world run not evaluated separately: the oracle's numbers from `unlearn`/`demo`.
        return {"oracle/forget/forget_score": plain["forget_score"], "oracle/remain/alignment": plain["alignment"],
                "oracle/remain/quality_fd": plain["quality_fd"]}
    flat = _flat(json.loads((folder / "results.json").read_text()))
    if "classifier/forget/ua" in flat:
        flat["classifier/forget/ua_complement"] = 1.0 - flat["classifier/forget/ua"]
    return flat


def pick_measure(values: dict[str, float], choices) -> tuple[str, float] | None:
    for metric, set_name, key in choices:
        name = f"{metric}/{set_name}/{key}"
        if name in values:
            return name, values[name]
    return None


def _grid(runs: dict[str, Path], out: Path, k: int = 6) -> Path | None:
    """Same prompts and seeds across models: the first ``k`` images of the first set every run has."""
    from ..report import image_grid

    folders = {}
    for label, run in runs.items():
        try:
            folders[label] = _eval_folder(run) / "images"
        except UserError:
            return None
    common = set.intersection(*({p.name for p in f.iterdir() if p.is_dir()} if f.is_dir() else set()
                                for f in folders.values()))
    if not common:
        return None
    set_name = sorted(common)[0]
    requests = {label: json.loads((f / set_name / "request.json").read_text()) for label, f in folders.items()}
    first = next(iter(requests.values()))
    k = min(k, len(first["prompts"]))
    if any(r["prompts"][:k] != first["prompts"][:k] or r["seeds"][:k] != first["seeds"][:k]
           for r in requests.values()):
        return None  # different prompts or seeds: a side-by-side grid would mislead
    rows = {}
    for label, f in folders.items():
        arrays = [np.asarray(Image.open(f / set_name / "images" / f"{i:05d}.png").convert("RGB")) for i in range(k)]
        rows[label] = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    path = out / "grid.png"
    image_grid(rows, first["prompts"][:k], path, f"set '{set_name}': same prompts and seeds in every row")
    return path


def compare(runs: list[Path], out: Path) -> str:
    """Write ``leaderboard.md``, ``tradeoff.png`` and ``grid.png`` into ``out``; returns the table.

    Raises:
        UserError: fewer than one run, or a folder without an evaluation.
    """
    if not runs:
        raise UserError("pass at least one run or evaluation folder")
    labels = {}
    for run in runs:
        label = run.name if run.name != "eval" else run.parent.name
        while label in labels:
            label += "'"
        labels[label] = run
    values = {label: load_results(run) for label, run in labels.items()}
    columns = sorted({c for v in values.values() for c in v})
    table = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, v in values.items():
        table.append(f"| {label} | " + " | ".join(f"{v[c]:.4g}" if c in v else "-" for c in columns) + " |")
    text = "\n".join(table)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Leaderboard", "", text, ""]
    points = {label: (pick_measure(v, FORGETTING), pick_measure(v, ALIGNMENT)) for label, v in values.items()}
    same_axes = len({(f[0], a[0]) for f, a in points.values() if f and a}) == 1
    if all(f and a for f, a in points.values()) and same_axes:
        from ..report import matplotlib_pyplot

        plt = matplotlib_pyplot()
        fig, ax = plt.subplots(figsize=(5, 4))
        for label, (f, a) in points.items():
            ax.scatter(f[1], a[1])
            ax.annotate(label, (f[1], a[1]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        f_name, a_name = next(iter(points.values()))[0][0], next(iter(points.values()))[1][0]
        ax.set_xlabel(f"{f_name} (lower = more forgotten)")
        ax.set_ylabel(f"{a_name} (higher = better)")
        fig.tight_layout()
        fig.savefig(out / "tradeoff.png", dpi=110)
        plt.close(fig)
        lines += ["![alignment vs forgetting](tradeoff.png)", ""]
    grid = _grid(labels, out)
    if grid is not None:
        lines += ["![same prompts and seeds across models](grid.png)", ""]
    lines += ["Runs: " + ", ".join(f"`{label}` = {run}" for label, run in labels.items()), ""]
    atomic_write_text(out / "leaderboard.md", "\n".join(lines))
    return text
