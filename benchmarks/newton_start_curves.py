"""Test NLL curves of eager 2-D training two ways: the solves started at b or by Newton steps from b
(``--compare start``), or with the plain operators or the fused CPU kernels (``--compare kernels``).

``SolverOptions(start="newton")`` (two Newton steps; the toy models' default since issue #22) changes where each
fixed-point solve starts, not its stopping test, and the fused kernels (``monoflow.kernels``) change
rounding only, so training must follow the same curve within noise. For each data set, trains the
paper's Monotone Flow (eager, learnable concatenation on, the paper's learning rate and batch) from
the same seed twice, one way each, taking turns in chunks so both see the same machine load, and
records:

* the test NLL (nats, exact log-det, on ``--test-points`` fresh points, the same for both) every
  ``--every`` iterations;
* the seconds each variant spent training and its forward-solve evaluations per block.

Usage::

    python benchmarks/newton_start_curves.py        # writes benchmarks/results/newton_start_curves.json
    python benchmarks/newton_start_curves.py --compare kernels   # writes .../fused_kernel_curves.json
    python benchmarks/newton_start_curves.py --datasets moons --iterations 500 --every 100
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from monoflow import kernels  # noqa: E402
from monoflow.data.toy import sample_toy  # noqa: E402
from monoflow.experiments.config import toy_config  # noqa: E402
from monoflow.experiments.toy2d import ToyExperiment  # noqa: E402
from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step  # noqa: E402
from monoflow.lipschitz import set_learnable_concat  # noqa: E402
from monoflow.provenance import benchmark_report, save_benchmark_report  # noqa: E402
from monoflow.solvers import SolverOptions  # noqa: E402

#: what each comparison trains: {way: (solver start, fused kernels on, label)}
COMPARISONS = {
    "start": {"rhs": ("rhs", True, "start at b (before)"), "newton": ("newton", True, "Newton start (now)")},
    "kernels": {"plain": ("newton", False, "plain operators"), "fused": ("newton", True, "fused kernels")},
}
OUTPUTS = {"start": "newton_start_curves.json", "kernels": "fused_kernel_curves.json"}


class _Variant:
    """One training run of the paper's Monotone Flow with the given solver start, the fused kernels on
    or off."""

    def __init__(self, dataset: str, start: str, seed: int, fused: bool = True) -> None:
        self.fused = fused
        self.config = toy_config("paper", model="monotone", dataset=dataset, seed=seed)
        self.experiment = ToyExperiment(self.config)
        torch.manual_seed(seed)
        self.model = self.experiment.build_model()
        for block in self.model.blocks:
            block.solver = SolverOptions(start=start)
        set_learnable_concat(self.model, True)
        self.model.train()
        self.optimizer = make_optimizer(self.model, self.config)
        self.generator = torch.Generator().manual_seed(seed)
        self.timers = {phase: 0.0 for phase in TIMED_PHASES}
        self.step, self.seconds, self.evaluations, self.solves = 0, 0.0, 0, 0

    def train(self, iterations: int) -> None:
        tick = time.perf_counter()
        with kernels.enabled(self.fused):
            self._train(iterations)
        self.seconds += time.perf_counter() - tick

    def _train(self, iterations: int) -> None:
        for _ in range(iterations):
            training_step(self.experiment, self.model, self.optimizer, self.generator, torch.device("cpu"),
                          self.step, self.timers)
            self.step += 1
            for block in self.model.blocks:
                self.evaluations += block.last_solves["forward"].evaluations
                self.solves += 1

    def test_nll(self, points: torch.Tensor) -> float:
        self.model.eval()
        with torch.no_grad(), kernels.enabled(self.fused):
            nll = -self.model.log_prob(points).mean().item()
        self.model.train()
        return nll


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "checkerboard"])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--test-points", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="start")
    parser.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/" + " or ".join(OUTPUTS.values()))
    args = parser.parse_args(argv)
    ways = COMPARISONS[args.compare]
    output = args.output or Path(__file__).parent / "results" / OUTPUTS[args.compare]
    if args.iterations < 1 or args.every < 1 or args.iterations % args.every:
        parser.error("--iterations must be a positive multiple of --every")

    torch.set_num_threads(args.threads)
    report = benchmark_report("cpu", iterations=args.iterations, every=args.every, test_points=args.test_points,
                              compare=args.compare, ways={way: label for way, (_, _, label) in ways.items()},
                              kernels=kernels.status())
    bar = tqdm(total=len(args.datasets) * len(ways) * args.iterations, desc=f"{args.compare} curves")
    for dataset in args.datasets:
        points = sample_toy(dataset, args.test_points, torch.Generator().manual_seed(10_000 + args.seed))
        variants = {way: _Variant(dataset, start, args.seed, fused) for way, (start, fused, _) in ways.items()}
        curves: Dict[str, List[Dict[str, float]]] = {way: [] for way in ways}
        for _ in range(args.iterations // args.every):
            for way, variant in variants.items():  # in turns: the same load for both
                variant.train(args.every)
                curves[way].append({"iteration": variant.step, "test_nll": variant.test_nll(points)})
                bar.update(args.every)
        row = {"dataset": dataset, "model": "monotone", "seed": args.seed, "curves": curves}
        for way, variant in variants.items():
            row[way] = {"train_seconds": variant.seconds, "s_per_iteration": variant.seconds / variant.step,
                        "forward_evaluations_per_solve": variant.evaluations / max(variant.solves, 1),
                        "final_test_nll": curves[way][-1]["test_nll"]}
        before, after = ways  # the first way is the one compared against
        row["speedup"] = row[before]["train_seconds"] / row[after]["train_seconds"]
        row["largest_nll_difference"] = max(abs(a["test_nll"] - b["test_nll"])
                                            for a, b in zip(curves[before], curves[after]))
        report["runs"].append(row)
        bar.write(f"{dataset}: x{row['speedup']:.2f}; evaluations per solve {row[before]['forward_evaluations_per_solve']:.2f} "
                  f"-> {row[after]['forward_evaluations_per_solve']:.2f}; final test NLL "
                  f"{row[before]['final_test_nll']:.4f} / {row[after]['final_test_nll']:.4f}")
        save_benchmark_report(report, output)
    bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
