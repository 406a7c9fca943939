"""Throughput of training toy runs together (``monoflow.ensemble``) against one run at a time.

For each toy model and ensemble size E, times training iterations of E paper-scale runs trained
as one batched model (the eight data sets in turn, seed 0, 1, ...) and reports the time per
*member* iteration and its ratio to a single run measured in the same process (E = 1), so the
speed-up does not depend on the machine's absolute speed. Uses ``measure`` of
``benchmarks/toy_speed.py`` (the same training step as the experiments).

Usage::

    python benchmarks/ensemble_speed.py                       # writes benchmarks/results/ensemble_speed.json
    python benchmarks/ensemble_speed.py --sizes 1 8 24 --threads 1 2 --models monotone
    python benchmarks/ensemble_speed.py --device cuda --sizes 1 8 24 --output benchmarks/results/ensemble_speed_cuda.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from toy_speed import measure  # noqa: E402

from monoflow.data.toy import TOY_DATASETS  # noqa: E402
from monoflow.experiments.config import TOY_MODELS, ToyEnsembleConfig, toy_config  # noqa: E402
from monoflow.experiments.toy2d import ToyExperiment  # noqa: E402
from monoflow.experiments.toy2d_ensemble import ToyEnsembleExperiment  # noqa: E402
from monoflow.provenance import benchmark_report, save_benchmark_report  # noqa: E402


def members(model: str, size: int) -> List[Any]:
    """``size`` paper-scale runs: the data sets in turn, then the next seed."""
    return [toy_config("paper", model=model, dataset=TOY_DATASETS[i % len(TOY_DATASETS)], seed=i // len(TOY_DATASETS))
            for i in range(size)]


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="ensemble sizes (1 = one run alone)")
    parser.add_argument("--models", nargs="+", choices=TOY_MODELS, default=list(TOY_MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "ensemble_speed.json")
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.sizes):
        parser.error("--sizes must be positive")

    report = benchmark_report(args.device)
    sizes = sorted(set(args.sizes) | {1})
    bar = tqdm(total=len(sizes) * len(args.models) * len(args.threads), desc="ensemble benchmark")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model in args.models:
            single = None
            for size in sizes:
                configs = members(model, size)
                experiment = (ToyExperiment(configs[0]) if size == 1
                              else ToyEnsembleExperiment(ToyEnsembleConfig(tuple(configs)), output_dir="/nonexistent"))
                result = measure(experiment, args.iterations, args.warmup, profile=False, device=args.device)
                per_member = result["per_iteration_s"] / size
                single = per_member if size == 1 else single
                row = {"model": model, "threads": threads, "ensemble_size": size,
                       "per_iteration_s": result["per_iteration_s"], "per_member_iteration_s": per_member,
                       "speedup_vs_alone": single / per_member,
                       "cpu_per_member_iteration_s": result["cpu_per_iteration_s"] / size,
                       "projected_hours_for_size_runs": result["per_iteration_s"] * 50000 / 3600,
                       "breakdown_s": result["breakdown_s"]}
                report["runs"].append(row)
                bar.write(f"{model:10s} threads={threads} E={size:3d} {1000 * result['per_iteration_s']:8.1f} ms/it "
                          f"= {1000 * per_member:6.1f} ms per run-iteration, x{row['speedup_vs_alone']:.2f} vs alone; "
                          f"{size} paper runs in {row['projected_hours_for_size_runs']:.1f} h")
                bar.update(1)
                save_benchmark_report(report, args.output)
    bar.close()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
