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
   target;
4. beside each time, the step's arithmetic floor (``eager_floor``, ``compiled_floor``): the FLOPs
   of the matrix products of one training step (:mod:`monoflow.flop_count`) at the float32
   matrix-multiply throughput measured in this process, and how many times that the step takes.
   A dispatch mode makes a compiled function run eagerly, so the compiled step is counted as its
   eager equivalent: ``monoflow.compiled._flow_loss`` (the same Newton steps, without compile),
   its backward, Adam and the power iterations.

``--compile-cache`` measures instead what compiling costs a second run on the same machine: two
fresh processes, one after the other, sharing one empty ``TORCHINDUCTOR_CACHE_DIR``, each compile
the Monotone Flow toy loss and update and train a few iterations; it reports each one's compile
seconds, cache hits and where the time went (``torch._dynamo.utils.compilation_time_metrics``).

Usage::

    python benchmarks/compiled_loss_speed.py     # writes benchmarks/results/compiled_loss_speed.json
    python benchmarks/compiled_loss_speed.py --models monotone --repeats 10 --threads 2
    python benchmarks/compiled_loss_speed.py --compile-cache   # writes benchmarks/results/compile_cache.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_speed import KERNELS_LABEL, kernel_timers, step_floor  # noqa: E402

from monoflow.compiled import _flow_loss  # noqa: E402
from monoflow.experiments.config import toy_config  # noqa: E402
from monoflow.experiments.toy2d import COMPILABLE_MODELS, ToyExperiment  # noqa: E402
from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step  # noqa: E402
from monoflow.flop_count import matmul_flops_per_second  # noqa: E402
from monoflow.lipschitz import set_learnable_concat  # noqa: E402
from monoflow.provenance import benchmark_report, compare_timings, run_benchmark, save_benchmark_report  # noqa: E402

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


def _start_training(experiment: Any, learnable_concat: bool) -> tuple:
    """``(model, optimizer, generator, timers)`` of a run of ``experiment`` (2-D or 1-D) at iteration 0."""
    config = experiment.config
    torch.manual_seed(config.seed)
    model = experiment.build_model()
    set_learnable_concat(model, learnable_concat)
    model.train()
    return (model, make_optimizer(model, config), torch.Generator().manual_seed(config.seed),
            {phase: 0.0 for phase in TIMED_PHASES})


def measure(model_name: str, repeats: int, calls: int, flops_per_s: float) -> Dict[str, Any]:
    config = toy_config("paper", model=model_name, dataset="8gaussians")
    eager, compiled = ToyExperiment(config), ToyExperiment(config, compile=True)
    model, optimizer, generator, timers = _start_training(eager, learnable_concat=True)
    steps = iter(range(10 ** 9))
    for _ in range(20):
        training_step(eager, model, optimizer, generator, "cpu", next(steps), timers)

    batch = eager.sample_batch(generator, torch.device("cpu"))
    before, tick = _cache_counters(), time.perf_counter()
    compiled.loss(model, batch)
    compile_s = time.perf_counter() - tick
    cache = {name: count - before.get(name, 0) for name, count in _cache_counters().items()}
    check = compare_gradients(model, eager, compiled, batch)

    times: Dict[str, List[float]] = {"eager": [], "compiled": []}
    experiments = {"eager": eager, "compiled": compiled}

    def seconds_per_step(experiment: ToyExperiment, count: int) -> float:
        tick = time.perf_counter()
        for _ in range(count):
            training_step(experiment, model, optimizer, generator, "cpu", next(steps), timers)
        return (time.perf_counter() - tick) / count

    for experiment in experiments.values():  # warm-up
        seconds_per_step(experiment, 3)
    for _ in range(repeats):
        for name, experiment in experiments.items():
            times[name].append(seconds_per_step(experiment, calls))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    in_kernels = {}  # a few more steps of each: the time inside the fused C kernels, and the steps' own time
    for name, experiment in experiments.items():
        spent: Dict[str, float] = {}
        with kernel_timers(spent):
            step_s = seconds_per_step(experiment, calls)
        in_kernels[name] = {"kernel_s_per_step": spent[KERNELS_LABEL] / calls, "s_per_step": step_s,
                            "share": spent[KERNELS_LABEL] / calls / step_s}
    loss_fn = compiled._compiled_loss
    batch = eager.sample_batch(generator, torch.device("cpu"))
    eager_floor = step_floor(eager, model, optimizer, batch, eager_s, flops_per_s)
    compiled_floor = step_floor(compiled, model, optimizer, batch, compiled_s, flops_per_s,
                                loss=lambda: _flow_loss(model, batch, loss_fn.newton_steps)[0])
    compiled_floor["counted"] = ("the eager equivalent: monoflow.compiled._flow_loss without torch.compile, its "
                                 "backward, Adam and the power iterations (a dispatch mode makes a compiled "
                                 "function run eagerly, and inductor's kernels are not dispatched one by one)")
    return {
        "model": model_name,
        "setting": "paper architecture, 8gaussians, batch 500, learnable concatenation on",
        "newton_steps": loss_fn.newton_steps,
        # the loss compiled above, and the update (Adam + power iterations) at its first warm-up step
        "compile_s_loss": compile_s, "compile_s_update": compiled._compiled_update.compile_s,
        "compile_s": compile_s + compiled._compiled_update.compile_s,
        "compile_cache": cache,  # of this compile; hits: graphs the machine's compile cache already held
        "check": check,
        **compare_timings("eager", eager_s, "compiled", compiled_s, config.iterations, TARGET_MINUTES),
        # seconds per step inside monoflow.kernels' C functions (the rest: graph calls, dispatch, autograd,
        # Python wrappers, the update), measured over separate steps with the timer on
        "in_fused_kernels": in_kernels,
        "batches": loss_fn.batches,
        "eager_fallbacks": loss_fn.fallbacks,
        "eager_floor": eager_floor,
        "compiled_floor": compiled_floor,
    }


def _cache_counters() -> Dict[str, int]:
    """This process's compile-cache lookups so far: hits and misses of Inductor's FX graph cache and
    of AOTAutograd's cache."""
    from torch._dynamo.utils import counters

    return {name: count for group, prefix in (("inductor", "fxgraph_cache_"), ("aot_autograd", "autograd_cache_"))
            for name, count in counters[group].items() if name.startswith(prefix)}


def _cache_files(folder: Path) -> Dict[str, Any]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {"files": len(files), "megabytes": sum(path.stat().st_size for path in files) / 2**20}


def compile_probe(iterations: int) -> Dict[str, Any]:
    """In this (fresh) process: what a ``--compile`` run of the paper's 2-D Monotone Flow pays before
    its first iteration finishes, and where that time went."""
    import logging

    from torch._dynamo.utils import compilation_time_metrics

    bypasses: List[str] = []  # why AOTAutograd did not cache a graph (it then traces it again in every process)

    class _Bypasses(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Bypassing autograd cache" in record.getMessage():
                bypasses.append(" ".join(record.getMessage().split()))

    cache_log = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
    cache_log.setLevel(logging.INFO)
    cache_log.addHandler(_Bypasses())
    start = time.perf_counter()
    experiment = ToyExperiment(toy_config("paper", model="monotone", dataset="8gaussians"), compile=True)
    model, optimizer, generator, timers = _start_training(experiment, learnable_concat=False)  # as a run starts
    training_step(experiment, model, optimizer, generator, "cpu", 0, timers)
    first = time.perf_counter() - start
    tick = time.perf_counter()
    for step in range(1, iterations + 1):
        training_step(experiment, model, optimizer, generator, "cpu", step, timers)
    loss, update = experiment._compiled_loss, experiment._compiled_update
    metrics = {name: sum(values) for name, values in compilation_time_metrics.items()}
    return {
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "seconds_to_first_iteration": first,
        "compile_s_loss": loss.compile_s, "compile_s_update": update.compile_s,
        "compile_s": loss.compile_s + update.compile_s,
        "s_per_iteration_after": (time.perf_counter() - tick) / iterations,
        "compile_cache": _cache_counters(),
        "autograd_cache_bypass_reasons": bypasses,
        "autograd_cache_allow_custom_autograd_functions":
            torch._functorch.config.autograd_cache_allow_custom_autograd_functions,
        # dynamo_timed sections, summed over graphs: _compile.compile_inner is dynamo's whole compile
        # of a frame, OutputGraph.call_user_compiler the backend's part of it (AOTAutograd and inductor,
        # or their cache lookups); the difference is dynamo tracing the Python code
        "compilation_time_metrics_s": metrics,
        "dynamo_tracing_s": metrics.get("_compile.compile_inner", 0.0) - metrics.get("OutputGraph.call_user_compiler", 0.0),
        "backend_s": metrics.get("OutputGraph.call_user_compiler", 0.0),
    }


def compile_cache(threads: int, iterations: int, output: Path, custom_autograd: bool = False) -> Dict[str, Any]:
    """Two fresh processes, one after the other, sharing one empty ``TORCHINDUCTOR_CACHE_DIR``: each
    runs :func:`compile_probe`; the second should find the first one's compiled graphs. With
    ``custom_autograd``, AOTAutograd may also cache graphs that hold custom autograd Functions
    (``TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD=1``; torch's default is not to)."""
    report = benchmark_report("cpu", threads=threads, iterations_after_first=iterations,
                              autograd_cache_allow_custom_autograd_functions=custom_autograd,
                              what="compile seconds of a --compile Monotone Flow toy run (paper architecture, "
                                   "8gaussians, batch 500) in a first and a second fresh process sharing one "
                                   "initially empty TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="monoflow-compile-cache-") as folder:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": folder}
        if custom_autograd:
            env["TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD"] = "1"
        for process in ("first", "second"):
            tick = time.perf_counter()
            completed = subprocess.run([sys.executable, __file__, "--compile-probe", "--threads", str(threads),
                                        "--probe-iterations", str(iterations)],
                                       env=env, capture_output=True, text=True, check=True)
            row = {"process": process, "process_wall_s": time.perf_counter() - tick,
                   **json.loads(completed.stdout.strip().splitlines()[-1]), "cache_after": _cache_files(Path(folder))}
            report["runs"].append(row)
            print(f"{process} process: compile {row['compile_s']:.1f} s (loss {row['compile_s_loss']:.1f}, update "
                  f"{row['compile_s_update']:.1f}; dynamo tracing {row['dynamo_tracing_s']:.1f}, backend "
                  f"{row['backend_s']:.1f}), first iteration done after {row['seconds_to_first_iteration']:.1f} s, "
                  f"process {row['process_wall_s']:.1f} s", flush=True)
            save_benchmark_report(report, output)
    first, second = (row["compile_s"] for row in report["runs"])
    report["second_over_first"] = second / first
    save_benchmark_report(report, output)
    print(f"wrote {output}")
    return report


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=COMPILABLE_MODELS, default=list(COMPILABLE_MODELS))
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the two losses (default 5)")
    parser.add_argument("--calls", type=int, default=5, help="iterations per alternation (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/compiled_loss_speed.json (compile_cache.json with --compile-cache)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="compile seconds of a first and a second fresh process sharing one cache folder")
    parser.add_argument("--probe-iterations", type=int, default=3, help="iterations after the first (--compile-cache)")
    parser.add_argument("--allow-custom-autograd-cache", action="store_true",
                        help="with --compile-cache: let AOTAutograd cache graphs with custom autograd Functions")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)  # one process of --compile-cache
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Path(__file__).parent / "results"
    if args.compile_probe:
        print(json.dumps(compile_probe(args.probe_iterations)))
        return 0
    if args.compile_cache:
        default = "compile_cache_custom_autograd.json" if args.allow_custom_autograd_cache else "compile_cache.json"
        compile_cache(args.threads, args.probe_iterations, args.output or results / default,
                      args.allow_custom_autograd_cache)
        return 0
    flops_per_s = matmul_flops_per_second("cpu", repeats=20)  # this process, these threads; best of 20 on a busy machine
    report = benchmark_report("cpu", threads=args.threads, matmul_flops_per_s=flops_per_s)

    def describe(row: Dict[str, Any]) -> str:
        return (f"{row['model']}: eager {1000 * row['eager_s_per_iteration']:.1f} ms, compiled "
                f"{1000 * row['compiled_s_per_iteration']:.1f} ms per iteration (x{row['speedup']:.2f}); "
                f"paper-scale run {row['projected_run_minutes_compiled']:.0f} min against {TARGET_MINUTES:.0f}; "
                f"compile {row['compile_s']:.0f} s; gradient difference "
                f"{row['check']['largest_relative_gradient_difference']:.1e}; floor eager "
                f"{1000 * row['eager_floor']['floor_s']:.2f} ms (x{row['eager_floor']['times_above_floor']:.0f}), "
                f"compiled {1000 * row['compiled_floor']['floor_s']:.2f} ms "
                f"(x{row['compiled_floor']['times_above_floor']:.0f}); in fused kernels: "
                + ", ".join(f"{kind} {1000 * k['kernel_s_per_step']:.1f} ms ({k['share']:.0%})"
                            for kind, k in row["in_fused_kernels"].items()))

    run_benchmark(report, args.models, lambda name: measure(name, args.repeats, args.calls, flops_per_s), describe,
                  args.output or results / "compiled_loss_speed.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
