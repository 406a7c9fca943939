"""How many Newton steps the compiled toy loss needs: residuals along a whole paper-scale run.

The compiled loss (``monoflow.compiled``) solves each monotone block by ``newton_steps`` Newton
steps from w = b and one differentiable step, and checks every sample's residual
``|w + g(w) - b| <= atol sqrt(d) + rtol |w|`` (a batch that misses it is recomputed eagerly). This
benchmark trains the paper's toy Monotone Flow with ``--compile`` (the default Newton steps,
``DEFAULT_NEWTON_STEPS``) through the ordinary training loop, and every ``--every`` iterations
evaluates the same loss on that iteration's batch with 1, 2 and 3 Newton steps (eagerly, without
gradients), recording for each the share of samples that miss the tolerance, the largest
residual and the loss. At the end it records the run's test NLL and eager fallbacks beside the
committed Table 1 runs of the same data set (which trained with 3 or 4 steps).

Usage::

    python benchmarks/newton_steps.py            # checkerboard, 50,000 iterations, ~25 min on a core
    python benchmarks/newton_steps.py --datasets 2spirals --every 5000

The committed ``benchmarks/results/newton_steps.json`` trained with 2 steps (the default then being
tried) and was stopped at iteration 22,500, once 2 steps had begun to miss the tolerance: the
default stayed at 3.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from monoflow.compiled import DEFAULT_NEWTON_STEPS, _flow_loss  # noqa: E402
from monoflow.experiments.config import toy_config  # noqa: E402
from monoflow.experiments.toy2d import ToyExperiment  # noqa: E402
from monoflow.experiments.train import train  # noqa: E402
from monoflow.provenance import benchmark_report, save_benchmark_report  # noqa: E402
from monoflow.solvers import default_tolerances  # noqa: E402

CHECKED_STEPS = (1, 2, 3)
RESULTS = Path(__file__).resolve().parent.parent / "results" / "toy2d" / "paper" / "monotone"


class _CheckedExperiment(ToyExperiment):
    """The compiled toy experiment; every ``every``-th training batch is also solved with each of
    :data:`CHECKED_STEPS` Newton steps and its residuals recorded in ``checks``."""

    def __init__(self, config, every: int, on_check) -> None:
        super().__init__(config, compile=True)
        self.every, self.on_check = every, on_check
        self.calls = 0
        self.checks: List[Dict[str, Any]] = []

    def loss(self, model, batch):
        self.calls += 1
        if self.calls % self.every == 0:
            self.checks.append(self._check(model, batch))
            self.on_check()
        return super().loss(model, batch)

    def _check(self, model, batch) -> Dict[str, Any]:
        atol, rtol = default_tolerances(batch.dtype)
        row: Dict[str, Any] = {"iteration": self.calls}
        with torch.no_grad():
            for steps in CHECKED_STEPS:
                loss, residuals, norms = _flow_loss(model, batch, steps)
                residual, norm = torch.stack(residuals), torch.stack(norms)
                missed = ~(residual <= atol * math.sqrt(batch.shape[1]) + rtol * norm)
                row[f"steps_{steps}"] = {"share_missing_tolerance": missed.double().mean().item(),
                                         "batch_passes": not bool(missed.any()),
                                         "largest_residual": residual.max().item(), "loss": loss.item()}
        return row


def _table1_runs(dataset: str) -> List[Dict[str, Any]]:
    rows = []
    for path in sorted(RESULTS.glob(f"{dataset}/seed*/run.json")):
        record = json.loads(path.read_text())
        compiled = record.get("compiled_loss") or {}
        rows.append({"run": str(path.relative_to(RESULTS.parents[3])), "test_nll": record["final_metric"],
                     "newton_steps": compiled.get("newton_steps")})
    return rows


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["checkerboard"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=None, help="default: the paper's (50,000)")
    parser.add_argument("--every", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "newton_steps.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = benchmark_report("cpu", newton_steps_trained=DEFAULT_NEWTON_STEPS, checked_steps=list(CHECKED_STEPS),
                              every=args.every, seed=args.seed)
    for dataset in args.datasets:
        overrides = {} if args.iterations is None else {"iterations": args.iterations}
        config = toy_config("paper", model="monotone", dataset=dataset, seed=args.seed, **overrides)
        row: Dict[str, Any] = {"dataset": dataset, "iterations": config.iterations, "checks": []}
        report["runs"].append(row)

        def save() -> None:
            row["checks"] = experiment.checks
            save_benchmark_report(report, args.output)

        experiment = _CheckedExperiment(config, args.every, save)
        with tempfile.TemporaryDirectory() as folder:
            record = train(experiment, folder, progress=True)
        compiled = record.get("compiled_loss", {})
        row.update({"test_nll": record["final_metric"], "compiled_loss": compiled,
                    "table1_runs": _table1_runs(dataset), "timing": record.get("timing")})
        save()
        worst = {steps: max(c[f"steps_{steps}"]["share_missing_tolerance"] for c in experiment.checks)
                 for steps in CHECKED_STEPS} if experiment.checks else {}
        print(f"{dataset}: test NLL {row['test_nll']}, eager fallbacks {compiled.get('eager_fallbacks_last_session')}, "
              f"largest share missing the tolerance per Newton steps {worst}", flush=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
