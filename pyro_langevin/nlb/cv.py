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

The summary gives mean and standard error over folds for the model, the baseline and their paired
difference. The K fold models also make an ensemble: their posterior-mean rates on every trial are
averaged into ``submission.h5`` (each model's rates are its own 50-draw posterior means). The
ensemble is not scored by the folds (each scored fold trained the other folds' models); when the
evaluation target is known (phase ``val`` with ``eval_target.h5``) it is scored there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from pyro_langevin.data.splits import kfold_indices
from pyro_langevin.nlb.data import NLBData
from pyro_langevin.nlb.members import MemberResult, MemberSpec, fold_members, member_recipe, train_members
from pyro_langevin.nlb.pipeline import score_smoothing_split, score_split
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.nlb.scoring import Rates, score_nlb, write_submission
from pyro_langevin.spec import SpecError

__all__ = ["cross_validate", "summarize_folds", "format_cv_table"]
METRICS = ("co-bps", "fp-bps", "vel R2")


def summarize_folds(folds: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean, standard error and count over folds for the model, the baseline and model - baseline.

    ``folds`` are the per-fold records of :func:`cross_validate` (``{"model": {...}, "smoothing": {...}}``).
    Differences are paired: computed per fold, then summarised. When folds trained ensembles, also
    ``single_model`` (each member scored alone, averaged within its fold) and ``ensemble_gain``.
    """
    def stats(values: List[float]) -> Dict[str, float]:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
        if v.size == 0:
            return {"mean": math.nan, "se": math.nan, "n": 0}
        se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
        return {"mean": float(v.mean()), "se": se, "n": int(v.size)}

    def diff(a: List[Optional[float]], b: List[Optional[float]]) -> List[Optional[float]]:
        return [x - y if x is not None and y is not None else None for x, y in zip(a, b)]

    out: Dict[str, Dict[str, Dict[str, float]]] = {"model": {}, "smoothing": {}, "difference": {}}
    ensembles = any(len(f.get("single_models", [])) > 1 for f in folds)
    if ensembles:
        out.update({"single_model": {}, "ensemble_gain": {}})
    for key in METRICS:
        m = [f["model"].get(key) for f in folds]
        b = [f["smoothing"].get(key) for f in folds]
        if all(x is None for x in m):
            continue
        out["model"][key] = stats(m)
        out["smoothing"][key] = stats(b)
        out["difference"][key] = stats(diff(m, b))
        if ensembles:  # each fold's members scored alone, averaged within the fold
            single = [float(np.mean([x[key] for x in f["single_models"]])) if key in f["single_models"][0] else None
                      for f in folds]
            out["single_model"][key] = stats(single)
            out["ensemble_gain"][key] = stats(diff(m, single))
    return out


def format_cv_table(summary: Dict[str, Any], k: int) -> str:
    """Plain-text table: mean +- s.e. over ``k`` folds for the model, the baseline and the difference."""
    keys = list(summary["model"])
    lines = [f"{k}-fold cross-validation over the training trials (mean +- s.e. over folds)",
             "  " + f"{'':<22}" + "".join(f"{key:>18}" for key in keys)]
    rows = [("model", "LangevinFlow"), ("smoothing", "smoothing"), ("difference", "LangevinFlow - smooth")]
    if "single_model" in summary:
        rows[0] = ("model", "LangevinFlow ensemble")
        rows += [("single_model", "single member"), ("ensemble_gain", "ensemble - single")]
    for who, label in rows:
        cells = "".join(f"{summary[who][key]['mean']:>10.4f} +- {summary[who][key]['se']:<5.3f}" for key in keys)
        lines.append("  " + f"{label:<22}" + cells)
    return "\n".join(lines)


def _fold_record(f: int, scored_idx: np.ndarray, specs: Sequence[MemberSpec], model_scores: Dict[str, float],
                 base_scores: Dict[str, float], members: Sequence[MemberResult],
                 singles: Sequence[Dict[str, float]]) -> Dict[str, Any]:
    return {
        "fold": f, "scored_trials": [int(i) for i in scored_idx], "n_models": len(members),
        "n_fit_trials": specs[0].fit_trials.n_trials, "n_inner_valid_trials": specs[0].valid.n_trials,
        "model": {k: float(v) for k, v in model_scores.items()}, "smoothing": {k: float(v) for k, v in base_scores.items()},
        "single_models": [{k: float(v) for k, v in sc.items()} for sc in singles],
        "best_epochs": [m.best_epoch for m in members], "inner_valid_co_bps": [m.best_metric for m in members],
        "epochs_run": [m.epochs_run for m in members], "fit_seconds": [m.fit_seconds for m in members],
        "executor": [m.executor for m in members],
    }


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

    # every member of every fold, trained in one go (in parallel with workers > 1)
    specs: List[MemberSpec] = []
    splits = {}
    for f in run:
        rest_rows = np.setdiff1d(np.arange(data.n_train), parts[f])
        scored = data.train[torch.as_tensor(parts[f], dtype=torch.long)]
        rest = data.train[torch.as_tensor(rest_rows, dtype=torch.long)]
        fit_scored = fit_data.train[torch.as_tensor(parts[f], dtype=torch.long)]
        fit_rest = fit_data.train[torch.as_tensor(rest_rows, dtype=torch.long)]
        fold_specs = fold_members(fit_rest, [fit_scored, fit_data.eval], cfg.eval.n_models, cfg.eval.valid_frac,
                                  seed + 1000 * (f + 1), request.checkpoint_root.resolve() / f"fold{f}")
        for spec in fold_specs:
            spec.index = len(specs)
            specs.append(spec)
        splits[f] = (scored, rest, fold_specs)
    trained = train_members(specs, cfg, fit_data, recipe.device, executor=request.executor(), log=log,
                            export_seed=seed, resume=request.resume, progress=request.progress,
                            threads=request.threads, meta=dict(request.meta(), cv_k=k))
    trained = [dataclasses.replace(m, rates=recipe.to_scored_bins(m.rates)) for m in trained]

    records: List[Dict[str, Any]] = []
    fold_ensembles: List[Rates] = []
    for f in run:
        scored, rest, fold_specs = splits[f]
        members = [trained[s.index] for s in fold_specs]
        rates = Rates.mean([m.rates for m in members])
        fold_ensembles.append(rates)
        singles = [score_split(m.rates, data, scored, rest) for m in members]
        record = _fold_record(f, parts[f], fold_specs, score_split(rates, data, scored, rest),
                              score_smoothing_split(data, scored, rest), members, singles)
        records.append(record)
        log(f"fold {f}: co-bps {record['model']['co-bps']:.4f} (smoothing {record['smoothing']['co-bps']:.4f}), "
            f"fp-bps {record['model'].get('fp-bps', math.nan):.4f}, vel R2 {record['model'].get('vel R2', math.nan):.4f}"
            + ("; single members' co-bps " + ", ".join(f"{x['co-bps']:.4f}" for x in singles) if len(members) > 1 else ""))

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
