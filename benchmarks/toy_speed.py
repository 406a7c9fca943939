"""Per-iteration time of the paper's small experiments, with its breakdown.

Measures training iterations exactly as ``monoflow.experiments.train.training_step`` runs them
(batch, forward solves + log-det, backward with adjoint solves, Adam + power iterations) at the
paper's settings:

* 2-D toy (Table 1): batch 500, 10 blocks, DenseNet depth 3 growth 16, exact log-det, for
  ``monotone``, ``idensenet`` and ``resflow``; target < 24 ms/iteration (50,000 iterations in
  under 20 minutes on 2 cores);
* 1-D regression (Figure 4): batch 5000, depth 4 growth 128, the four models; target
  < 120 ms/iteration (15,000 iterations in under 30 minutes).

Usage::

    python benchmarks/toy_speed.py                      # all models, writes benchmarks/results/toy_speed.json
    python benchmarks/toy_speed.py --iterations 50 --threads 1 2
    python benchmarks/toy_speed.py --profile            # cProfile of each model, top functions in the JSON
    python benchmarks/toy_speed.py --count-ops          # also the number of torch operators per iteration

The numbers depend on the machine and its load: the JSON records threads, torch version, CPU
count and the load average at the start, and beside the wall time per iteration the process's
CPU time per iteration (with one thread, close to the wall time on an idle core).

Beside each time per iteration, ``floor`` gives the step's arithmetic floor: the FLOPs of the
matrix products of one training step (forward with solves and log-det, backward, Adam and the
power iterations; :mod:`monoflow.flop_count`, counted once after the timed iterations), the same
per block in evaluations of g, and ``floor_s``, those FLOPs at the float32 matrix-multiply
throughput measured in the same process with the same threads; ``times_above_floor`` is the
measured time over it.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import platform
import pstats
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from monoflow.allocator import retain_freed_memory
from monoflow.experiments.config import REGRESSION_MODELS, TOY_MODELS, regression_config, toy_config
from monoflow.experiments.regression1d import RegressionExperiment
from monoflow.experiments.results import summarize_solver
from monoflow.experiments.toy2d import ToyExperiment
from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step
from monoflow.flop_count import (arithmetic_floor, blocks_and_inputs, count_step_flops, g_flops_of_blocks,
                                 matmul_flops_per_second)
from monoflow.lipschitz import update_lipschitz
from monoflow.provenance import benchmark_report, save_benchmark_report

TOY_TARGET_S = 20 * 60 / 50000
REGRESSION_TARGET_S = 30 * 60 / 15000


def count_operators(step: Callable[[], Any], iterations: int = 3) -> Dict[str, Any]:
    """Torch operators dispatched per call of ``step``: the ``aten::`` calls made from Python (not
    those nested inside other operators), and the most frequent ones. At a few microseconds of
    dispatch each, their number bounds how fast an iteration of small tensors can be."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(iterations):
            step()
    top_level = [event.name for event in profiler.events() if event.name.startswith("aten::")
                 and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))]
    return {"operators_per_iteration": len(top_level) / iterations,
            "most_frequent": {name: count / iterations for name, count in Counter(top_level).most_common(8)}}


def step_floor(experiment: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any,
               seconds: float, flops_per_s: float, loss: Optional[Callable[[], torch.Tensor]] = None) -> Dict[str, Any]:
    """The arithmetic floor of one training step of ``model`` on ``batch``, against its measured
    ``seconds``: FLOPs of the matrix products by phase (:func:`monoflow.flop_count.count_step_flops`;
    ``loss`` defaults to ``experiment.loss(model, batch)``, the update is Adam's step and the power
    iterations, run eagerly), the same in evaluations of every block's g, and ``floor_s`` =
    FLOPs / ``flops_per_s``, ``times_above_floor`` = ``seconds / floor_s``. Runs one more step."""
    blocks, inputs = blocks_and_inputs(model, batch if torch.is_tensor(batch) else batch[0])
    g_flops = g_flops_of_blocks(blocks, inputs)

    def update() -> None:
        optimizer.step()
        update_lipschitz(model, n_iterations=experiment.config.power_iterations)

    optimizer.zero_grad(set_to_none=True)
    flops = count_step_flops(loss or (lambda: experiment.loss(model, batch)), update)
    return {
        "step_flops": flops["step"], "flops": flops, "g_flops_all_blocks": g_flops,
        # a Jacobian pass (g and its Jacobian propagated, the exact log-det, Newton) counts as 1 + d
        # evaluations of g in matrix-product FLOPs
        "g_evaluations_per_block": {phase: value / g_flops for phase, value in flops.items()} if g_flops else None,
        "seconds_per_step": seconds, "matmul_flops_per_s": flops_per_s,
        **arithmetic_floor(seconds, flops["step"], flops_per_s),
    }


def _profile_summary(profile: cProfile.Profile, top: int = 15) -> List[Dict[str, Any]]:
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    rows = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(filename).name}:{line}({name})", "calls": calls,
                     "tottime_s": tottime, "cumtime_s": cumtime})
    rows.sort(key=lambda row: row["tottime_s"], reverse=True)
    return rows[:top]


@contextlib.contextmanager
def _timed_patches(patches: List[Tuple[Any, str, str]], timers: Dict[str, float]):
    """For the duration, wrap each ``(owner, attribute, label)`` function so that its wall time is
    added to ``timers[label]`` (nested calls of one label count once)."""
    depth: Dict[str, int] = {}

    def timed(function: Callable, name: str) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth[name] = depth.get(name, 0) + 1
            tick = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[name] -= 1
                if depth[name] == 0:
                    timers[name] += time.perf_counter() - tick
        return wrapper

    originals = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    for owner, name, label in patches:
        timers.setdefault(label, 0.0)
        if name in owner.__dict__:
            setattr(owner, name, timed(getattr(owner, name), label))
    try:
        yield timers
    finally:
        for owner, name, original in originals:
            if original is not None:
                setattr(owner, name, original)


#: the label of the time spent inside the C functions of monoflow.kernels
KERNELS_LABEL = "fused kernels (C)"


def _kernel_patch() -> Tuple[Any, str, str]:
    from monoflow import kernels

    return (kernels, "_in_row_blocks", KERNELS_LABEL)  # every kernel call goes through it


def kernel_timers(timers: Dict[str, float]):
    """Accumulate the wall time spent inside the fused C kernels (:mod:`monoflow.kernels`) into
    ``timers[KERNELS_LABEL]``; they are called at run time, also from compiled graphs (as torch
    operators), so this does not touch what ``torch.compile`` traced."""
    return _timed_patches([_kernel_patch()], timers)


def sub_phase_timers(timers: Dict[str, float]):
    """Accumulate the wall time of the fixed-point solves, the adjoint solves, the log-det
    estimators and the fused C kernels into ``timers`` (by wrapping those functions for the duration)."""
    import monoflow.implicit as implicit
    from monoflow import logdet

    patches = [(implicit, "fixed_point_solve", "solves (forward and iterative adjoint)"),
               (implicit, "scalar_resolvent_solve", "solves (forward and iterative adjoint)"),
               (implicit, "_direct_adjoint", "adjoint (direct)")]
    for estimator in (logdet.ExactLogDet, logdet.PowerSeriesLogDet, logdet.RussianRouletteLogDet):
        patches += [(estimator, "__call__", "log-det"), (estimator, "value_and_logdet", "log-det")]
    return _timed_patches(patches + [_kernel_patch()], timers)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(experiment: Any, iterations: int, warmup: int, profile: bool, device: Any = "cpu",
            count_ops: bool = False, flops_per_s: Optional[float] = None) -> Dict[str, Any]:
    """Time ``iterations`` training steps of ``experiment`` after ``warmup`` untimed ones; with the
    device's ``flops_per_s``, also the step's arithmetic floor (:func:`step_floor`)."""
    from monoflow.blocks import solver_stats
    from monoflow.lipschitz import set_learnable_concat

    config = experiment.config
    device = torch.device(device)
    torch.manual_seed(config.seed)
    model = experiment.build_model().to(device)
    set_learnable_concat(model, True)
    model.train()
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    scratch = {phase: 0.0 for phase in TIMED_PHASES}
    for step in range(warmup):
        training_step(experiment, model, optimizer, generator, device, step, scratch)
    _synchronize(device)
    timers = {phase: 0.0 for phase in TIMED_PHASES}
    profiler = cProfile.Profile() if profile else None
    start, cpu_start = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for step in range(warmup, warmup + iterations):
        training_step(experiment, model, optimizer, generator, device, step, timers)
    _synchronize(device)
    if profiler:
        profiler.disable()
    total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    # a second, shorter pass splits the phases further (the wrappers add a little overhead)
    parts: Dict[str, float] = {}
    sub_iterations = max(1, iterations // 2)
    with sub_phase_timers(parts):
        for step in range(warmup + iterations, warmup + iterations + sub_iterations):
            training_step(experiment, model, optimizer, generator, device, step, scratch)
    result = {
        "model": config.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": config.batch_size,
        "iterations_timed": iterations,
        "per_iteration_s": total / iterations,
        # CPU seconds of this process (all its threads): on a busy machine the fairer number;
        # with one thread it approximates the wall time on an idle core.
        "cpu_per_iteration_s": cpu_total / iterations,
        "breakdown_s": {phase: timers[phase] / iterations for phase in TIMED_PHASES},
        # parts of the phases above: solves and log-det within "forward", adjoint within "backward"
        "sub_phases_s": {name: value / sub_iterations for name, value in parts.items()},
        "solver_last_step": summarize_solver(solver_stats(model), kinds=("forward", "adjoint")),
    }
    if profiler:
        result["profile_top_tottime"] = _profile_summary(profiler)
    if count_ops:
        steps = iter(range(warmup + iterations + sub_iterations, 10 ** 9))
        result["operators"] = count_operators(
            lambda: training_step(experiment, model, optimizer, generator, device, next(steps), scratch))
        result["operators"]["wall_s_per_operator"] = result["per_iteration_s"] / result["operators"]["operators_per_iteration"]
    if flops_per_s:
        batch = experiment.sample_batch(generator, device)
        result["floor"] = step_floor(experiment, model, optimizer, batch, result["per_iteration_s"], flops_per_s)
    return result


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations per model (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch thread counts to measure (default: torch's current)")
    parser.add_argument("--toy-models", nargs="*", choices=TOY_MODELS, default=list(TOY_MODELS))
    parser.add_argument("--regression-models", nargs="*", choices=REGRESSION_MODELS, default=list(REGRESSION_MODELS))
    parser.add_argument("--regression-iterations", type=int, default=None,
                        help="timed iterations of the 1-D models (default: --iterations)")
    parser.add_argument("--profile", action="store_true", help="add a cProfile summary per model")
    parser.add_argument("--count-ops", action="store_true",
                        help="add the number of torch operators per iteration (torch.profiler, 3 more iterations)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "toy_speed.json")
    args = parser.parse_args(argv)
    retain_freed_memory()  # as the training loop does (monoflow.allocator)

    report = benchmark_report("cpu", machine=platform.processor() or platform.machine(),
                              targets_s_per_iteration={"toy2d": TOY_TARGET_S, "regression1d": REGRESSION_TARGET_S})
    jobs = [("toy2d", model) for model in args.toy_models] + [("regression1d", model) for model in args.regression_models]
    bar = tqdm(total=len(jobs) * len(args.threads), desc="benchmark")
    for threads in args.threads:
        torch.set_num_threads(threads)
        flops_per_s = matmul_flops_per_second("cpu", repeats=20)  # these threads, this process; best of 20 on a busy machine
        report.setdefault("matmul_flops_per_s", {})[str(threads)] = flops_per_s
        for experiment_name, model in jobs:
            if experiment_name == "toy2d":
                experiment = ToyExperiment(toy_config("paper", model=model, dataset="8gaussians"))
                iterations, target = args.iterations, TOY_TARGET_S
            else:
                experiment = RegressionExperiment(regression_config("paper", model=model))
                iterations, target = args.regression_iterations or args.iterations, REGRESSION_TARGET_S
            result = measure(experiment, iterations, args.warmup, args.profile, count_ops=args.count_ops,
                             flops_per_s=flops_per_s)
            result.update(experiment=experiment_name, threads=threads, target_s=target,
                          meets_target=result["per_iteration_s"] < target,
                          projected_run_minutes=result["per_iteration_s"] * experiment.config.iterations / 60)
            report["runs"].append(result)
            bar.write(
                f"{experiment_name:12s} {model:17s} threads={threads} {1000 * result['per_iteration_s']:8.1f} ms/it "
                f"(cpu {1000 * result['cpu_per_iteration_s']:.1f}) "
                + " ".join(f"{k}={1000 * v:.1f}" for k, v in result["breakdown_s"].items())
                + " [" + ", ".join(f"{k}={1000 * v:.1f}" for k, v in result["sub_phases_s"].items()) + "]"
                + f"  (target {1000 * target:.0f} ms, full run {result['projected_run_minutes']:.1f} min)"
                + f"; floor {1e3 * result['floor']['floor_s']:.2f} ms ({result['floor']['step_flops'] / 1e6:.0f} MFLOP), "
                f"x{result['floor']['times_above_floor']:.0f} above it"
            )
            bar.update(1)
            save_benchmark_report(report, args.output)
    bar.close()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
