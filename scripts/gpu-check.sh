#!/usr/bin/env bash
# scripts/gpu-check.sh [OUT_DIR]
# The one prepared GPU check (issue 3 §4). On a CUDA machine it builds a Stable Diffusion v1.x-sized
# UNet, VAE and text encoder from config with random weights (no download) and benchmarks ga,
# graddiff, rg and rg-flat at batch 8 in bf16; it takes a few minutes on one H100. Without a GPU it
# runs the same bench small (tiny preset, batch 2, fp32, rg alone) so CI keeps the script working. Then a short
# class-track run (embedded class-conditional model, device=auto) whose recorded device must be the
# GPU when there is one: a class-conditional model once trained on the CPU even with device: cuda.
# Then (issue 15 §4) the LoRA RG bench against GradDiff at the real sizes of SDXL (2.6 B UNet) and
# FLUX.1-dev (11.9 B transformer, T5-XXL): bf16 autocast over fp32 LoRA weights on a bf16 frozen base, gradient
# checkpointing, text encoders offloaded to the CPU, 8-bit Adam when bitsandbytes imports; the random
# weights are initialised on the GPU and saved in bf16 (FLUX: 33 GB of the 64 GB disk). Without a GPU
# the same steps run on the tiny presets.
# Measured in parts on one H200 (2026-12-04, README "Benchmark"): SD bench and class run 2 min 35 s,
# SDXL 95 s, one FLUX method 2 min 16 s; each section prints the seconds elapsed when it is done.
# Writes OUT_DIR/bench.json, OUT_DIR/bench.md, OUT_DIR/bench-sdxl.{json,md}, OUT_DIR/bench-flux.{json,md}
# and OUT_DIR/class-run (OUT_DIR defaults to $OUT, else ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=${PYTHON:-python3}; fi
if ! "$py" -c "import diffunlearn" 2>/dev/null; then
    # A GPU machine's own python with torch, transformers, peft and diffusers, but not this package:
    # run it from the source tree (nothing of it needs building).
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import diffunlearn, diffusers, transformers, peft" 2>/dev/null; then
    echo "diffunlearn or one of diffusers, transformers, peft is not importable with $py: run" \
         "'make .venv/.installed' or 'pip install -e .' first (offline: pip install the wheels)" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1
if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    want=cuda
    args=(--preset sd15 --batch-size 8 --mixed-precision bf16 --steps 5 --warmup 2 --methods ga,graddiff,rg,rg-flat)
    big=(--mixed-precision bf16 --lora-base-dtype bf16 --steps 3 --warmup 1)
    sdxl=sdxl; flux=flux-dev; sdxl_batch=4; flux_batch=2
    pair=graddiff,rg
    "$py" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
else
    echo "no CUDA GPU: running the small CPU version of the check"
    want=cpu
    # rg alone, one step: each method is a worker process of its own, and the CPU form checks that
    # the steps run (every method runs in the test suite); the GPU form measures all four.
    args=(--preset tiny --batch-size 2 --steps 1 --warmup 0 --methods rg)
    big=(--steps 1 --warmup 0)
    sdxl=sdxl-tiny; flux=flux-tiny; sdxl_batch=2; flux_batch=2
    pair=rg  # RG alone here: the CPU form checks that the steps run, the GPU form measures the ratio
fi
optimizer=adam
if "$py" -c "import bitsandbytes" 2>/dev/null; then optimizer=adam8bit; fi
lora=(--methods "$pair" --selection lora --lora-rank 16 --gradient-checkpointing --offload-encoders
      --optimizer "$optimizer")
start=$(date +%s)
"$py" -m diffunlearn.cli bench "${args[@]}" --json "$out/bench.json" --quiet | tee "$out/bench.md"
echo "[$(( $(date +%s) - start )) s] SD bench done"
"$py" -m diffunlearn.cli unlearn model=embedded:digits-class concept=three steps=2 remain_per_class=4 \
    eval_prompts=4 eval_steps=2 device=auto --out "$out/class-run" --force --quiet > /dev/null
"$py" - "$out/class-run/environment.json" "$want" <<'PY'
import json, sys
device = json.load(open(sys.argv[1]))["device"]
print(f"class track ran on: {device}")
sys.exit(0 if device.startswith(sys.argv[2]) else f"class track ran on {device}, expected {sys.argv[2]}")
PY
echo "[$(( $(date +%s) - start )) s] class track done"
echo "SDXL ($sdxl) LoRA bench, optimizer $optimizer:"
"$py" -m diffunlearn.cli bench --preset "$sdxl" --batch-size "$sdxl_batch" "${big[@]}" "${lora[@]}" \
    --json "$out/bench-sdxl.json" --quiet | tee "$out/bench-sdxl.md"
echo "[$(( $(date +%s) - start )) s] SDXL bench done"
echo "FLUX ($flux) LoRA bench, both sides of the double-stream attention, optimizer $optimizer:"
"$py" -m diffunlearn.cli bench --preset "$flux" --batch-size "$flux_batch" "${big[@]}" "${lora[@]}" \
    --lora-targets to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out \
    --json "$out/bench-flux.json" --quiet | tee "$out/bench-flux.md"
echo "gpu-check finished in $(( $(date +%s) - start )) s"
