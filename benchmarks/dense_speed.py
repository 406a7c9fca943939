"""DenseNet without autograd: features in one buffer against the layer-by-layer map.

Fixed-point solves evaluate g without autograd. A flat :class:`monoflow.lipschitz.DenseNet` then
writes its features once into one buffer and folds the concatenation scales into cached weights
(``_forward_into_buffer``) instead of concatenating and rescaling all features at every layer.
This measures, in one process and interleaved (so the ratio does not depend on the machine or
its load), for the g of the paper's 2-D toy (batch 500) and 1-D regression (batch 5,000) models:

* one evaluation of g without autograd, buffer against layer by layer;
* one training iteration of the whole experiment (``training_step``), with every g of the model
  on the one path or the other.

``--compile`` adds a third path: the same map (and, with autograd, ``g(x)`` and ``g.jacobian(x)``)
written as pure functions of the weights and compiled with ``torch.compile`` (inductor fuses the
elementwise operators of each layer into one loop). It asks how far a generic operator fuser gets
towards the speed targets; the package itself does not use it. The compiled kernels are checked
against the eager map before anything is timed.

Usage::

    python benchmarks/dense_speed.py                 # writes benchmarks/results/dense_speed.json
    python benchmarks/dense_speed.py --repeats 10 --threads 2
    python benchmarks/dense_speed.py --compile       # adds the torch.compile path
"""
from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monoflow.experiments.config import regression_config, toy_config
from monoflow.experiments.regression1d import RegressionExperiment
from monoflow.experiments.toy2d import ToyExperiment
from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step
from monoflow.lipschitz import DenseNet, dense_layer_output, set_learnable_concat
from monoflow.provenance import benchmark_report, run_benchmark

SETTINGS = {
    "toy2d monotone": lambda: ToyExperiment(toy_config("paper", model="monotone", dataset="8gaussians")),
    "toy2d idensenet": lambda: ToyExperiment(toy_config("paper", model="idensenet", dataset="8gaussians")),
    "regression1d monotone_actnorm": lambda: RegressionExperiment(regression_config("paper", model="monotone_actnorm")),
    "regression1d implicit_actnorm": lambda: RegressionExperiment(regression_config("paper", model="implicit_actnorm")),
}


PATHS = ("layer_by_layer", "buffer")


def _scaled_forward(activation, x, weights, biases, betas):
    """g without autograd, with the concatenation scales folded into ``weights`` (as the buffer path)."""
    for index, (weight, bias) in enumerate(zip(weights[:-1], biases[:-1])):
        pre = F.linear(x, weight, bias)
        value = activation(pre) if betas is None else activation.forward_with_beta(pre, betas[index])
        x = torch.cat([x, value], 1)
    return F.linear(x, weights[-1], biases[-1])


def _forward(activation, x, weights, biases, etas1, etas2, betas):
    """g with autograd, layer by layer (``dense_layer_output``) from the normalised weights."""
    for index, (weight, bias) in enumerate(zip(weights[:-1], biases[:-1])):
        beta = None if betas is None else betas[index]
        x = dense_layer_output(activation, x, F.linear(x, weight, bias), etas1[index], etas2[index], beta=beta)[0]
    return F.linear(x, weights[-1], biases[-1])


def _jacobian(activation, x, weights, biases, etas1, etas2, betas):
    """``(g(x), dg/dx)`` by forward propagation of the transposed Jacobian, as ``DenseNet.jacobian``."""
    batch, dim = x.shape
    jac = torch.eye(dim, dtype=x.dtype, device=x.device).expand(batch, dim, dim)
    for index, (weight, bias) in enumerate(zip(weights[:-1], biases[:-1])):
        beta = None if betas is None else betas[index]
        x, jac = dense_layer_output(activation, x, F.linear(x, weight, bias), etas1[index], etas2[index],
                                    jac, F.linear(jac, weight), beta=beta)
    return F.linear(x, weights[-1], biases[-1]), F.linear(jac, weights[-1]).transpose(1, 2)


class CompiledKernels:
    """Compiled (``torch.compile``) versions of the three maps, shared by every DenseNet of a model.

    The activation module passed in is the first network's (a module argument is a compile-time
    constant, so one per block would compile once per block); learnable activation parameters
    (LipSwish's beta) are passed as tensors instead."""

    def __init__(self, networks: Sequence[DenseNet]):
        self.activation = networks[0].layers[0].activation
        for network in networks:
            for layer in network.layers[:-1]:
                if type(layer.activation) is not type(self.activation) or \
                        getattr(layer.activation, "k", None) != getattr(self.activation, "k", None):
                    raise ValueError("the compiled kernels need the same activation in every layer")
        self.learnable = hasattr(self.activation, "forward_with_beta")
        self.scaled_forward = torch.compile(_scaled_forward, fullgraph=True, dynamic=True)
        self.forward = torch.compile(_forward, fullgraph=True, dynamic=False)
        self.jacobian = torch.compile(_jacobian, fullgraph=True, dynamic=False)

    def _arguments(self, network: DenseNet):
        *dense, last = network.layers
        weights = [layer.linear.normalized_weight() for layer in dense] + [last.normalized_weight()]
        biases = [layer.linear.bias for layer in dense] + [last.bias]
        etas = [layer.etas() for layer in dense]
        etas1 = [torch.as_tensor(eta1, dtype=last.bias.dtype) for eta1, _ in etas]
        etas2 = [torch.as_tensor(eta2, dtype=last.bias.dtype) for _, eta2 in etas]
        return self.activation, weights, biases, etas1, etas2, self._betas(network)

    def _betas(self, network: DenseNet) -> Optional[List[torch.Tensor]]:
        return [layer.activation.beta for layer in network.layers[:-1]] if self.learnable else None

    def attach(self, network: DenseNet) -> None:
        """Route ``network(x)`` and ``network.jacobian(x)`` through the compiled kernels."""
        kernels = self

        def forward(self: DenseNet, x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                *dense, last = self.layers
                return kernels.scaled_forward(kernels.activation, x, self._column_scaled_weights(x.shape[1]),
                                              [layer.linear.bias for layer in dense] + [last.bias],
                                              kernels._betas(self))
            activation, weights, biases, etas1, etas2, betas = kernels._arguments(self)
            return kernels.forward(activation, x, weights, biases, etas1, etas2, betas)

        def jacobian(self: DenseNet, x: torch.Tensor):
            activation, weights, biases, etas1, etas2, betas = kernels._arguments(self)
            return kernels.jacobian(activation, x, weights, biases, etas1, etas2, betas)

        network.forward = types.MethodType(forward, network)
        network.jacobian = types.MethodType(jacobian, network)

    @staticmethod
    def detach(network: DenseNet) -> None:
        for name in ("forward", "jacobian"):
            network.__dict__.pop(name, None)


def check_kernels(network: DenseNet, kernels: CompiledKernels, x: torch.Tensor) -> Dict[str, float]:
    """Largest differences of the compiled maps from the eager ones (this also compiles them)."""
    with torch.no_grad():
        eager_plain = network(x)
    eager_value = network(x)
    eager_jacobian = network.jacobian(x)
    kernels.attach(network)
    try:
        with torch.no_grad():
            compiled_plain = network(x)
        compiled_value = network(x)
        compiled_jacobian = network.jacobian(x)
    finally:
        kernels.detach(network)
    return {
        "g_without_autograd": float((compiled_plain - eager_plain).abs().max()),
        "g": float((compiled_value - eager_value).detach().abs().max()),
        "jacobian_value": float((compiled_jacobian[0] - eager_jacobian[0]).detach().abs().max()),
        "jacobian": float((compiled_jacobian[1] - eager_jacobian[1]).detach().abs().max()),
    }


def interleaved(run: Callable[[], Any], set_path: Callable[[str], None], paths: Sequence[str], calls: int,
                repeats: int) -> Dict[str, float]:
    """Median seconds per call of ``run`` on each path, the paths alternating; speed-ups against
    layer by layer (``speedup``: the buffer path's, ``speedup_compiled``: the compiled path's)."""
    times: Dict[str, List[float]] = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            set_path(path)
            tick = time.perf_counter()
            for _ in range(calls):
                run()
            times[path].append((time.perf_counter() - tick) / calls)
    result = {f"{path}_s": statistics.median(times[path]) for path in paths}
    result["speedup"] = result["layer_by_layer_s"] / result["buffer_s"]
    if "compiled" in paths:
        result["speedup_compiled"] = result["layer_by_layer_s"] / result["compiled_s"]
        result["compiled_vs_buffer"] = result["buffer_s"] / result["compiled_s"]
    return result


def measure(name: str, repeats: int, compiled: bool = False) -> Dict[str, Any]:
    experiment = SETTINGS[name]()
    config = experiment.config
    torch.manual_seed(config.seed)
    model = experiment.build_model()
    set_learnable_concat(model, True)
    model.train()
    networks = [module for module in model.modules() if isinstance(module, DenseNet)]
    g = networks[0]
    x = torch.randn(config.batch_size, g.layers[0].linear.in_features)
    paths = PATHS + (("compiled",) if compiled else ())
    row: Dict[str, Any] = {"setting": name, "batch_size": config.batch_size, "dense_networks": len(networks)}
    kernels = None
    if compiled:
        kernels = CompiledKernels(networks)
        tick = time.perf_counter()
        row["compiled_max_abs_difference"] = check_kernels(g, kernels, x)
        row["compile_s"] = time.perf_counter() - tick

    def set_path(path: str) -> None:
        for network in networks:
            network._flat = path != "layer_by_layer"
            if kernels is not None:
                kernels.attach(network) if path == "compiled" else kernels.detach(network)

    def evaluate() -> None:
        with torch.no_grad():
            g(x)

    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    timers = {phase: 0.0 for phase in TIMED_PHASES}
    steps = iter(range(10 ** 9))

    def step() -> None:
        training_step(experiment, model, optimizer, generator, "cpu", next(steps), timers)

    for path in paths:  # warm-up (and, for the compiled path, the compiles of every shape)
        set_path(path)
        for _ in range(5):
            step()
    row["g_without_autograd"] = interleaved(evaluate, set_path, paths, 20, repeats)
    row["training_iteration"] = interleaved(step, set_path, paths, 2, repeats)
    return row


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the two paths (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="add the torch.compile path (compiles for a minute or so per setting)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "dense_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = benchmark_report("cpu", threads=args.threads)

    def describe(row: Dict[str, Any]) -> str:
        line = (f"{row['setting']:32s} buffer: g x{row['g_without_autograd']['speedup']:.2f}, "
                f"iteration x{row['training_iteration']['speedup']:.2f}")
        if args.compile:
            line += (f"; compiled: g x{row['g_without_autograd']['speedup_compiled']:.2f}, "
                     f"iteration x{row['training_iteration']['speedup_compiled']:.2f}")
        return line

    run_benchmark(report, tqdm(args.settings, desc="dense benchmark"),
                  lambda name: measure(name, args.repeats, args.compile), describe, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
