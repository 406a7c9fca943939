"""DenseNet without autograd: features in one buffer against the layer-by-layer map.

Fixed-point solves evaluate g without autograd. A flat :class:`monoflow.lipschitz.DenseNet` then
writes its features once into one buffer and folds the concatenation scales into cached weights
(``_forward_into_buffer``) instead of concatenating and rescaling all features at every layer.
This measures, in one process and interleaved (so the ratio does not depend on the machine or
its load), for the g of the paper's 2-D toy (batch 500) and 1-D regression (batch 5,000) models:

* one evaluation of g without autograd, buffer against layer by layer;
* one training iteration of the whole experiment (``training_step``), with every g of the model
  on the one path or the other.

Usage::

    python benchmarks/dense_speed.py                 # writes benchmarks/results/dense_speed.json
    python benchmarks/dense_speed.py --repeats 10 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from tqdm.auto import tqdm

from monoflow.experiments.config import regression_config, toy_config
from monoflow.experiments.regression1d import RegressionExperiment
from monoflow.experiments.toy2d import ToyExperiment
from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step
from monoflow.lipschitz import DenseNet, set_learnable_concat
from monoflow.provenance import provenance

SETTINGS = {
    "toy2d monotone": lambda: ToyExperiment(toy_config("paper", model="monotone", dataset="8gaussians")),
    "toy2d idensenet": lambda: ToyExperiment(toy_config("paper", model="idensenet", dataset="8gaussians")),
    "regression1d monotone_actnorm": lambda: RegressionExperiment(regression_config("paper", model="monotone_actnorm")),
    "regression1d implicit_actnorm": lambda: RegressionExperiment(regression_config("paper", model="implicit_actnorm")),
}


def interleaved(run: Callable[[], Any], set_path: Callable[[bool], None], calls: int, repeats: int) -> Dict[str, float]:
    """Median seconds per call of ``run`` with the buffer path on and off, alternating."""
    times: Dict[bool, List[float]] = {True: [], False: []}
    for _ in range(repeats):
        for buffered in (False, True):
            set_path(buffered)
            tick = time.perf_counter()
            for _ in range(calls):
                run()
            times[buffered].append((time.perf_counter() - tick) / calls)
    layer_by_layer, buffer = statistics.median(times[False]), statistics.median(times[True])
    return {"layer_by_layer_s": layer_by_layer, "buffer_s": buffer, "speedup": layer_by_layer / buffer}


def measure(name: str, repeats: int) -> Dict[str, Any]:
    experiment = SETTINGS[name]()
    config = experiment.config
    torch.manual_seed(config.seed)
    model = experiment.build_model()
    set_learnable_concat(model, True)
    model.train()
    networks = [module for module in model.modules() if isinstance(module, DenseNet)]

    def set_path(buffered: bool) -> None:
        for network in networks:
            network._flat = buffered

    g = networks[0]
    x = torch.randn(config.batch_size, g.layers[0].linear.in_features)

    def evaluate() -> None:
        with torch.no_grad():
            g(x)

    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    timers = {phase: 0.0 for phase in TIMED_PHASES}
    steps = iter(range(10 ** 9))

    def step() -> None:
        training_step(experiment, model, optimizer, generator, "cpu", next(steps), timers)

    step()  # warm-up
    return {"setting": name, "batch_size": config.batch_size, "dense_networks": len(networks),
            "g_without_autograd": interleaved(evaluate, set_path, 20, repeats),
            "training_iteration": interleaved(step, set_path, 2, repeats)}


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the two paths (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "dense_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: Dict[str, Any] = {
        "provenance": provenance("cpu"),
        "threads": args.threads,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "runs": [],
    }
    for name in tqdm(args.settings, desc="dense benchmark"):
        row = measure(name, args.repeats)
        report["runs"].append(row)
        tqdm.write(f"{name:32s} g: x{row['g_without_autograd']['speedup']:.2f}  "
                   f"training iteration: x{row['training_iteration']['speedup']:.2f}")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
