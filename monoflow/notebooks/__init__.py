"""What the book's notebooks (``notebooks/*.ipynb``) import: the checks of their papermill
parameters (:mod:`~monoflow.notebooks.parameters`), the tables on their pages and the provenance
table that ends each (:mod:`~monoflow.notebooks.tables`), and the checkout's folders they read
(:mod:`~monoflow.notebooks.paths`).

Building the book from them is :mod:`monoflow.book`.
"""
from __future__ import annotations

from monoflow.notebooks.parameters import NOTEBOOK_PARAMETERS, check_parameters, declared_names, require_finished_runs
from monoflow.notebooks.paths import default_results_dir, repository_root
from monoflow.notebooks.tables import html_table, provenance, results_provenance, session_kinds, session_machines

__all__ = [
    "check_parameters",
    "declared_names",
    "require_finished_runs",
    "NOTEBOOK_PARAMETERS",
    "html_table",
    "provenance",
    "results_provenance",
    "session_kinds",
    "session_machines",
    "repository_root",
    "default_results_dir",
]
