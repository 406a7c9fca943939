"""Model builders: the toy and regression flows of the paper's small experiments, image flows."""
from monoflow.models.image import image_flow, list_image_presets
from monoflow.models.toy import REGRESSION_KINDS, TOY_KINDS, regression_flow, toy_flow

__all__ = ["toy_flow", "regression_flow", "image_flow", "list_image_presets", "TOY_KINDS", "REGRESSION_KINDS"]
