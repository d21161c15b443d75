"""``prompt``: discrete adversarial prompts a user could type (UnlearnDiffAtk-style).

``tokens`` adversarial tokens are appended to each forget prompt (before its end token). Their
input embeddings are optimised with the embedding attack's objective (the attacked model's
denoising loss on concept images, the prompt being the concept image's own forget prompt plus the
suffix) and, at every step, PROJECTED to the nearest vocabulary embedding: the forward pass uses the
projected tokens, the gradient updates the continuous ones (straight-through), as in PEZ (Wen et
al., "Hard Prompts Made Easy", NeurIPS 2023) and UnlearnDiffAtk (Zhang et al., ECCV 2024), which
optimises a discrete prefix the same way. Only whole alphabetic words of the tokenizer's vocabulary
are allowed, so the suffix decodes to text that tokenizes back to the same tokens.

One universal suffix is found for the concept (on the attack's images and their prompts) and then
appended to every held-out forget prompt; the result reports the suffix and the prompts, and the
attacked samples are generated from the TEXT, through the ordinary prompt path.

Models with several text encoders (SDXL: two CLIPs; SD3: two CLIPs and T5; FLUX: CLIP and T5) search
the suffix in ONE encoder's vocabulary (``adapter.suffix_encoder()``: OpenCLIP-G, CLIP-G, T5) and
encode the prompt with the suffix as TEXT through the pipeline's own ``encode_prompt``
(``adapter.encode_prompts_with_grad``): the searched encoder sees the straight-through embeddings at
the suffix positions, the others read the projected words, without gradient. Only words that
tokenize back to their single token are allowed there, so the positions are known from the text.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..core.losses import denoising_loss
from ..errors import UserError
from .base import (
    AttackOutput,
    AttackSamples,
    AttackTarget,
    denoising_batches,
    device_of,
    frozen_model,
    is_text_model,
    positive,
)

_WORD = re.compile(r"^[a-z]{2,}$")


def allowed_token_ids(tokenizer: Any, round_trip: bool = False) -> list[int]:
    """Ids of the tokenizer's whole-word alphabetic tokens (WordPiece words without ``##``; CLIP BPE
    tokens ending in ``</w>``; SentencePiece pieces starting with ``▁``, as T5's), special tokens
    excluded: what a suffix may be made of. The vocabularies are told apart by those marks.

    ``round_trip``: keep only the words that tokenize back to exactly their one token (what the
    several-encoder path needs to find the suffix in the tokenized text)."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    bpe = any(token.endswith("</w>") for token in vocab)
    piece = not bpe and any(token.startswith("\u2581") for token in vocab)
    ids = []
    for token, i in vocab.items():
        if i in special:
            continue
        if bpe:
            if token.endswith("</w>") and _WORD.match(token[:-4]):
                ids.append(i)
        elif piece:
            if token.startswith("\u2581") and _WORD.match(token[1:]):
                ids.append(i)
        elif _WORD.match(token):
            ids.append(i)
    ids.sort()
    if round_trip and ids:
        words = [tokenizer.decode([i]).strip() for i in ids]
        again = tokenizer(words, add_special_tokens=False)["input_ids"]
        ids = [i for i, back in zip(ids, again) if list(back) == [i]]
    return ids


def suffix_positions(tokenizer: Any, texts: list[str], suffix_ids: list[int], max_length: int) -> torch.Tensor:
    """Boolean ``(N, max_length)``: where the ``suffix_ids`` sit in each text as the pipeline tokenizes
    it (padded to ``max_length``): the last place they occur among the text's tokens.

    Raises:
        UserError: a text too long to keep its suffix within ``max_length`` tokens.
    """
    tok = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    k, want = len(suffix_ids), torch.tensor(suffix_ids, dtype=ids.dtype)
    where = torch.zeros(ids.shape, dtype=torch.bool)
    for row in range(len(texts)):
        n = int(mask[row].sum())
        for start in range(n - k, -1, -1):
            if torch.equal(ids[row, start:start + k], want):
                where[row, start:start + k] = True
                break
        else:
            raise UserError(f"the forget prompt {texts[row]!r} leaves no room for a {k}-token suffix within "
                            f"{max_length} tokens; use shorter prompts or fewer --option prompt.tokens")
    return where


def input_embedding_modules(encoder: Any) -> list[torch.nn.Module]:
    """Every embedding module of ``encoder`` that holds its input token table: the one its forward
    calls may be a tied copy of ``get_input_embeddings()`` (T5's ``encoder.embed_tokens`` beside its
    ``shared``), so the attack's hook goes on each of them."""
    table = encoder.get_input_embeddings()
    found = [m for m in encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is table.weight]
    return found or [table]


def attacked_prompt(prompt: str, suffix: str) -> str:
    """A prompt with the suffix appended, as the attack's samples are prompted."""
    return f"{prompt.rstrip().rstrip('.')} {suffix}"


def with_suffix(tokenizer: Any, prompts: list[str], suffix_ids: list[int], max_length: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``(N, max_length)`` of ``prompts`` with ``suffix_ids`` inserted before each end token,
    the attention mask, and a boolean ``(N, max_length)`` marking the suffix positions."""
    k = len(suffix_ids)
    tok = tokenizer(prompts, padding="max_length", max_length=max_length - k, truncation=True, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    n = len(prompts)
    out_ids = torch.empty(n, max_length, dtype=ids.dtype)
    out_mask = torch.empty(n, max_length, dtype=mask.dtype)
    where = torch.zeros(n, max_length, dtype=torch.bool)
    suffix = torch.tensor(suffix_ids, dtype=ids.dtype)
    for row in range(n):
        end = int(mask[row].sum()) - 1  # the end token ([SEP] / <|endoftext|>) of this prompt
        out_ids[row] = torch.cat([ids[row, :end], suffix, ids[row, end:]])
        out_mask[row] = torch.cat([mask[row, :end], torch.ones(k, dtype=mask.dtype), mask[row, end:]])
        where[row, end:end + k] = True
    return out_ids, out_mask, where


def several_encoders(adapter: Any) -> bool:
    """Whether the model has several text encoders, searched through ``suffix_encoder()``."""
    return bool(getattr(adapter, "several_text_encoders", False))


def token_path(adapter: Any) -> tuple[bool, Any, Any, int]:
    """(several encoders?, tokenizer, encoder, padded length) of the encoder the suffix is searched in."""
    several = several_encoders(adapter)
    return (several, *(adapter.suffix_encoder() if several else adapter.text_tokens()))


@dataclasses.dataclass
class PromptAttack:
    """Settings: ``tokens`` suffix tokens, ``iterations`` Adam steps at ``lr`` (in units of the
    embedding table's scale) on minibatches of ``batch_size`` concept images."""

    tokens: int = 5
    iterations: int = 100
    lr: float = 0.1
    batch_size: int = 16
    name: str = dataclasses.field(default="prompt", init=False)

    def __post_init__(self) -> None:
        self.tokens = positive(self.tokens, "prompt.tokens")
        self.iterations = positive(self.iterations, "prompt.iterations")
        self.lr = positive(self.lr, "prompt.lr", float)
        self.batch_size = positive(self.batch_size, "prompt.batch_size")

    def applies(self, adapter: Any) -> str | None:
        if not is_text_model(adapter) or not (hasattr(adapter, "text_tokens") or several_encoders(adapter)):
            return "prompt attacks edit text, and this model is conditioned on class labels, not prompts"
        return None

    def settings(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "iterations": self.iterations, "lr": self.lr, "batch_size": self.batch_size,
                "projection": "nearest whole-word vocabulary embedding (L2), straight-through"}

    def search(self, target: AttackTarget) -> tuple[list[int], list[float]]:
        """The suffix token ids found, and the loss of the projected suffix every 10 iterations."""
        adapter = target.adapter
        several, tokenizer, encoder, max_length = token_path(adapter)
        table_module = encoder.get_input_embeddings()
        allowed = torch.tensor(allowed_token_ids(tokenizer, round_trip=several))
        table = table_module.weight.detach().float()[allowed.to(table_module.weight.device)]
        generator = torch.Generator().manual_seed(target.seed)
        # Start from random vocabulary words (seeded), as PEZ does.
        start = allowed[torch.randint(len(allowed), (self.tokens,), generator=generator)]
        soft = table_module.weight.detach().float()[start.to(table_module.weight.device)].clone().requires_grad_(True)
        scale = float(table.norm(dim=1).mean())
        optimizer = torch.optim.Adam([soft], lr=self.lr * scale / max(table.shape[1], 1) ** 0.5)
        state: dict[str, torch.Tensor] = {}

        def replace(module, inputs, output):  # forward hook: the suffix positions get the projected embeddings
            where = state["where"].to(output.device)
            output = output.clone()
            output[where] = state["hard"].to(output.dtype).repeat(int(where.shape[0]), 1)
            return output

        handles = [m.register_forward_hook(replace) for m in input_embedding_modules(encoder)]
        losses: list[float] = []
        best_ids, best_loss = allowed[torch.cdist(soft.detach(), table).argmin(1).cpu()].tolist(), float("inf")
        from tqdm.auto import tqdm

        try:
            with frozen_model(adapter):
                batches = denoising_batches(target, self.iterations, self.batch_size, generator)
                for i, (idx, x0, noise, t) in enumerate(tqdm(batches, total=self.iterations, desc="prompt search",
                                                           disable=not target.progress, leave=False)):
                    nearest = torch.cdist(soft.detach(), table).argmin(1)
                    projected = table[nearest]
                    state["hard"] = soft + (projected - soft).detach()  # straight-through estimator
                    prompts = [target.image_prompts[j] for j in idx.tolist()]
                    if several:  # the projected words as text, for every encoder; the hook marks them
                        suffix_ids = allowed[nearest.cpu()].tolist()
                        texts = [attacked_prompt(p, tokenizer.decode(suffix_ids).strip()) for p in prompts]
                        state["where"] = suffix_positions(tokenizer, texts, suffix_ids, max_length)
                        condition = adapter.encode_prompts_with_grad(texts)
                    else:
                        ids, mask, where = with_suffix(tokenizer, prompts, [0] * self.tokens, max_length)
                        state["where"] = where
                        condition = adapter.encode_tokens(ids.to(device_of(adapter)), mask.to(device_of(adapter)))
                    loss = denoising_loss(adapter, x0, condition, noise, t).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if loss.item() < best_loss:
                        best_loss, best_ids = loss.item(), allowed[nearest.cpu()].tolist()
                    if i % 10 == 0 or i == self.iterations - 1:
                        losses.append(round(loss.item(), 6))
        finally:
            for handle in handles:
                handle.remove()
        return best_ids, losses

    def run(self, target: AttackTarget) -> AttackOutput:
        tokenizer = token_path(target.adapter)[1]
        ids, losses = self.search(target)
        suffix = tokenizer.decode(ids).strip()
        prompts = [attacked_prompt(p, suffix) for p in target.prompts]
        images = target.sample(prompts)
        return AttackOutput([AttackSamples("", images, prompts)], headline="",
                            details={"suffix": suffix, "suffix_ids": ids, "loss_every_10": losses,
                                     "example_prompts": prompts[:5]})
