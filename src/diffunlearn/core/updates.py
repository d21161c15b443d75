"""Update rules: pure functions that combine forget and remain gradients into one direction.

Inputs are equal-length sequences of tensors, one per trainable parameter, holding the gradients of
the losses to MINIMISE (``forget_grads`` = ∇L_f with L_f = −capped forget loss, so minimising it is
gradient ascent on the denoising loss). The result is the direction to write into ``.grad``.

No rule concatenates gradients into a flat vector: dot products and squared norms are accumulated
parameter by parameter (the same numbers as the reference code's flat vectors, PAPER.md §2 memory
note, without a full-model copy of each gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _check(forget_grads: Sequence[Tensor], remain_grads: Sequence[Tensor]) -> None:
    if len(forget_grads) != len(remain_grads):
        raise ValueError(f"forget_grads and remain_grads must have one tensor per parameter; got "
                         f"{len(forget_grads)} and {len(remain_grads)}")
    for i, (f, r) in enumerate(zip(forget_grads, remain_grads)):
        if f.shape != r.shape:
            raise ValueError(f"gradient {i} has shape {tuple(f.shape)} for forget but {tuple(r.shape)} for remain")


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ over all parameters: one BLAS dot per parameter (no temporaries, in the
    gradients' own precision), summed in float64 on the gradients' device (a 0-dim tensor; no host
    sync per parameter)."""
    parts = [torch.dot(x.reshape(-1), y.reshape(-1)).double() for x, y in zip(a, b)]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)


Gram = tuple[tuple[float, ...], ...]  # (k+1)×(k+1): rows g_f1..g_fk, then g_r


def gram_matrix(rows: Sequence[Sequence[Tensor]]) -> Gram:
    """The Gramian G_ij = Σ_params ⟨row_i, row_j⟩ of gradients given per parameter (the loop passes the
    k forget gradients, then the remain gradient): one dot product per parameter and pair, summed in
    float64, one host sync for the whole matrix. No row is flattened or copied."""
    for row in rows[1:]:
        _check(rows[0], row)
    pairs = [(i, j) for i in range(len(rows)) for j in range(i, len(rows))]
    values = torch.stack([global_dot(rows[i], rows[j]) for i, j in pairs]).tolist() if pairs else []
    G = [[0.0] * len(rows) for _ in rows]
    for (i, j), v in zip(pairs, values):
        G[i][j] = G[j][i] = v
    return tuple(tuple(row) for row in G)


def pair_gram(gram: Gram) -> tuple[float, float, float]:
    """(g_f·g_f, g_r·g_r, g_f·g_r) of a 2×2 :func:`gram_matrix` of [g_f, g_r]."""
    if len(gram) != 2:
        raise ValueError(f"a two-gradient rule needs the 2x2 Gramian of [g_f, g_r], got {len(gram)}x{len(gram)}")
    return gram[0][0], gram[1][1], gram[0][1]


def summed_direction(forget_grads: Sequence[Sequence[Tensor]], remain_grads: Sequence[Tensor] | None = None,
                     remain_weight: float = 1.0) -> list[Tensor]:
    """GA's Σ_k g_fk or GradDiff's Σ_k g_fk + λ·g_r in ONE output buffer per parameter; with k = 1
    exactly :func:`gradient_ascent` / :func:`gradient_difference`."""
    if len(forget_grads) == 1:
        if remain_grads is None:
            return gradient_ascent(forget_grads[0])
        return gradient_difference(forget_grads[0], remain_grads, remain_weight)
    if remain_grads is None:
        return combine_rows(forget_grads, [1.0] * len(forget_grads))
    return combine_rows([*forget_grads, remain_grads], [1.0] * len(forget_grads) + [remain_weight])


def single_forget(forget_grads: Sequence[Sequence[Tensor]], rule: str) -> Sequence[Tensor]:
    """The one forget gradient of a two-gradient rule.

    Raises:
        ValueError: more than one forget gradient (the k-way projection rules are not written yet).
    """
    if len(forget_grads) != 1:
        raise ValueError(f"the {rule} rule combines one forget gradient with the remain gradient; it got "
                         f"{len(forget_grads)}")
    return forget_grads[0]


def gradient_gram(forget_grads: Sequence[Tensor], remain_grads: Sequence[Tensor]) -> tuple[float, float, float]:
    """(g_f·g_f, g_r·g_r, g_f·g_r): every number RG and the step log need, computed once per step."""
    _check(forget_grads, remain_grads)
    values = torch.stack([global_dot(forget_grads, forget_grads), global_dot(remain_grads, remain_grads),
                          global_dot(forget_grads, remain_grads)]).tolist()  # one host sync
    return values[0], values[1], values[2]


def gradient_ascent(forget_grads: Sequence[Tensor]) -> list[Tensor]:
    """GA: follow the forget gradient alone (d = g_f)."""
    return [g.clone() for g in forget_grads]


def gradient_difference(forget_grads: Sequence[Tensor], remain_grads: Sequence[Tensor],
                        remain_weight: float = 1.0) -> list[Tensor]:
    """GradDiff: d = g_f + λ·g_r (the RG pipeline without the projection, PAPER.md §2)."""
    _check(forget_grads, remain_grads)
    return [torch.add(f, r, alpha=remain_weight) for f, r in zip(forget_grads, remain_grads)]  # one fused pass


def restricted_gradient(forget_grads: Sequence[Tensor], remain_grads: Sequence[Tensor],
                        remain_weight: float = 1.0, gram: tuple[float, float, float] | None = None) -> list[Tensor]:
    """Restricted gradient (Ko et al. 2024, PAPER.md §2): conflict-only mutual projection.

    With one global dot product over all parameters, if g_f·g_r < 0::

        δ_f = g_f − (g_f·g_r / ‖g_r‖²) g_r,   δ_r = g_r − (g_f·g_r / ‖g_f‖²) g_f

    (each against the ORIGINAL other gradient), else δ_f = g_f, δ_r = g_r. Returns δ_f + λ·δ_r.
    A zero gradient never conflicts (its dot product is 0), so no division by zero can occur.
    ``gram`` = :func:`gradient_gram` of the same gradients when the caller already has it.
    """
    _check(forget_grads, remain_grads)
    ff, rr, dot = gram if gram is not None else gradient_gram(forget_grads, remain_grads)
    if dot >= 0:
        return gradient_difference(forget_grads, remain_grads, remain_weight)
    coef_f = dot / rr  # removes g_r's direction from g_f
    coef_r = dot / ff  # removes g_f's direction from g_r
    # d = a·g_f + b·g_r with a = 1 − λ·coef_r, b = λ − coef_f: no δ buffers, one output tensor per
    # parameter written as a·(g_f + (b/a)·g_r). On conflict coef_r < 0, so a ≥ 1 and b/a is safe.
    a = 1.0 - remain_weight * coef_r
    b = remain_weight - coef_f
    return [torch.add(f, r, alpha=b / a).mul_(a) for f, r in zip(forget_grads, remain_grads)]


def pcgrad_weights(gram: Gram, remain_weight: float = 1.0,
                   orders: Sequence[Sequence[int]] | None = None) -> list[float]:
    """Weights w of the k-way restricted gradient d = Σ_i w_i·g_fi + w_k·(λ·g_r), from the Gramian alone.

    PCGrad's k-task form (Yu et al. 2020, Algorithm 1) on the weighted rows [g_f1, …, g_fk, λ·g_r]:
    each row v_i starts as itself and is projected, in turn, against every OTHER ORIGINAL row g_j it
    still conflicts with (v_i ← v_i − (v_i·g_j / ‖g_j‖²)·g_j when v_i·g_j < 0, global dot products);
    the direction is Σ_i v_i. Every v_i is a combination of the original rows, so the whole rule runs
    on coefficient vectors c_i (v_i = Σ_m c_im·g_m, v_i·g_j = Σ_m c_im·G_mj) and costs nothing per
    parameter until the final weighted sum.

    ``orders[i]`` is the order in which row i meets the others. torchjd draws a random permutation
    per row from torch's global generator; ours is deterministic by default: the other forget rows in
    ascending order, then the remain row LAST, so every forget row ends restricted against the
    remain gradient (the objective the paper protects; a later projection can re-open an earlier
    conflict, never the last one), and the remain row meets the forget rows in ascending order.
    With k = 1 this is the paper's rule: δ_f + λ·δ_r (see :func:`restricted_gradient`).

    Returns:
        k + 1 weights (the last multiplies λ·g_r).
    """
    m = len(gram)
    G = [[float(gram[i][j]) for j in range(m)] for i in range(m)]
    lam = float(remain_weight)
    for i in range(m):  # the Gramian of the weighted rows: the remain row scaled by λ
        G[i][m - 1] *= lam
        G[m - 1][i] *= lam
    if orders is None:
        orders = [[j for j in range(m - 1) if j != i] + ([m - 1] if i != m - 1 else []) for i in range(m)]
    weights = [0.0] * m
    for i in range(m):
        c = [0.0] * m
        c[i] = 1.0
        for j in orders[i]:
            if j == i or G[j][j] <= 0.0:  # a zero row conflicts with nothing
                continue
            inner = sum(c[q] * G[q][j] for q in range(m))
            if inner < 0.0:
                c[j] -= inner / G[j][j]
        weights = [w + x for w, x in zip(weights, c)]
    return weights


def combine_rows(rows: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> list[Tensor]:
    """Σ_i weights_i·rows_i per parameter: one output tensor each, accumulated in place (no flat
    copy, no per-row temporary)."""
    for row in rows[1:]:
        _check(rows[0], row)
    out = [torch.mul(g, weights[0]) for g in rows[0]]
    for row, w in zip(rows[1:], weights[1:]):
        if w != 0.0:
            for acc, g in zip(out, row):
                acc.add_(g, alpha=w)
    return out


def restricted_gradient_k(forget_grads: Sequence[Sequence[Tensor]], remain_grads: Sequence[Tensor],
                          remain_weight: float = 1.0, gram: Gram | None = None,
                          orders: Sequence[Sequence[int]] | None = None) -> list[Tensor]:
    """The restricted gradient over k forget gradients and the remain gradient (:func:`pcgrad_weights`).

    k = 1 is :func:`restricted_gradient` itself (bit for bit). For k > 1 the extra memory is the k − 1
    further forget gradients the caller holds (one model-size buffer each) and one output tensor per
    parameter; the rule itself needs only the (k+1)×(k+1) Gramian.
    """
    if len(forget_grads) == 1:
        return restricted_gradient(forget_grads[0], remain_grads, remain_weight,
                                   pair_gram(gram) if gram is not None else None)
    rows = [*forget_grads, remain_grads]
    gram = gram if gram is not None else gram_matrix(rows)
    w = pcgrad_weights(gram, remain_weight, orders)
    return combine_rows(rows, [*w[:-1], w[-1] * remain_weight])


def gradient_stats(forget_grads: Sequence[Tensor], remain_grads: Sequence[Tensor],
                   gram: tuple[float, float, float] | None = None) -> dict[str, float]:
    """cos(g_f, g_r), both norms and whether the two conflict (for the per-step log)."""
    ff, rr, dot = gram if gram is not None else gradient_gram(forget_grads, remain_grads)
    nf, nr = math.sqrt(ff), math.sqrt(rr)
    cos = dot / (nf * nr) if nf > 0 and nr > 0 else 0.0
    return {"cos": cos, "forget_grad_norm": nf, "remain_grad_norm": nr, "conflict": dot < 0}


def restricted_gradient_flat(forget_grads: Sequence[Tensor], remain_grads: Sequence[Tensor],
                             remain_weight: float = 1.0) -> list[Tensor]:
    """The restricted gradient computed the way the reference code does it (PAPER.md §2 memory
    note): concatenate every gradient into one flat vector per loss, project the flat vectors, then
    split the result back into per-parameter tensors.

    Same numbers as :func:`restricted_gradient` (up to float32 summation order); it exists so
    ``diffunlearn bench`` can measure what the flat copies cost. Do not use it for real runs.
    """
    _check(forget_grads, remain_grads)
    g_f = torch.cat([g.reshape(-1) for g in forget_grads])
    g_r = torch.cat([g.reshape(-1) for g in remain_grads])
    dot = torch.dot(g_f, g_r)
    if dot < 0:
        delta_f = g_f - (dot / torch.dot(g_r, g_r)) * g_r
        delta_r = g_r - (dot / torch.dot(g_f, g_f)) * g_f
    else:
        delta_f, delta_r = g_f, g_r
    flat = delta_f + remain_weight * delta_r
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in forget_grads]), forget_grads)]


def cone_correction(forget_dot: float, remain_dot: float, gram: tuple[float, float, float]
                    ) -> tuple[float, float] | None:
    """Coefficients (a, b) such that u − a·g_f − b·g_r is the Euclidean projection of an update u onto
    the cone {u : g_f·u ≤ 0, g_r·u ≤ 0} of steps that increase neither loss to first order.

    Inputs are scalars only: ``forget_dot`` = g_f·u, ``remain_dot`` = g_r·u and ``gram`` =
    (g_f·g_f, g_r·g_r, g_f·g_r), so the correction costs no extra full-size buffer. The projection is
    the KKT solution of a 2-constraint quadratic program: no constraint, one constraint, or both
    active with non-negative multipliers; the feasible candidate nearest to u wins.

    Returns:
        (a, b) with a, b ≥ 0; (0, 0) when u already lies in the cone. In exact arithmetic one of the
        candidates always exists (the cone is closed and convex); None only if rounding rejects
        them all, in which case the caller drops the update.
    """
    ff, rr, fr = gram
    tol = 1e-12 * max(1.0, abs(forget_dot), abs(remain_dot))
    if forget_dot <= tol and remain_dot <= tol:
        return 0.0, 0.0
    candidates = []
    if forget_dot > 0 and ff > 0:
        a = forget_dot / ff
        if remain_dot - a * fr <= tol:
            candidates.append((a, 0.0))
    if remain_dot > 0 and rr > 0:
        b = remain_dot / rr
        if forget_dot - b * fr <= tol:
            candidates.append((0.0, b))
    det = ff * rr - fr * fr
    if det > 1e-12 * max(ff * rr, 1e-300):
        a = (rr * forget_dot - fr * remain_dot) / det
        b = (ff * remain_dot - fr * forget_dot) / det
        if a >= 0 and b >= 0:
            candidates.append((a, b))
    if not candidates:
        return None
    return min(candidates, key=lambda ab: ab[0] ** 2 * ff + 2 * ab[0] * ab[1] * fr + ab[1] ** 2 * rr)
