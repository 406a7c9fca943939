#!/usr/bin/env bash
# GPU check of the image flows (fits in 10 minutes on one GPU):
#   training throughput (images/s) and peak memory of the CIFAR-10 paper preset (24.9M parameters),
#   Monotone Flow against i-DenseNet, up to 300 training steps each
#   (capped at 150 s of training each) and an evaluation (unbiased bpd, 20 exact terms) on 500
#   images; writes JSON.
#
# usage: benchmarks/gpu_check.sh [--cpu-smoke] [--data-root DIR] [--out FILE]
#   --cpu-smoke   shrink everything (1-1-1 blocks, growth 16, batch 8, 3 steps, 16 eval images, CPU)
#                 to check the script end to end on a laptop in a minute or two
#   --data-root   folder with cifar-10-batches-py (default: seeded random images; same cost, bpd meaningless)
#   --out         JSON path (default results/images/benchmarks/gpu_check.json, or gpu_check_cpu_smoke.json)
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
data_args=()
out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) smoke=1; shift ;;
    --data-root) data_args=(--data-root "$2"); shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [[ $smoke -eq 1 ]]; then
  out="${out:-results/images/benchmarks/gpu_check_cpu_smoke.json}"
  args=(--device cpu --steps 3 --batch-size 8 --eval-images 16 --eval-draws 2 --threads 2
        --override "blocks=(1,1,1)" --override "growth=16" --override "fc_blocks=1")
else
  out="${out:-results/images/benchmarks/gpu_check.json}"
  # two models x (<= 150 s training + model setup + evaluation of 500 images x 2 draws) < 10 min
  args=(--device cuda --steps 300 --time-budget 150 --eval-images 500 --eval-draws 2)
  python - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device; use --cpu-smoke for the CPU check")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
fi

python -m monoflow.images.benchmark --preset cifar10 --models monotone idensenet "${args[@]}" ${data_args[@]+"${data_args[@]}"} --out "$out"
