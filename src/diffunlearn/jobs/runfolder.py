"""Run-folder plumbing every track shares: the refusal of a folder that holds another run, the
header written first (``config.yaml``, ``environment.json``), the device and process settings, the
model loaded for a run, the saved model and the training summary."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from ..config import UnlearnConfig, build_config, dump_config
from ..core.parallel import Parallel
from ..errors import UserError
from ..models import load_adapter
from ..utils import atomic_write_text, environment


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
    # A LoRA run with lora_base_dtype loads its frozen base straight into that dtype (never fp32 on the GPU).
    base = None if cfg.selection != "lora" or cfg.lora_base_dtype == "fp32" else cfg.lora_base_dtype
    adapter, folder = load_adapter(cfg.model, device=device, frozen_dtype=amp if device.type == "cuda" else None,
                                   denoiser_dtype=base)
    if cfg.selection == "lora":
        if not hasattr(adapter, "configure_lora"):
            raise UserError("selection=lora is available for Stable Diffusion models only; for the digit-world "
                            "model use full, cross-attention or non-cross-attention")
        adapter.configure_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                               target_modules=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()),
                               base_dtype=base)
    if cfg.offload_encoders:  # (config.validate refused it for the digit-world models)
        adapter.offload_text_encoders()
    if cfg.gradient_checkpointing:
        if not hasattr(adapter, "enable_gradient_checkpointing"):
            raise UserError("gradient_checkpointing is available for Stable Diffusion models only (the digit-world "
                            "model is small enough without it); set gradient_checkpointing=false")
        adapter.enable_gradient_checkpointing()
    return adapter, folder


def save_format(cfg: UnlearnConfig, adapter) -> str:
    """The format the run's model is saved in: the family's only one, or for Stable Diffusion the
    config's ``save`` (``auto``: LoRA weights for a LoRA run, else the full pipeline)."""
    if len(adapter.save_formats) == 1:
        return adapter.save_formats[0]
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
    probed = [h for h in done if "probe_forget" in h]
    stopped = {"early_stop_step": next((h["step"] for h in probed if h.get("early_stop")), None),
               "probe_forget": probed[-1]["probe_forget"]} if probed else {}
    return {
        **stopped,
        "steps": len(done), "skipped_steps": len(history) - len(done), "seconds": seconds,
        "final_forget_loss": done[-1]["forget_loss"] if done else None,
        "final_remain_loss": done[-1]["remain_loss"] if done else None,
        "conflict_fraction": (sum(h["conflict"] for h in with_remain) / len(with_remain)) if with_remain else None,
        "both_improved_fraction": (sum(h["forget_loss_change"] > 0 and h["remain_loss_change"] < 0 for h in diagnosed)
                                   / len(diagnosed)) if diagnosed else None,
    }


def finished_run(folder: Path, cfg: UnlearnConfig, need_model: bool = True) -> dict | None:
    """The results of a run folder that finished with exactly ``cfg`` (and, with ``need_model``, kept
    its model), else None: how every demo and study decides that a run can be reused."""
    import yaml

    results, config = folder / "results.json", folder / "config.yaml"
    if not results.is_file() or not config.is_file() or (need_model and not (folder / "model").is_dir()):
        return None
    if not same_config(yaml.safe_load(config.read_text()), cfg):  # the first line is a comment
        return None
    return json.loads(results.read_text())


def same_config(recorded: dict, cfg: UnlearnConfig) -> bool:
    """Whether a run's recorded config equals ``cfg``. The record is resolved by ``build_config`` (as
    ``sweep`` does with a run's config.yaml), so a key added to diffunlearn after that run takes the
    default that run used; an unreadable record never matches."""
    if not isinstance(recorded, dict):
        return False
    try:
        return build_config(None, None, base=recorded).to_dict() == cfg.to_dict()
    except UserError:
        return False
