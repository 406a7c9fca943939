"""How many exact terms the Russian-roulette log-det needs in training, measured on a trained model.

The image presets follow the paper: Poisson(2) roulette with 10 exact terms in training (20 in
evaluation), about 12 vector-Jacobian products of g per block and step, over half of a Monotone
Flow step's evaluations of g. The estimator is unbiased with any number of exact terms; fewer
terms only add variance. Whether that variance matters is a comparison with the noise SGD has
anyway: the spread of the gradient between minibatches.

For a trained run (its EMA weights, from the checkpoint), on one fixed batch and for each number of
exact terms, this measures

* the estimator's gradient variance: ``trace Cov(grad)`` over draws of the probes and of N, on the
  same images and dequantisation noise;
* the seconds of one forward + backward step (median), the expected vector-Jacobian products
  per block (``n_exact + lam``), and the FLOPs of a step of the run's preset in evaluations of g
  per block (:func:`monoflow.images.benchmark.step_cost`: counted, so a busy machine does not
  change them);
* the spread of the unbiased bpd estimate (evaluation mode, same exact terms) over draws;

and, once, the minibatch gradient variance with the paper's 10 terms (``trace Cov(grad)`` over
batches drawn from the training set, one draw each), the noise of SGD itself. The ratio
``estimator variance / minibatch variance`` says how much of a step's gradient noise the cut adds.

Usage::

    python benchmarks/roulette_terms.py --run results/images/digits-cpu/monotone/seed2
    python benchmarks/roulette_terms.py --run RUN --exact-terms 2 4 10 --draws 8 --batches 8
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from monoflow.data.images import load_image_dataset
from monoflow.images.benchmark import step_cost
from monoflow.images.gradient_noise import (covariance_trace, image_batch, load_trained_run, random_image_batch,
                                            training_gradient)
from monoflow.logdet import RussianRouletteLogDet
from monoflow.provenance import benchmark_report, run_benchmark


def set_exact_terms(model: torch.nn.Module, n_exact: int) -> int:
    """Set every roulette estimator's exact terms (training and evaluation); returns how many."""
    estimators = {}
    for block in model.modules():
        estimator = getattr(block, "logdet_estimator", None)
        if isinstance(estimator, RussianRouletteLogDet):
            estimators[id(estimator)] = estimator
    for estimator in estimators.values():
        estimator.n_exact_terms = estimator.eval_n_exact_terms = n_exact
    return len(estimators)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("results/images/digits-cpu/monotone/seed2"),
                        help="a finished image run whose folder holds its checkpoint")
    parser.add_argument("--exact-terms", type=int, nargs="+", default=[0, 2, 4, 6, 10, 20])
    parser.add_argument("--images", type=int, default=64, help="batch size (the CPU presets' batch)")
    parser.add_argument("--draws", type=int, default=10, help="estimator draws per setting")
    parser.add_argument("--batches", type=int, default=10, help="minibatches for the SGD-noise reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/images/benchmarks/roulette_terms_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    record, model, train = load_trained_run(args.run)
    test = load_image_dataset(record["dataset"], None, train=False)
    rng = np.random.default_rng(0)
    fixed_k, fixed_noise = random_image_batch(train, rng, args.images, 1)
    report = benchmark_report("cpu", run=str(args.run), preset=record["preset"], model=record["model"],
                              run_iterations=record["iterations"], images=args.images, draws=args.draws,
                              roulette_lam=record["model_config"].get("roulette_lam"),
                              paper_exact_terms=record["model_config"].get("n_exact_terms"))

    # the noise SGD has anyway: minibatches of the training set, the paper's 10 exact terms, one draw each
    set_exact_terms(model, 10)
    minibatch = [training_gradient(model, *random_image_batch(train, rng, args.images, 100 + b), 1000 + b)
                 for b in range(args.batches)]
    report["minibatch_gradient_variance"] = covariance_trace(minibatch)
    report["gradient_norm_squared"] = float(np.square(np.mean(minibatch, axis=0)).sum())
    lam = report["roulette_lam"] or 2.0

    def measure(n_exact: int) -> Dict[str, float]:
        estimators = set_exact_terms(model, n_exact)
        grads, seconds = [], []
        for draw in range(args.draws):
            tick = time.perf_counter()
            grads.append(training_gradient(model, fixed_k, fixed_noise, draw))
            seconds.append(time.perf_counter() - tick)
        model.eval()
        eval_k, eval_noise = image_batch(test, np.arange(args.images), 2)
        with torch.no_grad():
            bpd = [float(model.bits_per_dim(eval_k, noise=eval_noise,
                                            generator=torch.Generator().manual_seed(draw)).mean())
                   for draw in range(args.draws)]
        variance = covariance_trace(grads)
        cost = step_cost(record["preset"], record["model"], device="cpu", batch_size=args.images,
                         model_overrides={"n_exact_terms": n_exact})
        return {"n_exact_terms": n_exact, "estimators": estimators, "vjps_per_block_expected": n_exact + lam,
                "estimator_gradient_variance": variance,
                "estimator_over_minibatch_variance": variance / report["minibatch_gradient_variance"],
                "step_seconds_median": statistics.median(seconds), "eval_bpd_mean": float(np.mean(bpd)),
                "eval_bpd_std_over_draws": float(np.std(bpd, ddof=1)),
                "g_evaluations_per_block": cost["g_evaluations_per_block"], "step_flops": cost["step_flops"],
                "step_seconds_counted": cost["seconds"]["step"]}

    def describe(row: Dict[str, float]) -> str:
        return (f"{row['n_exact_terms']:>2} exact terms: estimator/minibatch gradient variance "
                f"{row['estimator_over_minibatch_variance']:.4f}, step {row['step_seconds_median']:.2f} s, "
                f"{row['step_flops'] / 1e9:.1f} GFLOP, "
                f"bpd {row['eval_bpd_mean']:.4f} +- {row['eval_bpd_std_over_draws']:.4f}")

    run_benchmark(report, args.exact_terms, measure, describe, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
