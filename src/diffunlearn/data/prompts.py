"""Paired forget/remain prompt sets with the paper's diversity procedure (PAPER.md §3).

* ``diverse``: each pair comes from the templates with fresh filler slots; the remain prompt is the
  forget prompt with the concept changed and nothing else (a modifier concept such as a colour is
  deleted, as the paper deletes "nude"; an object concept such as a digit is replaced by another
  digit, the class-wise analogue where the remain set is the other classes). Paired by index.
  ``neighbours`` (a colour concept only) names another colour instead in that fraction of the remain
  prompts: the concept's neighbours, which the deleted form never shows the remain loss.
* ``uniform``: the non-diverse baseline, one forget prompt and one remain prompt, repeated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..worlds import digits as world
from ..worlds.digits import Caption


def excluded_values(concepts: Sequence[str]) -> dict[str, set[int]]:
    """attribute -> value indices of ``concepts`` (the other concepts of a several-concept run, which
    no prompt of this concept's pairs may show)."""
    out: dict[str, set[int]] = {a: set() for a in world.ATTRIBUTES}
    for c in concepts:
        attribute = world.concept_attribute(c)
        out[attribute].add(world.VALUES[attribute].index(c))
    return out


def _draw(rng: random.Random, attribute: str, avoid: set[int]) -> int | None:
    """A random attribute value (or None: left out, 15%), redrawn while it is one to avoid. With
    nothing to avoid this is the single draw of a one-concept run, so its prompts are unchanged."""
    while True:
        value = None if rng.random() < 0.15 else rng.randrange(len(world.VALUES[attribute]))
        if value is None or value not in avoid:
            return value


def build_pairs(concept: str, n: int, diversity: str = "diverse", split: str = "train", seed: int = 0,
                exclude: Sequence[str] = (), neighbours: float = 0.0) -> tuple[list[Caption], list[Caption]]:
    """Make ``n`` index-paired (forget, remain) captions for ``concept``.

    Args:
        concept: a digit word ("three") or a colour word ("red").
        split: ``"train"`` for unlearning data, ``"test"`` for the disjoint held-out filler vocabulary.
        exclude: the other concepts of a several-concept run: neither caption of a pair shows any of
            them (random attributes are redrawn, a digit is replaced by a digit not listed).
        neighbours: for a colour concept, the fraction of pairs whose remain prompt replaces the colour
            by another (cycling through the colours not excluded) instead of deleting it. The pairs
            chosen are spread evenly (pair i when ``floor((i + 1) f) > floor(i f)``) and draw no random
            numbers, so 0 gives exactly the prompts of the deleted form.

    Raises:
        ValueError: unknown concept or diversity, or ``exclude`` leaves no value to pair with, or
            ``neighbours`` is set for a digit concept or the uniform set.
    """
    attribute = world.concept_attribute(concept)
    value = world.VALUES[attribute].index(concept)
    avoid = excluded_values(exclude)
    others = [i for i in range(len(world.VALUES[attribute])) if i != value and i not in avoid[attribute]]
    if not others and attribute == "digit":
        raise ValueError(f"the concepts {[concept, *exclude]} leave no other digit for the remain prompts")
    if not 0 <= neighbours <= 1:
        raise ValueError(f"neighbours is a fraction, got {neighbours}")
    if neighbours and attribute == "digit":
        raise ValueError(f"{concept!r} is a digit, whose remain prompts already name another digit; "
                         "remain_neighbours is for a colour concept")
    if neighbours and diversity != "diverse":
        raise ValueError("remain_neighbours needs diversity=diverse (the uniform set has one remain prompt)")
    if neighbours and not others:
        raise ValueError(f"the concepts {[concept, *exclude]} leave no other colour for remain_neighbours")
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
    replaced = 0
    for i in range(n):
        attrs = {a: _draw(rng, a, avoid[a]) for a in world.ATTRIBUTES}
        with_filler = rng.random() > 0.1
        state = rng.getstate()
        attrs[attribute] = value
        forget_caps.append(world.compose_caption(rng, **attrs, split=split, with_filler=with_filler))
        rng.setstate(state)
        if attribute == "digit":
            attrs[attribute] = others[i % len(others)]
        elif int((i + 1) * neighbours) > int(i * neighbours):  # this pair names a neighbour colour
            attrs[attribute] = others[replaced % len(others)]
            replaced += 1
        else:
            attrs[attribute] = None
        remain_caps.append(world.compose_caption(rng, **attrs, split=split, with_filler=with_filler))
    return forget_caps, remain_caps


def eval_sets(concept: str, n: int, split: str = "test", seed: int = 0) -> tuple[list[Caption], list[Caption]]:
    """Evaluation prompts: ``split="test"`` gives the held-out sets (disjoint filler vocabulary,
    never used for tuning); ``split="train"`` gives the sets hyperparameters are tuned on.

    Returns:
        forget: ``n`` captions that request the concept; remain: ``n`` captions that do not: the
        concept's attribute is another value (80%) or left out (20%), other attributes random.
    """
    if "," in concept:
        return multi_eval_sets(concept.split(","), n, split, seed)
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


def multi_eval_sets(concepts: Sequence[str], n: int, split: str = "test", seed: int = 0
                    ) -> tuple[list[Caption], list[Caption]]:
    """The evaluation prompts of a several-concept run: ``n`` forget captions per concept (that
    concept requested, no other listed concept shown), concatenated in the order of ``concepts``, and
    ``n`` remain captions that show none of them (attribute values drawn from the unlisted ones, or
    left out, with the one-concept set's 80/20 split for each listed attribute)."""
    avoid = excluded_values(concepts)
    forget: list[Caption] = []
    for c in concepts:
        attribute = world.concept_attribute(c)
        rng = random.Random(f"eval:{c}:{split}:{seed}:multi:{','.join(concepts)}")
        rest = excluded_values([x for x in concepts if x != c])
        for _ in range(n):
            fixed = {attribute: world.VALUES[attribute].index(c)}
            fixed.update({a: _draw(rng, a, rest[a]) for a in world.ATTRIBUTES if a != attribute and rest[a]})
            forget.append(world.random_caption(rng, split, fixed=fixed))
    rng = random.Random(f"eval:remain:{split}:{seed}:multi:{','.join(concepts)}")
    remain = []
    for _ in range(n):
        fixed = {}
        for a in world.ATTRIBUTES:
            if avoid[a]:
                allowed = [i for i in range(len(world.VALUES[a])) if i not in avoid[a]]
                fixed[a] = rng.choice(allowed) if allowed and rng.random() < 0.8 else None
        remain.append(world.random_caption(rng, split, fixed=fixed))
    return forget, remain
