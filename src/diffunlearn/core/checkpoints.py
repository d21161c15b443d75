"""Resumable checkpoints: trained weights, optimizer state, RNG state, data position and step.

A checkpoint is a folder ``step-NNNNNN`` holding only safetensors and JSON (nothing is unpickled on
resume, so a checkpoint from elsewhere cannot run code):

    trainable.safetensors   the trainable parameters by name
    optimizer.safetensors   every tensor of the optimizer state (Adam moments, step counts)
    state.json              step, data cursor, loss scale, optimizer hyperparameters, the config
    rng.safetensors         the loop's generator state and the batch order of the current epoch

It is written under a temporary name and renamed into place, so a crash mid-write leaves the
previous checkpoint intact; older checkpoints are removed only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError

PREFIX = "step-"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _read(folder: Path, names: tuple[str, ...], fix: str) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """``state.json`` and the named safetensors files of a checkpoint folder.

    Raises:
        UserError: any of them is missing or damaged (``fix`` says what to do).
    """
    try:
        state = json.loads((folder / "state.json").read_text())
        return state, [load_file(str(folder / f"{name}.safetensors")) for name in names]
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"checkpoint {folder} is damaged ({type(exc).__name__}); {fix}") from exc


def save_checkpoint(root: Path, step: int, named_params: list[tuple[str, torch.nn.Parameter]],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, order: torch.Tensor,
                    cursor: int, extra: dict[str, Any]) -> Path:
    """Write ``root/step-NNNNNN`` atomically and delete older checkpoints; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"tmp-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().cpu().contiguous() for n, p in named_params}, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"generator": generator.get_state(), "order": order.contiguous()}, str(tmp / "rng.safetensors"))
    state = {"step": step, "cursor": cursor, "optimizer": opt_meta, **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob(f"{PREFIX}*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(folder: Path, named_params: list[tuple[str, torch.nn.Parameter]],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, Any]:
    """Restore weights, optimizer and generator in place; returns state.json plus ``order``.

    Raises:
        UserError: the checkpoint is damaged or was made with other trainable parameters.
    """
    state, (weights, opt, rng) = _read(folder, ("trainable", "optimizer", "rng"),
                                       "delete it to resume from an older one or rerun with --force")
    names = [n for n, _ in named_params]
    if sorted(weights) != sorted(names):
        raise UserError(f"checkpoint {folder} holds other trainable parameters than this run selects; "
                        "resume with the run's own config.yaml")
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(weights[name].to(p.device, p.dtype))
    optimizer_from_files(optimizer, opt, state["optimizer"])
    generator.set_state(rng["generator"])
    state["order"] = rng["order"]
    return state


# --- the digit worlds' base-model recipes (``world train-base``): an hour-long job, resumable ---

RECIPE_DIR = "checkpoint"


def save_recipe_checkpoint(out: Path, step: int, unet: torch.nn.Module, ema, optimizer: torch.optim.Optimizer,
                           scheduler, generator: torch.Generator, state: dict[str, Any]) -> Path:
    """Write ``out/checkpoint`` (weights, EMA shadow, AdamW, lr schedule, generator, ``state``)
    atomically: a temporary folder renamed over the old one, so an interruption keeps the last one.

    diffusers' EMAModel and torch's schedulers only offer pickled ``state_dict``s; this splits them
    into safetensors and JSON so a resume never unpickles anything.
    """
    final, tmp = out / RECIPE_DIR, out / (RECIPE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in unet.named_parameters()}, str(tmp / "unet.safetensors"))
    ema_state = ema.state_dict()
    save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))},
              str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"generator": generator.get_state()}, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"step": step, "optimizer": opt_meta, "ema": ema_state, "scheduler": sched, **state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    old = out / (RECIPE_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_recipe_state(out: Path) -> dict[str, Any] | None:
    """``out/checkpoint/state.json`` (the recipe's arguments, step and log), or None without a checkpoint."""
    path = out / RECIPE_DIR / "state.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is damaged; delete {out / RECIPE_DIR} and start over with --force") from exc


def load_recipe_checkpoint(out: Path, unet: torch.nn.Module, ema, optimizer: torch.optim.Optimizer, scheduler,
                           generator: torch.Generator) -> dict[str, Any]:
    """Restore what :func:`save_recipe_checkpoint` wrote, in place; returns its state.json."""
    state, (weights, shadow, opt, rng) = _read(out / RECIPE_DIR, ("unet", "ema", "optimizer", "rng"),
                                               "delete it and start over with --force")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(weights[name])
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    optimizer_from_files(optimizer, opt, state["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    generator.set_state(rng["generator"])
    return state
