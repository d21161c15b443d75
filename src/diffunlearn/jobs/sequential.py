"""``diffunlearn demo --sequential three,seven,red``: erasure requests served one after another.

For each method, request i starts from the model request i − 1 produced (the embedded base model
for the first) and removes concept i, so each result carries the lineage of every earlier request
(``model/lineage.json``, the model card). After EVERY request the model is scored on ALL the
concepts, the ones still to come included: each concept's held-out forget prompts (no other listed
concept in them) and one held-out remain set that shows none of them. This answers whether an
earlier concept comes back and whether alignment erodes request by request.

Every request keeps the concepts earlier requests removed out of its training prompts
(``remain_excludes``): a remain prompt that asked for an erased digit would teach it back.
``protect`` (the variant ``METHOD+protect``) also keeps the earlier concepts in the forget objective:
request i is a several-concept run on concepts 1..i (the k-way rules), so an earlier erasure is
defended while the new one is made, at k forget gradients a step.

Each request is an ordinary run folder (``OUT/METHOD/request-I-CONCEPT``); finished ones are reused,
so an interrupted demo resumes. Writes ``sequential.md``, ``sequential.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import build_config
from ..errors import UserError
from ..evaluate.world import evaluate_world
from ..utils import atomic_write_text
from .run import reuse_or_run

SCORES = "all-concepts.json"  # in each request folder: the scores on every concept after it


def _scores(adapter, concepts: list[str], cfg, folder: Path, progress: bool) -> dict:
    """The model's forget score on each concept and its alignment on a remain set without any of them
    (cached in ``folder``)."""
    path = folder / SCORES
    key = {"concepts": concepts, "eval_prompts": cfg.eval_prompts, "eval_split": cfg.eval_split,
           "eval_seed": cfg.eval_seed, "eval_steps": cfg.eval_steps, "eval_guidance": cfg.eval_guidance}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["scores"]
    ev = evaluate_world(adapter, ",".join(concepts), cfg.eval_prompts, cfg.eval_split, cfg.eval_seed, cfg.eval_steps,
                        cfg.eval_guidance, progress)
    scores = {"forget_scores": ev.forget_scores, "alignment": ev.alignment, "quality_fd": ev.quality_fd}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "scores": scores}, indent=2) + "\n")
    return scores


def sequential_table(rows: list[dict], concepts: list[str]) -> str:
    head = ["method", "requests served", *[f"forget {c} ↓" for c in concepts], "alignment ↑", "quality FD ↓"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        served = ", ".join(r["served"]) or "(base model)"
        cells = [r["method"], served, *[f"{r['forget_scores'][c]:.3f}" for c in concepts], f"{r['alignment']:.3f}",
                 f"{r['quality_fd']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sequential_plot(rows: list[dict], concepts: list[str], path: Path) -> None:
    """Per method: each concept's forget score (solid) and the alignment (dashed) against requests."""
    from ..report import matplotlib_pyplot

    plt = matplotlib_pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows if r["served"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.4), squeeze=False, sharey=True)
    base = next(r for r in rows if not r["served"])
    for ax, m in zip(axes[0], methods):
        series = [base] + [r for r in rows if r["method"] == m and r["served"]]
        x = list(range(len(series)))
        for c in concepts:
            ax.plot(x, [r["forget_scores"][c] for r in series], marker="o", label=f"forget {c}")
        ax.plot(x, [r["alignment"] for r in series], "k--", marker="s", label="alignment")
        ax.set_xticks(x)
        ax.set_xticklabels(["base"] + [f"-{c}" for c in concepts[:len(series) - 1]], fontsize=8)
        ax.set_title(m, fontsize=10)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out score")
    axes[0][-1].legend(fontsize=7, loc="center right")
    fig.suptitle("requests served one after another: forget scores ↓ and alignment ↑", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sequential(out: Path, concepts: list[str], methods: list[str], overrides: list[str], protect: bool = False,
                   force: bool = False, progress: bool = True, command: str = "diffunlearn demo --sequential") -> str:
    """Serve ``concepts`` one request at a time with each of ``methods`` (and, with ``protect``, each
    method's protecting variant); returns the markdown table.

    Raises:
        UserError: fewer than two concepts, an unknown concept or method, or a bad override.
    """
    from ..models import load_adapter
    from ..tasks.prompts import PromptTask

    if len(concepts) < 2 or len(set(concepts)) != len(concepts):
        raise UserError(f"--sequential needs two or more different concepts, e.g. three,seven,red; got {concepts}")
    base_cfg = build_config(None, ["concept=" + ",".join(concepts), *overrides])  # checks concepts and overrides
    if base_cfg.model != "embedded:digits":
        raise UserError("--sequential runs on the embedded digit world; for your own model chain `diffunlearn "
                        "unlearn model=PREVIOUS_RUN/model concept=NEXT remain_excludes=EARLIER` (README)")
    out.mkdir(parents=True, exist_ok=True)
    base, base_folder = load_adapter("embedded:digits")
    rows = [{"method": "base", "served": [], **_scores(base, concepts, base_cfg, out / "base", progress)}]
    variants = [(m, False) for m in methods] + ([(m, True) for m in methods] if protect else [])
    task = PromptTask()
    for method, protecting in variants:
        name = method + ("+protect" if protecting else "")
        model, adapter, model_folder = "embedded:digits", base, base_folder
        for i, concept in enumerate(concepts):
            earlier = concepts[:i]
            request = ",".join([*earlier, concept]) if protecting else concept
            keys = [f"model={model}", f"method={method}", f"concept={request}", *overrides]
            if earlier and not protecting:
                keys.append("remain_excludes=" + ",".join(earlier))
            cfg = build_config(None, keys)
            folder = out / name / f"request-{i + 1}-{concept}"
            # Request i starts from request i − 1's model, already in memory (run_job trains a copy of it).
            _, _, unlearned = reuse_or_run(task, adapter, cfg, folder, f"{command} ({name}, request {i + 1})",
                                           force=force, progress=progress, pictures=False, model_folder=model_folder)
            scores = _scores(unlearned, concepts, base_cfg, folder, progress)
            rows.append({"method": name, "served": concepts[:i + 1], **scores})
            model, adapter, model_folder = str(folder / "model"), unlearned, folder / "model"
    table = sequential_table(rows, concepts)
    atomic_write_text(out / "sequential.md", table + "\n")
    atomic_write_text(out / "summary.json", json.dumps({"concepts": concepts, "methods": methods, "protect": protect,
                                                        "overrides": overrides, "rows": rows}, indent=2) + "\n")
    sequential_plot(rows, concepts, out / "sequential.png")
    return table
