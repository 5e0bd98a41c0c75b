"""Data that is not tied to one benchmark: the Lorenz generator, h5 tensor files, trial splits and
the data errors. The Neural Latents Benchmark adapters live in :mod:`pyro_langevin.nlb`."""

from pyro_langevin.data.errors import NLBDataError

__all__ = ["NLBDataError"]
