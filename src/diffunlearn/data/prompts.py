"""Paired forget/remain prompt sets with the paper's diversity procedure (PAPER.md §3).

* ``diverse``: each pair comes from the templates with fresh filler slots; the remain prompt is the
  forget prompt with the concept changed and nothing else (a modifier concept such as a colour is
  deleted, as the paper deletes "nude"; an object concept such as a digit is replaced by another
  digit, the class-wise analogue where the remain set is the other classes). Paired by index.
* ``uniform``: the non-diverse baseline, one forget prompt and one remain prompt, repeated.
"""

from __future__ import annotations

import random

from ..worlds import digits as world
from ..worlds.digits import Caption


def build_pairs(concept: str, n: int, diversity: str = "diverse", split: str = "train", seed: int = 0
                ) -> tuple[list[Caption], list[Caption]]:
    """Make ``n`` index-paired (forget, remain) captions for ``concept``.

    Args:
        concept: a digit word ("three") or a colour word ("red").
        split: ``"train"`` for unlearning data, ``"test"`` for the disjoint held-out filler vocabulary.

    Raises:
        ValueError: unknown concept or diversity.
    """
    attribute = world.concept_attribute(concept)
    value = world.VALUES[attribute].index(concept)
    others = [i for i in range(len(world.VALUES[attribute])) if i != value]
    if diversity == "uniform":
        if attribute == "digit":
            forget = Caption(f"an image of a {concept}", digit=value)
            remain = Caption(f"an image of a {world.DIGITS[others[0]]}", digit=others[0])
        else:
            forget = Caption(f"an image of a {concept} digit", colour=value)
            remain = Caption("an image of a digit")
        return [forget] * n, [remain] * n
    if diversity != "diverse":
        raise ValueError(f"unknown diversity {diversity!r}; use diverse or uniform")
    rng = random.Random(f"pairs:{concept}:{split}:{seed}")
    forget_caps, remain_caps = [], []
    for i in range(n):
        attrs = {a: (None if rng.random() < 0.15 else rng.randrange(len(world.VALUES[a]))) for a in world.ATTRIBUTES}
        with_filler = rng.random() > 0.1
        state = rng.getstate()
        attrs[attribute] = value
        forget_caps.append(world.compose_caption(rng, **attrs, split=split, with_filler=with_filler))
        rng.setstate(state)
        attrs[attribute] = others[i % len(others)] if attribute == "digit" else None
        remain_caps.append(world.compose_caption(rng, **attrs, split=split, with_filler=with_filler))
    return forget_caps, remain_caps


def eval_sets(concept: str, n: int, split: str = "test", seed: int = 0) -> tuple[list[Caption], list[Caption]]:
    """Evaluation prompts: ``split="test"`` gives the held-out sets (disjoint filler vocabulary,
    never used for tuning); ``split="train"`` gives the sets hyperparameters are tuned on.

    Returns:
        forget: ``n`` captions that request the concept; remain: ``n`` captions that do not: the
        concept's attribute is another value (80%) or left out (20%), other attributes random.
    """
    attribute = world.concept_attribute(concept)
    value = world.VALUES[attribute].index(concept)
    others = [i for i in range(len(world.VALUES[attribute])) if i != value]
    rng = random.Random(f"eval:{concept}:{split}:{seed}")
    forget = [world.random_caption(rng, split, fixed={attribute: value}) for _ in range(n)]
    remain = []
    for _ in range(n):
        other = rng.choice(others) if rng.random() < 0.8 else None
        remain.append(world.random_caption(rng, split, fixed={attribute: other}))
    return forget, remain
