"""The digit world's metrics as a suite metric: exact forget score and attribute alignment.

The oracle (``worlds/oracle.py``) reads digit, colour and background from each image; the prompt says
which of them were requested. This reuses the spine's arithmetic (``evaluate/world.py``'s
``forget_score`` and ``evaluate/attributes.py``'s ``alignment_scores``); what it adds is reading the
request back from the prompt TEXT (the suite passes prompts, not ``Caption`` objects), with
:func:`parse_caption`, which inverts the world's caption templates using its vocabulary and synonym
tables.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..worlds import digits as world
from ..worlds.digits import Caption
from .attributes import alignment_scores, attribute_hits
from .base import MetricOptions, MetricResult, check_inputs
from .world import forget_score


def _alternatives(words: list[str]) -> str:
    """Regex alternation, longest first, so "leafy green" wins over "green" and "digit two" over "digit"."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_DIGIT_WORDS = {syn: i for i, d in enumerate(world.DIGITS) for syn in world.DIGIT_SYNONYMS[d]}
_COLOUR_WORDS = {syn: i for i, c in enumerate(world.COLOURS) for syn in world.COLOUR_SYNONYMS[c]}
_BACKGROUND_WORDS = {syn: i for i, b in enumerate(world.BACKGROUNDS) for syn in world.BACKGROUND_SYNONYMS[b]}
# The subject of every template is "[colour word] digit-word", where the digit word is a digit synonym or
# the bare word "digit" (digit not requested). A background word is always followed by "background" or
# "backdrop"; anchoring on that keeps filler phrases such as "in a dark attic" from reading as a background.
_SUBJECT = re.compile(rf"\b(?:(?P<colour>{_alternatives(list(_COLOUR_WORDS))})\s+)?"
                      rf"(?P<digit>{_alternatives(list(_DIGIT_WORDS))}|digit)\b")
_BACKGROUND = re.compile(rf"\b(?P<background>{_alternatives(list(_BACKGROUND_WORDS))})\s+(?:background|backdrop)\b")


def parse_caption(text: str) -> Caption:
    """Read the requested attributes back from a digit-world caption.

    Inverse of ``worlds.digits.compose_caption`` (every template, synonym and filler; case-insensitive):
    ``parse_caption(compose_caption(...).text)`` has the same digit, colour and background. Attributes
    the text does not request are ``None``.
    """
    lowered = text.lower()
    digit = colour = background = None
    subject = _SUBJECT.search(lowered)
    if subject:
        digit = _DIGIT_WORDS.get(subject["digit"])  # the bare word "digit" maps to None
        colour = _COLOUR_WORDS[subject["colour"]] if subject["colour"] else None
    bg = _BACKGROUND.search(lowered)
    if bg:
        background = _BACKGROUND_WORDS[bg["background"]]
    return Caption(text=text, digit=digit, colour=colour, background=background)


class OracleMetric:
    """Digit-world forget score (set ``"forget"``) and attribute alignment (every other set).

    * ``"forget"``: ``aggregate = {"forget_score"}``, the fraction of images in which the oracle
      sees ``options.concept`` (lower is better);
    * other sets: ``aggregate = {"alignment", "alignment_digit", "alignment_colour",
      "alignment_background"}``: fraction of images with every requested attribute right, and per
      attribute over the images whose prompt requests it (absent when no prompt does).

    ``per_sample``: the oracle's reading ``{"digit", "colour", "background"}`` (words), the request
    parsed from the prompt (``"requested"``), ``"aligned"`` and, with a concept, ``"shows_concept"``.

    Images of any size are resized to the oracle's 16x16 (bilinear, antialiased).
    """

    name = "oracle"

    def __init__(self, options: MetricOptions) -> None:
        self.options = options
        if options.concept:
            try:
                world.concept_attribute(options.concept)
            except ValueError as e:
                raise UserError(str(e)) from None
        self._oracle: Any = None

    @property
    def oracle(self) -> Any:
        if self._oracle is None:
            from ..worlds.oracle import load_oracle

            self._oracle = load_oracle().to(self.options.device)
        return self._oracle

    def settings(self) -> dict[str, Any]:
        """Oracle weights fingerprint, concept, and how requests are read."""
        from .fid import weights_fingerprint

        return {"oracle": "committed digit-world oracle", "oracle_weights": weights_fingerprint(self.oracle),
                "concept": self.options.concept, "requests": "parsed from the prompt with the world's vocabulary"}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, 3)`` long oracle readings (digit, colour, background)."""
        x = images.float().clamp(-1, 1).to(self.options.device)
        if tuple(x.shape[-2:]) != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            x = F.interpolate(x, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.oracle.predict(x, batch_size=max(self.options.batch_size, 1)).cpu()

    def check(self, set_names: list[str]) -> None:
        """Before any image is made: the forget set needs the concept."""
        if "forget" in set_names and not self.options.concept:
            raise UserError("the oracle metric on the forget set needs the forgotten concept; pass --concept")

    def score(self, images: torch.Tensor, prompts: list[str], set_name: str) -> MetricResult:
        """Score one set (see the class docstring).

        Raises:
            UserError: the forget set without ``options.concept``.
        """
        check_inputs(images, prompts)
        if set_name == "forget" and not self.options.concept:
            raise UserError("the oracle metric on the forget set needs the forgotten concept; pass --concept")
        pred = self.predict(images)
        captions = [parse_caption(p) for p in prompts]
        hits = attribute_hits(pred, captions)
        shows = None
        if self.options.concept:
            attribute = world.concept_attribute(self.options.concept)
            column = world.ATTRIBUTES.index(attribute)
            shows = (pred[:, column] == world.VALUES[attribute].index(self.options.concept)).tolist()
        per_sample = []
        for i, (row, cap) in enumerate(zip(pred.tolist(), captions)):
            sample: dict[str, Any] = {a: world.VALUES[a][row[j]] for j, a in enumerate(world.ATTRIBUTES)}
            sample["requested"] = {a: world.VALUES[a][v] for a, v in cap.requested().items()}
            sample["aligned"] = all(hits[a][i] is not False for a in world.ATTRIBUTES)
            if shows is not None:
                sample["shows_concept"] = bool(shows[i])
            per_sample.append(sample)
        if set_name == "forget":
            aggregate = {"forget_score": forget_score(pred, self.options.concept) if len(pred) else float("nan")}
        else:
            scores = alignment_scores(pred, captions)
            aggregate = {"alignment": scores["all"] if captions else float("nan")}
            # NaN (attribute never requested) is left out: JSON has no NaN and "absent" says it plainly.
            aggregate.update({f"alignment_{a}": scores[a] for a in world.ATTRIBUTES if scores[a] == scores[a]})
        return MetricResult(self.name, aggregate, per_sample, self.settings())
