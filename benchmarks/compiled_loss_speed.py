"""Training with ``--compile`` (``monoflow.compiled``) against eager training.

For the paper's 2-D Monotone Flow, i-DenseNet and Residual Flow (10 blocks, exact log-det,
learnable concatenation on, after 20 eager iterations so that g is away from its initialisation),
in one process and on the same model:

1. compile, and time the first call;
2. check the compiled loss and every parameter's gradient against ``-flow.log_prob(x).mean()``;
3. time whole training iterations (``training_step``: batch, loss, backward, Adam, power
   iterations) of ``ToyExperiment(config)`` and of ``ToyExperiment(config, compile=True)`` (compiled
   loss, and Adam with the power iterations as ``CompiledUpdate``), alternating, and report the
   median of each, their ratio and the projected time of a paper-scale run against the 20-minute
   target.

Usage::

    python benchmarks/compiled_loss_speed.py     # writes benchmarks/results/compiled_loss_speed.json
    python benchmarks/compiled_loss_speed.py --models monotone --repeats 10 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from monoflow.experiments.config import toy_config
from monoflow.experiments.toy2d import COMPILABLE_MODELS, ToyExperiment
from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step
from monoflow.lipschitz import set_learnable_concat
from monoflow.provenance import benchmark_report, compare_timings, run_benchmark

TARGET_MINUTES = 20.0


def compare_gradients(model: torch.nn.Module, eager: ToyExperiment, compiled: ToyExperiment,
                      batch: torch.Tensor) -> Dict[str, float]:
    """Loss and largest gradient difference (relative to each gradient's largest entry)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    reference = eager.loss(model, batch)
    reference_grads = torch.autograd.grad(reference, parameters)
    loss = compiled.loss(model, batch)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    worst = max(float((mine - theirs).abs().max()) / (float(theirs.abs().max()) + 1e-30)
                for mine, theirs in zip(grads, reference_grads) if mine is not None)
    return {"loss_eager": reference.item(), "loss_compiled": loss.item(),
            "loss_difference": abs(loss.item() - reference.item()),
            "largest_relative_gradient_difference": worst,
            "parameters_without_gradient": sum(g is None for g in grads)}


def measure(model_name: str, repeats: int, calls: int) -> Dict[str, Any]:
    config = toy_config("paper", model=model_name, dataset="8gaussians")
    eager, compiled = ToyExperiment(config), ToyExperiment(config, compile=True)
    torch.manual_seed(config.seed)
    model = eager.build_model()
    set_learnable_concat(model, True)
    model.train()
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    timers = {phase: 0.0 for phase in TIMED_PHASES}
    steps = iter(range(10 ** 9))
    for _ in range(20):
        training_step(eager, model, optimizer, generator, "cpu", next(steps), timers)

    batch = eager.sample_batch(generator, torch.device("cpu"))
    tick = time.perf_counter()
    compiled.loss(model, batch)
    compile_s = time.perf_counter() - tick
    check = compare_gradients(model, eager, compiled, batch)

    times: Dict[str, List[float]] = {"eager": [], "compiled": []}
    experiments = {"eager": eager, "compiled": compiled}
    for name in times:  # warm-up
        for _ in range(3):
            training_step(experiments[name], model, optimizer, generator, "cpu", next(steps), timers)
    for _ in range(repeats):
        for name, experiment in experiments.items():
            tick = time.perf_counter()
            for _ in range(calls):
                training_step(experiment, model, optimizer, generator, "cpu", next(steps), timers)
            times[name].append((time.perf_counter() - tick) / calls)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    loss_fn = compiled._compiled_loss
    return {
        "model": model_name,
        "setting": "paper architecture, 8gaussians, batch 500, learnable concatenation on",
        "newton_steps": loss_fn.newton_steps,
        "compile_s": compile_s,
        "check": check,
        **compare_timings("eager", eager_s, "compiled", compiled_s, config.iterations, TARGET_MINUTES),
        "batches": loss_fn.batches,
        "eager_fallbacks": loss_fn.fallbacks,
    }


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=COMPILABLE_MODELS, default=list(COMPILABLE_MODELS))
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the two losses (default 5)")
    parser.add_argument("--calls", type=int, default=5, help="iterations per alternation (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "compiled_loss_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = benchmark_report("cpu", threads=args.threads)

    def describe(row: Dict[str, Any]) -> str:
        return (f"{row['model']}: eager {1000 * row['eager_s_per_iteration']:.1f} ms, compiled "
                f"{1000 * row['compiled_s_per_iteration']:.1f} ms per iteration (x{row['speedup']:.2f}); "
                f"paper-scale run {row['projected_run_minutes_compiled']:.0f} min against {TARGET_MINUTES:.0f}; "
                f"compile {row['compile_s']:.0f} s; gradient difference "
                f"{row['check']['largest_relative_gradient_difference']:.1e}")

    run_benchmark(report, args.models, lambda name: measure(name, args.repeats, args.calls), describe, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
