"""``diffunlearn demo``: the main job on the embedded digit world, end to end.

Loads the committed base model, builds the paired training data once (so every method sees the same
images), unlearns the concept with each method, evaluates the base model and every result on the
held-out prompts, and writes ``summary.json``, ``report.md``, image grids and a trade-off plot.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import UnlearnConfig, build_config
from ..data.training import data_identity
from ..models import load_adapter
from ..report import image_grid, markdown_table, tradeoff_plot
from ..tasks.prompts import PromptTask
from ..utils import atomic_write_text, environment
from .attack import red_team
from .run import reuse_or_run
from .runfolder import check_out_dir

DEMO_METHODS = ("ga", "graddiff", "rg")
GRID_COLUMNS = 8


def red_team_demo(summary: dict, out: Path, cfg: UnlearnConfig, attacks: tuple[str, ...], progress: bool,
                  command: str) -> None:
    """Give every model of a demo (the base model and each method's ``out/<method>/model``) its ``asr``
    under ``attacks``, with the demo's sampler settings; reports go to ``out/attacks/<model>``."""
    for name, values in summary["methods"].items():
        model = cfg.model if name == "base" else str(out / name / "model")
        values["asr"] = red_team(model, summary["concept"], out / "attacks" / name, attacks, cfg.eval_steps,
                                 cfg.eval_guidance, progress, f"{command} (attack {name})",
                                 n=cfg.eval_prompts)


def build_method_data(task: PromptTask, adapter, folder, configs: dict[str, UnlearnConfig], out: Path,
                      progress: bool) -> dict:
    """Each method's training data. Methods whose configs agree on what decides the images
    (``data_identity``: e.g. rg's and GradDiff's own ``remain_neighbours`` for a colour) share one
    folder: ``out/data`` for the first method's settings, ``out/data-<method>`` for the first method
    of each other setting. A later folder copies the images an earlier one already holds (the same
    prompt and seed), so only the prompts that differ are sampled."""
    from ..methods import get_method

    built: dict[tuple, object] = {}
    folders: list[Path] = []
    data_of = {}
    for name, cfg in configs.items():
        key = (*data_identity(cfg), get_method(cfg.method).needs_images)
        if key not in built:
            target = out / (f"data-{name}" if folders else "data")
            built[key] = task.build(adapter, folder, cfg, target, progress, donors=folders)
            folders.append(target)
        data_of[name] = built[key]
    return data_of


def run_demo(concept: str, out: Path, methods: tuple[str, ...] = DEMO_METHODS, overrides: list[str] | None = None,
             force: bool = False, progress: bool = True, command: str = "diffunlearn demo",
             attacks: tuple[str, ...] = ()) -> dict:
    """Run the demo; returns the summary written to ``out/summary.json``.

    A method whose folder already holds a finished run with the same config is reused (an
    interrupted demo resumes), unless ``force``. With ``attacks``, the base model and every result
    are red-teamed (``out/attacks/<model>``, see ``diffunlearn attack``) and each gets ``asr``.
    """
    # Every config is validated (concept, method, overrides) before any work starts.
    configs = {m: build_config(None, overrides, base={"concept": concept, "method": m}) for m in methods}
    base_cfg: UnlearnConfig = configs[methods[0]] if methods else build_config(None, overrides, {"concept": concept})
    adapter, folder = load_adapter(base_cfg.model)  # a bad model folder fails before anything is written
    check_out_dir(out, force)
    task = PromptTask()
    data_of = build_method_data(task, adapter, folder, configs, out, progress)

    summary: dict = {"concept": concept, "methods": {}}
    evaluations = {}
    started = time.perf_counter()
    evaluation = task.evaluate(adapter, base_cfg, None, progress)
    summary["methods"]["base"] = {**evaluation.metrics(), "seconds": 0.0,
                                  "evaluation_seconds": time.perf_counter() - started}
    evaluations["base"] = evaluation
    for name in methods:
        results, evaluation, trained = reuse_or_run(task, adapter, configs[name], out / name,
                                                    f"{command} (method {name})", data_of[name], force, progress,
                                                    load_kwargs={"text_encoder": adapter.text_encoder})
        if evaluation is None:
            # Finished before an interruption: reused, re-scored only to get its pictures back.
            evaluation = task.evaluate(trained, base_cfg, data_of[name], progress)
        summary["methods"][name] = {k: results[k] for k in ("forget_score", "alignment", "alignment_per_attribute",
                                                            "quality_fd", "seconds")}
        summary["methods"][name]["training"] = results["training"]
        evaluations[name] = evaluation

    if attacks:
        red_team_demo(summary, out, base_cfg, attacks, progress, command)

    k = min(GRID_COLUMNS, base_cfg.eval_prompts)
    image_grid({n: e.forget_images[:k] for n, e in evaluations.items()},
               [c.text for c in evaluations["base"].forget_captions[:k]], out / "grid_forget.png",
               f"held-out FORGET prompts ('{concept}'): same prompts and seeds in every row")
    image_grid({n: e.remain_images[:k] for n, e in evaluations.items()},
               [c.text for c in evaluations["base"].remain_captions[:k]], out / "grid_remain.png",
               "held-out REMAIN prompts: same prompts and seeds in every row")
    tradeoff_plot(summary["methods"], out / "tradeoff.png", concept)
    summary["settings"] = {m: c.to_dict() for m, c in configs.items()}
    summary["environment"] = environment()
    report = "\n".join([
        f"# diffunlearn demo: forgetting '{concept}' in the digit world", "",
        f"Command: `{command}`", "",
        f"Held-out prompts: {base_cfg.eval_prompts} forget + {base_cfg.eval_prompts} remain, test filler "
        f"vocabulary (never used for tuning); seeds {base_cfg.eval_seed}*100000+i.", "",
        markdown_table(summary["methods"]), "",
        "Forget score: fraction of forget-prompt samples in which the oracle sees the concept. "
        "Alignment: fraction of remain-prompt samples with every requested attribute right. "
        "Quality FD: Fréchet distance of oracle features to real renders. Seconds: unlearning time."
        + (" ASR: attack success rate, the fraction of attacked samples in which the oracle sees the concept "
           "(reports with pictures in attacks/)." if attacks else ""), "",
        "![forgetting vs alignment](tradeoff.png)", "",
        "## Forget prompts", "", "![forget grid](grid_forget.png)", "",
        "## Remain prompts", "", "![remain grid](grid_remain.png)", "",
    ])
    atomic_write_text(out / "report.md", report)
    # summary.json last: its presence marks a finished demo.
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
