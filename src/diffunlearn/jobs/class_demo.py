"""``diffunlearn demo --track class``: the paper's Table 1 and Table 3 on the embedded class-conditional
model (PAPER.md §3-4, CIFAR-10 at toy size).

Each target digit is forgotten in turn by every method, from the same data (forget set = every
training image of the class, remain set = ``remain_per_class`` images of each other class) and the
same seeds; UA, RA and FD come from the oracle (:mod:`diffunlearn.evaluate.classes`). Table 1 is the
mean ± std over the target classes. Table 3 is the diversity ablation: ``rg`` with the balanced
remain set against ``rg`` with the SAME NUMBER of remain images from only two classes (the two next
digits, target+1 and target+2 mod 10: a fixed rule, not a tuned choice).

Output folder::

    <class>/<method>/   one run per target class and method: config.yaml, metrics.jsonl,
                        data/selection.json, results.json (written last), model/ with --keep-models
    summary.json        every number, the settings and the environment
    report.md           Table 1, Table 3, per-class rows and the pictures
    grid.png            samples of every class from the base model and each method (first target)

Resumable and extendable: a run whose folder holds results.json made with the same config is
reused (``--force`` retrains), so rerunning with more ``--classes`` trains only the new runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from ..config import EMBEDDED_CLASS, UnlearnConfig, build_config
from ..errors import UserError
from ..evaluate.classes import evaluate_classes
from ..report import mean_std_table
from ..tasks.classes import ClassTask
from ..utils import atomic_write_text, environment, image_seeds
from .run import reuse_or_run

CLASS_DEMO_METHODS = ("rg", "rgd", "graddiff", "salun", "ft")
ABLATION = "rg-two-class"   # rg on the low-diversity remain set (Table 3)
FIELDS = (("ua", "UA ↑", 3), ("ra", "RA ↑", 3), ("fd", "FD ↓", 0), ("seconds", "seconds", 1))
GRID_PER_CLASS = 2


def control_classes(target: int, num_classes: int) -> tuple[int, int]:
    """The two classes of the low-diversity remain set for ``target`` (the next two, cyclically)."""
    return (target + 1) % num_classes, (target + 2) % num_classes


def class_table(rows: dict[str, list[dict]]) -> str:
    """Markdown: one row per method, mean ± std over target classes."""
    return mean_std_table(["method"], {(name,): runs for name, runs in rows.items()}, FIELDS, count="classes")


def run_class_demo(out: Path, classes: tuple[str, ...] | None = None, methods: tuple[str, ...] = CLASS_DEMO_METHODS,
                   ablation: bool = True, overrides: list[str] | None = None, force: bool = False,
                   keep_models: bool = False, progress: bool = True,
                   command: str = "diffunlearn demo --track class") -> dict:
    """Run (or reuse) every (target class, method) and write the tables; returns the summary.

    Args:
        classes: target class names (default: all ten digits).
        methods: methods of Table 1; ``ablation`` adds ``rg`` on the two-class remain set (Table 3).
        overrides: ``key=value`` config overrides applied to every run.
    """
    from ..models import load_adapter
    from ..report import image_grid
    from ..worlds.class_digits import CLASS_NAMES

    targets = tuple(classes) if classes else CLASS_NAMES
    names = list(methods) + ([ABLATION] if ablation else [])

    def config(target: str, name: str) -> UnlearnConfig:
        base = {"model": EMBEDDED_CLASS, "concept": target, "method": "rg" if name == ABLATION else name}
        if name == ABLATION:
            t = CLASS_NAMES.index(target)
            base["remain_classes"] = ",".join(CLASS_NAMES[c] for c in control_classes(t, len(CLASS_NAMES)))
        return build_config(None, overrides, base=base)

    # Every config is validated before any work starts (unknown class or method, bad override).
    configs = {(t, n): config(t, n) for t in targets for n in names}
    adapter, _ = load_adapter(EMBEDDED_CLASS)
    task = ClassTask()
    for cfg in configs.values():
        task.check(adapter, cfg)  # every data selection is checked before any training
    # A finished or interrupted demo in ``out`` is continued: finished runs with the same config are
    # reused, so rerunning with more --classes only trains what is new.
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    first = configs[(targets[0], names[0])] if names else build_config(None, overrides, {"model": EMBEDDED_CLASS})
    rows: dict[str, list[dict]] = {"base": []}
    per_class: dict[str, dict[str, dict]] = {}
    grid_models: dict[str, torch.Tensor] = {}
    grid_labels = [n for n in CLASS_NAMES for _ in range(GRID_PER_CLASS)]
    grid_seeds = image_seeds(first.eval_seed, len(grid_labels), offset=90000)

    def grid_samples(model) -> torch.Tensor:
        return model.sample(grid_labels, grid_seeds, steps=first.eval_steps, guidance=first.eval_guidance)

    grid_models["base"] = grid_samples(adapter)
    for target in targets:
        t = CLASS_NAMES.index(target)
        base_eval = evaluate_classes(adapter, t, first.eval_prompts, first.eval_seed, first.eval_steps,
                                     first.eval_guidance, progress)
        per_class[target] = {"base": {**base_eval.metrics(), "seconds": 0.0}}
        rows["base"].append(per_class[target]["base"])
        for name in names:
            cfg = configs[(target, name)]
            folder = out / target / name
            if progress:
                print(f"demo (class track): {target} with {name}", file=sys.stderr, flush=True)
            # The demo draws one grid of every method instead of each run's pictures.
            results, _, model = reuse_or_run(task, adapter, cfg, folder, f"{command} (class {target}, {name})",
                                             force=force, progress=progress, keep_model=keep_models,
                                             pictures=False, need_model=False)
            per_class[target][name] = {k: results[k] for k in ("ua", "ra", "fd", "seconds", "accuracy_per_class")}
            rows.setdefault(name, []).append(per_class[target][name])
            if target == targets[0] and model is not None:
                grid_models[name] = grid_samples(model)

    table1 = class_table({n: r for n, r in rows.items() if n != ABLATION})
    lines = [f"# diffunlearn demo (class track): forgetting each digit of `{EMBEDDED_CLASS}`", "",
             f"Command: `{command}`", "",
             f"Target classes: {', '.join(targets)}. Per run: {first.eval_prompts} samples of the forgotten class and "
             f"{first.eval_prompts} spread over the others (DDIM {first.eval_steps} steps, guidance "
             f"{first.eval_guidance}, seeds {first.eval_seed}*100000+i). Remain set: {first.remain_per_class} "
             "images of each other class.", "",
             "## Table 1: mean ± std over target classes", "", table1, "",
             "UA: fraction of forgotten-class samples the oracle does NOT read as that class (higher = forgotten). "
             "RA: oracle accuracy on the other classes' samples. FD: Fréchet distance of oracle features of those "
             "samples to real renders (compare across rows only). Seconds: unlearning time.", ""]
    if ablation and ABLATION in rows:
        balanced = f"rg (balanced: {first.remain_per_class} × {len(CLASS_NAMES) - 1} classes)"
        table3 = class_table({balanced: rows.get("rg", []),
                              "rg (two classes, same total)": rows[ABLATION]} if "rg" in rows else
                             {"rg (two classes, same total)": rows[ABLATION]})
        lines += ["## Table 3: remain-set diversity", "", table3, "",
                  "The two-class remain set uses the next two digits (target+1, target+2 mod 10).", ""]
    lines += ["## Per class", "", "| class | method | UA | RA | FD | seconds |", "|---|---|---|---|---|---|"]
    for target, by_method in per_class.items():
        for name, r in by_method.items():
            lines.append(f"| {target} | {name} | {r['ua']:.3f} | {r['ra']:.3f} | {r['fd']:.0f} | {r['seconds']:.1f} |")
    image_grid(grid_models, grid_labels, out / "grid.png",
               f"every class, same seeds in every row; forgotten: {targets[0]}")
    lines += ["", "![samples](grid.png)", ""]
    summary = {"classes": list(targets), "methods": names, "per_class": per_class,
               "table": {n: {k: statistics.fmean([r[k] for r in runs]) for k, _, _ in FIELDS}
                         for n, runs in rows.items()},
               "settings": {f"{t}/{n}": c.to_dict() for (t, n), c in configs.items()},
               "environment": environment()}
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
