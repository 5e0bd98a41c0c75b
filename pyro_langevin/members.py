"""The members of a run: the one recipe every entry point trains (NLB runs, cross-validation, the search,
a recording's fit).

A run's models are its *members*: one model, or a K-fold ensemble. Every entry point builds them the
same way, so a search tunes and a cross-validation scores exactly the model a run trains:

* :class:`MemberRunSpec`: a run spec with an ``eval`` section (:class:`EvalConfig`: validation
  split, posterior draws, ensemble size); members select their checkpoint on validation co-bps;
* :func:`fold_members`: validation data are carved from the TRAINING trials only: a random split
  for one model, fold i of K for ensemble member i. A member's fitting batch
  (:meth:`MemberSpec.training_batch`) holds its other training trials in full (held-in and held-out
  neurons, observed and forward bins), plus its validation trials and any further trials (evaluation
  trials, a cross-validation fold's scored trials) with only their held-in observed spikes: no
  validation or evaluation target reaches the likelihood;
* :func:`build_member`: the member's configuration (its own seed) and its seeded model and guide;
* :func:`train_member` / :func:`train_members`: :func:`~pyro_langevin.training.fit` selecting on the
  validation co-bps (:func:`cobps_metric`), then the model and guide rebuilt from ``best.pt`` alone
  (:func:`~pyro_langevin.spec.load_run`) and :func:`export_rates`: the mean of
  ``eval.export_draws`` posterior draws for every trial of the run's data (:class:`Trials`: a
  ``train`` batch and an ``eval`` batch, e.g. :class:`TrialSet` or the NLB wing's ``NLBData``).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyro
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.splits import TrialSizes, build_training_batch, kfold_indices, split_train_valid
from pyro_langevin.posterior import posterior_rates
from pyro_langevin.scoring import Rates, score_local
from pyro_langevin.spec import FitConfig, RunSpec, SpecError, build, load_run, register_spec_class, run_meta
from pyro_langevin.training import fit

__all__ = [
    "EvalConfig", "SELECTION", "MemberRunSpec", "Trials", "TrialSet", "cobps_metric", "export_rates", "MemberSpec",
    "MemberResult", "same_trials", "fold_members", "build_member", "train_member", "train_members",
]


@dataclass
class EvalConfig:
    """How a run selects, exports and ensembles.

    ``valid_frac``: validation split of the training trials (model selection) for one model;
    ``select_draws``: posterior draws behind the validation co-bps; ``export_draws``: posterior
    draws averaged for the exported rates (reference 50); ``n_models``: 1 (one model, validated on a
    random ``valid_frac`` split) or K > 1 (member i validated on fold i of the training trials and
    fitted on the others, their rates averaged).
    """

    valid_frac: float = 0.2
    select_draws: int = 10
    export_draws: int = 50
    n_models: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.n_models, bool) or not isinstance(self.n_models, int) or self.n_models < 1:
            raise SpecError(f"eval.n_models must be an integer >= 1, got {self.n_models!r}")
        bad = {"valid_frac": 0 < self.valid_frac < 1, "select_draws": self.select_draws >= 1,
               "export_draws": self.export_draws >= 1}
        wrong = [f"eval.{k}={getattr(self, k)!r}" for k, ok in bad.items() if not ok]
        if wrong:
            raise SpecError(f"invalid setting {', '.join(wrong)} (valid_frac in (0, 1), draw counts >= 1)")


#: What every member selects on: validation co-bps, the higher the better.
SELECTION = dict(select_on="co_bps", select_mode="max")


@register_spec_class
@dataclass
class MemberRunSpec(RunSpec):
    """A run spec whose models are members (:func:`train_member`): the run spec's ``model``, ``guide``
    (any guide of :data:`~pyro_langevin.spec.GUIDES`) and ``fit`` sections and ``eval``
    (:class:`EvalConfig`). Override by dotted keys: ``cfg.override({"fit.lr": 1e-3})``.
    """

    fit: FitConfig = field(default_factory=lambda: FitConfig(**SELECTION))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def member_fit(self, seed: int) -> FitConfig:
        """The fit configuration of one member (its own seed), selecting on validation co-bps."""
        return dataclasses.replace(self.fit, seed=seed, **SELECTION)


#: What members train on and export rates for: a ``train`` and an ``eval`` batch with their sizes.
Trials = TrialSizes


@dataclass
class TrialSet(TrialSizes):
    """:class:`~pyro_langevin.data.splits.TrialSizes` of plain batches: ``train`` (targets known) and
    ``eval`` (none by default)."""

    train: Batch
    eval: Optional[Batch] = None


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


def export_rates(model, guide, data: Trials, n_samples: int = 50, seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> Rates:
    """Posterior-mean rates (mean over ``n_samples`` draws, counts per bin) of every training and
    evaluation trial, in the batch layout. The draws are seeded: the same state gives the same rates."""
    pyro.set_rng_seed(seed)
    train = posterior_rates(model, guide, data.train.to(device), n_samples=n_samples).numpy()
    if data.n_eval == 0:
        evaluation = np.zeros((0, *train.shape[1:]), dtype=train.dtype)
    else:
        evaluation = posterior_rates(model, guide, data.eval.to(device), n_samples=n_samples).numpy()
    return Rates(train, evaluation, data.n_heldin, data.n_observed_bins)


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
    trials : Trials, optional
        The trials whose rates the member exports, and whose sizes it is built for, when they are not
        the run's (a recording's cross-validation fold, whose held-out neurons are its own).
    """

    index: int
    fit_trials: Batch
    valid: Batch
    heldin_only: List[Batch]
    seed: int
    checkpoint_dir: Path
    trials: Optional[Trials] = None

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


def build_member(spec: MemberSpec, cfg: MemberRunSpec, data: Trials) -> Tuple[MemberRunSpec, Any, Any]:
    """The member's own run spec (``cfg`` with the member's seed, stored with its checkpoints) and its
    freshly built model and guide, initialised from that seed."""
    cfg = dataclasses.replace(cfg, fit=cfg.member_fit(spec.seed))
    model, guide = build(cfg, data.n_neurons, data.n_heldin)
    return cfg, model, guide


def train_member(
    spec: MemberSpec,
    cfg: MemberRunSpec,
    data: Trials,
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
    data = spec.trials if spec.trials is not None else data
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


def _train_in_worker(spec: MemberSpec, cfg: MemberRunSpec, data: Trials, device: str, kwargs: Dict[str, Any]) -> MemberResult:
    torch.set_num_threads(1)
    return train_member(spec, cfg, data, device, progress=False, log=lambda s: None, **kwargs)


def train_members(
    specs: Sequence[MemberSpec],
    cfg: MemberRunSpec,
    data: Trials,
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
