"""Gramian-based update rules from torchjd (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
Optimization") as ``combine`` functions on the two rows [g_f, λ·g_r].

Every such rule is a weighting of the rows computed from their Gramian alone, so the direction is
w0·g_f + w1·λ·g_r with (w0, w1) = weighting(G) and::

    G = [[g_f·g_f,     λ·g_f·g_r],
         [λ·g_f·g_r,   λ²·g_r·g_r]]

G comes from :func:`diffunlearn.core.updates.gradient_gram` (the three numbers the loop already has, summed
in float64), so nothing is concatenated into a flat Jacobian and the only per-parameter work is one
fused output tensor per parameter. Before the weighting, G is divided by its trace: all five rules
here are scale-invariant in exact arithmetic (the same weights for c·G, c > 0), and dividing keeps
them so for tiny gradients, where torchjd's absolute guards (the dual-cone projector zeroes a
Gramian whose trace is below 1e-4; IMTL-G drops weights summing to under 1e-12) would otherwise
silently change the rule.

With several concepts at once (issue 16) the same weighting runs on the k + 1 rows
[g_f1, …, g_fk, λ·g_r] and their (k+1)×(k+1) Gramian (``row_weights_k``); k = 1 keeps the two-row
code above, number for number.

torchjd is imported on the first step, not when the registry loads, so every other method works
without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.updates import _check, combine_rows, gradient_gram, gram_matrix, pair_gram
from ..errors import UserError
from .base import Combine

INSTALL_HINT = "pip install 'torchjd[quadprog_projector]'"


def make_weighting(name: str, method: str) -> Any:
    """``torchjd.aggregation.<name>()``, or a :class:`UserError` naming the install command.

    Raises:
        UserError: torchjd (or the quadprog solver its dual-cone projector needs) is not installed.
    """
    try:
        import torchjd.aggregation as aggregation

        return getattr(aggregation, name)()
    except ImportError as err:  # torchjd itself, or its optional quadprog/qpsolvers dependencies
        raise UserError(f"method {method} needs torchjd with its quadprog solver ({err}); install it with "
                        f"{INSTALL_HINT}") from err


def gramian(gram: tuple[float, float, float], remain_weight: float) -> Tensor:
    """The float64 CPU Gramian of the rows [g_f, λ·g_r] from ``(g_f·g_f, g_r·g_r, g_f·g_r)``."""
    ff, rr, fr = gram
    lam = float(remain_weight)
    return torch.tensor([[ff, lam * fr], [lam * fr, lam * lam * rr]], dtype=torch.float64)


def normalised_weights(weighting: Callable[[Tensor], Tensor], G: Tensor) -> list[float]:
    """The weighting applied to the trace-normalised Gramian ``G`` of the weighted rows. A zero
    Gramian (every gradient zero) gives zero weights: every direction is zero there."""
    trace = float(G.diagonal().sum())
    if not math.isfinite(trace):
        raise FloatingPointError(f"non-finite gradient Gramian {G.tolist()}")
    if trace <= 0.0:
        return [0.0] * G.shape[0]
    with torch.no_grad():
        w = weighting(G / trace).tolist()  # CPU float64: no device sync
    if not all(math.isfinite(x) for x in w):
        raise FloatingPointError(f"weighting {weighting} gave non-finite weights {w} for Gramian {G.tolist()}")
    return w


def row_weights(weighting: Callable[[Tensor], Tensor], gram: tuple[float, float, float],
                remain_weight: float) -> tuple[float, float]:
    """(w0, w1) with direction w0·g_f + w1·(λ·g_r) (:func:`normalised_weights` of the 2×2 Gramian)."""
    w = normalised_weights(weighting, gramian(gram, remain_weight))
    return w[0], w[1]


def row_weights_k(weighting: Callable[[Tensor], Tensor], gram, remain_weight: float) -> list[float]:
    """The weights of the k + 1 rows [g_f1, …, g_fk, λ·g_r] (several concepts at once) from their
    (k+1)×(k+1) Gramian, normalised as :func:`row_weights` does for two rows."""
    lam = float(remain_weight)
    G = torch.tensor(gram, dtype=torch.float64)
    G[-1, :] *= lam
    G[:, -1] *= lam
    return normalised_weights(weighting, G)


def weighted_direction(forget_grads: Sequence[Tensor], remain_grads: Sequence[Tensor], a: float,
                       b: float) -> list[Tensor]:
    """a·g_f + b·g_r per parameter: one output tensor each, written by fused ops (no flat copies)."""
    if a == 1.0:
        return [torch.add(f, r, alpha=b) for f, r in zip(forget_grads, remain_grads)]
    if a == 0.0:
        return [torch.mul(r, b) for r in remain_grads]
    return [torch.mul(f, a).add_(r, alpha=b) for f, r in zip(forget_grads, remain_grads)]


def weighting_combine(weighting_name: str, method: str) -> Combine:
    """A ``combine`` for :class:`~diffunlearn.methods.base.Method` from the torchjd weighting class
    ``torchjd.aggregation.<weighting_name>`` (built once, on the first call)."""
    cache: list[Any] = []

    def combine(forget: Sequence[Sequence[Tensor]], remain_grads: Sequence[Tensor], remain_weight: float,
                gram=None) -> list[Tensor]:
        if remain_grads is None:
            raise ValueError(f"method {method} needs remain gradients")
        if not cache:
            cache.append(make_weighting(weighting_name, method))
        if len(forget) > 1:  # several concepts: the same weighting on the k + 1 rows
            rows = [*forget, remain_grads]
            w = row_weights_k(cache[0], gram if gram is not None else gram_matrix(rows), remain_weight)
            return combine_rows(rows, [*w[:-1], w[-1] * remain_weight])
        forget_grads = forget[0]
        _check(forget_grads, remain_grads)
        pair = pair_gram(gram) if gram is not None else gradient_gram(forget_grads, remain_grads)
        w0, w1 = row_weights(cache[0], pair, remain_weight)
        return weighted_direction(forget_grads, remain_grads, w0, w1 * remain_weight)

    combine.__name__ = f"{weighting_name}_combine"
    combine.__doc__ = (f"w0·g_f + w1·λ·g_r with (w0, w1) = torchjd.aggregation.{weighting_name}() of the Gramian "
                       "of [g_f, λ·g_r].")
    return combine


# rg's values as a starting point; the method study tunes lr, steps and remain_weight per rule.
START_DEFAULTS = {"lr": 5e-5, "steps": 100, "remain_weight": 1.6}


def gramian_method(name: str, weighting_name: str, projects: bool, summary: str, defaults: dict | None = None,
                   modifier_defaults: dict | None = None):
    """The :class:`~diffunlearn.methods.base.Method` of a torchjd Gramian weighting: paired remain
    batches, :func:`weighting_combine`, :data:`START_DEFAULTS` unless the rule was tuned (each rule
    file states only what differs)."""
    from .base import Method

    return Method(name=name, summary=summary, uses_remain=True, remain_scope="batch",
                  combine=weighting_combine(weighting_name, name), projects=projects,
                  defaults={**START_DEFAULTS, **(defaults or {})}, modifier_defaults=dict(modifier_defaults or {}))
