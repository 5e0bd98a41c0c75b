"""NLB scoring: co-bps, fp-bps, vel R^2, psth R^2 and tp corr through ``nlb_tools.evaluation``.

Rates are expected spike counts per bin (not Hz) everywhere, and one layout carries them: a
:class:`Rates` holds a run's training and evaluation rates in the batch layout (trial, T + F, N_in +
N_out), held-out neurons and forward bins as trailing slices, for the model and the smoothing
baseline (:mod:`pyro_langevin.nlb.baseline`) alike. nlb_tools' keys (:data:`RATE_KEYS`) appear only
at the edge: inside the scorers that call nlb_tools and in the submission file. Entry points:

* :func:`score_eval` scores the evaluation trials' rates against whatever eval target is known
  (held-out spikes alone give co-bps; behaviour, PSTHs and forward spikes add their metrics);
* :func:`score_local` scores rates for a validation split of TRAINING trials (model selection);
* :func:`write_submission` writes the nlb_tools submission h5, :func:`evaluate_submission` runs
  nlb_tools' own ``evaluate`` on it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.metrics import bits_per_spike
from pyro_langevin.nlb.data import NLBData, check_args, group_name

__all__ = [
    "RATE_KEYS", "RateUnitsError", "check_rates", "masked_counts",
    "score_eval", "score_nlb", "score_local", "split_rates", "Rates",
    "write_submission", "evaluate_submission",
]

#: Keys of a submission's rates dict (all (trial, time, neuron), counts per bin).
RATE_KEYS = ("train_rates_heldin", "train_rates_heldout", "eval_rates_heldin", "eval_rates_heldout",
             "eval_rates_heldin_forward", "eval_rates_heldout_forward")

ArrayLike = Union[np.ndarray, torch.Tensor]


class RateUnitsError(NLBDataError):
    """Rates that are negative, non-finite, or look like Hz instead of counts per bin."""


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64)  # always a copy: nlb_tools edits rates in place


def check_rates(rates: ArrayLike, name: str, bin_ms: Optional[int] = None,
                spikes: Optional[ArrayLike] = None) -> np.ndarray:
    """Check rates are finite, non-negative expected counts per bin; return a float64 copy.

    With ``spikes`` (matching counts) the mean rate must be within a factor 20 of the mean count;
    otherwise with ``bin_ms`` the mean rate must be below 1000 Hz. Both catch rates in Hz.
    """
    r = _np(rates)
    if r.ndim != 3:
        raise RateUnitsError(f"{name}: expected (trial, time, neuron) rates, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise RateUnitsError(f"{name}: contains NaN or infinite rates")
    if (r < 0).any():
        raise RateUnitsError(f"{name}: contains negative rates")
    if spikes is not None:
        s = _np(spikes)
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


@dataclass
class Rates:
    """A run's rates in the batch layout, counts per bin.

    ``train`` and ``eval`` are (trial, T + F, N_in + N_out): held-out neurons and forward bins as
    trailing slices, trials in the order of the data's training and evaluation batches. The first
    ``n_heldin`` neurons are held in, the first ``n_observed_bins`` bins observed. Converted to
    nlb_tools' keys only to be scored by nlb_tools or written (:meth:`submission`).
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
        """nlb_tools' rate keys (:data:`RATE_KEYS`): held-in/held-out of both splits, forward of ``eval``."""
        out = split_rates(self.train, self.n_heldin, self.n_observed_bins, "train")
        out.update(split_rates(self.eval, self.n_heldin, self.n_observed_bins, "eval"))
        return out

    @classmethod
    def mean(cls, rates: Sequence["Rates"]) -> "Rates":
        """The average of several runs' rates (an ensemble)."""
        first = rates[0]
        return cls(np.mean([r.train for r in rates], axis=0), np.mean([r.eval for r in rates], axis=0),
                   first.n_heldin, first.n_observed_bins)


def _target_group(target: Mapping[str, Any], dataset: str, bin_ms: int) -> Mapping[str, Any]:
    grp = group_name(dataset, bin_ms)
    return target[grp] if grp in target else target


def score_eval(target: Mapping[str, Any], rates: Rates, dataset: str, bin_ms: int = 5) -> Dict[str, float]:
    """Score evaluation-trial rates against an eval target, computing what the target allows.

    Parameters
    ----------
    target : mapping
        nlb_tools eval target: the ``{dataset}[_20]`` group or its contents (``eval_spikes_heldout``
        required; ``train_behavior``/``eval_behavior``, ``psth``/``eval_cond_idx``, forward spikes,
        decode masks optional).
    rates : Rates
        The run's rates (counts per bin); the training rates enter vel R^2's decoder fit.
    dataset : str
    bin_ms : int

    Returns
    -------
    dict
        ``co-bps`` always; ``vel R2`` (not dmfc_rsg) when behaviour and train rates are there;
        ``tp corr`` (dmfc_rsg) with eval behaviour; ``psth R2`` with PSTHs; ``fp-bps`` with
        forward spikes and rates.
    """
    from nlb_tools import evaluation as ev

    check_args(dataset, bin_ms, "val")
    if not isinstance(rates, Rates):
        raise TypeError(f"rates: expected a Rates, got {type(rates).__name__}")
    tgt = _target_group(target, dataset, bin_ms)
    if "eval_spikes_heldout" not in tgt:
        raise NLBDataError(f"eval target has no 'eval_spikes_heldout' (keys: {sorted(tgt)})")
    rates = rates.submission()  # nlb_tools' keys from here on: its scorers take them
    spk_out = _np(tgt["eval_spikes_heldout"])
    r_out = check_rates(rates["eval_rates_heldout"], "eval_rates_heldout", bin_ms, spk_out)
    out: Dict[str, float] = {"co-bps": bits_per_spike(r_out, spk_out)}
    r_in = None
    if "eval_rates_heldin" in rates:
        r_in = check_rates(rates["eval_rates_heldin"], "eval_rates_heldin", bin_ms)
    eval_rates = None if r_in is None else np.concatenate([r_in, r_out], axis=-1)

    if dataset == "dmfc_rsg":
        if "eval_behavior" in tgt and eval_rates is not None:
            out["tp corr"] = float(ev.speed_tp_correlation(spk_out, eval_rates, _np(tgt["eval_behavior"])))
    elif ("train_behavior" in tgt and "eval_behavior" in tgt and eval_rates is not None
          and "train_rates_heldin" in rates and "train_rates_heldout" in rates):
        train_rates = np.concatenate([check_rates(rates["train_rates_heldin"], "train_rates_heldin", bin_ms),
                                      check_rates(rates["train_rates_heldout"], "train_rates_heldout", bin_ms)],
                                     axis=-1)
        if "train_decode_mask" in tgt:
            tmask, emask = np.asarray(tgt["train_decode_mask"]), np.asarray(tgt["eval_decode_mask"])
        else:
            tmask = np.ones((train_rates.shape[0], 1), bool)
            emask = np.ones((eval_rates.shape[0], 1), bool)
        out["vel R2"] = float(ev.velocity_decoding(train_rates, _np(tgt["train_behavior"]), tmask,
                                                   eval_rates, _np(tgt["eval_behavior"]), emask))
    if "psth" in tgt and "eval_cond_idx" in tgt and eval_rates is not None:
        jitter = np.asarray(tgt["eval_jitter"]).astype(int) if "eval_jitter" in tgt else None
        out["psth R2"] = float(ev.eval_psth(_np(tgt["psth"]), eval_rates, tgt["eval_cond_idx"], jitter=jitter))
    if ("eval_spikes_heldin_forward" in tgt and "eval_spikes_heldout_forward" in tgt
            and "eval_rates_heldin_forward" in rates and "eval_rates_heldout_forward" in rates):
        spk_f = np.concatenate([_np(tgt["eval_spikes_heldin_forward"]),
                                _np(tgt["eval_spikes_heldout_forward"])], axis=-1)
        r_f = np.concatenate([check_rates(rates["eval_rates_heldin_forward"], "eval_rates_heldin_forward", bin_ms),
                              check_rates(rates["eval_rates_heldout_forward"], "eval_rates_heldout_forward", bin_ms)],
                             axis=-1)
        out["fp-bps"] = bits_per_spike(r_f, spk_f)
    return out


def score_nlb(data: NLBData, rates: Rates) -> Dict[str, float]:
    """:func:`score_eval` against ``data.eval_target``; raises if the eval target is unknown."""
    if data.eval_target is None:
        raise NLBDataError(f"{data.dataset} ({data.phase} phase): the eval target is unknown, so the "
                           "evaluation trials cannot be scored here; use score_local on a validation "
                           "split of training trials, or submit")
    return score_eval(data.eval_target, rates, data.dataset, data.bin_ms)


def split_rates(full: ArrayLike, n_heldin: int, n_observed_bins: int, prefix: str) -> Dict[str, np.ndarray]:
    """Split (trial, T+F, N) rates in the Batch layout into nlb_tools keys ``{prefix}_rates_*``.

    ``prefix`` is ``'train'`` or ``'eval'``; forward keys are made for ``'eval'`` only.
    """
    r = _np(full)
    t, n_in = n_observed_bins, n_heldin
    out = {f"{prefix}_rates_heldin": r[:, :t, :n_in], f"{prefix}_rates_heldout": r[:, :t, n_in:]}
    if prefix == "eval":
        out["eval_rates_heldin_forward"] = r[:, t:, :n_in]
        out["eval_rates_heldout_forward"] = r[:, t:, n_in:]
    return out


def masked_counts(batch: Batch) -> np.ndarray:
    s = batch.target.detach().cpu().numpy().astype(np.float64)
    s[~batch.mask.detach().cpu().numpy()] = np.nan
    return s


def score_local(
    rates_valid: ArrayLike,
    valid: Batch,
    rates_fit: Optional[ArrayLike] = None,
    fit: Optional[Batch] = None,
    grid_search: bool = True,
) -> Dict[str, float]:
    """Score rates for a validation split of TRAINING trials (their held-out data is known).

    Parameters
    ----------
    rates_valid : array, shape (trial, T + F, N_in + N_out)
        Predicted counts per bin for ``valid``, in the Batch target layout.
    valid : Batch
        Validation trials with held-out neurons and forward bins in ``target``
        (from :func:`~pyro_langevin.nlb.data.split_train_valid`).
    rates_fit, fit : optional
        Rates and trials to fit the velocity decoder on (ridge from all rates to behaviour, as
        nlb_tools does); vel R^2 needs them and ``behavior`` on both batches.
    grid_search : bool
        Cross-validated ridge penalty (nlb_tools' default) or a fixed alpha of 0.01.

    Returns
    -------
    dict
        ``co-bps`` (held-out neurons, observed bins), ``fp-bps`` (forward bins, all neurons) when
        forward data is present, ``vel R2`` when decodable.
    """
    from nlb_tools.evaluation import fit_and_eval_decoder

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
        rf = check_rates(rates_fit, "rates_fit", spikes=masked_counts(fit))
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        bf = fit.behavior.detach().cpu().numpy().astype(np.float64)
        bv = valid.behavior.detach().cpu().numpy().astype(np.float64)
        out["vel R2"] = float(fit_and_eval_decoder(flat(rf[:, :t]), flat(bf), flat(r[:, :t]), flat(bv),
                                                   grid_search=grid_search))
    return out


def write_submission(path: Union[str, os.PathLike], dataset: str, bin_ms: int, rates: Rates) -> Path:
    """Write rates into an nlb_tools submission h5 with ``nlb_tools.make_tensors.save_to_h5``.

    The group is ``dataset`` for 5 ms and ``dataset_20`` for 20 ms; other groups already in the
    file are kept (one file may hold several datasets), this one is overwritten.

    Parameters
    ----------
    path : path-like
    dataset : str
    bin_ms : {5, 20}
    rates : Rates
        Expected counts per bin; written under :data:`RATE_KEYS`.
    """
    from nlb_tools.make_tensors import save_to_h5

    check_args(dataset, bin_ms, "val")
    if not isinstance(rates, Rates):
        raise TypeError(f"rates: expected a Rates, got {type(rates).__name__}")
    arrays = {k: check_rates(v, k, bin_ms).astype(np.float32) for k, v in rates.submission().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # overwrite=True is deliberate: drop nlb_tools' "... already found. Overwriting..." warning
    nlb_log, quiet = logging.getLogger("nlb_tools.make_tensors"), _DropMessages("Overwriting")
    nlb_log.addFilter(quiet)
    try:
        save_to_h5({group_name(dataset, bin_ms): arrays}, str(path), overwrite=True)
    finally:
        nlb_log.removeFilter(quiet)
    return path


class _DropMessages(logging.Filter):
    """A logging filter that drops records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def evaluate_submission(target: Union[str, os.PathLike, Mapping], submission: Union[str, os.PathLike]
                        ) -> List[Dict[str, Dict[str, float]]]:
    """Run ``nlb_tools.evaluation.evaluate`` (the EvalAI scorer) on a target and a submission."""
    from nlb_tools.evaluation import evaluate

    tgt = str(target) if isinstance(target, (str, os.PathLike)) else target
    for p in (tgt, submission):
        if isinstance(p, (str, os.PathLike)) and not Path(p).is_file():
            raise NLBDataError(f"{p}: file not found")
    return evaluate(tgt, str(submission))
