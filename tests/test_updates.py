"""Update rules on hand-made vectors, checked against a flat-vector implementation written here."""

from __future__ import annotations

import pytest
import torch

from diffunlearn.core.updates import gradient_ascent, gradient_difference, restricted_gradient, restricted_gradient_flat


def split_like(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, start = [], 0
    for s in shapes:
        n = int(torch.tensor(s).prod())
        out.append(flat[start:start + n].reshape(s))
        start += n
    return out


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def reference_rg(gf: torch.Tensor, gr: torch.Tensor, lam: float) -> torch.Tensor:
    """The reference code's way: flat vectors, project, combine (PAPER.md §2)."""
    dot = gf @ gr
    if dot < 0:
        df = gf - dot / (gr @ gr) * gr
        dr = gr - dot / (gf @ gf) * gf
    else:
        df, dr = gf, gr
    return df + lam * dr


SHAPES = [(3, 4), (5,), (2, 2, 2)]


def test_conflict_projection_is_orthogonal_to_the_other_original_gradient():
    gf = split_like(torch.tensor([1.0, 0.0] + [0.0] * 23, dtype=torch.float64), SHAPES)
    gr = split_like(torch.tensor([-1.0, 1.0] + [0.0] * 23, dtype=torch.float64), SHAPES)
    # dot = -1, |gr|^2 = 2, |gf|^2 = 1: δ_f = (1,0) + 1/2 (-1,1) = (0.5, 0.5); δ_r = (-1,1) + (1,0) = (0, 1)
    d = flat(restricted_gradient(gf, gr, remain_weight=1.0))
    assert d[:2].tolist() == pytest.approx([0.5, 1.5])
    assert torch.count_nonzero(d[2:]) == 0
    # With λ = 0 the direction is δ_f alone, orthogonal to the ORIGINAL g_r.
    df = flat(restricted_gradient(gf, gr, remain_weight=0.0))
    assert float(df @ flat(gr)) == pytest.approx(0.0, abs=1e-12)
    assert df[:2].tolist() == pytest.approx([0.5, 0.5])


def test_delta_r_is_orthogonal_to_original_forget_gradient_on_random_conflicts():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        gf_flat = torch.randn(25, generator=gen, dtype=torch.float64)
        gr_flat = torch.randn(25, generator=gen, dtype=torch.float64)
        if gf_flat @ gr_flat >= 0:
            gr_flat = -gr_flat
        gf, gr = split_like(gf_flat, SHAPES), split_like(gr_flat, SHAPES)
        d0 = flat(restricted_gradient(gf, gr, 0.0))           # δ_f
        d1 = flat(restricted_gradient(gf, gr, 1.0))           # δ_f + δ_r
        delta_r = d1 - d0
        assert float(d0 @ gr_flat) == pytest.approx(0.0, abs=1e-9)
        assert float(delta_r @ gf_flat) == pytest.approx(0.0, abs=1e-9)
        assert torch.allclose(d1, reference_rg(gf_flat, gr_flat, 1.0), atol=1e-12)


def test_no_conflict_leaves_gradients_untouched():
    gf = split_like(torch.arange(25, dtype=torch.float64), SHAPES)
    gr = split_like(torch.ones(25, dtype=torch.float64), SHAPES)
    d = flat(restricted_gradient(gf, gr, remain_weight=2.5))
    assert torch.equal(d, torch.arange(25, dtype=torch.float64) + 2.5)
    assert torch.equal(d, flat(gradient_difference(gf, gr, 2.5)))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.6, 5.0])
def test_remain_weight_scaling_matches_flat_reference(lam):
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        gf_flat = torch.randn(25, generator=gen, dtype=torch.float64)
        gr_flat = torch.randn(25, generator=gen, dtype=torch.float64)
        got = flat(restricted_gradient(split_like(gf_flat, SHAPES), split_like(gr_flat, SHAPES), lam))
        assert torch.allclose(got, reference_rg(gf_flat, gr_flat, lam), atol=1e-12)


def test_zero_gradients_give_no_nan():
    zeros = [torch.zeros(s) for s in SHAPES]
    ones = [torch.ones(s) for s in SHAPES]
    for a, b in ((zeros, ones), (ones, zeros), (zeros, zeros)):
        d = flat(restricted_gradient(a, b, 1.6))
        assert torch.isfinite(d).all()
        assert torch.equal(d, flat(a) + 1.6 * flat(b))


def test_gradient_difference_and_ascent():
    gf = [torch.tensor([1.0, -2.0]), torch.tensor([3.0])]
    gr = [torch.tensor([0.5, 0.5]), torch.tensor([-1.0])]
    assert flat(gradient_difference(gf, gr, 2.0)).tolist() == [2.0, -1.0, 1.0]
    ga = gradient_ascent(gf)
    assert flat(ga).tolist() == [1.0, -2.0, 3.0]
    ga[0][0] = 99.0  # a copy, not the caller's tensor
    assert gf[0][0].item() == 1.0


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="one tensor per parameter"):
        restricted_gradient([torch.ones(2)], [torch.ones(2), torch.ones(1)])
    with pytest.raises(ValueError, match="shape"):
        gradient_difference([torch.ones(2)], [torch.ones(3)])


def test_first_order_monotonicity_of_a_small_plain_step():
    """PAPER.md §2: a small plain step along −d lowers both objectives when they conflict."""
    torch.manual_seed(0)
    a, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    loss_f = lambda w: ((w - a) ** 2).sum()  # noqa: E731
    loss_r = lambda w: ((w - b) ** 2).sum()  # noqa: E731
    w = (a + b) / 2 + 0.1 * torch.randn(6, dtype=torch.float64)
    w.requires_grad_(True)
    gf = torch.autograd.grad(loss_f(w), w)[0]
    gr = torch.autograd.grad(loss_r(w), w)[0]
    assert gf @ gr < 0
    d = restricted_gradient([gf], [gr], 1.0)[0]
    with torch.no_grad():
        w2 = w - 1e-4 * d
        assert loss_f(w2) < loss_f(w) and loss_r(w2) < loss_r(w)
        w3 = w - 1e-4 * gradient_difference([gf], [gr], 1.0)[0]
        # Plain GradDiff raises one of them here (it is dominated by the larger gradient).
        assert (loss_f(w3) > loss_f(w)) or (loss_r(w3) > loss_r(w))


def test_flat_variant_equals_per_parameter_rg_and_returns_split_shapes():
    gen = torch.Generator().manual_seed(3)
    for lam in (0.5, 1.6):
        for _ in range(5):
            gf = [torch.randn(s, generator=gen) for s in SHAPES]
            gr = [torch.randn(s, generator=gen) for s in SHAPES]
            got = restricted_gradient_flat(gf, gr, lam)
            assert [tuple(g.shape) for g in got] == SHAPES
            assert torch.allclose(flat(got), flat(restricted_gradient(gf, gr, lam)), atol=1e-5)


def test_the_loop_gramian_has_every_pairwise_dot_and_equals_the_two_gradient_numbers():
    from diffunlearn.core.updates import gradient_gram, gram_matrix, pair_gram

    gen = torch.Generator().manual_seed(11)
    rows = [split_like(torch.randn(25, generator=gen), SHAPES) for _ in range(4)]
    G = gram_matrix(rows)
    for i in range(4):
        for j in range(4):
            assert G[i][j] == pytest.approx(float(flat(rows[i]).double() @ flat(rows[j]).double()), rel=1e-6)
            assert G[i][j] == G[j][i]
    # k = 1: exactly the numbers the two-gradient rules used before the list signature.
    assert pair_gram(gram_matrix(rows[:2])) == gradient_gram(rows[0], rows[1])
    with pytest.raises(ValueError, match="2x2"):
        pair_gram(G)


def test_combine_takes_a_list_of_forget_gradients():
    from diffunlearn.core.updates import gram_matrix
    from diffunlearn.methods import METHODS

    gen = torch.Generator().manual_seed(12)
    f1, f2, r = (split_like(torch.randn(25, generator=gen), SHAPES) for _ in range(3))
    lam = 2.5
    # GradDiff and GA sum the k forget gradients; with k = 1 they are today's rules, value for value.
    both = METHODS["graddiff"].combine([f1, f2], r, lam)
    assert torch.allclose(flat(both), flat(f1) + flat(f2) + lam * flat(r), atol=1e-6)
    assert torch.equal(flat(METHODS["ga"].combine([f1, f2], None, lam)), flat(f1) + flat(f2))
    assert torch.equal(flat(METHODS["graddiff"].combine([f1], r, lam)), flat(gradient_difference(f1, r, lam)))
    assert torch.equal(flat(METHODS["rg"].combine([f1], r, lam, gram_matrix([f1, r]))),
                       flat(restricted_gradient(f1, r, lam)))
    # RG takes the k forget gradients as its k-way form (tests/test_kway_rules.py checks its numbers).
    from diffunlearn.core.updates import restricted_gradient_k

    assert torch.equal(flat(METHODS["rg"].combine([f1, f2], r, lam)), flat(restricted_gradient_k([f1, f2], r, lam)))


def test_adam_is_fused_where_torch_has_it_and_takes_the_default_steps():
    """The loop's Adam: fused on CPU float32 parameters, and over 20 steps the same weights as torch's
    default Adam within float rounding (its update rule is unchanged, only the kernel)."""
    from diffunlearn.core.training import adam

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32), torch.randn(8, 4, 3, 3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(20)]
    runs = {}
    for name, make in (("ours", lambda ps: adam(ps, 1e-2)), ("default", lambda ps: torch.optim.Adam(ps, lr=1e-2))):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs[name] = (opt, params)
    assert runs["ours"][0].param_groups[0]["fused"] is True
    moved = max((a - b).abs().max().item() for a, b in zip(runs["default"][1], start))
    assert moved > 0.1  # 20 steps at lr 1e-2 move the weights by about 0.2
    diff = max((a - b).abs().max().item() for a, b in zip(runs["ours"][1], runs["default"][1]))
    assert diff < 1e-5
