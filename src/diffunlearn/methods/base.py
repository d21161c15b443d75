"""What a method is: which gradients it needs, its forget objective, how it combines them, and the
procedure that applies it (the shared gradient loop unless the method brings its own)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .objectives import ASCENT

# (forget_grads, remain_grads | None, remain_weight, gram | None) -> direction. forget_grads is a LIST
# of k forget gradients (k = 1 today; several concepts at once need no new signature); gram is
# updates.gram_matrix of [*forget_grads, remain_grads] when the loop has computed it (shared by the
# step log and the rule, not recomputed).
Combine = Callable[..., list[Tensor]]


@dataclasses.dataclass(frozen=True)
class Method:
    """An unlearning method on (forget, remain) data with the denoising objective.

    Attributes:
        name: registry key used in configs and on the command line.
        summary: one line for ``--help`` and reports.
        uses_remain: whether a remain gradient is computed at all.
        remain_scope: ``"batch"`` (one remain minibatch per step, paired with the forget batch) or
            ``"full"`` (mean gradient over the whole remain set every step: RGD, PAPER.md §2).
        combine: ``(forget_grads, remain_grads | None, remain_weight, gram=None) -> direction``, with
            ``forget_grads`` a list of k forget gradients (see ``Combine``).
        projects: whether ``combine`` projects conflicting gradients (logged as ``projected``).
        defaults: config values tuned for this method (digit world, training prompts; README
            "Tuning"); they override the global defaults and are overridden by config files and
            ``key=value``.
        forget: the objective on forget batches (:mod:`diffunlearn.methods.objectives`): capped
            gradient ascent (the default), ESD's negatively guided target (``esd.py``), SalUn's remap
            to an anchor prompt (``salun.py``) or none (fine-tuning); ``forget_loss`` names its kind.
        mask: ``(engine, forget_x0, forget_cond, cfg) -> one bool mask per parameter``, computed once
            on the original weights; only masked entries train (SalUn's saliency, ``salun.py``).
        procedure: how the method is applied, ``(adapter, method, cfg, forget_x0, forget_cond,
            remain_x0, remain_cond, **run) -> history``; None = the shared gradient loop
            (:func:`diffunlearn.core.training.unlearn`). A closed-form method brings its own.
        variant: config values that define this method (e.g. ESD-x's cross-attention selection);
            applied for every model family, under config files and ``key=value``.
        restrict_update: after the optimizer's step, project the REALISED parameter change onto the
            cone of steps that increase neither loss to first order (``updates.cone_correction``):
            the optimizer-aware restricted gradient. Keeps both gradients and a copy of the
            trainable weights during the step.
        modifier_defaults: values that replace ``defaults`` when the concept is a colour (digit world).
        class_world_defaults: values that replace the embedded class world's shared recipe
            (``CLASS_WORLD_DEFAULTS``) for this method, where a study's pick beat that recipe on the
            training prompts; a user's class-conditional model keeps the reference recipe.
        backtrack: with ``restrict_update``, keep the step only if the batch's remain loss fell and its
            forget loss rose, halving it up to this many times (then no step): the realised, not
            first-order, guarantee. Costs two forward passes per try.
        weighs_remain: whether ``combine`` reads ``remain_weight`` (fine-tuning follows the remain
            gradient alone, so λ means nothing to it).
        checks: ``cfg -> list of problems`` with this method's own settings (see :meth:`validate`).
        multi_concept: whether ``combine`` takes k > 1 forget gradients (several concepts in one step);
            ``multi_concept_note`` says why not where it does not.
        needs_images: whether the procedure reads training images (a closed-form edit such as UCE
            reads only text, so no image is generated for it).
    """

    name: str
    summary: str
    uses_remain: bool
    remain_scope: str
    combine: Combine
    projects: bool = False
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    forget: Any = ASCENT
    mask: Callable | None = None
    procedure: Callable | None = None
    variant: dict[str, Any] = dataclasses.field(default_factory=dict)
    restrict_update: bool = False
    backtrack: int = 0
    modifier_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    class_world_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    weighs_remain: bool = True
    checks: Callable | None = None
    multi_concept: bool = True
    multi_concept_note: str = ""
    needs_images: bool = True

    @property
    def settings(self) -> tuple[str, ...]:
        """The config keys this method reads beyond the loop's own (lr, steps, batch, precision ...):
        what a study searches for it and what :meth:`validate` checks."""
        keys = list(self.forget.settings)
        if self.uses_remain and self.weighs_remain:
            keys.append("remain_weight")
        if self.mask is not None:
            keys.append("saliency_fraction")
        if self.restrict_update:
            keys.append("cone_margin")
        return tuple(keys)

    def validate(self, cfg) -> list[str]:
        """Every problem of ``cfg`` that only this method can see (all at once, for the config's one
        error message): a setting that changes another method's procedure but not this one's, and
        the method's own ``checks``. Keys this method ignores at their default values are fine, so
        every recorded config.yaml still loads."""
        errors = []
        if cfg.margin_mode == "relative" and "margin_mode" not in self.settings:
            errors.append(f"`margin_mode: relative` scales the forget hinge of the ascent methods; method {self.name} "
                          "has no hinge, so set margin_mode=absolute")
        if cfg.cone_margin != 0 and "cone_margin" not in self.settings:
            errors.append(f"`cone_margin` narrows rg-opt's no-regress cone; method {self.name} takes Adam's step as it "
                          "is, so drop cone_margin or use method=rg-opt")
        if len(cfg.concepts) > 1 and cfg.forget_batches == "joint" and not self.multi_concept:
            errors.append(f"method {self.name} takes one forget gradient ({self.multi_concept_note}); for several "
                          "concepts at once use forget_batches=interleaved (one concept per step) or a method that "
                          "takes k forget gradients (rg, graddiff, ga, esd-u, esd-x, upgrad, mgda, ...)")
        if len(cfg.concepts) > 1 and self.mask is not None:
            errors.append(f"method {self.name}'s saliency mask is computed from one forget set; run one concept per "
                          "request with it (several concepts at once: rg, graddiff, ...)")
        if len(cfg.concepts) > 1 and cfg.margin_mode == "relative":
            errors.append("`margin_mode: relative` measures one concept's forget loss; use margin_mode=absolute for "
                          "several concepts at once")
        if self.checks is not None:
            errors.extend(self.checks(cfg))
        return errors

    def defaults_for(self, concept: str) -> dict[str, Any]:
        """The digit world's tuned values for ``concept``: ``defaults``, with ``modifier_defaults`` on
        top for a colour (a modifier concept, which the method study found wants other settings)."""
        from ..worlds.digits import COLOURS

        # Several concepts (``three,red``): the modifier values only when every listed concept is a colour.
        concepts = [c.strip() for c in concept.split(",") if c.strip()]
        colours = bool(concepts) and all(c in COLOURS for c in concepts)
        return {**self.defaults, **(self.modifier_defaults if colours else {})}

    @property
    def forget_loss(self) -> str:
        """The kind of forget objective: ``ascent``, ``esd``, ``remap`` or ``none``."""
        return self.forget.kind

    @property
    def saliency(self) -> bool:
        return self.mask is not None

    @property
    def uses_forget(self) -> bool:
        return self.forget_loss != "none"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares with a frozen copy of the original model."""
        return bool(self.forget.needs_reference)

    def apply(self, adapter, cfg, forget_x0, forget_cond, remain_x0, remain_cond, **run) -> list[dict]:
        """Unlearn in place on ``adapter`` and return one record per step (``run``: metrics_path,
        progress, checkpoint_dir, resume, parallel)."""
        if self.procedure is not None:
            return self.procedure(adapter, self, cfg, forget_x0, forget_cond, remain_x0, remain_cond, **run)
        from ..core.training import unlearn

        return unlearn(adapter, self, cfg, forget_x0, forget_cond, remain_x0, remain_cond, **run)
