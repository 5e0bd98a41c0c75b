"""Train LangevinFlow on an NLB dataset (one model or a fold ensemble), export, score and submit.

:func:`run_nlb` is the whole pipeline (``examples/nlb.py`` and ``pyro-langevin nlb`` call it), for
one :class:`~pyro_langevin.nlb.request.NLBRequest`:

1. :func:`~pyro_langevin.nlb.members.member_recipe`: the data, the same trials in the fitting bins
   (5 ms data are summed into 20 ms bins by default, :mod:`pyro_langevin.nlb.coarse`), the members'
   configuration and the device.
2. :func:`~pyro_langevin.nlb.members.fold_members`: validation data carved from the TRAINING trials
   only (a random split for one model, fold i of K for ensemble member i); the evaluation trials
   enter training through their held-in observed spikes only.
3. :func:`~pyro_langevin.nlb.members.train_members` (optionally in worker processes): each member's
   :func:`~pyro_langevin.training.fit` selects its checkpoint on its validation co-bps, and its
   rates come from ``best.pt`` (never the last epoch), brought back to the scored bins.
4. The members' rates are averaged (:meth:`~pyro_langevin.nlb.scoring.Rates.mean`) and scored with
   the smoothing baseline in the same run: on each member's validation split (``local``: co-bps,
   fp-bps, vel R^2; optimistic, since those trials chose the checkpoint) and, when the eval target
   is known (phase ``val``), on the evaluation trials (``eval``: co-bps, fp-bps, vel R^2, psth R^2,
   tp corr as the dataset allows).
5. ``submission.h5`` (and ``submission_smoothing.h5``) in nlb_tools' format, for both phases, and
   ``metrics.json`` (per-member records under ``members``).

Accuracy estimates come from :mod:`pyro_langevin.nlb.cv` (cross-validation of this recipe).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.baseline import score_smoothing_split as score_smoothing
from pyro_langevin.nlb.baseline import kernel_sd_ms, smoothing_baseline
from pyro_langevin.nlb.data import NLBData
from pyro_langevin.nlb.members import at_bins, fold_members, member_recipe, train_members
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.nlb.scoring import Rates, score_nlb, write_submission
from pyro_langevin.scoring import score_split

__all__ = ["run_nlb", "format_table", "score_split", "score_smoothing_split"]


def score_smoothing_split(data: NLBData, scored: Batch, decoder_fit: Batch) -> Dict[str, float]:
    """The smoothing baseline (nlb_tools' kernel width for the dataset) fitted on ``decoder_fit`` (GLM
    and decoder), scored on ``scored``."""
    return score_smoothing(scored, decoder_fit, data.bin_ms, kernel_sd_ms(data.dataset))


def _mean_scores(scores: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Key-wise mean of score dicts (keys present in every one)."""
    keys = [k for k in scores[0] if all(k in d for d in scores)]
    return {k: float(np.mean([d[k] for d in scores])) for k in keys}


def _clean(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


def format_table(metrics: Dict[str, Any]) -> str:
    """A plain-text table of the model's and the smoothing baseline's scores."""
    rows = []
    for where, label in (("local", f"valid split ({metrics.get('n_valid_trials', '?')} training trials)"),
                         ("eval", f"eval trials ({metrics.get('n_eval_trials', '?')})")):
        block = metrics.get(where)
        if not block or "model" not in block:
            continue
        keys = [k for k in ("co-bps", "fp-bps", "vel R2", "psth R2", "tp corr")
                if k in block["model"] or k in block["smoothing"]]
        rows.append((label, keys, block))
    lines = []
    for label, keys, block in rows:
        lines.append(f"{label}")
        lines.append("  " + f"{'':<14}" + "".join(f"{k:>10}" for k in keys))
        for who in ("model", "smoothing"):
            vals = "".join(f"{block[who].get(k, float('nan')):>10.4f}" for k in keys)
            lines.append("  " + f"{'LangevinFlow' if who == 'model' else 'smoothing':<14}" + vals)
    return "\n".join(lines)


def run_nlb(request: NLBRequest, *, metric_fn: Optional[Callable] = None, data: Optional[NLBData] = None,
            log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train, select, export, score and write submissions for one NLB dataset (see the module docstring).

    Parameters
    ----------
    request : NLBRequest
        The run: data, output folder (``metrics.json``, ``submission.h5``, ``submission_smoothing.h5``),
        checkpoint folder (``request.storage``, default the output folder: ``checkpoints/`` for one model
        or ``member{i}/checkpoints/`` for an ensemble), configuration, fitting bins, seed, device,
        executor (local worker processes or Ray tasks), resume (finished members are read back).
    metric_fn : callable, optional
        Replaces the validation metric (must return ``co_bps``); for tests and experiments.
    data : NLBData, optional
        The request's data, already loaded (replaces loading).
    log : callable
        Receives progress lines.

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    t_start = time.perf_counter()
    recipe = member_recipe(request, data)
    data, fit_data, cfg, dev = recipe.data, recipe.fit_data, recipe.cfg, recipe.device
    out, n_models = request.out, cfg.eval.n_models
    fit_specs = fold_members(fit_data.train, [fit_data.eval], n_models, cfg.eval.valid_frac, request.seed,
                             request.checkpoint_root.resolve())
    specs = fit_specs if fit_data is data else [at_bins(s, data.train) for s in fit_specs]
    split = (f"{specs[0].fit_trials.n_trials} fit, {specs[0].valid.n_trials} validation" if n_models == 1 else
             f"{n_models} members, each validating on one of {n_models} folds and fitting the others")
    log(f"{data.dataset} {data.bin_ms} ms {data.phase}: {data.n_train} training trials ({split}), {data.n_eval} "
        f"evaluation trials; {data.n_heldin} held-in + {data.n_heldout} held-out neurons; "
        f"{data.n_observed_bins} + {data.n_forward_bins} bins"
        + (f"; fitting at {request.fit_bin} ms, rates interpolated to {data.bin_ms} ms" if fit_data is not data else ""))

    t_fit = time.perf_counter()
    executor = request.executor()
    members = train_members(fit_specs, cfg, fit_data, dev, executor=executor, log=log, export_seed=request.seed,
                            resume=request.resume, progress=request.progress, metric_fn=metric_fn,
                            threads=request.threads, meta=request.meta())
    members = [dataclasses.replace(m, rates=recipe.to_scored_bins(m.rates)) for m in members]
    fit_seconds = time.perf_counter() - t_fit
    rates = Rates.mean([m.rates for m in members])
    log("scoring the model and the smoothing baseline ...")
    t_step = time.perf_counter()
    baseline = smoothing_baseline(data.train, data.eval, data.bin_ms, data.dataset)

    # Each member scored on its own validation split, which also picked its checkpoint: optimistic.
    local = [(score_split(m.rates, data, s.valid, s.fit_trials),
              score_smoothing_split(data, s.valid, s.fit_trials)) for m, s in zip(members, specs)]
    metrics: Dict[str, Any] = {
        "dataset": data.dataset, "bin_ms": data.bin_ms, "fit_bin_ms": request.fit_bin, "phase": data.phase,
        "n_models": n_models, "n_fit_trials": specs[0].fit_trials.n_trials, "n_valid_trials": specs[0].valid.n_trials,
        "n_eval_trials": data.n_eval,
        "local": {"model": _clean(_mean_scores([m for m, _ in local])),
                  "smoothing": _clean(_mean_scores([b for _, b in local]))},
        "eval": None,
    }
    sub = write_submission(out / "submission.h5", data.dataset, data.bin_ms, rates)
    sub_base = write_submission(out / "submission_smoothing.h5", data.dataset, data.bin_ms, baseline)
    if data.has_eval_target:
        try:
            metrics["eval"] = {"model": _clean(score_nlb(data, rates)), "smoothing": _clean(score_nlb(data, baseline))}
        except ValueError as exc:  # e.g. too few evaluation trials per condition for tp corr
            log(f"warning: scoring the evaluation trials failed ({type(exc).__name__}: {exc}); "
                f"the submissions are written")
            metrics["eval"] = {"error": f"{type(exc).__name__}: {exc}"}
    log(f"scored in {time.perf_counter() - t_step:.0f} s")
    per_member = [{"member": m.index, "checkpoint": str(s.checkpoint_dir / "best.pt"), "best_epoch": m.best_epoch,
                   "best_valid_co_bps": m.best_metric, "epochs_run": m.epochs_run, "stopped_early": m.stopped_early,
                   "fit_seconds": m.fit_seconds, "valid": _clean(sc), "valid_trials": [int(i) for i in s.valid.index.tolist()],
                   "valid_curve": m.valid_curve, "executor": m.executor}
                  for m, s, (sc, _) in zip(members, specs, local)]
    metrics.update({
        # the members' own records are under "members"; these summarise them and say how
        "mean_best_valid_co_bps": float(np.mean([m.best_metric for m in members])),
        "epochs": cfg.fit.epochs, "members_stopped_early": sum(m.stopped_early for m in members),
        "fit_seconds": round(fit_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "export_draws": cfg.eval.export_draws, "device": executor.device or str(dev), "seed": request.seed, "quick": request.quick,
        "torch_threads": torch.get_num_threads(), "workers": request.workers, "host": platform.node(),
        "executor": {"backend": executor.backend(len(fit_specs), dev.type), "address": executor.address,
                     "cpus_per_member": executor.cpus_per_member, "gpus_per_member": executor.gpus_per_member,
                     "checkpoints": str(request.checkpoint_root)},
        "members": per_member, "submission": str(sub), "submission_smoothing": str(sub_base), "spec": cfg.to_dict(),
    })
    if n_models == 1:  # one model: its record at the top level too
        metrics.update({k: per_member[0][k] for k in ("checkpoint", "best_epoch", "best_valid_co_bps", "epochs_run",
                                                       "stopped_early", "valid_curve")})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    return metrics
