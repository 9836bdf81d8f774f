#!/usr/bin/env bash
# The GPU figures in benchmarks/results/*-cuda.*: on one NVIDIA GPU (MLX's CUDA backend,
# `pip install -e '.[cuda]'`), in this order:
#   1. relief bench --preset gpt-oss-20b --compare mlx-lm   (real-size weights synthesized in memory),
#      with the experts in MXFP4 as published, then dequantized to bf16 (--experts bfloat16), each
#      3 times in its own process, pooled by benchmarks/bench.py (medians and min-max of all trials)
#   2. a short LoRA run through `relief train` with the seed replica's recipe on a synthesized
#      gpt-oss-20b-2l checkpoint (real widths, 2 of 24 layers), written and converted on disk
#   3. `relief generate` with and without the adapter that run wrote
# Usage: bash benchmarks/cuda.sh OUT_DIR [TRIALS]
# BENCH_PRESET and TRAIN_PRESET swap the presets (e.g. both `mini` for a dry run on a CPU).
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda.sh OUT_DIR [TRIALS]}
trials=${2:-3}
bench_preset=${BENCH_PRESET:-gpt-oss-20b}
train_preset=${TRAIN_PRESET:-gpt-oss-20b-2l}
mkdir -p "$out"
work=$(mktemp -d)
relief() { python3 -m relief_mlx "$@"; }
export PYTHONUNBUFFERED=1

python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), dict(mx.device_info()))'
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null

python3 benchmarks/bench.py --preset "$bench_preset" --out-dir "$out" -- --trials "$trials" --bandwidth-mib 4096
echo "bench exit $?"
python3 benchmarks/bench.py --preset "$bench_preset" --tag dense --out-dir "$out" -- --experts bfloat16 \
    --trials "$trials" --prompt-lengths 512,2048 --gen-lengths 128 --bandwidth-mib 4096
echo "bench (dense experts) exit $?"

relief synth --preset "$train_preset" --out "$work/hf" && relief convert "$work/hf" --out "$work/mlx"
echo "synth+convert exit $?"
relief train recipes/seed-replica.toml --set model.path="$work/mlx" --set train.iterations=12 \
    --set validation.max_batches=4 --set output.dir="$work/run" 2>&1 | tee "$out/train-$train_preset-cuda.log"
echo "train exit $?"
cp "$work/run/summary.json" "$out/train-$train_preset-cuda-summary.json"

prompt="A shelter for 300 evacuees has no running water. How much drinking water do we need per day?"
for adapter in "" "$work/run"; do
    relief generate --model "$work/mlx" ${adapter:+--adapter "$adapter"} --prompt "$prompt" \
        --max-tokens 48 --raw 2>&1 | tail -5
done
