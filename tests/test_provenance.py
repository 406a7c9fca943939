"""Benchmark reports (the timing comparison and the measure-and-save loop) and the device record."""
import json

import pytest
import torch

from monoflow.provenance import benchmark_report, compare_timings, device_description, machine_of, run_benchmark


def test_the_cpu_description_names_the_vector_isa_and_the_thread_count():
    """Runs on CPUs with one model name but different vector units differ about twice in speed, so
    the record names the ISA torch dispatches to, not only the model."""
    described = device_description("cpu")
    assert described.startswith("cpu (") and described.endswith(f", {torch.get_num_threads()} threads)")
    assert f", {torch.backends.cpu.get_cpu_capability()}, " in described
    assert machine_of(described) == described.rsplit(", ", 1)[0] + ")"
    assert machine_of("cpu (AMD EPYC, 12 threads)") == "cpu (AMD EPYC)"  # a record from before the ISA was named
    assert machine_of("cuda:0 (NVIDIA H200)") == "cuda:0 (NVIDIA H200)"


def test_compare_timings_projects_both_runs_against_the_target():
    row = compare_timings("eager", 0.2, "compiled", 0.05, 1200, 2.0)
    assert row["speedup"] == pytest.approx(4.0)
    assert row["projected_run_minutes_eager"] == pytest.approx(4.0)
    assert row["projected_run_minutes_compiled"] == pytest.approx(1.0)
    assert row["compiled_meets_target"] is True and row["target_minutes"] == 2.0
    assert compare_timings("a", 1.0, "b", 0.5, 600, 1.0)["b_meets_target"] is False  # 5 minutes


def test_run_benchmark_saves_the_report_after_every_row(tmp_path, capsys):
    path = tmp_path / "report.json"
    seen = []

    def measure(name):
        if seen:  # the first row is on disk before the second is measured
            assert [row["name"] for row in json.loads(path.read_text())["runs"]] == seen
        seen.append(name)
        return {"name": name, "value": len(name)}

    report = run_benchmark(benchmark_report("cpu", threads=1), ["a", "bb"], measure,
                           lambda row: f"{row['name']}={row['value']}", path)
    written = json.loads(path.read_text())
    assert written["runs"] == report["runs"] == [{"name": "a", "value": 1}, {"name": "bb", "value": 2}]
    assert written["threads"] == 1 and "git_commit" in written["provenance"]
    assert capsys.readouterr().out.splitlines() == ["a=1", "bb=2", f"wrote {path}"]


def test_provenance_and_sessions_name_the_cpu_kernels(monkeypatch):
    """CPU timings differ between the fused kernels and the plain operators, so every record and
    every session of a run says which computed; a switched-off process says why."""
    from monoflow import kernels
    from monoflow.provenance import provenance
    from monoflow.training.loop import session_entry

    record = provenance("cpu")
    assert record["cpu_kernels"] == ("fused" if kernels.available() else f"plain operators ({kernels.status()['reason']})")
    assert session_entry(record, 7, {})["cpu_kernels"] == record["cpu_kernels"]
    older = {key: value for key, value in record.items() if key != "cpu_kernels"}  # a record from before
    assert "cpu_kernels" not in session_entry(older, 7, {})
    monkeypatch.setitem(kernels._state, "status", {"available": False, "reason": "switched off by X", "library": None})
    assert provenance("cpu")["cpu_kernels"] == "plain operators (switched off by X)"
