"""One unlearning job end to end: data, unlearning, evaluation, a self-describing run folder.

Run folder layout::

    config.yaml        resolved config; first line = the command that reproduces it
    environment.json   library versions
    data/              generated training images (unless `data_dir` points at a `data build` folder)
    metrics.jsonl      one line per optimizer step (losses, cos, projection, realised changes)
    checkpoints/       the newest resumable checkpoint (with `checkpoint_every`)
    model/             the unlearned model (diffusers layout or LoRA, safetensors) with a model card
    samples.png        held-out prompts before and after (Stable Diffusion runs)
    results.json       evaluation and training summary; written LAST, so its presence means the run finished
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .config import UnlearnConfig, model_kind
from .data.images import generate_image_set
from .data.templates import TEMPLATES
from .data.training import build_training_data, prompt_texts, sample_batch, training_prompts
from .evaluate.world import WorldEvaluation, evaluate_world
from .methods import get_method
from .modelcard import write_model_card
from .parallel import Parallel
from .runfolder import (
    check_out_dir,
    load_for_run,
    save_model,
    training_summary,
    write_run_header,
)
from .utils import atomic_write_text, image_seeds
from .worlds.oracle import load_oracle

PREVIEW_PROMPTS = 4  # held-out prompts per set in a Stable Diffusion run's before/after picture


def _preview(adapter, cfg: UnlearnConfig, folder: Path, model_id: str, progress: bool, parallel: Parallel):
    """Held-out (test-vocabulary) forget and remain prompts sampled with fixed seeds."""
    k = min(PREVIEW_PROMPTS, cfg.eval_prompts)
    forget_p, remain_p = training_prompts(cfg, split="test" if cfg.diversity == "diverse" else "train", n=k)
    prompts = prompt_texts(forget_p) + prompt_texts(remain_p)
    images = generate_image_set(adapter, model_id, prompts, image_seeds(cfg.eval_seed, len(prompts)), folder,
                                cfg.eval_steps, cfg.eval_guidance, progress, resolution=cfg.resolution,
                                batch_size=sample_batch(adapter, cfg), parallel=parallel)
    return prompts, images


def run_method(base_adapter, data, cfg: UnlearnConfig, out: Path, oracle, command: str, progress: bool = True,
               copy_model: bool = True, resume: bool = False, parallel: Parallel | None = None,
               base_model: str | None = None, data_info: dict | None = None
               ) -> tuple[dict, WorldEvaluation | None]:
    """Unlearn ``base_adapter`` (a COPY of it when ``copy_model``) with ``cfg.method`` on ``data``;
    evaluate; fill ``out``.

    Digit-world concepts are scored by the oracle; Stable Diffusion runs get a before/after
    picture of held-out prompts (``samples.png``) and are scored with ``diffunlearn eval``.

    Returns:
        (results dict as written to results.json, the digit-world evaluation or None)
    """
    parallel = parallel or Parallel()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    if parallel.is_main and not resume:
        write_run_header(cfg, out, command, parallel, base_adapter)
    method = get_method(cfg.method)
    adapter = base_adapter.clone() if copy_model else base_adapter
    forget_x0, forget_cond, remain_x0, remain_cond = data[:4]
    is_world = cfg.concept not in TEMPLATES
    before = None
    if not is_world:
        before = _preview(adapter, cfg, out / "samples" / "base", "base:" + (base_model or cfg.model), progress,
                          parallel)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    history = method.apply(adapter, cfg, forget_x0, forget_cond, remain_x0, remain_cond,
                           metrics_path=out / "metrics.jsonl", progress=progress, checkpoint_dir=out / "checkpoints",
                           resume=resume, parallel=parallel)
    seconds = time.perf_counter() - started
    training = training_summary(history, seconds)
    evaluation, metrics = None, None
    if is_world:
        evaluation = evaluate_world(adapter, oracle, cfg.concept, cfg.eval_prompts, cfg.eval_split, cfg.eval_seed,
                                    cfg.eval_steps, cfg.eval_guidance, progress)
        metrics = evaluation.metrics()
    else:
        stamp = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:12]
        prompts, after = _preview(adapter, cfg, out / "samples" / "unlearned", f"unlearned:{stamp}", progress,
                                  parallel)
        if parallel.is_main:
            from .report import image_grid

            k = len(prompts) // 2
            image_grid({"base": before[1][:k], cfg.method: after[:k]}, prompts[:k], out / "samples_forget.png",
                       f"held-out prompts WITH '{cfg.concept}': same prompts and seeds in both rows")
            image_grid({"base": before[1][k:], cfg.method: after[k:]}, prompts[k:], out / "samples_remain.png",
                       "held-out prompts WITHOUT the concept: same prompts and seeds in both rows")
    results = {"concept": cfg.concept, "method": cfg.method, "seconds": training["seconds"], **(metrics or {}),
               "training": training}
    if evaluation is not None:
        results["metrics"] = evaluation.as_eval_metrics()  # the `diffunlearn eval` schema, which compare reads
    if parallel.is_main:
        fmt = save_model(adapter, cfg, out)
        write_model_card(out / "model", cfg, fmt, base_model or cfg.model, command, data_info or {}, training, metrics)
        results["model"] = {"folder": str(out / "model"), "format": fmt}
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    parallel.barrier()
    return results, evaluation


def run_unlearning(cfg: UnlearnConfig, out: Path, force: bool, command: str, progress: bool = True,
                   resume: bool = False) -> dict:
    """``diffunlearn unlearn``: one method on one concept, in its own run folder (``resume``: continue
    the interrupted run in ``out`` from its newest checkpoint)."""
    if model_kind(cfg.model) == "class":
        from .class_track import run_class_unlearning

        return run_class_unlearning(cfg, out, force, command, progress, resume)
    parallel = Parallel.from_environment()
    adapter, folder = load_for_run(cfg, parallel)  # a bad model folder fails before anything is written
    if parallel.is_main:
        check_out_dir(out, force, resume)
        if not resume:
            write_run_header(cfg, out, command, parallel, adapter)
    parallel.barrier()
    data_dir = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    data = build_training_data(adapter, folder, cfg, data_dir, progress, parallel, replace=not cfg.data_dir)
    data_info = {"prompts": "templates:" + cfg.concept if cfg.concept in TEMPLATES else "digit-world",
                 "pairs": cfg.num_pairs, "diversity": cfg.diversity, "data_seed": cfg.data_seed,
                 "sampler_steps": cfg.data_steps, "guidance": cfg.data_guidance, "folder": str(data_dir)}
    oracle = load_oracle() if cfg.concept not in TEMPLATES else None
    results, _ = run_method(adapter, data, cfg, out, oracle, command, progress, copy_model=False, resume=resume,
                            parallel=parallel, base_model=str(folder) if folder else cfg.model, data_info=data_info)
    return results
