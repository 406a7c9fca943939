"""The companion book: notebooks run by papermill at their smallest parameters, the whole book
built by ``jupyter-book -W``, and the built HTML checked for each chapter's tables and figures.

The full build takes about a minute on two CPU cores; it runs once per test session
(:func:`quick_book`, shared with ``test_book_browser.py``). Tests that need it are marked
``slow``; ``pytest -m "not slow"`` runs the rest in seconds.
"""
from __future__ import annotations

import html as html_module
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import pytest

nbformat = pytest.importorskip("nbformat", reason="the book tests need the book extras: pip install -e '.[book]'")
pytest.importorskip("papermill", reason="the book tests need the book extras: pip install -e '.[book]'")
pytest.importorskip("jupyter_book", reason="the book tests need the book extras: pip install -e '.[book]'")

from monoflow.book import (
    NOTEBOOKS,
    NotebookError,
    NotebookSpec,
    build_book,
    execute_notebook,
    external_resources,
    notebook_parameters,
)
from monoflow.notebooks import repository_root, results_provenance, session_machines

ROOT = repository_root()
CHAPTERS = [spec.name for spec in NOTEBOOKS]
_BUILT: Dict[str, object] = {}


def quick_book() -> Dict[str, object]:
    """Build the book once per session at the smallest parameters; returns its paths and log."""
    if not _BUILT:
        output = Path(tempfile.mkdtemp(prefix="monoflow-book-test-"))
        log: List[str] = []
        html = build_book(output, quick=True, progress=False, log=log.append)
        _BUILT.update(output=output, html=html, log=log)
    return _BUILT


@pytest.fixture(scope="module")
def built() -> Dict[str, object]:
    return quick_book()


def _read(html: Path, page: str) -> str:
    return (html / f"{page}.html").read_text(encoding="utf-8")


def _article(text: str) -> str:
    """The page's main article (without the navigation and sidebars)."""
    match = re.search(r"<article[^>]*>(.*)</article>", text, flags=re.S)
    assert match, "no <article> in the page"
    return match.group(1)


def _text(markup: str) -> str:
    """Visible text of HTML (tags removed, entities decoded): code is split into spans."""
    return html_module.unescape(re.sub(r"<[^>]+>", "", markup))


# ----------------------------------------------------------------------------------------------
# sources


def test_notebooks_are_sources_with_cleared_outputs_and_parameters():
    import papermill

    names = sorted(path.stem for path in (ROOT / "notebooks").glob("*.ipynb"))
    assert names == sorted(CHAPTERS)
    for spec in NOTEBOOKS:
        path = ROOT / "notebooks" / f"{spec.name}.ipynb"
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{path} has outputs"
        tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path} needs exactly one cell tagged 'parameters'"
        declared = papermill.inspect_notebook(str(path))
        assert set(spec.quick) <= set(declared), f"{spec.name}: quick parameters not declared by the notebook"
        assert "provenance(" in code[-1].source, f"{spec.name} must end with a provenance cell"
        assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_toc_lists_every_chapter_and_config_vendors_mathjax():
    import yaml

    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]
    assert files[: len(CHAPTERS)] == [f"chapters/{name}" for name in CHAPTERS]
    for page in files[len(CHAPTERS):] + [toc["root"]]:
        assert (ROOT / "book" / f"{page}.md").is_file()
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    mathjax = config["sphinx"]["config"]["mathjax_path"]
    assert not mathjax.startswith(("http:", "https:", "//"))
    static = config["sphinx"]["config"]["html_static_path"]
    assert any((ROOT / "book" / folder / mathjax).is_file() for folder in static)
    assert config["execute"]["execute_notebooks"] == "off"


def test_notebook_parameters_precedence_and_filtering(tmp_path):
    spec = NotebookSpec("x", "x", quick={"rerun": True, "iterations": 4})
    values = notebook_parameters(spec, quick=True, rerun_dir=tmp_path, results_dir=tmp_path / "r",
                                 overrides={"iterations": 9, "device": "cuda"},
                                 declared={"rerun": 0, "iterations": 0, "output_dir": 0, "results_dir": 0})
    assert values == {"results_dir": str(tmp_path / "r"), "output_dir": str(tmp_path), "rerun": True, "iterations": 9}
    # without a rerun there is nothing to write: no output folder is passed
    plain = notebook_parameters(spec, quick=False, rerun_dir=tmp_path)
    assert plain == {}
    assert notebook_parameters(spec, overrides={"rerun": True}, rerun_dir=tmp_path)["output_dir"] == str(tmp_path)


def test_external_resources_finds_network_scripts(tmp_path):
    (tmp_path / "a.html").write_text('<script src="_static/x.js"></script><a href="https://example.org">ok</a>')
    (tmp_path / "b.html").write_text('<script src="https://cdn.example.org/mathjax.js"></script>'
                                     '<link rel="stylesheet" href="//fonts.example.org/x.css">')
    assert external_resources(tmp_path) == {
        "b.html": ["<script> https://cdn.example.org/mathjax.js", "<link> //fonts.example.org/x.css"]
    }
    with pytest.raises(FileNotFoundError):
        external_resources(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# failures are loud and name the notebook


def test_failing_cell_raises_notebook_error_naming_notebook(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise ValueError(f'broken on purpose {x}')"),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "broken.ipynb"
    nbformat.write(notebook, source)
    with pytest.raises(NotebookError, match=r"broken\.ipynb failed .*ValueError: broken on purpose 7"):
        execute_notebook(source, tmp_path / "out" / "broken.ipynb", {"x": 7}, progress=False)
    assert (tmp_path / "out" / "broken.ipynb").is_file()  # the executed copy keeps the traceback


@pytest.mark.slow
def test_build_book_fails_with_the_failing_notebooks_error(tmp_path):
    log: List[str] = []
    with pytest.raises(NotebookError, match=r"01_theory\.ipynb failed .*L must lie strictly between 0\.0 and 1\.0"):
        build_book(tmp_path, parameters={"L": 1.5}, progress=False, log=log.append)  # the first notebook fails
    assert any("running notebooks/01_theory.ipynb" in line for line in log)
    assert not (tmp_path / "html").exists()


def test_build_book_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="unknown notebook"):
        build_book(tmp_path, notebooks=["99_nothing"])
    with pytest.raises(FileNotFoundError, match="no executed copy"):
        build_book(tmp_path, execute=False)


def test_session_machines_names_every_machine_a_run_trained_on_without_thread_counts():
    resumed = {"sessions": [{"device": "cpu (AMD EPYC, 2 threads)"}, {"device": "cpu (AMD EPYC, AVX2, 1 threads)"},
                            {"device": "cpu (AMD EPYC, AVX2, 2 threads)"}]}
    assert session_machines(resumed) == "cpu (AMD EPYC) + cpu (AMD EPYC, AVX2)"
    assert session_machines({"provenance": {"device": "cuda:0 (NVIDIA H200)"}}) == "cuda:0 (NVIDIA H200)"


def test_results_provenance_names_runs_trained_together(tmp_path):
    alone = {"run_dir": str(tmp_path / "toy2d" / "a"), "provenance": {"git_commit": "0123456789abcdef", "device": "cpu"},
             "timing": {"wall_time_s": 120.0, "iterations": 50}}
    member = {**alone, "run_dir": str(tmp_path / "toy2d" / "b"), "ensemble": {"size": 7, "folder": "ensembles/x"}}
    table = results_provenance([alone, member], tmp_path)
    assert list(table["run"]) == ["toy2d/a", "toy2d/b"]
    assert list(table["runs trained together"]) == [1, 7]
    assert list(table["wall time (min)"]) == [2.0, 2.0] and list(table["git commit"]) == ["0123456789ab"] * 2
    assert "training loss" not in table.columns  # every run eager: no column


def test_results_provenance_names_the_training_loss_when_one_was_compiled(tmp_path):
    base = {"provenance": {"git_commit": "0123456789abcdef", "device": "cpu"}, "timing": {"wall_time_s": 60.0}}
    old = {**base, "run_dir": str(tmp_path / "a")}
    compiled = {**base, "run_dir": str(tmp_path / "b"),
                "sessions": [{"training_loss": "compiled (4 Newton steps per solve)"}]}
    mixed = {**base, "run_dir": str(tmp_path / "c"),
             "sessions": [{"training_loss": "eager"}, {"training_loss": "compiled (4 Newton steps per solve)"}]}
    table = results_provenance([old, compiled, mixed], tmp_path)
    assert list(table["training loss"]) == ["eager", "compiled", "compiled + eager"]
    assert "solves" not in table.columns


def test_results_provenance_names_the_solves_when_a_run_recorded_them(tmp_path):
    base = {"provenance": {"git_commit": "0123456789abcdef", "device": "cpu"}, "timing": {"wall_time_s": 60.0}}
    old = {**base, "run_dir": str(tmp_path / "a"), "sessions": [{"iteration": 0}]}
    scalar = {**base, "run_dir": str(tmp_path / "b"),
              "sessions": [{"solves": "scalar (512-point table, then bracketing)"}]}
    table = results_provenance([old, scalar], tmp_path)
    assert list(table["solves"]) == ["anderson", "scalar"] and "training loss" not in table.columns


def test_cli_registers_book_command():
    from monoflow.cli import build_parser

    args = build_parser().parse_args(["book", "--quick", "--output", "x", "-p", "device=cuda", "-p", "L=0.5",
                                      "--notebook", "01_theory", "--no-progress"])
    assert args.quick and args.output == Path("x") and args.notebook == ["01_theory"] and args.no_progress
    assert dict(args.parameter) == {"device": "cuda", "L": 0.5}
    assert callable(args.handler)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["book", "-p", "no-equals-sign"])


def test_cli_reports_missing_executed_copies(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "monoflow", "book", "--no-execute", "--output", str(tmp_path)],
                               capture_output=True, text=True)
    assert completed.returncode == 1
    assert "no executed copy" in completed.stderr


# ----------------------------------------------------------------------------------------------
# the built book


@pytest.mark.slow
def test_build_reports_progress_per_notebook(built):
    log = "\n".join(built["log"])
    for index, name in enumerate(CHAPTERS, start=1):
        assert f"[{index}/{len(CHAPTERS)}] running notebooks/{name}.ipynb" in log
        assert f"[{index}/{len(CHAPTERS)}] {name} done in" in log
    assert "book built in" in log


@pytest.mark.slow
def test_executed_chapters_have_no_errors_and_end_with_provenance(built):
    chapters = Path(built["output"]) / "source" / "chapters"
    for name in CHAPTERS:
        notebook = nbformat.read(chapters / f"{name}.ipynb", as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"{name}: {errors}"
        spec = next(spec for spec in NOTEBOOKS if spec.name == name)
        injected = [cell for cell in code if "injected-parameters" in cell.metadata.get("tags", [])]
        assert bool(injected) == bool(spec.quick)
        for key in spec.quick:
            assert key in injected[0].source
        last = json.dumps(code[-1].outputs)
        assert "monoflow version" in last and "git commit" in last and "device" in last
    # the sources stay clean: executed copies live only in the build folder
    for name in CHAPTERS:
        source = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        assert all(not cell.get("outputs") for cell in source.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_html_has_each_chapters_tables_and_figures(built):
    html = Path(built["html"])
    # (page, minimum number of figures, minimum number of tables, texts that must appear)
    expected = [
        ("chapters/01_theory", 6, 5, ["All checks", "checks hold", "Provenance"]),
        ("chapters/02_expressivity_1d", 2, 3, ["test MSE (ours)", "paper MSE", "Preset", "quick"]),
        ("chapters/03_toy_densities_2d", 2, 3, ["Monotone Flow", "i-DenseNet", "difference", "iterations"]),
        ("chapters/04_images", 0, 3, ["paper bpd", "parameters (ours)", "24,894,430", "20,872,826"]),
        ("chapters/05_speed", 0, 3, ["ms / iteration", "meets target", "speed-up", "CPU-hours alone"]),
    ]
    for page, figures, tables, texts in expected:
        article = _article(_read(html, page))
        images = re.findall(r'<img[^>]*src="([^"]+)"', article)
        assert len(images) >= figures, f"{page}: {len(images)} figures, expected at least {figures}"
        for source in images:
            target = (html / page).parent / source
            assert target.is_file() and target.stat().st_size > 1000, f"{page}: missing figure {source}"
        assert article.count("<table") >= tables, f"{page}: {article.count('<table')} tables, expected {tables}"
        visible = _text(article)
        for text in texts:
            assert text in visible, f"{page}: {text!r} missing"
        assert "Traceback" not in visible
    theory = _article(_read(html, "chapters/01_theory"))
    holds = re.findall(r">(True|False)</td>\s*</tr>", theory)  # the last column of the checks table
    assert len(holds) >= 30 and set(holds) == {"True"}
    images = _text(_article(_read(html, "chapters/04_images")))
    assert "Not yet reproduced" in images or "Every configuration of Table 2 has a finished run" in images


@pytest.mark.slow
def test_intro_reproduce_and_references_pages(built):
    html = Path(built["html"])
    intro = _text(_article(_read(html, "intro")))
    assert "What the paper claims" in intro and "at which scale" in intro
    assert "smallest configuration" in intro  # the quick build says its numbers are not results
    assert _article(_read(html, "intro")).count("<table") >= 2
    reproduce = _text(_article(_read(html, "reproduce")))
    for command in ("monoflow book", "papermill notebooks/", "--device cuda", "torchrun --nproc_per_node"):
        assert command in reproduce
    references = _text(_article(_read(html, "references")))
    assert "Invertible Monotone Operators for Normalizing Flows" in references


@pytest.mark.slow
def test_html_works_offline(built):
    html = Path(built["html"])
    assert external_resources(html) == {}
    for page in ["intro", *[f"chapters/{name}" for name in CHAPTERS]]:
        text = _read(html, page)
        scripts = re.findall(r'<script[^>]*src="([^"]+)"', text)
        mathjax = [src for src in scripts if "mathjax" in src.lower()]
        assert len(mathjax) == 1, f"{page}: MathJax scripts {mathjax}"
        assert (html / page).parent.joinpath(mathjax[0].split("?")[0]).is_file()
        for src in scripts:
            assert not re.match(r"(https?:)?//", src), f"{page} loads {src}"
    fonts = html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    assert len(list(fonts.glob("*.woff"))) > 10


@pytest.mark.slow
def test_no_execute_rebuilds_from_executed_copies(built, tmp_path):
    output = tmp_path / "copy"
    shutil.copytree(Path(built["output"]) / "source", output / "source")
    log: List[str] = []
    html = build_book(output, execute=False, progress=False, log=log.append)
    assert not any("running notebooks" in line for line in log)
    assert (html / "chapters" / "01_theory.html").is_file()
    assert "smallest configuration" in _read(html, "intro")  # the status of the executed chapters is kept
