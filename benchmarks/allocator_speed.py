"""Training steps with freed CPU memory kept in the process (``monoflow.allocator``) against glibc's defaults.

For each case (the 1-D model (d) at the paper's batch of 5,000, the eager 2-D Monotone Flow at batch
500), fresh worker processes take turns, one with ``MONOFLOW_RETAIN_FREED_MEMORY=0`` (glibc's
defaults) and one without (the thresholds raised, as the training commands run): each calls
``retain_freed_memory()`` as the training loop does, trains ``--warmup`` steps, then times
``--steps`` steps (``training_step``: batch, loss, backward, Adam, power iterations) and counts the
page faults (``ru_minflt``) they took. Both train the same run from the same seed.

Usage::

    python benchmarks/allocator_speed.py          # writes benchmarks/results/allocator_speed.json
    python benchmarks/allocator_speed.py --rounds 6 --cpus 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
CASES = ("regression:monotone_actnorm", "toy:monotone")


def _worker(case: str, warmup: int, steps: int) -> None:
    import resource
    import time

    import torch

    from monoflow.allocator import retain_freed_memory
    from monoflow.experiments.config import regression_config, toy_config
    from monoflow.experiments.regression1d import RegressionExperiment
    from monoflow.experiments.toy2d import ToyExperiment
    from monoflow.experiments.train import training_step

    sys.path.insert(0, str(Path(__file__).parent))
    from compiled_loss_speed import _start_training

    state = retain_freed_memory()
    torch.set_num_threads(1)
    kind, model_name = case.split(":")
    if kind == "toy":
        config: Any = toy_config("paper", model=model_name, dataset="8gaussians", seed=0)
        experiment: Any = ToyExperiment(config)
    else:
        config = regression_config("paper", model=model_name, seed=0)
        experiment = RegressionExperiment(config)
    model, optimizer, generator, timers = _start_training(experiment, learnable_concat=False)  # as a run starts
    for step in range(warmup):
        training_step(experiment, model, optimizer, generator, torch.device("cpu"), step, timers)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        loss = training_step(experiment, model, optimizer, generator, torch.device("cpu"), step, timers)
    seconds = (time.perf_counter() - start) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    print(json.dumps({"allocator": state, "s_per_step": seconds, "page_faults_per_step": faults, "loss": float(loss)}))


def _run(case: str, retain: bool, warmup: int, steps: int, cpus: List[int]) -> Dict[str, Any]:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if not retain:
        environment["MONOFLOW_RETAIN_FREED_MEMORY"] = "0"
    else:
        environment.pop("MONOFLOW_RETAIN_FREED_MEMORY", None)
    pinning = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    output = subprocess.run([*pinning, sys.executable, __file__, "--worker", case, "--warmup", str(warmup), "--steps", str(steps)],
                            env=environment, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--rounds", type=int, default=4, help="processes per side and case, taking turns")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--cpus", type=int, nargs="*", default=[], help="pin the workers to these cores")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "allocator_speed.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.warmup, args.steps)
        return 0
    sys.path.insert(0, str(ROOT))
    from monoflow.provenance import benchmark_report, save_benchmark_report

    report = benchmark_report("cpu", pinned_cpus=args.cpus, warmup_steps=args.warmup, timed_steps=args.steps)
    for case in args.cases:
        sides: Dict[str, List[Dict[str, Any]]] = {"glibc defaults": [], "freed memory retained": []}
        for round_index in range(args.rounds):
            order = [False, True] if round_index % 2 == 0 else [True, False]
            for retain in order:
                sides["freed memory retained" if retain else "glibc defaults"].append(
                    _run(case, retain, args.warmup, args.steps, args.cpus))
        medians = {name: statistics.median(r["s_per_step"] for r in runs) for name, runs in sides.items()}
        row = {"case": case,
               "s_per_step": medians,
               "page_faults_per_step": {name: statistics.median(r["page_faults_per_step"] for r in runs)
                                        for name, runs in sides.items()},
               "speedup": medians["glibc defaults"] / medians["freed memory retained"],
               "allocator_states": {name: sorted({r["allocator"] for r in runs}) for name, runs in sides.items()},
               "rounds_s_per_step": {name: [r["s_per_step"] for r in runs] for name, runs in sides.items()},
               "largest_loss_difference": max(abs(a["loss"] - b["loss"]) for a, b in
                                               zip(sides["glibc defaults"], sides["freed memory retained"]))}
        report["runs"].append(row)
        print(f"{case:28s} defaults {1000 * medians['glibc defaults']:7.1f} ms  retained "
              f"{1000 * medians['freed memory retained']:7.1f} ms  x{row['speedup']:.2f}  page faults/step "
              f"{row['page_faults_per_step']['glibc defaults']:.0f} -> {row['page_faults_per_step']['freed memory retained']:.0f}",
              flush=True)
        save_benchmark_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
