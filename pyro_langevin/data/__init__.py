"""Data adapters: NLB'21 datasets (:mod:`pyro_langevin.data.nlb`) and their h5 tensor files."""

from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.nlb import (
    NLBData, build_training_batch, heldin_only, load_nlb, load_preprocessed, split_train_valid,
)

__all__ = ["NLBData", "NLBDataError", "build_training_batch", "heldin_only", "load_nlb",
           "load_preprocessed", "split_train_valid"]
