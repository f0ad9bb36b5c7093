#!/usr/bin/env bash
# The GPU numbers of the README, in one run on a GPU machine (with the repo as working dir):
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [CELLS]
# Builds a synthetic 28,000-gene store, then runs the mining, training-step and loader
# benchmarks on that machine's GPU and cores. Logs go to OUT_DIR (default: gpu-results).
set -euo pipefail
out=${1:-gpu-results}
cells=${2:-50000}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
workers=$(( $(nproc) / 2 ))
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 bin/make_synthetic.py /tmp/gpu-store --cells "$cells" --genes 28000 --overwrite \
    2>&1 | tail -n 1 | tee "$out/store.txt"
python3 benchmarks/triplet_mining.py --devices cpu cuda --sizes 1000 2000 --labels 20 100 \
    --reference-repeats 1 --threads 2 \
    2>&1 | tee "$out/mining.txt"
python3 benchmarks/train_step.py --store /tmp/gpu-store --steps 40 --workers "$workers" \
    --device cuda 2>&1 | tee "$out/train_step_dense.txt"
python3 benchmarks/train_step.py --store /tmp/gpu-store --steps 40 --workers "$workers" \
    --device cuda --sparse-batches 2>&1 | tee "$out/train_step_csr.txt"
python3 benchmarks/loader_throughput.py --store /tmp/gpu-store --workers "$workers" \
    --batches 32 2>&1 | tee "$out/loader.txt"
