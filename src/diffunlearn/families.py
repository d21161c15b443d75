"""The model families diffunlearn knows, told apart by the files of a model folder alone (no
weights are loaded): their kinds, the embedded models' names and the retrained gold standards'
prefix. This module imports nothing of diffunlearn but its errors, so the config (which picks each
family's recipe) and every layer above can ask it.

* ``"pixel"``: a digit-world text-to-image model (``models.pixel.PixelTextToImage``);
* ``"class"``: a class-conditional model (``models.classcond.ClassConditionalAdapter``);
* ``"text"``: Stable Diffusion 1.x/2.x (``models.sd.StableDiffusionAdapter``);
* ``"sd3"``: Stable Diffusion 3 / 3.5, flow matching (``models.sd3.StableDiffusion3Adapter``);
* ``"sdxl"``: Stable Diffusion XL (``models.sdxl.StableDiffusionXLAdapter``);
* ``"flux"``: FLUX.1, flow matching (``models.flux.FluxAdapter``).

Each adapter declares its kind as ``family``; ``tests/test_families.py`` checks that a saved
folder reads back as the family that saved it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import UserError

EMBEDDED = "embedded:digits"
EMBEDDED_CLASS = "embedded:digits-class"  # the class-conditional track's committed base model
RETRAINED_PREFIX = EMBEDDED + "-without-"  # the digit world retrained without a concept (gold standard)
FAMILIES = ("pixel", "class", "text", "sdxl", "sd3", "flux")
# The diffusers text-to-image pipelines: template prompts, scored by `diffunlearn eval`.
TEXT_FAMILIES = ("text", "sdxl", "sd3", "flux")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled like a Hub repository id (``org/name``) rather than a path."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def check_model_folder(model: str) -> None:
    """Refuse a model that is no embedded name, no Hub id and no existing folder (the loader's own
    message). Cheap, so a command can check it before importing torch and diffusers.

    Raises:
        UserError: the folder does not exist.
    """
    if model in (EMBEDDED, EMBEDDED_CLASS) or model.startswith(RETRAINED_PREFIX) or looks_like_hub_id(model):
        return
    if not Path(model).expanduser().is_dir():
        raise UserError(f"model folder {Path(model).expanduser()} does not exist; pass a folder written by "
                        f"diffunlearn, a Stable Diffusion pipeline folder (or {EMBEDDED} for the committed digit-world "
                        "base model)")


def hub_offline() -> bool:
    """Hub access is off unless the environment says ``HF_HUB_OFFLINE=0``: runs never download by surprise."""
    return os.environ.get("HF_HUB_OFFLINE") != "0"


def hub_model_index(repo_id: str) -> Path:
    """The local path of a Hub repo's ``model_index.json``: from the Hugging Face cache, fetched (a
    small JSON file) only when ``HF_HUB_OFFLINE=0``.

    Raises:
        Exception: whatever ``huggingface_hub`` raises (not cached while offline, unknown repo, network).
    """
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, "model_index.json", local_files_only=hub_offline()))
# Per diffusers family: the pipeline class, its name for the trained network and that network's class
# (the model card's load code and the loaders' dispatch read these).
PIPELINES: dict[str, tuple[str, str, str]] = {
    "text": ("StableDiffusionPipeline", "unet", "UNet2DConditionModel"),
    "sdxl": ("StableDiffusionXLPipeline", "unet", "UNet2DConditionModel"),
    "sd3": ("StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "transformer", "FluxTransformer2DModel"),
}

# Stable Diffusion runs start from the reference recipe (PAPER.md §2-3), not from the digit world's
# tuned values: Adam lr 1e-5, batch 8, 100 paired steps over 800 prompt pairs, λ 1.6, m 1.1, full
# UNet, training images made with the pipeline defaults (50 steps, guidance 7.5).
SD_DEFAULTS: dict[str, Any] = {
    "concept": "nudity", "num_pairs": 800, "data_steps": 50, "data_guidance": 7.5, "steps": 100,
    "batch_size": 8, "lr": 1e-5, "remain_weight": 1.6, "margin": 1.1, "eval_steps": 50, "eval_guidance": 7.5,
}
# SDXL starts from the SD reference recipe with the SDXL pipeline's sampler defaults (50 steps, guidance 5).
SDXL_DEFAULTS: dict[str, Any] = {**SD_DEFAULTS, "data_guidance": 5.0, "eval_guidance": 5.0}
# SD3 / SD3.5 start from the same reference recipe, with the SD3 pipeline's sampler defaults (28
# flow-matching Euler steps, guidance 7). The hinge margin bounds the velocity MSE there.
SD3_DEFAULTS: dict[str, Any] = {**SD_DEFAULTS, "data_steps": 28, "data_guidance": 7.0, "eval_steps": 28,
                                "eval_guidance": 7.0}
# FLUX.1 starts from the same recipe with the FLUX pipeline's sampler defaults (28 steps, distilled
# guidance 3.5).
FLUX_DEFAULTS: dict[str, Any] = {**SD_DEFAULTS, "data_steps": 28, "data_guidance": 3.5, "eval_steps": 28,
                                 "eval_guidance": 3.5}
# Class-conditional models (a user's checkpoint) start from the CIFAR-10 reference recipe (PAPER.md
# §1-2): Adam lr 1e-5, batch 64, 782 steps, λ 5, element-wise cap α 0.1; DDIM 50 steps, no guidance.
CLASS_DEFAULTS: dict[str, Any] = {
    "steps": 782, "batch_size": 64, "lr": 1e-5, "remain_weight": 5.0, "forget_cap": "elementwise", "alpha": 0.1,
    "eval_steps": 50, "eval_guidance": 1.0,
}
# The embedded class-conditional world's values, tuned with `diffunlearn sweep` on class "zero" with
# evaluation seeds the demo never uses (eval_seed=7; README "Class-conditional track").
CLASS_WORLD_DEFAULTS: dict[str, Any] = {
    **CLASS_DEFAULTS, "steps": 100, "batch_size": 32, "lr": 5e-4, "eval_steps": 20, "eval_guidance": 2.0,
}


# The recipe each diffusers family starts from (config.build_config; the class family picks between the
# user's and the embedded world's recipe by model name).
RECIPES: dict[str, dict[str, Any]] = {"text": SD_DEFAULTS, "sdxl": SDXL_DEFAULTS, "sd3": SD3_DEFAULTS,
                                      "flux": FLUX_DEFAULTS}

def model_kind(model: str) -> str:
    """What kind of model ``model`` names, read from the folder's JSON files only:

    * ``"pixel"``: a digit-world text-to-image model (``embedded:digits``, the retrained gold standards,
      or a folder from ``world train-base`` or a digit-world run's ``model/``);
    * ``"class"``: a class-conditional model (the embedded one, a folder saved by its adapter, or a
      diffusers DDPM/DDIM pipeline folder whose UNet has class embeddings);
    * ``"sdxl"``, ``"sd3"``, ``"flux"``: a ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` or
      ``FluxPipeline`` folder;
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
    if looks_like_hub_id(model):
        # A Hub id is told by its model_index.json as well, so an SDXL, SD3 or FLUX id gets its own
        # family's recipe and model card (an id that cannot be read counts as "text"; the loader reports it).
        try:
            index_path = hub_model_index(model)
        except Exception:  # not cached while offline, unknown repo, network: huggingface_hub's own types
            return "text"
        folder = index_path.parent
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            raise ValueError
        if index.get("_diffunlearn_adapter") in ("pixel", "class"):
            return index["_diffunlearn_adapter"]
        for kind in ("sdxl", "sd3", "flux"):
            if index.get("_class_name") == PIPELINES[kind][0]:
                return kind
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
