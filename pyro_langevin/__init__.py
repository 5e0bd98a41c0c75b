"""pyro-langevin: LangevinFlow latent dynamics for spike trains, as a Pyro model with swappable guides."""

from pyro_langevin.batch import Batch, BatchError, make_batch

__version__ = "0.1.0"
__all__ = ["Batch", "BatchError", "make_batch", "__version__"]
