"""``diffunlearn demo --all-methods``: the embedded leaderboard.

Every method in the registry (except the benchmark-only ``rg-flat``) on both embedded concepts, the
object ("three") and the modifier ("red"), over several seeds. Each (concept, seed) is one ordinary
demo folder in which all methods share the same data; the seed sets both the data (prompts and
generated images) and the training noise. The table reports mean ± std over seeds of forget score,
alignment and quality FD on the HELD-OUT prompts, plus the seconds each method took. Finished demo
folders are reused, so an interrupted leaderboard resumes.

With ``attacks``, every model (the base model included) is also red-teamed with ``diffunlearn
attack`` (``DEMO/attacks/METHOD``, resumable) and the table gains each attack's success rate. Where
the exact-unlearning gold standard exists for a concept (a model retrained without it,
``embedded:digits-without-three``), it gets a row of its own: how far each method is from a model
that never learned the concept.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import build_config
from ..errors import UserError
from ..evaluate.world import evaluate_world
from ..methods import METHODS
from ..report import mean_std, mean_std_table
from ..utils import atomic_write_text, environment
from .attack import red_team
from .demo import red_team_demo, run_demo

LEADERBOARD_METHODS = tuple(name for name in METHODS if name != "rg-flat")
CONCEPTS = ("three", "red")
FIELDS = (("forget_score", "forget score ↓", 3), ("alignment", "alignment ↑", 3), ("quality_fd", "quality FD ↓", 0),
          ("seconds", "seconds", 0))


def leaderboard_table(results: dict[str, dict[str, list[dict]]], attacks: tuple[str, ...] = ()) -> str:
    """Markdown: one row per (concept, method), mean ± std over seeds; one ASR column per attack."""
    def asr(runs: list[dict]) -> list[str]:
        out = []
        for a in attacks:
            values = [r["asr"][a] for r in runs if a in r.get("asr", {})]
            out.append(mean_std(values, 3) if len(values) == len(runs) else "-")
        return out

    rows = {(concept, name): runs for concept, methods in results.items() for name, runs in methods.items()}
    return mean_std_table(["concept", "method"], rows, FIELDS, ([f"ASR {a} ↓" for a in attacks], asr))


def retrained_row(concept: str, out: Path, attacks: tuple[str, ...], cfg, progress: bool, command: str
                  ) -> dict | None:
    """The gold standard's row (clean scores on the demo's held-out prompts, and its ASRs), or ``None``
    when no model retrained without ``concept`` is installed."""
    from ..models import load_adapter, retrained_name

    name = retrained_name(concept)
    try:
        adapter, _ = load_adapter(name)
    except UserError:
        return None
    evaluation = evaluate_world(adapter, concept, cfg.eval_prompts, "test", cfg.eval_seed,
                                cfg.eval_steps, cfg.eval_guidance, progress)
    row = {**evaluation.metrics(), "seconds": 0.0}
    if attacks:
        row["asr"] = red_team(name, concept, out / f"retrained-{concept}", attacks, cfg.eval_steps,
                              cfg.eval_guidance, progress, f"{command} (retrained without {concept})",
                              n=cfg.eval_prompts)
    return row


def _current(summary: dict, concept: str, methods: tuple[str, ...], overrides: list[str]) -> bool:
    """Whether a finished demo holds every method with exactly the configs this leaderboard asks for."""
    from .runfolder import same_config

    settings = summary.get("settings", {})
    return all(m in settings and same_config(settings[m], build_config(None, overrides, base={"concept": concept,
                                                                                               "method": m}))
               for m in methods)


def run_leaderboard(out: Path, methods: tuple[str, ...] = LEADERBOARD_METHODS, concepts: tuple[str, ...] = CONCEPTS,
                    seeds: tuple[int, ...] = (0, 1, 2), overrides: list[str] | None = None, force: bool = False,
                    progress: bool = True, command: str = "diffunlearn demo --all-methods",
                    attacks: tuple[str, ...] = ()) -> str:
    """Run (or reuse) one demo per (concept, seed); write ``leaderboard.json`` and ``leaderboard.md``.

    Returns:
        the Markdown table.
    """
    results: dict[str, dict[str, list[dict]]] = {}
    for concept in concepts:
        for seed in seeds:
            folder = out / f"{concept}-seed{seed}"
            summary_path = folder / "summary.json"
            run_overrides = [*(overrides or []), f"seed={seed}", f"data_seed={seed}"]
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() and not force else None
            if summary is not None and not _current(summary, concept, methods, run_overrides):
                # Made with other settings (e.g. a method's tuned defaults changed): redo the demo, which
                # still reuses every method folder whose config is unchanged.
                for marker in ("summary.json", "report.md"):
                    (folder / marker).unlink(missing_ok=True)
                summary = None
            if summary is None:
                summary = run_demo(concept, folder, methods, run_overrides, force, progress,
                                   f"{command} (concept {concept}, seed {seed})")
            if attacks:
                cfg = build_config(None, run_overrides, base={"concept": concept, "method": methods[0]})
                red_team_demo(summary, folder, cfg, attacks, progress, f"{command} ({concept}, seed {seed})")
            for name, values in summary["methods"].items():
                results.setdefault(concept, {}).setdefault(name, []).append(values)
        cfg = build_config(None, overrides, base={"concept": concept, "method": methods[0]})
        gold = retrained_row(concept, out, attacks, cfg, progress, command)
        if gold is not None:
            results[concept]["retrained (gold)"] = [gold]
    table = leaderboard_table(results, attacks)
    atomic_write_text(out / "leaderboard.json", json.dumps({"command": command, "seeds": list(seeds),
                                                             "attacks": list(attacks),
                                                             "results": results, "environment": environment()},
                                                            indent=1) + "\n")
    text = "\n".join([
        "# Embedded leaderboard", "", f"Command: `{command}`", "",
        f"Held-out prompts of the digit world; mean ± std over seeds {', '.join(map(str, seeds))} (each seed "
        "draws its own training prompts, images and noise). Forget score: fraction of forget-prompt samples "
        "showing the concept. Alignment: fraction of remain-prompt samples with every requested attribute. "
        "Quality FD: Fréchet distance of oracle features to real renders. Seconds: unlearning time."
        + (" ASR: attack success rate, the fraction of attacked samples showing the concept "
           "(`diffunlearn attack`, reports in each demo folder's attacks/)." if attacks else "")
        + " The retrained (gold) row, where present, is the model retrained from scratch without the concept "
          "(exact unlearning; one model, so no spread over seeds).", "",
        table, ""])
    atomic_write_text(out / "leaderboard.md", text)
    return table
