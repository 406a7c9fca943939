"""Where the checkout keeps what the notebooks read: the repository root (with ``notebooks/``
and ``book/``) and the committed ``results/``."""
from __future__ import annotations

from pathlib import Path

__all__ = ["repository_root", "default_results_dir"]


def repository_root() -> Path:
    """The checkout that holds ``notebooks/`` and ``book/`` (the parent of the package folder).

    Raises:
        FileNotFoundError: monoflow is installed without its repository (e.g. from a wheel).
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / "notebooks").is_dir() or not (root / "book" / "_config.yml").is_file():
        raise FileNotFoundError(
            f"expected notebooks/ and book/_config.yml next to the package in {root}; the book is "
            "built from a checkout of the monoflow repository (pip install -e '.[book]')"
        )
    return root


def default_results_dir() -> Path:
    """The committed ``results/`` folder of the checkout, else ``./results``."""
    try:
        return repository_root() / "results"
    except FileNotFoundError:
        return Path.cwd() / "results"
