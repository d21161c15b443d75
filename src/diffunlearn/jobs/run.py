"""THE job path: one method on one task's data into a self-describing run folder. ``diffunlearn
unlearn``, both demos, the leaderboard and every study trial write their runs through
:func:`run_job`.

Run folder layout::

    config.yaml        resolved config; first line = the command that reproduces it
    environment.json   library versions, device, world size
    data/              generated training images (prompts task, unless `data_dir` points at a
                       `data build` folder) or selection.json (classes task)
    metrics.jsonl      one line per optimizer step (losses, cos, projection, realised changes)
    checkpoints/       the newest resumable checkpoint (with `checkpoint_every`)
    model/             the unlearned model (diffusers layout or LoRA, safetensors) with a model card
    samples*.png       before/after pictures (Stable Diffusion and class-conditional runs)
    results.json       evaluation and training summary; written LAST, so its presence means the run finished
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..core.parallel import Parallel
from ..errors import UserError
from ..methods import get_method
from ..tasks import Task, TrainingSet, task_for
from ..utils import atomic_write_text
from .modelcard import write_model_card
from .runfolder import check_out_dir, load_for_run, save_model, training_summary, write_run_header


def run_job(task: Task, base_adapter, data: TrainingSet, cfg, out: Path, command: str, progress: bool = True,
            copy_model: bool = True, resume: bool = False, parallel: Parallel | None = None,
            base_model: str | None = None, keep_model: bool = True, pictures: bool = True, header: bool = True):
    """Unlearn ``base_adapter`` (a COPY of it when ``copy_model``) with ``cfg.method`` on ``data``,
    evaluate it as ``task`` says, and fill ``out``.

    Args:
        keep_model: save ``out/model`` with its model card (a demo that only needs the numbers
            passes False).
        pictures: the task's before/after pictures (a demo that draws its own grid passes False).
        header: write config.yaml and environment.json (``run_unlearning`` wrote them already, before
            the data).

    Returns:
        (results as written to results.json ({} on processes other than the main one), the
        task's evaluation or None, the unlearned adapter)
    """
    parallel = parallel or Parallel()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    if parallel.is_main and header and not resume:
        write_run_header(cfg, out, command, parallel, base_adapter)
    method = get_method(cfg.method)
    adapter = base_adapter.clone() if copy_model else base_adapter
    before = task.before(adapter, cfg, out, base_model or cfg.model, progress, parallel) if pictures else None
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    # early_stop_every: the task's training-side forget score, checked inside the loop (config.validate
    # allows it only where the task has a judge and the method takes steps).
    stop = {"probe": task.forget_probe(adapter, cfg, data)} if cfg.early_stop_every else {}
    history = method.apply(adapter, cfg, data.forget_x0, data.forget_cond, data.remain_x0, data.remain_cond,
                           metrics_path=out / "metrics.jsonl", progress=progress, checkpoint_dir=out / "checkpoints",
                           resume=resume, parallel=parallel, **stop)
    training = training_summary(history, time.perf_counter() - started)
    evaluation = task.evaluate(adapter, cfg, data, progress) if parallel.is_main else None
    metrics = evaluation.metrics() if evaluation is not None else None
    if pictures:
        task.pictures(before, adapter, cfg, data, out, progress, parallel)
    results: dict = {}
    if parallel.is_main:
        results = {"concept": cfg.concept, "method": cfg.method, **data.results, "seconds": training["seconds"],
                   **(metrics or {}), "training": training, "training_data": data.fingerprint()}
        if evaluation is not None:
            results["metrics"] = evaluation.as_eval_metrics()  # the `diffunlearn eval` schema, which compare reads
        lineage = [*previous_lineage(cfg.model), lineage_entry(cfg, method, out, metrics)]
        results["lineage"] = lineage
        if keep_model:
            fmt = save_model(adapter, cfg, out)
            atomic_write_text(out / "model" / LINEAGE_FILE, json.dumps(lineage, indent=2) + "\n")
            write_model_card(out / "model", cfg, fmt, base_model or cfg.model, command, data.info, training, metrics,
                             lineage=lineage)
            results["model"] = {"folder": str(out / "model"), "format": fmt}
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    parallel.barrier()
    return results, evaluation, adapter


LINEAGE_FILE = "lineage.json"  # in a run's model/: every concept removed so far, one entry per request


def previous_lineage(model: str) -> list[dict]:
    """The requests a model folder has already served (its ``lineage.json``; none for a base model)."""
    path = Path(model).expanduser() / LINEAGE_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is corrupt (not JSON); restore it or delete it to start a new lineage") from None
    return entries if isinstance(entries, list) else []


def lineage_entry(cfg, method, out: Path, metrics: dict | None) -> dict:
    """One request of a lineage: what was removed, how, from which model, and what it scored."""
    keys = ("lr", "steps", "batch_size", "selection", "seed", *method.settings)
    entry = {"concepts": cfg.concepts, "method": cfg.method, "settings": {k: getattr(cfg, k) for k in keys},
             "from_model": cfg.model, "run": str(out)}
    if metrics:
        entry["scores"] = {k: metrics[k] for k in ("forget_score", "forget_scores", "alignment") if k in metrics}
    return entry


def reuse_or_run(task: Task, base_adapter, cfg, folder: Path, command: str, data: TrainingSet | None = None,
                 force: bool = False, progress: bool = True, keep_model: bool = True, pictures: bool = True,
                 need_model: bool = True, load_kwargs: dict | None = None, model_folder: Path | None = None):
    """One run of a demo, leaderboard or any driver of many runs: the finished run in ``folder`` made
    with exactly ``cfg`` (``finished_run``; with ``need_model`` only if it kept its model; when ``data``
    is given, only if it trained on the same images: ``TrainingSet.fingerprint``), else a
    fresh :func:`run_job` on a copy of ``base_adapter``. ``data`` is built by ``task`` into
    ``folder/data`` when not given (from ``model_folder``, the base model's files, when it has them).

    Returns:
        (results, the run's evaluation or None when reused, the unlearned adapter or None when reused
        without a model); a reused model is loaded with ``load_kwargs``.
    """
    from ..models import load_adapter
    from .runfolder import finished_run

    results = None if force else finished_run(folder, cfg, need_model=need_model)
    if results is not None and data is not None and results.get("training_data") != data.fingerprint():
        # Trained on other images than ``data`` (or before runs recorded theirs, e.g. a demo from before
        # each method got its own data folder): the config alone cannot tell, so it is run again.
        results = None
    if results is not None:
        model = load_adapter(str(folder / "model"), **(load_kwargs or {}))[0] if (folder / "model").is_dir() else None
        return results, None, model
    if data is None:
        data = task.build(base_adapter, model_folder, cfg, folder / "data", progress)
    return run_job(task, base_adapter, data, cfg, folder, command, progress, keep_model=keep_model,
                   pictures=pictures)


def run_unlearning(cfg, out: Path, force: bool, command: str, progress: bool = True, resume: bool = False) -> dict:
    """``diffunlearn unlearn``: one method on one concept, in its own run folder (``resume``: continue
    the interrupted run in ``out`` from its newest checkpoint)."""
    parallel = Parallel.from_environment()
    adapter, folder = load_for_run(cfg, parallel)  # a bad model folder fails before anything is written
    task = task_for(cfg)
    task.check(adapter, cfg)  # and so does bad data
    if parallel.is_main:
        check_out_dir(out, force, resume)
        if not resume:
            write_run_header(cfg, out, command, parallel, adapter)
    parallel.barrier()
    data_dir = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    data = task.build(adapter, folder, cfg, data_dir, progress, parallel, replace=not cfg.data_dir)
    results, _, _ = run_job(task, adapter, data, cfg, out, command, progress, copy_model=False, resume=resume,
                            parallel=parallel, base_model=str(folder) if folder else cfg.model, header=False)
    return results
