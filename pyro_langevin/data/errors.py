"""The one exception the NLB data layer raises for bad inputs."""

from __future__ import annotations

__all__ = ["NLBDataError"]


class NLBDataError(ValueError):
    """Raised for missing, malformed or inconsistent NLB data; the message names the problem.

    Subclasses :class:`ValueError` so callers that already catch bad-value errors keep working.
    """
