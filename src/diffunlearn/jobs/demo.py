"""``diffunlearn demo``: the main job on the embedded digit world, end to end.

Loads the committed base model, builds the paired training data once (so every method sees the same
images), unlearns the concept with each method, evaluates the base model and every result on the
held-out prompts, and writes ``summary.json``, ``report.md``, image grids and a trade-off plot.
"""

from __future__ import annotations

import json
import signal
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
    prompt and seed), so only the prompts that differ are sampled. Returns {method: (folder, data)}."""
    from ..methods import get_method

    built: dict[tuple, object] = {}
    folders: list[Path] = []
    data_of = {}
    for name, cfg in configs.items():
        key = (*data_identity(cfg), get_method(cfg.method).needs_images)
        if key not in built:
            target = out / (f"data-{name}" if folders else "data")
            built[key] = target, task.build(adapter, folder, cfg, target, progress, donors=folders)
            folders.append(target)
        data_of[name] = built[key]
    return data_of


def demo_jobs(requested: int, cfg: UnlearnConfig, items: int) -> tuple[int, int]:
    """(processes, torch threads in each) for ``--jobs``: ``requested`` > 0 is taken as asked (at most one
    process per item); 0 = auto: the thread budget (``threads=`` if set, else torch's) split over
    processes of one thread each, up to one per item. Two one-thread processes do about 1.5 times
    the work of one process at two threads on the small digit UNet (measured: 2 threads give
    1.52 times one thread), so the demo runs its models side by side instead of one after another."""
    import torch

    budget = cfg.threads or torch.get_num_threads()
    jobs = max(1, min(requested or budget, items))
    return jobs, max(1, budget // jobs)


def _ignore_interrupts(threads: int) -> None:
    """A demo worker's start: Ctrl-C is the main process's to handle (it terminates the workers), and
    each worker keeps to its share of the cores."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


def _demo_item(name: str, cfg: UnlearnConfig, eval_cfg: UnlearnConfig, folder: Path | None, data_folder: Path | None,
               force: bool, command: str, progress: bool, adapter=None, data=None):
    """One model of the demo, in this process: the base model's evaluation (``data_folder`` None),
    else the method's run (``reuse_or_run``; a reused run is re-scored for its pictures) on the data
    already built in ``data_folder``. ``adapter`` and ``data`` are the main process's when it runs
    the item itself; a worker loads both (the images are on disk by then). Returns (name, results,
    evaluation); the base model's results are its evaluation seconds."""
    task = PromptTask()
    model_folder = None
    if adapter is None:
        adapter, model_folder = load_adapter(cfg.model)
    if data_folder is None:
        started = time.perf_counter()
        evaluation = task.evaluate(adapter, eval_cfg, None, progress)
        return name, {"evaluation_seconds": time.perf_counter() - started}, evaluation
    if data is None:
        data = task.build(adapter, model_folder, cfg, data_folder, progress)
    results, evaluation, trained = reuse_or_run(task, adapter, cfg, folder, f"{command} (method {name})", data, force,
                                                progress, load_kwargs={"text_encoder": adapter.text_encoder})
    if evaluation is None:
        evaluation = task.evaluate(trained, eval_cfg, data, progress)
    return name, results, evaluation


def _run_items(items: list[tuple], jobs: int, threads: int, progress: bool) -> dict:
    """Every ``_demo_item`` (each item: its arguments, and the (adapter, data) this process would
    lend it) in ``jobs`` spawned processes, or one at a time in this one when ``jobs`` is 1.
    multiprocessing, not a library: what runs is ours, and a Pool's ``terminate`` is the clean answer
    to Ctrl-C (an unfinished run never writes its results.json, so the rerun resumes)."""
    if jobs == 1:
        found = (_demo_item(*item, progress, adapter=adapter, data=data) for item, (adapter, data) in items)
        return {name: (results, evaluation) for name, results, evaluation in found}
    import multiprocessing

    from tqdm.auto import tqdm

    found = {}
    bar = tqdm(total=len(items), desc=f"demo: {len(items)} models in {jobs} processes", disable=not progress)
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_ignore_interrupts, initargs=(threads,))
    try:
        pending = [pool.apply_async(_demo_item, (*item, False)) for item, _ in items]
        for job in pending:
            name, results, evaluation = job.get()
            found[name] = (results, evaluation)
            bar.update()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        bar.close()
    return found


def run_demo(concept: str, out: Path, methods: tuple[str, ...] = DEMO_METHODS, overrides: list[str] | None = None,
             force: bool = False, progress: bool = True, command: str = "diffunlearn demo",
             attacks: tuple[str, ...] = (), jobs: int = 1) -> dict:
    """Run the demo; returns the summary written to ``out/summary.json``.

    A method whose folder already holds a finished run with the same config is reused (an
    interrupted demo resumes), unless ``force``. With ``attacks``, the base model and every result
    are red-teamed (``out/attacks/<model>``, see ``diffunlearn attack``) and each gets ``asr``.
    ``jobs``: processes that train and score the models side by side once the data is built
    (:func:`demo_jobs`; 0 = auto).
    """
    # Every config is validated (concept, method, overrides) before any work starts.
    configs = {m: build_config(None, overrides, base={"concept": concept, "method": m}) for m in methods}
    base_cfg: UnlearnConfig = configs[methods[0]] if methods else build_config(None, overrides, {"concept": concept})
    adapter, folder = load_adapter(base_cfg.model)  # a bad model folder fails before anything is written
    check_out_dir(out, force)
    task = PromptTask()
    data_of = build_method_data(task, adapter, folder, configs, out, progress)

    summary: dict = {"concept": concept, "methods": {}}
    processes, threads = demo_jobs(jobs, base_cfg, len(methods) + 1)
    # The methods first, so that the base model's short evaluation fills a gap at the end.
    items = [((name, configs[name], base_cfg, out / name, data_of[name][0], force, command),
              (adapter, data_of[name][1])) for name in methods]
    items.append((("base", base_cfg, base_cfg, None, None, force, command), (adapter, None)))
    found = _run_items(items, processes, threads, progress)
    evaluations = {"base": found["base"][1]}
    summary["methods"]["base"] = {**evaluations["base"].metrics(), "seconds": 0.0, **found["base"][0]}
    for name in methods:
        results, evaluations[name] = found[name]
        summary["methods"][name] = {k: results[k] for k in ("forget_score", "alignment", "alignment_per_attribute",
                                                            "quality_fd", "seconds")}
        summary["methods"][name]["training"] = results["training"]
    summary["processes"] = processes

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
