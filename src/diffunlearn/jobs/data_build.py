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
    from ..data.training import build_training_data, prompt_texts, training_prompt_sets
    from .runfolder import load_for_run

    parallel = Parallel.from_environment()
    adapter, folder = load_for_run(cfg, parallel)
    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml", command)
        def listed(split: str, n: int | None = None) -> dict:
            # One concept: {"forget": [...], "remain": [...]}; several: forget is {concept: [...]}.
            forget_sets, remain = training_prompt_sets(cfg, split=split, n=n)
            forget = ({c: prompt_texts(f) for c, f in zip(cfg.concepts, forget_sets)} if len(forget_sets) > 1
                      else prompt_texts(forget_sets[0]))
            return {"forget": forget, "remain": prompt_texts(remain)}

        prompts = {"train": listed("train")}
        if cfg.diversity == "diverse":
            prompts["test"] = listed("test", TEST_PROMPTS)
        atomic_write_text(out / "prompts.json", json.dumps(prompts, indent=1) + "\n")
    parallel.barrier()
    data = build_training_data(adapter, folder, cfg, out, progress, parallel, replace=False)
    if not parallel.is_main:
        return None
    several = isinstance(data[0], list)
    return {"folder": str(out), "pairs": len(data[5]),
            "forget_latents": ({c: list(x.shape) for c, x in zip(cfg.concepts, data[0])} if several
                               else list(data[0].shape)),
            "remain_latents": list(data[2].shape)}
