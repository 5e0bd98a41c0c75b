"""Train LangevinFlow on an NLB dataset (one model or a fold ensemble), export, score and submit.

:func:`run_nlb` is the whole pipeline (``examples/nlb.py`` and ``pyro-langevin nlb`` call it):

1. :func:`~pyro_langevin.nlb.data.load_nlb` (NWB through nlb_tools, or preprocessed h5 folders).
   5 ms data are summed into 20 ms bins for the members to fit (``fit_bin_ms``,
   :mod:`pyro_langevin.nlb.coarse`); their rates are interpolated back to 5 ms before step 5.
2. :func:`fold_members`: validation data are carved from the TRAINING trials only: a random split
   for one model, fold i of K for ensemble member i. A member's fitting batch
   (:meth:`MemberSpec.training_batch`) holds its other training trials in full (held-in and
   held-out neurons, observed and forward bins), plus its validation trials and the evaluation
   trials with only their held-in observed spikes: no validation or evaluation target reaches the
   likelihood.
3. :func:`~pyro_langevin.spec.build`: a :class:`LangevinFlow` that predicts every neuron (held-in +
   held-out) in every bin (observed + forward), and a GRU guide that reads held-in spikes only.
4. :func:`train_member` (through :func:`train_members`, optionally in worker processes):
   :func:`~pyro_langevin.training.fit` with ``select_on='co_bps'``, ``select_mode='max'`` on the
   member's validation trials (:func:`cobps_metric`), checkpoints in ``{out}/checkpoints`` (one
   model) or ``{out}/member{i}/checkpoints``; then :func:`~pyro_langevin.spec.load_run` rebuilds
   the model and guide from ``best.pt`` alone (also after a resumed run) and :func:`export_rates`
   averages ``eval.export_draws`` (default 50) posterior draws: expected counts per bin for the
   training and evaluation trials, in the batch layout (:class:`~pyro_langevin.nlb.scoring.Rates`).
5. :meth:`Rates.mean <pyro_langevin.nlb.scoring.Rates.mean>` over the members; scores through :mod:`pyro_langevin.nlb.scoring` for the
   model and the smoothing baseline, in the same run: on each member's validation split
   (``local``: co-bps, fp-bps, vel R^2; optimistic, since those trials chose the checkpoint) and,
   when the eval target is known (phase ``val``), on the evaluation trials (``eval``: co-bps,
   fp-bps, vel R^2, psth R^2, tp corr as the dataset allows).
6. ``submission.h5`` (and ``submission_smoothing.h5``) in nlb_tools' format, for both phases (the
   only place, with scoring, where rates take nlb_tools' keys).

Accuracy estimates come from :mod:`pyro_langevin.nlb.cv` (cross-validation of this recipe).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import json
import multiprocessing
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyro
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.nlb.config import NLBConfig, default_config
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.nlb.data import NLBData, check_args, load_nlb
from pyro_langevin.data.splits import build_training_batch, kfold_indices, split_train_valid
from pyro_langevin.nlb.baseline import smoothing_baseline
from pyro_langevin.nlb.coarse import coarsen_data, resolve_fit_bin, upsample
from pyro_langevin.nlb.scoring import Rates, rates_to_full, score_local, score_nlb, write_submission
from pyro_langevin.posterior import posterior_rates
from pyro_langevin.spec import build, load_run, run_meta
from pyro_langevin.training import default_device, fit

__all__ = [
    "cobps_metric", "export_rates", "run_nlb", "run_setup", "format_table", "score_split", "score_smoothing_split",
    "MemberSpec", "MemberResult", "same_trials", "fold_members", "build_member", "train_member", "train_members",
]

PathLike = Union[str, Path]


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


def export_rates(model, guide, data: NLBData, n_samples: int = 50, seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> Rates:
    """Posterior-mean rates (mean over ``n_samples`` draws, counts per bin) of every training and
    evaluation trial, in the batch layout. The draws are seeded: the same state gives the same rates."""
    pyro.set_rng_seed(seed)
    return Rates(posterior_rates(model, guide, data.train.to(device), n_samples=n_samples).numpy(),
                 posterior_rates(model, guide, data.eval.to(device), n_samples=n_samples).numpy())


def score_split(rates: Rates, data: NLBData, scored: Batch, decoder_fit: Batch) -> Dict[str, float]:
    """co-bps / fp-bps / vel R^2 of training trials ``scored``; the velocity decoder fits on ``decoder_fit``.

    The rows of ``scored`` and ``decoder_fit`` in ``rates.train`` are found by their trial ``index``.
    """
    pos = {int(i): k for k, i in enumerate(data.train.index.tolist())}
    rows = lambda b: [pos[int(i)] for i in b.index.tolist()]  # noqa: E731
    return score_local(rates.train[rows(scored)], scored, rates.train[rows(decoder_fit)], decoder_fit)


def score_smoothing_split(data: NLBData, scored: Batch, decoder_fit: Batch) -> Dict[str, float]:
    """The smoothing baseline fitted on ``decoder_fit`` (GLM and decoder), scored on ``scored``."""
    r = smoothing_baseline(decoder_fit, scored, data.bin_ms, data.dataset)
    r_fit = rates_to_full({"eval_rates_heldin": r["train_rates_heldin"],
                           "eval_rates_heldout": r["train_rates_heldout"]}, "eval")
    return score_local(rates_to_full(r, "eval"), scored, r_fit, decoder_fit)


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


# ----- members: the one fit path of NLB runs (single model, K-fold ensemble, cross-validation) -----
@dataclass
class MemberSpec:
    """What one member trains on.

    Attributes
    ----------
    index : int
        Member number (names its checkpoint folder).
    fit_trials : Batch
        Training trials used in full (held-in and held-out neurons, observed and forward bins).
    valid : Batch
        Training trials that pick the checkpoint (co-bps); in training, held-in spikes only.
    heldin_only : list of Batch
        Further trials that enter training through their held-in observed spikes only
        (the evaluation trials; a cross-validation fold's scored trials).
    seed : int
        Seeds the model's initialisation and the fit.
    checkpoint_dir : Path
    """

    index: int
    fit_trials: Batch
    valid: Batch
    heldin_only: List[Batch]
    seed: int
    checkpoint_dir: Path

    def training_batch(self) -> Batch:
        """What ``fit`` trains on: ``fit_trials`` in full; ``valid`` and ``heldin_only`` trials with
        their held-in observed spikes only (mask False on held-out neurons and forward bins)."""
        return build_training_batch(self.fit_trials, [self.valid, *self.heldin_only])


@dataclass
class MemberResult:
    """What one trained member gives back (all plain data: it crosses process boundaries)."""

    index: int
    rates: Rates
    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_early: bool
    fit_seconds: float
    valid_curve: List[List[float]] = field(default_factory=list)


def same_trials(batch: Batch, like: Batch) -> Batch:
    """The trials of ``batch`` that ``like`` holds (matched by ``index``), in ``like``'s order: the
    same trials at another bin width."""
    row = {int(i): k for k, i in enumerate(batch.index.tolist())}
    missing = [int(i) for i in like.index.tolist() if int(i) not in row]
    if missing:
        raise NLBDataError(f"trials {missing[:5]} are not in the batch")
    return batch[torch.as_tensor([row[int(i)] for i in like.index.tolist()], dtype=torch.long)]


def _at_bins(spec: MemberSpec, train: Batch) -> MemberSpec:
    """``spec`` with its fitting and validation trials taken from ``train`` (another bin width), for
    scoring; its checkpoints and seed stay."""
    return dataclasses.replace(spec, fit_trials=same_trials(train, spec.fit_trials),
                               valid=same_trials(train, spec.valid), heldin_only=[])


def fold_members(train: Batch, heldin_only: Sequence[Batch], n_models: int, valid_frac: float, seed: int,
                 out: Path) -> List[MemberSpec]:
    """Member specs of a run over the training trials ``train``: one member on a random ``valid_frac``
    split, or a K-fold ensemble (member ``i`` validates on fold ``i`` of ``train``, fits the rest).

    ``heldin_only`` trials (the evaluation trials, a cross-validation fold's scored trials) enter
    every member's training through their held-in observed spikes only. With ``n_models == 1`` the
    checkpoints go to ``out/checkpoints`` (the single-model layout); with more, member ``i`` writes
    ``out/member{i}/checkpoints``.
    """
    if n_models == 1:
        fit_trials, valid = split_train_valid(train, valid_frac, seed)
        return [MemberSpec(0, fit_trials, valid, list(heldin_only), seed, out / "checkpoints")]
    specs = []
    for i, part in enumerate(kfold_indices(train.n_trials, n_models, seed)):
        rest = np.setdiff1d(np.arange(train.n_trials), part)
        specs.append(MemberSpec(i, train[torch.as_tensor(rest)], train[torch.as_tensor(part)],
                                list(heldin_only), seed + i, out / f"member{i}" / "checkpoints"))
    return specs


def build_member(spec: MemberSpec, cfg: NLBConfig, data: NLBData) -> Tuple[NLBConfig, Any, Any]:
    """The member's own run spec (``cfg`` with the member's seed, stored with its checkpoints) and its
    freshly built model and guide, initialised from that seed."""
    cfg = dataclasses.replace(cfg, fit=cfg.member_fit(spec.seed))
    model, guide = build(cfg, data.n_neurons, data.n_heldin)
    return cfg, model, guide


def train_member(
    spec: MemberSpec,
    cfg: NLBConfig,
    data: NLBData,
    device: Union[str, torch.device] = "cpu",
    *,
    export_seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    metric_fn: Optional[Callable] = None,
    threads: Optional[int] = None,
    meta: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> MemberResult:
    """Train one member, load its best checkpoint and export its posterior-mean rates.

    The rates (counts per bin, mean of ``cfg.eval.export_draws`` draws) come from ``best.pt``, never
    from the last epoch, for every training and evaluation trial (see :func:`export_rates`): the
    model and guide are rebuilt from that checkpoint alone (:func:`~pyro_langevin.spec.load_run`).
    """
    dev = torch.device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    train = spec.training_batch()
    cfg, model, guide = build_member(spec, cfg, data)
    last = spec.checkpoint_dir / "last.pt"
    resume_from = last if resume and last.is_file() else None
    if resume and resume_from is None:
        log(f"no checkpoint at {last}: starting afresh")
    t_fit = time.perf_counter()
    result = fit(model, guide, train, spec.valid, cfg.fit, device=dev,
                 metric_fn=metric_fn or cobps_metric(cfg.eval.select_draws, export_seed),
                 checkpoint_dir=spec.checkpoint_dir, resume=resume_from, progress=progress,
                 meta=run_meta(cfg, data.n_neurons, data.n_heldin, **(meta or {}), member=spec.index))
    seconds = time.perf_counter() - t_fit
    model, guide, _, best = load_run(spec.checkpoint_dir, "best", map_location=dev)
    log(f"exporting rates from {spec.checkpoint_dir / 'best.pt'}: mean of {cfg.eval.export_draws} posterior "
        f"draws for {data.n_train} training and {data.n_eval} evaluation trials ...")
    rates = export_rates(model, guide, data, cfg.eval.export_draws, export_seed, dev)
    curve = [[int(h["epoch"]), round(float(h["co_bps"]), 4)] for h in result.history if "co_bps" in h]
    return MemberResult(spec.index, rates, int(best["best_epoch"]), float(best["best_metric"]),
                        len(result.history), result.stopped_early, round(seconds, 1), curve)


def _train_in_worker(spec: MemberSpec, cfg: NLBConfig, data: NLBData, device: str, kwargs: Dict[str, Any]) -> MemberResult:
    torch.set_num_threads(1)
    return train_member(spec, cfg, data, device, progress=False, log=lambda s: None, **kwargs)


def train_members(
    specs: Sequence[MemberSpec],
    cfg: NLBConfig,
    data: NLBData,
    device: Union[str, torch.device] = "cpu",
    *,
    workers: int = 1,
    log: Callable[[str], None] = print,
    **kwargs: Any,
) -> List[MemberResult]:
    """Train every member; ``workers > 1`` trains that many at once in separate processes (CPU only).

    ``kwargs`` go to :func:`train_member` (``export_seed``, ``resume``, ``threads``, ``meta``;
    ``progress`` and ``metric_fn`` only with one worker). Results come back in member order.
    """
    dev = torch.device(device)
    if workers <= 1 or len(specs) == 1 or dev.type != "cpu":
        results = []
        for spec in specs:
            res = train_member(spec, cfg, data, dev, log=log, **kwargs)
            _log_member(res, len(specs), log)
            results.append(res)
        return results
    if kwargs.get("metric_fn") is not None:
        raise ValueError("a custom metric_fn cannot be sent to worker processes; use workers=1")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("progress", "metric_fn")}
    done: Dict[int, MemberResult] = {}
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    with futures.ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=ctx) as pool:
        jobs = [pool.submit(_train_in_worker, spec, cfg, data, str(dev), kwargs) for spec in specs]
        log(f"training {len(specs)} members in {min(workers, len(specs))} worker processes ...")
        for job in futures.as_completed(jobs):
            res = job.result()
            done[res.index] = res
            _log_member(res, len(specs), log)
    return [done[s.index] for s in specs]


def _log_member(res: MemberResult, n: int, log: Callable[[str], None]) -> None:
    who = "fit" if n == 1 else f"member {res.index + 1}/{n}"
    log(f"{who}: {res.epochs_run} epochs in {res.fit_seconds:.0f} s; best validation co-bps "
        f"{res.best_metric:.4f} at epoch {res.best_epoch}")


def run_setup(dataset: str, bin_ms: int, quick: bool, config: Optional[NLBConfig], overrides: Optional[Dict[str, Any]],
              epochs: Optional[int], device: Optional[Union[str, torch.device]],
              threads: Optional[int]) -> Tuple[NLBConfig, torch.device]:
    """The configuration (default or ``config``, then ``overrides`` by dotted key, then ``epochs``) and
    the device of a run; sets the torch CPU threads (default 1). Shared by :func:`run_nlb` and
    cross-validation."""
    cfg = config if config is not None else default_config(dataset, bin_ms, quick=quick)
    changes = dict(overrides or {})
    if epochs is not None:
        if isinstance(epochs, bool) or int(epochs) < 1:
            raise NLBDataError(f"epochs must be a positive integer, got {epochs!r}")
        changes["fit.epochs"] = int(epochs)
    if changes:
        try:
            cfg = cfg.override(changes)
        except ValueError as exc:
            raise NLBDataError(str(exc)) from None
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NLBDataError("device 'cuda' asked for, but no CUDA GPU is available")
    if dev.type == "cpu":
        torch.set_num_threads(int(threads) if threads else 1)
    return cfg, dev


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
    workers: Optional[int] = None,
    fit_bin_ms: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train, select, export, score and write submissions for one NLB dataset.

    Parameters
    ----------
    dataset, data_dir, bin_ms, phase
        As :func:`~pyro_langevin.nlb.data.load_nlb`.
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
        Smoke-test configuration (:func:`~pyro_langevin.nlb.config.default_config`).
    config : NLBConfig, optional
        Overrides the per-dataset default entirely (``epochs`` still applies). It configures the
        model at ``fit_bin_ms``.
    resume : bool
        Continue from ``{out}/checkpoints/last.pt`` when it exists.
    overrides : dict, optional
        Dotted keys of :class:`~pyro_langevin.nlb.config.NLBConfig` to change (``{"fit.lr": 1e-3}``),
        after ``config``/defaults.
    threads : int, optional
        ``torch.set_num_threads`` on CPU; default 1 (this model is many small sequential ops:
        more threads do not help and, on a loaded machine, slow it down many times over).
    workers : int, optional
        With ``config.eval.n_models > 1`` on CPU, train that many members at once in worker processes
        (one torch thread each); default 1.
    metric_fn : callable, optional
        Replaces the validation metric (must return ``co_bps``); for tests and experiments.
    fit_bin_ms : int, optional
        The bin width the members fit at (default :data:`~pyro_langevin.nlb.coarse.FIT_BIN_MS`: 20 ms,
        also for 5 ms data). Coarser than ``bin_ms``: they fit the spikes summed into those bins
        and their rates are interpolated back to ``bin_ms`` (:mod:`pyro_langevin.nlb.coarse`)
        before anything is scored or written.
    log : callable
        Receives progress lines.

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    t_start = time.perf_counter()
    check_args(dataset, bin_ms, phase)
    fit_bin = resolve_fit_bin(bin_ms, fit_bin_ms)
    cfg, dev = run_setup(dataset, fit_bin, quick, config, overrides, epochs, device, threads)
    out = Path(out)
    n_models = cfg.eval.n_models

    data = load_nlb(dataset, data_dir, bin_ms=bin_ms, phase=phase)
    fit_data = coarsen_data(data, fit_bin)
    fit_specs = fold_members(fit_data.train, [fit_data.eval], n_models, cfg.eval.valid_frac, seed, out)
    specs = fit_specs if fit_data is data else [_at_bins(s, data.train) for s in fit_specs]
    split = (f"{specs[0].fit_trials.n_trials} fit, {specs[0].valid.n_trials} validation" if n_models == 1 else
             f"{n_models} members, each validating on one of {n_models} folds and fitting the others")
    log(f"{dataset} {bin_ms} ms {phase}: {data.n_train} training trials ({split}), {data.n_eval} evaluation "
        f"trials; {data.n_heldin} held-in + {data.n_heldout} held-out neurons; "
        f"{data.n_observed_bins} + {data.n_forward_bins} bins"
        + (f"; fitting at {fit_bin} ms, rates interpolated to {bin_ms} ms" if fit_bin != bin_ms else ""))

    meta = {"dataset": dataset, "bin_ms": bin_ms, "phase": phase, "seed": seed, "fit_bin_ms": fit_bin}
    t_fit = time.perf_counter()
    members = train_members(fit_specs, cfg, fit_data, dev, workers=workers or 1, log=log, export_seed=seed,
                            resume=resume, progress=progress, metric_fn=metric_fn, meta=meta)
    members = [dataclasses.replace(m, rates=upsample(m.rates, fit_bin // bin_ms)) for m in members]
    fit_seconds = time.perf_counter() - t_fit
    rates = Rates.mean([m.rates for m in members])
    log("scoring the model and the smoothing baseline ...")
    t_step = time.perf_counter()
    baseline = smoothing_baseline(data.train, data.eval, bin_ms, dataset)

    # Each member scored on its own validation split, which also picked its checkpoint: optimistic.
    local = [(score_split(m.rates, data, s.valid, s.fit_trials),
              score_smoothing_split(data, s.valid, s.fit_trials)) for m, s in zip(members, specs)]
    metrics: Dict[str, Any] = {
        "dataset": dataset, "bin_ms": bin_ms, "fit_bin_ms": fit_bin, "phase": phase, "n_models": n_models,
        "n_fit_trials": specs[0].fit_trials.n_trials, "n_valid_trials": specs[0].valid.n_trials,
        "n_eval_trials": data.n_eval,
        "local": {"model": _clean(_mean_scores([m for m, _ in local])),
                  "smoothing": _clean(_mean_scores([b for _, b in local]))},
        "eval": None,
    }
    nlb_rates = rates.submission(data.n_heldin, data.n_observed_bins)
    sub = write_submission(out / "submission.h5", dataset, bin_ms, nlb_rates)
    sub_base = write_submission(out / "submission_smoothing.h5", dataset, bin_ms, baseline)
    if data.has_eval_target:
        try:
            metrics["eval"] = {"model": _clean(score_nlb(data, nlb_rates)),
                               "smoothing": _clean(score_nlb(data, baseline))}
        except ValueError as exc:  # e.g. too few evaluation trials per condition for tp corr
            log(f"warning: scoring the evaluation trials failed ({type(exc).__name__}: {exc}); "
                f"the submissions are written")
            metrics["eval"] = {"error": f"{type(exc).__name__}: {exc}"}
    log(f"scored in {time.perf_counter() - t_step:.0f} s")
    first = members[0]
    metrics.update({
        "best_epoch": first.best_epoch, "best_valid_co_bps": float(np.mean([m.best_metric for m in members])),
        "epochs_run": first.epochs_run, "epochs": cfg.fit.epochs, "stopped_early": first.stopped_early,
        "fit_seconds": round(fit_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "export_draws": cfg.eval.export_draws, "device": str(dev), "seed": seed, "quick": quick,
        "torch_threads": torch.get_num_threads(), "workers": workers or 1, "host": platform.node(),
        "valid_curve": first.valid_curve,
        "members": [{"member": m.index, "best_epoch": m.best_epoch, "best_valid_co_bps": m.best_metric,
                     "epochs_run": m.epochs_run, "fit_seconds": m.fit_seconds,
                     "valid": _clean(sc), "valid_trials": [int(i) for i in s.valid.index.tolist()]}
                    for m, s, (sc, _) in zip(members, specs, local)],
        "submission": str(sub), "submission_smoothing": str(sub_base),
        "checkpoint": str(specs[0].checkpoint_dir / "best.pt"), "spec": cfg.to_dict(),
    })
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    return metrics
