"""Which UNet parameters an unlearning run trains: named selections shared by every adapter.

* ``full``: every UNet weight.
* ``cross-attention``: the cross-attention blocks (``attn2``: the text-to-image attention), the
  reference code's ``xattn`` option (PAPER.md §2).
* ``non-cross-attention``: every UNet weight except ``attn2``, in the spirit of ESD-u. (ESD's own
  ``noxattn`` also leaves out the time embedding and the output layers; this selection does not.)
* ``lora``: low-rank adapters (peft LoRA) injected into the UNet's attention projections; the base
  weights stay frozen and bit-identical, only the adapters train. With a ``base_dtype`` (bf16/fp16)
  the frozen base is held in half precision while the adapters stay fp32, as diffusers' LoRA
  training scripts do (``cast_training_params``): half the base's memory (FLUX.1-dev's 11.9 B
  transformer: 24 GB instead of 48 GB).

LoRA parameters never belong to the first three selections, so a UNet that carries adapters still
selects exactly its base weights for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UserError
from .base import SELECTIONS

LORA_MARK = "lora_"
CROSS_ATTENTION_MARK = ".attn2."
ADAPTER_NAME = "default"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters (Hu et al. 2021): ΔW = (alpha / rank) · B A, with B = 0 at the start.

    ``target_modules`` are module-name suffixes inside the UNet; the default covers the query, key,
    value and output projections of both self- and cross-attention, as diffusers' LoRA scripts do.
    ``base_dtype`` (``None`` = as loaded) is the dtype the frozen base weights are cast to once the
    adapters are injected; the adapters themselves stay fp32 (the trained master weights).
    """

    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    base_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"LoRA `rank` must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            problems.append(f"LoRA `alpha` must be positive, got {self.alpha!r}")
        if not self.target_modules:
            problems.append("LoRA `target_modules` must name at least one module (e.g. to_q)")
        if self.base_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            problems.append(f"LoRA `base_dtype` must be fp32, bf16 or fp16, got {self.base_dtype!r}")
        if problems:
            raise UserError("; ".join(problems))


def has_lora(unet: nn.Module) -> bool:
    """Whether LoRA adapters have been injected into ``unet``."""
    return ADAPTER_NAME in (getattr(unet, "peft_config", None) or {})


def inject_lora(unet: nn.Module, settings: LoraSettings) -> None:
    """Add one peft LoRA adapter to a diffusers UNet (``unet.add_adapter``), idempotently.

    peft draws the A matrices from torch's global RNG (B starts at zero, so the model's output is
    unchanged): seed torch before the first injection for reproducible runs.

    Raises:
        UserError: the UNet already carries an adapter with other settings, or no module matched.
    """
    if has_lora(unet):
        current = unet.peft_config[ADAPTER_NAME]
        same = (current.r == settings.rank and float(current.lora_alpha) == float(settings.alpha)
                and set(current.target_modules) == set(settings.target_modules))
        if not same:
            raise UserError(f"this UNet already carries a LoRA adapter (rank {current.r}, alpha {current.lora_alpha}, "
                            f"targets {sorted(current.target_modules)}); configure LoRA before its first use")
        return
    from peft import LoraConfig

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.target_modules),
                        init_lora_weights=True)
    try:
        unet.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise UserError(f"LoRA target modules {list(settings.target_modules)} match no layer of this UNet; "
                        "use attention projection names such as to_q, to_k, to_v, to_out.0") from exc


def cast_frozen_base(unet: nn.Module, dtype: torch.dtype) -> None:
    """Hold every non-LoRA weight and buffer of ``unet`` in ``dtype`` and every LoRA weight in fp32.

    peft gives each adapter its base layer's dtype, so the cast comes after the injection; the
    module's outputs keep the base dtype (peft casts the adapter's contribution back), and autocast
    (``mixed_precision``) runs the matmuls in half precision either way.
    """
    nn.Module.to(unet, dtype=dtype)  # (nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast)
    for name, p in unet.named_parameters():
        if LORA_MARK in name:
            p.data = p.data.float()


def select_parameters(unet: nn.Module, selection: str, lora: LoraSettings | None = None,
                      cross_attention: Callable[[str], bool] | None = None) -> list[tuple[str, nn.Parameter]]:
    """Mark the selected UNet parameters trainable and freeze every other one.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        selection: one of ``SELECTIONS`` (see the module docstring).
        lora: LoRA settings for ``selection="lora"`` (default ``LoraSettings()``); adapters are injected
            on first use.
        cross_attention: ``name -> bool``, which parameters are the text-to-image attention (default:
            a UNet's ``attn2``; an MMDiT names its text-side projections instead).

    Returns:
        ``(name, parameter)`` pairs in ``named_parameters`` order: exactly the parameters that now have
        ``requires_grad=True``.

    Raises:
        UserError: unknown selection, or a selection that matched no parameter.
    """
    is_cross = cross_attention or (lambda name: CROSS_ATTENTION_MARK in name)
    if selection == "lora":
        settings = lora or LoraSettings()
        inject_lora(unet, settings)
        keep = lambda name: LORA_MARK in name  # noqa: E731
        if settings.base_dtype is not None:
            cast_frozen_base(unet, settings.base_dtype)
    elif selection == "full":
        keep = lambda name: LORA_MARK not in name  # noqa: E731
    elif selection == "cross-attention":
        keep = lambda name: is_cross(name) and LORA_MARK not in name  # noqa: E731
    elif selection == "non-cross-attention":
        keep = lambda name: not is_cross(name) and LORA_MARK not in name  # noqa: E731
    else:
        raise UserError(f"unknown parameter selection {selection!r}; use one of: {', '.join(SELECTIONS)}")
    chosen = []
    for name, p in unet.named_parameters():
        p.requires_grad_(keep(name))
        if keep(name):
            chosen.append((name, p))
    if not chosen:
        raise UserError(f"parameter selection {selection!r} matched no parameter of this model")
    return chosen
