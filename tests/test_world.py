"""The digit world: captions, pairing, rendering and the oracle."""

from __future__ import annotations

import random

import pytest
import torch

from diffunlearn.data.prompts import build_pairs, eval_sets
from diffunlearn.worlds import digits as world
from diffunlearn.worlds.oracle import heldout_accuracy, load_oracle


def test_oracle_heldout_accuracy_at_least_98_percent():
    acc = heldout_accuracy(load_oracle(), n=1500, seed=5)
    assert set(acc) == {"digit", "colour", "background"}
    assert all(v >= 0.98 for v in acc.values()), acc


def test_render_shapes_ranges_and_requested_attributes():
    gen = torch.Generator().manual_seed(0)
    images, labels = world.render([3, None, 7], [0, 4, None], [None, 1, 2], gen)
    assert images.shape == (3, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    assert labels[0, 0] == 3 and labels[0, 1] == 0 and labels[1, 1] == 4 and labels[2, 0] == 7 and labels[2, 2] == 2


def test_train_and_test_fillers_are_disjoint_and_used():
    for slot in world.TRAIN_FILLERS:
        assert not set(world.TRAIN_FILLERS[slot]) & set(world.TEST_FILLERS[slot])
    rng = random.Random(0)
    texts = [world.random_caption(rng, "test").text for _ in range(200)]
    train_words = {f for v in world.TRAIN_FILLERS.values() for f in v}
    assert not any(f in t for t in texts for f in train_words)
    assert sum(any(f in t for f in world.TEST_FILLERS["setting"]) for t in texts) > 150


@pytest.mark.parametrize("concept", ["red", "three"])
def test_diverse_pairs_differ_only_in_the_concept(concept):
    forget, remain = build_pairs(concept, 60, "diverse", seed=3)
    assert len(forget) == len(remain) == 60
    attribute = world.concept_attribute(concept)
    value = world.VALUES[attribute].index(concept)
    for f, r in zip(forget, remain):
        assert getattr(f, attribute) == value and getattr(r, attribute) != value
        for other in world.ATTRIBUTES:
            if other != attribute:
                assert getattr(f, other) == getattr(r, other)
    if concept == "red":
        # The paper's pairing: the remain prompt is the forget prompt with the concept word deleted.
        for f, r in zip(forget, remain):
            assert r.colour is None
            assert f.text.split() != r.text.split() and len(f.text.split()) == len(r.text.split()) + 1
    else:
        assert {r.digit for r in remain} == set(range(10)) - {3}
    assert len({f.text for f in forget}) > 50  # diverse


def test_uniform_pairs_repeat_one_prompt():
    forget, remain = build_pairs("red", 10, "uniform")
    assert len({f.text for f in forget}) == 1 and len({r.text for r in remain}) == 1
    assert forget[0].colour == 0 and remain[0].colour is None


def test_eval_sets_request_or_avoid_the_concept():
    forget, remain = eval_sets("three", 50)
    assert all(c.digit == 3 for c in forget)
    assert all(c.digit != 3 for c in remain)
    assert any(c.digit is None for c in remain)
    train_forget, _ = eval_sets("three", 50, split="train")
    train_words = {f for v in world.TRAIN_FILLERS.values() for f in v}
    test_words = {f for v in world.TEST_FILLERS.values() for f in v}
    assert not any(w in c.text for c in forget + remain for w in train_words)
    assert not any(w in c.text for c in train_forget for w in test_words)
    assert sum(any(w in c.text for w in test_words) for c in forget) >= 40


def test_unknown_concept_is_rejected():
    with pytest.raises(ValueError, match="unknown concept 'dragon'"):
        build_pairs("dragon", 4)


@pytest.mark.parametrize("fraction, named", [(0.0, 0), (0.25, 64), (0.5, 128), (1.0, 256)])
def test_remain_neighbours_name_other_colours_in_that_fraction(fraction, named):
    base_forget, base_remain = build_pairs("red", 256, "diverse", seed=2)
    forget, remain = build_pairs("red", 256, "diverse", seed=2, neighbours=fraction)
    # The forget prompts do not move, so a comparison across fractions changes only the remain side.
    assert [f.text for f in forget] == [f.text for f in base_forget]
    neighbour = [r for r in remain if r.colour is not None]
    assert len(neighbour) == named
    red = world.COLOURS.index("red")
    assert all(r.colour != red for r in remain)
    if named:
        counts = [sum(r.colour == c for r in neighbour) for c in range(len(world.COLOURS)) if c != red]
        assert max(counts) - min(counts) <= 1  # every other colour, cycled evenly
    for f, r, b in zip(forget, remain, base_remain):
        for other in world.ATTRIBUTES:
            if other != "colour":
                assert getattr(f, other) == getattr(r, other) == getattr(b, other)
        if r.colour is None:
            assert r.text == b.text  # the pairs left alone are exactly the deleted form


def test_remain_neighbours_respect_excluded_colours_and_refuse_digits():
    _, remain = build_pairs("red", 40, "diverse", neighbours=1.0, exclude=["blue"])
    assert {r.colour for r in remain} == {world.COLOURS.index(c) for c in world.COLOURS} - {
        world.COLOURS.index("red"), world.COLOURS.index("blue")}
    with pytest.raises(ValueError, match="already name another digit"):
        build_pairs("three", 4, neighbours=0.5)
    with pytest.raises(ValueError, match="needs diversity=diverse"):
        build_pairs("red", 4, "uniform", neighbours=0.5)
