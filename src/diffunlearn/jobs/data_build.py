"""``diffunlearn data build``: the training image sets of a config, made once and reused by runs.

Layout of the output folder::

    config.yaml     the config that made it (first line: the command)
    prompts.json    train pairs, and the held-out test sets (disjoint vocabulary) for evaluation
    forget/, remain/  see :mod:`diffunlearn.data.images` (request, PNGs, manifest)

Train with ``data_dir=FOLDER``; the run checks the folder's request against its own config and
refuses a mismatch instead of training on the wrong images.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import UnlearnConfig, dump_config
from ..core.parallel import Parallel
from ..utils import atomic_write_text

TEST_PROMPTS = 100  # held-out prompts per set, as in the paper (PAPER.md §3)


def build_data(cfg: UnlearnConfig, out: Path, progress: bool = True, command: str = "diffunlearn data build"
               ) -> dict | None:
    """Generate (or finish) the forget and remain images of ``cfg`` in ``out``.

    Returns:
        a summary on the main process, None on the others.

    Raises:
        UserError: bad model, or ``out`` holds images made with other settings.
    """
    from ..data.training import build_training_data, prompt_texts, training_prompts
    from .runfolder import load_for_run

    parallel = Parallel.from_environment()
    adapter, folder = load_for_run(cfg, parallel)
    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml", command)
        train_f, train_r = training_prompts(cfg)
        prompts = {"train": {"forget": prompt_texts(train_f), "remain": prompt_texts(train_r)}}
        if cfg.diversity == "diverse":
            test_f, test_r = training_prompts(cfg, split="test", n=TEST_PROMPTS)
            prompts["test"] = {"forget": prompt_texts(test_f), "remain": prompt_texts(test_r)}
        atomic_write_text(out / "prompts.json", json.dumps(prompts, indent=1) + "\n")
    parallel.barrier()
    data = build_training_data(adapter, folder, cfg, out, progress, parallel, replace=False)
    if not parallel.is_main:
        return None
    return {"folder": str(out), "pairs": len(data[4]), "forget_latents": list(data[0].shape),
            "remain_latents": list(data[2].shape)}
