"""Files shipped with the model adapters (package data), such as the committed CLIP tokenizer."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent

CLIP_TOKENIZER = "clip-tokenizer"


def asset_path(name: str) -> Path:
    """Path of a committed model asset inside the installed package, e.g. ``asset_path(CLIP_TOKENIZER)``."""
    return ASSETS / name
