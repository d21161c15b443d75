"""``diffunlearn sweep CONFIG key=v1,v2,... [key=...]``: a grid of unlearning runs, each evaluated,
summarised as a table and a forgetting-vs-alignment scatter with the Pareto front marked (the
paper's Fig. 6 analogue).

Output folder::

    <point>/         one run folder per grid point, named after its varying values
                     (``remain_weight-0.5_forget_cap-hinge``); Stable Diffusion runs get ``<point>/eval``
    data/<hash>/     training images shared by every point whose data settings agree
    sweep.json       the grid, the command and one row per point (values, forgetting, alignment, metrics)
    sweep.md         the same rows as a Markdown table, Pareto-optimal rows marked ✓
    pareto.png       forgetting (x, lower = more forgotten) against alignment (y, higher = better)

Resumable: a point whose folder already holds ``results.json`` is not trained again (unless
``force``), an interrupted point with a checkpoint continues from it, and a finished evaluation is
reused, so rerunning the same command after a crash only does the missing work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import FIELDS, UnlearnConfig, build_config
from .errors import UserError
from .utils import atomic_write_text

if TYPE_CHECKING:
    from .evaluate.base import MetricOptions

# Keys whose single value is itself a comma-separated list: their alternatives are separated by ";"
# instead, so `lora_targets=to_q,to_k` stays one value rather than silently becoming two runs.
LIST_KEYS = tuple(name for name, f in FIELDS.items() if isinstance(f.default, str) and "," in f.default)

# Settings that decide the generated training images (prompts, seeds, sampler, model and, on GPUs,
# the frozen parts' precision). Points that agree on all of them share one image folder, so a sweep
# over remain_weight generates the (for Stable Diffusion: hours of) training data once, not per point.
DATA_KEYS = ("model", "concept", "diversity", "num_pairs", "data_seed", "data_steps", "data_guidance", "resolution",
             "mixed_precision", "device")
_MANAGED_DATA = re.compile(r"(^|[/\\])data[/\\][0-9a-f]{12}$")

MAX_NAME = 120  # folder-name length kept well below common filesystem limits (255 bytes)


@dataclasses.dataclass
class GridPoint:
    """One run of the sweep.

    Attributes:
        name: the run folder's name inside the sweep folder (unique within the sweep).
        values: the varying keys' values at this point, in grid order (strings as typed).
        cfg: the validated config, ``data_dir`` already pointed at the shared image folder.
    """

    name: str
    values: dict[str, str]
    cfg: UnlearnConfig


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which ``(forgetting, alignment)`` points are Pareto optimal (lower forgetting and higher
    alignment are better).

    A point is optimal when no other point has forgetting <= and alignment >= with at least one of
    the two strict. Identical points therefore do not dominate each other (all copies are optimal),
    and a point with a NaN or infinite coordinate is never optimal and never dominates another.

    Returns:
        One flag per point, in the input order (an empty list for no points).
    """
    finite = [math.isfinite(f) and math.isfinite(a) for f, a in points]
    flags = []
    for i, (f, a) in enumerate(points):
        if not finite[i]:
            flags.append(False)
            continue
        dominated = any(finite[j] and fj <= f and aj >= a and (fj < f or aj > a)
                        for j, (fj, aj) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["remain_weight=0.5,1,5", "forget_cap=hinge,none", "steps=20"]`` -> ``{key: [values]}``.

    A key with one value (no comma) is a fixed override applied to every run. Values stay strings
    (``config.build_config`` types and checks them). Alternatives of a list-valued key
    (``lora_targets``) are separated by ``;`` because its values contain commas.

    Returns:
        The keys in the order given, each with its values in the order given.

    Raises:
        UserError: no specs, a spec without ``key=``, an unknown or repeated key, an empty or
            repeated value, or a grid in which no key has two or more values.
    """
    if not specs:
        raise UserError("no grid given; pass at least one key=v1,v2,... such as remain_weight=0.5,1,5")
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"grid entry {spec!r} is not of the form key=v1,v2,...; write e.g. remain_weight=0.5,1,5")
        if key not in FIELDS:
            raise UserError(f"unknown key `{key}` in grid entry {spec!r}; use one of: {', '.join(FIELDS)}")
        if key in grid:
            raise UserError(f"key `{key}` appears twice in the grid; list all its values in one entry, "
                            f"e.g. {key}=a,b,c")
        separator = ";" if key in LIST_KEYS else ","
        values = [v.strip() for v in raw.split(separator)]
        if len(values) > 1 and any(not v for v in values):
            raise UserError(f"grid entry {spec!r} has an empty value; remove the stray {separator!r}")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"grid entry {spec!r} lists {repeated[0]!r} more than once; give each value once")
        grid[key] = values
    if not any(len(v) > 1 for v in grid.values()):
        example = "lora_targets='to_q,to_k;to_q,to_k,to_v'" if set(grid) <= set(LIST_KEYS) else "remain_weight=0.5,1,5"
        raise UserError(f"nothing varies in the grid; give at least one key two or more values, e.g. {example}")
    return grid


def _slug(value: str) -> str:
    # Only characters that are safe in file names on every common filesystem and in shells; a
    # leading "-" is harmless because the key always precedes the value in the folder name.
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value) or "empty"


def point_name(values: dict[str, str]) -> str:
    """Filesystem-safe folder name of a grid point from its varying values, in grid order:
    ``{"remain_weight": "0.5", "forget_cap": "hinge"}`` -> ``remain_weight-0.5_forget_cap-hinge``.

    Names longer than ``MAX_NAME`` characters (long model paths) are cut and made unique again
    with a hash of the full name.
    """
    name = "_".join(f"{key}-{_slug(value)}" for key, value in values.items())
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 13] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def _data_dir(cfg: UnlearnConfig, out: Path) -> str:
    key = json.dumps({k: getattr(cfg, k) for k in DATA_KEYS}, sort_keys=True)
    # Absolute, so the run's config.yaml stays valid when a run is resumed from another directory.
    return str(out.resolve() / "data" / hashlib.sha256(key.encode()).hexdigest()[:12])


def expand_grid(config: str | os.PathLike | None, grid: dict[str, list[str]], out: Path) -> list[GridPoint]:
    """The grid's cartesian product (first key varies slowest), every point validated.

    Each point's config is ``build_config(config, overrides)``; when neither the config file nor
    the grid sets ``data_dir``, it is pointed at ``out/data/<hash of DATA_KEYS>`` so points with the
    same data settings share their training images.

    Raises:
        UserError: the first invalid combination's configuration error, prefixed with the point;
            or two points whose folder names coincide.
    """
    keys = list(grid)
    varying = [k for k in keys if len(grid[k]) > 1]
    points, names = [], {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        assignment = dict(zip(keys, combo))
        values = {k: assignment[k] for k in varying}
        try:
            cfg = build_config(config, [f"{k}={v}" for k, v in assignment.items()])
        except UserError as exc:
            where = " ".join(f"{k}={v}" for k, v in values.items())
            raise UserError(f"grid point {where}: {exc}") from None
        if not cfg.data_dir:
            cfg = dataclasses.replace(cfg, data_dir=_data_dir(cfg, out))
        name = point_name(values)
        if name in names:
            raise UserError(f"grid points {names[name]} and {values} would share the folder {name}; "
                            "make the values differ in letters or digits")
        names[name] = values
        points.append(GridPoint(name, values, cfg))
    return points


def _comparable(cfg: UnlearnConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    if _MANAGED_DATA.search(d["data_dir"]):
        d["data_dir"] = "<sweep data>"  # the sweep's own image cache: same settings, wherever the folder moved
    return d


def _difference(run_dir: Path, cfg: UnlearnConfig) -> str | None:
    """How the run in ``run_dir`` was configured differently from ``cfg`` (None when it was not)."""
    try:
        old = build_config(run_dir / "config.yaml")
    except UserError:
        return "its config.yaml cannot be read"
    have, want = _comparable(old), _comparable(cfg)
    for key in want:
        if have[key] != want[key]:
            return f"{key} {have[key]!r} there, {want[key]!r} now"
    return None


def _check_metrics(points: list[GridPoint], out: Path, metrics: list[str] | None, prompts: list[str] | None) -> None:
    """Fail before any training when the requested evaluation cannot give a forgetting and an
    alignment number for every point."""
    from .compare import ALIGNMENT, FORGETTING
    from .data.templates import TEMPLATES
    from .evaluate.base import FACTORIES

    if bool(metrics) != bool(prompts):
        raise UserError("--metrics and --prompts go together; pass both (e.g. --metrics alignment,nudenet "
                        "--prompts template:nudity:test:forget template:nudity:test:remain) or neither")
    if metrics:
        for name in metrics:
            if name not in FACTORIES:
                raise UserError(f"unknown metric {name!r}; use one of: {', '.join(FACTORIES)}")
        for side, choices in (("forgetting", FORGETTING), ("alignment", ALIGNMENT)):
            able = list(dict.fromkeys(m for m, _, _ in choices))
            if not set(metrics) & set(able):
                raise UserError(f"--metrics {','.join(metrics)} gives no {side} number for the Pareto plot; "
                                f"add one of: {', '.join(able)}")
        from .evaluate.prompt_sets import resolve_prompt_sets

        resolve_prompt_sets(list(prompts or []))  # a bad prompt file fails now, not after hours of training
        return
    for p in points:
        # Only the digit world scores its runs itself (its oracle); an SD run needs `diffunlearn eval`.
        if p.cfg.concept in TEMPLATES and not (out / p.name / "eval" / "results.json").is_file():
            raise UserError("Stable Diffusion runs are scored by `diffunlearn eval`; pass --metrics and --prompts, "
                            "e.g. --metrics alignment,nudenet --prompts template:nudity:test:forget "
                            "template:nudity:test:remain")


def _evaluation_current(eval_dir: Path, metrics: list[str], prompts: list[str]) -> bool:
    """Whether ``eval_dir`` holds a finished evaluation with every requested metric on every set."""
    from .evaluate.prompt_sets import resolve_prompt_sets

    try:
        have = json.loads((eval_dir / "results.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    sets = {ps.name for ps in resolve_prompt_sets(prompts)}
    return all(m in have and sets <= set(have[m]) for m in metrics)


def _number(value: Any) -> float | None:
    # JSON has no NaN/inf; a metric that is undefined for a run is recorded as null.
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _row(point: GridPoint, run_dir: Path) -> dict[str, Any]:
    """One table row from what the run folder holds (so a skipped run gives the identical row)."""
    from .compare import ALIGNMENT, FORGETTING, load_results, pick_measure

    try:
        flat = load_results(run_dir)
    except UserError:
        flat = {}  # finished but never evaluated: still listed, with "-" for its numbers
    flat = {k: _number(v) for k, v in sorted(flat.items())}
    finite = {k: v for k, v in flat.items() if v is not None}
    forgetting, alignment = pick_measure(finite, FORGETTING), pick_measure(finite, ALIGNMENT)
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "run": point.name,
        "values": dict(point.values),
        "forgetting": forgetting[1] if forgetting else None,
        "forgetting_metric": forgetting[0] if forgetting else None,
        "alignment": alignment[1] if alignment else None,
        "alignment_metric": alignment[0] if alignment else None,
        "pareto": False,
        "seconds": _number(results.get("seconds")),
        "metrics": flat,
    }


def _mark_pareto(rows: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Set each row's ``pareto`` flag; returns the shared (forgetting, alignment) metric names, or
    None when no row has both numbers or rows measured different things (no front is meaningful)."""
    scored = [r for r in rows if r["forgetting"] is not None and r["alignment"] is not None]
    axes = {(r["forgetting_metric"], r["alignment_metric"]) for r in scored}
    if len(axes) != 1:
        return None
    for row, optimal in zip(scored, pareto_front([(r["forgetting"], r["alignment"]) for r in scored])):
        row["pareto"] = optimal
    return next(iter(axes))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(rows: list[dict[str, Any]], varying: list[str]) -> str:
    """The rows as a Markdown table: run, varying values, forgetting, alignment, Pareto ✓, seconds,
    then every other metric (``-`` where a run lacks it)."""
    picked = {r["forgetting_metric"] for r in rows} | {r["alignment_metric"] for r in rows}
    extra = sorted({k for r in rows for k in r["metrics"]} - picked)
    header = ["run", *varying, "forgetting ↓", "alignment ↑", "Pareto", "seconds", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["run"], *(r["values"][k] for k in varying), _fmt(r["forgetting"]), _fmt(r["alignment"]),
                 "✓" if r["pareto"] else "", _fmt(r["seconds"]), *(_fmt(r["metrics"].get(k)) for k in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict[str, Any]], axes: tuple[str, str], path: Path) -> None:
    """Scatter of the scored rows, the Pareto front highlighted and joined, each point labelled with
    its varying values; written atomically (temporary file, then rename)."""
    from .report import matplotlib_pyplot

    plt = matplotlib_pyplot()
    scored = [r for r in rows if r["forgetting"] is not None and r["alignment"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    others = [r for r in scored if not r["pareto"]]
    front = sorted((r for r in scored if r["pareto"]), key=lambda r: (r["forgetting"], -r["alignment"]))
    if others:
        ax.scatter([r["forgetting"] for r in others], [r["alignment"] for r in others], s=36, color="0.55",
                   zorder=3, label="dominated")
    ax.plot([r["forgetting"] for r in front], [r["alignment"] for r in front], "-o", color="tab:red", ms=8,
            zorder=4, label="Pareto front")
    for r in scored:
        label = ", ".join(f"{k}={v}" for k, v in r["values"].items())
        ax.annotate(label, (r["forgetting"], r["alignment"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(f"{axes[0]} (lower = more forgotten)")
    ax.set_ylabel(f"{axes[1]} (higher = better)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.08)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("forgetting vs alignment (best: top left)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    # Explicit format: the temporary name has no .png suffix; "tight" keeps labels of edge points in the picture.
    fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def point_options(options: MetricOptions | None, cfg: UnlearnConfig) -> MetricOptions:
    """The metric options for one point: the point's concept is the forgotten concept of the
    ``oracle`` metric and the forgotten class of the ``classifier`` metric unless the command named
    them (a grid over ``concept`` evaluates each point against its own concept)."""
    from .evaluate.base import MetricOptions

    options = options or MetricOptions()
    return dataclasses.replace(options, concept=options.concept or cfg.concept,
                               target_class=options.target_class or cfg.concept)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"sweep: {text}", file=sys.stderr, flush=True)


def run_sweep(config: str | None, specs: list[str], out: Path, force: bool = False, progress: bool = True,
              command: str = "diffunlearn sweep", metrics: list[str] | None = None,
              prompts: list[str] | None = None, metric_options: MetricOptions | None = None
              ) -> list[dict[str, Any]]:
    """Train, evaluate and summarise every point of the grid ``specs`` on top of ``config``.

    Args:
        config: a YAML config file, or None for the defaults. A value containing ``=`` that is not
            a file is taken as one more grid entry (``diffunlearn sweep remain_weight=1,2``).
        specs: grid entries, see :func:`parse_grid`.
        out: the sweep folder; point ``P`` runs in ``out/P``.
        force: retrain (and re-evaluate) points that already finished; otherwise they are skipped.
        progress: progress bars and one stderr line per point.
        command: recorded in every run's config.yaml and in sweep.json.
        metrics, prompts: ``diffunlearn eval`` metrics and prompt specs; when given, every point is
            evaluated into ``out/P/eval`` (a finished evaluation with these metrics and sets is
            reused). Required for Stable Diffusion points; digit-world points are scored by the
            oracle during ``unlearn`` without them.
        metric_options: ``evaluate.base.MetricOptions`` for the metrics (None = defaults).

    Returns:
        One row per point in grid order (see ``sweep.json``); ``[]`` on non-main processes of an
        ``accelerate launch``.

    Raises:
        UserError: a bad grid, config or metric request (all found before anything is trained), a
            finished point whose run folder was made with other settings, or an error of a run.
    """
    from . import runner
    from .checkpoints import latest_checkpoint
    from .evaluate import suite
    from .parallel import Parallel

    specs = list(specs)
    if config is not None and "=" in str(config) and not Path(config).is_file():
        config, specs = None, [str(config), *specs]  # no config file given, only grid entries
    grid = parse_grid(specs)
    points = expand_grid(config, grid, out)
    _check_metrics(points, out, metrics, prompts)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder path")
    for p in points:
        run_dir = out / p.name
        if (run_dir / "results.json").is_file() and not force and (diff := _difference(run_dir, p.cfg)):
            # Checked for every point before training any: reusing it would silently mix settings.
            raise UserError(f"{run_dir} holds a finished run made with other settings ({diff}); pass --force to "
                            "rerun it or choose another --out")
    parallel = Parallel.from_environment()
    for i, p in enumerate(points, 1):
        run_dir = out / p.name
        where = f"[{i}/{len(points)}] {p.name}"
        trained = False
        if (run_dir / "results.json").is_file() and not force:
            _say(progress, f"{where}: finished earlier, skipped")
        else:
            # Continue an interrupted point from its checkpoint, but only one made with these settings.
            resume = (not force and (run_dir / "config.yaml").is_file()
                      and latest_checkpoint(run_dir / "checkpoints") is not None
                      and _difference(run_dir, p.cfg) is None)
            if not resume and parallel.is_main:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # never resume from another config
            parallel.barrier()
            _say(progress, f"{where}: {'resuming' if resume else 'training'}")
            runner.run_unlearning(p.cfg, run_dir, force=force, command=command, progress=progress, resume=resume)
            trained = True
        if metrics and prompts:
            eval_dir = run_dir / "eval"
            done = (eval_dir / "results.json").is_file()
            if trained or not _evaluation_current(eval_dir, metrics, prompts):
                _say(progress, f"{where}: evaluating")
                options = point_options(metric_options, p.cfg)
                suite.evaluate(str(run_dir), list(metrics), list(prompts), eval_dir, options, force=done,
                               progress=progress, command=command, device=p.cfg.device)
    if not parallel.is_main:
        return []
    rows = [_row(p, out / p.name) for p in points]
    axes = _mark_pareto(rows)
    varying = [k for k in grid if len(grid[k]) > 1]
    summary = {"command": command, "config": str(config) if config is not None else None, "grid": grid,
               "varying": varying, "forgetting_metric": axes[0] if axes else None,
               "alignment_metric": axes[1] if axes else None, "rows": rows}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    lines = ["# Sweep", "", f"`{command}`", "", format_table(rows, varying), ""]
    if axes:
        pareto_plot(rows, axes, out / "pareto.png")
        lines += [f"forgetting = `{axes[0]}` (lower = more forgotten), alignment = `{axes[1]}` (higher = better). "
                  "✓ = Pareto optimal: no other run forgets at least as much with at least as much alignment and "
                  "is strictly better in one.", "", "![forgetting vs alignment](pareto.png)", ""]
    else:
        (out / "pareto.png").unlink(missing_ok=True)  # a stale plot from an earlier sweep would mislead
        lines += ["No Pareto front: the runs do not all have a forgetting and an alignment number of the same "
                  "metrics (evaluate them with --metrics and --prompts).", ""]
    atomic_write_text(out / "sweep.md", "\n".join(lines))
    return rows
