"""Metrics on rates in counts per bin, shapes (trial, time, neuron)."""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln
from sklearn.metrics import r2_score

__all__ = ["rate_r2", "bits_per_spike", "nlb_bits_per_spike", "decoding_r2", "RIDGE_ALPHAS"]


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
    Entries where ``spikes`` is NaN (not observed) are left out of both terms and of the means, and
    the rates there are never read. With ``nlb_tools`` installed its own ``bits_per_spike`` computes
    the number; without it :func:`nlb_bits_per_spike` gives the same value (zero rates count as
    1e-9, as in nlb_tools), so results never depend on whether nlb_tools is installed.

    Parameters
    ----------
    rates, spikes : array, shape (trial, time, neuron)
        Expected counts per bin, and the observed counts (NaN where unobserved).
    """
    r, s = _flat(rates, "rates"), _flat(spikes, "spikes")
    if r.shape != s.shape:
        raise ValueError(f"shapes differ: rates {np.shape(rates)} vs spikes {np.shape(spikes)}")
    seen = ~np.isnan(s)
    if np.any(r[seen] < 0) or not np.all(np.isfinite(r[seen])):
        raise ValueError("rates must be finite and non-negative where spikes are observed")
    if np.nansum(s) == 0:
        raise ValueError("bits_per_spike is undefined with no spikes")
    r = np.where(seen, r, 1.0)  # never read: keeps nlb_tools' NaN-rate assertion quiet
    try:
        from nlb_tools.evaluation import bits_per_spike as nlb_bps
    except ImportError:
        nlb_bps = nlb_bits_per_spike
    return float(nlb_bps(r, s))


def nlb_bits_per_spike(rates: np.ndarray, spikes: np.ndarray) -> float:
    """nlb_tools' bits per spike, without nlb_tools: NaN spikes ignored, zero rates set to 1e-9.

    The null model predicts each neuron's mean count over the observed entries (all axes but the
    last), as ``nlb_tools.evaluation.bits_per_spike`` does.
    """
    seen = ~np.isnan(spikes)
    null = np.broadcast_to(np.nanmean(spikes, axis=tuple(range(spikes.ndim - 1)), keepdims=True), spikes.shape)

    def nll(lam: np.ndarray) -> float:
        lam, n = np.where(lam == 0, 1e-9, lam)[seen], spikes[seen]
        return float(np.sum(lam - n * np.log(lam) + gammaln(n + 1.0)))

    return (nll(null) - nll(rates)) / np.nansum(spikes) / np.log(2)


#: Ridge penalties searched by :func:`decoding_r2` (nlb_tools' grid: 1e-4 .. 1, nine values).
RIDGE_ALPHAS = np.logspace(-4, 0, 9)


def decoding_r2(train_rates, train_behavior, eval_rates, eval_behavior, grid_search: bool = True) -> float:
    """R^2 of a ridge regression from rates to behaviour, fitted on one set of bins and scored on another.

    The NLB velocity decoder (``nlb_tools.evaluation.fit_and_eval_decoder``, the same numbers without
    nlb_tools): rows whose behaviour is NaN are left out of either set; ``grid_search`` picks the
    penalty among :data:`RIDGE_ALPHAS` by sklearn's ``GridSearchCV`` (5-fold, unshuffled) on the
    training rows, otherwise ``alpha = 0.01``. The score is sklearn's ``r2_score`` averaged over
    behaviour channels.

    Parameters
    ----------
    train_rates, eval_rates : array, shape (sample, neuron)
        Rates per bin (any units; rows are bins of all trials).
    train_behavior, eval_behavior : array, shape (sample, channel)
    grid_search : bool
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    xs, ys = [np.asarray(a, dtype=np.float64) for a in (train_rates, train_behavior)]
    xe, ye = [np.asarray(a, dtype=np.float64) for a in (eval_rates, eval_behavior)]
    keep_s, keep_e = ~np.isnan(ys[:, 0]), ~np.isnan(ye[:, 0])
    xs, ys, xe, ye = xs[keep_s], ys[keep_s], xe[keep_e], ye[keep_e]
    if np.isnan(xs).any() or np.isnan(xe).any():
        raise ValueError("decoding_r2: NaN rates in bins that have behaviour")
    decoder = GridSearchCV(Ridge(), {"alpha": RIDGE_ALPHAS}) if grid_search else Ridge(alpha=1e-2)
    decoder.fit(xs, ys)
    return float(decoder.score(xe, ye))
