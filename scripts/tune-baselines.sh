#!/usr/bin/env bash
# Tune the baselines of the embedded leaderboard with `diffunlearn sweep`, scored on TRAINING-vocabulary
# prompts of the digit world (world:three:train:...), never on the held-out prompts the leaderboard reports.
# Rule: highest alignment among points with forget score <= 0.05; if no point gets there, the lowest
# forget score. The chosen values are the methods' `defaults` (src/diffunlearn/methods/*.py).
#
#   scripts/tune-baselines.sh [OUT]        (default runs/tune; resumable: finished points are skipped)
#
# rgd is not tuned separately: as the paper's ablation it shares rg's settings.
set -euo pipefail
OUT=${1:-runs/tune}
DIFFUNLEARN=${DIFFUNLEARN:-diffunlearn}
score=(--metrics oracle --prompts world:three:train:forget:80 world:three:train:remain:80)
"$DIFFUNLEARN" sweep concept=three method=esd-u lr=5e-5,2e-4,8e-4 esd_eta=1,3 --out "$OUT/esd-u" "${score[@]}"
"$DIFFUNLEARN" sweep concept=three method=esd-x lr=2e-4,8e-4,3e-3 esd_eta=1,3 --out "$OUT/esd-x" "${score[@]}"
"$DIFFUNLEARN" sweep concept=three method=salun lr=5e-5,2e-4,8e-4 remain_weight=1,4 --out "$OUT/salun" "${score[@]}"
"$DIFFUNLEARN" sweep concept=three method=ft lr=5e-5,2e-4,8e-4 --out "$OUT/ft" "${score[@]}"
