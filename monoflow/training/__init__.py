"""Training shared by every experiment: the one loop (:mod:`~monoflow.training.loop`) and the
configuration check on resumption (:mod:`~monoflow.training.configs`)."""
from monoflow.training.configs import check_same_config, config_changes
from monoflow.training.loop import (LoopState, RunLog, TrainingDiverged, TrainingRun, non_finite_parameters, session_entry,
                                    train_run)

__all__ = ["RunLog", "LoopState", "TrainingRun", "TrainingDiverged", "train_run", "session_entry", "non_finite_parameters",
           "config_changes", "check_same_config"]
