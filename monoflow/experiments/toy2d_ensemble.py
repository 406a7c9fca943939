r"""Several 2-D toy runs trained together as one batched model (:mod:`monoflow.ensemble`).

Each member is an ordinary run of :mod:`monoflow.experiments.toy2d`: the same initialisation
(global seeds set to the member's seed before its model is built), the same training, test and
figure random streams (derived from the member's seed), the same tests and figure. Only the
training step is shared: one forward and backward pass on the members' stacked batches, with
the loss :math:`\sum_e \mathcal{L}_e` (members share no parameters, so each gets the gradient of
its own loss). Results differ from separate runs by floating-point rounding only.

Layout: the ensemble's checkpoint, log and run.json sit in
``<output>/ensembles/toy2d/<preset>/<model>/<E>runs-<hash>/``; when it finishes, every member gets
its ordinary run folder ``<output>/toy2d/<preset>/<model>/<dataset>/seed<k>/`` (run.json with an
``ensemble`` entry, figure, checkpoint), which the tables read like any other run. While it
trains, each member's folder receives its test lines in ``train.log``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from monoflow.checkpoint import save_checkpoint
from monoflow.ensemble import split_members, stack_flows
from monoflow.experiments.config import ToyConfig, ToyEnsembleConfig, config_to_dict
from monoflow.experiments.results import (
    CHECKPOINT_NAME,
    LOG_NAME,
    RUN_NAME,
    load_run,
    run_directory,
    to_jsonable,
    write_run,
)
from monoflow.experiments.toy2d import ToyExperiment, build_toy_model, toy_test
from monoflow.experiments.train import (
    RunLog, RunState, derived_seed, non_finite_parameters, run_record, set_seeds, test_log_line, train,
)

__all__ = ["ToyEnsembleExperiment", "ensemble_directory", "pending_members", "run_toy_ensemble"]

_STREAMS = ("train", "test", "figure")


def ensemble_directory(config: ToyEnsembleConfig, output_dir: Union[str, Path] = "results") -> Path:
    """``<output>/ensembles/toy2d/<preset>/<model>/<E>runs-<hash of the members>``."""
    names = ",".join(f"{m.dataset}:{m.seed}" for m in config.members)
    digest = hashlib.sha1(names.encode()).hexdigest()[:10]
    return (Path(output_dir) / "ensembles" / "toy2d" / config.preset / config.model
            / f"{len(config.members)}runs-{digest}")


def pending_members(configs: Sequence[ToyConfig], output_dir: Union[str, Path] = "results") -> List[ToyConfig]:
    """The runs among ``configs`` still to train together: not finished, and not started on
    their own (a run folder with a checkpoint resumes alone, with ``run_toy``)."""
    pending = []
    for config in configs:
        folder = run_directory(config, output_dir)
        if (folder / RUN_NAME).is_file() and load_run(folder).get("status") == "finished":
            continue
        if (folder / CHECKPOINT_NAME).is_file():
            continue
        pending.append(config)
    return pending


class ToyEnsembleExperiment:
    """The members of a :class:`ToyEnsembleConfig` as one experiment for
    :func:`monoflow.experiments.train.train`."""

    metric_name = "nll_nats"

    def __init__(self, config: ToyEnsembleConfig, output_dir: Union[str, Path] = "results") -> None:
        if not isinstance(config, ToyEnsembleConfig):
            raise ValueError(f"ToyEnsembleExperiment needs a ToyEnsembleConfig, got {type(config).__name__}")
        self.config = config
        self.output_dir = Path(output_dir)
        self.members = [ToyExperiment(member) for member in config.members]
        self.member_dirs = [run_directory(member, output_dir) for member in config.members]
        self.streams = {
            f"member{index}_{stream}": torch.Generator().manual_seed(derived_seed(member.seed, stream))
            for index, member in enumerate(config.members) for stream in _STREAMS
        }
        self.flows: List[nn.Module] = []
        self.last_losses: Optional[Tensor] = None

    @property
    def size(self) -> int:
        return len(self.members)

    def _stream(self, index: int, stream: str) -> torch.Generator:
        return self.streams[f"member{index}_{stream}"]

    def random_streams(self) -> Dict[str, torch.Generator]:
        return dict(self.streams)

    def _relative(self, folder: Path) -> str:
        """``folder`` relative to the output folder (records stay valid when it moves)."""
        try:
            return str(Path(folder).relative_to(self.output_dir))
        except ValueError:
            return str(folder)

    def _member_log(self, index: int, message: str) -> None:
        self.member_dirs[index].mkdir(parents=True, exist_ok=True)
        RunLog(self.member_dirs[index] / LOG_NAME)(message)

    def build_model(self) -> nn.Module:
        """Each member's flow built after seeding with its own seed (as its own run would be),
        stacked into one flow on (E*B, 2) rows."""
        self.flows = []
        for member in self.config.members:
            set_seeds(member.seed)
            self.flows.append(build_toy_model(member))
        return stack_flows(self.flows)

    def sample_batch(self, generator: torch.Generator, device: torch.device) -> Tensor:
        return torch.cat([member.sample_batch(self._stream(index, "train"), device)
                          for index, member in enumerate(self.members)])

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        """Sum over members of each member's mean NLL."""
        losses = -split_members(model.log_prob(batch), self.size).mean(dim=1)
        self.last_losses = losses.detach()
        return losses.sum()

    def evaluate(self, model: nn.Module, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        """Every member's own test (:func:`toy_test` on its flow and test stream); the ensemble's
        metric is their mean."""
        results = []
        for index, (member, flow) in enumerate(zip(self.members, self.flows)):
            result = toy_test(flow, member.config, self._stream(index, "test"), device)
            if self.last_losses is not None:
                result["train_loss"] = float(self.last_losses[index])
            results.append(result)
        return {
            "metric": float(np.mean([result["metric"] for result in results])),
            "roundtrip_max_abs_error": max(result["roundtrip_max_abs_error"] for result in results),
            "members": results,
        }

    def divergence_detail(self) -> str:
        """The members with non-finite parameters or a non-finite last loss, and what to do."""
        losses = [float("nan")] * self.size if self.last_losses is None else self.last_losses.tolist()
        bad = [f"{member.dataset} seed {member.seed}"
               for member, flow, loss in zip(self.config.members, self.flows, losses)
               if non_finite_parameters(flow) or (self.last_losses is not None and not np.isfinite(loss))]
        return (f"diverged member(s): {', '.join(bad) or 'none found'}; train those alone (monoflow toy2d) "
                "and the others together again (a new ensemble, started afresh)")

    def log_test(self, test: Dict[str, Any]) -> None:
        """Append each member's line of a test to its own train.log."""
        for index, result in enumerate(test["members"]):
            line = test_log_line(self.metric_name, {"iteration": test["iteration"], "train_loss": float("nan"), **result})
            self._member_log(index, f"{line} (ensemble member)")

    def finalize(self, model: nn.Module, run_dir: Path, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        """Each member's figure in its own folder (drawn with its own figure stream)."""
        self.ensemble_dir = run_dir
        self.figures = []
        for index, (member, flow) in enumerate(zip(self.members, self.flows)):
            self.member_dirs[index].mkdir(parents=True, exist_ok=True)
            self.figures.append(member.finalize(flow, self.member_dirs[index], self._stream(index, "figure"), device))
        return {}

    def record_members(self, state: RunState, device: torch.device) -> List[Dict[str, Any]]:
        """Write every member's run.json and checkpoint; shorten the ensemble's own tests to
        the members' metrics. Returns where the members went and their metrics.

        All records are built before any is written, and every run.json before any member
        checkpoint: a member folder with a checkpoint but no finished run.json would look like
        a run started alone."""
        ensemble = {
            "size": self.size,
            "folder": self._relative(self.ensemble_dir),
            "members": [f"{m.dataset} seed {m.seed}" for m in self.config.members],
            "note": "trained together with the other members as one batched model (monoflow.ensemble); "
                    "wall time and per-iteration time are those of the whole ensemble",
        }
        records, member_tests = [], []
        for index, (member, flow) in enumerate(zip(self.members, self.flows)):
            tests = [{**{key: value for key, value in test.items()
                         if key not in ("members", "metric", "roundtrip_max_abs_error")},
                      **test["members"][index]} for test in state.tests]
            member_state = RunState(step=state.step, tests=tests, elapsed_s=state.elapsed_s,
                                    test_time_s=state.test_time_s, timers=dict(state.timers),
                                    sessions=state.sessions)
            records.append(run_record(member, flow, member_state, device, {**self.figures[index], "ensemble": ensemble}))
            member_tests.append(tests)
        for folder, record in zip(self.member_dirs, records):
            write_run(folder, record)
        summary = []
        for index, (member, flow, record) in enumerate(zip(self.members, self.flows, records)):
            folder = self.member_dirs[index]
            save_checkpoint(folder / CHECKPOINT_NAME, {
                "config": config_to_dict(member.config), "model": flow.state_dict(),
                "state": {"step": state.step, "tests": member_tests[index]}, "ensemble": ensemble["folder"],
            })
            self._member_log(index, f"finished: {self.metric_name}={record['final_metric']:.6f} "
                                    f"(trained in ensemble {ensemble['folder']})")
            summary.append({"dataset": member.config.dataset, "seed": member.config.seed,
                            "final_metric": record["final_metric"], "folder": self._relative(folder)})
        for test in state.tests:
            test["members"] = [result["metric"] for result in test["members"]]
        return to_jsonable(summary)


def run_toy_ensemble(
    configs: Sequence[ToyConfig],
    output_dir: Union[str, Path] = "results",
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    stop_after: Optional[int] = None,
) -> Dict[str, Any]:
    """Train the runs ``configs`` (same model and settings, different data sets / seeds) together.

    Resumes the ensemble from its checkpoint; returns its record (``members`` lists where each
    member's run folder is). Rerunning with the same configs after it finished returns at once.
    """
    config = ToyEnsembleConfig(tuple(configs))
    experiment = ToyEnsembleExperiment(config, output_dir)
    folder = ensemble_directory(config, output_dir)
    return train(experiment, folder, device, progress, stop_after)
