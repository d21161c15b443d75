"""THE unlearning loop. It alone owns the optimizer, batching, precision, parallelism, logging and
checkpoints.

Losses come from :mod:`diffunlearn.core.losses`, the way gradients are combined from the method (an
update rule of :mod:`diffunlearn.core.updates`); this loop only computes the two gradients, sums them
across processes, writes the combined direction into ``.grad`` and steps the optimizer (PAPER.md §2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..errors import UserError
from ..utils import atomic_write_text
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .losses import denoising_loss, draw_noise, forget_objective, matching_loss
from .parallel import Parallel
from .schema import UnlearnConfig
from .updates import gradient_stats, gram_matrix, pair_gram

if TYPE_CHECKING:  # the loop runs any method; it never imports the method layer
    from ..methods import Method


@dataclasses.dataclass(frozen=True)
class Bound:
    """What an objective may use when it binds: the trained adapter, the frozen reference copy (or
    None), the run's config, the gradient engine of the loop, and the remain conditions (paired
    anchors)."""

    adapter: Any
    reference: Any
    cfg: Any
    engine: Any
    remain_cond: Any


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
    return adam(params, cfg.lr)


def adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """torch's Adam, fused (one kernel over all parameters) where torch has it for these parameters.

    The fused step is elementwise the same update as the default one (they differ at float rounding,
    about 3e-8 on the digit UNet's weights). On CPUs torch's default is a Python loop over the
    tensors: for the digit UNet's 337 tensors on 2 cores it took 35 ms per step against 14 ms fused,
    a tenth of an rg step (``diffunlearn bench`` measures the whole step). torch raises where fused is
    unsupported (a device or dtype without its kernel, torch < 2.4 on CPUs), and then the default
    implementation is used."""
    if params and all(p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr)


class Chunk(NamedTuple):
    """One process's micro-batch of a global batch."""

    x0: torch.Tensor
    cond: Any
    noise: torch.Tensor
    t: torch.Tensor
    share: float          # chunk rows / global batch rows
    rows: torch.Tensor    # the chunk's row indices in the data set (to fetch paired anchors)


def _finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry is finite. One float64 sum per tensor and ONE host sync: a NaN or inf entry
    makes its sum NaN or inf, and float64 cannot overflow on a sum of finite fp32/bf16 values. A
    per-tensor ``isfinite(t).all()`` read back each time took 15.5 ms for the digit UNet's 337
    tensors here against 5.3 ms (and is one GPU sync per tensor)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors]).sum()))


def _truncate_metrics(path: Path, last_step: int) -> list[dict]:
    """Keep the metric lines of steps <= ``last_step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept



class GradientEngine:
    """Gradients of batch objectives for the loop: global batches split across processes and into
    sequential micro-batches (gradient accumulation), autocast, loss scaling, and the sum across
    processes (see :mod:`diffunlearn.core.parallel`).

    Every objective is a per-chunk mean weighted by the chunk's share of the GLOBAL batch, so the
    summed gradient equals the gradient of the global batch mean however the batch is split.
    """

    def __init__(self, adapter, params: list[torch.nn.Parameter], generator: torch.Generator,
                 parallel: Parallel | None = None, scaler: LossScale | None = None,
                 amp_dtype: torch.dtype | None = None, micro_batches: int = 1) -> None:
        self.adapter = adapter
        self.params = params
        self.gen = generator
        self.parallel = parallel or Parallel()
        self.scaler = scaler or LossScale(False)
        self.amp_dtype = amp_dtype
        self.micro_batches = micro_batches
        self.device = getattr(adapter, "device", torch.device("cpu"))
        if self.device.type == "cuda":
            from ..utils import avoid_cudnn_attention

            avoid_cudnn_attention()  # also done on loading; an adapter may be built on the GPU directly

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def chunks(self, x0: torch.Tensor, cond, rows: torch.Tensor) -> list[Chunk]:
        """Noise and timesteps for the GLOBAL batch ``rows``, then this process's rows in micro-batches."""
        noise, t = draw_noise(x0[rows], self.adapter, self.gen)
        mine = torch.arange(len(rows))[self.parallel.shard(len(rows))]
        out = []
        for part in mine.tensor_split(min(self.micro_batches, max(len(mine), 1))):
            if len(part):
                local = rows[part]
                out.append(Chunk(x0[local].to(self.device), cond[local].to(self.device),
                                 noise[part].to(self.device), t[part].to(self.device), len(part) / len(rows), local))
        return out

    def mean_loss(self, chunks: list[Chunk]) -> float:
        """Global batch mean of the denoising loss, without gradients."""
        total = 0.0
        with torch.no_grad(), self.autocast():
            for c in chunks:
                total += float(denoising_loss(self.adapter, c.x0, c.cond, c.noise, c.t).mean()) * c.share
        return self.parallel.sum_scalar(total)

    def grads(self, chunks: list[Chunk], objective: Callable, weight: float = 1.0
              ) -> tuple[list[torch.Tensor], float]:
        """Σ over chunks and processes of ∇(objective(chunk) · share · weight); zeros for unused
        parameters. ``objective(chunk) -> (scalar, per-sample loss)``.

        Returns:
            (gradients, global batch mean of the per-sample loss)
        """
        total: list[torch.Tensor] | None = None
        loss = 0.0
        for c in chunks:
            with self.autocast():
                value, per_sample = objective(c)
            found = torch.autograd.grad(value * c.share * weight * self.scaler.scale, self.params, allow_unused=True)
            if total is None:
                total = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, found)]
            else:
                for acc, g in zip(total, found):
                    if g is not None:
                        acc.add_(g)
            loss += float(per_sample.detach().mean()) * c.share
        if total is None:  # this process holds no rows of the batch
            total = [torch.zeros_like(p) for p in self.params]
        self.parallel.sum_(total)
        if self.scaler.enabled:
            for g in total:
                g.div_(self.scaler.scale)
        return total, self.parallel.sum_scalar(loss)

    def remain_grads(self, chunks: list[Chunk], weight: float = 1.0) -> tuple[list[torch.Tensor], float]:
        """Gradient of the denoising loss (the remain objective; also the saliency of SalUn)."""
        def objective(c: Chunk):
            per_sample = denoising_loss(self.adapter, c.x0, c.cond, c.noise, c.t)
            return per_sample.mean(), per_sample

        return self.grads(chunks, objective, weight)

    def forget_grads(self, chunks: list[Chunk], cfg: UnlearnConfig) -> tuple[list[torch.Tensor], float]:
        """Gradient of the capped forget objective (:func:`losses.forget_objective`). The batch hinge is
        decided on the GLOBAL batch mean: taken from the chunk's own forward when each process
        holds one chunk (an all-reduce), from a no-gradient pass first when batches are accumulated."""
        if cfg.forget_cap == "hinge" and len(chunks) > 1:
            known = self.mean_loss(chunks)
            decide = lambda m: known  # noqa: E731
        else:
            share = chunks[0].share if chunks else 0.0
            decide = lambda m: self.parallel.sum_scalar(float(m) * share)  # noqa: E731

        def objective(c: Chunk):
            return forget_objective(self.adapter, c.x0, c.cond, c.noise, c.t, cfg.forget_cap, cfg.margin, cfg.alpha,
                                    batch_mean=decide)

        return self.grads(chunks, objective)

    def matching_grads(self, chunks: list[Chunk], target_fn: Callable) -> tuple[list[torch.Tensor], float]:
        """Gradient of ‖ε_θ(x_t, c) − target‖² with ``target_fn(chunk, x_t, t)`` computed without gradient
        (ESD's guided target, SalUn's anchor prediction; :func:`losses.matching_loss`)."""
        def objective(c: Chunk):
            return matching_loss(self.adapter, c.x0, c.cond, c.noise, c.t, lambda x_t, t: target_fn(c, x_t, t))

        return self.grads(chunks, objective)

    def full_remain_grads(self, remain_x0: torch.Tensor, remain_cond, batch_size: int
                          ) -> tuple[list[torch.Tensor], float]:
        """Mean remain gradient over the whole remain set (RGD, PAPER.md §2) as the size-weighted mean
        of minibatch gradients; returns it with the mean remain loss."""
        n = len(remain_x0)
        total = [torch.zeros_like(p) for p in self.params]
        loss_sum = 0.0
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n))
            grads, loss = self.remain_grads(self.chunks(remain_x0, remain_cond, rows), len(rows) / n)
            for acc, g in zip(total, grads):
                acc.add_(g)
            loss_sum += loss * len(rows)
        return total, loss_sum / n


def initial_forget_loss(engine: GradientEngine, forget_x0: torch.Tensor, forget_cond, batch_size: int,
                        batches: int = 4) -> float:
    """Mean denoising loss of the model on up to ``batches`` random forget batches (no gradient): the
    unit of ``margin_mode=relative``."""
    n = len(forget_x0)
    rows = torch.randperm(n, generator=engine.gen)[:min(n, batches * batch_size)]
    losses = [engine.mean_loss(engine.chunks(forget_x0, forget_cond, part)) for part in rows.split(batch_size)]
    return sum(losses) / len(losses)


def restrict_realised_update(params: list[torch.nn.Parameter], before: list[torch.Tensor],
                             g_f: list[torch.Tensor], g_r: list[torch.Tensor], gram,
                             margin: float = 0.0) -> dict[str, Any]:
    """``rg-opt``: replace the optimizer's realised change u = after − before by its projection onto
    the cone where neither loss rises to first order (:func:`updates.cone_correction`), in place.
    With ``margin`` κ > 0 the cone is narrowed to g·u ≤ −κ·|g|·|u| for both gradients: on the plain
    cone's boundary a loss has no first-order change at all, so curvature decides its sign and the
    backtracking check rejects the step; inside the narrowed cone halving the step shrinks the
    curvature term four times faster than the guaranteed decrease. On return ``before`` holds the
    step taken (for :func:`backtrack_step`)."""
    from .updates import cone_correction, global_dot

    with torch.no_grad():
        for p, b in zip(params, before):
            b.sub_(p).neg_()  # b now holds u = after − before (no extra buffer)
        forget_dot, remain_dot, uu = torch.stack([global_dot(g_f, before), global_dot(g_r, before),
                                                  global_dot(before, before)]).tolist()
        # The narrowed cone is the plain cone shifted by the margins (the same 2-constraint KKT).
        shift = margin * math.sqrt(max(uu, 0.0))
        coef = cone_correction(forget_dot + shift * math.sqrt(max(gram[0], 0.0)),
                               remain_dot + shift * math.sqrt(max(gram[1], 0.0)), gram)
        if coef is None:  # rounding rejected every candidate: undo the update
            for p, u in zip(params, before):
                p.sub_(u)
                u.zero_()
        elif coef != (0.0, 0.0):
            a, b = coef
            for p, u, f, r in zip(params, before, g_f, g_r):
                p.add_(f, alpha=-a).add_(r, alpha=-b)
                u.add_(f, alpha=-a).add_(r, alpha=-b)  # ``before`` keeps the step actually taken
    return {"update_forget_dot": forget_dot, "update_remain_dot": remain_dot,
            "update_restricted": coef != (0.0, 0.0)}


def backtrack_step(engine: GradientEngine, params: list[torch.nn.Parameter], step: list[torch.Tensor],
                   f_chunks: list[Chunk], r_chunks: list[Chunk], forget_before: float, remain_before: float,
                   forget_active: bool, tries: int) -> dict[str, Any]:
    """Keep the step only if, on this batch (same noise and timesteps), the remain loss fell and (while
    the forget objective is active) the forget loss rose; else halve it, up to ``tries`` times, and
    finally take no step. A first-order rule cannot see curvature: with Adam's step sizes the
    realised remain loss rose on about a third of RG's steps in the digit world even when the
    first-order change said it would fall. Returns the realised changes and the kept step scale."""
    scale = 1.0
    with torch.no_grad():
        for attempt in range(tries + 1):
            forget_after, remain_after = engine.mean_loss(f_chunks), engine.mean_loss(r_chunks)
            if remain_after < remain_before and (not forget_active or forget_after > forget_before):
                return {"forget_loss_change": forget_after - forget_before,
                        "remain_loss_change": remain_after - remain_before, "step_scale": scale,
                        "backtracks": attempt}
            if attempt < tries:
                for p, u in zip(params, step):
                    p.sub_(u, alpha=scale / 2)
                scale /= 2
        for p, u in zip(params, step):
            p.sub_(u, alpha=scale)  # no acceptable fraction of the step: keep the weights as they were
    return {"forget_loss_change": 0.0, "remain_loss_change": 0.0, "step_scale": 0.0, "backtracks": tries}


def step_stats(forget_list: list, g_r: list, gram) -> dict[str, Any]:
    """The step log's gradient numbers: cos(g_f, g_r), both norms and whether they conflict; with
    several forget gradients the smallest cos(g_fj, g_r), each concept's, the largest forget norm,
    and whether ANY two of the k + 1 gradients conflict (what a projecting rule reacts to)."""
    if len(forget_list) == 1:
        return gradient_stats(forget_list[0], g_r, pair_gram(gram))
    k = len(forget_list)
    per = [gradient_stats(forget_list[j], g_r, (gram[j][j], gram[k][k], gram[j][k])) for j in range(k)]
    conflict = any(gram[i][j] < 0 for i in range(k + 1) for j in range(i + 1, k + 1))
    return {"cos": min(p["cos"] for p in per), "cos_per_concept": [p["cos"] for p in per],
            "forget_grad_norm": max(p["forget_grad_norm"] for p in per), "remain_grad_norm": per[0]["remain_grad_norm"],
            "conflict": conflict}


def resume_message(step: int, steps: int, found: Path) -> str:
    """What a resumed run says about where it starts (a checkpoint of the last step leaves no training)."""
    if step >= steps:
        return (f"resuming from the checkpoint of step {step} ({found}): that is the last of {steps} steps, so "
                "training is complete and only what follows it runs")
    return f"resuming from the checkpoint of step {step} ({found}); continuing at step {step + 1} of {steps}"


def unlearn(adapter, method: Method, cfg: UnlearnConfig, forget_x0: torch.Tensor, forget_cond,
            remain_x0: torch.Tensor, remain_cond, metrics_path: Path | None = None, progress: bool = True,
            checkpoint_dir: Path | None = None, resume: bool = False, parallel: Parallel | None = None,
            probe: Callable[[], float] | None = None) -> list[dict]:
    """Run unlearning steps up to ``cfg.steps`` in place on ``adapter``'s trainable parameters.

    Batches are paired by index: step k uses the same rows of the forget and remain sets (the rows
    of a fresh permutation each epoch). Each step appends one JSON line to ``metrics_path``: both
    losses, cos(g_f, g_r), whether they conflicted and whether a projection happened, and (with
    ``cfg.diagnose``) the realised change of both losses on the same batch, noise and timesteps
    after the step (the monotonicity diagnostic of PAPER.md §2).

    With ``checkpoint_dir`` and ``cfg.checkpoint_every`` a checkpoint is written every N steps;
    ``resume`` restores the newest one and continues to the same final weights an uninterrupted
    run reaches (the generator, batch order, optimizer and loss scale are all restored).

    With ``cfg.early_stop_every`` = N and a ``probe`` (the task's training-side forget score), every
    N-th step records ``probe_forget`` and the run stops after the first step whose score is at most
    ``cfg.early_stop_score`` (that record carries ``early_stop: true``). The probe samples with the
    model, not the training generator, and no checkpoint is written at the stopping step, so a resumed
    run stops at the same step with the same weights.

    Under ``accelerate launch`` every process draws the same global batch and keeps its own rows
    (:mod:`diffunlearn.core.parallel`); gradients are summed across processes before ``method.combine``.

    Returns:
        one record per step (for a resumed run, the restored records first).

    Raises:
        TrainingDiverged: a loss or gradient became NaN/inf (the model is left as before that step;
            checkpoints already written are kept).
    """
    from tqdm.auto import tqdm

    # Several concepts at once: ``forget_x0`` and ``forget_cond`` are lists, one set per concept, each
    # paired by index with the one remain set (data.training.training_prompt_sets).
    several = isinstance(forget_x0, (list, tuple))
    forget_sets = list(zip(forget_x0, forget_cond)) if several else [(forget_x0, forget_cond)]
    for fx, _ in forget_sets:
        if len(fx) != len(remain_x0):
            raise ValueError(f"paired batches need forget and remain sets of equal length, got "
                             f"{len(fx)} and {len(remain_x0)}")
    if several and (method.mask is not None or method.restrict_update and cfg.forget_batches == "joint"):
        raise ValueError(f"method {method.name} takes one forget set (config.validate says so first)")
    parallel = parallel or Parallel()
    # A frozen copy of the model as it is now (ESD's and SalUn's reference ε₀): one more UNet of memory.
    reference = adapter.clone(frozen=True) if method.needs_reference else None
    named = adapter.trainable_parameters(cfg.selection)
    params = [p for _, p in named]
    optimizer = make_optimizer(cfg, params)
    scaler = LossScale(cfg.mixed_precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(remain_x0)
    order = torch.randperm(n, generator=gen)
    cursor, first_step = 0, 1
    history: list[dict] = []
    masks = None  # computed before a checkpoint is restored
    if method.mask is not None:
        # From the ORIGINAL weights with its own generator, so a resumed run rebuilds the same mask.
        masks = method.mask(GradientEngine(adapter, params, torch.Generator().manual_seed(cfg.seed + 7919),
                                           parallel, None, amp_dtype, cfg.micro_batches),
                            forget_x0, forget_cond, cfg)
    relative_margin = cfg.margin_mode == "relative" and method.forget_loss == "ascent"
    if relative_margin:
        # Scale-free cap: margin and alpha as multiples of this model's own forget loss, measured on the
        # ORIGINAL weights with their own generator (so a resumed run finds the same value).
        probe = GradientEngine(adapter, params, torch.Generator().manual_seed(cfg.seed + 104729), parallel, None,
                               amp_dtype, cfg.micro_batches)
        base_loss = initial_forget_loss(probe, forget_x0, forget_cond, cfg.batch_size)
        cfg = dataclasses.replace(cfg, margin=cfg.margin * base_loss, alpha=cfg.alpha * base_loss,
                                  margin_mode="absolute")
    elapsed_before = 0.0  # training seconds of the earlier sessions of a resumed run
    found = latest_checkpoint(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if found is not None:
        state = load_checkpoint(found, named, optimizer, gen)
        order, cursor, first_step = state["order"], state["cursor"], state["step"] + 1
        scaler.scale, scaler.good_steps = state["loss_scale"], state["good_steps"]
        elapsed_before = float(state.get("elapsed_seconds", 0.0))
        if metrics_path is not None and parallel.is_main:
            history = _truncate_metrics(metrics_path, state["step"])
        if parallel.is_main:
            print(resume_message(state["step"], cfg.steps, found), file=sys.stderr)
    else:
        if resume and parallel.is_main:
            where = checkpoint_dir if checkpoint_dir is not None else "this run"
            print(f"no checkpoint in {where}, so training starts over at step 1 of {cfg.steps} (set "
                  "checkpoint_every to keep progress)", file=sys.stderr)
        if metrics_path is not None and parallel.is_main:
            metrics_path.unlink(missing_ok=True)
    session_start = time.perf_counter()

    if parallel.world_size > cfg.batch_size:
        raise UserError(f"{parallel.world_size} processes cannot share a batch of {cfg.batch_size}; use batch_size >= "
                        "the number of processes")
    engine = GradientEngine(adapter, params, gen, parallel, scaler, amp_dtype, cfg.micro_batches)
    # The method's forget objective, bound once (ESD's guided target and SalUn's anchors live with them).
    forget_step = method.forget.bind(Bound(adapter, reference, cfg, engine, remain_cond))

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
            # Each concept's forget batch (the same rows of every set), or one concept per step when
            # interleaved; its gradient is None for fine-tuning (the forget batch is only measured).
            concepts = (range(len(forget_sets)) if cfg.forget_batches == "joint" or not several
                        else [(step - 1) % len(forget_sets)])
            f_batches = [engine.chunks(*forget_sets[j], idx) for j in concepts]
            taken = [forget_step(chunks) for chunks in f_batches]
            forget_list = [g for g, _ in taken if g is not None]
            f_losses = [loss for _, loss in taken]
            del taken  # the gradients live in forget_list only, so the step can free them
            record = {"step": step, "forget_loss": sum(f_losses) / len(f_losses)}
            if several:
                names = cfg.concepts
                record["forget_losses"] = {names[j]: loss for j, loss in zip(concepts, f_losses)}
            record["forget_active"] = any(method.forget.active(loss, cfg) for loss in f_losses)
            if relative_margin:
                record["margin"] = cfg.margin
            r_chunks = engine.chunks(remain_x0, remain_cond, idx)
            g_r = None
            if method.uses_remain and method.remain_scope == "batch":
                g_r, record["remain_loss"] = engine.remain_grads(r_chunks)
            else:
                # GA and RGD take no gradient on this batch; its loss still feeds the diagnostic.
                record["remain_loss"] = engine.mean_loss(r_chunks)
                if method.uses_remain:
                    g_r, _ = engine.full_remain_grads(remain_x0, remain_cond, cfg.batch_size)
            finite = math.isfinite(record["forget_loss"]) and math.isfinite(record["remain_loss"])
            finite = finite and all(_finite(g) for g in forget_list) and (g_r is None or _finite(g_r))
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
            gram = None
            if g_r is not None and forget_list:
                gram = gram_matrix([*forget_list, g_r])  # shared by the log and the update rule: computed once
                record.update(step_stats(forget_list, g_r, gram))
                record["projected"] = bool(record["conflict"] and method.projects)
            direction = method.combine(forget_list, g_r, cfg.remain_weight, gram)
            g_f = forget_list[0] if len(forget_list) == 1 else None  # rg-opt restricts one forget gradient
            del forget_list
            if masks is not None:
                for d, m in zip(direction, masks):
                    d.mul_(m)  # SalUn: entries outside the saliency mask get no gradient, so Adam leaves them
            restrict = method.restrict_update and g_f is not None and g_r is not None
            if not restrict:
                del g_f, g_r  # the optimizer's first step allocates its moments: free both gradients first
            if cfg.max_grad_norm > 0:
                norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction)).item()
                if norm > cfg.max_grad_norm:
                    direction = [d * (cfg.max_grad_norm / norm) for d in direction]
            for p, d in zip(params, direction):
                # The gradient in the parameter's own strides: a convolution fed channels-last images
                # returns its weight gradient channels-last, and CUDA's fused Adam refuses a gradient
                # whose strides differ from its parameter's (CPU's does not; the class track once failed
                # on the GPU this way). A copy only where they differ.
                p.grad = d if d.stride() == p.stride() else torch.empty_like(p).copy_(d)
            del direction
            before = [p.detach().clone() for p in params] if restrict else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            checked = False
            if restrict:
                record.update(restrict_realised_update(params, before, g_f, g_r, pair_gram(gram), cfg.cone_margin))
                del g_f, g_r
                if method.backtrack:
                    record.update(backtrack_step(engine, params, before, f_batches[0], r_chunks, record["forget_loss"],
                                                 record["remain_loss"], record["forget_active"], method.backtrack))
                    checked = True  # the realised changes are measured already
                del before
            if not _finite(params):
                # Finite gradients can still overflow the weights (a huge lr or remain_weight): stop before
                # the model or a checkpoint takes them.
                last = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
                kept = f"; the last good checkpoint is {last}" if last else ""
                raise TrainingDiverged(f"step {step}: the update made weights NaN/inf; lower `lr` (now {cfg.lr}) or "
                                       f"`remain_weight` (now {cfg.remain_weight}), or set `max_grad_norm`, then "
                                       f"rerun with --force{kept}")
            scaler.update(True)
            if cfg.diagnose and not checked:
                after = [engine.mean_loss(chunks) for chunks in f_batches]
                record["forget_loss_change"] = sum(after) / len(after) - record["forget_loss"]
                record["remain_loss_change"] = engine.mean_loss(r_chunks) - record["remain_loss"]
            record["seconds"] = time.perf_counter() - started
            if probe is not None and cfg.early_stop_every and step % cfg.early_stop_every == 0:
                # The main process scores; the others receive its score, so every process stops at one step.
                record["probe_forget"] = parallel.sum_scalar(probe() if parallel.is_main else 0.0)
                record["early_stop"] = record["probe_forget"] <= cfg.early_stop_score
            # Training time so far, summed over the sessions of a resumed run (results.json reports the last).
            record["elapsed_seconds"] = elapsed_before + time.perf_counter() - session_start
            history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if record.get("early_stop"):
                bar.set_postfix(stopped=f"forget {record['probe_forget']:.2f}")
                break
            if checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                if parallel.is_main:
                    save_checkpoint(checkpoint_dir, step, named, optimizer, gen, order, cursor,
                                    {"loss_scale": scaler.scale, "good_steps": scaler.good_steps,
                                     "elapsed_seconds": record["elapsed_seconds"]})
                parallel.barrier()
            bar.set_postfix(forget=f"{record['forget_loss']:.3f}", remain=f"{record['remain_loss']:.3f}")
    finally:
        if log:
            log.close()
        bar.close()
    return history
