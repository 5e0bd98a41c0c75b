"""NLB scoring: co-bps, fp-bps, vel R^2, psth R^2 and tp corr through ``nlb_tools.evaluation``.

Rates are expected spike counts per bin (not Hz) in the batch layout, a
:class:`~pyro_langevin.scoring.Rates` (the core's, shared with the recording wing, as are
:func:`~pyro_langevin.scoring.score_local`, :func:`~pyro_langevin.scoring.check_rates` and the other
names this module re-exports). nlb_tools' keys (:data:`RATE_KEYS`) appear only at the edge: inside
the scorers that call nlb_tools and in the submission file. Entry points:

* :func:`score_eval` scores the evaluation trials' rates against whatever eval target is known
  (held-out spikes alone give co-bps; behaviour, PSTHs and forward spikes add their metrics);
* :func:`~pyro_langevin.scoring.score_local` scores rates for a validation split of TRAINING trials
  (model selection), without nlb_tools;
* :func:`write_submission` writes the nlb_tools submission h5, :func:`evaluate_submission` runs
  nlb_tools' own ``evaluate`` on it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

import numpy as np
import torch

from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.metrics import bits_per_spike
from pyro_langevin.nlb.data import NLBData, check_args, group_name
from pyro_langevin.scoring import RateUnitsError, Rates, as_float_array, check_rates, masked_counts, score_local, split_rates

__all__ = [
    "RATE_KEYS", "RateUnitsError", "check_rates", "masked_counts",
    "score_eval", "score_nlb", "score_local", "split_rates", "Rates",
    "write_submission", "evaluate_submission",
]

#: Keys of a submission's rates dict (all (trial, time, neuron), counts per bin).
RATE_KEYS = ("train_rates_heldin", "train_rates_heldout", "eval_rates_heldin", "eval_rates_heldout",
             "eval_rates_heldin_forward", "eval_rates_heldout_forward")

ArrayLike = Union[np.ndarray, torch.Tensor]


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
    spk_out = as_float_array(tgt["eval_spikes_heldout"])
    r_out = check_rates(rates["eval_rates_heldout"], "eval_rates_heldout", bin_ms, spk_out)
    out: Dict[str, float] = {"co-bps": bits_per_spike(r_out, spk_out)}
    r_in = None
    if "eval_rates_heldin" in rates:
        r_in = check_rates(rates["eval_rates_heldin"], "eval_rates_heldin", bin_ms)
    eval_rates = None if r_in is None else np.concatenate([r_in, r_out], axis=-1)

    if dataset == "dmfc_rsg":
        if "eval_behavior" in tgt and eval_rates is not None:
            out["tp corr"] = float(ev.speed_tp_correlation(spk_out, eval_rates, as_float_array(tgt["eval_behavior"])))
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
        out["vel R2"] = float(ev.velocity_decoding(train_rates, as_float_array(tgt["train_behavior"]), tmask,
                                                   eval_rates, as_float_array(tgt["eval_behavior"]), emask))
    if "psth" in tgt and "eval_cond_idx" in tgt and eval_rates is not None:
        jitter = np.asarray(tgt["eval_jitter"]).astype(int) if "eval_jitter" in tgt else None
        out["psth R2"] = float(ev.eval_psth(as_float_array(tgt["psth"]), eval_rates, tgt["eval_cond_idx"], jitter=jitter))
    if ("eval_spikes_heldin_forward" in tgt and "eval_spikes_heldout_forward" in tgt
            and "eval_rates_heldin_forward" in rates and "eval_rates_heldout_forward" in rates):
        spk_f = np.concatenate([as_float_array(tgt["eval_spikes_heldin_forward"]),
                                as_float_array(tgt["eval_spikes_heldout_forward"])], axis=-1)
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
