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

The summary gives mean and standard error over folds for the model, the baseline and their paired
difference. The K fold models also make an ensemble: their posterior-mean rates on every trial are
averaged into ``submission.h5`` (each model's rates are its own 50-draw posterior means). The
ensemble is not scored by the folds (each scored fold trained the other folds' models); when the
evaluation target is known (phase ``val`` with ``eval_target.h5``) it is scored there.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import pyro
import torch

from pyro_langevin.configs import NLBConfig, default_config
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.nlb import NLBData, check_args, load_nlb
from pyro_langevin.data.splits import build_training_batch, kfold_indices, split_train_valid
from pyro_langevin.nlb_eval import score_nlb, split_rates, write_submission
from pyro_langevin.nlb_pipeline import (
    build_model, cobps_metric, export_rates, load_best, score_smoothing_split, score_split,
)
from pyro_langevin.training import FitConfig, default_device, fit

__all__ = ["cross_validate", "summarize_folds", "format_cv_table"]

PathLike = Union[str, Path]
METRICS = ("co-bps", "fp-bps", "vel R2")


def summarize_folds(folds: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean, standard error and count over folds for the model, the baseline and model - baseline.

    ``folds`` are the per-fold records of :func:`cross_validate` (``{"model": {...}, "smoothing": {...}}``).
    The difference is paired: computed per fold, then summarised.
    """
    def stats(values: List[float]) -> Dict[str, float]:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
        if v.size == 0:
            return {"mean": math.nan, "se": math.nan, "n": 0}
        se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
        return {"mean": float(v.mean()), "se": se, "n": int(v.size)}

    out: Dict[str, Dict[str, Dict[str, float]]] = {"model": {}, "smoothing": {}, "difference": {}}
    for key in METRICS:
        m = [f["model"].get(key) for f in folds]
        b = [f["smoothing"].get(key) for f in folds]
        if all(x is None for x in m):
            continue
        out["model"][key] = stats(m)
        out["smoothing"][key] = stats(b)
        out["difference"][key] = stats([x - y if x is not None and y is not None else None for x, y in zip(m, b)])
    return out


def format_cv_table(summary: Dict[str, Any], k: int) -> str:
    """Plain-text table: mean +- s.e. over ``k`` folds for the model, the baseline and the difference."""
    keys = list(summary["model"])
    lines = [f"{k}-fold cross-validation over the training trials (mean +- s.e. over folds)",
             "  " + f"{'':<22}" + "".join(f"{key:>18}" for key in keys)]
    for who, label in (("model", "LangevinFlow"), ("smoothing", "smoothing"), ("difference", "LangevinFlow - smooth")):
        cells = "".join(f"{summary[who][key]['mean']:>10.4f} +- {summary[who][key]['se']:<5.3f}" for key in keys)
        lines.append("  " + f"{label:<22}" + cells)
    return "\n".join(lines)


def _fold_record(f: int, scored_idx: np.ndarray, n_fit: int, n_inner: int, model_scores: Dict[str, float],
                 base_scores: Dict[str, float], best: Dict[str, Any], epochs_run: int, seconds: float) -> Dict[str, Any]:
    return {
        "fold": f, "scored_trials": [int(i) for i in scored_idx], "n_fit_trials": n_fit, "n_inner_valid_trials": n_inner,
        "model": {k: float(v) for k, v in model_scores.items()}, "smoothing": {k: float(v) for k, v in base_scores.items()},
        "best_epoch": int(best["best_epoch"]), "inner_valid_co_bps": float(best["best_metric"]),
        "epochs_run": epochs_run, "fit_seconds": round(seconds, 1),
    }


def cross_validate(
    dataset: str,
    data_dir: PathLike,
    bin_ms: int = 5,
    phase: str = "val",
    out: PathLike = "runs/nlb-cv",
    *,
    k: int = 5,
    folds: Optional[Sequence[int]] = None,
    seed: int = 0,
    config: Optional[NLBConfig] = None,
    overrides: Optional[Dict[str, Any]] = None,
    epochs: Optional[int] = None,
    quick: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    data: Optional[NLBData] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """K-fold cross-validation of the NLB configuration on the training trials (see the module docstring).

    Parameters
    ----------
    dataset, data_dir, bin_ms, phase
        As :func:`~pyro_langevin.data.nlb.load_nlb` (``data`` replaces loading when given).
    out : path-like
        Output folder: ``cv.json``, ``submission.h5`` (the fold ensemble), ``fold{f}/checkpoints``.
    k : int
        Number of folds.
    folds : sequence of int, optional
        Run only these folds (e.g. to spread folds over machines); the summary covers those run.
    seed : int
        Seeds the fold assignment, the inner splits, the fits and the posterior draws.
    config, overrides, epochs, quick
        As :func:`~pyro_langevin.nlb_pipeline.run_nlb`.
    device, threads, progress, log
        As :func:`~pyro_langevin.nlb_pipeline.run_nlb`.

    Returns
    -------
    dict
        What ``cv.json`` holds: ``folds`` (per-fold scores of the model and the baseline),
        ``summary`` (:func:`summarize_folds`), ``ensemble`` (scores of the averaged rates on the
        evaluation trials when their target is known) and the configuration.
    """
    t_start = time.perf_counter()
    check_args(dataset, bin_ms, phase)
    cfg = config if config is not None else default_config(dataset, bin_ms, quick=quick)
    if overrides:
        cfg = cfg.replace(**overrides)
    if epochs is not None:
        cfg = cfg.replace(epochs=int(epochs))
    dev = torch.device(device) if device else default_device()
    if dev.type == "cpu":
        torch.set_num_threads(int(threads) if threads else 1)
    out = Path(out)
    data = data if data is not None else load_nlb(dataset, data_dir, bin_ms=bin_ms, phase=phase)
    parts = kfold_indices(data.n_train, k, seed)
    run = list(range(k)) if folds is None else sorted(set(int(f) for f in folds))
    if any(not 0 <= f < k for f in run):
        raise NLBDataError(f"folds must lie in 0..{k - 1}, got {list(folds or [])}")
    log(f"{dataset} {bin_ms} ms {phase}: {k}-fold cross-validation over {data.n_train} training trials "
        f"(folds of {min(map(len, parts))}-{max(map(len, parts))}); running folds {run}")

    records: List[Dict[str, Any]] = []
    rate_sums: Dict[str, np.ndarray] = {}
    for f in run:
        scored_rows = torch.as_tensor(parts[f], dtype=torch.long)
        rest_rows = torch.as_tensor(np.setdiff1d(np.arange(data.n_train), parts[f]), dtype=torch.long)
        scored, rest = data.train[scored_rows], data.train[rest_rows]
        fit_trials, inner = split_train_valid(rest, cfg.valid_frac, seed + 1000 * (f + 1))
        train = build_training_batch(fit_trials, [inner, scored, data.eval])
        pyro.clear_param_store()
        torch.manual_seed(seed + f)
        model, guide = build_model(cfg, data.n_neurons, data.n_heldin)
        ckpt_dir = out / f"fold{f}" / "checkpoints"
        t_fit = time.perf_counter()
        result = fit(model, guide, train, inner, FitConfig(**cfg.fit_kwargs(seed + f)), device=dev,
                     metric_fn=cobps_metric(cfg.val_samples, seed), checkpoint_dir=ckpt_dir, progress=progress,
                     meta={"dataset": dataset, "bin_ms": bin_ms, "phase": phase, "config": cfg.to_dict(),
                           "seed": seed, "cv_fold": f, "cv_k": k})
        seconds = time.perf_counter() - t_fit
        best = load_best(model, guide, ckpt_dir, dev)
        rates = export_rates(model, guide, data, cfg.n_samples, seed, dev)
        for key, value in rates.items():
            rate_sums[key] = rate_sums.get(key, 0.0) + value
        record = _fold_record(f, parts[f], fit_trials.n_trials, inner.n_trials,
                              score_split(rates["_train_full"], data, scored, rest),
                              score_smoothing_split(data, scored, rest), best, len(result.history), seconds)
        records.append(record)
        log(f"fold {f}: co-bps {record['model']['co-bps']:.4f} (smoothing {record['smoothing']['co-bps']:.4f}), "
            f"fp-bps {record['model'].get('fp-bps', math.nan):.4f}, vel R2 {record['model'].get('vel R2', math.nan):.4f}; "
            f"best epoch {record['best_epoch']} of {record['epochs_run']} ({seconds:.0f} s)")

    ensemble_rates = {key: v / len(run) for key, v in rate_sums.items()}
    t, n_in = data.n_observed_bins, data.n_heldin
    submission_rates = split_rates(ensemble_rates["_train_full"], n_in, t, "train")
    submission_rates.update({k_: v for k_, v in ensemble_rates.items() if k_.startswith("eval_")})
    sub = write_submission(out / "submission.h5", dataset, bin_ms, submission_rates)
    ensemble: Optional[Dict[str, Any]] = None
    if data.has_eval_target:
        try:
            ensemble = {k_: float(v) for k_, v in score_nlb(data, submission_rates).items()}
        except ValueError as exc:
            ensemble = {"error": f"{type(exc).__name__}: {exc}"}
    result_json = {
        "dataset": dataset, "bin_ms": bin_ms, "phase": phase, "k": k, "seed": seed, "folds": records,
        "summary": summarize_folds(records), "ensemble_eval": ensemble, "n_models": len(run),
        "submission": str(sub), "config": cfg.to_dict(), "device": str(dev),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps(result_json, indent=2, allow_nan=True))
    return result_json
