"""Checks of the book notebooks' papermill parameters.

Papermill only warns about a parameter the notebook does not declare and injects any value as
given, so ``-p n_pair=10`` (a typo) would be ignored and ``datasets="moons"`` (a string where a
list is meant) would loop over letters. Each notebook therefore starts its first code cell after
the parameters with one call,

>>> check_parameters("01_theory", {"L": 0.8, "n_pairs": 4000, "n_maps": 300, "grid_size": 401, "seed": 0})

which raises ``ValueError`` (or ``TypeError``) for an unknown name, a wrong type or a value outside
its choices, listing what is valid. :data:`NOTEBOOK_PARAMETERS` declares each notebook's
parameters; a test keeps it equal to the notebooks' ``parameters`` cells. A notebook that reads
finished runs (``rerun=False``) and whose selection matches none stops there too
(:func:`require_finished_runs`): empty tables would look like a result.
"""
from __future__ import annotations

import ast
import difflib
import numbers
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from monoflow.notebooks.paths import default_results_dir

__all__ = ["NOTEBOOK_PARAMETERS", "check_parameters", "declared_names", "require_finished_runs"]

Check = Callable[[str, Any], None]
Choices = Union[Sequence[str], Callable[[], Sequence[str]]]


def _choices(choices: Choices) -> List[str]:
    return list(choices() if callable(choices) else choices)


def _integer(minimum: Optional[int] = None, optional: bool = False) -> Check:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"parameter {name} must be an integer{' or None' if optional else ''}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"parameter {name} must be >= {minimum}, got {value}")
    return check


def _number_in_open_interval(low: float, high: float) -> Check:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"parameter {name} must be a number, got {value!r}")
        if not low < value < high:
            raise ValueError(f"parameter {name} must lie strictly between {low} and {high}, got {value}")
    return check


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"parameter {name} must be True or False, got {value!r}")


def _path(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, Path)):
        raise TypeError(f"parameter {name} must be a folder path (a string) or None, got {value!r}")


def _device(name: str, value: Any) -> None:
    import torch

    if not isinstance(value, str):
        raise TypeError(f"parameter {name} must be a device name such as 'cpu' or 'cuda', got {value!r}")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"parameter {name}={value!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"parameter {name}={value!r}: CUDA is not available on this machine; use 'cpu'")


def _choice(choices: Choices, optional: bool = False) -> Check:
    def check(name: str, value: Any) -> None:
        valid = _choices(choices)
        if value is None and optional:
            return
        if not isinstance(value, str) or value not in valid:
            raise ValueError(f"parameter {name}={value!r} is not one of {valid}{' (or None)' if optional else ''}")
    return check


def _names(choices: Choices) -> Check:
    def check(name: str, value: Any) -> None:
        valid = _choices(choices)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError(f"parameter {name} must be a list of names from {valid}, got {value!r} "
                            f"(for one name write [{value!r}])")
        if not value:
            raise ValueError(f"parameter {name} is empty; give at least one of {valid}")
        unknown = [entry for entry in value if entry not in valid]
        if unknown:
            raise ValueError(f"parameter {name} has unknown entries {unknown}; valid: {valid}")
    return check


def _fields_of(config: Callable[[], type]) -> Check:
    """A dict whose keys are fields of a configuration dataclass (checked when the run is built)."""
    def check(name: str, value: Any) -> None:
        import dataclasses

        if not isinstance(value, dict):
            raise TypeError(f"parameter {name} must be a dict of settings, got {value!r}")
        valid = [field.name for field in dataclasses.fields(config())]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"parameter {name} has unknown settings {unknown}; valid: {valid}")
    return check


def _presets() -> Sequence[str]:
    from monoflow.experiments.config import PRESETS

    return PRESETS


def _toy_datasets() -> Sequence[str]:
    from monoflow.data.toy import TOY_DATASETS

    return TOY_DATASETS


def _toy_models() -> Sequence[str]:
    from monoflow.experiments.config import TOY_MODELS

    return TOY_MODELS


def _regression_models() -> Sequence[str]:
    from monoflow.experiments.config import REGRESSION_MODELS

    return REGRESSION_MODELS


def _image_presets() -> Sequence[str]:
    from monoflow.models.image import list_image_presets

    return list_image_presets()


def _toy_config() -> type:
    from monoflow.experiments.config import ToyConfig

    return ToyConfig


def _regression_config() -> type:
    from monoflow.experiments.config import RegressionConfig

    return RegressionConfig


def _image_training_config() -> type:
    from monoflow.models.image import ImageTrainingConfig

    return ImageTrainingConfig


_SEED = _integer(0)
_READ_OR_RERUN = {"rerun": _boolean, "results_dir": _path, "output_dir": _path}

#: Each notebook's parameters (the names of its ``parameters`` cell) and how each is checked.
NOTEBOOK_PARAMETERS: Dict[str, Dict[str, Check]] = {
    "01_theory": {"L": _number_in_open_interval(0.0, 1.0), "n_pairs": _integer(1), "n_maps": _integer(1),
                  "grid_size": _integer(2), "seed": _SEED},
    "02_expressivity_1d": {**_READ_OR_RERUN, "preset": _choice(_presets, optional=True),
                           "models": _names(_regression_models), "iterations": _integer(1, optional=True),
                           "overrides": _fields_of(_regression_config), "device": _device, "seed": _SEED},
    "03_toy_densities_2d": {**_READ_OR_RERUN, "preset": _choice(_presets, optional=True),
                            "datasets": _names(_toy_datasets), "models": _names(_toy_models),
                            "iterations": _integer(1, optional=True), "overrides": _fields_of(_toy_config),
                            "device": _device, "seed": _SEED},
    "04_images": {**_READ_OR_RERUN, "train_preset": _choice(_image_presets), "iterations": _integer(1),
                  "eval_limit": _integer(0), "training_overrides": _fields_of(_image_training_config),
                  "device": _device, "seed": _SEED},
    "05_speed": {"benchmarks_dir": _path},
}


def declared_names(notebook: str) -> List[str]:
    """The parameter names of ``notebook`` (a key of :data:`NOTEBOOK_PARAMETERS`)."""
    if notebook not in NOTEBOOK_PARAMETERS:
        raise ValueError(f"unknown notebook {notebook!r}; expected one of {sorted(NOTEBOOK_PARAMETERS)}")
    return list(NOTEBOOK_PARAMETERS[notebook])


def _injected_names(namespace: Mapping[str, Any]) -> Optional[List[str]]:
    """The names papermill injected in this kernel (its cell starts with ``# Parameters``), read
    from IPython's input history ``In``; ``None`` outside a papermill run."""
    history = namespace.get("In")
    if not isinstance(history, list):
        return None
    for source in reversed(history):
        if isinstance(source, str) and source.lstrip().startswith("# Parameters"):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return None
            return [target.id for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)]
    return None


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_parameters(notebook: str, namespace: Mapping[str, Any]) -> None:
    """Check the parameters of ``notebook`` in ``namespace`` (the notebook's ``globals()``).

    Raises:
        ValueError: a name papermill injected that the notebook does not declare, a declared
            name missing, or a value outside its choices (the message lists the valid ones).
        TypeError: a value of the wrong type (``datasets="moons"`` for a list).
    """
    spec = NOTEBOOK_PARAMETERS.get(notebook)
    if spec is None:
        raise ValueError(f"unknown notebook {notebook!r}; expected one of {sorted(NOTEBOOK_PARAMETERS)}")
    problems: List[str] = []
    for name in _injected_names(namespace) or []:
        if name not in spec:
            problems.append(f"unknown parameter {name!r}{_suggest(name, spec)}")
    for name, check in spec.items():
        if name not in namespace:
            problems.append(f"parameter {name!r} is not defined (the parameters cell should set it)")
            continue
        try:
            check(name, namespace[name])
        except (TypeError, ValueError) as error:
            problems.append(str(error))
    if problems:
        raise ValueError(f"notebook {notebook}: {'; '.join(problems)}. Valid parameters: {', '.join(spec)}")
    require_finished_runs(notebook, namespace)


def _source(namespace: Mapping[str, Any]) -> Path:
    given = namespace.get("results_dir")
    return Path(given) if given else default_results_dir()


def _selected_runs(notebook: str, namespace: Mapping[str, Any]) -> Optional[tuple]:
    """(number of finished runs the notebook will read, what they are, where) in read mode, or
    ``None`` where the notebook reads no runs or trains its own."""
    if not namespace.get("rerun", True) is False:
        return None
    source = _source(namespace)
    if notebook == "02_expressivity_1d":
        from monoflow.experiments.results import find_runs

        runs = [run for run in find_runs(source, "regression1d", namespace["preset"])
                if run["model"] in namespace["models"]]
        what = f"1-D runs of models {list(namespace['models'])}"
    elif notebook == "03_toy_densities_2d":
        from monoflow.experiments.results import find_runs

        runs = [run for run in find_runs(source, "toy2d", namespace["preset"])
                if run["model"] in namespace["models"] and run.get("dataset") in namespace["datasets"]]
        what = f"2-D runs of models {list(namespace['models'])} on {list(namespace['datasets'])}"
    elif notebook == "04_images":
        from monoflow.images.results import read_runs

        source = source / "images"
        runs = read_runs(source) if source.is_dir() else []
        what = "image runs"
    else:
        return None
    if namespace.get("preset"):
        what += f" with preset {namespace['preset']!r}"
    return len(runs), what, source


def require_finished_runs(notebook: str, namespace: Mapping[str, Any]) -> None:
    """Refuse a read-only notebook run whose selection matches no finished run (its tables and
    figures would be empty, not a result). Called by :func:`check_parameters`."""
    selected = _selected_runs(notebook, namespace)
    if selected is not None and selected[0] == 0:
        _, what, source = selected
        raise ValueError(f"notebook {notebook}: no finished {what} in {source}; train them first, select "
                         "others, or pass rerun=True")
