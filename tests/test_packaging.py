"""Packaging: one version, a licence file, and every third-party import declared where it belongs
(core dependencies, or the extra of the feature that needs it)."""
import ast
import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import monoflow

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

#: import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn"}


def _names(requirements):
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def _third_party_imports():
    """Top-level modules imported anywhere in the package, split by module-level or deferred."""
    eager, deferred = set(), set()
    for path in (ROOT / "monoflow").rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                name = module.split(".")[0]
                if name != "monoflow" and name not in sys.stdlib_module_names:
                    (eager if id(node) in top_level else deferred).add(DISTRIBUTION.get(name, name))
    return eager, deferred


def test_version_is_written_once():
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "monoflow.__version__"}
    assert importlib.metadata.version("monoflow") == monoflow.__version__


def test_licence_file_matches_the_metadata():
    assert PROJECT["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text


def test_every_import_is_declared():
    eager, deferred = _third_party_imports()
    core = _names(PROJECT["dependencies"])
    extras = {name: _names(requirements) for name, requirements in PROJECT["optional-dependencies"].items()}
    assert eager <= core, f"imported at module level but not a core dependency: {eager - core}"
    declared = core.union(*extras.values())
    assert deferred <= declared, f"imported but declared nowhere: {deferred - declared}"
    # the data-set readers' packages are extras, and the tests and the book install them
    assert {"scikit-learn", "mlxtend"}.isdisjoint(core)
    assert "scikit-learn" in extras["digits"] and "mlxtend" in extras["images"]
    assert "scikit-learn" in extras["test"] and "scikit-learn" in extras["book"]


def test_package_imports_without_scikit_learn_and_names_the_extra():
    # a fresh interpreter in which `import sklearn` fails, as in an install without [digits]
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        sys.modules["sklearn"] = None
        import monoflow
        for module in pkgutil.walk_packages(monoflow.__path__, "monoflow."):
            if not module.name.endswith("__main__"):  # that one runs the command line
                importlib.import_module(module.name)
        from monoflow.data.images import load_digits
        try:
            load_digits()
        except ImportError as error:
            print(error)
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    assert 'pip install "monoflow[digits]"' in completed.stdout


def _workflow(name):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def test_pages_workflow_pins_the_ci_torch_and_never_cancels_a_deployment():
    workflow = _workflow("book.yml")
    ci_pin = re.search(r"torch==([0-9.]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    assert workflow["env"]["TORCH_VERSION"] == ci_pin
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    assert deploy["concurrency"] == {"group": "pages", "cancel-in-progress": False}
    assert "pages" not in str(build.get("concurrency", {}).get("group"))  # PR builds never queue deploys
    steps = {step.get("name", step.get("uses")): step for step in build["steps"]}
    build_command = steps["Build the book"]["run"]
    upload = steps["Upload the HTML"]["with"]["path"]
    # monoflow book writes the HTML to OUTPUT/html
    assert build_command.startswith("monoflow book ") and upload == build_command.split("--output ")[1] + "/html"
    assert set(deploy["permissions"]) == {"pages", "id-token"} and build["permissions"] == {"contents": "read"}


#: conda-forge names of the distributions whose conda package is named otherwise
CONDA_NAME = {"torch": "pytorch"}


def _conda_environment(name):
    yaml = pytest.importorskip("yaml")
    environment = yaml.safe_load((ROOT / name).read_text())
    packages = {}
    for entry in environment["dependencies"]:
        if isinstance(entry, str):
            package, _, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", entry).group(1, 0, 2)
            packages[package.lower()] = spec
    return environment, packages


@pytest.mark.parametrize("name,torch_package", [("environment.yml", "pytorch-cpu"),
                                                ("environment-gpu.yml", "pytorch-gpu")])
def test_conda_environments_come_from_conda_forge_and_match_the_package(name, torch_package):
    environment, packages = _conda_environment(name)
    assert environment["channels"] == ["conda-forge", "nodefaults"]
    # the package's torch floor, through conda-forge's metapackage for the CPU or CUDA build
    torch_floor = next(d for d in PROJECT["dependencies"] if d.startswith("torch"))[len("torch"):]
    assert packages[torch_package] == torch_floor
    assert "pytorch-cuda" not in packages and "cpuonly" not in packages
    # every dependency of the package and of its digits, images, test and book extras
    wanted = _names(PROJECT["dependencies"])
    for extra in ("digits", "images", "test", "book"):
        wanted |= _names(PROJECT["optional-dependencies"][extra])
    conda_names = {CONDA_NAME.get(name, name) for name in wanted} - {"pytorch"}
    assert conda_names <= set(packages), conda_names - set(packages)
    assert {"-e ."} <= {line.split("#")[0].strip() for line in environment["dependencies"][-1]["pip"]}
