"""THE unlearning loop. It alone owns the optimizer, batching, logging and the final weights.

Losses come from :mod:`diffunlearn.losses`, the way gradients are combined from the method (an
update rule of :mod:`diffunlearn.updates`); this loop only computes the two gradients, writes the
combined direction into ``.grad`` and steps Adam (PAPER.md §2).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .config import UnlearnConfig
from .errors import UserError
from .losses import denoising_loss, draw_noise, forget_objective
from .methods import Method
from .updates import gradient_stats


class TrainingDiverged(UserError):
    """A loss or gradient became NaN or infinite."""


def _grads(objective: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _full_remain_grads(adapter, params, remain_x0, remain_cond, batch_size, gen) -> tuple[list[torch.Tensor], float]:
    """Mean remain gradient over the whole remain set (RGD), as the size-weighted mean of minibatches."""
    total = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    n = len(remain_x0)
    for start in range(0, n, batch_size):
        x0 = remain_x0[start:start + batch_size]
        noise, t = draw_noise(x0, adapter.num_train_timesteps, gen)
        loss = denoising_loss(adapter, x0, remain_cond[start:start + batch_size], noise, t).mean()
        for acc, g in zip(total, _grads(loss * (len(x0) / n), params)):
            acc.add_(g)
        loss_sum += loss.item() * len(x0)
    return total, loss_sum / n


def unlearn(adapter, method: Method, cfg: UnlearnConfig, forget_x0: torch.Tensor, forget_cond,
            remain_x0: torch.Tensor, remain_cond, metrics_path: Path | None = None,
            progress: bool = True) -> list[dict]:
    """Run ``cfg.steps`` unlearning steps in place on ``adapter``'s trainable parameters.

    Batches are paired by index: step k uses the same rows of the forget and remain sets (the rows
    of a fresh permutation each epoch). Each step appends one JSON line to ``metrics_path``: both
    losses, cos(g_f, g_r), whether they conflicted and whether a projection happened, and the
    realised change of both losses on the same batch, noise and timesteps after the step (the
    monotonicity diagnostic of PAPER.md §2).

    Raises:
        TrainingDiverged: a loss or gradient became NaN/inf (the model is left as before that step).
    """
    from tqdm.auto import tqdm

    if len(forget_x0) != len(remain_x0):
        raise ValueError(f"paired batches need forget and remain sets of equal length, got "
                         f"{len(forget_x0)} and {len(remain_x0)}")
    named = adapter.trainable_parameters(cfg.selection)
    params = [p for _, p in named]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(forget_x0)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    history: list[dict] = []
    log = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
    bar = tqdm(range(1, cfg.steps + 1), desc=f"unlearn {method.name}", disable=not progress, leave=False)
    try:
        for step in bar:
            started = time.perf_counter()
            if cursor + cfg.batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            fx, fc = forget_x0[idx], forget_cond[idx]
            f_noise, f_t = draw_noise(fx, adapter.num_train_timesteps, gen)
            f_obj, f_loss = forget_objective(adapter, fx, fc, f_noise, f_t, cfg.forget_cap, cfg.margin, cfg.alpha)
            g_f = _grads(f_obj, params)
            g_r = None
            rx, rc = remain_x0[idx], remain_cond[idx]
            r_noise, r_t = draw_noise(rx, adapter.num_train_timesteps, gen)
            if method.uses_remain and method.remain_scope == "batch":
                r_obj = denoising_loss(adapter, rx, rc, r_noise, r_t).mean()
                g_r = _grads(r_obj, params)
                r_loss_value = r_obj.item()
            else:
                # GA and RGD take no gradient on this batch; its loss still feeds the diagnostic.
                with torch.no_grad():
                    r_loss_value = denoising_loss(adapter, rx, rc, r_noise, r_t).mean().item()
                if method.uses_remain:
                    g_r, _ = _full_remain_grads(adapter, params, remain_x0, remain_cond, cfg.batch_size, gen)
            record = {"step": step, "forget_loss": f_loss.mean().item(), "remain_loss": r_loss_value,
                      "forget_active": bool(f_obj.requires_grad and f_obj.item() != 0.0)}
            if g_r is not None:
                stats = gradient_stats(g_f, g_r)
                record.update(stats)
                record["projected"] = bool(stats["conflict"] and method.projects)
            direction = method.combine(g_f, g_r, cfg.remain_weight)
            if not all(torch.isfinite(d).all() for d in direction) or not math.isfinite(record["forget_loss"]):
                raise TrainingDiverged(
                    f"step {step}: a loss or gradient became NaN/inf; lower `lr` (now {cfg.lr}) or set `max_grad_norm`")
            if cfg.max_grad_norm > 0:
                norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction)).item()
                if norm > cfg.max_grad_norm:
                    direction = [d * (cfg.max_grad_norm / norm) for d in direction]
            for p, d in zip(params, direction):
                p.grad = d
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                f_after = denoising_loss(adapter, fx, fc, f_noise, f_t).mean().item()
                r_after = denoising_loss(adapter, rx, rc, r_noise, r_t).mean().item()
            record["forget_loss_change"] = f_after - record["forget_loss"]
            record["remain_loss_change"] = r_after - record["remain_loss"]
            record["seconds"] = time.perf_counter() - started
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(forget=f"{record['forget_loss']:.3f}", remain=f"{record['remain_loss']:.3f}")
    finally:
        if log:
            log.close()
        bar.close()
    return history
