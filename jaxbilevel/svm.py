"""SVM hyperparameter optimisation with coupled constraints (LIBSVM diabetes, fourclass).

References:
  L. Jiang, Q. Xiao, V. M. Tenorio, F. Real-Rojas, A. G. Marques, T. Chen.
  *A Primal-Dual-Assisted Penalty Approach to Bilevel Optimization with
  Coupled Constraints*, NeurIPS 2024, arXiv:2406.10148.

  L. Jiang, Q. Xiao, L. Chen, T. Chen. *Efficient Penalty-Based Bilevel
  Methods: Improved Analysis, Novel Updates, and Flatness Condition*,
  arXiv:2511.16796. Its code (``Liuyuan999/PBGD_Free``), notebook
  ``SVM/SVM_Tests.ipynb``, gives the hyperparameters (``AUTHORS_HPARAMS``),
  the order of the draws of the start (``AUTHORS_DRAW``) and the protocol
  that ``benchmarks/svm.py`` repeats: 3 seeds, splits shuffled in place one
  after the other, accuracy after 49 outer iterations.
"""

from jaxbilevel._src.svm import accuracy
from jaxbilevel._src.svm import AUTHORS_DRAW
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
from jaxbilevel._src.svm import torch_cpu_uniform
from jaxbilevel._src.svm import upper_objective
from jaxbilevel._src.svm import validation_loss

__all__ = ("AUTHORS_DRAW", "AUTHORS_HPARAMS", "C_FLOOR",
           "FitResult", "MULTIPLIER_FLOOR", "SVMData", "accuracy", "constraint", "fit", "initial_params",
           "lower_objective", "project_margins", "torch_cpu_uniform",
           "upper_objective", "validation_loss")
