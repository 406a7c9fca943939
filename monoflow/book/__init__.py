r"""Assemble the companion book: run the notebooks with papermill, then build the HTML.

The sources are ``notebooks/*.ipynb`` (outputs cleared, each with a papermill ``parameters``
cell) and ``book/`` (Jupyter Book configuration, table of contents, Markdown chapters,
bibliography and the vendored MathJax). :func:`build_book` lays out one build folder::

    <output>/source/            a copy of book/ plus chapters/ (the executed notebooks)
    <output>/source/chapters/   papermill-executed copies of notebooks/*.ipynb
    <output>/reruns/<notebook>/ experiment outputs of notebooks run with ``rerun=True``
    <output>/html/              the built book (open index.html)

The default ``<output>`` is ``book/_build`` (git-ignored): executed notebooks are build output
and are never committed. The HTML is built with ``jupyter-book build --warningiserror``, and a
built page that loads a script or stylesheet over http(s) fails the build, so the book renders
(MathJax included) without network access.

Example (the book in its smallest configuration, a few minutes of CPU)::

    >>> from monoflow.book import build_book
    >>> html = build_book(quick=True)                     # doctest: +SKIP

The package:

- :mod:`~monoflow.book.chapters`: the chapters (:data:`NOTEBOOKS`) and their quick parameters;
- :mod:`~monoflow.book.execute`: papermill execution of one notebook and its parameters;
- :mod:`~monoflow.book.status`: the reproduction status page of the introduction;
- :mod:`~monoflow.book.offline`: the check that built pages load nothing over the network;
- :mod:`~monoflow.book.build`: :func:`build_book`, the whole build.

The helpers the notebooks themselves call (tables, provenance, the checkout's folders, parameter
checks) live in :mod:`monoflow.notebooks`; the ones importable from here before are re-exported.
"""
from __future__ import annotations

from monoflow.book.build import build_book
from monoflow.book.chapters import NOTEBOOKS, NotebookSpec
from monoflow.book.execute import NotebookError, execute_notebook, notebook_parameters
from monoflow.book.offline import external_resources
from monoflow.book.status import reproduction_status
from monoflow.notebooks.paths import default_results_dir, repository_root
from monoflow.notebooks.tables import html_table, provenance, results_provenance, session_kinds, session_machines

__all__ = [
    "NotebookSpec",
    "NotebookError",
    "NOTEBOOKS",
    "repository_root",
    "default_results_dir",
    "notebook_parameters",
    "execute_notebook",
    "build_book",
    "external_resources",
    "provenance",
    "results_provenance",
    "session_kinds",
    "session_machines",
    "reproduction_status",
    "html_table",
]
