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
import shutil
import sys
import time
from pathlib import Path

import torch

from .config import UnlearnConfig, dump_config, model_kind
from .data.images import generate_image_set
from .data.prompts import build_pairs
from .data.templates import TEMPLATES, template_pairs
from .errors import UserError
from .evaluate.world import WorldEvaluation, evaluate_world
from .methods import get_method
from .modelcard import write_model_card
from .models import load_adapter
from .parallel import Parallel
from .utils import atomic_write_text, environment, folder_fingerprint, image_seeds
from .worlds import digits as world
from .worlds.oracle import load_oracle

PREVIEW_PROMPTS = 4  # held-out prompts per set in a Stable Diffusion run's before/after picture


def check_out_dir(out: Path, force: bool, resume: bool = False) -> None:
    """Refuse to overwrite a finished run unless ``force``.

    With ``force`` only the completion markers are removed (never the folder itself, which a user
    may have pointed at something precious); every other file is rewritten in place by the run.
    """
    markers = [out / "results.json", out / "summary.json", out / "report.md"]
    if resume and any(m.exists() for m in markers):
        raise UserError(f"{out} holds a finished run, so there is nothing to resume; its model is in {out / 'model'}")
    if any(m.exists() for m in markers):
        if not force:
            raise UserError(f"{out} already holds a finished run; choose another --out or pass --force to replace it")
        for m in markers:
            m.unlink(missing_ok=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)


def write_run_header(cfg: UnlearnConfig, out: Path, command: str, parallel: Parallel, adapter=None) -> None:
    """``config.yaml`` and ``environment.json``: the first files of a run folder, written before any
    data or training, so a run interrupted at any point can be resumed and says where it ran."""
    dump_config(cfg, out / "config.yaml", command)
    env = environment()
    env["world_size"] = parallel.world_size
    if adapter is not None:
        env["device"] = str(next(adapter.unet.parameters()).device)  # where the trained weights really are
    else:
        env["device"] = str(resolve_device(cfg, parallel))
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    env["torch_threads"] = torch.get_num_threads()
    atomic_write_text(out / "environment.json", json.dumps(env, indent=2) + "\n")


def resolve_device(cfg: UnlearnConfig, parallel: Parallel) -> torch.device:
    """``auto`` = this process's GPU when there is one, else the CPU.

    Raises:
        UserError: ``device: cuda`` on a machine without CUDA.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but torch sees no CUDA GPU; use device=auto or device=cpu")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return parallel.device if parallel.device.type == "cuda" else torch.device("cuda")


def apply_process_settings(cfg: UnlearnConfig, device: torch.device, parallel: Parallel) -> None:
    """Half-precision autocast on a CPU is legal but very slow: say so before the run starts. (Also
    applies ``threads``, the other per-process CPU setting.)"""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.mixed_precision != "no" and device.type == "cpu" and parallel.is_main:
        print(f"warning: mixed_precision={cfg.mixed_precision} on the CPU is much slower than fp32 (27x measured "
              "on the digit world: CPUs lack fast half-precision kernels); use mixed_precision=no here",
              file=sys.stderr)


def load_for_run(cfg: UnlearnConfig, parallel: Parallel | None = None):
    """The base model's adapter placed and configured for ``cfg`` (device, frozen dtype, LoRA,
    gradient checkpointing); returns ``(adapter, folder or None)``."""
    parallel = parallel or Parallel()
    device = resolve_device(cfg, parallel)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    apply_process_settings(cfg, device, parallel)
    # Frozen parts (VAE, text encoder) run in half precision on GPUs; CPUs keep fp32 (slow half kernels).
    adapter, folder = load_adapter(cfg.model, device=device, frozen_dtype=amp if device.type == "cuda" else None)
    if cfg.selection == "lora":
        if not hasattr(adapter, "configure_lora"):
            raise UserError("selection=lora is available for Stable Diffusion models only; for the digit-world "
                            "model use full, cross-attention or non-cross-attention")
        adapter.configure_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                               target_modules=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()))
    if cfg.gradient_checkpointing:
        if not hasattr(adapter, "enable_gradient_checkpointing"):
            raise UserError("gradient_checkpointing is available for Stable Diffusion models only (the digit-world "
                            "model is small enough without it); set gradient_checkpointing=false")
        adapter.enable_gradient_checkpointing()
    return adapter, folder


def model_identity(adapter, folder: Path | None) -> str:
    """A string that changes when the generating model's weights change (for image-set caches)."""
    if folder is not None:
        return folder_fingerprint(folder)
    return hashlib.sha256(json.dumps(adapter.model_identity(), sort_keys=True).encode()).hexdigest()[:16]


def training_prompts(cfg: UnlearnConfig, split: str = "train", n: int | None = None) -> tuple[list, list]:
    """Index-paired (forget, remain) prompts: the SD templates for a template concept, the digit
    world's captions otherwise (``Caption`` objects there, strings here)."""
    n = cfg.num_pairs if n is None else n
    if cfg.concept in TEMPLATES:
        return template_pairs(cfg.concept, n, cfg.diversity, split, cfg.data_seed)
    world.concept_attribute(cfg.concept)
    return build_pairs(cfg.concept, n, cfg.diversity, split, cfg.data_seed)


def sample_batch(adapter, cfg: UnlearnConfig) -> int:
    """Images per sampler call: the tiny digit-world model samples hundreds at once; Stable Diffusion
    uses the training batch size, which the GPU is known to hold."""
    if cfg.sample_batch_size:
        return cfg.sample_batch_size
    return cfg.batch_size if hasattr(adapter, "vae") else 256


def prompt_texts(prompts: list) -> list[str]:
    return [getattr(p, "text", p) for p in prompts]


def build_training_data(adapter, model_folder: Path | None, cfg: UnlearnConfig, data_dir: Path, progress: bool = True,
                        parallel: Parallel | None = None, replace: bool = True):
    """Paired prompts (PAPER.md §3) and their images generated by the base model, kept in ``data_dir``
    (resumable; sharded across processes under ``accelerate launch``).

    Returns:
        (forget_x0, forget_cond, remain_x0, remain_cond, forget_prompts, remain_prompts) with x0 in
        the space the UNet denoises (latents for Stable Diffusion).
    """
    forget_p, remain_p = training_prompts(cfg)
    model_id = model_identity(adapter, model_folder)  # hashes every weight file: once, not per image set
    sets = {}
    for name, prompts, offset in (("forget", forget_p, 0), ("remain", remain_p, 50000)):
        seeds = image_seeds(cfg.data_seed, len(prompts), offset=offset)
        sets[name] = generate_image_set(adapter, model_id, prompt_texts(prompts), seeds, data_dir / name,
                                        cfg.data_steps, cfg.data_guidance, progress, resolution=cfg.resolution,
                                        batch_size=sample_batch(adapter, cfg), replace=replace, parallel=parallel)
    return (adapter.encode_images(sets["forget"]), adapter.encode_prompts(prompt_texts(forget_p)),
            adapter.encode_images(sets["remain"]), adapter.encode_prompts(prompt_texts(remain_p)), forget_p, remain_p)


def save_format(cfg: UnlearnConfig, adapter) -> str:
    if hasattr(adapter, "class_names"):
        return "class"
    if not hasattr(adapter, "save_lora"):
        return "pixel"
    if cfg.save != "auto":
        return cfg.save
    return "lora" if cfg.selection == "lora" else "pipeline"


def save_model(adapter, cfg: UnlearnConfig, out: Path) -> str:
    """Write ``out/model`` atomically (temporary folder, then rename); returns the format."""
    fmt = save_format(cfg, adapter)
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = {"pixel": "save", "class": "save", "pipeline": "save", "unet": "save_unet", "lora": "save_lora"}[fmt]
    getattr(adapter, writer)(tmp)
    shutil.rmtree(out / "model", ignore_errors=True)
    tmp.rename(out / "model")
    return fmt


def training_summary(history: list[dict], seconds: float) -> dict:
    """Per-run training facts; ``seconds`` is this session's time, replaced by the training time summed
    over every session when the steps recorded it (a resumed run)."""
    elapsed = [h["elapsed_seconds"] for h in history if "elapsed_seconds" in h]
    seconds = elapsed[-1] if elapsed else seconds
    done = [h for h in history if not h.get("skipped")]
    with_remain = [h for h in done if "conflict" in h]
    diagnosed = [h for h in done if "forget_loss_change" in h]
    return {
        "steps": len(done), "skipped_steps": len(history) - len(done), "seconds": seconds,
        "final_forget_loss": done[-1]["forget_loss"] if done else None,
        "final_remain_loss": done[-1]["remain_loss"] if done else None,
        "conflict_fraction": (sum(h["conflict"] for h in with_remain) / len(with_remain)) if with_remain else None,
        "both_improved_fraction": (sum(h["forget_loss_change"] > 0 and h["remain_loss_change"] < 0 for h in diagnosed)
                                   / len(diagnosed)) if diagnosed else None,
    }


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
