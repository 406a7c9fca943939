"""Training, evaluation and results of the image flows (Table 2).

* :mod:`~monoflow.images.training`: :func:`train_image_flow` (resumable, data parallel),
* :mod:`~monoflow.images.evaluation`: unbiased test bpd with its spread over estimator draws,
* :mod:`~monoflow.images.distributed`, :mod:`~monoflow.images.ema`, :mod:`~monoflow.images.checkpoint`,
* :mod:`~monoflow.images.results`: ``run.json`` with provenance and :func:`image_table` for the book,
* :mod:`~monoflow.images.benchmark`: throughput / memory / solver-count measurements.
"""
from monoflow.images.evaluation import evaluate_accuracy, evaluate_bpd, prepare_for_evaluation
from monoflow.images.results import image_table, read_runs
from monoflow.images.training import apply_precision_policy, load_ema_model, train_image_flow

__all__ = ["train_image_flow", "evaluate_bpd", "evaluate_accuracy", "prepare_for_evaluation", "image_table",
           "read_runs", "apply_precision_policy", "load_ema_model"]
