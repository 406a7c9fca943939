"""Training-step time of this checkout against a baseline commit, measured side by side.

Speed-ups are ratios measured in one run: for each case (a paper-scale toy or 1-D model, eager or
with ``--compile``), two worker processes train the same run, one importing ``monoflow`` from this
checkout and one from the baseline commit (exported with ``git archive`` into a cache folder).
They take turns: round after round, each trains ``--steps`` iterations while the other waits, so
both see the same machine load. Each worker trains exactly as ``monoflow.experiments.train``
does (``training_step``: batch, loss, backward, Adam and power iterations, learnable
concatenation on), from the same seed, so the two also report the same losses up to rounding:
the JSON keeps the largest difference as the check that the math did not change.

Reported per case: the median seconds per step of each side over the timed rounds (the first
round, which includes compiling, is not timed), their ratio (``speedup`` = baseline / current),
each side's compile seconds, and the loss check.

Compiled cases compile into a fresh, empty ``TORCHINDUCTOR_CACHE_DIR`` that both sides share
(``--compile-cache fresh``, the default), as on a new machine: graphs loaded from a cache that
other runs had filled measured slower than the same graphs compiled afresh (compiled
i-DenseNet, 2026-12-07: 20.1 ms per step from the machine's cache, 15.1 ms from a fresh one, the
baseline 15.5 and 15.6; the cause is not established), which made a side's time depend on what
its cache held. ``--compile-cache machine`` uses the machine's cache instead.

Usage::

    python benchmarks/speed_vs_baseline.py                                   # default cases, baseline 623a4ed
    python benchmarks/speed_vs_baseline.py --cases toy:monotone:compiled --rounds 10
    python benchmarks/speed_vs_baseline.py --baseline HEAD~3 --output /tmp/speed.json

Cases are ``toy:<model>[:compiled]`` (Table 1's 2-D models, 8gaussians), ``regression:<model>``
(Figure 4's 1-D models) and ``image:<model>`` (training steps of the ``mnist5k-cpu`` preset, e.g.
``image:monotone``; against baselines that have the image runs, e.g. ``--baseline a8dff60``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "623a4ed"  # the implementation before the speed work of issue #22
DEFAULT_CASES = ["toy:monotone", "toy:idensenet", "toy:resflow", "regression:monotone_actnorm",
                 "toy:monotone:compiled", "toy:idensenet:compiled", "toy:resflow:compiled"]


def export_baseline(revision: str) -> Path:
    """The ``monoflow`` package of ``revision``, exported once into ``~/.cache/monoflow/baselines``."""
    commit = subprocess.run(["git", "rev-parse", revision], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "monoflow" / "baselines" / commit
    if not (folder / "monoflow" / "__init__.py").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as archive:
            subprocess.run(["git", "archive", "--format=tar", commit, "monoflow"], cwd=ROOT, check=True,
                           stdout=archive)
            archive.seek(0)
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(folder, filter="data")
    return folder


# ---------------------------------------------------------------- the worker (one per side)

def _worker(case: str, threads: int, cpus: List[int]) -> None:
    """One side of ``case`` (:func:`_serve`)."""
    import torch

    import monoflow
    from monoflow.experiments.config import regression_config, toy_config
    from monoflow.experiments.regression1d import RegressionExperiment
    from monoflow.experiments.toy2d import ToyExperiment
    from monoflow.experiments.train import TIMED_PHASES, make_optimizer, training_step
    from monoflow.lipschitz import set_learnable_concat

    torch.set_num_threads(threads)
    try:  # as the training commands do (the baseline predates monoflow.allocator)
        from monoflow.allocator import retain_freed_memory
    except ImportError:
        pass
    else:
        retain_freed_memory()
    if cpus:  # both sides on the same cores: neither gets a quieter core than the other
        os.sched_setaffinity(0, cpus)
    kind, model_name, *mode = case.split(":")
    if kind == "image":
        _image_worker(model_name)
        return
    if kind == "toy":
        config = toy_config("paper", model=model_name, dataset="8gaussians", seed=0)
        experiment: Any = ToyExperiment(config, compile=mode == ["compiled"])
    else:
        config = regression_config("paper", model=model_name, seed=0)
        experiment = RegressionExperiment(config)
    torch.manual_seed(config.seed)
    model = experiment.build_model()
    set_learnable_concat(model, True)
    model.train()
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    timers = {phase: 0.0 for phase in TIMED_PHASES}
    _serve(monoflow, lambda step: training_step(experiment, model, optimizer, generator, torch.device("cpu"), step, timers))


def _serve(monoflow: Any, train_step: Any) -> None:
    """Say which ``monoflow`` was imported, then for each line ``<steps>`` on stdin train that many
    steps (``train_step(step)`` returns the loss) and answer their seconds and losses in one JSON line."""
    step = 0
    print(json.dumps({"ready": True, "monoflow": str(Path(monoflow.__file__).parent)}), flush=True)
    for line in sys.stdin:
        count = int(line)
        losses = []
        tick = time.perf_counter()
        for _ in range(count):
            losses.append(float(train_step(step)))
            step += 1
        print(json.dumps({"seconds": time.perf_counter() - tick, "losses": losses}), flush=True)


def _image_worker(model_name: str) -> None:
    """The worker of an ``image:<model>`` case: training steps of the ``mnist5k-cpu`` preset with
    ``model``, as ``monoflow images train`` takes them (``_ImageRun.train_step``: the whole batch with
    its accumulation, clipping, Adam, power iterations, EMA), from seed 0, in a scratch run folder.
    The baseline must have the same run object (commits since the image benchmarks of issue #19)."""
    import torch

    import monoflow
    from monoflow.images.training import _ImageRun

    with tempfile.TemporaryDirectory(prefix="monoflow_speed_image_") as folder:
        run = _ImageRun("mnist5k-cpu", model=model_name, data_root=None, results_dir=folder, seed=0, iterations=None,
                        device="cpu", allow_tf32=False, model_overrides=None, training_overrides=None,
                        train_data=None, test_data=None, eval_limit=0, run_dir=folder, final_evaluation=False)
        run.checkpoint = None
        run.prepare()
        _serve(monoflow, run.train_step)


class _Side:
    def __init__(self, case: str, package_root: Path, threads: int, cpus: List[int]) -> None:
        env = dict(os.environ, PYTHONPATH=str(package_root))
        pinning = ["--cpus", *map(str, cpus)] if cpus else []
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", case, "--threads", str(threads), *pinning],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = json.loads(self._line())
        if Path(hello["monoflow"]).resolve() != (package_root / "monoflow").resolve():
            raise RuntimeError(f"the worker imported monoflow from {hello['monoflow']}, not from {package_root}")
        self.losses: List[float] = []

    def _line(self) -> str:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("a benchmark worker stopped; see its output above")
        return line

    def train(self, steps: int) -> float:
        self.process.stdin.write(f"{steps}\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        answer = json.loads(self._line())
        self.losses += answer["losses"]
        return answer["seconds"] / steps

    def close(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=60)


def compare(case: str, baseline_root: Path, rounds: int, steps: int, threads: int, cpus: List[int]) -> Dict[str, Any]:
    """Alternating rounds of the two sides; the first round (compiling, warm-up) is not timed."""
    sides = {"baseline": _Side(case, baseline_root, threads, cpus), "current": _Side(case, ROOT, threads, cpus)}
    try:
        first = {name: side.train(steps) * steps for name, side in sides.items()}
        times: Dict[str, List[float]] = {name: [] for name in sides}
        for round_index in range(rounds):
            order = list(sides.items()) if round_index % 2 == 0 else list(reversed(sides.items()))
            for name, side in order:
                times[name].append(side.train(steps))
    finally:
        for side in sides.values():
            side.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    pairs = list(zip(sides["baseline"].losses, sides["current"].losses))
    return {
        "case": case, "steps_per_round": steps, "timed_rounds": rounds,
        "baseline_s_per_step": medians["baseline"], "current_s_per_step": medians["current"],
        "speedup": medians["baseline"] / medians["current"],
        "rounds_s_per_step": times,
        "first_round_s": first,
        "losses_compared": len(pairs),
        "largest_loss_difference": max(abs(a - b) for a, b in pairs),
        "final_losses": {"baseline": pairs[-1][0], "current": pairs[-1][1]},
    }


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"git revision to compare with (default {DEFAULT_BASELINE})")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per side")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: 20 toy, 4 regression, 2 image)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "speed_vs_baseline.json")
    parser.add_argument("--cpus", type=int, nargs="+", default=[],
                        help="pin both workers to these CPU cores (e.g. the one that no other job uses)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other cases of an existing report at --output (same baseline); replace these")
    parser.add_argument("--compile-cache", choices=("fresh", "machine"), default="fresh",
                        help="compiled cases: a fresh cache folder shared by both sides (default), or the machine's")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.threads, args.cpus)
        return 0
    for case in args.cases:
        parts = case.split(":")
        if parts[0] not in ("toy", "regression", "image") or len(parts) not in (2, 3) \
                or parts[2:] not in ([], ["compiled"]) or (parts[0] == "image" and len(parts) != 2):
            parser.error(f"unknown case {case!r}: use toy:<model>[:compiled], regression:<model> or image:<model>")

    sys.path.insert(0, str(ROOT))
    from monoflow.provenance import benchmark_report, save_benchmark_report

    import torch

    torch.set_num_threads(args.threads)  # the workers' threads, as provenance records them
    baseline_root = export_baseline(args.baseline)
    report = benchmark_report("cpu")
    report["pinned_cpus"] = args.cpus
    report["baseline"] = subprocess.run(["git", "rev-parse", args.baseline], cwd=ROOT, check=True,
                                        capture_output=True, text=True).stdout.strip()
    if args.update and args.output.is_file():
        earlier = json.loads(args.output.read_text())
        if earlier.get("baseline") != report["baseline"]:
            parser.error(f"{args.output} compares with another baseline ({earlier.get('baseline')}); use another --output")
        report["runs"] = [run for run in earlier["runs"] if run["case"] not in args.cases]
    for case in args.cases:
        steps = args.steps or {"regression": 4, "image": 2}.get(case.split(":")[0], 20)
        compiled = case.endswith(":compiled")
        previous_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        with tempfile.TemporaryDirectory(prefix="monoflow_compile_cache_") as fresh_cache:
            if compiled and args.compile_cache == "fresh":
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache  # the workers inherit it
            try:
                row = compare(case, baseline_root, args.rounds, steps, args.threads, args.cpus)
            finally:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                if previous_cache is not None:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous_cache
        row["measured"] = {"created": report["provenance"]["created"], "commit": report["provenance"]["git_commit"],
                           "load_average_at_start": report["load_average_at_start"], "pinned_cpus": args.cpus,
                           "compile_cache": args.compile_cache if compiled else None}
        report["runs"].append(row)
        print(f"{case:28s} baseline {1000 * row['baseline_s_per_step']:8.1f} ms  current "
              f"{1000 * row['current_s_per_step']:8.1f} ms  x{row['speedup']:.2f}  "
              f"(largest loss difference {row['largest_loss_difference']:.2e})", flush=True)
        save_benchmark_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
