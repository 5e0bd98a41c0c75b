"""Train LangevinFlow on an NLB dataset, select on a validation split, export, score and submit.

:func:`run_nlb` is the whole pipeline (``examples/nlb.py`` and ``pyro-langevin nlb`` call it):

1. :func:`~pyro_langevin.data.nlb.load_nlb` (NWB through nlb_tools, or preprocessed h5 folders).
2. :func:`prepare_batches`: a validation split is carved from the TRAINING trials only. The
   fitting batch holds the other training trials in full (held-in and held-out neurons, observed
   and forward bins), plus the validation and evaluation trials with only their held-in observed
   spikes (``heldin_only``): no validation or evaluation target reaches the likelihood.
3. :func:`build_model`: a :class:`LangevinFlow` that predicts every neuron (held-in + held-out)
   in every bin (observed + forward), and a :class:`GRUGuide` that reads held-in spikes only.
4. :func:`~pyro_langevin.training.fit` with ``select_on='co_bps'``, ``select_mode='max'``: the
   metric is co-bps of the validation split's held-out neurons from posterior-mean rates
   (:func:`cobps_metric`). Checkpoints go to ``{out}/checkpoints`` (``best.pt``, ``last.pt``).
5. :func:`load_best`: the model and guide are loaded from ``best.pt`` explicitly (also after a
   resumed run), then :func:`export_rates` averages ``n_samples`` (default 50) posterior draws:
   expected counts per bin for the training and evaluation trials.
6. Scores through :mod:`pyro_langevin.nlb_eval` for the model and the smoothing baseline, in the
   same run: on the validation split of training trials (``local``: co-bps, fp-bps, vel R^2) and,
   when the eval target is known (phase ``val``), on the evaluation trials (``eval``: co-bps,
   fp-bps, vel R^2, psth R^2, tp corr as the dataset allows).
7. ``submission.h5`` (and ``submission_smoothing.h5``) in nlb_tools' format, for both phases.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import pyro
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.configs import NLBConfig, default_config
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.nlb import NLBData, check_args, load_nlb
from pyro_langevin.data.splits import build_training_batch, split_train_valid
from pyro_langevin.guides.base import StepwiseGuide
from pyro_langevin.guides.bigru import BiGRUGuide
from pyro_langevin.guides.gru import GRUGuide
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.nlb_eval import (
    rates_to_full, score_local, score_nlb, smoothing_baseline, split_rates, write_submission,
)
from pyro_langevin.posterior import posterior_rates
from pyro_langevin.training import FitConfig, FitResult, default_device, fit, load_checkpoint

__all__ = [
    "Prepared", "prepare_batches", "build_model", "cobps_metric", "load_best", "export_rates",
    "run_nlb", "format_table", "score_split", "score_smoothing_split",
]

PathLike = Union[str, Path]


class Prepared:
    """The batches of one run.

    Attributes
    ----------
    train : Batch
        What ``fit`` trains on: ``fit_trials`` in full plus ``valid`` and evaluation trials held-in only.
    fit_trials : Batch
        Training trials not held out (full targets; they fit the baseline's GLM and the decoders).
    valid : Batch
        Validation split of training trials (full targets, for scoring only).
    """

    def __init__(self, train: Batch, fit_trials: Batch, valid: Batch) -> None:
        self.train, self.fit_trials, self.valid = train, fit_trials, valid


def prepare_batches(data: NLBData, valid_frac: float = 0.2, seed: int = 0) -> Prepared:
    """Split ``data.train`` into fitting and validation trials and build the training batch.

    Validation and evaluation trials contribute only their held-in observed spikes to the
    training batch (mask False on their held-out neurons and forward bins).
    """
    fit_trials, valid = split_train_valid(data.train, valid_frac, seed)
    train = build_training_batch(fit_trials, [valid, data.eval])
    return Prepared(train, fit_trials, valid)


def build_model(config: NLBConfig, n_neurons: int, n_heldin: int) -> Tuple[LangevinFlow, StepwiseGuide]:
    """LangevinFlow over all ``n_neurons`` and a GRU guide (``config.guide``: ``"gru"``, filtering,
    or ``"bigru"``, smoothing) reading the ``n_heldin`` held-in neurons."""
    model = LangevinFlow(
        n_neurons, latent_dim=config.latent_dim, dt=config.dt, gamma=config.gamma,
        learn_gamma=config.learn_gamma, potential=config.potential,
        potential_kwargs=dict(config.potential_kwargs) or None,
        decoder_kwargs=dict(d_model=config.d_model, n_heads=config.n_heads,
                            dim_feedforward=config.dim_feedforward, dropout=config.dropout),
    )
    if config.guide == "bigru":
        guide = BiGRUGuide(model, n_heldin, hidden=config.hidden, dropout=config.guide_dropout)
    else:
        guide = GRUGuide(model, n_heldin, hidden=config.hidden, initial_state=config.initial_state,
                         dropout=config.guide_dropout)
    return model, guide


def cobps_metric(n_samples: int = 10, seed: int = 0) -> Callable[[Any, Any, Batch], Dict[str, float]]:
    """A ``fit`` metric: co-bps (and fp-bps) of a validation batch from posterior-mean rates.

    Returns ``{"co_bps": ..., "fp_bps": ...}`` (underscored keys, usable as ``select_on``). The
    draws are seeded (``fit`` runs metrics on a forked RNG), so successive validations compare
    parameters, not Monte Carlo noise.
    """

    def metric(model, guide, valid: Batch) -> Dict[str, float]:
        torch.manual_seed(seed)  # torch only: fit forks the torch RNG around validation
        rates = posterior_rates(model, guide, valid, n_samples=n_samples).numpy()
        scores = score_local(rates, valid.to("cpu"))
        return {k.replace("-", "_").replace(" ", "_"): v for k, v in scores.items()}

    return metric


def load_best(model: torch.nn.Module, guide: torch.nn.Module, checkpoint_dir: PathLike,
              device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load ``{checkpoint_dir}/best.pt`` into ``model`` and ``guide``; return the checkpoint.

    The exported rates must come from the best validation state, never from the last epoch's.
    """
    path = Path(checkpoint_dir) / "best.pt"
    ckpt = load_checkpoint(path, map_location=device)
    model.load_state_dict(ckpt["model"])
    guide.load_state_dict(ckpt["guide"])
    return ckpt


def export_rates(model, guide, data: NLBData, n_samples: int = 50, seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> Dict[str, np.ndarray]:
    """Posterior-mean rates (mean over ``n_samples`` draws, counts per bin) under nlb_tools' keys.

    Training trials get ``train_rates_heldin``/``_heldout``; evaluation trials also get the
    forward-bin rates. The draws are seeded, so the same state gives the same rates.
    """
    pyro.set_rng_seed(seed)
    r_train = posterior_rates(model, guide, data.train.to(device), n_samples=n_samples).numpy()
    r_eval = posterior_rates(model, guide, data.eval.to(device), n_samples=n_samples).numpy()
    t, n_in = data.n_observed_bins, data.n_heldin
    rates = split_rates(r_train, n_in, t, "train")
    rates.update(split_rates(r_eval, n_in, t, "eval"))
    rates["_train_full"] = r_train  # Batch layout (trial, T+F, N): for local scoring
    return rates


def _submission_rates(rates: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k: v for k, v in rates.items() if not k.startswith("_")}


def score_split(rates_train_full: np.ndarray, data: NLBData, scored: Batch, decoder_fit: Batch) -> Dict[str, float]:
    """co-bps / fp-bps / vel R^2 of training trials ``scored``; the velocity decoder fits on ``decoder_fit``.

    ``rates_train_full`` holds rates for every trial of ``data.train`` in the Batch layout; the
    rows of ``scored`` and ``decoder_fit`` are found by their trial ``index``.
    """
    pos = {int(i): k for k, i in enumerate(data.train.index.tolist())}
    rows = lambda b: [pos[int(i)] for i in b.index.tolist()]  # noqa: E731
    return score_local(rates_train_full[rows(scored)], scored, rates_train_full[rows(decoder_fit)], decoder_fit)


def score_smoothing_split(data: NLBData, scored: Batch, decoder_fit: Batch) -> Dict[str, float]:
    """The smoothing baseline fitted on ``decoder_fit`` (GLM and decoder), scored on ``scored``."""
    r = smoothing_baseline(decoder_fit, scored, data.bin_ms, data.dataset)
    r_fit = rates_to_full({"eval_rates_heldin": r["train_rates_heldin"],
                           "eval_rates_heldout": r["train_rates_heldout"]}, "eval")
    return score_local(rates_to_full(r, "eval"), scored, r_fit, decoder_fit)


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


def run_nlb(
    dataset: str,
    data_dir: PathLike,
    bin_ms: int = 5,
    phase: str = "val",
    out: PathLike = "runs/nlb",
    *,
    epochs: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 0,
    quick: bool = False,
    config: Optional[NLBConfig] = None,
    resume: bool = False,
    progress: bool = True,
    metric_fn: Optional[Callable] = None,
    overrides: Optional[Dict[str, Any]] = None,
    threads: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train, select, export, score and write submissions for one NLB dataset.

    Parameters
    ----------
    dataset, data_dir, bin_ms, phase
        As :func:`~pyro_langevin.data.nlb.load_nlb`.
    out : path-like
        Output folder: ``metrics.json``, ``submission.h5``, ``submission_smoothing.h5``,
        ``checkpoints/{best,last}.pt``.
    epochs : int, optional
        Override the configuration's epoch count.
    device : str, optional
        ``cuda`` when available, else ``cpu``.
    seed : int
        Seeds the validation split, the fit and the posterior draws.
    quick : bool
        Smoke-test configuration (:func:`~pyro_langevin.configs.default_config`).
    config : NLBConfig, optional
        Overrides the per-dataset default entirely (``epochs`` still applies).
    resume : bool
        Continue from ``{out}/checkpoints/last.pt`` when it exists.
    overrides : dict, optional
        :class:`~pyro_langevin.configs.NLBConfig` fields to change (after ``config``/defaults).
    threads : int, optional
        ``torch.set_num_threads`` on CPU; default 1 (this model is many small sequential ops:
        more threads do not help and, on a loaded machine, slow it down many times over).
    metric_fn : callable, optional
        Replaces the validation metric (must return ``co_bps``); for tests and experiments.
    log : callable
        Receives progress lines.

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    t_start = time.perf_counter()
    check_args(dataset, bin_ms, phase)
    cfg = config if config is not None else default_config(dataset, bin_ms, quick=quick)
    if overrides:
        cfg = cfg.replace(**overrides)
    if epochs is not None:
        if isinstance(epochs, bool) or int(epochs) < 1:
            raise NLBDataError(f"epochs must be a positive integer, got {epochs!r}")
        cfg = cfg.replace(epochs=int(epochs))
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NLBDataError("device 'cuda' asked for, but no CUDA GPU is available")
    if dev.type == "cpu":
        torch.set_num_threads(int(threads) if threads else 1)
    out = Path(out)
    ckpt_dir = out / "checkpoints"

    data = load_nlb(dataset, data_dir, bin_ms=bin_ms, phase=phase)
    prep = prepare_batches(data, cfg.valid_frac, seed)
    log(f"{dataset} {bin_ms} ms {phase}: {data.n_train} training trials ({prep.fit_trials.n_trials} fit, "
        f"{prep.valid.n_trials} validation), {data.n_eval} evaluation trials; {data.n_heldin} held-in + "
        f"{data.n_heldout} held-out neurons; {data.n_observed_bins} + {data.n_forward_bins} bins")

    pyro.clear_param_store()
    torch.manual_seed(seed)
    model, guide = build_model(cfg, data.n_neurons, data.n_heldin)
    fit_config = FitConfig(**cfg.fit_kwargs(seed))
    last = ckpt_dir / "last.pt"
    resume_from = last if resume and last.is_file() else None
    if resume and resume_from is None:
        log(f"no checkpoint at {last}: starting afresh")
    meta = {"dataset": dataset, "bin_ms": bin_ms, "phase": phase, "config": cfg.to_dict(), "seed": seed}
    t_fit = time.perf_counter()
    result: FitResult = fit(model, guide, prep.train, prep.valid, fit_config, device=dev,
                            metric_fn=metric_fn or cobps_metric(cfg.val_samples, seed),
                            checkpoint_dir=ckpt_dir, resume=resume_from, progress=progress, meta=meta)
    fit_seconds = time.perf_counter() - t_fit
    best = load_best(model, guide, ckpt_dir, dev)
    log(f"fit: {len(result.history)} epochs in {fit_seconds:.0f} s; best validation co-bps "
        f"{best['best_metric']:.4f} at epoch {best['best_epoch']} (loaded from {ckpt_dir / 'best.pt'})")

    rates = export_rates(model, guide, data, cfg.n_samples, seed, dev)
    baseline = smoothing_baseline(data.train, data.eval, bin_ms, dataset)

    metrics: Dict[str, Any] = {
        "dataset": dataset, "bin_ms": bin_ms, "phase": phase,
        "n_fit_trials": prep.fit_trials.n_trials, "n_valid_trials": prep.valid.n_trials,
        "n_eval_trials": data.n_eval,
        "local": {"model": _clean(score_split(rates["_train_full"], data, prep.valid, prep.fit_trials)),
                  "smoothing": _clean(score_smoothing_split(data, prep.valid, prep.fit_trials))},
        "eval": None,
    }
    sub = write_submission(out / "submission.h5", dataset, bin_ms, _submission_rates(rates))
    sub_base = write_submission(out / "submission_smoothing.h5", dataset, bin_ms, baseline)
    if data.has_eval_target:
        try:
            metrics["eval"] = {"model": _clean(score_nlb(data, rates)),
                               "smoothing": _clean(score_nlb(data, baseline))}
        except ValueError as exc:  # e.g. too few evaluation trials per condition for tp corr
            log(f"warning: scoring the evaluation trials failed ({type(exc).__name__}: {exc}); "
                f"the submissions are written")
            metrics["eval"] = {"error": f"{type(exc).__name__}: {exc}"}
    history = [h for h in result.history if "co_bps" in h]
    metrics.update({
        "best_epoch": int(best["best_epoch"]), "best_valid_co_bps": float(best["best_metric"]),
        "epochs_run": len(result.history), "epochs": cfg.epochs, "stopped_early": result.stopped_early,
        "fit_seconds": round(fit_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "n_samples": cfg.n_samples, "device": str(dev), "seed": seed, "quick": quick,
        "torch_threads": torch.get_num_threads(), "host": platform.node(),
        "valid_curve": [[int(h["epoch"]), round(float(h["co_bps"]), 4)] for h in history],
        "submission": str(sub), "submission_smoothing": str(sub_base),
        "checkpoint": str(ckpt_dir / "best.pt"), "config": cfg.to_dict(),
    })
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    return metrics
