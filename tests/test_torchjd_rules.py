"""The torchjd Gramian rules (upgrad, mgda, dualproj, imtlg, aligned-mtl) against torchjd's own aggregators,
RG against torchjd's PCGrad, degenerate inputs, and one short run of each rule through THE loop."""

from __future__ import annotations

import sys

import pytest
import torch

from diffunlearn.config import build_config
from diffunlearn.core.training import unlearn
from diffunlearn.core.updates import gradient_gram, gram_matrix, restricted_gradient
from diffunlearn.errors import UserError
from diffunlearn.methods import METHODS, get_method
from diffunlearn.methods.jd import make_weighting, weighting_combine
from test_methods import fresh_adapter, snapshot, tiny_data

aggregation = pytest.importorskip("torchjd.aggregation")

# method name -> torchjd's aggregator over the rows of a matrix (the reference implementation).
RULES = {
    "upgrad": aggregation.UPGrad,
    "mgda": aggregation.MGDA,
    "dualproj": aggregation.DualProj,
    "imtlg": aggregation.IMTLG,
    "aligned-mtl": aggregation.AlignedMTL,
}
SHAPES = [(4, 3), (5,), (2, 3, 2), (7,)]
LAMBDAS = [0.5, 1.6]


def split(flat: torch.Tensor) -> list[torch.Tensor]:
    sizes = [torch.Size(s).numel() for s in SHAPES]
    return [part.reshape(s).to(torch.float32).clone() for part, s in zip(flat.split(sizes), SHAPES)]


def gradients(seed: int, cos: float, remain_scale: float = 0.7) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-parameter float32 gradients (g_f, g_r) with cosine ≈ ``cos`` and ‖g_r‖ = remain_scale·‖g_f‖."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(torch.Size(s).numel() for s in SHAPES)
    f, noise = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    unit_f = f / f.norm()
    ortho = noise - (noise @ unit_f) * unit_f
    unit_r = cos * unit_f + (1 - cos ** 2) ** 0.5 * ortho / ortho.norm()
    return split(f), split(remain_scale * f.norm() * unit_r)


def flat64(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()


def rel_err(direction: list[torch.Tensor], reference: torch.Tensor) -> float:
    return float((flat64(direction) - reference).norm() / reference.norm())


CASES = [pytest.param(-0.6, id="conflict"), pytest.param(0.35, id="aligned")]


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("cos", CASES)
@pytest.mark.parametrize("name", sorted(RULES))
def test_combine_equals_torchjd_aggregator_on_the_stacked_rows(name, cos, lam):
    g_f, g_r = gradients(1, cos)
    gram = gradient_gram(g_f, g_r)
    assert (gram[2] < 0) == (cos < 0)
    ours = METHODS[name].combine([g_f], g_r, lam, gram_matrix([g_f, g_r]))
    assert [d.shape for d in ours] == [g.shape for g in g_f] and all(d.dtype == torch.float32 for d in ours)
    # The reference stacks the flattened rows [g_f, λ·g_r] as torchjd expects. It runs in float64 because our
    # Gramian is float64 (updates.gradient_gram sums in float64): a float32 Gramian would differ from ours by
    # float32 rounding, which the dual-cone QP and MGDA's Frank-Wolfe stopping test can amplify past 1e-5;
    # in float64 only our final float32 per-parameter assembly is left to compare.
    reference = RULES[name]()(torch.stack([flat64(g_f), lam * flat64(g_r)]))
    assert rel_err(ours, reference) < 1e-5
    assert rel_err(METHODS[name].combine([g_f], g_r, lam), reference) < 1e-5  # gram computed when not given


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("cos", CASES)
def test_restricted_gradient_is_pcgrad_on_forget_and_weighted_remain(cos, lam):
    g_f, g_r = gradients(2, cos)
    reference = aggregation.PCGrad()(torch.stack([flat64(g_f), lam * flat64(g_r)]))
    assert rel_err(restricted_gradient(g_f, g_r, lam), reference) < 1e-6
    assert rel_err(METHODS["rg"].combine([g_f], g_r, lam, gram_matrix([g_f, g_r])), reference) < 1e-6


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("cos", CASES)
def test_upgrad_on_two_rows_is_half_the_restricted_gradient(cos, lam):
    """With two rows, UPGrad's dual-cone projection of a row is PCGrad's projection off the other row, so
    upgrad = rg / 2 exactly without conflict. On conflict torchjd's 1e-4 regularisation of the normalised
    Gramian moves it by 1e-5 to 1e-3 relative (more for nearly opposite rows of unequal norms; 5e-4 here)."""
    g_f, g_r = gradients(3, cos)
    half_rg = flat64(restricted_gradient(g_f, g_r, lam)) / 2
    assert rel_err(METHODS["upgrad"].combine([g_f], g_r, lam), half_rg) < (1e-3 if cos < 0 else 1e-6)


@pytest.mark.parametrize("name", sorted(RULES))
def test_tiny_gradients_scale_the_direction_and_keep_the_rule(name):
    """The rules are scale-invariant; combine divides the Gramian by its trace before the weighting, so
    gradients 1e-4 times smaller (trace ~1e-7, under the projector's 1e-4 guard) give a direction exactly
    1e-4 times smaller, not a different rule."""
    g_f, g_r = gradients(4, -0.6)
    big = flat64(METHODS[name].combine([g_f], g_r, 1.6))
    c = 1e-4
    tiny = METHODS[name].combine([[c * g for g in g_f]], [c * g for g in g_r], 1.6)
    assert rel_err(tiny, c * big) < 1e-5


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("name", sorted(RULES))
def test_zero_gradients_give_finite_directions(name, lam):
    g_f, g_r = gradients(5, -0.6)
    zeros = [torch.zeros_like(g) for g in g_f]
    combine = METHODS[name].combine
    # Zero forget gradient (a hinge-capped batch): finite, and as torchjd computes it.
    out = combine([zeros], g_r, lam)
    assert all(torch.isfinite(d).all() for d in out)
    reference = RULES[name]()(torch.stack([flat64(zeros), lam * flat64(g_r)]))
    assert float((flat64(out) - reference).norm()) <= 1e-5 * float(flat64(g_r).norm())
    if name == "mgda":  # a zero row is the min-norm point of the hull: MGDA stops
        assert float(flat64(out).norm()) == 0.0
    else:  # the others follow the remain gradient alone
        cos = flat64(out) @ flat64(g_r) / (flat64(out).norm() * flat64(g_r).norm())
        assert float(cos) == pytest.approx(1.0, abs=1e-6)
    # Zero remain gradient: finite.
    assert all(torch.isfinite(d).all() for d in combine([g_f], zeros, lam))
    # Both zero (G all zeros): a zero direction, no NaN.
    both = combine([zeros], [z.clone() for z in zeros], lam)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in both)
    # Remain weight 0 makes the second row zero, too.
    assert all(torch.isfinite(d).all() for d in combine([g_f], g_r, 0.0))


def test_missing_torchjd_is_a_user_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)  # `import torchjd.aggregation` now fails
    with pytest.raises(UserError, match=r"pip install 'torchjd\[quadprog_projector\]'"):
        make_weighting("UPGradWeighting", "upgrad")
    g_f, g_r = gradients(6, -0.6)
    with pytest.raises(UserError, match="method upgrad needs torchjd"):
        weighting_combine("UPGradWeighting", "upgrad")([g_f], g_r, 1.6)


def test_rules_are_registered_after_the_existing_methods():
    names = list(METHODS)
    assert names[-6:] == ["upgrad", "mgda", "dualproj", "imtlg", "aligned-mtl", "uce"]
    assert names[:3] == ["ga", "graddiff", "rg"]
    for name in RULES:
        m = get_method(name)
        assert m.uses_remain and m.remain_scope == "batch" and m.forget_loss == "ascent"
        assert m.projects == (name in ("upgrad", "dualproj"))
        if name in ("upgrad", "mgda"):  # tuned by the method study (README "Method study")
            assert m.defaults == {"lr": 5.85e-5, "steps": 100, "remain_weight": 6.73, "margin": 0.165}
            assert set(m.modifier_defaults) == {"lr", "remain_weight", "margin"}
        else:                          # not studied yet: rg's earlier values
            assert m.defaults == {"lr": 5e-5, "steps": 100, "remain_weight": 1.6} and not m.modifier_defaults


def test_methods_command_lists_the_rules(capsys, monkeypatch):
    from diffunlearn.cli import main

    monkeypatch.delenv("RANK", raising=False)
    assert main(["methods"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert set(RULES) <= listed


@pytest.mark.parametrize("name", sorted(RULES))
def test_short_run_through_the_loop(text_encoder, name):
    steps = 3
    cfg = build_config(None, [f"method={name}", f"steps={steps}", "batch_size=4", "lr=1e-3",
                              "forget_cap=none"])  # uncapped: the forget gradient is never zeroed by the hinge
    adapter = fresh_adapter(text_encoder)
    before = snapshot(adapter.unet)
    history = unlearn(adapter, get_method(name), cfg, *tiny_data(adapter), progress=False)
    after = snapshot(adapter.unet)
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert len(changed) >= 0.5 * len(after)
    for h in history:
        assert torch.isfinite(torch.tensor([h["forget_loss"], h["remain_loss"]])).all()
        assert h["projected"] == (h["conflict"] and METHODS[name].projects)
