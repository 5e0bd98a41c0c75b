"""Poisson data thinning: a held-out score of every unit's rates, including the units the guide reads.

A Poisson count ``y ~ Poisson(r)`` split as ``y1 ~ Binomial(y, keep)``, ``y2 = y - y1`` gives two
INDEPENDENT Poisson counts, ``y1 ~ Poisson(keep r)`` and ``y2 ~ Poisson((1 - keep) r)`` (Neufeld,
Dharamshi, Gao & Witten, *Data thinning for convolution-closed distributions*, JMLR 2024). A model
fitted to ``y1`` alone and scored on ``y2`` cannot gain by copying the spikes it read into its
rates: ``y2``'s noise is independent of ``y1``'s. Its Poisson log-likelihood of ``y2`` is a proper
score of the rates themselves, maximised in expectation by the true ``(1 - keep) r``, so it tracks
rate recovery, which co-smoothing (a score of held-out units only) need not: a recipe can predict
held-out units well and still copy the held-in units' noise into their rates.

:func:`thin` splits counts; :func:`thinned_bits_per_spike` scores rates fitted to ``y1`` on ``y2``;
:func:`thinned_metric` is the same as a :func:`~pyro_langevin.training.fit` validation metric.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.metrics import bits_per_spike
from pyro_langevin.posterior import posterior_rates

__all__ = ["thin", "thinned_bits_per_spike", "thinned_metric", "METRIC"]

#: The metric's name in a fit's history (``select_on``).
METRIC = "thinned_bps"


def thin(counts: np.ndarray, keep: float, seed: Any = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split whole counts into ``(y1, y2)``: ``y1 ~ Binomial(counts, keep)``, ``y2 = counts - y1``.

    Raises
    ------
    ValueError
        ``keep`` outside (0, 1), or counts that are negative or not whole numbers.
    """
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep!r}")
    c = np.asarray(counts)
    if (c < 0).any() or not np.array_equal(c, np.round(c)):
        raise ValueError("thin: counts must be whole non-negative numbers")
    whole = c.astype(np.int64)
    y1 = np.random.default_rng(seed).binomial(whole, keep)
    return y1.astype(c.dtype), (whole - y1).astype(c.dtype)


def thinned_bits_per_spike(rates_y1: np.ndarray, y2: np.ndarray, keep: float) -> float:
    """Bits per spike of ``y2`` under rates fitted to ``y1`` (scaled by ``(1 - keep) / keep``), above each
    unit's mean ``y2`` rate (:func:`~pyro_langevin.metrics.bits_per_spike`; NaN entries of ``y2`` are
    not scored)."""
    return bits_per_spike(np.asarray(rates_y1) * ((1 - keep) / keep), np.asarray(y2, dtype=float))


def thinned_metric(y2: torch.Tensor, keep: float, n_samples: int = 10, seed: int = 0) -> Callable[..., Dict[str, float]]:
    """A ``fit`` metric ``{"thinned_bps": ...}``: posterior-mean rates of the validation batch (fitted to
    ``y1``) scored on ``y2`` (trial, time, unit) with NaN where unobserved, rows matched by the batch's
    ``index``. The draws are seeded, so successive validations compare parameters, not noise."""
    held = torch.as_tensor(y2, dtype=torch.float32)

    def metric(model, guide, valid: Batch) -> Dict[str, float]:
        torch.manual_seed(seed)
        rates = posterior_rates(model, guide, valid, n_samples=n_samples).numpy()
        target = held[valid.index.cpu()].numpy()
        return {METRIC: thinned_bits_per_spike(rates[:, : target.shape[1]], target, keep)}

    return metric
