"""Principal-components regression (PCR) alignment of sessions' read-ins, as LFADS stitching does it.

Pandarinath et al. (2018) and lfads-torch initialise each session's read-in so that the sessions
start in one shared space: smooth each session's training trials in time, average them per
condition (conditions shared across sessions), concatenate every session's units side by side, take
the top principal components of that matrix, and regress each session's own responses onto those
components (ridge). The coefficients map a session's units to the shared components; they seed the
read-in. Here the responses are the guide's encoder features (``log1p`` counts,
:func:`~pyro_langevin.inputs.encoder_features`), the scale the read-in acts on.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter1d

__all__ = ["condition_averages", "pcr_readins"]


def condition_averages(features: np.ndarray, observed: np.ndarray, labels: Sequence[str],
                       conditions: Sequence[str], smooth_bins: float = 2.0) -> np.ndarray:
    """Smoothed condition averages, shape (condition, time, unit), of ``features`` (trial, time, unit).

    Each trial is smoothed along time with a Gaussian of ``smooth_bins`` bins s.d. (0: none), then the
    trials of each of ``conditions`` are averaged bin by bin over their ``observed`` bins (NaN where
    no trial of a condition is observed).
    """
    x = np.where(observed[:, :, None], features, 0.0).astype(float)
    if smooth_bins > 0:
        x = gaussian_filter1d(x, smooth_bins, axis=1, mode="nearest")
    labels = np.asarray([str(c) for c in labels])
    out = np.full((len(conditions), x.shape[1], x.shape[2]), np.nan)
    for k, c in enumerate(conditions):
        rows = labels == str(c)
        n = observed[rows].sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = x[rows].sum(0) / n[:, None]
    return out


def pcr_readins(averages: Sequence[np.ndarray], dim: int, alpha: float = 1.0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per-session read-ins onto the shared principal components of the sessions' condition averages.

    Parameters
    ----------
    averages : sequence of ndarray, each (condition, time, unit_s)
        Every session's condition averages over the same conditions and bins (rows with NaN in any
        session are left out).
    dim : int
        Number of shared components (the read-in's width); at most the number of rows and units.
    alpha : float
        Ridge penalty of the per-session regressions (on unit-variance-free centred data).

    Returns
    -------
    list of (weight, bias)
        ``weight`` (dim, unit_s) and ``bias`` (dim,) per session, such that ``weight @ x + bias``
        approximates the shared component scores of a response ``x`` of that session (scaled so
        that the first component has unit s.d.).
    """
    flat = [a.reshape(-1, a.shape[-1]) for a in averages]
    keep = np.all([np.isfinite(f).all(axis=1) for f in flat], axis=0)
    flat = [f[keep] for f in flat]
    joint = np.concatenate(flat, axis=1)
    if dim > min(joint.shape):
        raise ValueError(f"PCR: {dim} components need at least {dim} condition-time rows and units, got "
                         f"{joint.shape[0]} rows and {joint.shape[1]} units")
    centre = joint.mean(axis=0)
    _, _, vt = np.linalg.svd(joint - centre, full_matrices=False)
    scores = (joint - centre) @ vt[:dim].T  # (rows, dim): the shared components
    # one common scale (the first component's s.d. = 1) keeps the guide's inputs near the range of
    # log1p counts it reads for one session, and the components' relative sizes
    scores = scores / max(float(scores[:, 0].std()), 1e-12)
    out = []
    for f in flat:
        mu = f.mean(axis=0)
        xc = f - mu
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ scores)  # (unit_s, dim)
        out.append((w.T, -mu @ w))
    return out
