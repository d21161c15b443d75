"""``diffunlearn demo --all-methods``: the embedded leaderboard.

Every method in the registry (except the benchmark-only ``rg-flat``) on both embedded concepts, the
object ("three") and the modifier ("red"), over several seeds. Each (concept, seed) is one ordinary
demo folder in which all methods share the same data; the seed sets both the data (prompts and
generated images) and the training noise. The table reports mean ± std over seeds of forget score,
alignment and quality FD on the HELD-OUT prompts, plus the seconds each method took. Finished demo
folders are reused, so an interrupted leaderboard resumes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .demo import run_demo
from .methods import METHODS
from .utils import atomic_write_text, environment

LEADERBOARD_METHODS = tuple(name for name in METHODS if name != "rg-flat")
CONCEPTS = ("three", "red")
FIELDS = (("forget_score", "forget score ↓", 3), ("alignment", "alignment ↑", 3), ("quality_fd", "quality FD ↓", 0),
          ("seconds", "seconds", 0))


def _mean_std(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def leaderboard_table(results: dict[str, dict[str, list[dict]]]) -> str:
    """Markdown: one row per (concept, method), mean ± std over seeds."""
    lines = ["| concept | method | " + " | ".join(title for _, title, _ in FIELDS) + " | seeds |",
             "|---|---|" + "---|" * (len(FIELDS) + 1)]
    for concept, methods in results.items():
        for name, runs in methods.items():
            cells = [_mean_std([r[key] for r in runs], digits) for key, _, digits in FIELDS]
            lines.append(f"| {concept} | {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def _current(summary: dict, concept: str, methods: tuple[str, ...], overrides: list[str]) -> bool:
    """Whether a finished demo holds every method with exactly the configs this leaderboard asks for."""
    from .config import build_config
    from .demo import same_config

    settings = summary.get("settings", {})
    return all(m in settings and same_config(settings[m], build_config(None, overrides, base={"concept": concept,
                                                                                               "method": m}))
               for m in methods)


def run_leaderboard(out: Path, methods: tuple[str, ...] = LEADERBOARD_METHODS, concepts: tuple[str, ...] = CONCEPTS,
                    seeds: tuple[int, ...] = (0, 1, 2), overrides: list[str] | None = None, force: bool = False,
                    progress: bool = True, command: str = "diffunlearn demo --all-methods") -> str:
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
            for name, values in summary["methods"].items():
                results.setdefault(concept, {}).setdefault(name, []).append(values)
    table = leaderboard_table(results)
    atomic_write_text(out / "leaderboard.json", json.dumps({"command": command, "seeds": list(seeds),
                                                             "results": results, "environment": environment()},
                                                            indent=1) + "\n")
    text = "\n".join([
        "# Embedded leaderboard", "", f"Command: `{command}`", "",
        f"Held-out prompts of the digit world; mean ± std over seeds {', '.join(map(str, seeds))} (each seed "
        "draws its own training prompts, images and noise). Forget score: fraction of forget-prompt samples "
        "showing the concept. Alignment: fraction of remain-prompt samples with every requested attribute. "
        "Quality FD: Fréchet distance of oracle features to real renders. Seconds: unlearning time.", "",
        table, ""])
    atomic_write_text(out / "leaderboard.md", text)
    return table
