"""UCE: unified concept editing (Gandikota et al., WACV 2024), the closed-form baseline.

No gradient step and no training image: every cross-attention key and value projection W (``attn2.to_k``,
``attn2.to_v`` of the UNet) is replaced by the minimiser of::

    λ·‖W − W₀‖²  +  e·Σ_i ‖W·c_i − W₀·c*_i‖²  +  p·Σ_j ‖W·c_j − W₀·c_j‖²

over the token states c_i of the erased texts (the concept's words), the states c*_i of the guide text
at the same positions (its old outputs are the new targets), and the states c_j of the preserved
texts. Its normal equations ``W·(λI + e·Σ c_i c_iᵀ + p·Σ c_j c_jᵀ) = λW₀ + e·Σ W₀c*_i c_iᵀ + p·Σ W₀c_j c_jᵀ``
are solved in float64, one linear solve per projection (``solve_edit``). Token positions follow the
reference code: from each text's last word token to the end of the sequence, aligned between the
erased and the guide text, so the end-of-text and padding states (which carry the whole prompt in
CLIP) are edited too.

Where it works: the UNet families whose text reaches the image only through cross-attention's keys
and values: Stable Diffusion 1.x/2.x and SDXL (``attn2`` over both encoders' concatenated states). It
also runs on the digit world, but there the pooled text embedding also enters through the UNet's time
embedding (``addition_embed_type="text"``), which UCE does not edit, so the concept is only partly
removed (README). SD3 and FLUX are refused: their text tokens are transformed block by block in the
joint attention, so the first block's projections see encoder states and every later one sees states
the network computed, and no closed form over the encoder's states exists.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from torch import nn

from ..errors import UserError
from .base import Method

FAMILIES = ("pixel", "text", "sdxl")
EDITED = ("attn2.to_k", "attn2.to_v")


@dataclasses.dataclass(frozen=True)
class ClosedForm:
    """The forget "objective" of a method that edits weights in closed form: no batches, no gradient."""

    kind: str = "closed-form"
    needs_reference: bool = False
    settings: tuple[str, ...] = ("uce_guide", "uce_preserve", "uce_erase_scale", "uce_preserve_scale", "uce_lambda")

    def bind(self, run):
        raise TypeError("a closed-form method takes no gradient steps")

    def active(self, loss: float, cfg) -> bool:
        return False


def erase_texts(concepts: list[str]) -> list[str]:
    """The texts UCE erases: each concept's words (a template's concept words; a digit-world concept
    and its synonyms)."""
    from ..data.templates import TEMPLATES
    from ..worlds import digits as world

    texts: list[str] = []
    for c in concepts:
        if c in TEMPLATES:
            texts += list(TEMPLATES[c].words)
        else:
            attribute = world.concept_attribute(c)
            texts += list(world.SYNONYMS[attribute][c])
    return list(dict.fromkeys(texts))


def projections(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every cross-attention key and value projection of ``unet``, by name."""
    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, nn.Linear) and any(name.endswith(e) for e in EDITED)]


def token_counts(adapter, prompts: list[str], condition) -> list[int]:
    """Real tokens (with the begin and end tokens) of each prompt, as the model's tokenizer counts them."""
    if getattr(condition, "mask", None) is not None:
        return [int(m.sum()) for m in condition.mask]
    tok = adapter.tokenizer(prompts, padding="max_length", max_length=adapter.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    return [int(m.sum()) for m in tok.attention_mask]


def aligned_states(adapter, old: list[str], new: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_old, C_new): float64 ``(M, D)`` token states of the erased texts and of the guide text at the
    same positions, from each text's last word token to the end of the sequence (the reference code's
    alignment)."""
    cond = adapter.encode_prompts(old + new)
    states = cond.states.double()
    counts = token_counts(adapter, old + new, cond)
    length = states.shape[1]
    olds, news = [], []
    for i in range(len(old)):
        j = len(old) + i
        f_o, f_n = counts[i] - 2, counts[j] - 2  # the last word token (before the end token)
        far = max(f_o, f_n)
        olds.append(states[i, f_o:length - max(0, far - f_o)])
        news.append(states[j, f_n:length - max(0, far - f_n)])
    return torch.cat(olds), torch.cat(news)


def preserved_states(adapter, texts: list[str]) -> torch.Tensor:
    """float64 ``(M, D)`` token states of the preserved texts (every position, as the reference)."""
    if not texts:
        return torch.zeros(0, 0, dtype=torch.float64)
    states = adapter.encode_prompts(texts).states.double()
    return states.reshape(-1, states.shape[-1])


def solve_edit(W0: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
               erase_scale: float, preserve_scale: float, lam: float) -> torch.Tensor:
    """The UCE weight (module docstring), float64: the solution of its normal equations."""
    W0 = W0.double()
    d = W0.shape[1]
    mat1 = lam * W0 + erase_scale * (guide @ W0.T).T @ erase
    mat2 = lam * torch.eye(d, dtype=torch.float64) + erase_scale * erase.T @ erase
    if preserve.numel():
        mat1 = mat1 + preserve_scale * (preserve @ W0.T).T @ preserve
        mat2 = mat2 + preserve_scale * preserve.T @ preserve
    return torch.linalg.solve(mat2, mat1.T).T  # W·mat2 = mat1, mat2 symmetric


def uce_procedure(adapter, method, cfg, forget_x0, forget_cond, remain_x0, remain_cond, metrics_path=None,
                  progress=True, checkpoint_dir=None, resume=False, parallel=None) -> list[dict]:
    """Edit ``adapter``'s UNet in place; one history record with the edit time."""
    family = getattr(adapter, "family", "")
    if family not in FAMILIES:
        raise UserError(f"uce edits a UNet's cross-attention keys and values (SD 1.x/2.x, SDXL, the digit world); "
                        f"a {family} model's text passes through its transformer blocks, so use a gradient "
                        "method (rg, graddiff, ...) for it")
    started = time.perf_counter()
    erase = erase_texts(cfg.concepts)
    preserve = [t.strip() for t in cfg.uce_preserve.split(",") if t.strip()]
    c_old, c_new = aligned_states(adapter, erase, [cfg.uce_guide] * len(erase))
    c_keep = preserved_states(adapter, preserve)
    edited = projections(adapter.unet)
    with torch.no_grad():
        for _, module in edited:
            W = solve_edit(module.weight.detach().cpu(), c_old, c_new, c_keep, cfg.uce_erase_scale,
                           cfg.uce_preserve_scale, cfg.uce_lambda)
            module.weight.copy_(W.to(module.weight.dtype))
    seconds = time.perf_counter() - started
    record = {"step": 1, "forget_loss": None, "remain_loss": None, "edited_projections": len(edited),
              "erased_texts": erase, "preserved_texts": preserve, "guide": cfg.uce_guide,
              "edit_seconds": seconds, "elapsed_seconds": seconds}
    if metrics_path is not None and (parallel is None or parallel.is_main):
        metrics_path.write_text(json.dumps(record) + "\n")
    return [record]


def _checks(cfg) -> list[str]:
    from ..families import model_kind

    errors = []
    kind = model_kind(cfg.model)
    if kind not in FAMILIES:
        errors.append(f"uce edits a UNet's text cross-attention keys and values (SD 1.x/2.x, SDXL, the digit world); "
                      f"a {kind} model has none it could edit alone, so use a gradient method (rg, graddiff, ...)")
    if cfg.selection != "full":
        errors.append("uce edits the cross-attention keys and values itself; leave `selection` at full")
    if cfg.uce_lambda <= 0:
        errors.append(f"`uce_lambda` must be > 0 (it keeps the edit's linear system solvable), got {cfg.uce_lambda}")
    return errors


def _no_gradients(*args, **kwargs):
    raise TypeError("uce takes no gradient steps; its procedure edits the weights in closed form")


METHOD = Method(
    name="uce",
    summary="unified concept editing (Gandikota et al. 2024): cross-attention keys and values in closed form",
    uses_remain=False,
    remain_scope="batch",
    combine=_no_gradients,
    forget=ClosedForm(),
    procedure=uce_procedure,
    needs_images=False,
    checks=_checks,
    multi_concept_note="",
)
