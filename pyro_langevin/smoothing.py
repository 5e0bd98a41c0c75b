"""Spike-smoothing baseline: Gaussian-kernel smoothing of spike counts, the standard NLB baseline."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d
from sklearn.metrics import r2_score

__all__ = ["smooth_spikes", "choose_smoothing_width"]


def smooth_spikes(counts: np.ndarray, sigma_bins: float) -> np.ndarray:
    """Smooth spike counts along time with a Gaussian kernel.

    Parameters
    ----------
    counts : array, shape (trial, time, neuron)
        Spike counts per bin.
    sigma_bins : float
        Kernel standard deviation in bins (0 returns a float copy).

    Returns
    -------
    array, shape (trial, time, neuron)
        Smoothed counts per bin (the kernel sums to one, so units stay counts per bin).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3:
        raise ValueError(f"counts: expected (trial, time, neuron), got shape {counts.shape}")
    if sigma_bins < 0:
        raise ValueError(f"sigma_bins must be >= 0, got {sigma_bins}")
    if sigma_bins == 0:
        return counts.copy()
    return gaussian_filter1d(counts, sigma=sigma_bins, axis=1, mode="nearest")


def choose_smoothing_width(
    counts: np.ndarray,
    target_rates: np.ndarray,
    widths: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0),
) -> float:
    """Pick the kernel width (bins) whose smoothed counts best match ``target_rates`` by R^2.

    Use it on training trials only; the chosen width is then applied to validation trials.
    """
    n_neurons = counts.shape[-1]
    best, best_r2 = widths[0], -np.inf
    for w in widths:
        pred = smooth_spikes(counts, w).reshape(-1, n_neurons)
        r2 = r2_score(np.asarray(target_rates).reshape(-1, n_neurons), pred)
        if r2 > best_r2:
            best, best_r2 = w, r2
    return float(best)
