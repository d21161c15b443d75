"""Stable Diffusion 1.x / 2.x behind the adapter protocol (``DiffusionAdapter``).

The adapter holds the components of a diffusers ``StableDiffusionPipeline`` (UNet, VAE, CLIP text
encoder and tokenizer, scheduler). Only the UNet trains; the VAE and the text encoder are frozen
(``requires_grad=False``, eval mode) and may be stored in bf16/fp16 to save memory, while the UNet
stays fp32 (the master weights; mixed precision comes from autocast in the training loop).

Latent-space training follows diffusers' ``train_text_to_image.py``: images are encoded once to
``vae.encode(x).latent_dist.mean * scaling_factor``, noised with a ``DDPMScheduler`` built from the
model's own scheduler config, and the UNet's output is compared with ``prediction_target``: the noise
ε for ε-prediction models (SD 1.x, SD 2.x-base), the velocity v = √ᾱ_t ε − √(1−ᾱ_t) x₀ for
v-prediction models (SD 2.x at 768 px; Salimans & Ho 2022).

Attention: diffusers 0.2x+ on torch 2 gives every attention layer ``AttnProcessor2_0``, i.e.
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU), so no
xformers is needed; ``attention_processors()`` reports what is in use.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..families import hub_model_index, hub_offline, looks_like_hub_id
from .pixel_base import DenoisingObjective, sampling
from .selection import CROSS_ATTENTION_MARK, LoraSettings, has_lora, select_parameters

PIPELINE_CLASS = "StableDiffusionPipeline"
SAMPLER_NAME = "DPMSolverMultistepScheduler"
# `org/name` as the Hugging Face Hub spells repository ids.
# What identifies a pipeline folder cheaply: its configs and tokenizer files, not its weights.
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or one of ``fp32``/``bf16``/``fp16`` (long names too) -> dtype.

    Raises:
        UserError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


class TextCondition:
    """Per-token CLIP text states ``(N, L, D)`` of a batch of prompts (``L`` = 77 for SD)."""

    def __init__(self, states: torch.Tensor) -> None:
        self.states = states

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: slice | torch.Tensor) -> TextCondition:
        return TextCondition(self.states[index])

    def to(self, device: torch.device | str) -> TextCondition:
        """The same condition on ``device``."""
        return TextCondition(self.states.to(device))

    @staticmethod
    def cat(parts: Sequence[TextCondition]) -> TextCondition:
        return TextCondition(torch.cat([p.states for p in parts]))


def check_pipeline_index(index_path: Path, where: str, expected: str = PIPELINE_CLASS) -> None:
    """Refuse anything but the ``expected`` pipeline class (SD 1.x/2.x by default), from its
    ``model_index.json``.

    Raises:
        UserError: the index is unreadable, SDXL, or another pipeline class.
    """
    try:
        index = json.loads(Path(index_path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index_path} is unreadable or not JSON; restore or re-download {where}") from exc
    name = str(index.get("_class_name", "unknown"))
    if name == expected:
        return
    if name in ("StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        raise UserError(f"{where} holds a {name}, not a {expected}; load it with diffunlearn.models.load_adapter "
                        "(or pass it as model=...), which picks the adapter of its family")
    if "XL" in name:
        raise UserError(f"{where} is an SDXL variant ({name}) that diffunlearn does not support yet (the refiner "
                        "and img2img/inpainting pipelines are out of scope); use a StableDiffusionXLPipeline")
    if expected == PIPELINE_CLASS:
        raise UserError(f"{where} holds a {name}, not a {PIPELINE_CLASS}; pass a Stable Diffusion 1.x or 2.x "
                        "pipeline folder (diffusers layout with unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    raise UserError(f"{where} holds a {name}, not a {expected}")


def absent_components(folder: Path) -> dict[str, None]:
    """The pipeline parts a saved folder records as absent (``[null, null]``: a dropped T5 encoder, no
    image encoder), which ``from_pretrained`` must be given explicitly."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {k: None for k, v in index.items() if isinstance(v, list) and (not v or v[0] is None)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'no message'}"


def uses_text_encoders(method):
    """Decorate an adapter method that runs the text encoders: with ``offload_encoders`` on, they come
    to the accelerator for the call and go back to the CPU after it (``StableDiffusionAdapter.encoders_placed``)."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with self.encoders_placed():
            return method(self, *args, **kwargs)

    return wrapped


class StableDiffusionAdapter(DenoisingObjective):
    """Adapter for diffusers ``StableDiffusionPipeline`` models (SD 1.x and 2.x, ε- or v-prediction).

    Attributes:
        unet, vae, text_encoder, tokenizer, scheduler: the pipeline's components (``scheduler`` is the
            model's own, saved with it; training noise comes from ``train_scheduler``).
        device: where the networks live; inputs are moved there.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (from the scheduler config).
        sampler_name: the solver ``sample`` uses (recorded in manifests).
        source: the folder or Hub id the model came from (``None`` when built in memory).
        folder: the local folder holding its files (a Hub id's cache snapshot), or ``None``.
    """

    sampler_name = SAMPLER_NAME
    pipeline_class_name = PIPELINE_CLASS
    denoiser_name = "unet"  # the pipeline's name for the trained network (``self.unet`` here)
    network_class_name = "UNet2DConditionModel"  # its diffusers class (``save: unet`` folders load with it)
    config_files = CONFIG_FILES
    family = "text"
    condition_kind = "text"
    save_formats = ("pipeline", "unet", "lora")
    sample_batch_default = None  # the training batch size, which the GPU is known to hold
    sampler_defaults = (50, 7.5)  # the diffusers pipeline defaults the paper assumes (PAPER.md §3)

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                 device: torch.device | str | None = None, frozen_dtype: torch.dtype | str | None = None,
                 source: str | None = None, folder: Path | None = None,
                 denoiser_dtype: torch.dtype | str | None = None) -> None:
        from diffusers import DDPMScheduler

        self.text_encoder = self._place(unet, vae, [text_encoder], device, frozen_dtype, denoiser_dtype)[0]
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        # The forward process q(x_t | x_0) of the ORIGINAL training (DDPM), whatever sampler the folder
        # ships (PNDM, DDIM, Euler: Euler's add_noise would use sigma scaling instead).
        self.train_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.num_train_timesteps = int(self.train_scheduler.config.num_train_timesteps)
        self.prediction_type = str(self.train_scheduler.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction type {self.prediction_type!r} is not supported; Stable Diffusion models "
                            "predict epsilon or v_prediction")
        self._finish_init(source, folder)

    def _place(self, denoiser: nn.Module, vae: nn.Module, encoders: Sequence[nn.Module | None],
               device: torch.device | str | None, frozen_dtype: torch.dtype | str | None,
               denoiser_dtype: torch.dtype | str | None = None) -> list:
        """What every latent family sets first: the device (CUDA when present), the trained network in
        fp32 as ``self.unet``, the frozen VAE and text ``encoders`` in ``frozen_dtype`` (or fp32), in eval
        mode without gradients. Returns the placed encoders (None stays None). ``denoiser_dtype`` holds
        the trained network in half precision instead (a LoRA run's frozen base, ``lora_base_dtype``:
        its adapters are fp32), so it never occupies the accelerator in fp32."""
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.frozen_dtype = parse_dtype(frozen_dtype)
        frozen = self.frozen_dtype or torch.float32
        # nn.Module.to rather than diffusers' ModelMixin.to, which warns on every dtype cast.
        self.unet = nn.Module.to(denoiser, device=self.device, dtype=parse_dtype(denoiser_dtype) or torch.float32)
        self.vae = nn.Module.to(vae, device=self.device, dtype=frozen).eval().requires_grad_(False)
        return [None if e is None else nn.Module.to(e, device=self.device, dtype=frozen).eval().requires_grad_(False)
                for e in encoders]

    def _finish_init(self, source: str | None, folder: Path | None) -> None:
        """What every latent family sets last: the VAE's downsampling factor, where the model came
        from, and the default LoRA settings."""
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.offload_encoders = False
        self.encoder_home = torch.device("cpu")  # where offloaded text encoders wait
        self.source = source
        self.folder = folder
        self.lora_settings = LoraSettings()

    # ---- frozen text encoders off the accelerator (issue 15 §1) ------------------------------
    def text_encoder_modules(self) -> list[nn.Module]:
        """Every text encoder of the pipeline (one for SD, two for SDXL and FLUX, up to three for SD3)."""
        found: list[nn.Module] = []
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self, name, None)
            if module is not None and all(module is not m for m in found):
                found.append(module)
        for module in getattr(self, "text_encoders", None) or ():
            if module is not None and all(module is not m for m in found):
                found.append(module)
        return found

    def move_text_encoders(self, device: torch.device | str) -> None:
        for module in self.text_encoder_modules():
            nn.Module.to(module, device=device)

    def offload_text_encoders(self) -> None:
        """Keep the text encoders on the CPU between encodings, so only the denoiser, the VAE and the
        optimizer state occupy the accelerator while training. Prompts are encoded once per run and
        cached, so each call moves the encoders once each way (T5-XXL in bf16: 9.5 GB over PCIe)."""
        self.offload_encoders = True
        if self.device != self.encoder_home:
            self.move_text_encoders(self.encoder_home)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def encoders_placed(self):
        """The text encoders on ``self.device`` for the duration (they live there unless offloaded)."""
        if not getattr(self, "offload_encoders", False) or self.device == self.encoder_home:
            yield
            return
        self.move_text_encoders(self.device)
        try:
            yield
        finally:
            self.move_text_encoders(self.encoder_home)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- the pooled families (SDXL, SD3, FLUX): prompts through the pipeline's own encode_prompt ----
    def _encode_part(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states, pooled projection) of a few prompts by the pipeline's ``encode_prompt``, with
        gradient through the encoders where autograd is on. Each pooled family defines it."""
        raise NotImplementedError(f"{type(self).__name__} has no pooled prompt encoding")

    def _encode_pooled(self, prompts: Sequence[str], batch_size: int) -> Any:
        """The family's condition of ``prompts``, ``batch_size`` prompts per ``_encode_part`` call, float32
        on the CPU."""
        prompts = list(prompts)
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            embeds, pool = self._encode_part(prompts[start:start + batch_size])
            states.append(embeds.float().cpu())
            pooled.append(pool.float().cpu())
        if not states:
            raise ValueError("no prompts to encode")
        return self.make_condition(torch.cat(states), torch.cat(pooled))

    # Several text encoders (the pooled families): the prompt attack searches its suffix in one of them
    # (:meth:`suffix_encoder`, with gradient through it) and every encoder reads the suffix as text.
    several_text_encoders = False

    def suffix_encoder(self) -> tuple[Any, nn.Module, int]:
        """The tokenizer, text encoder and padded length (as the pipeline tokenizes for it) that the
        prompt attack searches its suffix in; an offloaded encoder comes back to the accelerator for good
        (the attack back-propagates through it)."""
        if not self.several_text_encoders:
            raise UserError(f"{type(self).__name__} has one text encoder; the prompt attack uses text_tokens()")
        if self.offload_encoders:
            self.offload_encoders = False
            self.move_text_encoders(self.device)
        return self._suffix_encoder()

    def _suffix_encoder(self) -> tuple[Any, nn.Module, int]:
        raise NotImplementedError

    def encode_prompts_with_grad(self, prompts: Sequence[str]) -> Any:
        """:meth:`encode_prompts` with gradient through the text encoders (one batch): what the prompt
        attack differentiates."""
        return self._encode_pooled(prompts, max(len(prompts), 1))

    def pooled_inputs(self, uncond) -> Any:
        """The pipeline inputs of a condition with token states and a pooled projection (SDXL, SD3),
        guided against ``uncond``: ``cond_rows -> keyword arguments``."""
        dtype = self.unet.dtype

        def inputs(cond) -> dict:
            n = len(cond)
            return {"prompt_embeds": cond.states.to(self.device, dtype),
                    "pooled_prompt_embeds": cond.pooled.to(self.device, dtype),
                    "negative_prompt_embeds": uncond.states.expand(n, -1, -1).to(self.device, dtype),
                    "negative_pooled_prompt_embeds": uncond.pooled.expand(n, -1).to(self.device, dtype)}

        return inputs

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | str | None = None,
                      frozen_dtype: torch.dtype | str | None = None, source: str | None = None,
                      folder: Path | None = None,
                      denoiser_dtype: torch.dtype | str | None = None) -> StableDiffusionAdapter:
        """Wrap the components of an in-memory ``StableDiffusionPipeline`` (shared, not copied)."""
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, device=device,
                   frozen_dtype=frozen_dtype, source=source, folder=folder, denoiser_dtype=denoiser_dtype)

    @classmethod
    def from_pretrained(cls, folder_or_id: str | os.PathLike, device: torch.device | str | None = None,
                        frozen_dtype: torch.dtype | str | None = None,
                        denoiser_dtype: torch.dtype | str | None = None) -> StableDiffusionAdapter:
        """Load a local pipeline folder or a Hub id (``org/name``) with safetensors weights only.

        Hub ids resolve through the local Hugging Face cache; the Hub is contacted only when the
        environment sets ``HF_HUB_OFFLINE=0``. No remote code runs and no pickle is ever loaded.

        Args:
            folder_or_id: a diffusers ``StableDiffusionPipeline`` folder, or a Hub repository id.
            device: default CUDA when available, else CPU.
            frozen_dtype: dtype of the frozen VAE and text encoder (``torch.bfloat16``/``"bf16"``,
                ``"fp16"``; default fp32). The UNet is fp32 unless ``denoiser_dtype`` says otherwise
                (a LoRA run's frozen base; see :meth:`_place`).

        Raises:
            UserError: missing folder, not a SD 1.x/2.x pipeline (SDXL included), a Hub id absent
                from the cache while offline, or missing/corrupt weights.
        """
        name = str(folder_or_id)
        path = Path(folder_or_id).expanduser()
        if path.exists():
            if not path.is_dir():
                raise UserError(f"{path} is a file; pass a Stable Diffusion pipeline FOLDER (the one holding "
                                "model_index.json)")
            if not (path / "model_index.json").is_file():
                raise UserError(f"{path} has no model_index.json, so it is not a diffusers pipeline folder; pass a "
                                "Stable Diffusion 1.x/2.x folder written by save_pretrained")
            check_pipeline_index(path / "model_index.json", str(path), cls.pipeline_class_name)
            folder, source, load_from, local_only = path.resolve(), str(path.resolve()), str(path), True
        elif looks_like_hub_id(name):
            folder = cls._hub_snapshot(name)
            source, load_from, local_only = name, name, hub_offline()
        else:
            raise UserError(f"model {name!r} is neither an existing folder nor a Hub id (org/name); pass a Stable "
                            "Diffusion pipeline folder or a cached Hub id")
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" would interleave our own bars
        try:
            pipe = cls.load_pipeline(load_from, folder, local_only)
        except Exception as exc:  # diffusers/transformers/safetensors raise many types for bad files
            raise UserError(f"could not load the {cls.pipeline_class_name} {name} ({_first_line(exc)}); its weights "
                            "are missing, not safetensors, or corrupt: restore or re-download it") from exc
        return cls.from_pipeline(pipe, device=device, frozen_dtype=frozen_dtype, source=source, folder=folder,
                                 denoiser_dtype=denoiser_dtype)

    @classmethod
    def load_pipeline(cls, load_from: str, folder: Path, local_only: bool, **components: Any) -> Any:
        """The diffusers pipeline of this family from a folder or Hub id (safetensors only);
        ``components`` replace the stored ones (e.g. a trained UNet)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(
            load_from, use_safetensors=True, local_files_only=local_only, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, **components)

    @staticmethod
    def hub_snapshot_folder(repo_id: str) -> Path:
        """The local snapshot folder of a Hub repo's ``model_index.json`` (fetched only when
        ``HF_HUB_OFFLINE=0``), any pipeline class.

        Raises:
            UserError: not cached while offline, or unreachable.
        """
        return StableDiffusionAdapter._hub_snapshot(repo_id, None)

    @classmethod
    def _hub_snapshot(cls, repo_id: str, expected: str | None = "") -> Path:
        """Fetch (or find in the cache) a Hub repo's ``model_index.json``, check it, return the snapshot folder.

        Raises:
            UserError: not cached while offline, unreachable, or not a SD 1.x/2.x pipeline.
        """
        offline = hub_offline()
        try:
            index = hub_model_index(repo_id)
        except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, HTTP and OS errors
            if offline:
                raise UserError(f"{repo_id} is neither a local folder nor a Hub model in the local Hugging Face cache; "
                                "pass an existing pipeline folder, or set HF_HUB_OFFLINE=0 (with network) to "
                                "download it") from exc
            raise UserError(f"could not fetch {repo_id} from the Hugging Face Hub ({_first_line(exc)}); check the id "
                            "and the network, or pass a local pipeline folder") from exc
        if expected is not None:
            check_pipeline_index(index, repo_id, expected or cls.pipeline_class_name)
        return index.parent

    def _pipeline(self, unet: nn.Module | None = None, scheduler: Any = None, with_text: bool = True) -> Any:
        """A ``StableDiffusionPipeline`` over this adapter's components (shared objects, no copies)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder if with_text else None,
            tokenizer=self.tokenizer if with_text else None, unet=unet if unet is not None else self.unet,
            scheduler=scheduler if scheduler is not None else self.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)

    def plain_unet(self) -> nn.Module:
        """The UNet as a plain ``UNet2DConditionModel``: itself, or with LoRA merged into a COPY (W + (α/r)·BA;
        the copy costs one more UNet of memory on ``device`` while it lives)."""
        if not has_lora(self.unet):
            return self.unet
        merged = copy.deepcopy(self.unet)
        merged.fuse_lora(lora_scale=1.0)
        merged.unload_lora()  # drops the adapter layers and keeps the fused base weights
        return merged

    def save(self, folder: str | os.PathLike) -> None:
        """Write the full pipeline (safetensors) so that ``StableDiffusionPipeline.from_pretrained`` loads it.

        LoRA adapters, if any, are merged into a copy of the UNet first, so the folder is a plain
        pipeline (this adapter keeps its separate LoRA weights). When the frozen VAE and text encoder
        are held in half precision (``frozen_dtype``) and the source folder is known, they are read
        again from that folder so the saved copy keeps their original precision, not the bf16/fp16
        working copy; otherwise they are written as held.
        """
        if self.frozen_dtype is not None and self.folder is not None:
            original = self.load_pipeline(str(self.folder), Path(self.folder), True,
                                          **{self.denoiser_name: self.plain_unet()})
            original.save_pretrained(folder, safe_serialization=True)
            return
        self._pipeline(self.plain_unet()).save_pretrained(folder, safe_serialization=True)

    def save_unet(self, folder: str | os.PathLike) -> None:
        """Write only the UNet (LoRA merged, if any) as a diffusers ``UNet2DConditionModel`` folder."""
        self.plain_unet().save_pretrained(folder, safe_serialization=True)

    def save_lora(self, folder: str | os.PathLike) -> None:
        """Write the LoRA adapters in diffusers' format (``pytorch_lora_weights.safetensors``).

        ``<Pipeline>.from_pretrained(base).load_lora_weights(folder)`` then reproduces this model;
        rank and alpha travel in the file's metadata. A UNet's peft keys are converted to diffusers'
        names (as diffusers' UNet LoRA scripts do); a transformer's are saved as peft names them.

        Raises:
            UserError: no LoRA adapters (train with selection ``lora`` first).
        """
        if not has_lora(self.unet):
            raise UserError("this model has no LoRA weights to save: train with parameter selection `lora`, or "
                            f"save the full pipeline or the {self.denoiser_name} instead")
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self.unet)
        if self.denoiser_name == "unet":
            layers = convert_state_dict_to_diffusers(layers)
        getattr(diffusers, self.pipeline_class_name).save_lora_weights(
            folder, safe_serialization=True, **{f"{self.denoiser_name}_lora_layers": layers,
                                                f"{self.denoiser_name}_lora_adapter_metadata":
                                                    self.unet.peft_config["default"].to_dict()})

    def load_lora(self, folder: str | os.PathLike) -> None:
        """Apply LoRA weights saved in diffusers' format (by :meth:`save_lora` or any diffusers trainer)
        to this adapter's UNet, in place.

        Raises:
            UserError: the folder holds no readable LoRA weights.
        """
        try:
            self._pipeline().load_lora_weights(str(folder))
        except Exception as exc:  # diffusers raises ValueError/OSError/KeyError for bad or missing files
            raise UserError(f"could not load LoRA weights from {folder} ({_first_line(exc)}); pass a folder written "
                            "by `diffunlearn unlearn ... selection=lora`") from exc

    def load_unet(self, folder: str | os.PathLike) -> None:
        """Replace the trained network by a saved folder of its class (a run saved with ``save: unet``;
        for the transformer families, the transformer folder), safetensors only.

        Raises:
            UserError: the folder holds no loadable network.
        """
        import diffusers

        try:
            network = getattr(diffusers, self.network_class_name).from_pretrained(str(folder), use_safetensors=True)
        except Exception as exc:  # missing or corrupt files
            raise UserError(f"could not load a {self.network_class_name} from {folder} ({_first_line(exc)}); pass a "
                            "folder written with `save: unet`") from exc
        self.unet = nn.Module.to(network, device=self.device, dtype=torch.float32).eval()

    def identity_configs(self) -> dict[str, dict]:
        """The component configs that identify an in-memory model (each family names its parts)."""
        return {"unet": dict(self.unet.config), "vae": dict(self.vae.config), "scheduler": dict(self.scheduler.config),
                "text_encoder": self.text_encoder.config.to_dict(), "tokenizer": self.tokenizer.get_vocab()}

    def model_identity(self) -> dict[str, Any]:
        """What a manifest records about the model: cheap (configs only, no weight hashing).

        Returns:
            ``class`` (the pipeline class), ``source`` (folder path or Hub id, ``None`` in memory),
            ``revision`` (the Hub commit of a cached snapshot, else ``None``), ``config_sha256`` over
            the component configs and tokenizer files (``config_files`` of a folder), ``prediction_type``
            and ``lora`` (settings when adapters are injected).
        """
        digest = hashlib.sha256()
        if self.folder is not None:
            for name in self.config_files:
                path = Path(self.folder) / name
                if path.is_file():
                    digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        else:
            # Private keys (e.g. diffusers' `_use_default_values`, a list in set order) and library
            # versions are bookkeeping, not the model.
            configs = {part: config if "tokenizer" in part else  # vocabularies are kept whole
                       {k: v for k, v in config.items() if not str(k).startswith("_") and k != "transformers_version"}
                       for part, config in self.identity_configs().items()}
            digest.update(json.dumps(configs, sort_keys=True, default=str).encode())
        revision = None
        if self.folder is not None and self.source is not None and not Path(self.source).exists():
            revision = Path(self.folder).name  # the Hub cache names snapshot folders by commit hash
        lora = None
        if has_lora(self.unet):
            config = self.unet.peft_config["default"]
            lora = {"rank": config.r, "alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
        return {"class": self.pipeline_class_name, "source": self.source, "revision": revision,
                "config_sha256": digest.hexdigest(), "prediction_type": self.prediction_type, "lora": lora}

    @property
    def resolution(self) -> int:
        """The model's native image side in pixels (its denoiser's sample size × the VAE factor)."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the training data ``x0`` at the native resolution."""
        side = self.resolution // self.vae_scale_factor
        return int(self.vae.config.latent_channels), side, side

    # ---- training set-up ----------------------------------------------------------------------
    def configure_lora(self, rank: int = 4, alpha: float = 4.0,
                       target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                       base_dtype: torch.dtype | str | None = None) -> None:
        """Set the LoRA settings that ``trainable_parameters("lora")`` injects (before its first call);
        ``base_dtype`` (``bf16``/``fp16``) holds the frozen base in half precision from then on.

        Raises:
            UserError: invalid settings, or adapters with other settings are already injected.
        """
        settings = LoraSettings(rank=rank, alpha=float(alpha), target_modules=tuple(target_modules),
                                base_dtype=parse_dtype(base_dtype))
        if has_lora(self.unet):
            current = self.unet.peft_config["default"]
            if (current.r, float(current.lora_alpha), set(current.target_modules)) != (
                    settings.rank, settings.alpha, set(settings.target_modules)):
                raise UserError("LoRA adapters are already injected with other settings; configure LoRA before "
                                "the first trainable_parameters('lora') call")
        self.lora_settings = settings

    def trainable_parameters(self, selection: str) -> list[tuple[str, nn.Parameter]]:
        """Mark one of ``full``, ``cross-attention``, ``non-cross-attention``, ``lora`` trainable (see
        :mod:`diffunlearn.models.selection`); every other UNet parameter is frozen.

        Returns:
            ``(name, parameter)`` pairs: exactly the UNet parameters with ``requires_grad=True``.

        Raises:
            UserError: unknown selection.
        """
        return select_parameters(self.unet, selection, self.lora_settings, self.is_cross_attention)

    @staticmethod
    def is_cross_attention(name: str) -> bool:
        """Whether a UNet parameter belongs to the text-to-image attention (``attn2``)."""
        return CROSS_ATTENTION_MARK in name

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet activations in the backward pass (less memory, ~30% more compute)."""
        self.unet.enable_gradient_checkpointing()

    def attention_processors(self) -> set[str]:
        """Class names of the UNet's attention processors (``{"AttnProcessor2_0"}``: PyTorch SDPA)."""
        return {type(p).__name__ for p in self.unet.attn_processors.values()}

    # ---- the protocol -------------------------------------------------------------------------
    @torch.no_grad()
    @uses_text_encoders
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> TextCondition:
        """CLIP token states of ``prompts`` as the pipeline computes them (77 tokens, padded, truncated).

        Returns:
            ``TextCondition`` with ``states`` ``(N, 77, D)`` float32 on the CPU.
        """
        prompts = list(prompts)
        use_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        out = []
        for start in range(0, len(prompts), batch_size):
            tok = self.tokenizer(prompts[start:start + batch_size], padding="max_length",
                                 max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            mask = tok.attention_mask.to(self.device) if use_mask else None
            states = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
            out.append(states.float().cpu())
        return TextCondition(torch.cat(out) if out else torch.empty(0, self.tokenizer.model_max_length,
                                                                    self.text_encoder.config.hidden_size))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Latents ``vae.encode(x).latent_dist.mean * scaling_factor`` of images ``(N, 3, H, W)`` in [-1, 1].

        The posterior MEAN, not a sample: the training data is then a fixed tensor, reproducible and
        cacheable (the posterior's std is tiny for SD's VAE, so little is lost).

        Returns:
            ``(N, 4, H/f, W/f)`` float32 on the CPU (``f`` = ``vae_scale_factor``, 8 for SD).

        Raises:
            ValueError: images are not ``(N, 3, H, W)``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        scale = float(self.vae.config.scaling_factor)
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(self.device, self.vae.dtype)
            out.append((self.vae.encode(x).latent_dist.mean * scale).float().cpu())
        return torch.cat(out)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (DDPM), on ``x0``'s device."""
        return self.train_scheduler.add_noise(x0, noise, timesteps.to(x0.device))

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What ``predict_noise`` should output for this ``x_t``: ε (epsilon models) or
        v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (v-prediction, ``scheduler.get_velocity``), on ``x0``'s device."""
        if self.prediction_type == "v_prediction":
            return self.train_scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
        return noise

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: TextCondition) -> torch.Tensor:
        """The UNet's output for ``x_t`` (ε, or v for v-prediction models), on ``self.device``.

        Inputs are moved to the device and to the UNet's dtype; autocast, if active, applies inside.
        """
        return self.unet(x_t.to(self.device, self.unet.dtype), timesteps.to(self.device),
                         encoder_hidden_states=condition.states.to(self.device, self.unet.dtype)).sample

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 7.5,
               batch_size: int = 8, progress: bool = False, height: int | None = None,
               width: int | None = None) -> torch.Tensor:
        """Classifier-free guided sampling with DPM-Solver++ (diffusers' pipeline loop), uncond prompt "".

        Image i starts from latent noise drawn by ``torch.Generator("cpu").manual_seed(seeds[i])``, so
        it depends on its own prompt and seed only: not on batch size, neighbours or device (CPU
        generators give the same noise everywhere). The pipeline uses this adapter's UNet object, so
        trained weights and LoRA adapters take effect.

        Args:
            height, width: pixels; default ``unet.config.sample_size * vae_scale_factor``.

        Returns:
            ``(N, 3, H, W)`` float32 on the CPU, clamped to [-1, 1].

        Raises:
            ValueError: seeds and prompts differ in number, or a non-positive ``steps``/``batch_size``.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"`steps` and `batch_size` must be positive, got {steps} and {batch_size}")
        return self.sample_condition(self.encode_prompts(prompts), seeds, steps, guidance, batch_size, progress,
                                     height, width)

    @torch.no_grad()
    def pipeline_samples(self, condition, seeds: Sequence[int], steps: int, guidance: float, batch_size: int,
                         progress: bool, height: int | None, width: int | None, scheduler_class: Any,
                         inputs: Any, decode: Any) -> torch.Tensor:
        """Every family's sampling: the diffusers pipeline's own loop (a fresh ``scheduler_class`` from
        the model's scheduler config, no text encoders: the condition is given) in batches, one CPU
        generator per image so that image i depends on its own prompt and seed only.
        ``inputs(cond_rows) -> pipeline keyword arguments``; ``decode(latents, height, width) -> images``."""
        if len(seeds) != len(condition):
            raise ValueError(f"need one seed per condition row, got {len(seeds)} seeds for {len(condition)} rows")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"`steps` and `batch_size` must be positive, got {steps} and {batch_size}")
        height, width = height or self.resolution, width or self.resolution
        pipe = self._pipeline(scheduler=scheduler_class.from_config(self.scheduler.config), with_text=False)
        pipe.set_progress_bar_config(disable=True)
        out = []
        with sampling(self.unet, len(seeds), progress) as bar:
            for start in range(0, len(seeds), batch_size):
                cond = condition[start:start + batch_size]
                generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
                latents = pipe(**inputs(cond), num_inference_steps=steps, guidance_scale=guidance, height=height,
                               width=width, generator=generators, output_type="latent").images
                out.append(decode(latents, height, width).float().clamp(-1, 1).cpu())
                bar.update(len(cond))
        return torch.cat(out)

    def decode_latents(self, latents: torch.Tensor, height: int | None = None, width: int | None = None
                       ) -> torch.Tensor:
        """Images from latents as the pipeline decodes them, in the VAE's own dtype."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def sample_condition(self, condition: TextCondition, seeds: Sequence[int], steps: int = 25,
                         guidance: float = 7.5, batch_size: int = 8, progress: bool = False,
                         height: int | None = None, width: int | None = None) -> torch.Tensor:
        """:meth:`sample` from already encoded (or attacked) text states, one image per row and seed.

        Embeddings are computed in fp32 and the pipeline gets no text encoder: with a bf16/fp16 text
        encoder the pipeline would cast embeddings and latents to that dtype for the fp32 UNet."""
        from diffusers import DPMSolverMultistepScheduler

        uncond = self.encode_prompts([""]).states
        dtype = self.unet.dtype

        def inputs(cond: TextCondition) -> dict:
            return {"prompt_embeds": cond.states.detach().to(self.device, dtype),
                    "negative_prompt_embeds": uncond.expand(len(cond), -1, -1).to(self.device, dtype)}

        return self.pipeline_samples(condition, seeds, steps, guidance, batch_size, progress, height, width,
                                     DPMSolverMultistepScheduler, inputs, self.decode_latents)

    # ---- what the red-team attacks need (diffunlearn.attacks) ----------------------------------
    def condition_tensors(self, condition: TextCondition) -> tuple[torch.Tensor, ...]:
        """The continuous part of a condition an attack may optimise: the CLIP token states."""
        return (condition.states,)

    def make_condition(self, states: torch.Tensor) -> TextCondition:
        """Inverse of :meth:`condition_tensors`."""
        return TextCondition(states)

    def text_tokens(self):
        """The CLIP tokenizer, text encoder and token length (for the discrete prompt attack, which
        back-propagates through the encoder: an offloaded encoder comes back to the accelerator for good)."""
        if self.offload_encoders:
            self.offload_encoders = False
            self.move_text_encoders(self.device)
        return self.tokenizer, self.text_encoder, int(self.tokenizer.model_max_length)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextCondition:
        """Token ids ``(N, 77)`` -> text states WITH gradient through the encoder, as :meth:`encode_prompts`
        computes them otherwise (attention mask only where the encoder's config uses one)."""
        use_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        states = self.text_encoder(input_ids.to(self.device),
                                   attention_mask=attention_mask.to(self.device) if use_mask else None)[0]
        return TextCondition(states.float())
