"""Where an image training step's arithmetic goes, on this machine (CPU or GPU).

For each case, :func:`monoflow.images.benchmark.step_cost` counts the FLOPs of matrix products
and convolutions of one training step, split into the forward solves, the log-det estimator and
the backward pass, in evaluations of g per block, and times a second step against a measured
float32 matrix-multiply throughput of the same process. The cases: the MNIST paper preset (the
issue's "about 49 s per 8-image micro-batch on 2 CPU cores") and the three models of the
CPU-scale ``mnist5k-cpu`` preset. The fraction of the matmul throughput tells whether a step is
bound by arithmetic (near 1) or by everything else (elementwise work, memory traffic, dispatch).

Usage::

    python benchmarks/image_step_cost.py                  # results/images/benchmarks/image_step_cost_cpu.json
    python benchmarks/image_step_cost.py --threads 2 --out other.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from monoflow.images.benchmark import step_cost
from monoflow.provenance import provenance

CASES = [
    ("mnist", "monotone", 8),
    ("mnist", "idensenet", 8),
    ("mnist5k-cpu", "monotone", 64),
    ("mnist5k-cpu", "idensenet", 64),
    ("mnist5k-cpu", "resflow", 64),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/images/benchmarks/image_step_cost_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "provenance": provenance(args.device), "cases": []}
    for preset, model, batch in CASES:
        start = time.time()
        result = step_cost(preset, model, device=args.device, batch_size=batch)
        result["wall_s"] = time.time() - start
        report["cases"].append(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))  # after every case
        phases = result["g_evaluations_per_block"]
        print(f"{preset:12s} {model:10s} batch {batch:3d}: step {result['seconds']['step']:.2f} s, "
              f"g evaluations per block: solve {phases['forward_solve']:.1f}, log-det {phases['logdet_estimator']:.1f}, "
              f"backward {phases['backward']:.1f}; {result['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s = "
              f"{100 * result['fraction_of_matmul_throughput']:.1f}% of matmul", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
