"""Experiment configurations as dataclasses, with named presets.

Two experiments share one training loop (``monoflow.experiments.train``):

* :class:`ToyConfig`: density estimation on a 2-D toy set (the paper's Table 1 / Figure 5);
* :class:`RegressionConfig`: the 1-D staircase regression (the paper's Figure 4).

Presets:

* ``paper``: exactly the settings of SPEC.md section 4 (the authors' released code). 2-D: 50,000
  iterations of batch 500, Adam lr 1e-3, weight decay 1e-5, 5 power iterations per step,
  learnable concatenation from iteration 25,000, a test on 10,000 fresh samples every 100
  iterations, the mean of the last 20 tests reported. 1-D: 15,000 iterations of batch 5000, Adam
  lr 0.01 (x0.2 after 5,000 and x0.04 after 10,000 iterations), no weight decay, test MSE on
  10,000 fresh points every 100 iterations, the last test reported.
* ``quick``: the same models and optimiser, scaled down to minutes on a laptop CPU. 2-D: 2,000
  iterations (learnable concatenation from 1,000), tests on 2,000 samples every 100, mean of the
  last 5. 1-D: 1,500 iterations of batch 1000, lr x0.2 after 500 and x0.04 after 1,000, tests on
  2,000 points.

Every field can be overridden, in Python with :func:`toy_config` / :func:`regression_config`
keyword arguments or ``dataclasses.replace``, on the command line with ``--set key=value``
(parsed by :func:`parse_overrides`).

>>> toy_config("quick", iterations=300).iterations
300
>>> regression_config("paper").batch_size
5000
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Tuple, Type, TypeVar, Union

from monoflow.data.toy import TOY_DATASETS

__all__ = [
    "PRESETS",
    "TOY_MODELS",
    "REGRESSION_MODELS",
    "ToyConfig",
    "RegressionConfig",
    "toy_config",
    "ToyEnsembleConfig",
    "regression_config",
    "parse_overrides",
    "config_from_dict",
    "config_to_dict",
    "evaluation_iterations",
    "lr_factor",
]

PRESETS: Tuple[str, ...] = ("paper", "quick")
#: 2-D models: i-DenseNet (residual blocks, CLipSwish), Monotone Flow (monotone blocks, CPila), and
#: the Residual Flow baseline, as built by ``monoflow.models.toy_flow``.
TOY_MODELS: Tuple[str, ...] = ("monotone", "idensenet", "resflow")
#: The four 1-D models (a)-(d) of the paper's Figure 4, built by ``monoflow.models.regression_flow``.
REGRESSION_MODELS: Tuple[str, ...] = (
    "residual",
    "residual_actnorm",
    "implicit_actnorm",
    "monotone_actnorm",
)


@dataclass(frozen=True)
class _Schedule:
    """Shared optimiser, schedule, evaluation and checkpoint fields of both experiments."""

    preset: str = "paper"
    seed: int = 0
    iterations: int = 50000
    batch_size: int = 500
    lr: float = 1e-3
    weight_decay: float = 1e-5
    #: Step-wise learning-rate schedule: after ``lr_milestones[i]`` iterations the rate is
    #: ``lr * lr_factors[i]`` (factors relative to the base rate, not cumulative).
    lr_milestones: Tuple[int, ...] = ()
    lr_factors: Tuple[float, ...] = ()
    #: Power iterations of every spectral-normalised layer after each optimiser step.
    power_iterations: int = 5
    #: Iteration from which the concatenation weights eta of the dense layers are learnable.
    learnable_concat_from: int = 25000
    #: Before each test the power iteration runs to this relative tolerance of sigma (SPEC: to
    #: convergence before evaluation), at most ``eval_power_max_iterations`` iterations.
    eval_power_tol: float = 1e-3
    eval_power_max_iterations: int = 200
    test_every: int = 100
    test_samples: int = 10000
    #: The reported metric is the mean of the last ``report_last`` tests.
    report_last: int = 20
    #: Points on which the inverse round trip max |F^-1(F(x)) - x| is measured at each test.
    roundtrip_points: int = 256
    #: Seconds between checkpoints (a killed run loses at most this much work).
    checkpoint_every_s: float = 60.0

    def _check_schedule(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        for name in ("iterations", "batch_size", "test_every", "test_samples", "report_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("power_iterations", "learnable_concat_from", "roundtrip_points", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if len(self.lr_milestones) != len(self.lr_factors):
            raise ValueError(
                "lr_milestones and lr_factors must have the same length, got "
                f"{self.lr_milestones} and {self.lr_factors}"
            )
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing, got {self.lr_milestones}")
        if not self.eval_power_tol > 0 or self.eval_power_max_iterations < 1:
            raise ValueError(
                "eval_power_tol must be positive and eval_power_max_iterations >= 1, got "
                f"{self.eval_power_tol}, {self.eval_power_max_iterations}"
            )
        if self.checkpoint_every_s <= 0:
            raise ValueError(f"checkpoint_every_s must be positive, got {self.checkpoint_every_s}")

    @property
    def n_tests(self) -> int:
        """Number of tests in a full run (one every ``test_every`` iterations, one at the end)."""
        return len(evaluation_iterations(self.iterations, self.test_every))


def evaluation_iterations(iterations: int, test_every: int) -> Tuple[int, ...]:
    """Iterations (counted from 1) after which the model is tested: every ``test_every`` and the last."""
    steps = list(range(test_every, iterations + 1, test_every))
    if not steps or steps[-1] != iterations:
        steps.append(iterations)
    return tuple(steps)


@dataclass(frozen=True)
class ToyConfig(_Schedule):
    """One 2-D toy density run (paper Table 1): data set, model and all hyperparameters.

    The loss is the negative log-likelihood in nats, ``-flow.log_prob(x).mean()``, with the exact
    2x2 log-determinant; the metric is the same quantity on ``test_samples`` fresh samples.
    """

    dataset: str = "8gaussians"
    model: str = "monotone"
    nblocks: int = 10
    depth: int = 3
    growth: int = 16
    coeff: float = 0.9
    lip_coeff: float = 0.98
    logdet: str = "exact"
    #: Resolution of the density grid over [-4, 4]^2 and number of samples of the figure.
    figure_grid: int = 200
    figure_samples: int = 20000

    def __post_init__(self) -> None:
        self._check_schedule()
        if self.dataset not in TOY_DATASETS:
            raise ValueError(
                f"unknown toy data set {self.dataset!r}; valid names: {', '.join(TOY_DATASETS)}"
            )
        if self.model not in TOY_MODELS:
            raise ValueError(f"unknown toy model {self.model!r}; valid models: {', '.join(TOY_MODELS)}")
        for name in ("nblocks", "depth", "growth", "figure_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def experiment(self) -> str:
        return "toy2d"


@dataclass(frozen=True)
class RegressionConfig(_Schedule):
    """One 1-D staircase regression run (paper Figure 4).

    The loss is the mean squared error of ``flow(x)[0]`` against the staircase target; the metric
    is the same error on ``test_samples`` fresh points. The flows compute no log-determinant.
    SPEC.md gives no power-iteration count for this experiment; the toy value (5 per step) is used.
    """

    model: str = "monotone_actnorm"
    depth: int = 4
    growth: int = 128
    coeff: float = 0.99
    lip_coeff: float = 0.99
    staircase_slope: float = 0.05
    #: Points of the plotted fit on [-2, 2].
    figure_points: int = 1000

    def __post_init__(self) -> None:
        self._check_schedule()
        if self.model not in REGRESSION_MODELS:
            raise ValueError(
                f"unknown 1-D model {self.model!r}; valid models: {', '.join(REGRESSION_MODELS)}"
            )
        if self.depth < 1 or self.growth < 2:
            raise ValueError(f"depth must be >= 1 and growth >= 2, got {self.depth}, {self.growth}")

    @property
    def experiment(self) -> str:
        return "regression1d"


#: Fields in which the members of an ensemble may differ (all others are shared).
ENSEMBLE_MEMBER_FIELDS = ("dataset", "seed")


@dataclass(frozen=True)
class ToyEnsembleConfig:
    """Several 2-D runs trained together as one batched model (``monoflow.ensemble``).

    The members are ordinary :class:`ToyConfig` runs that differ only in data set and seed; every
    other field (model, schedule, evaluation) is shared and readable on the ensemble itself, e.g.
    ``ensemble.iterations``. Each member's results are those of its own run folder.
    """

    members: Tuple[ToyConfig, ...]

    def __post_init__(self) -> None:
        members = tuple(self.members)
        object.__setattr__(self, "members", members)
        if not members or not all(isinstance(m, ToyConfig) for m in members):
            raise ValueError("an ensemble needs at least one ToyConfig member")
        shared = [f.name for f in fields(ToyConfig) if f.name not in ENSEMBLE_MEMBER_FIELDS]
        for member in members[1:]:
            differing = [name for name in shared if getattr(member, name) != getattr(members[0], name)]
            if differing:
                raise ValueError(
                    "ensemble members may differ only in dataset and seed; "
                    f"{member.dataset} seed {member.seed} differs in {', '.join(differing)}"
                )
        keys = [(m.dataset, m.seed) for m in members]
        if len(set(keys)) != len(keys):
            raise ValueError(f"ensemble members repeat a (dataset, seed) pair: {keys}")

    def __getattr__(self, name: str) -> Any:
        if name == "members" or name in ENSEMBLE_MEMBER_FIELDS or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.members[0], name)

    @property
    def seed(self) -> int:
        """The first member's seed (the ensemble's own, unused, random streams derive from it)."""
        return self.members[0].seed

    @property
    def experiment(self) -> str:
        return "toy2d_ensemble"


# Preset values that differ from the dataclass defaults (the defaults are the paper's settings).
_TOY_PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "quick": dict(
        iterations=2000,
        learnable_concat_from=1000,
        test_every=100,
        test_samples=2000,
        report_last=5,
        figure_grid=100,
        figure_samples=5000,
    ),
}
_REGRESSION_PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": dict(
        iterations=15000,
        batch_size=5000,
        lr=0.01,
        weight_decay=0.0,
        lr_milestones=(5000, 10000),
        lr_factors=(0.2, 0.04),
        learnable_concat_from=0,
        test_every=100,
        test_samples=10000,
        report_last=1,
    ),
    "quick": dict(
        iterations=1500,
        batch_size=1000,
        lr=0.01,
        weight_decay=0.0,
        lr_milestones=(500, 1000),
        lr_factors=(0.2, 0.04),
        learnable_concat_from=0,
        test_every=100,
        test_samples=2000,
        report_last=1,
    ),
}

C = TypeVar("C", ToyConfig, RegressionConfig)


def _build(cls: Type[C], presets: Dict[str, Dict[str, Any]], preset: str, overrides: Dict[str, Any]) -> C:
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(presets)}")
    _check_field_names(cls, overrides)
    values = dict(presets[preset], preset=preset)
    values.update(overrides)
    return cls(**values)


def _check_field_names(cls: type, names: Iterable[str]) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(valid)}"
        )


def toy_config(preset: str = "quick", **overrides: Any) -> ToyConfig:
    """The 2-D configuration of ``preset`` (``"paper"`` or ``"quick"``) with fields overridden."""
    return _build(ToyConfig, _TOY_PRESETS, preset, overrides)


def regression_config(preset: str = "quick", **overrides: Any) -> RegressionConfig:
    """The 1-D configuration of ``preset`` (``"paper"`` or ``"quick"``) with fields overridden."""
    return _build(RegressionConfig, _REGRESSION_PRESETS, preset, overrides)


def _parse_value(text: str, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        text = text.strip().strip("()[]")
        parts = [part for part in text.split(",") if part.strip()]
        return tuple(_parse_value(part.strip(), item_type, name) for part in parts)
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if annotation is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError(text)
            return int(as_float)
        if annotation is float:
            return float(text)
    except ValueError:
        raise ValueError(f"cannot read {name}={text!r} as {annotation.__name__}") from None
    return text


def parse_overrides(cls: type, assignments: Iterable[str]) -> Dict[str, Any]:
    """Read ``key=value`` strings (the CLI's ``--set``) into typed field values of ``cls``.

    Numbers accept scientific notation (``iterations=5e4``), tuples are comma separated
    (``lr_milestones=500,1000``). Unknown keys raise ``ValueError`` listing the valid fields.
    """
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"--set expects key=value, got {assignment!r}")
        key, text = (part.strip() for part in assignment.split("=", 1))
        _check_field_names(cls, [key])
        values[key] = _parse_value(text, hints[key], key)
    return values


def config_from_dict(values: Dict[str, Any]) -> Union[ToyConfig, RegressionConfig, ToyEnsembleConfig]:
    """Rebuild a configuration from its ``dataclasses.asdict`` form (as stored in run.json).

    The experiment is told by the ``experiment`` key (``"toy2d"`` / ``"regression1d"`` /
    ``"toy2d_ensemble"``).
    """
    values = dict(values)
    experiment = values.pop("experiment", None)
    if experiment == "toy2d_ensemble":
        _check_field_names(ToyEnsembleConfig, values)
        return ToyEnsembleConfig(tuple(config_from_dict({**member, "experiment": "toy2d"})
                                       for member in values["members"]))
    classes = {"toy2d": ToyConfig, "regression1d": RegressionConfig}
    if experiment not in classes:
        raise ValueError(f"config dict needs experiment in {sorted(classes) + ['toy2d_ensemble']}, "
                         f"got {experiment!r}")
    cls = classes[experiment]
    _check_field_names(cls, values)
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        if typing.get_origin(hints[key]) is tuple:
            values[key] = tuple(value)
    return cls(**values)


def config_to_dict(config: Union[ToyConfig, RegressionConfig]) -> Dict[str, Any]:
    """``dataclasses.asdict`` plus the ``experiment`` name, JSON-ready (tuples become lists)."""
    values = dataclasses.asdict(config)
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    values["experiment"] = config.experiment
    return values


def lr_factor(config: _Schedule, iteration: int) -> float:
    """Learning-rate multiplier at ``iteration`` (number of steps already taken)."""
    factor = 1.0
    for milestone, value in zip(config.lr_milestones, config.lr_factors):
        if iteration >= milestone:
            factor = value
    return factor

