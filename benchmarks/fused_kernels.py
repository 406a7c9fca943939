"""The fused CPU kernels (``monoflow.kernels``: CPila, (C)LipSwish and the 2-D models' whole DenseNet g)
against their plain operators, measured side by side.

Three levels, each alternating the two ways round after round so both see the same machine load:

1. one call of CPila with its derivative (``value_and_derivative``, no autograd) on the 2-D toy
   models' pre-activations (500 x 8) and on an image block's (64 x 16 x 14 x 14: the mnist5k-cpu
   Monotone Flow's growth 32 at batch 64 on squeezed 14 x 14 images); and of the 2-D models' g,
   value and Jacobian, without autograd and with the backward (the fused DenseNet kernel);
2. eager training iterations of the paper's 2-D models (Monotone Flow with CPila, i-DenseNet with
   CLipSwish, Residual Flow with LipSwish; 8gaussians, learnable concatenation on), in one
   process, switching with ``kernels.enabled``;
3. training steps of the ``mnist5k-cpu`` preset's Monotone Flow and i-DenseNet (``--image-steps``
   steps per process, after 2 warm-up steps), in fresh processes taking turns, one with
   ``MONOFLOW_FUSED_KERNELS=0``; both start from the same seed, so their training losses agree up
   to rounding.

Each row gives the median time of each way, their ratio (``speedup`` = plain / fused) and, for the
training rows, the largest difference of the losses the two ways computed on the same batches.

Usage::

    python benchmarks/fused_kernels.py              # writes benchmarks/results/fused_kernels.json
    python benchmarks/fused_kernels.py --image-rounds 0 --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compiled_loss_speed import _start_training  # noqa: E402
from monoflow import kernels  # noqa: E402
from monoflow.activations import CPila  # noqa: E402
from monoflow.experiments.config import toy_config  # noqa: E402
from monoflow.experiments.toy2d import ToyExperiment  # noqa: E402
from monoflow.experiments.train import training_step  # noqa: E402
from monoflow.lipschitz import dense_mlp, reuse_parameter_transforms, set_learnable_concat  # noqa: E402
from monoflow.provenance import benchmark_report, run_benchmark  # noqa: E402

WAYS = {"plain": False, "fused": True}
MODEL_NAMES = {"monotone": "Monotone Flow", "idensenet": "i-DenseNet", "resflow": "Residual Flow"}


def _alternate(run: Callable[[], Any], rounds: int) -> Dict[str, List[float]]:
    """Seconds of ``run()`` with the plain operators and with the fused kernels, ``rounds`` times each, in turns."""
    times: Dict[str, List[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way, on in WAYS.items():
            with kernels.enabled(on):
                tick = time.perf_counter()
                run()
                times[way].append(time.perf_counter() - tick)
    return times


def _row(case: str, unit: str, times: Dict[str, List[float]], per: int, **extra: Any) -> Dict[str, Any]:
    plain, fused = (statistics.median(times[way]) / per for way in WAYS)
    return {"case": case, f"plain_{unit}": plain, f"fused_{unit}": fused, "speedup": plain / fused, **extra}


def activation_call(shape: tuple, rounds: int) -> Dict[str, Any]:
    activation = CPila()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    calls = max(10, int(2e6 // x.numel()))

    def run() -> None:
        with torch.no_grad():
            for _ in range(calls):
                activation.value_and_derivative(x)

    run()
    return _row(f"CPila value and derivative, {tuple(shape)}", "us_per_call",
                {way: [t * 1e6 for t in ts] for way, ts in _alternate(run, rounds).items()}, calls)


def dense_call(activation: str, with_backward: bool, rounds: int) -> Dict[str, Any]:
    """The 2-D models' g (``dense_mlp(2, 3, 16)``, learnable concatenation on) at batch 500: its value and
    Jacobian without autograd (a Newton step's pass), or with autograd and the backward of a loss of both
    (the log-det's pass in training); plain operators against the fused DenseNet kernel."""
    torch.manual_seed(0)
    g = dense_mlp(2, 3, 16, activation, 0.9, 0.98)
    set_learnable_concat(g, True)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    calls = 50

    def run() -> None:
        for _ in range(calls):
            if with_backward:
                with reuse_parameter_transforms():  # as in a training pass: weights folded once
                    value, jac = g.jacobian(x)
                    (value.square().sum() + jac.sum()).backward()
            else:
                with torch.no_grad():
                    g.jacobian(x)

    run()
    what = "value and Jacobian with their backward" if with_backward else "value and Jacobian, no autograd"
    return _row(f"2-D g ({activation}, growth 16) {what}, batch 500", "us_per_call",
                {way: [t * 1e6 for t in ts] for way, ts in _alternate(run, rounds).items()}, calls)


def toy_training(model_name: str, rounds: int, steps: int) -> Dict[str, Any]:
    experiment = ToyExperiment(toy_config("paper", model=model_name, dataset="8gaussians"))
    model, optimizer, generator, timers = _start_training(experiment, learnable_concat=True)
    for step in range(20):  # away from the initialisation
        training_step(experiment, model, optimizer, generator, "cpu", step, timers)
    # the losses of the same batch and weights, both ways
    batch = experiment.sample_batch(generator, torch.device("cpu"))
    losses = {}
    for way, on in WAYS.items():
        with kernels.enabled(on):
            losses[way] = experiment.loss(model, batch).item()
    counter = iter(range(20, 10 ** 9))

    def run() -> None:
        for _ in range(steps):
            training_step(experiment, model, optimizer, generator, "cpu", next(counter), timers)

    return _row(f"eager training iteration, 2-D {MODEL_NAMES[model_name]} (paper settings, 8gaussians)", "s_per_iteration",
                _alternate(run, rounds), steps, loss_difference=abs(losses["plain"] - losses["fused"]))


def _image_worker(model_name: str, steps: int) -> Dict[str, Any]:
    from monoflow.images.benchmark import measure_training

    row = measure_training("mnist5k-cpu", model_name, steps=steps, eval_images=0, threads=1, warmup_steps=2)
    return {"seconds_per_step": row["seconds_per_step"], "forward_evaluations_per_block": row["forward_evaluations_per_block"],
            "adjoint_evaluations_per_block": row["adjoint_evaluations_per_block"],
            "train_surrogate_bpd_last": row["train_surrogate_bpd_last"], "cpu_kernels": kernels.status()["available"]}


def image_training(model_name: str, rounds: int, steps: int) -> Dict[str, Any]:
    results: Dict[str, List[Dict[str, Any]]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way, on in WAYS.items():
            environment = dict(os.environ, **({} if on else {kernels.DISABLE_VARIABLE: "0"}))
            completed = subprocess.run([sys.executable, __file__, "--image-worker", model_name, str(steps)], env=environment,
                                       capture_output=True, text=True, check=True)
            results[way].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    assert all(r["cpu_kernels"] == WAYS[way] for way in WAYS for r in results[way])
    times = {way: [r["seconds_per_step"] for r in results[way]] for way in WAYS}
    last = {way: results[way][0]["train_surrogate_bpd_last"] for way in WAYS}
    return _row(f"training step, mnist5k-cpu {MODEL_NAMES[model_name]} ({steps} steps per process, 2 of them warm-up)",
                "s_per_step", times, 1, loss_difference=abs(last["plain"] - last["fused"]),
                forward_evaluations_per_block=results["fused"][0]["forward_evaluations_per_block"],
                adjoint_evaluations_per_block=results["fused"][0]["adjoint_evaluations_per_block"])


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="alternations of the activation and toy rows")
    parser.add_argument("--toy-steps", type=int, default=10, help="toy iterations per round")
    parser.add_argument("--image-rounds", type=int, default=2, help="processes per way for the image row (0: skip)")
    parser.add_argument("--image-steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "fused_kernels.json")
    parser.add_argument("--image-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.image_worker:
        print(json.dumps(_image_worker(args.image_worker[0], int(args.image_worker[1]))))
        return 0
    if not kernels.available():
        print(f"the fused kernels are not available here: {kernels.status()['reason']}")
        return 1
    report = benchmark_report("cpu", kernels=kernels.status())
    cases: Dict[str, Callable[[], Dict[str, Any]]] = {
        "toy activation": lambda: activation_call((500, 8), args.rounds),
        "image activation": lambda: activation_call((64, 16, 14, 14), args.rounds),
        **{f"toy g {name} {mode}": (lambda name=name, mode=mode: dense_call(name, mode == "backward", args.rounds))
           for name in ("cpila", "clipswish") for mode in ("no grad", "backward")},
        **{f"toy training {name}": (lambda name=name: toy_training(name, args.rounds, args.toy_steps)) for name in MODEL_NAMES},
    }
    if args.image_rounds:
        for name in ("monotone", "idensenet"):
            cases[f"image training {name}"] = lambda name=name: image_training(name, args.image_rounds, args.image_steps)
    run_benchmark(report, list(cases), lambda name: cases[name](),
                  lambda row: f"{row['case']}: x{row['speedup']:.2f}", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
