"""Several NLB datasets stitched into one model and one submission (e.g. the MC_Maze scaling sets).

``examples/nlb.py --dataset mc_maze_small,mc_maze_medium,mc_maze_large`` (as lfads-torch's
``nlb_multisession_mc_maze``): each dataset is a session with its own neurons (its own held-in and
held-out split), read in and out by its own layers around one shared LangevinFlow
(:func:`~pyro_langevin.spec.build_stitched`). :func:`run_nlb_stitched`:

1. every dataset's data and fitting bins (:func:`~pyro_langevin.nlb.members.member_recipe`); they must
   share the fitting grid (bins, forward bins);
2. one stitched batch of every dataset's training trials (evaluation trials: held-in spikes only);
   the members' validation trials are carved from the training trials only (as for one dataset);
   each epoch visits every dataset equally often (shorter ones cycled);
3. the members' rates split back per dataset, brought to the scored bins, averaged over members, and
   written as one group per dataset of ONE ``submission.h5`` (and ``submission_smoothing.h5``); with
   known eval targets (phase ``val``) each dataset is scored on its evaluation trials.

The read-ins start random (NLB's files carry no condition labels the PCR alignment could use here).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Sequence

import numpy as np

from pyro_langevin.batch import Batch
from pyro_langevin.members import TrialSet, fold_members, train_members
from pyro_langevin.nlb.baseline import smoothing_baseline
from pyro_langevin.nlb.data import NLBDataError
from pyro_langevin.nlb.members import member_recipe
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.nlb.scoring import Rates, score_nlb, write_submission
from pyro_langevin.sessions import SessionLayout
from pyro_langevin.stitching import concat_trials, embed_session, session_rows, stitch_batches

__all__ = ["run_nlb_stitched", "split_rates"]


def split_rates(rates: Rates, layout: SessionLayout, train: Batch, eval: Batch, name: str, n_observed_bins: int) -> Rates:
    """Dataset ``name``'s rates (its rows and neurons, held-in then held-out) out of stitched ``rates``."""
    cols = layout.columns(layout.position(name))
    pick = lambda r, b: np.asarray(r)[session_rows(b, layout, name).numpy()][:, :, cols]  # noqa: E731
    return Rates(pick(rates.train, train), pick(rates.eval, eval), layout.sessions[layout.position(name)].n_heldin,
                 n_observed_bins)


def run_nlb_stitched(requests: Sequence[NLBRequest], *, readin_dim: int = 32,
                     log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train one stitched model (or ensemble) on every request's dataset; one submission for all (module docstring).

    The first request gives the members' configuration, output folder, seed, device and executor.
    Returns what ``metrics.json`` holds (per dataset: sizes and, in phase val, eval scores).
    """
    t0 = time.perf_counter()
    names = [r.dataset for r in requests]
    if len(set(names)) != len(names):
        raise NLBDataError(f"--dataset names a dataset twice: {','.join(names)}")
    recipes = [member_recipe(r) for r in requests]
    first, lead = recipes[0], requests[0]
    for name, rec in zip(names, recipes):
        a, b = rec.fit_data.train, first.fit_data.train
        if (a.n_observed_bins, a.n_bins) != (b.n_observed_bins, b.n_bins):
            raise NLBDataError(f"{name}: {a.n_observed_bins}+{a.n_forward_bins} bins, {names[0]} "
                               f"{b.n_observed_bins}+{b.n_forward_bins}: stitched datasets share one grid")
    fits = [r.fit_data for r in recipes]
    train, layout = stitch_batches([d.train for d in fits], names, min(readin_dim, min(d.n_heldin for d in fits)),
                                   n_trials=[d.n_train + d.n_eval for d in fits])
    train = Batch(input=train.input, target=train.target, mask=train.mask, index=train.index)  # behaviour: per dataset
    evaluation = concat_trials([embed_session(Batch(input=d.eval.input, target=d.eval.target, mask=d.eval.mask,
                                              index=d.eval.index), layout, n) for d, n in zip(fits, names)])
    data = TrialSet(train, evaluation, sessions=layout.to_dict())
    cfg = first.cfg
    specs = fold_members(train, [evaluation], cfg.eval.n_models, cfg.eval.valid_frac, lead.seed,
                         lead.checkpoint_root.resolve(), data.sessions)
    sizes = ", ".join(f"{n}: {d.n_train}+{d.n_eval} trials, {d.n_heldin}+{d.n_heldout} neurons" for n, d in zip(names, fits))
    log(f"stitching {len(names)} datasets ({sizes}); {cfg.eval.n_models} model(s); read-in {layout.readin_dim} "
        "wide, random init, trained")
    members = train_members(specs, cfg, data, first.device, executor=lead.executor(), log=log, export_seed=lead.seed,
                            resume=lead.resume, progress=lead.progress, threads=lead.threads,
                            meta={**lead.meta(), "dataset": ",".join(names)})
    out = lead.out
    out.mkdir(parents=True, exist_ok=True)
    per: Dict[str, Any] = {}
    for name, rec in zip(names, recipes):
        rates = Rates.mean([rec.to_scored_bins(split_rates(m.rates, layout, train, evaluation, name,
                                                           rec.fit_data.n_observed_bins)) for m in members])
        d = rec.data
        baseline = smoothing_baseline(d.train, d.eval, d.bin_ms, d.dataset)
        sub = write_submission(out / "submission.h5", d.dataset, d.bin_ms, rates)
        write_submission(out / "submission_smoothing.h5", d.dataset, d.bin_ms, baseline)
        per[name] = {"n_train": d.n_train, "n_eval": d.n_eval, "n_heldin": d.n_heldin, "n_heldout": d.n_heldout,
                     "eval": None}
        if d.has_eval_target:
            per[name]["eval"] = {"model": score_nlb(d, rates), "smoothing": score_nlb(d, baseline)}
    metrics = {"datasets": per, "bin_ms": lead.bin_ms, "fit_bin_ms": lead.fit_bin, "phase": lead.phase,
               "n_models": cfg.eval.n_models, "layout": {k: v for k, v in layout.to_dict().items() if k != "readin_init"},
               "members": [{"member": m.index, "best_epoch": m.best_epoch, "best_valid_co_bps": m.best_metric,
                            "epochs_run": m.epochs_run, "fit_seconds": m.fit_seconds} for m in members],
               "submission": str(sub), "submission_smoothing": str(out / "submission_smoothing.h5"),
               "seed": lead.seed, "total_seconds": round(time.perf_counter() - t0, 1), "spec": cfg.to_dict()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True, default=float))
    return metrics


