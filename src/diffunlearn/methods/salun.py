"""SalUn, Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
Image Classification and Generation", ICLR 2024.

A saliency mask keeps the ``saliency_fraction`` (default 0.5) of parameter entries with the largest
forget-loss gradient magnitude, computed once on the original model; only those entries train. The
forget prompt's prediction is remapped to a frozen copy's prediction for an anchor prompt (the
paired remain prompt, or ``anchor`` when set, e.g. "a person wearing clothes" for nudity), plus λ
times the remain loss: d = g_remap + λ·g_r, masked.
"""

import torch

from ..core.updates import summed_direction
from .base import Method
from .objectives import Bound, Matching


def _anchor_target(run: Bound):
    """``fn(chunk, x_t, t)``: the frozen reference's prediction for the anchor prompt (each forget
    row's paired remain prompt, or ``anchor`` when set)."""
    cfg, device, reference = run.cfg, run.engine.device, run.reference
    anchors = run.remain_cond if not cfg.anchor else run.adapter.encode_prompts([cfg.anchor])

    def target(c, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = c.rows if not cfg.anchor else torch.zeros(len(x_t), dtype=torch.long)
        cond = anchors[rows]
        return reference.predict_noise(x_t, t, cond.to(device))

    return target


def saliency_masks(engine, forget_x0: torch.Tensor, forget_cond, cfg) -> list[torch.Tensor]:
    """SalUn's weight saliency (Fan et al. 2024): keep the ``cfg.saliency_fraction`` of parameter
    entries with the largest |∇ forget denoising loss|, over up to four batches of forget data.

    The threshold is global over all trainable entries (ties at the threshold are kept, so the kept
    fraction can exceed the target only by tied entries). Returns one bool mask per parameter.
    """
    n = len(forget_x0)
    rows = torch.randperm(n, generator=engine.gen)[:min(n, 4 * cfg.batch_size)]
    grads, _ = engine.remain_grads(engine.chunks(forget_x0, forget_cond, rows))
    magnitudes = torch.cat([g.abs().reshape(-1).float() for g in grads])
    keep = max(1, round(cfg.saliency_fraction * magnitudes.numel()))
    threshold = torch.kthvalue(magnitudes.cpu(), magnitudes.numel() - keep + 1).values.item()
    del magnitudes
    return [g.abs() >= threshold for g in grads]

def _checks(cfg) -> list[str]:
    if not 0 < cfg.saliency_fraction <= 1:
        return [f"`saliency_fraction` must be in (0, 1], got {cfg.saliency_fraction}"]
    return []


METHOD = Method(
    name="salun",
    checks=_checks,
    summary="SalUn (Fan et al. 2024): saliency-masked remap to an anchor prompt plus the remain loss",
    uses_remain=True,
    remain_scope="batch",
    combine=lambda forget, remain, weight, gram=None: summed_direction(forget, remain, weight),
    forget=Matching("remap", _anchor_target),
    mask=saliency_masks,
    # Tuned on training prompts with the grid sweep of README "Tuning"; the method study (4 trials) found no
    # point that forgets better on the training prompts, so these stay.
    defaults={"lr": 8e-4, "steps": 100, "remain_weight": 1.0},
)
