"""Model adapters and how to load them by name."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import EMBEDDED
from ..errors import UserError
from .pixel import PixelTextToImage


def embedded_base_folder() -> Path:
    """Folder of the committed digit-world base model (package data)."""
    from ..worlds.assets import asset_path

    return asset_path("digits-base")


def resolve_model_folder(model: str) -> Path:
    """``embedded:digits`` or a path -> the model folder.

    Raises:
        UserError: the folder does not exist.
    """
    if model == EMBEDDED:
        return embedded_base_folder()
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist; pass a folder written by diffunlearn "
                        f"(or {EMBEDDED} for the committed digit-world base model)")
    return folder


def load_adapter(model: str, text_encoder=None) -> tuple[PixelTextToImage, Path]:
    """Load a model by name or folder and wrap it in its adapter.

    Raises:
        UserError: missing, unknown or corrupt model folder.
    """
    folder = resolve_model_folder(model)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} has no model_index.json, so it is not a model folder; "
                        "pass the folder written by `diffunlearn world train-base` or an unlearning run")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index_path} is corrupt (not JSON); restore or rebuild that model folder") from exc
    kind = index.get("_diffunlearn_adapter")
    if kind != "pixel":
        raise UserError(f"{folder} holds a {index.get('_class_name', 'unknown')} model, which this version cannot "
                        "load yet; use a digit-world model folder")
    return PixelTextToImage.from_pretrained(folder, text_encoder=text_encoder), folder


__all__ = ["PixelTextToImage", "embedded_base_folder", "load_adapter", "resolve_model_folder"]
