"""How the encoders see spike counts: one transform, shared by the guides and coordinated dropout.

Encoders read ``encoder_features(counts) = log1p(counts)``. Coordinated dropout must leave the
distribution of those features the same in training as at test time, so it rescales the *features*
of the kept entries by ``1 / keep`` (their expectation over the mask is then the unmasked feature),
not the raw counts: ``log1p(counts / keep)`` is not ``log1p(counts) / keep``.
:func:`counts_with_features` maps rescaled features back to the count scale the batch carries.
"""

from __future__ import annotations

import torch

__all__ = ["encoder_features", "counts_with_features"]


def encoder_features(counts: torch.Tensor) -> torch.Tensor:
    """The encoders' input features, ``log1p(counts)``, same shape as ``counts``."""
    return torch.log1p(counts)


def counts_with_features(features: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encoder_features`: values whose features are ``features`` (non-negative
    where they are; a stitched guide's read-in features below 0 give values in (-1, 0))."""
    return torch.expm1(features)
