"""LIBSVM data sets and the splits of the SVM benchmark of Jiang et al. (NeurIPS 2024)."""

from jaxbilevel._src.datasets import DatasetError
from jaxbilevel._src.datasets import diabetes_features
from jaxbilevel._src.datasets import download
from jaxbilevel._src.datasets import KNOWN_DATASETS
from jaxbilevel._src.datasets import LIBSVM_URL
from jaxbilevel._src.datasets import load_diabetes
from jaxbilevel._src.datasets import load_fourclass
from jaxbilevel._src.datasets import load_libsvm
from jaxbilevel._src.datasets import parse_libsvm
from jaxbilevel._src.datasets import random_splits
from jaxbilevel._src.datasets import sample_path
from jaxbilevel._src.datasets import Split
from jaxbilevel._src.datasets import train_val_test_split

__all__ = ("DatasetError", "KNOWN_DATASETS", "LIBSVM_URL", "Split",
           "diabetes_features", "download", "load_diabetes", "load_fourclass",
           "load_libsvm", "parse_libsvm", "random_splits", "sample_path",
           "train_val_test_split")
