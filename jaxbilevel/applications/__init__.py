"""Bilevel applications with real data, each usable on its own and in ``benchmarks/run.py``.

* :mod:`~jaxbilevel.applications.hyper_cleaning`: data hyper-cleaning on
  scikit-learn's digits.
* :mod:`~jaxbilevel.applications.regularization`: per-feature L2
  regularisation of a logistic regression on scikit-learn's breast-cancer
  data.
* :mod:`~jaxbilevel.applications.nlsy`: NLSY79 fair representation learning
  (reads a CSV path).
* :mod:`~jaxbilevel.applications.dpo_sft`: DPO over LoRA adapters / SFT over
  the output head of a small flax transformer language model.
* :mod:`~jaxbilevel.applications.sinusoid`: few-shot sinusoid regression
  (meta-learning).

Each module has a ``problem(...)`` that returns an :class:`Application`
(objectives ``f``/``g``, initial :class:`~jaxbilevel.BilevelParams`, a full
batch or a batch sampler, and a jittable ``evaluate``).
"""

from jaxbilevel.applications import dpo_sft
from jaxbilevel.applications import hyper_cleaning
from jaxbilevel.applications import nlsy
from jaxbilevel.applications import regularization
from jaxbilevel.applications import sinusoid
from jaxbilevel.applications._common import Application
from jaxbilevel.applications._common import batch_stream
from jaxbilevel.applications._common import one_batch

__all__ = ("Application", "batch_stream", "dpo_sft", "hyper_cleaning", "nlsy",
           "one_batch", "regularization", "sinusoid")
