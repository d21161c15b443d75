"""The ``diffunlearn`` command. Thin: one short function per subcommand, each calling the library.

Usage:
  diffunlearn demo                          forget "three" in the digit world with ga, graddiff, rg
  diffunlearn demo --concept red            forget the colour red instead
  diffunlearn unlearn configs/digits-rg.yaml lr=1e-4 --out runs/my-run
  diffunlearn unlearn configs/sd-nudity.yaml model=/models/sd-v1-4 --out runs/nudity
  diffunlearn unlearn --resume runs/nudity    continue an interrupted run from its checkpoint
  diffunlearn data build configs/sd-nudity.yaml model=/models/sd-v1-4 --out data/nudity
  diffunlearn eval runs/nudity --metrics alignment,nudenet --prompts template:nudity:test:forget i2p.csv
  diffunlearn compare runs/base-eval runs/nudity runs/van-gogh --out leaderboard
  diffunlearn attack runs/demo/rg/model --concept three --attacks embedding,relearn   red-team a model
  diffunlearn sweep configs/digits-rg.yaml remain_weight=0.5,1,5 forget_cap=hinge,none --out runs/sweep
  diffunlearn study --methods rg,graddiff --concept three --trials 12 --attack embedding   fair method study
  diffunlearn demo --all-methods             every method, both embedded concepts, 3 seeds
  diffunlearn bench --preset small --json bench.json
  diffunlearn model init --preset tiny --out tiny-sd
  diffunlearn world train-base --out my-base
  diffunlearn demo --track class --classes three,seven   forget digits of the class-conditional model
  diffunlearn world train-base --track class --out my-class-base
  diffunlearn world check [MODEL]           oracle accuracy of a model on held-out prompts
  diffunlearn config model=/models/sd-v1-4   every config key: value and meaning (a YAML to start from)
  diffunlearn methods                       list the methods
  diffunlearn env                           versions, for bug reports
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from .errors import UserError


def _main_process() -> bool:
    """False on the other processes of an ``accelerate launch`` job, which print nothing."""
    return os.environ.get("RANK", "0") == "0"


def _emit(text: str) -> None:
    """The command's result on stdout (JSON or a table, nothing else, so it can be piped)."""
    if _main_process():
        print(text)


def _note(text: str) -> None:
    """Human notes ("wrote X") on stderr, so stdout stays machine-readable."""
    if _main_process():
        print(text, file=sys.stderr)


def _rerun_hint(args: argparse.Namespace, out: Path) -> str:
    """The command that continues an interrupted job: the same line, with ``--out`` named when its
    default would be a new timestamped folder."""
    argv = list(getattr(args, "argv", []))
    if "--out" not in argv:
        argv += ["--out", str(out)]
    return _command_line(argv) + "   (finished work is reused)"


def _command_line(argv: list[str]) -> str:
    """The command as typed, recorded as the first line of every resolved config."""
    return "diffunlearn " + " ".join(shlex.quote(a) for a in argv)


def _class_demo(args: argparse.Namespace) -> None:
    from .jobs.class_demo import CLASS_DEMO_METHODS, run_class_demo
    from .methods import get_method
    from .worlds.class_digits import CLASS_NAMES

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes else None
    for c in classes or ():
        if c not in CLASS_NAMES:
            raise UserError(f"unknown class {c!r} in --classes; use digit words such as three,seven")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else CLASS_DEMO_METHODS
    for m in methods:
        get_method(m)
    out = Path(args.out) if args.out else Path("runs") / "class-demo"
    summary = run_class_demo(out, classes, methods, not args.no_ablation, args.overrides, args.force,
                             args.keep_models, not args.quiet, args.command_line)
    _emit((out / "report.md").read_text().split("## Per class")[0].rstrip())
    _note(f"wrote {out}/summary.json and {out}/report.md ({len(summary['classes'])} classes)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .jobs.demo import DEMO_METHODS, run_demo

    for override in args.overrides:
        key = override.partition("=")[0].strip()
        if key in ("concept", "method"):
            flag = "--concept" if key == "concept" else "--methods"
            raise UserError(f"the demo sets `{key}` for every model itself; use {flag} instead of {override!r}")
    if args.jobs and (args.sequential or args.track == "class" or args.all_methods):
        raise UserError("--jobs belongs to the text demo; the leaderboard, the class track and --sequential run "
                        "their models one after another (pass threads=N to size each run)")
    if args.sequential:
        if args.track == "class" or args.all_methods or args.attacks:
            raise UserError("--sequential is a text-track demo of its own; drop --track class, --all-methods and "
                            "--attacks")
        from .jobs.sequential import run_sequential
        from .methods import get_method

        methods = [m.strip() for m in (args.methods or "rg,graddiff").split(",") if m.strip()]
        for m in methods:
            get_method(m)
        concepts = [c.strip() for c in args.sequential.split(",") if c.strip()]
        out = Path(args.out) if args.out else Path("runs") / ("sequential-" + "-".join(concepts))
        _emit(run_sequential(out, concepts, methods, args.overrides, protect=args.protect, force=args.force,
                             progress=not args.quiet))
        _note(f"wrote {out}/sequential.md, sequential.png and summary.json")
        return None
    if args.protect:
        raise UserError("--protect belongs to --sequential (e.g. --sequential three,seven,red --protect)")
    if args.track == "class":
        if args.concept != "three" or args.all_methods or args.attacks:
            raise UserError("--concept, --all-methods and --attacks belong to the text track; the class track "
                            "takes its targets from --classes (e.g. --classes three,seven)")
        return _class_demo(args)
    if args.classes or args.no_ablation or args.keep_models:
        raise UserError("--classes, --no-ablation and --keep-models belong to the class track; add --track class")
    attacks = tuple(a.strip() for a in (args.attacks or "").split(",") if a.strip())
    if attacks:
        from .attacks import build_attacks

        build_attacks(list(attacks))  # unknown names fail before any training
    if args.all_methods:
        from .jobs.leaderboard import CONCEPTS, LEADERBOARD_METHODS, run_leaderboard
        from .worlds.digits import COLOURS, DIGITS

        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        concepts = tuple(c.strip() for c in args.concepts.split(",") if c.strip()) if args.concepts else CONCEPTS
        for c in concepts:
            if c not in DIGITS + COLOURS:
                raise UserError(f"unknown concept {c!r} in --concepts; use digit or colour words such as three,red")
        methods = LEADERBOARD_METHODS
        if args.methods:
            methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        from .methods import get_method

        for m in methods:
            get_method(m)
        out = Path(args.out) if args.out else Path("runs") / "leaderboard"
        _emit(run_leaderboard(out, methods, concepts, seeds, args.overrides, args.force, not args.quiet,
                              args.command_line, attacks))
        _note(f"wrote {out}/leaderboard.md")
        return

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else DEMO_METHODS
    from .methods import get_method

    for m in methods:
        get_method(m)
    out = Path(args.out) if args.out else Path("runs") / f"demo-{args.concept}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.resume_hint = _rerun_hint(args, out)
    if args.jobs < 0:
        raise UserError(f"--jobs must be 0 (auto) or a positive number of processes, got {args.jobs}")
    summary = run_demo(args.concept, out, methods, args.overrides, args.force, not args.quiet, args.command_line,
                       attacks, jobs=args.jobs)
    from .report import markdown_table

    _emit(markdown_table(summary["methods"]))
    _note(f"wrote {out}/summary.json and {out}/report.md")


def _config_args(args: argparse.Namespace):
    from .config import build_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]  # no config file given, only overrides
    return build_config(config, overrides)


def cmd_unlearn(args: argparse.Namespace) -> None:
    from .config import build_config

    if args.resume:
        if args.config or args.overrides or args.out:
            raise UserError("--resume RUN takes the run's own config.yaml; drop the config, key=value and --out "
                            "arguments (or start a new run without --resume)")
        out = Path(args.resume)
        if (out / "prompts.json").is_file() and not (out / "environment.json").is_file():
            raise UserError(f"{out} is a `data build` folder, not a run; start a run on it with "
                            f"`diffunlearn unlearn data_dir={out} --out RUN`")
        if not (out / "config.yaml").is_file() or not (out / "environment.json").is_file():
            raise UserError(f"{out} is not a run folder (it lacks config.yaml or environment.json); pass the --out "
                            "folder of the interrupted run")
        cfg = build_config(out / "config.yaml")
    else:
        cfg = _config_args(args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.method}-{cfg.concept}-{stamp}"
    from .families import check_model_folder

    check_model_folder(cfg.model)  # a mistyped folder fails at once, before the imports below
    from .jobs.run import run_unlearning  # after the config is checked: it imports torch and diffusers

    args.resume_hint = _command_line(["unlearn", "--resume", str(out)])
    if not cfg.checkpoint_every:
        args.resume_hint += " (no checkpoints: it reuses the finished training images, but training starts over)"
    results = run_unlearning(cfg, out, args.force, args.command_line, not args.quiet, resume=bool(args.resume))
    shown = ("forget_score", "forget_scores", "alignment", "quality_fd", "seconds")
    if results:  # the main process (the others return {})
        _emit(json.dumps({k: results[k] for k in shown if k in results} | {"training": results["training"]},
                         indent=2))
    _note(f"wrote {out}")


def cmd_data_build(args: argparse.Namespace) -> None:
    from .jobs.data_build import build_data

    cfg = _config_args(args)
    out = Path(args.out) if args.out else Path("data") / f"{cfg.concept}-{cfg.diversity}"
    _check_output_folder(out)
    summary = build_data(cfg, out, not args.quiet, args.command_line)
    if summary:
        _emit(json.dumps(summary, indent=2))
        _note(f"wrote {out}; train with data_dir={out}")


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device auto or cpu")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def cmd_eval(args: argparse.Namespace) -> None:
    from .jobs.suite import SamplerSettings, evaluate

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    options = _metric_options(args)
    sampler = None
    if args.steps is not None or args.guidance is not None or args.seed is not None:
        if None in (args.steps, args.guidance, args.seed):
            raise UserError("--steps, --guidance and --seed go together; pass all three or none "
                            "(none = the run's own evaluation settings or the model's defaults)")
    _check_sampler_flags(args)
    if args.steps is not None:
        sampler = SamplerSettings(args.steps, args.guidance, args.seed, args.resolution, args.batch_size)
    target = Path(args.target)
    out = Path(args.out) if args.out else (target / "eval" if (target / "config.yaml").is_file()
                                           else Path("evals") / f"{target.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_output_folder(out)
    args.resume_hint = _rerun_hint(args, out)
    results = evaluate(args.target, metrics, args.prompts, out, options, sampler, args.force, not args.quiet,
                       args.command_line, args.device)
    if results:
        _emit(json.dumps(results["metrics"], indent=2))
        _note(f"wrote {out}")


def cmd_attack(args: argparse.Namespace) -> None:
    from .jobs.attack import AttackJob, run_attack_job

    _check_sampler_flags(args)
    target = Path(args.target)
    out = Path(args.out) if args.out else (target / "attack" if (target / "config.yaml").is_file()
                                           else Path("attacks") / f"{target.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_output_folder(out)
    args.resume_hint = _rerun_hint(args, out)
    job = AttackJob(target=args.target, attacks=[a.strip() for a in args.attacks.split(",") if a.strip()],
                    concept=args.concept or "", images=args.images or "",
                    metrics=[m.strip() for m in (args.metrics or "").split(",") if m.strip()],
                    prompts=args.prompts or "", n=args.n, options=list(args.option or []), neutral=args.neutral,
                    steps=args.steps, guidance=args.guidance, seed=args.seed, device=args.device,
                    baseline=args.baseline or "")
    results = run_attack_job(job, out, _metric_options(args), args.force, not args.quiet, args.command_line)
    shown = {"clean": {m: s["forget"]["asr"] for m, s in results["metrics"].items()},
             "attacks": results["attacks"], "skipped": results["skipped"]}
    if "baseline" in results:
        shown["baseline"] = results["baseline"]
    _emit(json.dumps(shown, indent=2))
    _note(f"wrote {out}/results.json and {out}/report.md")


def _check_sampler_flags(args: argparse.Namespace) -> None:
    """Refuse sampler and batch flags that would give a result that lies (0 steps, NaN guidance, ...)."""
    import math

    problems = []
    if getattr(args, "steps", None) is not None and args.steps < 1:
        problems.append(f"--steps must be a positive integer (sampler steps), got {args.steps}")
    guidance = getattr(args, "guidance", None)
    if guidance is not None and (not math.isfinite(guidance) or guidance < 0):
        problems.append(f"--guidance must be a finite number >= 0, got {guidance}")
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        problems.append(f"--batch-size must be a positive integer, got {args.batch_size}")
    if getattr(args, "resolution", 0) < 0:
        problems.append(f"--resolution must be 0 (the model's default) or a positive side, got {args.resolution}")
    if problems:
        raise UserError("; ".join(problems))


def _check_output_file(path: Path, force: bool) -> None:
    """Before hours of work: the folder of an output file exists, and the file is not overwritten silently."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file path such as {path / 'result.json'}")
    if not path.parent.is_dir():
        raise UserError(f"the folder {path.parent} of --out {path} does not exist; create it first or choose "
                        "another path")
    if path.exists() and not force:
        raise UserError(f"{path} already exists; choose another --out or pass --force to replace it")


def _check_output_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a folder path")


def _metric_options(args: argparse.Namespace):
    from .evaluate.base import MetricOptions

    return MetricOptions(
        clip_model=args.clip_model, nudenet_threshold=args.nudenet_threshold, feature=args.feature,
        reference=args.reference or "", classes=tuple(c.strip() for c in (args.classes or "").split(",") if c.strip()),
        target_class=args.target_class or "", classifier=args.classifier or "", concept=args.concept or "",
        batch_size=args.batch_size, cache_dir=args.cache_dir or str(Path.home() / ".cache" / "diffunlearn"),
        device=_device(getattr(args, "device", "auto")))


def _items(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def cmd_sweep(args: argparse.Namespace) -> None:
    """``sweep CONFIG key=v1,v2`` is the grid form of ``study`` (one engine, kept for old scripts)."""
    from .jobs.study import grid_study

    if args.force:
        raise UserError("--force is gone with the old sweep: a finished point is reused; delete its folder (or the "
                        "sweep's) or choose another --out to run it again")
    metrics = _items(args.metrics)
    spec = grid_study(args.config, list(args.overrides), front=10**6, workers=args.workers, metrics=metrics,
                      prompts=tuple(args.prompts or ()), search_prompts=tuple(args.search_prompts or ()),
                      metric_options=_metric_options(args) if metrics else None)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    _note(f"sweep = study --sampler grid: {len(spec.methods)} method(s), grid {' '.join(spec.space) or '-'}, "
          f"every front point re-run on held-out prompts")
    _study(args, spec, out)


def cmd_study(args: argparse.Namespace) -> None:
    from .jobs.study import StudySpec, resolve

    try:
        seeds = tuple(int(s) for s in _items(args.seeds))
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    overrides, config = list(args.overrides), ""
    if overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
        if not Path(config).is_file():
            raise UserError(f"config file {config} not found; give a YAML config first, or only key=value overrides")
    metrics = _items(args.metrics)
    spec = StudySpec(methods=_items(args.methods), concept=args.concept or "", overrides=tuple(overrides),
                     config=config, space=tuple(args.space or ()), sampler=args.sampler, trials=args.trials,
                     seeds=seeds, front=args.front, objectives=_items(args.objectives), attack=args.attack or "",
                     storage=args.storage or "", workers=args.workers, sampler_seed=args.sampler_seed,
                     pick=args.pick, metrics=metrics, prompts=tuple(args.prompts or ()),
                     search_prompts=tuple(args.search_prompts or ()),
                     metric_options=_metric_options(args) if metrics else None)
    out = Path(args.out) if args.out else Path("runs") / f"study-{resolve(spec).concept}"
    _study(args, spec, out)


def _study(args: argparse.Namespace, spec, out: Path) -> None:
    from .jobs.study import run_study

    _check_output_folder(out)
    args.resume_hint = _rerun_hint(args, out)
    result = run_study(spec, out, args.command_line, not args.quiet, worker=args.worker, argv=args.argv)
    if result:
        _emit(result["table"])
        _note(f"wrote {out}/study.md, study.json and front.png (storage {out}/study.db)")


def cmd_compare(args: argparse.Namespace) -> None:
    from .jobs.compare import compare

    out = Path(args.out)
    _check_output_folder(out)
    _emit(compare([Path(r) for r in args.runs], out))
    _note(f"wrote {out}/leaderboard.md")


def cmd_bench(args: argparse.Namespace) -> None:
    from .jobs.bench import BENCH_METHODS, bench_model_folder, bench_table, run_bench, temporary_workdir

    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else BENCH_METHODS
    if args.json:
        _check_output_file(Path(args.json), force=True)
    with temporary_workdir() as work:
        model = bench_model_folder(args.preset, args.model, Path(work),
                                   dtype=None if args.mixed_precision == "no" else args.mixed_precision)
        results = run_bench(model, methods, args.batch_size, args.steps, args.warmup, args.mixed_precision,
                            args.selection, args.device, args.gradient_checkpointing, not args.quiet,
                            optimizer=args.optimizer, offload_encoders=args.offload_encoders,
                            lora_rank=args.lora_rank, lora_targets=args.lora_targets, concepts=args.concepts,
                            lora_base_dtype=args.lora_base_dtype)
    _emit(bench_table(results))
    if args.json:
        from .utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(
            {m: {"step_seconds": r["step_seconds"], "peak_memory_mb": r["peak_memory_mb"]} for m, r in results.items()},
            indent=2) + "\n")
        _note(f"wrote {args.json}")


def cmd_model_init(args: argparse.Namespace) -> None:
    from .models.presets import PRESETS, init_pipeline

    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    out = Path(args.out)
    _check_output_folder(out)
    if (out / "config.yaml").is_file() or (out / "summary.json").is_file():
        raise UserError(f"{out} is a run or demo folder; write the model to a folder of its own")
    if (out / "model_index.json").exists() and not args.force:
        raise UserError(f"{out} already holds a model; choose another --out or pass --force")
    init_pipeline(args.preset, out, seed=args.seed, dtype=args.dtype, device=args.device)
    _note(f"wrote a random-weight {args.preset} diffusers pipeline to {out}")


def cmd_train_base(args: argparse.Namespace) -> None:
    from .worlds.base_model import train_base

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}; omit it for the default")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.init and args.track == "text":
        from .config import model_kind

        if model_kind(args.init) != "pixel" or not (Path(args.init) / "unet" / "config.json").is_file():
            raise UserError(f"--init {args.init} is not a digit-world model folder; pass one written by "
                            "`diffunlearn world train-base` or a digit-world run's model/")
    out = Path(args.out)
    _check_output_folder(out)
    if (out / "config.yaml").is_file() or (out / "summary.json").is_file():
        raise UserError(f"{out} is a run or demo folder; write the model to a folder of its own")
    if args.resume:
        return _resume_train_base(args, out)
    if (out / "training.json").exists() and not args.force:
        raise UserError(f"{out} already holds a trained base model; choose another --out or pass --force")
    if (out / "checkpoint").exists() and not args.force:
        raise UserError(f"{out} holds an interrupted training; continue it with `diffunlearn world train-base "
                        f"--out {out} --resume` or pass --force to start over")
    if args.exclude:
        from .worlds.digits import concept_attribute

        try:
            concept_attribute(args.exclude)
        except ValueError as e:
            raise UserError(f"--exclude: {e}") from None
    if args.track == "class":
        if args.init or args.exclude:
            raise UserError("--init and --exclude apply to the text track only; drop them or use --track text")
        from .worlds.class_digits import train_class_base

        steps = 2500 if args.steps is None else args.steps
        args.resume_hint = _command_line(["world", "train-base", "--track", "class", "--out", str(out), "--resume"])
        final = train_class_base(out, steps=steps, batch_size=args.batch_size, seed=args.seed,
                                 progress=not args.quiet)
        _emit(json.dumps(final, indent=2))
        return
    steps = 6000 if args.steps is None else args.steps
    args.resume_hint = _command_line(["world", "train-base", "--out", str(out), "--resume"])
    final = train_base(out, steps=steps, batch_size=args.batch_size, seed=args.seed,
                       init=Path(args.init) if args.init else None, progress=not args.quiet, exclude=args.exclude)
    _emit(json.dumps(final, indent=2))


def _resume_train_base(args: argparse.Namespace, out: Path) -> None:
    """``world train-base --out OUT --resume``: the recipe's arguments come from the checkpoint."""
    from .core.checkpoints import read_recipe_state

    if args.steps is not None or args.init or args.exclude or args.force:
        raise UserError("--resume continues with the interrupted training's own settings; drop --steps, --init, "
                        "--exclude and --force")
    state = read_recipe_state(out)
    if state is None:
        done = " (it finished: its model is there)" if (out / "training.json").is_file() else ""
        raise UserError(f"{out} has no checkpoint to resume{done}; start a training with `diffunlearn world "
                        "train-base --out FOLDER`")
    if state.get("track", "text") != args.track:
        raise UserError(f"{out} holds an interrupted {state.get('track')}-track training; add "
                        f"--track {state.get('track')}")
    args.resume_hint = _command_line(["world", "train-base", *(["--track", "class"] if args.track == "class" else []),
                                      "--out", str(out), "--resume"])
    a = state["args"]
    if args.track == "class":
        from .worlds.class_digits import train_class_base

        final = train_class_base(out, steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"], seed=a["seed"],
                                 uncond_prob=a["uncond_prob"], progress=not args.quiet, resume=True)
    else:
        from .worlds.base_model import train_base

        final = train_base(out, steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"], seed=a["seed"],
                           pool_size=a["pool_size"], uncond_prob=a["uncond_prob"],
                           init=Path(a["init"]) if a["init"] else None, progress=not args.quiet,
                           exclude=a["exclude"], resume=True)
    _emit(json.dumps(final, indent=2))


def cmd_train_oracle(args: argparse.Namespace) -> None:
    from .worlds.oracle import heldout_accuracy, save_oracle, train_oracle

    if args.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {args.steps}")
    _check_output_file(Path(args.out), args.force)

    model = train_oracle(steps=args.steps, seed=args.seed, progress=not args.quiet)
    acc = heldout_accuracy(model)
    save_oracle(model, args.out)
    _emit(json.dumps({"heldout_accuracy": acc, "path": str(args.out)}, indent=2))


def cmd_check(args: argparse.Namespace) -> None:
    from .worlds.base_model import check_base

    _emit(json.dumps(check_base(args.model, n=args.n, guidance=args.guidance, split=args.split,
                                progress=not args.quiet), indent=2))


def cmd_world_render(args: argparse.Namespace) -> None:
    from .evaluate.world import write_reference_renders
    from .worlds.digits import COLOURS, DIGITS

    if args.concept not in DIGITS + COLOURS:
        raise UserError(f"unknown concept {args.concept!r}: the digit world has the digits {', '.join(DIGITS)} and "
                        f"the colours {', '.join(COLOURS)}")
    out = Path(args.out)
    _check_output_folder(out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UserError(f"{out} is not empty; mixing these renders with its images would give a mixed fid/kid "
                        "reference; choose an empty --out or pass --force to replace its images")
    if args.force and out.is_dir():
        for old in out.glob("*.png"):
            old.unlink()
    count = write_reference_renders(args.concept, out, args.n, args.split, args.seed, args.copies)
    _note(f"wrote {count} renders to {args.out}; use them with `diffunlearn eval ... --metrics fid --feature oracle "
          f"--reference {args.out}`")


def cmd_config(args: argparse.Namespace) -> None:
    from .config import commented_yaml

    _emit(commented_yaml(_config_args(args)).rstrip())


def cmd_methods(args: argparse.Namespace) -> None:
    from .methods import METHODS

    for m in METHODS.values():
        keys = ", ".join(m.settings) or "none beyond lr and steps"
        _emit(f"{m.name:12s} {m.summary}\n{'':12s} settings: {keys}")


def cmd_env(args: argparse.Namespace) -> None:
    from .utils import environment

    _emit(json.dumps(environment(), indent=2))


def _metric_flags(p: argparse.ArgumentParser, study: bool = False) -> None:
    """The metric settings; a study takes its concept from --concept and its device from the config."""
    p.add_argument("--clip-model", default="laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
                   help="CLIP folder or hub id for alignment/classifier/clip features")
    p.add_argument("--nudenet-threshold", type=float, default=0.6,
                   help="NudeNet detection score above which an exposed class counts (the paper's 0.6)")
    p.add_argument("--feature", choices=("clip", "oracle", "inception"), default="clip", help="fid/kid features")
    p.add_argument("--reference", default=None, help="folder of real images for fid/kid")
    p.add_argument("--classes", default=None, help="comma-separated class names for the classifier metric")
    p.add_argument("--target-class", default=None, help="the forgotten class (classifier metric)")
    p.add_argument("--classifier", default=None, help="image-classifier folder (default: zero-shot CLIP)")
    if not study:
        p.add_argument("--concept", default=None, help="digit-world concept for the oracle metric")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default ~/.cache/diffunlearn)")
    if not study:
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where models and metrics run; auto = CUDA when present")


def _study_scoring_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", default=None, help="Stable Diffusion: `eval` metrics that score every run "
                   "(e.g. alignment,nudenet)")
    p.add_argument("--prompts", nargs="+", default=None, metavar="SPEC", help="Stable Diffusion: held-out prompt "
                   "sets of the report (e.g. template:nudity:test:forget template:nudity:test:remain)")
    p.add_argument("--search-prompts", nargs="+", default=None, metavar="SPEC", help="Stable Diffusion: the sets "
                   "the search tunes on (default: the train split of each template set in --prompts)")
    p.add_argument("--batch-size", type=int, default=8, help="metric batch size")
    _metric_flags(p, study=True)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default, unless the default is empty or already said.
    (argparse's ArgumentDefaultsHelpFormatter also prints "(default: None)" and "(default: False)".)"""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (``--all-method`` must not silently mean ``--all-methods``); defaults in
    the help. Subcommand parsers are made by ``type(parser)``, so they inherit this."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("diffunlearn")
    except md.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from .config import EMBEDDED

    parser = _Parser(prog="diffunlearn", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version", version=f"diffunlearn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the main job on the embedded digit world")
    p.add_argument("--concept", default="three", help="digit or colour word to forget (default: three)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: ga,graddiff,rg)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-CONCEPT-TIME)")
    p.add_argument("--force", action="store_true", help="replace a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=0, help="processes that train and score the demo's models side by "
                   "side (default 0 = auto: one per thread torch would use, one thread each)")
    p.add_argument("--all-methods", action="store_true",
                   help="the leaderboard: every method on both concepts over --seeds (default out runs/leaderboard)")
    p.add_argument("--seeds", default="0,1,2", help="with --all-methods: comma-separated seeds")
    p.add_argument("--concepts", default=None, help="with --all-methods: comma-separated (default three,red)")
    p.add_argument("--attacks", default=None, help="red-team the base model and every result with these attacks "
                   "(e.g. embedding,relearn; see `diffunlearn attack`) and add their ASR columns")
    p.add_argument("--sequential", default=None, metavar="C1,C2,...",
                   help="serve these concepts one request after another and score every concept after each "
                   "(methods: --methods, default rg,graddiff)")
    p.add_argument("--protect", action="store_true", help="with --sequential: also run each method keeping the "
                   "earlier concepts in its forget objective (METHOD+protect)")
    p.add_argument("--track", choices=("text", "class"), default="text",
                   help="class: Table 1/3 on the class-conditional digits model (default out runs/class-demo)")
    p.add_argument("--classes", default=None, help="with --track class: target digits (default: all ten)")
    p.add_argument("--no-ablation", action="store_true", help="with --track class: skip the two-class remain set")
    p.add_argument("--keep-models", action="store_true", help="with --track class: save every unlearned model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("unlearn", help="run one unlearning job from a config file")
    p.add_argument("config", nargs="?", default=None, help="YAML config (omit for the defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--out", default=None, help="run folder (default: runs/METHOD-CONCEPT-TIME)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the interrupted run in RUN from its "
                   "newest checkpoint (set checkpoint_every when starting it)")
    p.add_argument("--force", action="store_true", help="replace a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_unlearn)

    d = sub.add_parser("data", help="build training image sets with the base model")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = dsub.add_parser("build", help="generate the forget and remain images of a config (resumable, shardable)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (omit for the defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--out", default=None, help="data folder (default: data/CONCEPT-DIVERSITY)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_build)

    p = sub.add_parser("eval", help="generate images for prompt sets and score them (resumable, shardable)")
    p.add_argument("target", metavar="MODEL_OR_RUN", help="a run folder, a model folder or a hub id")
    p.add_argument("--metrics", required=True, help="comma-separated: alignment, nudenet, fid, kid, classifier, oracle")
    p.add_argument("--prompts", nargs="+", required=True, metavar="SPEC",
                   help="prompt files (.json, .txt, .csv in the I2P layout), template:CONCEPT[:SPLIT[:forget|remain"
                        "[:N]]] (Stable Diffusion), world:CONCEPT[:SPLIT[:forget|remain[:N]]] (digit world), "
                        "class:NAME[,NAME...][:N] (class-conditional models), or NAME=SPEC for any of these under "
                        "another set name (e.g. remain-train=template:nudity:train:remain:800)")
    p.add_argument("--out", default=None, help="evaluation folder (default: RUN/eval, or evals/NAME-TIME)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (with --guidance and --seed)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed*100000+i unless the file gives seeds")
    p.add_argument("--resolution", type=int, default=0, help="image side; 0 = the model's default")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampler and metric call")
    _metric_flags(p)
    p.add_argument("--force", action="store_true", help="redo a finished evaluation (finished images are reused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    from .attacks import ATTACKS

    p = sub.add_parser("attack", help="red-team a model or run: attack success rate of each attack (resumable)")
    p.add_argument("target", metavar="MODEL_OR_RUN", help="a run folder, a model folder, embedded:digits or a hub id")
    p.add_argument("--attacks", required=True, help=f"comma-separated: {', '.join(ATTACKS)}")
    p.add_argument("--images", default=None, help="folder of images of the concept (default: the run's forget set, "
                   "or ground-truth renders in the digit worlds)")
    p.add_argument("--metrics", default=None, help="detectors: oracle, nudenet, classifier (default: by concept)")
    p.add_argument("--prompts", default=None, metavar="SPEC", help="held-out forget prompts (default: the "
                   "built-in test set of the concept)")
    p.add_argument("--n", type=int, default=64, help="attacked samples per attack (and clean samples)")
    p.add_argument("--option", action="append", metavar="ATTACK.KEY=VALUE",
                   help="attack setting, e.g. relearn.steps=5,10,30 or embedding.iterations=300 (repeatable)")
    p.add_argument("--neutral", default=None, help="prompt the embedding inversion starts from")
    p.add_argument("--baseline", default=None, metavar="MODEL|base", help="attack this model the same way too "
                   "(the ceiling; 'base' = a run's own base model) and report it beside each ASR")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's or model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: the run's or model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' own randomness")
    p.add_argument("--out", default=None, help="report folder (default: RUN/attack, or attacks/NAME-TIME)")
    p.add_argument("--batch-size", type=int, default=32, help="metric batch size")
    _metric_flags(p)
    p.add_argument("--force", action="store_true", help="redo every attack")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("sweep", help="the grid form of `study` (study --sampler grid): a grid of one config, "
                       "searched on training prompts, its front re-run on held-out prompts (resumable)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (or the first key=v1,v2 entry)")
    p.add_argument("overrides", nargs="*", metavar="key=v1,v2", help="grid entries (method=a,b compares methods); "
                   "one value = fixed override")
    p.add_argument("--out", default=None, help="study folder (default: runs/sweep-TIME)")
    _study_scoring_flags(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the grid (one thread each)")
    p.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # refused with what to do instead
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep)

    from .jobs.study import SAMPLERS

    p = sub.add_parser("study", help="compare methods fairly: search each method's knobs (Optuna) on training "
                       "prompts, re-run each front on held-out prompts over seeds (resumable)")
    p.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value", help="a YAML config first (optional), "
                   "then fixed config values for every run (e.g. steps=100); a fixed key is not searched")
    p.add_argument("--methods", default="rg,rgd,graddiff,ga", help="comma-separated methods to compare")
    p.add_argument("--concept", default=None, help="the concept to forget (default: the config's, e.g. three)")
    p.add_argument("--space", action="append", metavar="[METHOD.]KEY=LOW:HIGH[:log][:int]|a,b",
                   help="search this key (for every method, or one) instead of or beside the defaults "
                        "(lr, remain_weight, margin, esd_eta, saliency_fraction); repeatable")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (grid needs lists of values)")
    p.add_argument("--trials", type=int, default=12, help="finished search trials per method")
    p.add_argument("--seeds", default="0,1,2", help="training seeds of the held-out re-runs")
    p.add_argument("--front", type=int, default=3, help="front points per method re-run on held-out prompts")
    p.add_argument("--objectives", default="forget,alignment", help="forget,alignment or forget,alignment,attack")
    p.add_argument("--attack", default=None, help="attack every held-out run with this attack (e.g. embedding) "
                   "and report its success rate; with --objectives ...,attack also a search objective; several "
                   "(embedding,relearn): each reported, the worst one the objective")
    p.add_argument("--storage", default=None, help="Optuna RDB URL shared by workers on several machines "
                   "(default: sqlite in --out)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the search (one thread each)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--pick", choices=("auto", "first-seed", "every-seed"), default="auto",
                   help="the training scores the tuning rule reads: the search trial's (first seed), or the mean "
                        "over every held-out seed's model scored on the training prompts (digit world); auto: "
                        "every-seed on the digit world with --front > 1 and no attack objective, else first-seed")
    _study_scoring_flags(p)
    p.add_argument("--out", default=None, help="study folder (default: runs/study-CONCEPT)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("compare", help="evaluations side by side: table, leaderboard.md, plot, image grid")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run, eval or attack folders (a run's eval/ and "
                   "attack/ are found by themselves)")
    p.add_argument("--out", default="leaderboard", help="folder for leaderboard.md, tradeoff.png, grid.png")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="per-step time and peak memory of ga, graddiff, rg and rg-flat")
    p.add_argument("--model", default=None, help="model folder (Stable Diffusion or digit world) to benchmark")
    p.add_argument("--preset", default=None, help="or a random-weight preset (`diffunlearn model init --help` lists "
                   "them: tiny, small, sd15, sdxl-small, sd3-small, flux-small, sdxl, flux-dev...; none: tiny)")
    p.add_argument("--methods", default=None, help="comma-separated (default: ga,graddiff,rg,rg-flat)")
    p.add_argument("--batch-size", type=int, default=8, help="paired images per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="autocast dtype")
    p.add_argument("--selection", default="full", help="trainable parameters: full, cross-attention, "
                   "non-cross-attention or lora")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA when present")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--optimizer", choices=("adam", "adam8bit"), default="adam",
                   help="adam8bit = bitsandbytes' 8-bit Adam (the 8bit extra)")
    p.add_argument("--offload-encoders", action="store_true",
                   help="text encoders wait on the CPU between encodings (diffusers families)")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank with --selection lora")
    p.add_argument("--concepts", type=int, default=1, help="k concepts at once: k forget gradients a step (1-4)")
    p.add_argument("--lora-targets", default="", help="modules LoRA wraps (default: to_q,to_k,to_v,to_out.0)")
    p.add_argument("--lora-base-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="with --selection lora: the frozen base's dtype (match --mixed-precision); adapters stay fp32")
    p.add_argument("--json", default=None, metavar="FILE", help="also write {method: {step_seconds, peak_memory_mb}}")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)

    m = sub.add_parser("model", help="make model folders")
    msub = m.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    p = msub.add_parser("init", help="a diffusers pipeline (SD, SDXL, SD3, FLUX) with random weights from a "
                        "preset config")
    p.add_argument("--preset", required=True, help="tiny, small, sd15, sd21; sdxl-tiny, sdxl-small, sdxl; sd3-tiny, "
                   "sd3-small, sd3-medium, sd35-large; flux-tiny, flux-small, flux-dev")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="precision of the saved weights (flux-dev: 67 GB in fp32, 33 GB in bf16)")
    p.add_argument("--device", default=None, help="build and initialise the weights there, e.g. cuda (seconds "
                   "instead of minutes for the billion-parameter presets)")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=cmd_model_init)

    w = sub.add_parser("world", help="the embedded digit world: train or check its models")
    wsub = w.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND")
    p = wsub.add_parser("train-base", help="train the digit world's base model from scratch")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--track", choices=("text", "class"), default="text",
                   help="class: the class-conditional digits model (embedded:digits-class)")
    p.add_argument("--steps", type=int, default=None, help="default 6000 (text) or 2500 (class)")
    p.add_argument("--batch-size", type=int, default=64, help="fresh renders per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, captions and renders")
    p.add_argument("--init", default=None, help="continue from the UNet of this model folder")
    p.add_argument("--exclude", default=None, metavar="CONCEPT",
                   help="train without this digit or colour: the exact-unlearning gold standard")
    p.add_argument("--resume", action="store_true", help="continue the interrupted training in --out from its "
                   "checkpoint (written every 250 steps), with its own settings")
    p.add_argument("--force", action="store_true", help="replace a trained model or an interrupted training in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_base)
    p = wsub.add_parser("train-oracle", help="train the oracle attribute classifier")
    p.add_argument("--out", required=True, help="safetensors file to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--steps", type=int, default=4000, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and renders")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_oracle)
    p = wsub.add_parser("check", help="oracle accuracy of a model's samples on held-out prompts")
    p.add_argument("model", nargs="?", default=EMBEDDED, help=f"model folder or embedded name (default: {EMBEDDED})")
    p.add_argument("--n", type=int, default=1000, help="random prompts to sample and read")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: the world's 4.0)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="prompt vocabulary: held-out or tuning")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check)
    p = wsub.add_parser("render", help="ground-truth renders of held-out remain captions (an fid/kid reference)")
    p.add_argument("--concept", default="three", help="the forgotten concept (its captions are left out)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--n", type=int, default=100, help="captions (each rendered --copies times)")
    p.add_argument("--copies", type=int, default=4, help="renders per caption")
    p.add_argument("--split", choices=("test", "train"), default="test", help="caption vocabulary")
    p.add_argument("--seed", type=int, default=1, help="seed of the captions and renders")
    p.add_argument("--force", action="store_true", help="replace the renders in a non-empty --out")
    p.set_defaults(func=cmd_world_render)

    p = sub.add_parser("config", help="every config key with its value and meaning, as a YAML file to start from",
                       description="Print the resolved config (defaults, then the model's and method's recipe, then "
                       "CONFIG, then key=value) as YAML with each key's meaning. Save it and edit it: "
                       "`diffunlearn config method=graddiff > my.yaml`.")
    p.add_argument("config", nargs="?", default=None, help="YAML config to resolve (omit for the defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("methods", help="list the unlearning methods")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("env", help="print versions for bug reports")
    p.set_defaults(func=cmd_env)
    return parser




def _innermost_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)subcommand parser named by ``argv`` (``world train-base`` -> its parser)."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            if token.startswith("-") or not subs:
                continue
            break
        parser = subs[0].choices[token]
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. User errors: one line on stderr, exit code 2, no traceback."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network unless a user opts in
    # transformers, diffusers and the Hub read these when (and only if) they are first imported: a typo
    # in `key=value` is reported at once instead of after seconds of importing them just to quiet them.
    # A user's own setting wins. (diffusers' pipeline-loading bar has no variable: the Stable Diffusion
    # adapter turns it off when it loads a pipeline.)
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    # Already imported (main called from Python, e.g. a notebook or the tests): they read the variables
    # at import, so quiet them directly; this costs nothing, they are loaded.
    for library in ("transformers", "diffusers"):
        if f"{library}.utils.logging" in sys.modules:
            logging_module = sys.modules[f"{library}.utils.logging"]
            logging_module.set_verbosity_error()
            logging_module.disable_progress_bar()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides may come anywhere on the line (`unlearn CONFIG --quiet steps=1`).
        if hasattr(args, "overrides") and all(re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", e) for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            # argparse's own message and exit code 2, with the usage of the subcommand that was typed
            _innermost_parser(parser, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_line = _command_line(argv)
    args.argv = argv
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        if _main_process():
            print("\ninterrupted: the unfinished folder has no final results file, so it never looks complete; "
                  + (f"continue with: {hint}" if hint else "rerun the same command to continue (finished work is "
                     "reused)"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
