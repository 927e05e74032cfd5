# Evaluating bilevel runs honestly: f at the lower-level solution y*(x). The
# module documentation is that of jaxbilevel._src.evaluation (set below).

from jaxbilevel._src import evaluation as _impl
from jaxbilevel._src.evaluation import EVALUATION_KEYS
from jaxbilevel._src.evaluation import lower_level_evaluation

__doc__ = _impl.__doc__  # pylint: disable=redefined-builtin

__all__ = ("EVALUATION_KEYS", "lower_level_evaluation")
