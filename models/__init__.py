"""Pyro models: ``model(batch)`` with a plate over trials and per-bin ``v_t`` sites."""

from pyro_langevin.models.langevin_flow import LangevinFlow, velocity_site

__all__ = ["LangevinFlow", "velocity_site"]
