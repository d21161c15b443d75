"""THE unlearning loop. It alone owns the optimizer, batching, precision, parallelism, logging and
checkpoints.

Losses come from :mod:`diffunlearn.losses`, the way gradients are combined from the method (an
update rule of :mod:`diffunlearn.updates`); this loop only computes the two gradients, sums them
across processes, writes the combined direction into ``.grad`` and steps the optimizer (PAPER.md §2).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import torch

from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import UnlearnConfig
from .errors import UserError
from .losses import denoising_loss, draw_noise, forget_objective
from .methods import Method
from .parallel import Parallel
from .updates import gradient_stats
from .utils import atomic_write_text


class TrainingDiverged(UserError):
    """A loss or gradient became NaN or infinite."""


class LossScale:
    """Dynamic loss scaling for fp16 autocast (halve on overflow and skip the step, double after
    ``growth_interval`` good steps): torch's GradScaler assumes ``loss.backward()`` and one
    optimizer, while RG needs two separate gradients before any step, so it is written here."""

    def __init__(self, enabled: bool, scale: float = 2.0 ** 16, growth_interval: int = 200) -> None:
        self.enabled = enabled
        self.scale = scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if finite:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2.0
        else:
            self.scale /= 2.0
            self.good_steps = 0


def make_optimizer(cfg: UnlearnConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (the paper's optimizer) or bitsandbytes' 8-bit Adam.

    Raises:
        UserError: ``adam8bit`` without bitsandbytes installed.
    """
    if cfg.optimizer == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("optimizer adam8bit needs bitsandbytes; install it with "
                            "`pip install 'diffunlearn[8bit]'` or use optimizer=adam") from exc
        return bnb.optim.Adam8bit(params, lr=cfg.lr)
    return torch.optim.Adam(params, lr=cfg.lr)


def _to(condition, device: torch.device):
    return condition.to(device) if hasattr(condition, "to") else condition


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _truncate_metrics(path: Path, last_step: int) -> list[dict]:
    """Keep the metric lines of steps <= ``last_step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept



class GradientEngine:
    """Gradients of batch objectives for the loop: global batches split across processes, autocast,
    loss scaling, and the sum across processes (see :mod:`diffunlearn.parallel`)."""

    def __init__(self, adapter, params: list[torch.nn.Parameter], generator: torch.Generator,
                 parallel: Parallel | None = None, scaler: LossScale | None = None,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.adapter = adapter
        self.params = params
        self.gen = generator
        self.parallel = parallel or Parallel()
        self.scaler = scaler or LossScale(False)
        self.amp_dtype = amp_dtype
        self.device = getattr(adapter, "device", torch.device("cpu"))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grads(self, objective: torch.Tensor) -> list[torch.Tensor]:
        """∇objective for every parameter (zeros where unused), summed across processes."""
        found = torch.autograd.grad(objective * self.scaler.scale, self.params, allow_unused=True)
        out = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, found)]
        self.parallel.sum_(out)
        if self.scaler.enabled:
            for g in out:
                g.div_(self.scaler.scale)
        return out

    def batch(self, x0: torch.Tensor, cond, rows: torch.Tensor):
        """Noise and timesteps for the GLOBAL batch ``rows``, then this process's share of everything.

        Returns:
            (x0, condition, noise, timesteps, share) where share = local rows / global rows.
        """
        noise, t = draw_noise(x0[rows], self.adapter.num_train_timesteps, self.gen)
        mine = self.parallel.shard(len(rows))
        local = rows[mine]
        return (x0[local].to(self.device), _to(cond[local], self.device), noise[mine].to(self.device),
                t[mine].to(self.device), len(local) / len(rows))

    def global_mean(self, local_mean: torch.Tensor, share: float) -> float:
        return self.parallel.sum_scalar(float(local_mean) * share)

    def full_remain_grads(self, remain_x0: torch.Tensor, remain_cond, batch_size: int
                          ) -> tuple[list[torch.Tensor], float]:
        """Mean remain gradient over the whole remain set (RGD, PAPER.md §2) as the size-weighted mean
        of minibatch gradients; returns it with the mean remain loss."""
        n = len(remain_x0)
        total = [torch.zeros_like(p) for p in self.params]
        loss_sum = 0.0
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n))
            x0, cond, noise, t, share = self.batch(remain_x0, remain_cond, rows)
            with self.autocast():
                loss = denoising_loss(self.adapter, x0, cond, noise, t).mean()
            for acc, g in zip(total, self.grads(loss * share * (len(rows) / n))):
                acc.add_(g)
            loss_sum += self.global_mean(loss.detach(), share) * len(rows)
        return total, loss_sum / n


def unlearn(adapter, method: Method, cfg: UnlearnConfig, forget_x0: torch.Tensor, forget_cond,
            remain_x0: torch.Tensor, remain_cond, metrics_path: Path | None = None, progress: bool = True,
            checkpoint_dir: Path | None = None, resume: bool = False, parallel: Parallel | None = None
            ) -> list[dict]:
    """Run unlearning steps up to ``cfg.steps`` in place on ``adapter``'s trainable parameters.

    Batches are paired by index: step k uses the same rows of the forget and remain sets (the rows
    of a fresh permutation each epoch). Each step appends one JSON line to ``metrics_path``: both
    losses, cos(g_f, g_r), whether they conflicted and whether a projection happened, and (with
    ``cfg.diagnose``) the realised change of both losses on the same batch, noise and timesteps
    after the step (the monotonicity diagnostic of PAPER.md §2).

    With ``checkpoint_dir`` and ``cfg.checkpoint_every`` a checkpoint is written every N steps;
    ``resume`` restores the newest one and continues to the same final weights an uninterrupted
    run reaches (the generator, batch order, optimizer and loss scale are all restored).

    Under ``accelerate launch`` every process draws the same global batch and keeps its own rows
    (:mod:`diffunlearn.parallel`); gradients are summed across processes before ``method.combine``.

    Returns:
        one record per step (for a resumed run, the restored records first).

    Raises:
        TrainingDiverged: a loss or gradient became NaN/inf (the model is left as before that step;
            checkpoints already written are kept).
    """
    from tqdm.auto import tqdm

    if len(forget_x0) != len(remain_x0):
        raise ValueError(f"paired batches need forget and remain sets of equal length, got "
                         f"{len(forget_x0)} and {len(remain_x0)}")
    parallel = parallel or Parallel()
    named = adapter.trainable_parameters(cfg.selection)
    params = [p for _, p in named]
    optimizer = make_optimizer(cfg, params)
    scaler = LossScale(cfg.mixed_precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(forget_x0)
    order = torch.randperm(n, generator=gen)
    cursor, first_step = 0, 1
    history: list[dict] = []
    if resume and checkpoint_dir is not None and (found := latest_checkpoint(checkpoint_dir)) is not None:
        state = load_checkpoint(found, named, optimizer, gen)
        order, cursor, first_step = state["order"], state["cursor"], state["step"] + 1
        scaler.scale, scaler.good_steps = state["loss_scale"], state["good_steps"]
        if metrics_path is not None and parallel.is_main:
            history = _truncate_metrics(metrics_path, state["step"])
    elif metrics_path is not None and parallel.is_main:
        metrics_path.unlink(missing_ok=True)

    engine = GradientEngine(adapter, params, gen, parallel, scaler, amp_dtype)
    autocast, grads, batch, global_mean = engine.autocast, engine.grads, engine.batch, engine.global_mean

    log = open(metrics_path, "a", encoding="utf-8") if metrics_path and parallel.is_main else None
    bar = tqdm(range(first_step, cfg.steps + 1), desc=f"unlearn {method.name}", leave=False,
               disable=not progress or not parallel.is_main)
    try:
        for step in bar:
            started = time.perf_counter()
            if cursor + cfg.batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            fx, fc, f_noise, f_t, f_share = batch(forget_x0, forget_cond, idx)
            with autocast():
                f_obj, f_loss = forget_objective(adapter, fx, fc, f_noise, f_t, cfg.forget_cap, cfg.margin, cfg.alpha,
                                                 batch_mean=functools.partial(global_mean, share=f_share))
            record = {"step": step, "forget_loss": global_mean(f_loss.mean(), f_share)}
            record["forget_active"] = cfg.forget_cap != "hinge" or record["forget_loss"] <= cfg.margin
            g_f = grads(f_obj * f_share)
            rx, rc, r_noise, r_t, r_share = batch(remain_x0, remain_cond, idx)
            g_r = None
            if method.uses_remain and method.remain_scope == "batch":
                with autocast():
                    r_obj = denoising_loss(adapter, rx, rc, r_noise, r_t).mean()
                g_r = grads(r_obj * r_share)
                record["remain_loss"] = global_mean(r_obj.detach(), r_share)
            else:
                # GA and RGD take no gradient on this batch; its loss still feeds the diagnostic.
                with torch.no_grad(), autocast():
                    record["remain_loss"] = global_mean(denoising_loss(adapter, rx, rc, r_noise, r_t).mean(), r_share)
                if method.uses_remain:
                    g_r, _ = engine.full_remain_grads(remain_x0, remain_cond, cfg.batch_size)
            finite = math.isfinite(record["forget_loss"]) and math.isfinite(record["remain_loss"])
            finite = finite and _finite(g_f) and (g_r is None or _finite(g_r))
            if not finite and scaler.enabled and math.isfinite(record["forget_loss"]):
                scaler.update(False)  # fp16 gradient overflow: skip this step at a lower scale
                record.update({"skipped": True, "loss_scale": scaler.scale})
                history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                continue
            if not finite:
                last = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
                kept = f"; the last good checkpoint is {last}" if last else ""
                raise TrainingDiverged(f"step {step}: a loss or gradient became NaN/inf; lower `lr` (now {cfg.lr}) "
                                       f"or set `max_grad_norm`, then rerun with --force{kept}")
            if g_r is not None:
                stats = gradient_stats(g_f, g_r)
                record.update(stats)
                record["projected"] = bool(stats["conflict"] and method.projects)
            direction = method.combine(g_f, g_r, cfg.remain_weight)
            del g_f, g_r  # the optimizer's first step allocates its moments: free both gradients first
            if cfg.max_grad_norm > 0:
                norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction)).item()
                if norm > cfg.max_grad_norm:
                    direction = [d * (cfg.max_grad_norm / norm) for d in direction]
            for p, d in zip(params, direction):
                p.grad = d
            del direction
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scaler.update(True)
            if cfg.diagnose:
                with torch.no_grad(), autocast():
                    f_after = global_mean(denoising_loss(adapter, fx, fc, f_noise, f_t).mean(), f_share)
                    r_after = global_mean(denoising_loss(adapter, rx, rc, r_noise, r_t).mean(), r_share)
                record["forget_loss_change"] = f_after - record["forget_loss"]
                record["remain_loss_change"] = r_after - record["remain_loss"]
            record["seconds"] = time.perf_counter() - started
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                if parallel.is_main:
                    save_checkpoint(checkpoint_dir, step, named, optimizer, gen, order, cursor,
                                    {"loss_scale": scaler.scale, "good_steps": scaler.good_steps})
                parallel.barrier()
            bar.set_postfix(forget=f"{record['forget_loss']:.3f}", remain=f"{record['remain_loss']:.3f}")
    finally:
        if log:
            log.close()
        bar.close()
    return history
