"""The reproduction status in the book's introduction: which experiments have finished runs,
at which presets, iterations and devices."""
from __future__ import annotations

from pathlib import Path
from typing import List

from monoflow.notebooks.paths import repository_root

__all__ = ["reproduction_status"]


def reproduction_status(results_dir: Path, quick: bool = False) -> str:
    """A Markdown summary of the finished runs in ``results_dir`` for the book's introduction.

    One table row per experiment and preset: finished runs, iterations, devices. Experiments
    without runs are listed as not yet reproduced. ``quick`` adds a line saying the book was
    built in its smallest configuration (numbers from a few training steps, not results).
    """
    from monoflow.experiments.results import find_runs
    from monoflow.images.results import read_runs

    results_dir = Path(results_dir)
    rows: List[str] = []
    labels = {"regression1d": "1-D expressivity (Figure 4)", "toy2d": "2-D toy densities (Table 1)"}
    for experiment, label in labels.items():
        runs = find_runs(results_dir, experiment)
        if not runs:
            rows.append(f"| {label} | - | 0 | - | - | not yet reproduced |")
        for preset in sorted({run["preset"] for run in runs}):
            part = [run for run in runs if run["preset"] == preset]
            iterations = sorted({int(run["timing"]["iterations"]) for run in part})
            devices = sorted({str(run["provenance"]["device"]) for run in part})
            rows.append(f"| {label} | `{preset}` | {len(part)} | {', '.join(f'{i:,}' for i in iterations)} | "
                        f"{', '.join(devices)} | finished runs |")
    image_runs = read_runs(results_dir / "images") if (results_dir / "images").is_dir() else []
    if not image_runs:
        rows.append("| Image benchmarks (Table 2) | - | 0 | - | - | not yet reproduced |")
    for preset in sorted({run["preset"] for run in image_runs}):
        part = [run for run in image_runs if run["preset"] == preset]
        iterations = sorted({int(run.get("iterations") or 0) for run in part})
        devices = sorted({str(run.get("provenance", {}).get("gpu") or run.get("provenance", {}).get("device"))
                          for run in part})
        scale = sorted({str(run.get("scale") or "") for run in part})
        rows.append(f"| Image benchmarks (Table 2) | `{preset}` | {len(part)} | "
                    f"{', '.join(f'{i:,}' for i in iterations)} | {', '.join(devices)} | {', '.join(scale)} |")
    lines = ["| experiment | preset | runs | iterations | device | status / scale |",
             "| --- | --- | --- | --- | --- | --- |", *rows, ""]
    if quick:
        lines.insert(0, "```{note}\nThis copy of the book was built in its smallest configuration "
                        "(`monoflow book --quick`): the 1-D and 2-D chapters retrain their models for a "
                        "few steps only, so their numbers test the pipeline and are not results.\n```\n")
    try:
        shown = results_dir.resolve().relative_to(repository_root())
    except (ValueError, FileNotFoundError):
        shown = results_dir
    lines.insert(0 if not quick else 1, f"Results folder: `{shown}`.\n")
    return "\n".join(lines)
