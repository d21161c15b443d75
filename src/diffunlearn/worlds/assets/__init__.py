"""Committed weights of the digit world (base model and oracle), shipped as package data."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent


def asset_path(name: str) -> Path:
    """Path of a committed asset inside the installed package."""
    return ASSETS / name
