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

from .errors import UserError

PREFIX = "step-"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
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
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "trainable.safetensors"))
        opt = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"checkpoint {folder} is damaged ({type(exc).__name__}); delete it to resume from an "
                        "older one or rerun with --force") from exc
    names = [n for n, _ in named_params]
    if sorted(weights) != sorted(names):
        raise UserError(f"checkpoint {folder} holds other trainable parameters than this run selects; "
                        "resume with the run's own config.yaml")
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(weights[name].to(p.device, p.dtype))
    _optimizer_from_files(optimizer, opt, state["optimizer"])
    generator.set_state(rng["generator"])
    state["order"] = rng["order"]
    return state
