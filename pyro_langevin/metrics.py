"""Metrics on rates in counts per bin, shapes (trial, time, neuron)."""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln
from sklearn.metrics import r2_score

__all__ = ["rate_r2", "bits_per_spike"]


def _flat(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"{name}: expected (trial, time, neuron), got shape {x.shape}")
    return x.reshape(-1, x.shape[-1])


def rate_r2(true_rates, pred_rates) -> float:
    """R^2 of predicted against true rates, uniform average over neurons.

    ``sklearn.metrics.r2_score`` with ``y_true`` the TRUE rates, each neuron's time points of all
    trials pooled.
    """
    t, p = _flat(true_rates, "true_rates"), _flat(pred_rates, "pred_rates")
    if t.shape != p.shape:
        raise ValueError(f"shapes differ: true {np.shape(true_rates)} vs predicted {np.shape(pred_rates)}")
    return float(r2_score(t, p, multioutput="uniform_average"))


def bits_per_spike(rates, spikes) -> float:
    """Poisson log-likelihood of ``rates`` above each neuron's mean rate, in bits per spike.

    ``(LL(rates) - LL(mean rate per neuron)) / (total spikes * ln 2)``, the NLB co-bps definition.
    """
    r, s = _flat(rates, "rates"), _flat(spikes, "spikes")
    if r.shape != s.shape:
        raise ValueError(f"shapes differ: rates {np.shape(rates)} vs spikes {np.shape(spikes)}")
    if np.any(r < 0) or not np.all(np.isfinite(r)):
        raise ValueError("rates must be finite and non-negative")
    n_spikes = s.sum()
    if n_spikes == 0:
        raise ValueError("bits_per_spike is undefined with no spikes")

    def loglik(lam):
        lam = np.clip(lam, 1e-9, None)
        return np.sum(s * np.log(lam) - lam - gammaln(s + 1))

    null = np.broadcast_to(s.mean(axis=0, keepdims=True), s.shape)
    return float((loglik(r) - loglik(null)) / (n_spikes * np.log(2)))
