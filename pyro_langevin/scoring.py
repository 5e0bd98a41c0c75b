"""Scoring rates on trials whose held-out data is known: co-bps, fp-bps and decoding R^2, without nlb_tools.

Rates are expected spike counts per bin (not Hz) everywhere, and one layout carries them: a
:class:`Rates` holds a run's training and evaluation rates in the batch layout (trial, T + F, N_in +
N_out), held-out neurons and forward bins as trailing slices, for the model and the smoothing
baseline (:mod:`pyro_langevin.baseline`) alike. Used by every benchmark and recording wing:

* :func:`score_local` scores rates of trials with known held-out neurons (and forward bins): a
  validation split (model selection), a cross-validation fold (:mod:`pyro_langevin.crossval`);
* :func:`score_split` does so for rows of a run's :class:`Rates`, found by trial index.

Entries outside a batch's ``mask`` (padding of shorter trials, unknown data) are never scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.metrics import bits_per_spike, decoding_r2

__all__ = ["RateUnitsError", "as_float_array", "check_rates", "masked_counts", "split_rates", "Rates", "score_local", "score_split"]

ArrayLike = Union[np.ndarray, torch.Tensor]


class RateUnitsError(NLBDataError):
    """Rates that are negative, non-finite, or look like Hz instead of counts per bin."""


def as_float_array(x: ArrayLike) -> np.ndarray:
    """A float64 copy of an array or tensor (always a copy: nlb_tools edits rates in place)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64)


def check_rates(rates: ArrayLike, name: str, bin_ms: Optional[int] = None,
                spikes: Optional[ArrayLike] = None) -> np.ndarray:
    """Check rates are finite, non-negative expected counts per bin; return a float64 copy.

    With ``spikes`` (matching counts) the mean rate must be within a factor 20 of the mean count;
    otherwise with ``bin_ms`` the mean rate must be below 1000 Hz. Both catch rates in Hz.
    """
    r = as_float_array(rates)
    if r.ndim != 3:
        raise RateUnitsError(f"{name}: expected (trial, time, neuron) rates, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise RateUnitsError(f"{name}: contains NaN or infinite rates")
    if (r < 0).any():
        raise RateUnitsError(f"{name}: contains negative rates")
    if spikes is not None:
        s = as_float_array(spikes)
        mean_s = np.nanmean(s) if np.isfinite(s).any() else 0.0
        if mean_s > 0 and r.mean() > 20 * mean_s:
            raise RateUnitsError(
                f"{name}: mean rate {r.mean():.3g} is {r.mean() / mean_s:.0f}x the mean spike count "
                f"per bin ({mean_s:.3g}): rates must be counts per bin, not Hz")
    elif bin_ms is not None and r.size and r.mean() * 1000.0 / bin_ms > 1000.0:
        raise RateUnitsError(
            f"{name}: mean rate {r.mean():.3g} per {bin_ms} ms bin is over 1000 Hz: rates must be "
            "expected counts per bin, not Hz")
    return r


def split_rates(full: ArrayLike, n_heldin: int, n_observed_bins: int, prefix: str) -> Dict[str, np.ndarray]:
    """Split (trial, T+F, N) rates in the Batch layout into nlb_tools keys ``{prefix}_rates_*``.

    ``prefix`` is ``'train'`` or ``'eval'``; forward keys are made for ``'eval'`` only.
    """
    r = as_float_array(full)
    t, n_in = n_observed_bins, n_heldin
    out = {f"{prefix}_rates_heldin": r[:, :t, :n_in], f"{prefix}_rates_heldout": r[:, :t, n_in:]}
    if prefix == "eval":
        out["eval_rates_heldin_forward"] = r[:, t:, :n_in]
        out["eval_rates_heldout_forward"] = r[:, t:, n_in:]
    return out


@dataclass
class Rates:
    """A run's rates in the batch layout, counts per bin.

    ``train`` and ``eval`` are (trial, T + F, N_in + N_out): held-out neurons and forward bins as
    trailing slices, trials in the order of the data's training and evaluation batches (``eval`` may
    hold no trials). The first ``n_heldin`` neurons are held in, the first ``n_observed_bins`` bins
    observed. Converted to nlb_tools' keys only to be scored by nlb_tools or written (:meth:`submission`).
    """

    train: np.ndarray
    eval: np.ndarray
    n_heldin: int
    n_observed_bins: int

    def __post_init__(self) -> None:
        self.train, self.eval = np.asarray(self.train), np.asarray(self.eval)
        if self.train.ndim != 3 or self.eval.ndim != 3 or self.train.shape[1:] != self.eval.shape[1:]:
            raise NLBDataError(f"Rates: train {self.train.shape} and eval {self.eval.shape} must be "
                               "(trial, T + F, neuron) with the same bins and neurons")
        if not (0 < self.n_heldin <= self.train.shape[2] and 0 < self.n_observed_bins <= self.train.shape[1]):
            raise NLBDataError(f"Rates: n_heldin={self.n_heldin}, n_observed_bins={self.n_observed_bins} do not fit "
                               f"shape {self.train.shape}")

    def submission(self) -> Dict[str, np.ndarray]:
        """nlb_tools' rate keys: held-in/held-out of both splits, forward of ``eval``."""
        out = split_rates(self.train, self.n_heldin, self.n_observed_bins, "train")
        out.update(split_rates(self.eval, self.n_heldin, self.n_observed_bins, "eval"))
        return out

    @classmethod
    def mean(cls, rates: Sequence["Rates"]) -> "Rates":
        """The average of several runs' rates (an ensemble)."""
        first = rates[0]
        return cls(np.mean([r.train for r in rates], axis=0), np.mean([r.eval for r in rates], axis=0),
                   first.n_heldin, first.n_observed_bins)


def masked_counts(batch: Batch) -> np.ndarray:
    """``batch.target`` as float64 with NaN wherever ``batch.mask`` is False (not data)."""
    s = batch.target.detach().cpu().numpy().astype(np.float64)
    s[~batch.mask.detach().cpu().numpy()] = np.nan
    return s


def _behavior_rows(batch: Batch, spikes: np.ndarray) -> np.ndarray:
    """``batch.behavior`` flattened to (trial * T, B), NaN in bins with no observed count (padding)."""
    beh = batch.behavior.detach().cpu().numpy().astype(np.float64)
    t = batch.n_observed_bins
    padding = np.isnan(spikes[:, :t]).all(axis=-1)
    if padding.any():
        beh = beh.copy()
        beh[padding] = np.nan
    return beh.reshape(-1, beh.shape[-1])


def score_local(
    rates_valid: ArrayLike,
    valid: Batch,
    rates_fit: Optional[ArrayLike] = None,
    fit: Optional[Batch] = None,
    grid_search: bool = True,
) -> Dict[str, float]:
    """Score rates for trials whose held-out data is known (a validation split, a scored fold).

    Parameters
    ----------
    rates_valid : array, shape (trial, T + F, N_in + N_out)
        Predicted counts per bin for ``valid``, in the Batch target layout.
    valid : Batch
        Trials with held-out neurons (and forward bins) in ``target``; only entries in ``mask`` count.
    rates_fit, fit : optional
        Rates and trials to fit the behaviour decoder on (ridge from all rates to behaviour,
        :func:`~pyro_langevin.metrics.decoding_r2`); vel R^2 needs them and ``behavior`` on both
        batches. Bins with no observed count (padding) and NaN behaviour are left out.
    grid_search : bool
        Cross-validated ridge penalty (nlb_tools' default) or a fixed alpha of 0.01.

    Returns
    -------
    dict
        ``co-bps`` (held-out neurons, observed bins), ``fp-bps`` (forward bins, all neurons) when
        forward data is present, ``vel R2`` when decodable.
    """
    spikes = masked_counts(valid)
    r = check_rates(rates_valid, "rates_valid", spikes=spikes)
    if r.shape != tuple(valid.target.shape):
        raise NLBDataError(f"rates_valid has shape {r.shape}, expected {tuple(valid.target.shape)}")
    t, n_in = valid.n_observed_bins, valid.n_heldin
    out: Dict[str, float] = {}
    held = spikes[:, :t, n_in:]
    if held.size == 0 or np.isnan(held).all():
        raise NLBDataError("valid: no held-out neuron counts to score (are these evaluation trials?)")
    out["co-bps"] = bits_per_spike(r[:, :t, n_in:], held)
    fwd = spikes[:, t:, :]
    if fwd.size and not np.isnan(fwd).all():
        out["fp-bps"] = bits_per_spike(r[:, t:, :], fwd)
    if rates_fit is not None and fit is not None and fit.behavior is not None and valid.behavior is not None:
        fit_spikes = masked_counts(fit)
        rf = check_rates(rates_fit, "rates_fit", spikes=fit_spikes)
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        out["vel R2"] = decoding_r2(flat(rf[:, :t]), _behavior_rows(fit, fit_spikes), flat(r[:, :t]),
                                    _behavior_rows(valid, spikes), grid_search=grid_search)
    return out


def score_split(rates: Rates, data: Any, scored: Batch, decoder_fit: Batch) -> Dict[str, float]:
    """co-bps / fp-bps / vel R^2 of the trials ``scored``; the behaviour decoder fits on ``decoder_fit``.

    ``rates.train`` holds the rates of ``data.train`` (any object with a ``train`` batch); the rows
    of ``scored`` and ``decoder_fit`` there are found by their trial ``index``.
    """
    pos = {int(i): k for k, i in enumerate(data.train.index.tolist())}
    rows = lambda b: [pos[int(i)] for i in b.index.tolist()]  # noqa: E731
    return score_local(rates.train[rows(scored)], scored, rates.train[rows(decoder_fit)], decoder_fit)
