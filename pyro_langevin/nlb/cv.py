"""K-fold cross-validation over an NLB dataset's training trials: honest scores and a fold ensemble.

Every accuracy number the project reports on real data comes from here. For fold ``f``:

* the **scored** trials are fold ``f`` of the training trials; they reach training only through
  their held-in observed spikes (as the evaluation trials do), never through the held-out neurons
  or forward bins they are scored on, and they choose nothing;
* the other training trials are split again (``valid_frac``) into **fit** trials (full targets)
  and an **inner validation** split that alone picks the checkpoint (co-bps, as ``run_nlb`` does);
* the fold's model is scored on its scored trials (co-bps, fp-bps, vel R^2 with the velocity
  decoder fitted on the fold's other training trials), and so is the smoothing baseline fitted
  on the same trials.

With ``eval.n_models = M > 1`` each fold trains the run's ensemble recipe on its other training trials
(M members, member i validated on fold i of them; :func:`~pyro_langevin.nlb.members.fold_members`),
so the score is that of the recipe ``run_nlb`` uses; each member is also scored alone.

The folds are the core's (:mod:`pyro_langevin.crossval`, shared with the recording wing): the summary
gives mean and standard error over folds for the model, the baseline and their paired difference. The K fold models also make an ensemble: their posterior-mean rates on every trial are
averaged into ``submission.h5`` (each model's rates are its own 50-draw posterior means). The
ensemble is not scored by the folds (each scored fold trained the other folds' models); when the
evaluation target is known (phase ``val`` with ``eval_target.h5``) it is scored there.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Optional, Sequence

from pyro_langevin.crossval import METRICS, Fold, format_cv_table, summarize_folds, train_folds
from pyro_langevin.data.splits import kfold_indices
from pyro_langevin.nlb.data import NLBData
from pyro_langevin.nlb.members import member_recipe
from pyro_langevin.nlb.pipeline import score_smoothing_split
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.nlb.scoring import Rates, score_nlb, write_submission
from pyro_langevin.spec import SpecError

__all__ = ["cross_validate", "summarize_folds", "format_cv_table", "METRICS"]




def cross_validate(request: NLBRequest, k: int = 5, *, folds: Optional[Sequence[int]] = None,
                   data: Optional[NLBData] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """K-fold cross-validation of the request's recipe on the training trials (see the module docstring).

    Parameters
    ----------
    request : NLBRequest
        The run: data, output folder (``cv.json``, ``submission.h5``: the fold ensemble), checkpoint
        folder (``request.storage``, default ``out``: ``fold{f}/checkpoints`` or
        ``fold{f}/member{i}/checkpoints``), configuration, fitting bins, seed (folds, inner splits,
        fits, draws), device and executor (every fold's members are trained together: in local worker
        processes, or as Ray tasks with ``request.address``) and ``resume`` (finished members are
        read back from their done-files, the others continue from their ``last.pt``). Scores are
        always at ``request.bin_ms``.
    k : int
        Number of folds (>= 2).
    folds : sequence of int, optional
        Run only these folds (e.g. to spread folds over machines); the summary covers those run.
    data : NLBData, optional
        The request's data, already loaded (replaces loading).
    log : callable
        Receives progress lines.

    Returns
    -------
    dict
        What ``cv.json`` holds: ``folds`` (per-fold scores of the model and the baseline),
        ``summary`` (:func:`summarize_folds`), ``ensemble_eval`` (scores of the averaged rates on the
        evaluation trials when their target is known) and the configuration.
    """
    t_start = time.perf_counter()
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise SpecError(f"cross-validation needs k >= 2 folds, got {k!r}")
    recipe = member_recipe(request, data)
    data, fit_data, cfg, seed, out = recipe.data, recipe.fit_data, recipe.cfg, request.seed, request.out
    parts = kfold_indices(data.n_train, k, seed)
    run = list(range(k)) if folds is None else sorted(set(int(f) for f in folds))
    if any(not 0 <= f < k for f in run):
        raise SpecError(f"folds must lie in 0..{k - 1}, got {list(folds or [])}")
    log(f"{data.dataset} {data.bin_ms} ms {data.phase}: {k}-fold cross-validation over {data.n_train} training trials "
        f"(folds of {min(map(len, parts))}-{max(map(len, parts))}); running folds {run}"
        + (f"; fitting at {request.fit_bin} ms, rates interpolated to {data.bin_ms} ms" if fit_data is not data else ""))

    # every member of every fold, trained in one go on the request's executor: the core's skeleton
    plans = [Fold(f, parts[f], data, fit_data, [fit_data.eval]) for f in run]
    records, fold_ensembles = train_folds(
        plans, cfg, request.checkpoint_root.resolve(), seed, recipe.device, score_smoothing_split,
        to_scored_bins=recipe.to_scored_bins, log=log, executor=request.executor(), resume=request.resume,
        threads=request.threads, progress=request.progress, meta=dict(request.meta(), cv_k=k))

    ensemble_rates = Rates.mean(fold_ensembles)
    sub = write_submission(out / "submission.h5", data.dataset, data.bin_ms, ensemble_rates)
    ensemble: Optional[Dict[str, Any]] = None
    if data.has_eval_target:
        try:
            ensemble = {k_: float(v) for k_, v in score_nlb(data, ensemble_rates).items()}
        except ValueError as exc:
            ensemble = {"error": f"{type(exc).__name__}: {exc}"}
    result_json = {
        "dataset": data.dataset, "bin_ms": data.bin_ms, "fit_bin_ms": request.fit_bin, "phase": data.phase, "k": k,
        "seed": seed, "folds": records,
        "summary": summarize_folds(records), "ensemble_eval": ensemble, "n_models": cfg.eval.n_models,
        "n_models_averaged": len(run) * cfg.eval.n_models,
        "submission": str(sub), "spec": cfg.to_dict(), "device": str(recipe.device),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps(result_json, indent=2, allow_nan=True))
    return result_json
