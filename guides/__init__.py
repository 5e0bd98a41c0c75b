"""Pyro guides with the model's signature ``guide(batch)``; any guide fits any model with the same sites."""

from pyro_langevin.guides.gru import GRUGuide
from pyro_langevin.guides.autoregressive import AutoregressiveGuide
from pyro_langevin.guides.base import StepwiseGuide
from pyro_langevin.guides.bigru import BiGRUGuide
from pyro_langevin.guides.initial_state import InitialStateGuide
from pyro_langevin.guides.meanfield import MeanFieldGuide

__all__ = ["GRUGuide"]
__all__ += ["BiGRUGuide", "InitialStateGuide", "MeanFieldGuide", "AutoregressiveGuide", "StepwiseGuide"]
