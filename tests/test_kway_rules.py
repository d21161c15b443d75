"""Issue 16 §1: the update rules over k forget gradients and the remain gradient.

* the k-way restricted gradient against a hand-written reference on flat vectors (conflict-only,
  each row projected against the ORIGINAL other rows, global dot products, the documented order);
* against torchjd's PCGrad on the stacked rows [g_f1, …, g_fk, λ·g_r], with the permutations torchjd
  draws from torch's global generator replayed as our ``orders``;
* k = 1 is today's rule bit for bit; GradDiff and GA sum the k forget gradients;
* the torchjd Gramian weightings on k + 1 rows against torchjd's aggregators on the stacked matrix.
"""

from __future__ import annotations

import pytest
import torch

from diffunlearn.core.updates import (
    gradient_difference,
    gram_matrix,
    pcgrad_weights,
    restricted_gradient,
    restricted_gradient_k,
)
from diffunlearn.methods import get_method

SHAPES = [(3, 4), (5,), (2, 2, 3)]


def random_grads(gen: torch.Generator, conflict: float = 0.0) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen, dtype=torch.float64) + conflict for s in SHAPES]


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def reference(rows: list[torch.Tensor], lam: float, orders=None) -> torch.Tensor:
    """PCGrad on flat vectors, written out: rows [g_f1..g_fk, λ·g_r]."""
    rows = [*rows[:-1], lam * rows[-1]]
    m = len(rows)
    if orders is None:  # the documented order: other forget rows ascending, the remain row last
        orders = [[j for j in range(m - 1) if j != i] + ([m - 1] if i != m - 1 else []) for i in range(m)]
    total = torch.zeros_like(rows[0])
    for i in range(m):
        v = rows[i].clone()
        for j in orders[i]:
            if j != i and torch.dot(v, rows[j]) < 0:
                v = v - torch.dot(v, rows[j]) / torch.dot(rows[j], rows[j]) * rows[j]
        total += v
    return total


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_k_way_rg_matches_the_hand_written_reference(k, seed):
    gen = torch.Generator().manual_seed(seed)
    # Opposite shifts make some pairs conflict and others not.
    forget = [random_grads(gen, conflict=(-0.5 if i % 2 else 0.5)) for i in range(k)]
    remain = random_grads(gen, conflict=-0.3)
    got = flat(restricted_gradient_k(forget, remain, 1.7))
    want = reference([flat(g) for g in forget] + [flat(remain)], 1.7)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    G = gram_matrix([*forget, remain])
    assert any(G[i][j] < 0 for i in range(k + 1) for j in range(k + 1))   # the case has conflicts
    # A gradient that conflicts with none of the others is left as it is: the result is GradDiff's sum.
    aligned = [[g.abs() for g in f] for f in forget]
    d = restricted_gradient_k(aligned, [g.abs() for g in remain], 1.7)
    assert torch.allclose(flat(d), sum(flat(f) for f in aligned) + 1.7 * flat([g.abs() for g in remain]))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_k_way_rg_equals_torchjd_pcgrad_with_the_same_orders(k, seed):
    from torchjd.aggregation import PCGrad

    gen = torch.Generator().manual_seed(100 + seed)
    forget = [random_grads(gen, conflict=(-0.4 if i % 2 else 0.4)) for i in range(k)]
    remain = random_grads(gen, conflict=-0.2)
    lam = 0.8
    matrix = torch.stack([flat(g) for g in forget] + [lam * flat(remain)])
    torch.manual_seed(seed)
    orders = [torch.randperm(k + 1).tolist() for _ in range(k + 1)]   # what PCGradWeighting draws, in order
    torch.manual_seed(seed)
    theirs = PCGrad()(matrix)
    ours = flat(restricted_gradient_k(forget, remain, lam, orders=orders))
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-11)
    assert torch.allclose(ours, reference([flat(g) for g in forget] + [flat(remain)], lam, orders), rtol=1e-10)


def test_k_equals_one_is_todays_rule_bit_for_bit():
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        g_f, g_r = random_grads(gen, 0.3), random_grads(gen, -0.3)
        g_f, g_r = [g.float() for g in g_f], [g.float() for g in g_r]
        want = restricted_gradient(g_f, g_r, 1.6)
        got = get_method("rg").combine([g_f], g_r, 1.6, gram_matrix([g_f, g_r]))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        # The Gramian weights of the k-way form agree with the paper's closed form at k = 1.
        G = gram_matrix([g_f, g_r])
        ff, rr, fr = G[0][0], G[1][1], G[0][1]
        w = pcgrad_weights(G, 1.6)
        closed = (1 - 1.6 * fr / ff, 1 - fr / (1.6 * rr)) if fr < 0 else (1.0, 1.0)
        assert w == pytest.approx(list(closed), rel=1e-12)
        graddiff = get_method("graddiff").combine([g_f], g_r, 1.6)
        assert all(torch.equal(a, b) for a, b in zip(graddiff, gradient_difference(g_f, g_r, 1.6)))


def test_graddiff_and_ga_sum_the_forget_gradients():
    gen = torch.Generator().manual_seed(3)
    forget = [random_grads(gen) for _ in range(3)]
    remain = random_grads(gen)
    total = sum(flat(f) for f in forget)
    assert torch.allclose(flat(get_method("graddiff").combine(forget, remain, 2.0)), total + 2.0 * flat(remain))
    assert torch.allclose(flat(get_method("ga").combine(forget, None, 2.0)), total)


@pytest.mark.parametrize("method, aggregator", [("upgrad", "UPGrad"), ("mgda", "MGDA"), ("dualproj", "DualProj"),
                                                ("imtlg", "IMTLG"), ("aligned-mtl", "AlignedMTL")])
def test_the_torchjd_weightings_take_k_plus_one_rows(method, aggregator):
    import torchjd.aggregation as aggregation

    gen = torch.Generator().manual_seed(11)
    forget = [random_grads(gen, 0.3), random_grads(gen, -0.3)]
    remain = random_grads(gen, 0.1)
    lam = 1.5
    ours = flat(get_method(method).combine(forget, remain, lam, gram_matrix([*forget, remain])))
    matrix = torch.stack([flat(g) for g in forget] + [lam * flat(remain)])
    theirs = getattr(aggregation, aggregator)()(matrix)
    # torchjd regularises the Gramian absolutely (1e-4); ours is trace-normalised first (jd.py).
    assert torch.allclose(ours, theirs, rtol=2e-3, atol=1e-3 * float(theirs.norm()))
    assert float(ours.norm()) > 0
