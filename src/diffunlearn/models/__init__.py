"""Model adapters and how to load them by name.

``load_adapter`` accepts:

* ``embedded:digits``: the committed digit-world base model (``PixelTextToImage``);
* ``embedded:digits-class``: the committed class-conditional digit model (``ClassConditionalAdapter``;
  built by ``diffunlearn world train-base --track class``);
* ``embedded:digits-without-three`` and ``embedded:digits-without-red``: the exact-unlearning gold
  standards, the digit-world base recipe retrained from scratch on a world without that concept
  (``world train-base --exclude three``);
* a folder written by diffunlearn for the digit world (``model_index.json`` marked ``pixel``);
* a class-conditional folder (``model_index.json`` marked ``class``, or a diffusers ``DDPMPipeline`` /
  ``DDIMPipeline`` folder whose UNet has ``num_class_embeds``) -> ``ClassConditionalAdapter``;
* a diffusers ``StableDiffusionPipeline`` folder (SD 1.x / 2.x) -> ``StableDiffusionAdapter``;
* a diffusers ``StableDiffusionXLPipeline`` folder (SDXL) -> ``StableDiffusionXLAdapter``;
* a diffusers ``StableDiffusion3Pipeline`` folder (SD3 / SD3.5) -> ``StableDiffusion3Adapter``;
* a diffusers ``FluxPipeline`` folder (FLUX.1) -> ``FluxAdapter``;
* a Hub id ``org/name`` that is not a local path -> ``StableDiffusionAdapter`` from the local
  Hugging Face cache (downloaded only when ``HF_HUB_OFFLINE=0``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..families import EMBEDDED, EMBEDDED_CLASS, RETRAINED_PREFIX, check_model_folder, looks_like_hub_id, model_kind
from .classcond import ClassConditionalAdapter
from .flux import FluxAdapter
from .pixel import PixelTextToImage
from .sd import StableDiffusionAdapter, check_pipeline_index
from .sd3 import StableDiffusion3Adapter
from .sdxl import StableDiffusionXLAdapter

# The diffusers pipelines by their model_index.json `_class_name` (families.PIPELINES names them).
PIPELINE_ADAPTERS = {"StableDiffusionPipeline": StableDiffusionAdapter,
                     "StableDiffusionXLPipeline": StableDiffusionXLAdapter,
                     "StableDiffusion3Pipeline": StableDiffusion3Adapter, "FluxPipeline": FluxAdapter}


def embedded_base_folder() -> Path:
    """Folder of the committed digit-world base model (package data)."""
    from ..worlds.assets import asset_path

    return asset_path("digits-base")


def embedded_class_folder() -> Path:
    """Folder of the committed class-conditional digit model (package data)."""
    from ..worlds.assets import asset_path

    return asset_path("digits-class")


def retrained_name(concept: str) -> str:
    """The embedded name of the digit-world model retrained without ``concept`` (exact unlearning)."""
    return RETRAINED_PREFIX + concept


def resolve_model_folder(model: str) -> Path:
    """``embedded:digits``, ``embedded:digits-class`` or a path -> the model folder.

    Raises:
        UserError: the folder does not exist.
    """
    if model == EMBEDDED:
        return embedded_base_folder()
    if model == EMBEDDED_CLASS:
        folder = embedded_class_folder()
        if not (folder / "model_index.json").is_file():
            raise UserError(f"the embedded class-conditional model ({EMBEDDED_CLASS}) is missing from this "
                            "installation; build it with `diffunlearn world train-base --track class`")
        return folder
    if model.startswith(RETRAINED_PREFIX):
        from ..worlds.assets import asset_path

        concept = model[len(RETRAINED_PREFIX):]
        folder = asset_path(f"digits-without-{concept}")
        if not (folder / "model_index.json").is_file():
            raise UserError(f"{model} (the digit world retrained without {concept!r}) is not part of this "
                            f"installation; build it with `diffunlearn world train-base --exclude {concept} "
                            f"--steps 4500 --out FOLDER` and pass FOLDER")
        return folder
    check_model_folder(model)
    return Path(model).expanduser()


def load_adapter(model: str, text_encoder=None, device: torch.device | str | None = None,
                 frozen_dtype: torch.dtype | str | None = None, denoiser_dtype: torch.dtype | str | None = None
                 ) -> tuple[PixelTextToImage | ClassConditionalAdapter | StableDiffusionAdapter, Path | None]:
    """Load a model by name, folder or Hub id and wrap it in its adapter (on a GPU, with PyTorch's cuDNN
    attention backend turned off for the process: ``utils.avoid_cudnn_attention`` says why).

    Args:
        model: ``embedded:digits``, ``embedded:digits-class``, a model folder, or a Hub id ``org/name``
            (Stable Diffusion only).
        text_encoder: the digit world's shared ``FrozenTextEncoder`` (pixel models only).
        device: where the model runs (every family; ``None`` = the family's default: CUDA when
            present for Stable Diffusion, the CPU for the pixel-space models).
        frozen_dtype: precision of a Stable Diffusion model's frozen parts (see
            ``StableDiffusionAdapter.from_pretrained``); the pixel-space models stay in fp32.
        denoiser_dtype: the diffusers families' trained network in half precision (a LoRA run's
            frozen base, ``lora_base_dtype``); default fp32.

    Returns:
        ``(adapter, folder)``; ``folder`` is ``None`` for a Hub id (its files live in the HF cache).

    Raises:
        UserError: missing, unknown (SDXL included) or corrupt model; a Hub id not in the local cache.
    """
    adapter, folder = _load_adapter(model, text_encoder, device, frozen_dtype, denoiser_dtype)
    if getattr(getattr(adapter, "device", None), "type", None) == "cuda":
        from ..utils import avoid_cudnn_attention

        avoid_cudnn_attention()
    return adapter, folder


def _load_adapter(model: str, text_encoder, device, frozen_dtype, denoiser_dtype):
    if (model not in (EMBEDDED, EMBEDDED_CLASS) and not model.startswith(RETRAINED_PREFIX)
            and not Path(model).expanduser().exists() and looks_like_hub_id(model)):
        index = json.loads((StableDiffusionAdapter.hub_snapshot_folder(model) / "model_index.json").read_text())
        adapter_class = PIPELINE_ADAPTERS.get(str(index.get("_class_name")), StableDiffusionAdapter)
        return adapter_class.from_pretrained(model, device=device, frozen_dtype=frozen_dtype,
                                              denoiser_dtype=denoiser_dtype), None
    folder = resolve_model_folder(model)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} has no model_index.json, so it is not a model folder; "
                        "pass the folder written by `diffunlearn world train-base` or an unlearning run, "
                        "or a Stable Diffusion pipeline folder")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index_path} is corrupt (not JSON); restore or rebuild that model folder") from exc
    if index.get("_diffunlearn_adapter") == "pixel":
        adapter = PixelTextToImage.from_pretrained(folder, text_encoder=text_encoder)
        return (adapter.to(device) if device is not None else adapter), folder
    if model_kind(str(folder)) == "class":  # diffunlearn's class folders and class-conditional DDPM pipelines
        adapter = ClassConditionalAdapter.from_pretrained(folder)
        return (adapter.to(device) if device is not None else adapter), folder
    adapter_class = PIPELINE_ADAPTERS.get(str(index.get("_class_name")), StableDiffusionAdapter)
    # SDXL and other pipelines fail here with their own message.
    check_pipeline_index(index_path, str(folder), adapter_class.pipeline_class_name)
    return adapter_class.from_pretrained(folder, device=device, frozen_dtype=frozen_dtype,
                                          denoiser_dtype=denoiser_dtype), folder


__all__ = ["EMBEDDED_CLASS", "ClassConditionalAdapter", "FluxAdapter", "PixelTextToImage", "StableDiffusion3Adapter",
           "StableDiffusionAdapter", "StableDiffusionXLAdapter",
           "embedded_base_folder", "embedded_class_folder", "load_adapter", "resolve_model_folder"]
