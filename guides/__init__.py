"""Pyro guides with the model's signature ``guide(batch)``; any guide fits any model with the same sites."""

from pyro_langevin.guides.gru import GRUGuide

__all__ = ["GRUGuide"]
