"""``ring-a-bell``: the model-agnostic concept vector (Tsai et al., "Ring-A-Bell! How Reliable are
Concept Removal Methods for Diffusion Models?", ICLR 2024).

The concept vector is the mean difference of the text encoder's token states between prompts with
and without the concept, index-paired (the training-vocabulary pairs: the attacker knows how to
phrase the concept, not the held-out prompts):

    v = mean_i [ E(with_i) − E(without_i) ],

and the attacked condition of a benign held-out prompt p is E(p) + η·v. It needs no access to the
attacked denoiser, only to the (frozen, shared) text encoder, so it tests whether unlearning removed
the concept or only cut the words that name it. Ring-A-Bell then searches for a discrete prompt
close to that embedding; here the embedding itself is used (the attack's upper bound). Every η in
``etas`` is sampled; the attacker keeps the strongest (headline = max).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError
from .base import AttackOutput, AttackSamples, AttackTarget, is_text_model, positive


@dataclasses.dataclass
class RingABellAttack:
    """Settings: the strengths ``etas`` at which the concept vector is added."""

    etas: tuple[float, ...] = (1.0, 3.0, 5.0)
    name: str = dataclasses.field(default="ring-a-bell", init=False)

    def __post_init__(self) -> None:
        etas = (self.etas,) if isinstance(self.etas, (int, float)) else tuple(self.etas)
        if not etas:
            raise UserError("attack setting ring-a-bell.etas must list at least one strength, e.g. 1,3,5")
        self.etas = tuple(positive(e, "ring-a-bell.etas", float) for e in etas)

    def applies(self, adapter: Any) -> str | None:
        if not is_text_model(adapter):
            return "Ring-A-Bell adds a TEXT-embedding concept vector, and this model is conditioned on class labels"
        return None

    def settings(self) -> dict[str, Any]:
        return {"etas": list(self.etas), "vector": "mean token-state difference of paired training prompts"}

    def run(self, target: AttackTarget) -> AttackOutput:
        if target.pairs is None or target.benign is None:
            raise UserError(f"ring-a-bell needs prompts with and without {target.concept!r}; use a digit-world "
                            "concept or a template concept (nudity, van-gogh)")
        adapter = target.adapter
        with_c = adapter.condition_tensors(adapter.encode_prompts(target.pairs[0]))
        without = adapter.condition_tensors(adapter.encode_prompts(target.pairs[1]))
        vector = (with_c[0].float() - without[0].float()).mean(0, keepdim=True)
        benign = adapter.condition_tensors(adapter.encode_prompts(target.benign[:len(target.prompts)]))
        rest = benign[1:]  # a masked text model keeps each benign prompt's own mask
        samples = []
        for eta in self.etas:
            condition = adapter.make_condition(benign[0].float() + eta * vector, *rest)
            samples.append(AttackSamples(f"eta={eta:g}", target.sample_condition(condition),
                                         [f"{p} <+{eta:g}·v>" for p in target.benign[:len(target.prompts)]]))
        return AttackOutput(samples, headline="max", details={"vector_norm": float(vector.norm()),
                                                              "pairs": len(target.pairs[0])})
