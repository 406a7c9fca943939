"""1-D flows: the scalar resolvent solve (``SolverOptions(method="scalar")``) against Anderson.

For the paper's 1-D models that solve (``implicit_actnorm``, ``monotone_actnorm``: depth 4, growth
128, batch 5,000), in one process and on the same model:

1. train ``--warm-iterations`` iterations at the paper's settings, so that g has left its
   initialisation (the fixed-point solves get harder as g learns the staircase's slopes);
2. solve the forward pass of one batch with both methods: evaluations of g, iterations per
   sample, time, and the largest difference between the two outputs;
3. time whole training iterations (``training_step``: batch, forward, backward, Adam, power
   iterations) with either method, alternating, and report the medians, their ratio and the
   projected paper-scale run against the 30-minute target.

Usage::

    python benchmarks/scalar_solve_speed.py      # writes benchmarks/results/scalar_solve_speed.json
    python benchmarks/scalar_solve_speed.py --threads 2 --warm-iterations 2000
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from tqdm.auto import tqdm

from monoflow.experiments.config import regression_config
from monoflow.experiments.regression1d import RegressionExperiment
from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step
from monoflow.provenance import benchmark_report, compare_timings, run_benchmark
from monoflow.solvers import SolverOptions

TARGET_MINUTES = 30.0
METHODS = {"anderson": SolverOptions(), "scalar": SolverOptions(method="scalar")}
SOLVING_MODELS = ("implicit_actnorm", "monotone_actnorm")


def use_solver(model: torch.nn.Module, options: SolverOptions) -> None:
    """Give every block that solves (``last_solves``) these forward-solve settings."""
    for block in model.modules():
        if hasattr(block, "last_solves") and hasattr(block, "solver"):
            block.solver = options


def forward_solves(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """Time one no-grad forward pass; the solver statistics of its solves."""
    with torch.no_grad():
        tick = time.perf_counter()
        y, _ = model(x, with_logdet=False)
        seconds = time.perf_counter() - tick
    solves = [block.last_solves["forward"] for block in model.modules()
              if hasattr(block, "last_solves") and "forward" in block.last_solves]
    return {"output": y, "seconds": seconds, "evaluations": sum(info.evaluations for info in solves),
            "iterations_mean": [float(info.iterations.double().mean()) for info in solves],
            "iterations_max": [int(info.iterations.max()) for info in solves],
            "converged": all(info.all_converged for info in solves)}


def measure(model_name: str, warm_iterations: int, repeats: int, calls: int) -> Dict[str, Any]:
    config = regression_config("paper", model=model_name)
    experiment = RegressionExperiment(config)
    torch.manual_seed(config.seed)
    model = experiment.build_model()
    model.train()
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    timers = {phase: 0.0 for phase in TIMED_PHASES}
    steps = iter(range(10 ** 9))
    use_solver(model, METHODS["scalar"])
    for _ in tqdm(range(warm_iterations), desc=f"{model_name}: warm-up training", leave=False):
        training_step(experiment, model, optimizer, generator, "cpu", next(steps), timers)

    x, _ = experiment.sample_batch(generator, torch.device("cpu"))
    solves = {}
    for name, options in METHODS.items():
        use_solver(model, options)
        forward_solves(model, x)  # warm caches
        solves[name] = forward_solves(model, x)
    difference = float((solves["scalar"].pop("output") - solves["anderson"].pop("output")).abs().max())

    times: Dict[str, List[float]] = {name: [] for name in METHODS}
    for _ in range(repeats):
        for name, options in METHODS.items():
            use_solver(model, options)
            tick = time.perf_counter()
            for _ in range(calls):
                training_step(experiment, model, optimizer, generator, "cpu", next(steps), timers)
            times[name].append((time.perf_counter() - tick) / calls)
    anderson_s, scalar_s = statistics.median(times["anderson"]), statistics.median(times["scalar"])
    return {
        "model": model_name,
        "setting": f"paper architecture and batch ({config.batch_size}), after {warm_iterations} training iterations",
        "forward_solves": solves,
        "largest_output_difference": difference,
        **compare_timings("anderson", anderson_s, "scalar", scalar_s, config.iterations, TARGET_MINUTES),
    }


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=SOLVING_MODELS, default=list(SOLVING_MODELS))
    parser.add_argument("--warm-iterations", type=int, default=500,
                        help="training iterations before measuring (default 500)")
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the two methods (default 5)")
    parser.add_argument("--calls", type=int, default=3, help="iterations per alternation (default 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "scalar_solve_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = benchmark_report("cpu", threads=args.threads, warm_iterations=args.warm_iterations)

    def describe(row: Dict[str, Any]) -> str:
        solves = row["forward_solves"]
        return (f"{row['model']}: forward solves {solves['anderson']['evaluations']} -> {solves['scalar']['evaluations']} "
                f"evaluations of g ({1000 * solves['anderson']['seconds']:.0f} -> {1000 * solves['scalar']['seconds']:.0f} ms); "
                f"training iteration {1000 * row['anderson_s_per_iteration']:.1f} -> {1000 * row['scalar_s_per_iteration']:.1f} ms "
                f"(x{row['speedup']:.2f}); paper-scale run {row['projected_run_minutes_scalar']:.0f} min against "
                f"{TARGET_MINUTES:.0f}")

    run_benchmark(report, args.models, lambda name: measure(name, args.warm_iterations, args.repeats, args.calls),
                  describe, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
