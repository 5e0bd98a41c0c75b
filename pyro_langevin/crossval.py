"""K-fold cross-validation of a run's recipe: honest scores, paired with the smoothing baseline.

Every accuracy number the project reports comes from here, through a wing (the NLB's
:func:`~pyro_langevin.nlb.cv.cross_validate` over a dataset's training trials, a recording's
:func:`~pyro_langevin.recording.run.fit_recording`). For fold ``f`` (a :class:`Fold`):

* the **scored** trials are fold ``f``; they reach training only through their held-in observed
  spikes (as evaluation trials do), never through the held-out neurons or forward bins they are
  scored on, and they choose nothing;
* the other trials are split again (``eval.valid_frac``) into **fit** trials (full targets) and an
  **inner validation** split that alone picks the checkpoint (co-bps), as every run does
  (:func:`~pyro_langevin.members.fold_members`; with ``eval.n_models = M > 1`` each fold trains the
  M-member ensemble recipe);
* the fold's model is scored on its scored trials (co-bps, fp-bps with forward bins, vel R^2 with
  behaviour, the decoder fitted on the fold's other trials), and so is the smoothing baseline
  fitted on the same trials (``baseline``).

A fold may bring its own data (:attr:`Fold.data`): a recording holds out other neurons in every
fold, so each fold's batches order the neurons its own way. :func:`train_folds` trains every member
of every fold in one :func:`~pyro_langevin.members.train_members` call (on one executor).
:func:`summarize_folds` gives mean and standard error over folds for the model, the baseline and
their paired difference; :func:`format_cv_table` prints them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.members import MemberResult, MemberRunSpec, MemberSpec, Trials, fold_members, train_members
from pyro_langevin.scoring import Rates, score_split

__all__ = ["METRICS", "Fold", "train_folds", "fold_record", "summarize_folds", "format_cv_table"]

#: Scores a fold may carry, in table order.
METRICS = ("co-bps", "fp-bps", "vel R2")

#: ``baseline(data, scored, rest) -> scores``: the smoothing baseline fitted on ``rest``, scored on ``scored``.
Baseline = Callable[[Trials, Batch, Batch], Dict[str, float]]


@dataclass
class Fold:
    """One fold of a cross-validation.

    Attributes
    ----------
    index : int
        The fold's number ``f`` (names ``fold{f}/`` and seeds its inner split: ``seed + 1000 (f + 1)``).
    scored_rows : ndarray of int
        Rows of ``data.train`` the fold scores.
    data : Trials
        The trials, at the bins scores are computed at (held-out neurons as the trailing columns).
    fit_data : Trials, optional
        The same trials at the bins the members fit at (default ``data``).
    heldin_only : list of Batch
        Further trials (at the fitting bins) that enter every member's training through their held-in
        observed spikes only (the NLB evaluation trials).
    """

    index: int
    scored_rows: np.ndarray
    data: Trials
    fit_data: Optional[Trials] = None
    heldin_only: List[Batch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scored_rows = np.asarray(self.scored_rows, dtype=int)
        if self.fit_data is None:
            self.fit_data = self.data

    def split(self, trials: Trials) -> Tuple[Batch, Batch]:
        """``(scored, rest)``: the fold's scored rows of ``trials.train`` and the others."""
        rest_rows = np.setdiff1d(np.arange(trials.n_train), self.scored_rows)
        return (trials.train[torch.as_tensor(self.scored_rows, dtype=torch.long)],
                trials.train[torch.as_tensor(rest_rows, dtype=torch.long)])


def fold_record(f: int, scored_idx: np.ndarray, specs: Sequence[MemberSpec], model_scores: Dict[str, float],
                base_scores: Dict[str, float], members: Sequence[MemberResult],
                singles: Sequence[Dict[str, float]]) -> Dict[str, Any]:
    """The plain-data record of one fold (what ``cv.json`` lists): its trials, scores and members' fits."""
    return {
        "fold": f, "scored_trials": [int(i) for i in scored_idx], "n_models": len(members),
        "n_fit_trials": specs[0].fit_trials.n_trials, "n_inner_valid_trials": specs[0].valid.n_trials,
        "model": {k: float(v) for k, v in model_scores.items()}, "smoothing": {k: float(v) for k, v in base_scores.items()},
        "single_models": [{k: float(v) for k, v in sc.items()} for sc in singles],
        "best_epochs": [m.best_epoch for m in members], "inner_valid_co_bps": [m.best_metric for m in members],
        "epochs_run": [m.epochs_run for m in members], "fit_seconds": [m.fit_seconds for m in members],
        "executor": [m.executor for m in members],
    }


def train_folds(
    folds: Sequence[Fold],
    cfg: MemberRunSpec,
    out: Path,
    seed: int,
    device: Any,
    baseline: Baseline,
    *,
    to_scored_bins: Callable[[Rates], Rates] = lambda rates: rates,
    fold_configs: Optional[Dict[int, MemberRunSpec]] = None,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> Tuple[List[Dict[str, Any]], List[Rates]]:
    """Train, score and compare every fold (see the module docstring).

    Parameters
    ----------
    folds : sequence of Fold
    cfg : MemberRunSpec
        The members' recipe (``eval.n_models`` per fold, ``eval.valid_frac`` inner validation).
    out : Path
        Checkpoints go to ``out/fold{f}/checkpoints`` (``out/fold{f}/member{i}/checkpoints``).
    seed : int
        Fold ``f``'s inner split and members are seeded from ``seed + 1000 (f + 1)``; the posterior
        draws of the exported rates from ``seed``.
    device : torch.device or str
    baseline : callable
        ``baseline(fold.data, scored, rest) -> scores`` of the smoothing baseline on the same split.
    to_scored_bins : callable
        Brings the members' rates (at the fitting bins) to the scored bins.
    fold_configs : dict, optional
        Fold index -> the recipe its members train instead of ``cfg`` (a recipe chosen on the fold's
        other trials); ``cfg`` still sets the split and the ensemble size.
    log : callable
        Receives progress lines (one per fold with its scores).
    train_kwargs
        Go to :func:`~pyro_langevin.members.train_members` (``executor``, ``resume``, ``progress``, ``meta``, ...).

    Returns
    -------
    (list of dict, list of Rates)
        Each fold's record (:func:`fold_record`: scores of the model, its members alone and the
        baseline) and each fold's ensemble rates (at the scored bins, rows of ``fold.data``).
    """
    specs: List[MemberSpec] = []
    splits = {}
    shared = folds[0].fit_data
    for fold in folds:
        f = fold.index
        scored, rest = fold.split(fold.data)
        fit_scored, fit_rest = fold.split(fold.fit_data)
        fold_specs = fold_members(fit_rest, [fit_scored, *fold.heldin_only], cfg.eval.n_models, cfg.eval.valid_frac,
                                  seed + 1000 * (f + 1), out / f"fold{f}", getattr(fold.fit_data, "sessions", None))
        for spec in fold_specs:
            spec.index = len(specs)
            if fold_configs and f in fold_configs:
                spec.recipe = fold_configs[f]
            if fold.fit_data is not shared:  # the fold's own neurons: its members export its trials
                spec.trials = fold.fit_data
            specs.append(spec)
        splits[f] = (scored, rest, fold_specs)
    trained = train_members(specs, cfg, shared, device, log=log, export_seed=seed, **train_kwargs)
    trained = [dataclasses.replace(m, rates=to_scored_bins(m.rates)) for m in trained]

    records: List[Dict[str, Any]] = []
    ensembles: List[Rates] = []
    for fold in folds:
        f = fold.index
        scored, rest, fold_specs = splits[f]
        members = [trained[s.index] for s in fold_specs]
        rates = Rates.mean([m.rates for m in members])
        ensembles.append(rates)
        singles = [score_split(m.rates, fold.data, scored, rest) for m in members]
        record = fold_record(f, fold.scored_rows, fold_specs, score_split(rates, fold.data, scored, rest),
                             baseline(fold.data, scored, rest), members, singles)
        records.append(record)
        log(f"fold {f}: co-bps {record['model']['co-bps']:.4f} (smoothing {record['smoothing']['co-bps']:.4f})"
            + "".join(f", {k} {record['model'][k]:.4f}" for k in METRICS[1:] if k in record["model"])
            + ("; single members' co-bps " + ", ".join(f"{x['co-bps']:.4f}" for x in singles) if len(members) > 1 else ""))
    return records, ensembles


def summarize_folds(folds: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean, standard error and count over folds for the model, the baseline and model - baseline.

    ``folds`` are per-fold records (:func:`fold_record`: ``{"model": {...}, "smoothing": {...}}``).
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


def format_cv_table(summary: Dict[str, Any], k: int, what: str = "the training trials") -> str:
    """Plain-text table: mean +- s.e. over ``k`` folds of ``what`` for the model, the baseline and the difference."""
    keys = list(summary["model"])
    lines = [f"{k}-fold cross-validation over {what} (mean +- s.e. over folds)",
             "  " + f"{'':<22}" + "".join(f"{key:>18}" for key in keys)]
    rows = [("model", "LangevinFlow"), ("smoothing", "smoothing"), ("difference", "LangevinFlow - smooth")]
    if "single_model" in summary:
        rows[0] = ("model", "LangevinFlow ensemble")
        rows += [("single_model", "single member"), ("ensemble_gain", "ensemble - single")]
    for who, label in rows:
        cells = "".join(f"{summary[who][key]['mean']:>10.4f} +- {summary[who][key]['se']:<5.3f}" for key in keys)
        lines.append("  " + f"{label:<22}" + cells)
    return "\n".join(lines)
