"""Tune each method's hyperparameters on TRAINING-vocabulary prompts (never the held-out ones).

    python scripts/tune_world.py --concept three --out runs/tune-three

For every method and grid point it unlearns from the same generated data and scores forget score
and alignment on prompts drawn from the TRAIN filler vocabulary (``eval_sets(split="train")``).
Prints a table and writes ``tuning.json``; the chosen values go into the method defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from diffunlearn.config import build_config
from diffunlearn.evaluate.world import evaluate_world
from diffunlearn.methods import get_method
from diffunlearn.models import load_adapter
from diffunlearn.runner import build_training_data, trainable_copy
from diffunlearn.training import unlearn
from diffunlearn.worlds.oracle import load_oracle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concept", default="three")
    parser.add_argument("--methods", default="ga,graddiff,rg")
    parser.add_argument("--lr", default="1e-4,3e-4")
    parser.add_argument("--steps", default="120")
    parser.add_argument("--remain-weight", default="1.0")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", default="runs/tune")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oracle = load_oracle()
    base_cfg = build_config(None, [f"concept={args.concept}"])
    adapter, folder = load_adapter(base_cfg.model)
    data = build_training_data(adapter, folder, base_cfg, out / "data", progress=False)
    rows = []
    base_eval = evaluate_world(adapter, oracle, args.concept, args.n, split="train", seed=7, progress=False)
    rows.append({"method": "base", "forget_score": base_eval.forget_score, "alignment": base_eval.alignment,
                 "quality_fd": base_eval.quality_fd})
    print(json.dumps(rows[-1]), flush=True)
    grid = itertools.product(args.methods.split(","), args.lr.split(","), args.steps.split(","),
                             args.remain_weight.split(","))
    for method, lr, steps, lam in grid:
        if method == "ga" and lam != args.remain_weight.split(",")[0]:
            continue
        cfg = build_config(None, [f"concept={args.concept}", f"method={method}", f"lr={lr}", f"steps={steps}",
                                  f"remain_weight={lam}"])
        model = trainable_copy(adapter)
        started = time.perf_counter()
        unlearn(model, get_method(method), cfg, *data[:4], progress=False)
        seconds = time.perf_counter() - started
        ev = evaluate_world(model, oracle, args.concept, args.n, split="train", seed=7, progress=False)
        rows.append({"method": method, "lr": float(lr), "steps": int(steps), "remain_weight": float(lam),
                     "forget_score": ev.forget_score, "alignment": ev.alignment, "quality_fd": ev.quality_fd,
                     "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    (out / "tuning.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
