"""Red-team attacks: one file each, an explicit registry keyed by the name used on the command line.

``diffunlearn attack`` (``diffunlearn.jobs.attack``) runs them and scores their samples with the
ordinary metrics. Each attack is a dataclass of its settings with ``applies``, ``settings`` and
``run`` (see :mod:`diffunlearn.attacks.base`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError
from .base import Attack, AttackOutput, AttackSamples, AttackTarget
from .embedding import EmbeddingAttack
from .paraphrase import ParaphraseAttack
from .prompt import PromptAttack
from .relearn import RelearnAttack
from .ring_a_bell import RingABellAttack

ATTACKS: dict[str, type] = {
    "embedding": EmbeddingAttack,
    "prompt": PromptAttack,
    "ring-a-bell": RingABellAttack,
    "paraphrase": ParaphraseAttack,
    "relearn": RelearnAttack,
}
SUMMARIES: dict[str, str] = {
    "embedding": "white-box: optimise the condition to explain concept images, then sample (UnlearnDiffAtk/CCE)",
    "prompt": "white-box: a typable adversarial suffix, projected to vocabulary words (UnlearnDiffAtk/PEZ)",
    "ring-a-bell": "black-box: add the text-encoder concept vector to benign prompts (Ring-A-Bell)",
    "paraphrase": "black-box: name the concept in words training never used",
    "relearn": "fine-tune a copy on a few concept images; ASR after each step count",
}


def _coerce(value: str, default: Any, key: str) -> Any:
    """One ``--option`` value in the type of the setting's default."""
    try:
        if isinstance(default, tuple):
            kind = type(default[0]) if default else float
            return tuple(kind(float(v)) if kind is int else kind(v) for v in value.split(",") if v.strip())
        if isinstance(default, bool):
            return value.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            number = float(value)
            return int(number) if number.is_integer() else number
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UserError(f"--option {key}={value}: {value!r} is not a number; give e.g. {key}={default}") from None
    return value


def build_attacks(names: list[str], options: list[str] | None = None) -> list[Attack]:
    """The attacks ``names`` with ``options`` (``"name.key=value"``) applied; every problem at once.

    Raises:
        UserError: unknown attack, malformed or unknown option, or a bad value.
    """
    problems = []
    if not names:
        problems.append(f"no attacks given; pass --attacks with some of: {', '.join(ATTACKS)}")
    for name in names:
        if name not in ATTACKS:
            problems.append(f"unknown attack {name!r}; use one of: {', '.join(ATTACKS)}")
    settings: dict[str, dict[str, Any]] = {n: {} for n in names}
    for option in options or []:
        key, sep, value = option.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not field:
            problems.append(f"--option {option!r} is malformed; write it as ATTACK.KEY=VALUE, e.g. relearn.steps=5,10")
            continue
        if name not in ATTACKS:
            problems.append(f"--option {option!r} names the unknown attack {name!r}")
            continue
        if name not in names:
            problems.append(f"--option {option!r} is for {name!r}, which is not in --attacks")
            continue
        fields = {f.name: f.default for f in dataclasses.fields(ATTACKS[name]) if f.init}
        if field not in fields:
            problems.append(f"--option {option!r}: {name} has no setting {field!r}; it has {', '.join(fields)}")
            continue
        try:
            settings[name][field] = _coerce(value, fields[field], key)
        except UserError as e:
            problems.append(str(e))
    attacks = []
    if not problems:
        for name in dict.fromkeys(names):
            try:
                attacks.append(ATTACKS[name](**settings[name]))
            except UserError as e:
                problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))
    return attacks


__all__ = ["ATTACKS", "SUMMARIES", "Attack", "AttackOutput", "AttackSamples", "AttackTarget", "build_attacks"]
