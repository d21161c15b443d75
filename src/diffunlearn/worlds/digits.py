"""The embedded digit world: real handwritten digits drawn in a colour on a background colour.

Every part of the paper's Stable Diffusion setting has an analogue here (PAPER.md §3):

* images are scikit-learn's bundled handwritten digits (``load_digits``, 1797 real scans at 8x8),
  upsampled to 16x16 and painted with a foreground colour on a background colour;
* captions come from templates with free filler slots (the paper's emotion/activity/location/time
  slots), a few synonyms per word, and a filler vocabulary for TEST prompts that is disjoint from
  the one used in training;
* any attribute may be left out of a caption (it is then drawn at random), so a prompt with one word
  deleted is still in the training distribution: the paired remain prompt of the paper;
* two kinds of concept: an object (a digit, the analogue of a CIFAR class) and a modifier that
  co-occurs with everything (a colour, the analogue of nudity).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16

DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_SYNONYMS: dict[str, tuple[str, ...]] = {
    word: (word, f"number {word}", f"digit {word}") for word in DIGITS
}

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
# RGB in [0, 1]; chosen far apart so that the oracle (and a person) can always tell them apart.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.62, 0.20, 0.85),
}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "leafy green"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
}

BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray")
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
BACKGROUND_SYNONYMS: dict[str, tuple[str, ...]] = {
    "black": ("black", "dark"),
    "white": ("white", "bright white"),
    "gray": ("gray", "grey"),
}

# Filler slots: a manner and a setting, like the paper's emotion/activity/location/time slots.
# Train and test vocabularies are disjoint (PAPER.md §3), so held-out prompts are genuinely new text.
TRAIN_FILLERS: dict[str, tuple[str, ...]] = {
    "manner": ("neatly written", "quickly sketched", "drawn with a pencil", "painted with a brush",
               "scribbled by a child", "carefully traced", "drawn in chalk", "written with a marker",
               "inked with a quill", "drawn with a crayon", "sprayed with paint", "etched in glass",
               "written in pastel", "outlined with charcoal", "drawn by a robot", "written left-handed",
               "drawn with a fountain pen", "lettered with a stencil", "sketched in a hurry", "drawn very slowly",
               "copied from a book", "painted with watercolour", "doodled absent-mindedly", "written in felt tip"),
    "setting": ("in the morning", "at midnight", "in a classroom", "on a notebook page",
                "in a busy office", "at the library", "on a rainy day", "by the window",
                "in the kitchen", "at a museum", "on a sunny afternoon", "in a quiet garden",
                "on a receipt", "on a whiteboard", "in a laboratory", "at the beach",
                "on a napkin", "in winter", "on a paper bag", "in a dark attic",
                "at a bus stop", "on a birthday card", "in a workshop", "at dawn"),
}
TEST_FILLERS: dict[str, tuple[str, ...]] = {
    "manner": ("stamped with ink", "embroidered on cloth", "carved in wood", "printed by a typewriter"),
    "setting": ("late in the evening", "on a postcard", "at a train station", "during a storm"),
}

ATTRIBUTES: tuple[str, ...] = ("digit", "colour", "background")
VALUES: dict[str, tuple[str, ...]] = {"digit": DIGITS, "colour": COLOURS, "background": BACKGROUNDS}
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "digit": DIGIT_SYNONYMS, "colour": COLOUR_SYNONYMS, "background": BACKGROUND_SYNONYMS,
}


def concept_attribute(concept: str) -> str:
    """Return which attribute a concept word belongs to ("digit" or "colour").

    Raises:
        ValueError: the word is not a digit or colour of this world.
    """
    if concept in DIGITS:
        return "digit"
    if concept in COLOURS:
        return "colour"
    raise ValueError(
        f"unknown concept {concept!r}: the digit world can forget a digit ({', '.join(DIGITS)}) "
        f"or a colour ({', '.join(COLOURS)})"
    )


@dataclasses.dataclass(frozen=True)
class Caption:
    """A caption and the attributes it requests (``None`` = not mentioned, drawn at random)."""

    text: str
    digit: int | None = None
    colour: int | None = None
    background: int | None = None

    def requested(self) -> dict[str, int]:
        """The attributes this caption asks for, as ``{attribute: value index}``."""
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


def compose_caption(
    rng: random.Random,
    digit: int | None,
    colour: int | None,
    background: int | None,
    split: str = "train",
    with_filler: bool = True,
) -> Caption:
    """Write a caption for the given attributes with a random template, synonyms and fillers.

    Args:
        rng: source of randomness for template, synonym and filler choice.
        digit, colour, background: value indices, or ``None`` to leave the attribute out.
        split: ``"train"`` or ``"test"``: which filler vocabulary to draw from.
        with_filler: add the filler phrase.
    """
    fillers = TRAIN_FILLERS if split == "train" else TEST_FILLERS
    # Every random choice is drawn whether or not its attribute is used, so two captions composed
    # from the same rng state differ ONLY in the attributes that differ (the paper's index pairing).
    digit_word = rng.choice(DIGIT_SYNONYMS[DIGITS[digit if digit is not None else 0]])
    colour_word = rng.choice(COLOUR_SYNONYMS[COLOURS[colour if colour is not None else 0]])
    bg_word = rng.choice(BACKGROUND_SYNONYMS[BACKGROUNDS[background if background is not None else 0]])
    filler = f"{rng.choice(fillers['manner'])} {rng.choice(fillers['setting'])}"
    if digit is None:
        digit_word = "digit"
    if colour is None:
        colour_word = None
    if background is None:
        bg_word = None
    if not with_filler:
        filler = ""
    subject = f"{colour_word} {digit_word}" if colour_word else digit_word
    template = rng.randrange(3)
    if template == 0:
        text = f"a {subject}"
        if bg_word:
            text += f" on a {bg_word} background"
        if filler:
            text += f", {filler}"
    elif template == 1:
        text = f"{subject}"
        if bg_word:
            text += f", {bg_word} backdrop"
        if filler:
            text += f", {filler}"
    else:
        text = f"a {bg_word} background with a {subject}" if bg_word else f"an image of a {subject}"
        if filler:
            text += f" {filler}"
    return Caption(text=text, digit=digit, colour=colour, background=background)


def random_caption(rng: random.Random, split: str = "train", omit_prob: float = 0.15,
                   fixed: dict[str, int | None] | None = None) -> Caption:
    """Draw random attributes (each left out with ``omit_prob``) and write a caption for them.

    Args:
        fixed: attributes to force, e.g. ``{"digit": 3}``; ``None`` as a value forces omission.
    """
    attrs: dict[str, int | None] = {}
    for name in ATTRIBUTES:
        if fixed and name in fixed:
            attrs[name] = fixed[name]
        else:
            attrs[name] = None if rng.random() < omit_prob else rng.randrange(len(VALUES[name]))
    return compose_caption(rng, attrs["digit"], attrs["colour"], attrs["background"], split=split,
                           with_filler=rng.random() > 0.1)


@lru_cache(maxsize=1)
def digit_glyphs() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 real handwritten digits as 16x16 intensity masks in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    masks = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return masks.clamp(0, 1), torch.tensor(data.target, dtype=torch.long)


def glyph_split(split: str) -> torch.Tensor:
    """Indices of the glyphs used for ``split`` ("train": 80%, "test": 20%, fixed permutation)."""
    _, labels = digit_glyphs()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(labels))
    return perm[:cut] if split == "train" else perm[cut:]


def render(
    digits: Sequence[int | None],
    colours: Sequence[int | None],
    backgrounds: Sequence[int | None],
    generator: torch.Generator,
    split: str = "train",
    exclude: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ground-truth images; ``None`` attributes are drawn at random.

    Args:
        exclude: a concept word (digit or colour) that random draws never produce: the world of a
            model retrained without that concept (exact unlearning). Requests for it are still honoured.

    Returns:
        images: ``(N, 3, 16, 16)`` in [-1, 1]; labels: ``(N, 3)`` long (digit, colour, background).
    """
    masks, glyph_labels = digit_glyphs()
    pool = glyph_split(split)
    n = len(digits)
    labels = torch.empty(n, 3, dtype=torch.long)
    skip = (ATTRIBUTES.index(concept_attribute(exclude)), VALUES[concept_attribute(exclude)].index(exclude)) \
        if exclude else None
    for j, (values, choices) in enumerate(((digits, DIGITS), (colours, COLOURS), (backgrounds, BACKGROUNDS))):
        rand = torch.randint(len(choices), (n,), generator=generator)
        if skip is not None and skip[0] == j:
            # Draw among the other values only: shift draws at or above the excluded index by one.
            rand = torch.randint(len(choices) - 1, (n,), generator=generator)
            rand = rand + (rand >= skip[1]).long()
        labels[:, j] = torch.tensor([rand[i].item() if v is None else v for i, v in enumerate(values)])
    pool_labels = glyph_labels[pool]
    glyph_idx = torch.empty(n, dtype=torch.long)
    for d in range(10):
        rows = (labels[:, 0] == d).nonzero().flatten()
        if len(rows):
            candidates = pool[pool_labels == d]
            glyph_idx[rows] = candidates[torch.randint(len(candidates), (len(rows),), generator=generator)]
    mask = masks[glyph_idx]
    # A one-pixel random shift: handwriting is never centred twice in the same place.
    shifts = torch.randint(-1, 2, (n, 2), generator=generator)
    mask = torch.stack([torch.roll(m, shifts=(int(s[0]), int(s[1])), dims=(1, 2)) for m, s in zip(mask, shifts)])
    fg = torch.tensor([COLOUR_RGB[c] for c in COLOURS])[labels[:, 1]]
    bg = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS])[labels[:, 2]]
    jitter = (torch.rand(n, 2, 3, generator=generator) - 0.5) * 0.08
    fg = (fg + jitter[:, 0]).clamp(0, 1)[:, :, None, None]
    bg = (bg + jitter[:, 1]).clamp(0, 1)[:, :, None, None]
    images = bg * (1 - mask) + fg * mask
    return images * 2 - 1, labels


def render_captions(captions: Sequence[Caption], generator: torch.Generator, split: str = "train",
                    exclude: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render one ground-truth image per caption (unmentioned attributes drawn at random, never
    ``exclude``; see :func:`render`)."""
    return render([c.digit for c in captions], [c.colour for c in captions],
                  [c.background for c in captions], generator, split=split, exclude=exclude)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] to ``(N, H, W, 3)`` uint8, for saving and grids."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def render_classes(labels: torch.Tensor, generator: torch.Generator, split: str = "train") -> torch.Tensor:
    """Images ``(N, 3, 16, 16)`` in [-1, 1] of the digits ``labels``, random colours and backgrounds
    (the class-conditional world's images)."""
    n = len(labels)
    images, _ = render(labels.tolist(), [None] * n, [None] * n, generator, split=split)
    return images
