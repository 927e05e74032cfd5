"""SVM hyperparameter optimisation with coupled constraints (``PROBLEMS.md`` §B3)."""

from jaxbilevel._src.svm import accuracy
from jaxbilevel._src.svm import AUTHORS_HPARAMS
from jaxbilevel._src.svm import C_FLOOR
from jaxbilevel._src.svm import constraint
from jaxbilevel._src.svm import fit
from jaxbilevel._src.svm import FitResult
from jaxbilevel._src.svm import initial_params
from jaxbilevel._src.svm import lower_objective
from jaxbilevel._src.svm import MULTIPLIER_FLOOR
from jaxbilevel._src.svm import project_margins
from jaxbilevel._src.svm import SVMData
from jaxbilevel._src.svm import upper_objective
from jaxbilevel._src.svm import validation_loss

__all__ = ("AUTHORS_HPARAMS", "C_FLOOR", "FitResult", "MULTIPLIER_FLOOR",
           "SVMData", "accuracy", "constraint", "fit", "initial_params",
           "lower_objective", "project_margins", "upper_objective",
           "validation_loss")
