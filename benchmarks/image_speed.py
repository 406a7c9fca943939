"""CPU speed of image-flow training: monotone against residual blocks on the digits preset.

For each model (Monotone Flow = monotone blocks + CPila, residual blocks + CPila, i-DenseNet =
residual blocks + CLipSwish) a fresh process trains the digits preset (the real training step:
Poisson Russian roulette with 10 exact terms, Neumann gradient, memory-efficient mode) and reports
seconds per step, images/s, peak resident memory and the network evaluations per block per step
of the forward and adjoint fixed-point solves. The released code's adjoint solve asked float32
for a 1e-9 tolerance and ran its 100-iteration fallback on every backward (about 125 network
evaluations per block); ``adjoint_evaluations_per_block`` shows what ours does.

    python benchmarks/image_speed.py [--steps 15] [--threads 1] [--out results/images/benchmarks/image_speed_cpu.json]

CPU timings on a shared machine are noisy; the evaluation counts are not.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from monoflow.images.benchmark import compare_models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--models", nargs="+", default=["monotone", "residual-cpila", "idensenet"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/images/benchmarks/image_speed_cpu.json")
    args = parser.parse_args()
    start = time.time()
    results = compare_models(args.preset, args.models, steps=args.steps, batch_size=args.batch_size, device="cpu",
                             eval_images=64, eval_draws=2, threads=args.threads, warmup_steps=3)
    report = {"preset": args.preset, "steps": args.steps, "threads": args.threads, "results": results,
              "total_seconds": time.time() - start, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'model':16s} {'s/step':>8s} {'img/s':>8s} {'peak MB':>8s} {'fwd evals':>10s} {'adjoint evals':>14s}")
    for r in results:
        fwd = r["forward_evaluations_per_block"]
        adj = r["adjoint_evaluations_per_block"]
        print(f"{r['model']:16s} {r['seconds_per_step']:8.2f} {r['images_per_s']:8.1f} {r['peak_memory_mb']:8.0f} "
              f"{'explicit' if fwd is None else f'{fwd:.1f}':>10s} {'autograd' if adj is None else f'{adj:.1f}':>14s}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
