"""``diffunlearn study``: compare unlearning methods fairly, each at its own best settings.

Digit world (``embedded:digits``) or class world (``model=embedded:digits-class``; forget =
1 − UA, alignment = RA, tuning and held-out differ by evaluation seeds). For every method the
study searches that method's own knobs (learning rate, λ, the hinge margin,
ESD's η, SalUn's fraction, ... : :func:`default_space`) with Optuna, minimising the forget score
and maximising alignment (and, with ``--objectives forget,alignment,attack``, minimising the success
of an attack) on the TRAINING vocabulary with tuning seeds (``eval_split=train``,
``eval_seed=7``). Then the Pareto front of every method is re-run on the HELD-OUT vocabulary over
several training seeds, and only those numbers are reported: nothing is ever selected on held-out
prompts.

Output folder::

    study.db                    Optuna storage (SQLite; ``--storage URL`` for a shared RDB): one
                                study per (concept, method); resumable, shareable by workers
    data/seed-S/                training images (``data build``) shared by every run of seed S
    trials/METHOD/trial-NNNN/   one run folder per search trial (evaluated on training prompts)
    heldout/METHOD/trial-NNNN/seed-S/   the front's points re-run and scored on held-out prompts
                                (``attack/`` inside with ``--attack``)
    study.json                  every trial, the fronts, the held-out rows and the summary
    study.md, front.png         the table and the held-out fronts (mean ± std over seeds)

Resume: rerunning the same command continues. A trial interrupted by Ctrl-C, a crash or a killed
worker (noticed through Optuna's heartbeat) is re-queued with the same settings under its original
number, so its run folder is reused (and resumed from its checkpoint); no trial is lost or run
twice. ``--workers N`` starts N − 1 more worker processes on the same storage, one torch thread each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import FIELDS, build_config, model_kind
from .errors import UserError
from .utils import atomic_write_text

TUNE_SEED = 7          # evaluation seeds of the search (the demo and held-out reports use eval_seed 1)
FORGET_LIMIT = 0.05    # "forgets": held-out forget score at most this (the tuning rule of the README)
OBJECTIVES = ("forget", "alignment", "attack")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = int(os.environ.get("DIFFUNLEARN_STUDY_GRACE", "120"))  # a worker silent this long is dead


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched setting: a float or int range (``log`` for log-uniform) or a list of choices."""

    kind: str                     # "float", "int" or "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial, name: str) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return ",".join(str(c) for c in self.choices)
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "") + (":int" if self.kind == "int" else "")


def default_space(method: str, forget_cap: str = "hinge") -> dict[str, Dimension]:
    """The knobs that matter for ``method`` (issue 13 §1): every method's learning rate, λ for methods
    with a remain gradient, the hinge margin for capped ascent (log-range around the digit world's
    base loss ≈ 0.02 and the SD reference's 1.1), ESD's η, SalUn's saliency fraction."""
    from .methods import get_method

    m = get_method(method)
    space = {"lr": Dimension("float", 1e-5, 1e-3, log=True)}
    if m.uses_remain:
        space["remain_weight"] = Dimension("float", 0.25, 16.0, log=True)
    if m.forget_loss == "ascent" and forget_cap == "hinge":
        space["margin"] = Dimension("float", 0.01, 2.0, log=True)
    if m.forget_loss == "esd":
        space["esd_eta"] = Dimension("float", 0.5, 4.0)
    if m.saliency:
        space["saliency_fraction"] = Dimension("float", 0.2, 0.9)
    return space


def parse_space(specs: list[str], methods: tuple[str, ...]) -> dict[str, dict[str, Dimension]]:
    """``KEY=LOW:HIGH[:log][:int]``, ``KEY=a,b,c`` or ``METHOD.KEY=...`` -> {method or "*": {key: dim}}.

    Raises:
        UserError: every malformed entry, unknown key or method at once.
    """
    out: dict[str, dict[str, Dimension]] = {}
    errors = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        scope, _, key = name.rpartition(".")
        scope = scope or "*"
        if not sep or not value:
            errors.append(f"--space {spec!r} is not KEY=LOW:HIGH or KEY=a,b,c")
            continue
        if scope != "*" and scope not in methods:
            errors.append(f"--space {spec!r} names method {scope!r}, which this study does not run")
            continue
        if key not in FIELDS:
            errors.append(f"--space {spec!r}: unknown config key `{key}`")
            continue
        parts = value.split(":")
        try:
            if len(parts) >= 2:
                flags = set(parts[2:])
                if flags - {"log", "int"}:
                    raise ValueError
                low, high = float(parts[0]), float(parts[1])
                if not (math.isfinite(low) and math.isfinite(high) and low < high) or ("log" in flags and low <= 0):
                    raise ValueError
                dim = Dimension("int" if "int" in flags else "float", low, high, "log" in flags)
            else:
                import yaml

                dim = Dimension("choice", choices=tuple(yaml.safe_load(v) for v in value.split(",")))
        except ValueError:
            errors.append(f"--space {spec!r}: give LOW:HIGH with LOW < HIGH (and LOW > 0 for :log), optionally "
                          ":log and :int, or comma-separated choices")
            continue
        out.setdefault(scope, {})[key] = dim
    if errors:
        raise UserError("; ".join(errors))
    return out


@dataclasses.dataclass
class StudySpec:
    """What ``diffunlearn study`` was asked for."""

    methods: tuple[str, ...]
    concept: str = "three"
    overrides: tuple[str, ...] = ()
    space: tuple[str, ...] = ()
    sampler: str = "tpe"
    trials: int = 12
    seeds: tuple[int, ...] = (0, 1, 2)
    front: int = 3
    objectives: tuple[str, ...] = ("forget", "alignment")
    attack: str = ""
    storage: str = ""
    workers: int = 1
    sampler_seed: int = 0


def _base_overrides(spec: StudySpec) -> list[str]:
    return [f"concept={spec.concept}", *spec.overrides]


def spaces(spec: StudySpec) -> dict[str, dict[str, Dimension]]:
    """Each method's search space: its defaults, then ``--space`` entries for all, then per method."""
    given = parse_space(list(spec.space), spec.methods)
    base = build_config(None, _base_overrides(spec))
    out = {}
    for method in spec.methods:
        space = {**default_space(method, base.forget_cap), **given.get("*", {}), **given.get(method, {})}
        fixed = {o.split("=", 1)[0] for o in spec.overrides}
        out[method] = {k: d for k, d in space.items() if k not in fixed}  # a key=value override is not searched
    return out


def validate(spec: StudySpec) -> dict[str, dict[str, Dimension]]:
    """Everything checked before the first run; returns the spaces."""
    from .methods import get_method

    problems = []
    for m in spec.methods:
        get_method(m)
    if not spec.methods:
        problems.append("--methods is empty; name at least one method, e.g. --methods rg,graddiff")
    if spec.sampler not in SAMPLERS:
        problems.append(f"--sampler must be one of {', '.join(SAMPLERS)}, got {spec.sampler!r}")
    if spec.trials < 1 or spec.front < 1 or spec.workers < 1:
        problems.append("--trials, --front and --workers must be positive integers")
    if not spec.seeds:
        problems.append("--seeds is empty; give at least one training seed for the held-out runs")
    bad = [o for o in spec.objectives if o not in OBJECTIVES]
    if bad or "forget" not in spec.objectives or "alignment" not in spec.objectives:
        problems.append(f"--objectives must include forget and alignment (and may add attack), got "
                        f"{','.join(spec.objectives)}")
    if "attack" in spec.objectives and not spec.attack:
        problems.append("--objectives ...,attack needs --attack NAME (e.g. --attack embedding)")
    if spec.attack:
        from .attacks import build_attacks

        build_attacks([spec.attack])
    if problems:
        raise UserError("; ".join(problems))
    for o in spec.overrides:
        if o.split("=", 1)[0] in ("method", "concept", "seed", "data_seed", "eval_split", "eval_seed", "data_dir"):
            raise UserError(f"the study sets `{o.split('=', 1)[0]}` itself; drop {o!r} (use --methods, --concept "
                            "or --seeds)")
    cfg = build_config(None, [*_base_overrides(spec), f"method={spec.methods[0]}"])
    if model_kind(cfg.model) not in ("pixel", "class"):
        raise UserError("the study runs on digit-world models (embedded:digits, embedded:digits-class or folders "
                        "of those kinds); for Stable Diffusion use `diffunlearn sweep` with --metrics and --prompts")
    result = spaces(spec)
    for method, space in result.items():
        if spec.sampler == "grid" and any(d.kind != "choice" for d in space.values()):
            ranged = [k for k, d in space.items() if d.kind != "choice"]
            raise UserError(f"--sampler grid needs a list of values for every searched key of {method} "
                            f"({', '.join(ranged)} are ranges); pass e.g. --space lr=5e-5,1e-4")
        for key, dim in space.items():
            probe = dim.choices if dim.kind == "choice" else (dim.low, dim.high)
            for value in probe:
                build_config(None, [*_base_overrides(spec), f"method={method}", f"{key}={value}"])
    return result


def _storage(spec: StudySpec, out: Path):
    import warnings

    import optuna

    # Heartbeats (how a killed worker's trial is noticed) are marked experimental; they are relied on here.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    url = spec.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


def _sampler(spec: StudySpec, space: dict[str, Dimension]):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()}, seed=spec.sampler_seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.sampler_seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler_seed)
    return optuna.samplers.TPESampler(seed=spec.sampler_seed, n_startup_trials=min(6, spec.trials))


def study_name(spec: StudySpec, method: str) -> str:
    return f"{spec.concept}:{method}"


def _load_study(spec: StudySpec, out: Path, method: str, space: dict[str, Dimension]):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize", "maximize"] + (["minimize"] if "attack" in spec.objectives else [])
    return optuna.create_study(study_name=study_name(spec, method), storage=_storage(spec, out),
                               directions=directions, sampler=_sampler(spec, space), load_if_exists=True)


def _root(trial) -> int:
    """The number a trial's run folder is named after: its own, or the one it re-runs."""
    return int(trial.user_attrs.get("retry_of", trial.number))


def requeue_interrupted(study) -> int:
    """Queue again every failed trial whose settings have not been re-run yet (same params, same
    root number, so the same run folder); returns how many were queued."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    alive = {_root(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
    queued = 0
    for t in trials:
        if t.state == TrialState.FAIL and _root(t) not in alive and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": _root(t)}, skip_if_exists=False)
            alive.add(_root(t))
            queued += 1
    return queued


def scores(results: dict) -> dict[str, float | None]:
    """forget, alignment and quality of a run: the digit world's forget score, alignment and FD, or
    the class track's 1 − UA, RA and FD (the same directions: forget ↓, alignment ↑, FD ↓)."""
    if "ua" in results:
        return {"forget_score": 1.0 - results["ua"], "alignment": results["ra"], "quality_fd": results.get("fd")}
    return {"forget_score": results["forget_score"], "alignment": results["alignment"],
            "quality_fd": results.get("quality_fd")}


def _objectives_of(results: dict, attack: float | None, spec: StudySpec) -> list[float]:
    found = scores(results)
    values = [float(found["forget_score"]), float(found["alignment"])]
    if "attack" in spec.objectives:
        values.append(float(attack))
    return values


def _run(cfg, run_dir: Path, command: str, progress: bool) -> dict:
    """A finished run's results, or train (resuming an interrupted one with the same config)."""
    from . import runner

    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    # An interrupted trial continues in its own folder: from its checkpoint, or from step 1 (the
    # training images are shared, so nothing but training time is repeated).
    resume = (run_dir / "config.yaml").is_file() and (run_dir / "environment.json").is_file()
    return runner.run_unlearning(cfg, run_dir, force=False, command=command, progress=progress, resume=resume)


def _attack(spec: StudySpec, run_dir: Path, cfg, progress: bool, command: str) -> float:
    from .jobs.attack import red_team

    return red_team(str(run_dir / "model"), spec.concept, run_dir / "attack", (spec.attack,), cfg.eval_steps,
                    cfg.eval_guidance, progress, command)[spec.attack]


def ensure_data(spec: StudySpec, out: Path, seed: int, progress: bool, command: str) -> Path | None:
    """The training images of ``seed`` (shared by every method and trial), built once; None for a
    class-conditional model (its runs draw their images from the class data, no generation)."""
    from .data.build import build_data

    if model_kind(build_config(None, _base_overrides(spec)).model) == "class":
        return None
    folder = out / "data" / f"seed-{seed}"
    if not (folder / "forget" / "manifest.json").is_file() or not (folder / "remain" / "manifest.json").is_file():
        cfg = build_config(None, [*_base_overrides(spec), f"method={spec.methods[0]}", f"data_seed={seed}"])
        build_data(cfg, folder, progress, command)
    return folder


class Clock:
    """Wall seconds a study has taken over all its sessions (``clock.json`` in the study folder): an
    interrupted and resumed study reports its whole time, not the last session's. Only the main
    process keeps it (workers run alongside it); a session killed between ticks loses at most one run."""

    def __init__(self, out: Path):
        self.path = out / "clock.json"
        try:
            self.total = float(json.loads(self.path.read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            self.total = 0.0
        self.mark = time.perf_counter()

    def tick(self) -> float:
        now = time.perf_counter()
        self.total += now - self.mark
        self.mark = now
        atomic_write_text(self.path, json.dumps({"seconds": round(self.total, 3)}) + "\n")
        return self.total


def search(spec: StudySpec, out: Path, space_by_method: dict[str, dict[str, Dimension]], command: str,
           progress: bool, clock: Clock | None = None) -> None:
    """The search phase of this process (one worker): every method's study until it has
    ``spec.trials`` finished trials."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    data_dir = ensure_data(spec, out, spec.seeds[0], progress, command)
    for method, space in space_by_method.items():
        study = _load_study(spec, out, method, space)
        optuna.storages.fail_stale_trials(study)  # trials of a killed worker (heartbeat too old) become FAIL,
        requeue_interrupted(study)                # then run again under their own numbers
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        left = spec.trials - len(done) - len(running)  # queued re-runs are part of what is left
        if left <= 0:
            continue
        bar = tqdm(total=spec.trials, initial=len(done), desc=f"study {spec.concept}: {method} trials",
                   disable=not progress)

        def objective(trial, method=method, space=space, study=study):
            others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                      if t.number != trial.number]
            if len(others) >= spec.trials:  # two workers asked at the same moment: the budget is used up
                study.stop()
                raise optuna.TrialPruned("the study has its trials")
            params = {key: dim.suggest(trial, key) for key, dim in space.items()}
            cfg = build_config(None, [*_base_overrides(spec), f"method={method}", f"seed={spec.seeds[0]}",
                                      f"data_seed={spec.seeds[0]}", "eval_split=train", f"eval_seed={TUNE_SEED}",
                                      *([f"data_dir={data_dir}"] if data_dir else []),
                                      *(f"{k}={v}" for k, v in params.items())])
            run_dir = out / "trials" / method / f"trial-{_root(trial):04d}"
            trial.set_user_attr("run", str(run_dir))
            trial.set_user_attr("worker", os.getpid())
            results = _run(cfg, run_dir, f"{command} (trial {_root(trial)} of {method})", False)
            attack = _attack(spec, run_dir, cfg, False, command) if "attack" in spec.objectives else None
            trial.set_user_attr("seconds", results.get("seconds"))
            if attack is not None:
                trial.set_user_attr("asr", attack)
            return _objectives_of(results, attack, spec)

        def tick(study, trial, bar=bar):
            bar.n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            bar.refresh()
            requeue_interrupted(study)  # a worker that died meanwhile: its trial runs again here
            if clock is not None:
                clock.tick()

        try:
            study.optimize(objective, n_trials=left,
                           callbacks=[MaxTrialsCallback(spec.trials, states=(TrialState.COMPLETE,
                                                                             TrialState.RUNNING)), tick],
                           catch=())
        finally:
            bar.close()


def pareto(points: list[list[float]], directions: list[str]) -> list[bool]:
    """Non-dominated flags (``directions`` "minimize"/"maximize" per objective)."""
    sign = [1 if d == "minimize" else -1 for d in directions]
    vals = [[s * v for s, v in zip(sign, p)] for p in points]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(dominates(o, p) for j, o in enumerate(vals) if j != i) for i, p in enumerate(vals)]


def hypervolume(points: list[list[float]]) -> float:
    """Exact hypervolume of minimisation points in [0, 1]^d against the reference point (1, ..., 1),
    by slicing along the first axis (d ≤ 3 and a few dozen points here). Written by hand because
    Optuna's implementation is private API."""
    pts = [p for p in points if all(0.0 <= v <= 1.0 for v in p)]
    if not pts:
        return 0.0
    if len(pts[0]) == 1:
        return 1.0 - min(p[0] for p in pts)
    pts = sorted(pts, key=lambda p: p[0])
    total = 0.0
    for i, p in enumerate(pts):
        right = pts[i + 1][0] if i + 1 < len(pts) else 1.0
        if right > p[0]:
            total += (right - p[0]) * hypervolume([q[1:] for q in pts[:i + 1]])
    return total


def _select(front: list, k: int) -> list:
    """Up to ``k`` front trials spread along the forget axis (its ends included)."""
    front = sorted(front, key=lambda t: (t.values[0], -t.values[1]))
    if len(front) <= k:
        return front
    if k == 1:
        return [front[len(front) // 2]]
    picks = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)})
    return [front[i] for i in picks]


def heldout(spec: StudySpec, out: Path, space_by_method: dict[str, dict[str, Dimension]], command: str,
            progress: bool, clock: Clock | None = None) -> dict[str, list[dict]]:
    """Re-run each method's selected front points on held-out prompts over ``spec.seeds``."""
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    rows: dict[str, list[dict]] = {}
    plan = []
    for method, space in space_by_method.items():
        study = _load_study(spec, out, method, space)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        flags = pareto([list(t.values) for t in done], [d.name.lower() for d in study.directions])
        chosen = _select([t for t, f in zip(done, flags) if f], spec.front)
        plan += [(method, t) for t in chosen]
    data = {seed: ensure_data(spec, out, seed, progress, command) for seed in spec.seeds}
    bar = tqdm(total=len(plan) * len(spec.seeds), desc=f"study {spec.concept}: held-out runs", disable=not progress)
    for method, trial in plan:
        runs = []
        for seed in spec.seeds:
            cfg = build_config(None, [*_base_overrides(spec), f"method={method}", f"seed={seed}", f"data_seed={seed}",
                                      *([f"data_dir={data[seed]}"] if data[seed] else []),
                                      *(f"{k}={v}" for k, v in trial.params.items())])
            run_dir = out / "heldout" / method / f"trial-{_root(trial):04d}" / f"seed-{seed}"
            results = _run(cfg, run_dir, f"{command} (held-out, {method} trial {_root(trial)}, seed {seed})", False)
            entry = {"seed": seed, **scores(results), "seconds": results.get("seconds")}
            if spec.attack:
                entry["asr"] = _attack(spec, run_dir, cfg, False, command)
            runs.append(entry)
            bar.update(1)
            if clock is not None:
                clock.tick()
        rows.setdefault(method, []).append({"trial": _root(trial), "params": dict(trial.params),
                                            "train_objectives": list(trial.values), "runs": runs,
                                            **_aggregate(runs)})
    bar.close()
    return rows


def _aggregate(runs: list[dict]) -> dict[str, Any]:
    out = {}
    for key in ("forget_score", "alignment", "quality_fd", "asr"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
            out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def summarise(spec: StudySpec, rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: the chosen point (best held-out alignment with forget ≤ 0.05, else lowest forget)
    and the held-out front's hypervolume (forget × alignment, and × attack when attacked)."""
    summary = {}
    for method, points in rows.items():
        forgets = [p for p in points if p["forget_score"] <= FORGET_LIMIT]
        # Ties in alignment (common at 0.997) go to the lower attack success, then the lower forget score.
        best = (max(forgets, key=lambda p: (round(p["alignment"], 3), -p.get("asr", 0.0), -p["forget_score"]))
                if forgets else min(points, key=lambda p: (p["forget_score"], -p["alignment"])))
        clean = [[p["forget_score"], 1 - p["alignment"]] for p in points]
        entry = {"chosen": best, "reaches_forget_limit": bool(forgets), "hypervolume": hypervolume(clean)}
        if spec.attack and all("asr" in p for p in points):
            entry["hypervolume_attack"] = hypervolume([c + [p["asr"]] for c, p in zip(clean, points)])
        summary[method] = entry
    return summary


def _is_class(spec: StudySpec) -> bool:
    return model_kind(build_config(None, _base_overrides(spec)).model) == "class"


def _pm(point: dict, key: str) -> str:
    return f"{point[key]:.3f} ± {point[key + '_std']:.3f}" if key in point else "-"


def report(spec: StudySpec, rows: dict[str, list[dict]], summary: dict[str, dict], command: str, out: Path,
           seconds: float) -> str:
    attack = f" | ASR {spec.attack} ↓" if spec.attack else ""
    lines = ["# Method study", "", f"`{command}`", "",
             f"Concept `{spec.concept}`; {spec.trials} search trials per method ({spec.sampler}) on TRAINING-"
             f"vocabulary prompts; each method's Pareto front ({spec.front} points at most) re-run on HELD-OUT "
             f"prompts over seeds {','.join(map(str, spec.seeds))} (mean ± std). Chosen = best held-out alignment "
             f"with forget ≤ {FORGET_LIMIT}, else the lowest forget. HV = hypervolume of the held-out front "
             "(forget × (1 − alignment)" + (f" × ASR {spec.attack}" if spec.attack else "") + ", reference 1; "
             f"higher is better). {seconds / 60:.0f} minutes."
             + (" Class-conditional model: forget = 1 − UA, alignment = RA, FD on every class; held-out = "
                "evaluation seeds the search never used." if _is_class(spec) else ""), "",
             f"| method | chosen settings | forget ↓ | alignment ↑{attack} | HV clean ↑"
             + (" | HV with attack ↑" if spec.attack else "") + " | reaches forget ≤ 0.05 |",
             "|---|---|---|---|" + ("---|" if spec.attack else "") + "---|" + ("---|" if spec.attack else "") + "---|"]
    for method, entry in summary.items():
        p = entry["chosen"]
        settings = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in p["params"].items())
        cells = [method, settings, _pm(p, "forget_score"), _pm(p, "alignment")]
        if spec.attack:
            cells.append(_pm(p, "asr"))
        cells.append(f"{entry['hypervolume']:.3f}")
        if spec.attack:
            cells.append(f"{entry.get('hypervolume_attack', float('nan')):.3f}")
        cells.append("yes" if entry["reaches_forget_limit"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    if spec.attack and summary:
        best = max(summary, key=lambda m: summary[m].get("hypervolume_attack", -1))
        clean_best = max(summary, key=lambda m: summary[m]["hypervolume"])
        lines += ["", f"Highest hypervolume with the attack counted: **{best}**"
                  + ("" if best == clean_best else f" (on clean prompts alone: {clean_best}, which the attack "
                                                   "overturns)") + "."]
    lines += ["", "## Every held-out front point", "",
              "| method | trial | settings | forget ↓ | alignment ↑ | quality FD ↓" + attack + " |",
              "|---|---|---|---|---|---|" + ("---|" if spec.attack else "")]
    for method, points in rows.items():
        for p in points:
            settings = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in p["params"].items())
            lines.append(f"| {method} | {p['trial']} | {settings} | {_pm(p, 'forget_score')} | {_pm(p, 'alignment')} | "
                         f"{_pm(p, 'quality_fd')}" + (f" | {_pm(p, 'asr')}" if spec.attack else "") + " |")
    lines += ["", "![held-out fronts](front.png)", ""]
    text = "\n".join(lines)
    atomic_write_text(out / "study.md", text)
    return text


def front_plot(rows: dict[str, list[dict]], path: Path, concept: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, points in rows.items():
        pts = sorted(points, key=lambda p: p["forget_score"])
        ax.errorbar([p["forget_score"] for p in pts], [p["alignment"] for p in pts],
                    xerr=[p.get("forget_score_std", 0) for p in pts], yerr=[p.get("alignment_std", 0) for p in pts],
                    marker="o", capsize=3, label=method)
    ax.axvline(FORGET_LIMIT, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("held-out forget score (lower = more forgotten)")
    ax.set_ylabel("held-out alignment (higher = better)")
    ax.set_title(f"each method's front, re-run on held-out prompts: '{concept}'")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _worker_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "diffunlearn.cli", *argv, "--worker"]


def run_study(spec: StudySpec, out: Path, command: str = "diffunlearn study", progress: bool = True,
              worker: bool = False, argv: list[str] | None = None) -> dict:
    """Search, re-evaluate on held-out prompts, report. With ``worker`` only the search phase runs
    (the processes that ``--workers`` starts)."""
    space_by_method = validate(spec)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    if worker:
        search(spec, out, space_by_method, command, progress=False)
        return {}
    clock = Clock(out)
    ensure_data(spec, out, spec.seeds[0], progress, command)  # before workers start, so they share it
    children = []
    if spec.workers > 1:
        if argv is None:
            raise UserError("--workers needs the command line to start its workers with")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        children = [subprocess.Popen(_worker_command(argv), env=env, stdout=subprocess.DEVNULL)
                    for _ in range(spec.workers - 1)]
    try:
        search(spec, out, space_by_method, command, progress, clock)
    finally:
        for child in children:
            child.wait()
    failed = [c.returncode for c in children if c.returncode not in (0, None)]
    if failed:
        raise UserError(f"{len(failed)} study worker(s) failed (exit codes {failed}); rerun the same command to "
                        "finish the study (finished trials are kept)")
    rows = heldout(spec, out, space_by_method, command, progress, clock)
    summary = summarise(spec, rows)
    trials = {}
    for method, space in space_by_method.items():
        study = _load_study(spec, out, method, space)
        trials[method] = [{"number": t.number, "root": _root(t), "state": t.state.name, "params": t.params,
                           "values": t.values, "run": t.user_attrs.get("run"), "worker": t.user_attrs.get("worker")}
                          for t in study.get_trials()]
    seconds = clock.tick()
    front_plot(rows, out / "front.png", spec.concept)
    text = report(spec, rows, summary, command, out, seconds)
    result = {"command": command, "spec": dataclasses.asdict(spec),
              "spaces": {m: {k: d.describe() for k, d in s.items()} for m, s in space_by_method.items()},
              "trials": trials, "heldout": rows, "summary": summary, "seconds": seconds, "table": text}
    atomic_write_text(out / "study.json", json.dumps(result, indent=1, default=str) + "\n")
    return result
