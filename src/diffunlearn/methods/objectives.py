"""Forget objectives: what a gradient method minimises on the forget batch, as objects the loop
binds once per run and calls once per step (issue 14: the method owns its procedure; the loop no
longer knows ESD, SalUn or fine-tuning by name).

An objective has ``kind`` (recorded and used by the study's search spaces), ``needs_reference``
(whether the loop must keep a frozen copy of the model as it was), ``bind(run) -> step`` where
``step(chunks) -> (gradients or None, batch loss)``, and ``active(loss, cfg)`` (whether this
batch's forget term moves the model; logged as ``forget_active``). ESD's objective lives in
``esd.py``, SalUn's remap in ``salun.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..core.training import Bound  # what the loop hands an objective when it binds (defined with the loop)

Step = Callable[[list], tuple[Any, float]]


@dataclasses.dataclass(frozen=True)
class Ascent:
    """Capped gradient ascent on the denoising loss (:func:`losses.forget_objective`): the forget
    term of GA, GradDiff, RG and every update rule built on them."""

    kind: str = "ascent"
    needs_reference: bool = False
    settings: tuple[str, ...] = ("forget_cap", "margin", "alpha", "margin_mode")  # the config keys it reads

    def bind(self, run: Bound) -> Step:
        return lambda chunks: run.engine.forget_grads(chunks, run.cfg)

    def active(self, loss: float, cfg) -> bool:
        return cfg.forget_cap != "hinge" or loss <= cfg.margin


@dataclasses.dataclass(frozen=True)
class NoForget:
    """No forget gradient (fine-tuning on the remain set): the forget batch is only measured."""

    kind: str = "none"
    needs_reference: bool = False
    settings: tuple[str, ...] = ()

    def bind(self, run: Bound) -> Step:
        return lambda chunks: (None, run.engine.mean_loss(chunks))

    def active(self, loss: float, cfg) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Matching:
    """‖f_θ(x_t, c) − target‖² towards a target a frozen copy of the original model computes
    (:func:`losses.matching_loss`); ``target(run)`` builds ``fn(chunk, x_t, t)`` once per run."""

    kind: str
    target: Callable[[Bound], Callable]
    needs_reference: bool = True
    settings: tuple[str, ...] = ()  # the config keys ``target`` reads (ESD: esd_eta)

    def bind(self, run: Bound) -> Step:
        fn = self.target(run)
        return lambda chunks: run.engine.matching_grads(chunks, fn)

    def active(self, loss: float, cfg) -> bool:
        return True


ASCENT = Ascent()
NO_FORGET = NoForget()
