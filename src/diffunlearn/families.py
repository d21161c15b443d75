"""The model families diffunlearn knows, told apart by the files of a model folder alone (no
weights are loaded): their kinds, the embedded models' names and the retrained gold standards'
prefix. This module imports nothing of diffunlearn but its errors, so the config (which picks each
family's recipe) and every layer above can ask it.

* ``"pixel"``: a digit-world text-to-image model (``models.pixel.PixelTextToImage``);
* ``"class"``: a class-conditional model (``models.classcond.ClassConditionalAdapter``);
* ``"text"``: Stable Diffusion 1.x/2.x (``models.sd.StableDiffusionAdapter``).

Each adapter declares its kind as ``family``; ``tests/test_families.py`` checks that a saved
folder reads back as the family that saved it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

EMBEDDED = "embedded:digits"
EMBEDDED_CLASS = "embedded:digits-class"  # the class-conditional track's committed base model
RETRAINED_PREFIX = EMBEDDED + "-without-"  # the digit world retrained without a concept (gold standard)
FAMILIES = ("pixel", "class", "text")


def model_kind(model: str) -> str:
    """What kind of model ``model`` names, read from the folder's JSON files only:

    * ``"pixel"``: a digit-world text-to-image model (``embedded:digits``, the retrained gold standards,
      or a folder from ``world train-base`` or a digit-world run's ``model/``);
    * ``"class"``: a class-conditional model (the embedded one, a folder saved by its adapter, or a
      diffusers DDPM/DDIM pipeline folder whose UNet has class embeddings);
    * ``"text"``: anything else (a Stable Diffusion folder or hub id; a missing folder counts as
      ``"text"`` and the loader reports it).

    Raises:
        UserError: the folder's ``model_index.json`` (or its UNet config) is not valid JSON, so its kind
            cannot be known (reported as such instead of as a wrong concept or model family).
    """
    import json

    if model == EMBEDDED_CLASS:
        return "class"
    if model == EMBEDDED or model.startswith(RETRAINED_PREFIX):
        return "pixel"
    folder = Path(model).expanduser()
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            raise ValueError
        if index.get("_diffunlearn_adapter") in ("pixel", "class"):
            return index["_diffunlearn_adapter"]
        if index.get("_class_name") in ("DDPMPipeline", "DDIMPipeline"):
            unet_path = folder / "unet" / "config.json"
            index_path = unet_path
            unet = json.loads(unet_path.read_text())
            return "class" if isinstance(unet, dict) and unet.get("num_class_embeds") else "text"
    except OSError:
        pass
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{index_path} is corrupt (not a JSON object), so the kind of model in {folder} cannot "
                        "be told; restore or rebuild that model folder") from None
    return "text"
