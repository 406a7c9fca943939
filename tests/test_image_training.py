"""Image training loop: run records, resume from checkpoints, 2 gloo processes against one process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monoflow.checkpoint import FolderLock
from monoflow.cli import main as cli_main
from monoflow.data.images import ImageArray
from monoflow.images import image_table, train_image_flow
from monoflow.images.checkpoint import load_checkpoint

TINY_MODEL = dict(image_shape=(1, 4, 4), blocks=(1, 1), growth=8, depth=2, fc_blocks=1, fc_first=8, fc_growth=8,
                  n_levels=17)
TINY_TRAINING = dict(batch_size=8, log_every=1, checkpoint_every=100, warmup_iterations=2, eval_batch_size=20,
                     n_eval_draws=2, n_samples=4, ema_decay=0.9)


def synthetic(n: int, seed: int) -> ImageArray:
    rng = np.random.default_rng(seed)
    return ImageArray(rng.integers(0, 17, size=(n, 1, 4, 4), dtype=np.uint8), rng.integers(0, 10, size=n), 17,
                      "synthetic")


def run(tmp, iterations, logdet="russian_roulette", **kw):
    return train_image_flow(
        "digits", run_dir=str(tmp), iterations=iterations, progress=False, device="cpu",
        model_overrides={**TINY_MODEL, "logdet": logdet}, training_overrides=TINY_TRAINING,
        train_data=synthetic(40, 0), test_data=synthetic(12, 1), **kw,
    )


def test_run_record_and_table(tmp_path):
    out = tmp_path / "digits" / "monotone" / "seed0"
    record = run(out, 3)
    saved = json.loads((out / "run.json").read_text())
    assert saved["iterations"] == 3 and saved["kind"] == "images"
    metrics = saved["metrics"]
    assert set(metrics) >= {"bpd_test", "bpd_std", "bpd_draws", "train_surrogate_bpd_last"}
    assert len(metrics["bpd_draws"]) == 2 and 0 < metrics["bpd_test"] < 10
    assert all("train_surrogate_bpd" in e and "bpd_test" not in e for e in saved["train_log"])
    assert saved["precision"] == {"dtype": "float32", "tf32": False}
    assert saved["provenance"]["torch_version"] == torch.__version__
    assert (out / "samples.png").exists() and (out / "log.jsonl").exists()
    table = image_table(tmp_path)
    assert list(table["preset"]) == ["digits"] and table["bpd_test"][0] == pytest.approx(metrics["bpd_test"])
    assert table["samples"][0].endswith("samples.png") and table["params"][0] == record["params"]


def test_a_run_folder_in_use_is_refused(tmp_path):
    """A second training in a folder that one is training in stops before it writes anything."""
    out = tmp_path / "run"
    with FolderLock(out):
        with pytest.raises(RuntimeError, match="run is in use"):
            run(out, 2)
    assert sorted(p.name for p in out.iterdir()) == [".training.lock"]
    assert run(out, 2)["iterations"] == 2


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    run(straight, 4, final_evaluation=False)
    resumed = tmp_path / "resumed"
    run(resumed, 2, final_evaluation=False)
    assert load_checkpoint(resumed)["step"] == 2
    run(resumed, 4, final_evaluation=False)  # the same command with more steps continues
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for key in a["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][key], b["ema"]["shadow"][key], rtol=0, atol=0)
    assert [e["train_surrogate_bpd"] for e in a["log"]] == [e["train_surrogate_bpd"] for e in b["log"]]


def test_other_checkpoint_is_refused(tmp_path):
    run(tmp_path, 1, final_evaluation=False)
    with pytest.raises(ValueError, match="holds a checkpoint"):
        train_image_flow("digits", model="idensenet", run_dir=str(tmp_path), iterations=2, progress=False,
                         model_overrides=TINY_MODEL, training_overrides=TINY_TRAINING,
                         train_data=synthetic(40, 0), test_data=synthetic(12, 1))


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from test_image_training import run
run({out!r}, 3, logdet="exact", final_evaluation=False)
"""


def test_two_gloo_processes_match_one_process(tmp_path):
    single = tmp_path / "single"
    run(single, 3, logdet="exact", final_evaluation=False)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(tmp_path / "ddp")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_checkpoint(single), load_checkpoint(tmp_path / "ddp")
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    for la, lb in zip(a["log"], b["log"]):
        assert la["train_surrogate_bpd"] == pytest.approx(lb["train_surrogate_bpd"], abs=1e-5)
    assert (tmp_path / "ddp" / "rng_rank1.pt").exists()


def test_cli(capsys, tmp_path):
    assert cli_main(["images", "presets"]) == 0
    listing = capsys.readouterr().out
    assert "cifar10-ablation-1" in listing and "imagenet64" in listing
    assert cli_main(["images", "evaluate", "--preset", "digits", "--results-dir", str(tmp_path)]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert cli_main(["images", "train", "--preset", "cifar10", "--data-root", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


class _PreemptingData(ImageArray):
    """Training data that sends SIGTERM to its own process when its second batch is read."""

    def batch(self, indices):
        import signal

        count = getattr(self, "_count", 0) + 1
        object.__setattr__(self, "_count", count)
        if count == 2:
            signal.raise_signal(signal.SIGTERM)
        return super().batch(indices)


def test_sigterm_checkpoints_and_rerun_resumes(tmp_path):
    straight = tmp_path / "straight"
    run(straight, 4, final_evaluation=False)
    base = synthetic(40, 0)
    preempting = _PreemptingData(base.images, base.labels, base.n_levels, base.name)
    out = train_image_flow(
        "digits", run_dir=str(tmp_path / "job"), iterations=4, progress=False, device="cpu",
        model_overrides={**TINY_MODEL, "logdet": "russian_roulette"}, training_overrides=TINY_TRAINING,
        train_data=preempting, test_data=synthetic(12, 1), final_evaluation=False,
    )
    # read 1 is the ActNorm initialisation batch, read 2 the first step: that step finishes, then saves
    assert out["preempted"] and out["step"] == 1
    run(tmp_path / "job", 4, final_evaluation=False)
    a, b = load_checkpoint(straight), load_checkpoint(tmp_path / "job")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


def test_classification_and_variational_dequantization_train(tmp_path):
    clf = train_image_flow(
        "digits", run_dir=str(tmp_path / "clf"), iterations=2, progress=False, device="cpu",
        model_overrides={**TINY_MODEL, "task": "classification", "preprocessing": "normalize",
                         "classification_hidden": 8},
        training_overrides={**TINY_TRAINING, "random_flip": True, "random_crop_padding": 1},
        train_data=synthetic(40, 0), test_data=synthetic(12, 1),
    )
    assert 0.0 <= clf["metrics"]["accuracy"] <= 1.0 and clf["train_log"][0]["train_cross_entropy"] > 0
    vdq = train_image_flow(
        "digits", run_dir=str(tmp_path / "vdq"), iterations=2, progress=False, device="cpu",
        model_overrides={**TINY_MODEL, "dequantization": "variational", "vardeq_blocks": 1,
                         "vardeq_cond_channels": 16, "vardeq_hidden": 16, "vardeq_bottlenecks": 1},
        training_overrides=TINY_TRAINING, train_data=synthetic(40, 0), test_data=synthetic(12, 1),
    )
    assert len(vdq["metrics"]["bpd_draws"]) == 2 and all(math.isfinite(v) for v in vdq["metrics"]["bpd_draws"])


def test_stop_after_and_resume_record_sessions_like_toy_runs(tmp_path):
    """The shared loop: ``stop_after`` stops with a checkpoint, the rerun resumes, and each start
    is a session in run.json and a line in train.log, as for the toy runs."""
    stopped = run(tmp_path, 3, stop_after=1, final_evaluation=False)
    assert stopped["status"] == "interrupted" and stopped["step"] == 1 and not (tmp_path / "run.json").exists()
    record = run(tmp_path, 3, final_evaluation=False)
    assert record["iterations"] == 3
    assert [session["iteration"] for session in record["sessions"]] == [0, 1]
    assert all(session["git_commit"] and session["device"] for session in record["sessions"])
    log = (tmp_path / "train.log").read_text()
    assert "session at iteration 0" in log and "resuming" in log and "session at iteration 1" in log


def test_a_non_finite_loss_stops_the_image_run_with_an_error(tmp_path, monkeypatch):
    """A nan loss stops training with an error naming the step and the run's log (before the
    shared loop, image runs went on training, with nan weights once the gradients were nan)."""
    from monoflow.models.image import ImageFlow
    from monoflow.training import TrainingDiverged

    original = ImageFlow.bits_per_dim

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs) + float("nan")

    monkeypatch.setattr(ImageFlow, "bits_per_dim", poisoned)
    with pytest.raises(TrainingDiverged, match="training diverged .*iteration 1"):
        run(tmp_path, 2, final_evaluation=False)
    assert "diverged" in (tmp_path / "train.log").read_text()


def test_log_jsonl_holds_the_checkpointed_steps_only(tmp_path):
    """Steps logged after the last checkpoint (a killed run) or by an earlier run that left no
    checkpoint are not kept twice: log.jsonl is rewritten from the checkpoint when a run starts."""
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "train_surrogate_bpd": 99.0}) + "\n")
    run(tmp_path, 2, final_evaluation=False)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and lines[0]["train_surrogate_bpd"] != 99.0
    with open(tmp_path / "log.jsonl", "a") as handle:  # as if step 3 was logged, then the run killed
        handle.write(json.dumps({"step": 3, "train_surrogate_bpd": 99.0}) + "\n")
    run(tmp_path, 4, final_evaluation=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_cli_stop_after_then_resume(capsys, tmp_path):
    """``images train --stop-after`` stops with a checkpoint; the same command without it resumes."""
    command = ["images", "train", "--preset", "digits", "-o", str(tmp_path), "--device", "cpu", "--no-progress",
               "--iterations", "2", "--eval-every", "0", "--eval-limit", "16", "--draws", "1", "--set", "blocks=1,1",
               "--set", "growth=8", "--set", "fc_blocks=1", "--set", "n_samples=4"]
    assert cli_main(command + ["--stop-after", "1"]) == 0
    run_dir = tmp_path / "images" / "digits" / "monotone" / "seed0"
    assert load_checkpoint(run_dir)["step"] == 1 and not (run_dir / "run.json").exists()
    assert cli_main(command) == 0
    assert json.loads((run_dir / "run.json").read_text())["iterations"] == 2
    assert "resuming" in (run_dir / "train.log").read_text()


def test_curve_points_use_test_images_spread_over_the_split(tmp_path):
    """With ``eval_curve_images`` below the test split's size, every curve point evaluates the same
    images drawn over the whole split (a split ordered by class keeps every class), and says so."""
    from monoflow.data.images import spread_subset

    ordered = ImageArray(np.repeat(np.arange(10, dtype=np.uint8), 10).reshape(100, 1, 1, 1).repeat(16, 1)
                         .reshape(100, 1, 4, 4), np.repeat(np.arange(10), 10), 17, "ordered")
    subset = spread_subset(ordered, 30)
    assert len(subset) == 30 and len(set(subset.labels.tolist())) >= 8  # the first 30 would be 3 classes
    assert np.array_equal(subset.labels, spread_subset(ordered, 30).labels)  # the same images each time
    assert spread_subset(ordered, 100) is ordered
    record = train_image_flow(
        "digits", run_dir=str(tmp_path), iterations=2, progress=False, device="cpu",
        model_overrides={**TINY_MODEL, "logdet": "russian_roulette"},
        training_overrides={**TINY_TRAINING, "eval_every": 1, "eval_curve_images": 30},
        train_data=synthetic(40, 0), test_data=ordered, final_evaluation=False)
    points = record["evaluations"]
    assert [p["step"] for p in points] == [1] and points[0]["n_test_images"] == 30
    assert points[0]["curve_subset"] == "spread, seed 0"
