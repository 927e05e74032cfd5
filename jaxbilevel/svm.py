"""SVM hyperparameter optimisation with coupled constraints (LIBSVM diabetes, fourclass)."""

from jaxbilevel._src.svm import accuracy
from jaxbilevel._src.svm import AUTHORS_DRAW
from jaxbilevel._src.svm import AUTHORS_HPARAMS
from jaxbilevel._src.svm import AUTHORS_NOTEBOOK
from jaxbilevel._src.svm import C_FLOOR
from jaxbilevel._src.svm import constraint
from jaxbilevel._src.svm import fit
from jaxbilevel._src.svm import FitResult
from jaxbilevel._src.svm import initial_params
from jaxbilevel._src.svm import lower_objective
from jaxbilevel._src.svm import MULTIPLIER_FLOOR
from jaxbilevel._src.svm import project_margins
from jaxbilevel._src.svm import SVMData
from jaxbilevel._src.svm import torch_cpu_uniform
from jaxbilevel._src.svm import upper_objective
from jaxbilevel._src.svm import validation_loss

__all__ = ("AUTHORS_DRAW", "AUTHORS_HPARAMS", "AUTHORS_NOTEBOOK", "C_FLOOR",
           "FitResult", "MULTIPLIER_FLOOR", "SVMData", "accuracy", "constraint", "fit", "initial_params",
           "lower_objective", "project_margins", "torch_cpu_uniform",
           "upper_objective", "validation_loss")
