"""Model builders: the toy and regression flows of the paper's small experiments, image flows."""
from monoflow.models.toy import REGRESSION_KINDS, TOY_KINDS, regression_flow, toy_flow

__all__ = ["toy_flow", "regression_flow", "TOY_KINDS", "REGRESSION_KINDS"]
