"""The one exception the NLB data layer raises for bad inputs."""

from __future__ import annotations

from pyro_langevin.errors import InputError

__all__ = ["NLBDataError"]


class NLBDataError(InputError):
    """Raised for missing, malformed or inconsistent NLB data; the message names the problem.

    Subclasses :class:`ValueError` so callers that already catch bad-value errors keep working.
    """
