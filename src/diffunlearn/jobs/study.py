"""``diffunlearn study``: compare unlearning methods fairly, each at its own best settings.

Digit world (``embedded:digits``), class world (``model=embedded:digits-class``; forget =
1 − UA, alignment = RA, tuning and held-out differ by evaluation seeds) or Stable Diffusion
(``--metrics``/``--prompts``: every run is scored by ``diffunlearn eval``, the search on the training
split of the template sets, the report on the held-out sets). ``--sampler grid`` runs exactly the
``--space`` lists; ``diffunlearn sweep CONFIG key=v1,v2`` is that grid form. For every method the
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
                                (``seed-S-HASH`` for a trial whose searched keys change the data)
    clock.json                  wall seconds of all sessions together
    trials/METHOD/trial-NNNN/   one run folder per search trial (evaluated on training prompts;
                                Stable Diffusion: ``eval/`` inside)
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

from ..config import FIELDS, build_config, model_kind
from ..data.training import DATA_KEYS
from ..errors import UserError
from ..utils import atomic_write_text

# Keys whose single value is itself a comma-separated list: their alternatives are separated by ";".
LIST_KEYS = tuple(name for name, f in FIELDS.items() if isinstance(f.default, str) and "," in f.default)
PICKS = ("first-seed", "every-seed")  # what --pick may name besides "auto" (resolved by `resolve`)
TUNE_SEED = 7          # evaluation seeds of the search (the demo and held-out reports use eval_seed 1)
FORGET_LIMIT = 0.05    # "forgets": held-out forget score at most this (the tuning rule of the README)
ALIGN_TOLERANCE = 0.03  # with the attack as an objective: alignment this close to the best counts as kept
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
    from ..methods import get_method

    settings = get_method(method).settings  # the keys the method itself says it reads
    space = {"lr": Dimension("float", 1e-5, 1e-3, log=True)}
    if "remain_weight" in settings:
        space["remain_weight"] = Dimension("float", 0.25, 16.0, log=True)
    if "margin" in settings and forget_cap == "hinge":
        space["margin"] = Dimension("float", 0.01, 2.0, log=True)
    if "esd_eta" in settings:
        space["esd_eta"] = Dimension("float", 0.5, 4.0)
    if "saliency_fraction" in settings:
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

                # A list-valued key (lora_targets=to_q,to_k) separates its alternatives with ";".
                separator = ";" if key in LIST_KEYS else ","
                dim = Dimension("choice", choices=tuple(yaml.safe_load(v) for v in value.split(separator)))
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
    concept: str = "three"         # "" = the config's concept
    overrides: tuple[str, ...] = ()
    config: str = ""               # a YAML config under the overrides ("" = the defaults)
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
    # Which training scores the tuning rule reads: the search trial's (seed 0's models, "first-seed") or
    # the mean over the held-out re-runs' models, each also scored on the training prompts ("every-seed").
    # "auto" (the default) is every-seed where it applies and changes anything, see `resolve`.
    pick: str = "auto"
    # Stable Diffusion (text-to-image) models are scored by `diffunlearn eval` metrics: the search on
    # `search_prompts` (default: the training split of each template/world set in `prompts`), the
    # held-out report on `prompts`.
    metrics: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    search_prompts: tuple[str, ...] = ()
    metric_options: Any = None     # evaluate.base.MetricOptions for those metrics (None = defaults)


def grid_study(config: str | None, entries: list[str], **fields: Any) -> StudySpec:
    """``diffunlearn sweep CONFIG key=v1,v2 ...`` as the study it is: ``--sampler grid`` over the
    keys with several values, the one-value keys fixed, ``method=a,b`` as the methods compared."""
    if config is not None and "=" in str(config) and not Path(config).is_file():
        config, entries = None, [str(config), *entries]  # no config file given, only grid entries
    if not entries:
        raise UserError("no grid given; pass at least one key=v1,v2,... such as remain_weight=0.5,1,5")
    fixed, space, methods = [], [], ()
    for entry in entries:
        key, sep, raw = entry.partition("=")
        if not sep or not key.strip():
            raise UserError(f"grid entry {entry!r} is not of the form key=v1,v2,...; write e.g. remain_weight=0.5,1,5")
        key = key.strip()
        values = [v.strip() for v in raw.split(";" if key in LIST_KEYS else ",")]
        if key == "method":
            methods = tuple(values)
        elif len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        elif key in ("concept", "seed", "data_seed"):
            raise UserError(f"a grid over `{key}` is several studies; run one per {key} (or give --seeds for the "
                            "held-out seeds)")
        else:
            space.append(entry)
    if not space and len(methods) < 2:
        raise UserError("nothing varies in the grid; give at least one key two or more values, e.g. "
                        "remain_weight=0.5,1,5")
    cfg = build_config(config, fixed)
    concept = next((f.split("=", 1)[1] for f in fixed if f.startswith("concept=")), "")
    fixed = [f for f in fixed if not f.startswith(("concept=", "seed=", "data_seed="))]
    return StudySpec(methods=methods or (cfg.method,), concept=concept or cfg.concept, overrides=tuple(fixed),
                     config=str(config or ""), space=tuple(space), sampler="grid", seeds=(cfg.seed,), **fields)


def _cfg(spec: StudySpec, *extra: str):
    return build_config(spec.config or None, [*_base_overrides(spec), *extra])


def resolve(spec: StudySpec) -> StudySpec:
    """The spec with its concept filled in from the config when ``--concept`` was not given, and
    ``--pick auto`` made concrete: "every-seed" on the digit world when the rule has several front
    points and seeds to choose with and reads forget and alignment only, else "first-seed" (a
    one-point front or one seed, where both rules pick the same; the class world and Stable
    Diffusion, which have no training-prompt scorer for the held-out models; an attack objective).
    Why every-seed: on "red" seed 0's training alignment saturated, and the first-seed rule picked
    a point 0.05 lower held out than the one every-seed picks (README "Method study")."""
    if not spec.concept:
        spec = dataclasses.replace(spec, concept=build_config(spec.config or None, list(spec.overrides)).concept)
    if spec.pick == "auto":
        scorable = not spec.metrics and "attack" not in spec.objectives and spec.front > 1 and len(spec.seeds) > 1
        try:
            scorable = scorable and model_kind(_cfg(spec).model) == "pixel"
        except UserError:
            scorable = False  # the bad config is reported by `validate`, with everything else wrong
        spec = dataclasses.replace(spec, pick="every-seed" if scorable else "first-seed")
    return spec


def search_prompt_specs(prompts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The training-split twin of every held-out prompt spec (``template:nudity:test:forget:100`` ->
    ``template:nudity:train:forget:100``), and the specs that have none (files, class sets)."""
    found, missing = [], []
    for spec in prompts:
        name, sep, body = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
        parts = body.split(":")
        if parts[0] in ("template", "world") and len(parts) >= 2:
            rest = parts[2:] if len(parts) > 2 else []
            if rest:
                rest[0] = "train"
            else:
                rest = ["train"]
            found.append((f"{name}=" if sep else "") + ":".join([*parts[:2], *rest]))
        else:
            missing.append(spec)
    return found, missing


def _base_overrides(spec: StudySpec) -> list[str]:
    return [*([f"concept={spec.concept}"] if spec.concept else []), *spec.overrides]


def spaces(spec: StudySpec) -> dict[str, dict[str, Dimension]]:
    """Each method's search space: its defaults, then ``--space`` entries for all, then per method."""
    given = parse_space(list(spec.space), spec.methods)
    base = _cfg(spec)
    out = {}
    for method in spec.methods:
        # A grid is exactly the lists given (the sweep of one config); the other samplers search
        # each method's own knobs as well.
        defaults = {} if spec.sampler == "grid" else default_space(method, base.forget_cap)
        space = {**defaults, **given.get("*", {}), **given.get(method, {})}
        fixed = {o.split("=", 1)[0] for o in spec.overrides}
        out[method] = {k: d for k, d in space.items() if k not in fixed}  # a key=value override is not searched
    return out


def validate(spec: StudySpec) -> dict[str, dict[str, Dimension]]:
    """Everything checked before the first run; returns the spaces."""
    from ..methods import get_method

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
    if spec.pick not in ("auto", *PICKS):  # "auto" is made concrete by `resolve`, before or after this
        problems.append(f"--pick must be one of auto, {', '.join(PICKS)}, got {spec.pick!r}")
    elif spec.pick == "every-seed" and (spec.metrics or model_kind(_cfg(spec).model) != "pixel"):
        problems.append("--pick every-seed scores each held-out model on the digit world's training prompts, so it "
                        "is for the embedded digit world; use --pick first-seed for this model")
    elif spec.pick == "every-seed" and "attack" in spec.objectives:
        problems.append("--pick every-seed reads forget and alignment only; with --objectives ...,attack use "
                        "--pick first-seed")
    if "attack" in spec.objectives and not spec.attack:
        problems.append("--objectives ...,attack needs --attack NAME (e.g. --attack embedding)")
    if spec.attack:
        from ..attacks import build_attacks

        if len(set(attack_names(spec))) != len(attack_names(spec)):
            problems.append(f"--attack names an attack twice ({spec.attack}); name each once, e.g. "
                            "--attack embedding,relearn")
        build_attacks(list(attack_names(spec)))
    if problems:
        raise UserError("; ".join(problems))
    for o in spec.overrides:
        if o.split("=", 1)[0] in ("method", "concept", "seed", "data_seed", "eval_split", "eval_seed", "data_dir"):
            raise UserError(f"the study sets `{o.split('=', 1)[0]}` itself; drop {o!r} (use --methods, --concept "
                            "or --seeds)")
    cfg = _cfg(spec, f"method={spec.methods[0]}")
    _check_scoring(spec, model_kind(cfg.model))
    if spec.sampler == "grid" and not spec.space and len(spec.methods) < 2:
        raise UserError("--sampler grid searches only the --space lists; give at least one, e.g. "
                        "--space remain_weight=0.5,1,5")
    result = spaces(spec)
    for method, space in result.items():
        if spec.sampler == "grid" and any(d.kind != "choice" for d in space.values()):
            ranged = [k for k, d in space.items() if d.kind != "choice"]
            raise UserError(f"--sampler grid needs a list of values for every searched key of {method} "
                            f"({', '.join(ranged)} are ranges); pass e.g. --space lr=5e-5,1e-4")
        for key, dim in space.items():
            probe = dim.choices if dim.kind == "choice" else (dim.low, dim.high)
            for value in probe:
                _cfg(spec, f"method={method}", f"{key}={value}")
    return result


def _check_scoring(spec: StudySpec, kind: str) -> None:
    """How runs of this model kind are scored, checked before any training: digit and class worlds
    by themselves; Stable Diffusion by ``eval`` metrics giving a forgetting and an alignment number
    on search and held-out prompt sets."""
    if kind in ("pixel", "class"):
        if spec.metrics or spec.prompts or spec.search_prompts:
            raise UserError("--metrics/--prompts are for Stable Diffusion models; digit- and class-world runs are "
                            "scored by the study itself (drop them)")
        return
    if not spec.metrics or not spec.prompts:
        raise UserError("a Stable Diffusion study scores its runs with `diffunlearn eval` metrics; pass --metrics "
                        "and --prompts, e.g. --metrics alignment,nudenet --prompts template:nudity:test:forget "
                        "template:nudity:test:remain")
    if spec.attack:
        raise UserError("--attack in a study uses the digit world's oracle; for Stable Diffusion red-team the chosen "
                        "runs with `diffunlearn attack RUN --metrics nudenet ...`")
    from ..evaluate.base import FACTORIES
    from ..evaluate.prompt_sets import resolve_prompt_sets
    from .compare import ALIGNMENT, FORGETTING

    unknown = [m for m in spec.metrics if m not in FACTORIES]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; use one of: {', '.join(FACTORIES)}")
    search, missing = search_prompt_specs(spec.prompts)
    if missing and not spec.search_prompts:
        raise UserError(f"--prompts {missing[0]} has no training split to search on; pass --search-prompts with the "
                        "sets to tune on (e.g. template:nudity:train:forget template:nudity:train:remain)")
    for label, specs in (("--search-prompts" if spec.search_prompts else "the search sets",
                          list(spec.search_prompts) or search), ("--prompts", list(spec.prompts))):
        names = {ps.name for ps in resolve_prompt_sets(specs)}  # a bad prompt file fails now, not after training
        for side, choices in (("forgetting", FORGETTING), ("alignment", ALIGNMENT)):
            if not any(m in spec.metrics and s in names for m, s, _ in choices):
                able = sorted({f"{m} on a `{s}` set" for m, s, _ in choices})
                raise UserError(f"--metrics {','.join(spec.metrics)} on {label} ({', '.join(sorted(names))}) give no "
                                f"{side} number; measure one of: {'; '.join(able)}")


def _storage(spec: StudySpec, out: Path):
    import warnings

    import optuna

    # Heartbeats (how a killed worker's trial is noticed) are marked experimental; they are relied on here.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    url = spec.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


def _sampler(spec: StudySpec, space: dict[str, Dimension], offset: int = 0):
    """The sampler, seeded with ``sampler_seed + offset``. A sampler replays its random draws from its
    seed, so a resumed session or a second worker seeded like the first would propose the same
    points again; :func:`search` passes an offset unique to (trials already stored, worker)."""
    import optuna

    seed = spec.sampler_seed + offset
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()}, seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(6, spec.trials))


WORKER_ENV = "DIFFUNLEARN_STUDY_WORKER"  # the index of a --workers process (0 = the main process)


def budget(spec: StudySpec, space: dict[str, Dimension]) -> int:
    """Finished search trials a method gets: ``--trials``, or with ``--sampler grid`` every grid point."""
    if spec.sampler == "grid":
        return math.prod(len(d.choices) for d in space.values())
    return spec.trials


def study_name(spec: StudySpec, method: str) -> str:
    return f"{spec.concept}:{method}"


def _directions(spec: StudySpec) -> list[str]:
    """The Optuna directions of a trial's values: forget, alignment, then the attack when searched."""
    return ["minimize", "maximize"] + (["minimize"] if "attack" in spec.objectives else [])


def _load_study(spec: StudySpec, out: Path, method: str, space: dict[str, Dimension]):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=study_name(spec, method), storage=_storage(spec, out),
                               directions=_directions(spec), sampler=_sampler(spec, space), load_if_exists=True)


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


def _evaluated(spec: StudySpec, run_dir: Path, cfg, prompts: list[str], command: str) -> dict[str, float | None]:
    """A Stable Diffusion run's scores from ``diffunlearn eval`` (``RUN/eval``, reused when it already
    holds these metrics on these sets): forgetting and alignment as ``compare`` picks them, quality
    from fid when measured."""
    from . import suite
    from .compare import ALIGNMENT, FORGETTING, load_results, pick_measure

    eval_dir = run_dir / "eval"
    if not _evaluation_current(eval_dir, list(spec.metrics), prompts):
        options = point_options(spec.metric_options, cfg)
        # The run's own evaluation settings: search runs carry the tuning seed, held-out runs theirs.
        sampler = suite.SamplerSettings(steps=cfg.eval_steps, guidance=cfg.eval_guidance, seed=cfg.eval_seed,
                                        resolution=cfg.resolution, batch_size=options.batch_size)
        suite.evaluate(str(run_dir), list(spec.metrics), prompts, eval_dir, options, sampler,
                       force=(eval_dir / "results.json").is_file(), progress=False, command=command, device=cfg.device)
    flat = load_results(run_dir)
    forget, align = pick_measure(flat, FORGETTING), pick_measure(flat, ALIGNMENT)
    fid = next((v for k, v in flat.items() if k.startswith("fid/")), None)
    return {"forget_score": forget[1], "alignment": align[1], "quality_fd": fid}


def _evaluation_current(eval_dir: Path, metrics: list[str], prompts: list[str]) -> bool:
    """Whether ``eval_dir`` holds a finished evaluation with every requested metric on every set."""
    from ..evaluate.prompt_sets import resolve_prompt_sets

    try:
        have = json.loads((eval_dir / "results.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    sets = {ps.name for ps in resolve_prompt_sets(prompts)}
    return all(m in have and sets <= set(have[m]) for m in metrics)


def point_options(options, cfg):
    """The metric options of one run: its concept is the ``oracle``'s forgotten concept and the
    ``classifier``'s forgotten class unless the command named them."""
    from ..evaluate.base import MetricOptions

    options = options or MetricOptions()
    return dataclasses.replace(options, concept=options.concept or cfg.concept,
                               target_class=options.target_class or cfg.concept)


def _score(spec: StudySpec, run_dir: Path, cfg, results: dict, split: str, command: str) -> dict[str, float | None]:
    """Scores of a finished run on the ``train`` (search) or ``test`` (held-out) prompts."""
    if not spec.metrics:
        return scores(results)  # digit and class worlds score their runs themselves (eval_split)
    prompts = list(spec.search_prompts or search_prompt_specs(spec.prompts)[0]) if split == "train" \
        else list(spec.prompts)
    return _evaluated(spec, run_dir, cfg, prompts, command)


def _objectives_of(found: dict, attack: float | None, spec: StudySpec) -> list[float]:
    values = [float(found["forget_score"]), float(found["alignment"])]
    if "attack" in spec.objectives:
        values.append(float(attack))
    return values


def _run(cfg, run_dir: Path, command: str, progress: bool) -> dict:
    """A finished run's results, or train (resuming an interrupted one with the same config)."""
    from . import run as job

    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    # An interrupted trial continues in its own folder: from its checkpoint, or from step 1 (the
    # training images are shared, so nothing but training time is repeated).
    resume = (run_dir / "config.yaml").is_file() and (run_dir / "environment.json").is_file()
    return job.run_unlearning(cfg, run_dir, force=False, command=command, progress=progress, resume=resume)


def attack_names(spec: StudySpec) -> tuple[str, ...]:
    """``--attack embedding,relearn``: the attacks each run is red-teamed with."""
    return tuple(a.strip() for a in spec.attack.split(",") if a.strip())


def attack_label(spec: StudySpec) -> str:
    """How the reports name the attack objective: the one attack, or the worst of several."""
    names = attack_names(spec)
    return names[0] if len(names) == 1 else "worst of " + "/".join(names)


def _attack(spec: StudySpec, run_dir: Path, cfg, progress: bool, command: str, split: str) -> dict[str, float]:
    """The attacks' success on ``run_dir``'s model: on training-vocabulary forget prompts (``split="train"``)
    inside the search, on the held-out ones for the re-runs, so no trial is chosen on the attack set.

    Returns ``{"asr": worst, "asr_<name>": each, "unconverged": [names]}``. With several attacks the
    objective is the WORST (highest) success: a model is only as robust as its weakest side (the
    relearning study of "three" found settings that resist one attack by giving in to the other).
    ``unconverged`` names the optimisation attacks whose loss was still falling at their last step
    (their ASR is a lower bound); the report marks those points."""
    from .attack import red_team

    names = attack_names(spec)
    found = red_team(str(run_dir / "model"), spec.concept, run_dir / "attack", names, cfg.eval_steps,
                     cfg.eval_guidance, progress, command, n=cfg.eval_prompts, split=split)
    each = {f"asr_{name}": float(found[name]) for name in names}
    report = json.loads((run_dir / "attack" / "results.json").read_text())["attacks"]
    unconverged = [name for name in names if report.get(name, {}).get("converged") is False]
    return {"asr": max(each.values()), **(each if len(names) > 1 else {}), "unconverged": unconverged}


def shares_data(space_by_method: dict[str, dict]) -> bool:
    """Whether some trial will use the seed's shared image folder: False when every method searches
    a key of DATA_KEYS, so each trial has a folder of its own and the shared one would go unused."""
    return any(not set(space) & set(DATA_KEYS) for space in space_by_method.values())


def ensure_data(spec: StudySpec, out: Path, seed: int, progress: bool, command: str,
                params: dict | None = None, method: str | None = None) -> Path | None:
    """The training images of ``seed`` (shared by every method and trial), built once; None for a
    class-conditional model (its runs draw their images from the class data, no generation). A
    trial whose searched settings change the data (``--space diversity=diverse,uniform``) gets
    its own folder, ``data/seed-S-<hash of those settings>``; so does a ``method`` whose own
    defaults set a data key otherwise than the study's first method (GradDiff's and rg's
    ``remain_neighbours`` for a colour), so every run trains on the data its config names."""
    import hashlib

    from .data_build import build_data

    if model_kind(_cfg(spec).model) == "class":
        return None
    own = {k: v for k, v in (params or {}).items() if k in DATA_KEYS}
    if method is not None and method != spec.methods[0]:
        first, mine = _cfg(spec, f"method={spec.methods[0]}"), _cfg(spec, f"method={method}")
        own.update({k: getattr(mine, k) for k in DATA_KEYS
                    if k not in own and getattr(mine, k) != getattr(first, k)})
    name = f"seed-{seed}" + (f"-{hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:10]}"
                             if own else "")
    folder = (out / "data" / name).resolve()  # absolute: config.yaml stays valid from any directory
    if not (folder / "forget" / "manifest.json").is_file() or not (folder / "remain" / "manifest.json").is_file():
        cfg = _cfg(spec, f"method={spec.methods[0]}", f"data_seed={seed}", *(f"{k}={v}" for k, v in own.items()))
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

    if shares_data(space_by_method):
        ensure_data(spec, out, spec.seeds[0], progress, command)
    for method, space in space_by_method.items():
        study = _load_study(spec, out, method, space)
        optuna.storages.fail_stale_trials(study)  # trials of a killed worker (heartbeat too old) become FAIL,
        requeue_interrupted(study)                # then run again under their own numbers
        # A fresh draw sequence for this session and worker (the first session of worker 0 keeps the
        # plain seed, so a study run in one go is reproducible from --sampler-seed).
        study.sampler = _sampler(spec, space, len(study.trials) + 7919 * int(os.environ.get(WORKER_ENV, "0")))
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        total = budget(spec, space)
        left = total - len(done) - len(running)  # queued re-runs are part of what is left
        bar = tqdm(total=total, initial=len(done), desc=f"study {spec.concept}: {method} trials",
                   disable=not progress or left <= 0)

        def objective(trial, method=method, space=space, study=study, total=total):
            others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                      if t.number != trial.number]
            if len(others) >= total:  # two workers asked at the same moment: the budget is used up
                study.stop()
                raise optuna.TrialPruned("the study has its trials")
            params = {key: dim.suggest(trial, key) for key, dim in space.items()}
            data_dir = ensure_data(spec, out, spec.seeds[0], False, command, params, method)
            cfg = _cfg(spec, f"method={method}", f"seed={spec.seeds[0]}", f"data_seed={spec.seeds[0]}",
                       "eval_split=train", f"eval_seed={TUNE_SEED}", *([f"data_dir={data_dir}"] if data_dir else []),
                       *(f"{k}={v}" for k, v in params.items()))
            run_dir = out / "trials" / method / f"trial-{_root(trial):04d}"
            trial.set_user_attr("run", str(run_dir))
            trial.set_user_attr("worker", os.getpid())
            where = f"{command} (trial {_root(trial)} of {method})"
            results = _run(cfg, run_dir, where, False)
            found = _score(spec, run_dir, cfg, results, "train", where)
            attacked = _attack(spec, run_dir, cfg, False, command, "train") if "attack" in spec.objectives else {}
            trial.set_user_attr("seconds", results.get("seconds"))
            for key, value in attacked.items():
                trial.set_user_attr(key, value)
            return _objectives_of(found, attacked.get("asr"), spec)

        def tick(study, trial, bar=bar):
            bar.n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            bar.refresh()
            requeue_interrupted(study)  # a worker that died meanwhile: its trial runs again here
            if clock is not None:
                clock.tick()

        callbacks = [MaxTrialsCallback(total, states=(TrialState.COMPLETE, TrialState.RUNNING)), tick]
        try:
            if left > 0:
                study.optimize(objective, n_trials=left, callbacks=callbacks, catch=())
            finish_orphaned_trials(study, objective, callbacks, method, progress)
        finally:
            bar.close()


def finish_orphaned_trials(study, objective, callbacks, method: str, progress: bool) -> None:
    """Trials still RUNNING once this worker's share is done belong to another worker: wait until each
    finishes or its heartbeat goes stale (a worker killed moments before this session started looks
    alive for GRACE_SECONDS), and run the stale ones again here. Without this wait a study restarted
    right after a kill counted the dead trial as running, finished without it, and kept it RUNNING."""
    import optuna
    from optuna.trial import TrialState

    said = False
    while True:
        optuna.storages.fail_stale_trials(study)
        queued = requeue_interrupted(study)
        if queued:
            study.optimize(objective, n_trials=queued, callbacks=callbacks, catch=())
            continue
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if progress and not said:
            print(f"waiting for {method} trial(s) {', '.join(str(_root(t)) for t in running)} of another worker "
                  f"(a dead worker's trial runs again here once its heartbeat is {GRACE_SECONDS} s old)",
                  file=sys.stderr)
            said = True
        time.sleep(max(0.5, min(HEARTBEAT_SECONDS, GRACE_SECONDS) / 4))


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


def forgets(value: float) -> bool:
    """Forget score at most ``FORGET_LIMIT`` (scores are float32 fractions: 5/100 is 0.0500000007)."""
    return value <= FORGET_LIMIT + 1e-6


def rule_choice(points: list, scores, tiebreak=lambda p: 0.0) -> Any:
    """The README's tuning rule on ``scores(point) -> (forget, alignment[, attack])``: the best alignment
    among points that forget, ties to the lower forget score, then the lower ``tiebreak(point)``; if none
    forgets, the lowest forget score.

    With the attack as a third objective, the lowest attack success among the points that forget and
    keep alignment within ``ALIGN_TOLERANCE`` of the best of them (ties to the better alignment, then
    as above): a rule on forget and alignment alone would ignore the third objective it searched for
    (the relearning study of "three" found lr 1.25e-4 at training ASR 0.09 beside lr 5.85e-5 at 0.30,
    the same 0.00-0.01 / 1.00 on clean prompts, and picked the second)."""
    ok = [p for p in points if forgets(scores(p)[0])]
    if not ok:
        return min(points, key=lambda p: (scores(p)[0], -scores(p)[1], tiebreak(p)))
    if all(len(scores(p)) > 2 for p in ok):
        best = max(round(scores(p)[1], 3) for p in ok)
        ok = [p for p in ok if round(scores(p)[1], 3) >= best - ALIGN_TOLERANCE - 1e-9]
        return min(ok, key=lambda p: (round(scores(p)[2], 3), -round(scores(p)[1], 3), scores(p)[0], tiebreak(p)))
    return max(ok, key=lambda p: (round(scores(p)[1], 3), -scores(p)[0], -tiebreak(p)))


def _select(front: list, k: int) -> list:
    """Up to ``k`` front trials to re-run held out: first the one the tuning rule picks on the
    training scores (so the reported choice is always among them), then the rest spread along the
    forget axis (its ends first)."""
    front = sorted(front, key=lambda t: (t.values[0], -t.values[1]))
    if len(front) <= k:
        return front
    first = rule_choice(front, lambda t: t.values)
    rest = [t for t in front if t is not first]
    if k == 1:
        return [first]
    spread = sorted({round(i * (len(rest) - 1) / (k - 2)) for i in range(k - 1)}) if k > 2 else [0, len(rest) - 1]
    picks = [rest[i] for i in dict.fromkeys(spread)][:k - 1]
    return sorted([first, *picks], key=lambda t: (t.values[0], -t.values[1]))


def prefer_ran(chosen: list, front: list, ran: set[int]) -> list:
    """A tie is arbitrary: a chosen trial not yet re-run held out is replaced by a front trial with
    the same training scores that has been (no runs repeated for a tie); duplicates dropped."""
    out = [t if _root(t) in ran else next((u for u in front if _root(u) in ran and u.values == t.values), t)
           for t in chosen]
    return list({_root(t): t for t in out}.values())  # (Optuna's FrozenTrial is not hashable)


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
        front = [t for t, f in zip(done, flags) if f]
        chosen = _select(front, spec.front)
        ran = {_root(t) for t in front if (out / "heldout" / method / f"trial-{_root(t):04d}").is_dir()}
        plan += [(method, t) for t in prefer_ran(chosen, front, ran)]
    if any(not set(t.params) & set(DATA_KEYS) for _, t in plan):  # some point uses the shared images
        for seed in spec.seeds:
            ensure_data(spec, out, seed, progress, command)  # with its own bar, before the runs' bar
    bar = tqdm(total=len(plan) * len(spec.seeds), desc=f"study {spec.concept}: held-out runs", disable=not progress)
    for method, trial in plan:
        runs = []
        for seed in spec.seeds:
            data_dir = ensure_data(spec, out, seed, progress, command, trial.params, method)
            cfg = _cfg(spec, f"method={method}", f"seed={seed}", f"data_seed={seed}",
                       *([f"data_dir={data_dir}"] if data_dir else []), *(f"{k}={v}" for k, v in trial.params.items()))
            run_dir = out / "heldout" / method / f"trial-{_root(trial):04d}" / f"seed-{seed}"
            where = f"{command} (held-out, {method} trial {_root(trial)}, seed {seed})"
            results = _run(cfg, run_dir, where, False)
            entry = {"seed": seed, **_score(spec, run_dir, cfg, results, "test", where),
                     "seconds": results.get("seconds")}
            if spec.attack:
                entry.update(_attack(spec, run_dir, cfg, False, command, "test"))
            if spec.pick == "every-seed":
                entry["train"] = training_scores(run_dir, cfg)
            runs.append(entry)
            bar.update(1)
            if clock is not None:
                clock.tick()
        searched = out / "trials" / method / f"trial-{_root(trial):04d}" / "results.json"
        train_fd = scores(json.loads(searched.read_text())).get("quality_fd") if (
            searched.is_file() and not spec.metrics) else None
        every = {"train_seeds_objectives": [statistics.fmean(r["train"][k] for r in runs)
                                            for k in ("forget_score", "alignment")],
                 "train_seeds_quality_fd": statistics.fmean(r["train"]["quality_fd"] for r in runs)
                 } if spec.pick == "every-seed" else {}
        rows.setdefault(method, []).append({"trial": _root(trial), "params": dict(trial.params),
                                            "train_objectives": list(trial.values), "train_quality_fd": train_fd,
                                            **every, "runs": runs,
                                            **_aggregate(runs)})
    bar.close()
    return rows


def training_scores(run_dir: Path, cfg) -> dict[str, float]:
    """A held-out run's model scored on the TRAINING-vocabulary prompts at the search's evaluation seed
    (``--pick every-seed``), kept in ``train_scores.json`` beside it so a resumed study reuses it. For
    the seed the search trained on, this is the search trial's own score (the weights are the same)."""
    from ..core.parallel import Parallel
    from ..evaluate.world import evaluate_world
    from ..models import load_adapter
    from ..utils import atomic_write_text
    from .runfolder import resolve_device

    path = run_dir / "train_scores.json"
    if path.is_file():
        return json.loads(path.read_text())
    adapter, _ = load_adapter(str(run_dir / "model"), device=resolve_device(cfg, Parallel()))
    found = evaluate_world(adapter, cfg.concept, cfg.eval_prompts, "train", TUNE_SEED, cfg.eval_steps,
                           cfg.eval_guidance, progress=False)
    out = {"forget_score": float(found.forget_score), "alignment": float(found.alignment),
           "quality_fd": float(found.quality_fd), "eval_split": "train", "eval_seed": TUNE_SEED}
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    return out


def _unconverged_mark(point: dict) -> str:
    """`` ⚠ k/n`` after a held-out point's ASR when k of its n seeds' attacks had not converged."""
    runs = point.get("runs", [])
    k = sum(1 for r in runs if r.get("unconverged"))
    return f" ⚠ {k}/{len(runs)}" if k else ""


def _aggregate(runs: list[dict]) -> dict[str, Any]:
    out = {}
    keys = ["forget_score", "alignment", "quality_fd", "asr"]
    keys += sorted({k for r in runs for k in r if k.startswith("asr_")})
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
            out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def summarise(spec: StudySpec, rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: the chosen point and the held-out front's hypervolume (forget × alignment, and ×
    attack when attacked). The choice is made on the TRAINING-prompt scores of the search (best
    alignment with forget ≤ 0.05, else the lowest forget), so the held-out numbers reported for it
    (and the defaults taken from it) are never selected on held-out prompts."""
    summary = {}
    # --pick every-seed: the mean training scores of the held-out runs' models instead of the trial's.
    seen = "train_seeds" if spec.pick == "every-seed" else "train"
    for method, points in rows.items():
        # Ties (common: several points at training forget 0, alignment 1) go to the lower training
        # quality FD (the README "Tuning" rule).
        best = rule_choice(points, lambda p: p[seen + "_objectives"],
                           lambda p: math.inf if p.get(seen + "_quality_fd") is None else p[seen + "_quality_fd"])
        clean = [[p["forget_score"], 1 - p["alignment"]] for p in points]
        entry = {"chosen": best, "reaches_forget_limit": forgets(best["forget_score"]),
                 "hypervolume": hypervolume(clean)}
        if spec.attack and all("asr" in p for p in points):
            entry["hypervolume_attack"] = hypervolume([c + [p["asr"]] for c, p in zip(clean, points)])
        summary[method] = entry
    return summary


def _is_class(spec: StudySpec) -> bool:
    return model_kind(_cfg(spec).model) == "class"


def _pm(point: dict, key: str) -> str:
    return f"{point[key]:.3f} ± {point[key + '_std']:.3f}" if key in point else "-"


def _settings(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()) or "config"


def report(spec: StudySpec, rows: dict[str, list[dict]], summary: dict[str, dict], command: str, out: Path,
           seconds: float, trials: dict[str, list[dict]] | None = None) -> str:
    label = attack_label(spec) if spec.attack else ""
    attack = f" | ASR {label} ↓" if spec.attack else ""
    each = [n for n in attack_names(spec)] if len(attack_names(spec)) > 1 else []  # one column per attack too
    lines = ["# Method study", "", f"`{command}`", "",
             f"Concept `{spec.concept}`; "
             + (f"{spec.trials} search trials per method ({spec.sampler})" if spec.sampler != "grid" else
                "every grid point (grid)") + " on TRAINING-"
             f"vocabulary prompts; each method's Pareto front ({spec.front} points at most) re-run on HELD-OUT "
             f"prompts over seeds {','.join(map(str, spec.seeds))} (mean ± std). Chosen = "
             + (f"among the front points at TRAINING-prompt forget ≤ {FORGET_LIMIT} whose training alignment is "
                f"within {ALIGN_TOLERANCE} of the best of them, the one with the lowest training ASR {label}"
                if "attack" in spec.objectives else
                f"the front point with the best TRAINING-prompt alignment at training forget ≤ {FORGET_LIMIT}")
             + (" (training scores: the mean over the held-out seeds' models, each scored on the training "
                f"prompts at evaluation seed {TUNE_SEED}; --pick every-seed)" if spec.pick == "every-seed" else "")
             + ", else the lowest training forget; ties go to the lower training FD (so its held-out numbers are "
             "not selected on). "
             "HV = hypervolume of the held-out front "
             "(forget × (1 − alignment)" + (f" × ASR {label}" if spec.attack else "") + ", reference 1; "
             f"higher is better). {seconds / 60:.0f} minutes."
             + (" Class-conditional model: forget = 1 − UA, alignment = RA, FD on every class; held-out = "
                "evaluation seeds the search never used." if _is_class(spec) else "")
             + (f" Stable Diffusion: forget and alignment are the `diffunlearn eval` numbers of --metrics "
                f"{','.join(spec.metrics)} (as `compare` picks them), searched on "
                f"{' '.join(spec.search_prompts or search_prompt_specs(spec.prompts)[0])}, reported on "
                f"{' '.join(spec.prompts)}." if spec.metrics else ""), "",
             f"| method | chosen settings | forget ↓ | alignment ↑{attack} | HV clean ↑"
             + (" | HV with attack ↑" if spec.attack else "") + " | reaches forget ≤ 0.05 |",
             "|---|---|---|---|" + ("---|" if spec.attack else "") + "---|" + ("---|" if spec.attack else "") + "---|"]
    for method, entry in summary.items():
        p = entry["chosen"]
        cells = [method, _settings(p["params"]), _pm(p, "forget_score"), _pm(p, "alignment")]
        if spec.attack:
            cells.append(_pm(p, "asr") + _unconverged_mark(p))
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
    every = spec.pick == "every-seed"
    lines += ["", "## Every held-out front point", "",
              "| method | trial | settings |" + (" training forget / align (every seed) |" if every else "")
              + " forget ↓ | alignment ↑ | quality FD ↓" + attack + "".join(f" | ASR {n} ↓" for n in each) + " |",
              "|---|---|---|---|---|---|" + ("---|" if every else "") + ("---|" if spec.attack else "")
              + "---|" * len(each)]
    for method, points in rows.items():
        for p in points:
            trained = (f" {p['train_seeds_objectives'][0]:.3f} / {p['train_seeds_objectives'][1]:.3f} |"
                       if every else "")
            lines.append(f"| {method} | {p['trial']} | {_settings(p['params'])} |{trained} {_pm(p, 'forget_score')} | "
                         f"{_pm(p, 'alignment')} | {_pm(p, 'quality_fd')}"
                         + (f" | {_pm(p, 'asr')}" + _unconverged_mark(p) if spec.attack else "")
                         + "".join(f" | {_pm(p, 'asr_' + n)}" for n in each) + " |")
    if any(_unconverged_mark(p) for points in rows.values() for p in points):
        lines += ["", "⚠ k/n: in k of the point's n seeds an optimisation attack's loss was still falling at "
                  "its last step, so its ASR there is a lower bound: attack that seed's model "
                  "(`heldout/METHOD/trial-N/seed-S/model`) again with more steps, e.g. `diffunlearn attack MODEL "
                  "--attacks embedding --option embedding.iterations=300`."]
    lines += ["", "![held-out fronts](front.png)", ""]
    if trials:
        searched = "attack" in spec.objectives  # the trials' own (training-prompt) attack success
        lines += ["## Every search trial (training prompts, one seed)", "",
                  "| method | trial | settings | forget ↓ | alignment ↑ |"
                  + (f" ASR {label} ↓ |" if searched else "") + " front |",
                  "|---|---|---|---|---|" + ("---|" if searched else "") + "---|"]
        for method, entries in trials.items():
            done = [t for t in entries if t["state"] == "COMPLETE"]
            flags = pareto([t["values"] for t in done], _directions(spec))
            for t, flag in zip(done, flags):
                lines.append(f"| {method} | {t['root']} | {_settings(t['params'])} | {t['values'][0]:.3f} | "
                             f"{t['values'][1]:.3f} |" + (f" {t['values'][2]:.3f} |" if searched else "")
                             + f" {'✓' if flag else ''} |")
        lines.append("")
    text = "\n".join(lines)
    atomic_write_text(out / "study.md", text)
    return text


def front_plot(rows: dict[str, list[dict]], path: Path, concept: str, attack: str = "") -> None:
    """Each method's held-out front, forget against alignment; with an attack, a second panel puts
    the same points' attack success against their forget score (so a point that wins on clean prompts
    and loses under attack shows as such)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacked = bool(attack) and any("asr" in p for points in rows.values() for p in points)
    fig, axes = plt.subplots(1, 2 if attacked else 1, figsize=(12, 4.5) if attacked else (6.5, 4.5), squeeze=False)
    panels = [("alignment", "held-out alignment (higher = better)")]
    if attacked:
        panels.append(("asr", f"held-out ASR {attack} (lower = more robust)"))
    for ax, (key, label) in zip(axes[0], panels):
        for method, points in rows.items():
            pts = sorted((p for p in points if key in p), key=lambda p: p["forget_score"])
            ax.errorbar([p["forget_score"] for p in pts], [p[key] for p in pts],
                        xerr=[p.get("forget_score_std", 0) for p in pts], yerr=[p.get(f"{key}_std", 0) for p in pts],
                        marker="o", capsize=3, label=method)
        ax.axvline(FORGET_LIMIT, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("held-out forget score (lower = more forgotten)")
        ax.set_ylabel(label)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=8)
    fig.suptitle(f"each method's front, re-run on held-out prompts: '{concept}'")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _worker_env(index: int) -> dict[str, str]:
    """Worker ``index``'s environment: one torch thread, no bars, and on a machine with several GPUs
    the GPU ``index`` modulo their number (the main process, worker 0, uses the first)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", WORKER_ENV: str(index)}
    import torch

    gpus = torch.cuda.device_count()
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    return env


def _worker_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "diffunlearn.cli", *argv, "--worker"]


def run_study(spec: StudySpec, out: Path, command: str = "diffunlearn study", progress: bool = True,
              worker: bool = False, argv: list[str] | None = None) -> dict:
    """Search, re-evaluate on held-out prompts, report. With ``worker`` only the search phase runs
    (the processes that ``--workers`` starts)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would ask Optuna for its own trial; a search parallelises better by trials anyway.
        raise UserError("the study runs its trials in parallel itself; start it without `accelerate launch` and "
                        "use --workers N (on a machine with several GPUs each worker takes its own GPU)")
    spec = resolve(spec)
    space_by_method = validate(spec)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    if worker:
        search(spec, out, space_by_method, command, progress=False)
        return {}
    clock = Clock(out)
    if shares_data(space_by_method):
        ensure_data(spec, out, spec.seeds[0], progress, command)  # before workers start, so they share it
    children = []
    if spec.workers > 1:
        if argv is None:
            raise UserError("--workers needs the command line to start its workers with")
        children = [subprocess.Popen(_worker_command(argv), env=_worker_env(i), stdout=subprocess.DEVNULL)
                    for i in range(1, spec.workers)]
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
    front_plot(rows, out / "front.png", spec.concept, attack_label(spec) if spec.attack else "")
    text = report(spec, rows, summary, command, out, seconds, trials)
    result = {"command": command, "spec": dataclasses.asdict(spec),
              "spaces": {m: {k: d.describe() for k, d in s.items()} for m, s in space_by_method.items()},
              "trials": trials, "heldout": rows, "summary": summary, "seconds": seconds, "table": text}
    atomic_write_text(out / "study.json", json.dumps(result, indent=1, default=str) + "\n")
    return result
