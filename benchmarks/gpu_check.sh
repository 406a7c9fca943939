#!/usr/bin/env bash
# What a Table 2 row costs on one GPU, in under 10 minutes (monoflow.images.gpu_check):
#   1. CIFAR-10 training throughput (images/s) and peak memory, Monotone Flow against i-DenseNet,
#      with a bounded evaluation (unbiased bpd, 20 exact terms, 200 images);
#   2. one training step of every paper preset (MNIST, CIFAR-10, ImageNet32, ImageNet64, CIFAR-10
#      with variational dequantisation) at the paper's per-GPU batch: time, peak memory, whether it
#      fits 80 GB, and what an epoch and the paper's whole budget take on this GPU;
#   3. the FLOPs of one CIFAR-10 step by phase (solve, log-det, backward) in evaluations of g per
#      block, against the GPU's measured matrix-multiply throughput.
# The JSON is rewritten after every measurement, so a timeout keeps what finished. Data: seeded
# random images of each preset's shape (cost does not depend on pixel values; bpd is meaningless).
#
# usage: benchmarks/gpu_check.sh [--cpu-smoke] [--out FILE] [--deadline SECONDS]
#   --cpu-smoke   shrink every model (1 block per scale, growth 8) and run on the CPU: checks the
#                 whole script end to end in a few minutes
#   --out         JSON path (default results/images/benchmarks/gpu_check.json, or gpu_check_cpu_smoke.json)
#   --deadline    seconds for the whole check (default 570)
#   --presets     measure only these paper presets (default: mnist cifar10 imagenet32 imagenet64 cifar10-vardeq)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" -m monoflow.images.gpu_check "$@"
