"""How loose the fixed-point solves of image training may stop, measured on a trained Monotone Flow.

Every monotone block solves :math:`w + g(w) = b` in the forward pass and a linear system for its
implicit gradient in the backward pass. Both stop once the residual is below
``atol * sqrt(n) + rtol * |f(z)|`` (float32 defaults: forward ``atol=1e-6, rtol=1e-5``; adjoint
``rtol=1e-5`` of the incoming gradient, ``atol=0``), and every tenfold looser tolerance saves
Anderson about one evaluation of g per block. What a looser stop costs is a small *bias* of the
gradient (the same on every draw, not noise that averages out), so it is compared with the
gradient's own size and with the noise SGD has anyway (the spread between minibatches).

For a trained run (its EMA weights, from the checkpoint) and each ``rtol`` in ``--rtols`` given to
both solves (forward ``atol = rtol / 10``, as in the default pair), then each of ``--split-rtols``
given to one solve alone with the other at the default (which of the two the gradient needs
tight), and last the loosest forward and adjoint ``rtol`` that each kept the gradient
(:func:`gradient_kept`) together, on ``--batches`` training minibatches with one fixed estimator
draw and dequantisation each:

* the forward and adjoint evaluations of g per block (mean over blocks and batches) and the
  fraction of samples that met the tolerance;
* the seconds of one forward + backward (median; the evaluation counts do not depend on the load);
* against the tightest ``rtol`` of the list on the same batch and draw: the squared gradient change
  :math:`\\|\\nabla - \\nabla_{\\rm ref}\\|^2` over the minibatch variance
  :math:`\\operatorname{tr}\\operatorname{Cov}_B` (computed once, at the default tolerance) and over
  :math:`\\|\\nabla_{\\rm ref}\\|^2`, the cosine between the two, and the change of the training bpd.

Usage::

    python benchmarks/solver_tolerance.py --run results/images/mnist5k-cpu/monotone/seed0
    python benchmarks/solver_tolerance.py --run RUN --rtols 1e-6 1e-5 1e-4 --split-rtols 1e-3 --batches 4

A run trains with other tolerances through ``--set solver_rtol=R --set adjoint_rtol=R`` (``monoflow images train``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from monoflow.blocks import MonotoneBlock, solver_stats
from monoflow.images.gradient_noise import (covariance_trace, load_trained_run, loss_and_gradient,
                                            random_image_batch, training_gradient)
from monoflow.implicit import DEFAULT_ADJOINT
from monoflow.provenance import benchmark_report, run_benchmark
from monoflow.solvers import default_tolerances


DEFAULT_RTOL = default_tolerances(torch.float32)[1]  # both solves' float32 default, 1e-5


def set_tolerances(model: torch.nn.Module, forward_rtol: float, adjoint_rtol: float) -> int:
    """Every monotone block's solves as ``--set solver_rtol=forward_rtol --set adjoint_rtol=adjoint_rtol``
    builds them (:meth:`~monoflow.models.image.ImageFlowConfig.solver_options`), with unconverged
    samples set to NaN; returns the number of blocks."""
    forward, adjoint = replace(model.config, solver_rtol=forward_rtol, adjoint_rtol=adjoint_rtol).solver_options()
    blocks = [m for m in model.modules() if isinstance(m, MonotoneBlock)]
    for block in blocks:
        block.solver = replace(forward, on_failure="nan")
        block.adjoint = replace(adjoint or DEFAULT_ADJOINT, on_failure="nan")
    return len(blocks)


def gradient_kept(row: Dict[str, Any]) -> bool:
    """The criterion of a harmless stop: every gradient within cosine 0.999 of the reference and the
    mean squared change below 1% of the minibatch variance."""
    return row["cosine_to_reference_min"] >= 0.999 and row["gradient_change_over_minibatch_variance"] <= 0.01


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("results/images/mnist5k-cpu/monotone/seed0"),
                        help="a finished Monotone Flow image run whose folder holds its checkpoint")
    parser.add_argument("--rtols", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
                        help="forward and adjoint rtol per setting; the smallest is the reference")
    parser.add_argument("--split-rtols", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2],
                        help="rtols also tried on one solve alone (forward, then adjoint), the other at 1e-5")
    parser.add_argument("--images", type=int, default=64, help="batch size (the CPU presets' batch)")
    parser.add_argument("--batches", type=int, default=8, help="training minibatches per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/images/benchmarks/solver_tolerance_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    record, model, train = load_trained_run(args.run)
    rng = np.random.default_rng(0)
    batches = [random_image_batch(train, rng, args.images, 100 + b) for b in range(args.batches)]
    rtols = sorted(args.rtols)
    report = benchmark_report("cpu", run=str(args.run), preset=record["preset"], model=record["model"],
                              run_iterations=record["iterations"], images=args.images, batches=args.batches,
                              default_forward=[DEFAULT_RTOL / 10, DEFAULT_RTOL], default_adjoint_rtol=DEFAULT_RTOL,
                              reference_rtol=rtols[0])

    # the noise SGD has anyway, at the default tolerances: one estimator draw per minibatch
    set_tolerances(model, DEFAULT_RTOL, DEFAULT_RTOL)
    minibatch = [training_gradient(model, k, noise, 1000 + b) for b, (k, noise) in enumerate(batches)]
    report["minibatch_gradient_variance"] = covariance_trace(minibatch)

    reference: List[np.ndarray] = []
    reference_bpd: List[float] = []

    def measure(setting: Tuple[str, float, float]) -> Dict[str, Any]:
        loosened, forward_rtol, adjoint_rtol = setting
        blocks = set_tolerances(model, forward_rtol, adjoint_rtol)
        grads, bpds, seconds, stats = [], [], [], []
        for b, (k, noise) in enumerate(batches):
            tick = time.perf_counter()
            bpd, grad = loss_and_gradient(model, k, noise, 1000 + b)
            seconds.append(time.perf_counter() - tick)
            grads.append(grad)
            bpds.append(bpd)
            stats.append(solver_stats(model))
        if not reference:
            reference.extend(grads)
            reference_bpd.extend(bpds)
        change = [float(np.square(g - r).sum()) for g, r in zip(grads, reference)]
        size = [float(np.square(r).sum()) for r in reference]
        cosine = [float(g @ r / np.sqrt((g @ g) * (r @ r))) for g, r in zip(grads, reference)]
        return {
            "loosened": loosened, "forward_rtol": forward_rtol, "forward_atol": forward_rtol / 10,
            "adjoint_rtol": adjoint_rtol, "monotone_blocks": blocks,
            "forward_evaluations_per_block": float(np.mean([s["forward_evaluations"] for s in stats])),
            "adjoint_evaluations_per_block": float(np.mean([s["adjoint_evaluations"] for s in stats])),
            "forward_converged_fraction": min(s["forward_converged_fraction"] for s in stats),
            "adjoint_converged_fraction": min(s["adjoint_converged_fraction"] for s in stats),
            "step_seconds_median": statistics.median(seconds),
            "gradient_change_over_minibatch_variance": float(np.mean(change)) / report["minibatch_gradient_variance"],
            "gradient_change_over_gradient_norm": float(np.mean(change)) / float(np.mean(size)),
            "cosine_to_reference_min": min(cosine),
            "bpd_change_max": max(abs(a - b) for a, b in zip(bpds, reference_bpd)),
            "bpd_mean": float(np.mean(bpds)),
        }

    def describe(row: Dict[str, Any]) -> str:
        return (f"{row['loosened']}: forward rtol {row['forward_rtol']:.0e}, adjoint rtol {row['adjoint_rtol']:.0e}: "
                f"{row['forward_evaluations_per_block']:.2f} / {row['adjoint_evaluations_per_block']:.2f} "
                f"evaluations per block, step {row['step_seconds_median']:.2f} s, gradient change / minibatch "
                f"variance {row['gradient_change_over_minibatch_variance']:.2e}, cosine >= "
                f"{row['cosine_to_reference_min']:.6f}, bpd change <= {row['bpd_change_max']:.1e}")

    settings = [("both", rtol, rtol) for rtol in rtols]
    settings += [("forward", rtol, DEFAULT_RTOL) for rtol in args.split_rtols]
    settings += [("adjoint", DEFAULT_RTOL, rtol) for rtol in args.split_rtols]
    run_benchmark(report, settings, measure, describe, args.out)
    # the loosest of each solve alone that kept the gradient, measured together
    loosest = {solve: max([DEFAULT_RTOL] + [r[f"{solve}_rtol"] for r in report["runs"]
                                            if r["loosened"] == solve and gradient_kept(r)])
               for solve in ("forward", "adjoint")}
    if loosest["forward"] > DEFAULT_RTOL or loosest["adjoint"] > DEFAULT_RTOL:
        run_benchmark(report, [("combined", loosest["forward"], loosest["adjoint"])], measure, describe, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
