"""Monotone block against residual block with the same g: time and network evaluations.

Measures, in one run (so ratios are meaningful on any machine):

* forward, inverse and backward wall time (median over repeats) of ``MonotoneBlock(g)`` and
  ``ResidualBlock(g)``, and their ratio;
* network evaluations per solve: forward, inverse and adjoint (from the solver diagnostics; the
  toy's direct adjoint is one Jacobian pass, which costs about two evaluations of g in 2-D);
* the accuracy of the float32 gradient against a float64 reference solved to 1e-12, for our
  adjoint (direct or Anderson, float32-reachable tolerance) and for the released code's policy
  (plain iteration to 1e-9, capped at 100 iterations), with the evaluations each needs.

Two settings: the 2-D toy (d=2, batch 500, DenseNet g depth 3 growth 16, exact log-det) and a
small convolutional one (3x8x8 images, batch 32, conv DenseNet g depth 3 growth 32, Russian
roulette with Neumann gradient).

    python benchmarks/blocks_speed.py --repeats 20 --output benchmarks/results/blocks_speed.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from monoflow.blocks import MonotoneBlock, ResidualBlock
from monoflow.lipschitz import dense_convnet, dense_mlp
from monoflow.logdet import RussianRouletteLogDet
from monoflow.provenance import provenance
from monoflow.solvers import SolverOptions, SolverWarning

# The released code's adjoint: plain iteration to an absolute 1e-9, at most 100 iterations, and the
# last iterate used when it does not get there (it only logged the failure).
RELEASED_ADJOINT = SolverOptions(method="picard", atol=1e-9, rtol=0.0, max_iterations=100, on_failure="warn")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _settings():
    torch.manual_seed(0)
    toy_g = dense_mlp(2, 3, 16, "cpila", coeff=0.9, lip_coeff=0.98)
    conv_g = dense_convnet(3, 3, 32, "cpila", coeff=0.98, lip_coeff=0.98)
    conv_g(torch.zeros(1, 3, 8, 8))  # fixes the convolutions' input size
    roulette = RussianRouletteLogDet(distribution="poisson", lam=2.0, n_exact_terms=10, gradient="neumann",
                                     memory_efficient=True)
    return {
        "toy_2d": dict(g=toy_g, x=torch.randn(500, 2) * 1.5, logdet="exact",
                       ours=SolverOptions(method="direct"), ours_name="direct"),
        "conv_3x8x8": dict(g=conv_g, x=torch.randn(32, 3, 8, 8), logdet=roulette,
                           ours=SolverOptions(atol=0.0), ours_name="anderson"),
    }


def _timings(block, x, repeats):
    y = block(x)[0].detach()

    def backward():
        xx = x.clone().requires_grad_()
        out, logdet = block(xx)
        (out.square().mean() + logdet.mean()).backward()

    forward_ms = _median_ms(lambda: block(x), repeats)
    inverse_ms = _median_ms(lambda: block.inverse(y), repeats)
    train_ms = _median_ms(backward, repeats)
    backward()
    block.inverse(y)
    counts = {k: v.summary() for k, v in block.last_solves.items()}
    return {
        "forward_ms": forward_ms,
        "inverse_ms": inverse_ms,
        "forward_backward_ms": train_ms,
        "evaluations": {k: c["evaluations"] for k, c in counts.items()},
        "iterations_mean": {k: c["iterations_mean"] for k, c in counts.items()},
        "iterations_max": {k: c["iterations_max"] for k, c in counts.items()},
    }


def _gradient(block, x, target):
    block.zero_grad()
    xx = x.clone().requires_grad_()
    out = block(xx)[0]
    ((out - target) ** 2).sum().backward()
    grads = [xx.grad.flatten()] + [p.grad.flatten() for p in block.parameters() if p.grad is not None]
    return torch.cat(grads).double(), block.last_solves["adjoint"]


def _gradient_accuracy(g, x, adjoint):
    """Relative error of the float32 gradient (no log-det) against a float64 reference."""
    target = torch.randn_like(x)
    reference_block = MonotoneBlock(copy.deepcopy(g).double(), logdet=None,
                                    solver=SolverOptions(atol=1e-13, rtol=1e-13, max_iterations=500),
                                    adjoint=SolverOptions(atol=0.0, rtol=1e-13, max_iterations=500))
    reference, _ = _gradient(reference_block, x.double(), target.double())
    block = MonotoneBlock(g, logdet=None, adjoint=adjoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        grad, info = _gradient(block, x, target)
    summary = info.summary()
    return {
        "relative_error": float((grad - reference).norm() / reference.norm()),
        "adjoint_evaluations_mean": summary["iterations_mean"],
        "adjoint_evaluations_max": summary["iterations_max"],
        "adjoint_converged_fraction": summary["converged_fraction"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", default="benchmarks/results/blocks_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"provenance": provenance(), "threads": args.threads, "settings": {}}
    for name, setting in _settings().items():
        g, x = setting["g"], setting["x"]
        monotone = MonotoneBlock(g, logdet=setting["logdet"], adjoint=setting["ours"])
        residual = ResidualBlock(g, logdet=setting["logdet"], adjoint=setting["ours"])
        mono, res = _timings(monotone, x, args.repeats), _timings(residual, x, args.repeats)
        ratios = {k: mono[k] / res[k] for k in ("forward_ms", "inverse_ms", "forward_backward_ms")}
        accuracy = {
            f"ours ({setting['ours_name']})": _gradient_accuracy(g, x, setting["ours"]),
            "released policy (iterate to 1e-9, cap 100)": _gradient_accuracy(g, x, RELEASED_ADJOINT),
        }
        report["settings"][name] = {
            "input_shape": list(x.shape),
            "monotone": mono,
            "residual": res,
            "monotone_over_residual": ratios,
            "adjoint_gradient_accuracy": accuracy,
        }
        print(f"{name}: monotone/residual time ratios {json.dumps({k: round(v, 2) for k, v in ratios.items()})}")
        print(f"  monotone evaluations per solve {mono['evaluations']}")
        for label, acc in accuracy.items():
            print(f"  adjoint {label}: rel. error {acc['relative_error']:.2e}, "
                  f"evaluations mean {acc['adjoint_evaluations_mean']:.1f} max {acc['adjoint_evaluations_max']:.0f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
