"""benchmarks/gpu_check.sh end to end on the CPU (--cpu-smoke), and its budget arithmetic."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from monoflow.images.gpu_check import PAPER_RUNS, _budget
from monoflow.models.image import get_image_preset

ROOT = Path(__file__).resolve().parents[1]


def test_budget_from_one_micro_batch():
    """MNIST: 64 images x 4 accumulation per step, 60,000 images, 1000 epochs, one GPU."""
    out = _budget("mnist", {"seconds_per_micro_batch": 2.0, "peak_memory_mb": 1024.0})
    step = 2.0 * (64 * 4) / 64
    assert out["one_gpu_optimiser_step_s"] == pytest.approx(step)
    assert out["one_gpu_epoch_hours"] == pytest.approx(step * (60_000 // 256) / 3600)
    assert out["one_gpu_budget_days"] == pytest.approx(out["one_gpu_epoch_hours"] * 1000 / 24)
    assert out["fits_80gb"] is True
    assert _budget("cifar10", {"error": "CUDA out of memory"})["fits_80gb"] is False
    for preset, (gpus, per_gpu, _) in PAPER_RUNS.items():  # the per-GPU batch divides the global batch
        assert get_image_preset(preset).training.batch_size % per_gpu == 0


@pytest.mark.slow
def test_gpu_check_cpu_smoke_end_to_end(tmp_path):
    out = tmp_path / "check.json"
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--presets", "mnist",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=600, capture_output=True)
    report = json.loads(out.read_text())
    assert report["finished"] and report["cpu_smoke"] and report["device"] == "cpu"
    assert [t["model"] for t in report["throughput"]] == ["monotone", "idensenet"]
    assert all(t["images_per_s"] > 0 and t["eval_bpd"] > 0 for t in report["throughput"])
    mnist = report["presets"]["mnist"]
    assert mnist["accumulation_steps"] == 4 and mnist["fits_80gb"] is True and mnist["one_gpu_epoch_hours"] > 0
    assert mnist["seconds_per_step"] == pytest.approx(4 * mnist["seconds_per_micro_batch"])
    phases = report["step_cost"]["g_evaluations_per_block"]
    assert phases["forward_solve"] >= 1 and phases["logdet_estimator"] > 1 and phases["backward"] > 0


def test_every_smoke_model_builds_and_keeps_its_preset_layout():
    from monoflow.images.gpu_check import _smoke_overrides
    from monoflow.models.image import image_flow

    for preset in PAPER_RUNS:
        model = image_flow(preset, **_smoke_overrides(preset))
        assert model.config.image_shape == get_image_preset(preset).model.image_shape
        assert model.config.dequantization == get_image_preset(preset).model.dequantization
