"""Where and with what a result was made: package and torch versions, git commit, device, time.

Every results file and benchmark report carries :func:`provenance` so a number can be traced to
the code and machine that produced it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch

from monoflow.allocator import allocator_state

__all__ = ["provenance", "git_commit", "device_description", "cpu_kernels", "machine_of", "benchmark_report", "save_benchmark_report",
           "compare_timings", "run_benchmark"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> Optional[str]:
    try:
        completed = subprocess.run(["git", *args], cwd=_PACKAGE_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def git_commit() -> str:
    """The commit of the checkout the package runs from, with ``+dirty`` when the package's own
    files are modified (results written meanwhile do not count; ``"unknown"`` outside git)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no", "--", str(_PACKAGE_DIR))
    return commit + ("+dirty" if status else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_description(device: Union[str, torch.device] = "cpu") -> str:
    """``"cuda:0 (NVIDIA H200)"`` or ``"cpu (<model>, <vector ISA>, N threads)"``, where the ISA is
    the widest one torch's CPU kernels dispatch to (``AVX512``, ``AVX2``, ...): two CPUs with the
    same model name can differ in it, and so in speed."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({_cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def machine_of(description: str) -> str:
    """The machine part of a :func:`device_description`, without the thread count:
    ``"cpu (AMD EPYC, AVX2, 1 threads)"`` -> ``"cpu (AMD EPYC, AVX2)"``. Records written before the
    description named the vector ISA give ``"cpu (AMD EPYC)"``."""
    return re.sub(r", \d+ threads\)$", ")", str(description))


def cpu_kernels() -> str:
    """How CPila and (C)LipSwish compute on the CPU in this process: ``"fused"``
    (:mod:`monoflow.kernels`) or ``"plain operators (<why>)"``; CPU timings differ between the two."""
    from monoflow import kernels

    state = kernels.status()
    return "fused" if state["available"] else f"plain operators ({state['reason']})"


def provenance(device: Union[str, torch.device] = "cpu", **extra: Any) -> Dict[str, Any]:
    """Versions, commit, device, CPU kernels, time and command line, plus any ``extra`` fields."""
    from monoflow import __version__

    record: Dict[str, Any] = {
        "monoflow_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device_description(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": cpu_kernels(),
        "cpu_allocator": allocator_state(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    record.update(extra)
    return record


def benchmark_report(device: Union[str, torch.device] = "cpu", **extra: Any) -> Dict[str, Any]:
    """The head of a benchmark report: :func:`provenance`, the number of CPUs and the machine's
    load average when the benchmark started (timings on a busy machine are longer), ``extra``
    fields, and an empty ``runs`` list."""
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"provenance": provenance(device), "cpu_count": os.cpu_count(), "load_average_at_start": load,
            **extra, "runs": []}


def save_benchmark_report(report: Dict[str, Any], path: Union[str, Path]) -> None:
    """Write a benchmark report as JSON (after every measurement: a stopped benchmark keeps its rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def compare_timings(baseline: str, baseline_s: float, candidate: str, candidate_s: float, iterations: int,
                    target_minutes: float) -> Dict[str, Any]:
    """Seconds per iteration of two ways to train, their ratio (baseline over candidate), and each
    one's projected run of ``iterations`` against ``target_minutes``."""
    return {
        f"{baseline}_s_per_iteration": baseline_s,
        f"{candidate}_s_per_iteration": candidate_s,
        "speedup": baseline_s / candidate_s,
        f"projected_run_minutes_{baseline}": baseline_s * iterations / 60,
        f"projected_run_minutes_{candidate}": candidate_s * iterations / 60,
        "target_minutes": target_minutes,
        f"{candidate}_meets_target": candidate_s * iterations / 60 <= target_minutes,
    }


def run_benchmark(report: Dict[str, Any], names: Iterable[Any], measure: Callable[[Any], Dict[str, Any]],
                  describe: Callable[[Dict[str, Any]], str], path: Union[str, Path]) -> Dict[str, Any]:
    """``measure(name)`` for each name: append the row to ``report["runs"]``, print
    ``describe(row)`` and save the report after every row (:func:`save_benchmark_report`)."""
    for name in names:
        row = measure(name)
        report["runs"].append(row)
        print(describe(row), flush=True)
        save_benchmark_report(report, path)
    print(f"wrote {path}")
    return report
