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
* :func:`train_member`: :func:`~pyro_langevin.training.fit` selecting on the validation co-bps
  (:func:`cobps_metric`), then the model and guide rebuilt from ``best.pt`` alone
  (:func:`~pyro_langevin.spec.load_run`) and :func:`export_rates`: the mean of
  ``eval.export_draws`` posterior draws for every trial of the run's data (:class:`Trials`: a
  ``train`` batch and an ``eval`` batch, e.g. :class:`TrialSet` or the NLB wing's ``NLBData``);
* :func:`train_members`: every member on an :class:`~pyro_langevin.executor.Executor` (this
  process, local worker processes or Ray tasks); each finished member leaves a done-file
  (:data:`DONE_FILE`: its exported rates and where it ran) beside its checkpoints, so a resumed run
  reads it back instead of training it again (:func:`finished_member`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyro
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.checkpoints import CheckpointMismatchError, load_checkpoint, resume_conflicts, save_checkpoint
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.splits import TrialSizes, build_training_batch, kfold_indices, split_train_valid
from pyro_langevin.executor import Executor, Placement
from pyro_langevin.posterior import posterior_rates
from pyro_langevin.scoring import Rates, score_local
from pyro_langevin.sessions import SessionLayout
from pyro_langevin.stitching import balance_sessions, split_sessions
from pyro_langevin.spec import FitConfig, RunSpec, SpecError, build, load_run, register_spec_class, run_meta
from pyro_langevin.training import fit

__all__ = [
    "EvalConfig", "SELECTION", "MemberRunSpec", "Trials", "TrialSet", "cobps_metric", "export_rates", "MemberSpec",
    "MemberResult", "same_trials", "fold_members", "member_config", "member_meta", "build_member", "train_member",
    "train_members", "DONE_FILE", "write_done", "finished_member",
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
    #: A stitched run's :class:`~pyro_langevin.sessions.SessionLayout` as a dict (None: one session).
    sessions: Optional[Dict[str, Any]] = None


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
    recipe : MemberRunSpec, optional
        The member's own run spec when it is not the run's (a fold whose recipe its own search chose).
    """

    index: int
    fit_trials: Batch
    valid: Batch
    heldin_only: List[Batch]
    seed: int
    checkpoint_dir: Path
    trials: Optional[Trials] = None
    recipe: Optional["MemberRunSpec"] = None

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
    #: Where it trained (:class:`~pyro_langevin.executor.Placement` as a dict; ``reused``: read
    #: back from its done-file by a resumed run).
    executor: Dict[str, Any] = field(default_factory=dict)


def same_trials(batch: Batch, like: Batch) -> Batch:
    """The trials of ``batch`` that ``like`` holds (matched by ``index``), in ``like``'s order: the
    same trials at another bin width."""
    row = {int(i): k for k, i in enumerate(batch.index.tolist())}
    missing = [int(i) for i in like.index.tolist() if int(i) not in row]
    if missing:
        raise NLBDataError(f"trials {missing[:5]} are not in the batch")
    return batch[torch.as_tensor([row[int(i)] for i in like.index.tolist()], dtype=torch.long)]


def fold_members(train: Batch, heldin_only: Sequence[Batch], n_models: int, valid_frac: float, seed: int,
                 out: Path, sessions: Optional[Dict[str, Any]] = None) -> List[MemberSpec]:
    """Member specs of a run over the training trials ``train``: one member on a random ``valid_frac``
    split, or a K-fold ensemble (member ``i`` validates on fold ``i`` of ``train``, fits the rest).

    ``heldin_only`` trials (the evaluation trials, a cross-validation fold's scored trials) enter
    every member's training through their held-in observed spikes only. With ``n_models == 1`` the
    checkpoints go to ``out/checkpoints`` (the single-model layout); with more, member ``i`` writes
    ``out/member{i}/checkpoints``. With ``sessions`` (a stitched run's layout as a dict) one model's
    validation trials are carved from each session's own trials
    (:func:`~pyro_langevin.stitching.split_sessions`).
    """
    if n_models == 1:
        fit_trials, valid = (split_train_valid(train, valid_frac, seed) if sessions is None else
                             split_sessions(train, SessionLayout.from_dict(sessions), valid_frac, seed))
        return [MemberSpec(0, fit_trials, valid, list(heldin_only), seed, out / "checkpoints")]
    specs = []
    for i, part in enumerate(kfold_indices(train.n_trials, n_models, seed)):
        rest = np.setdiff1d(np.arange(train.n_trials), part)
        specs.append(MemberSpec(i, train[torch.as_tensor(rest)], train[torch.as_tensor(part)],
                                list(heldin_only), seed + i, out / f"member{i}" / "checkpoints"))
    return specs


def member_config(spec: MemberSpec, cfg: MemberRunSpec) -> MemberRunSpec:
    """The member's own run spec: ``cfg`` (or the member's own ``recipe``) with the member's seed (stored
    with its checkpoints)."""
    cfg = spec.recipe if spec.recipe is not None else cfg
    return dataclasses.replace(cfg, fit=cfg.member_fit(spec.seed))


def member_meta(spec: MemberSpec, cfg: MemberRunSpec, data: Trials, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What the member's checkpoints record (:func:`~pyro_langevin.spec.run_meta` of its own run spec,
    the run's ``meta``, its number): what rebuilds it, and what a resumed run must match."""
    data = spec.trials if spec.trials is not None else data
    sessions = getattr(data, "sessions", None)
    extra = {} if sessions is None else {"sessions": sessions}
    return run_meta(member_config(spec, cfg), data.n_neurons, data.n_heldin, **(meta or {}), **extra, member=spec.index)


def build_member(spec: MemberSpec, cfg: MemberRunSpec, data: Trials) -> Tuple[MemberRunSpec, Any, Any]:
    """The member's own run spec (:func:`member_config`) and its freshly built model and guide,
    initialised from that seed."""
    cfg = member_config(spec, cfg)
    model, guide = build(cfg, data.n_neurons, data.n_heldin, getattr(data, "sessions", None))
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
    With ``resume`` the fit continues from the member's ``last.pt``, which must have been written by
    the same recipe (its meta, :func:`member_meta`; a ``run_id`` may differ).

    Raises
    ------
    CheckpointMismatchError
        ``resume`` finds a ``last.pt`` of another recipe (one line naming the settings that differ).
    """
    dev = torch.device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    data = spec.trials if spec.trials is not None else data
    train = spec.training_batch()
    if getattr(data, "sessions", None) is not None:  # stitched: every session weighted equally per epoch
        train = balance_sessions(train, SessionLayout.from_dict(data.sessions))
    wanted = member_meta(spec, cfg, data, meta)
    cfg, model, guide = build_member(spec, cfg, data)
    last = spec.checkpoint_dir / "last.pt"
    resume_from = last if resume and last.is_file() else None
    if resume and resume_from is None:
        log(f"no checkpoint at {last}: starting afresh")
    if resume_from is not None:
        saved = load_checkpoint(last).get("meta") or {}
        diffs = resume_conflicts(saved, {k: v for k, v in wanted.items() if k != "run_id"})
        if diffs:
            raise CheckpointMismatchError(f"{last} was written by a different run ({'; '.join(diffs[:4])}); use the "
                                          "same options, or start afresh without --resume")
    t_fit = time.perf_counter()
    result = fit(model, guide, train, spec.valid, cfg.fit, device=dev,
                 metric_fn=metric_fn or cobps_metric(cfg.eval.select_draws, export_seed),
                 checkpoint_dir=spec.checkpoint_dir, resume=resume_from, progress=progress, meta=wanted)
    seconds = time.perf_counter() - t_fit
    model, guide, _, best = load_run(spec.checkpoint_dir, "best", map_location=dev)
    log(f"exporting rates from {spec.checkpoint_dir / 'best.pt'}: mean of {cfg.eval.export_draws} posterior "
        f"draws for {data.n_train} training and {data.n_eval} evaluation trials ...")
    rates = export_rates(model, guide, data, cfg.eval.export_draws, export_seed, dev)
    curve = [[int(h["epoch"]), round(float(h["co_bps"]), 4)] for h in result.history if "co_bps" in h]
    return MemberResult(spec.index, rates, int(best["best_epoch"]), float(best["best_metric"]),
                        len(result.history), result.stopped_early, round(seconds, 1), curve)


# ----- finished members: the done-file -----
#: A finished member's record in its checkpoint folder, written atomically after its export: its
#: exported rates, scores, where it ran, and the recipe (meta) and export seed it finished.
DONE_FILE = "done.pt"
_DONE_FORMAT = 1


def write_done(spec: MemberSpec, result: MemberResult, meta: Dict[str, Any], export_seed: int,
               run_id: Optional[str] = None) -> Path:
    """Mark ``spec``'s member finished: ``{checkpoint_dir}/done.pt`` with ``result`` (plain data)."""
    record = {k: v for k, v in dataclasses.asdict(result).items() if k != "rates"}
    rates = {"train": result.rates.train, "eval": result.rates.eval, "n_heldin": result.rates.n_heldin,
             "n_observed_bins": result.rates.n_observed_bins}
    return save_checkpoint(spec.checkpoint_dir / DONE_FILE, {
        "format": _DONE_FORMAT, "meta": meta, "export_seed": int(export_seed), "run_id": run_id,
        "result": record, "rates": rates})


def finished_member(spec: MemberSpec, meta: Dict[str, Any], export_seed: int,
                    run_id: Optional[str] = None) -> Optional[MemberResult]:
    """The member's result from its done-file when it finished exactly this recipe, else None.

    Finished means: ``done.pt`` and ``best.pt`` are in its checkpoint folder, the done-file is readable
    and records the same ``meta`` (:func:`member_meta`, every setting including the epochs) and
    ``export_seed``; with ``run_id``, also written by that run. Anything else (a truncated file, an
    older format, another recipe) is not finished: the member trains (resuming its ``last.pt``).
    """
    path = spec.checkpoint_dir / DONE_FILE
    if not path.is_file() or not (spec.checkpoint_dir / "best.pt").is_file():
        return None
    try:
        saved = load_checkpoint(path)
        if (saved.get("format") != _DONE_FORMAT or saved.get("meta") != meta or saved.get("export_seed") != export_seed
                or (run_id is not None and saved.get("run_id") != run_id)):
            return None
        return MemberResult(**dict(saved["result"], rates=Rates(**saved["rates"])))
    except (ValueError, KeyError, TypeError, NLBDataError):
        return None


# ----- every member of a run, on an executor -----
@dataclass(frozen=True)
class _TaskOptions:
    """What every member task of one :func:`train_members` call shares (plain data: it is pickled)."""

    backend: str
    device: str
    threads: Optional[int]
    export_seed: int
    resume: bool
    meta: Dict[str, Any]
    run_id: str
    metric_fn: Optional[Callable] = None
    progress: bool = False
    log: Optional[Callable[[str], None]] = None  # this process only (serial)


def _member_task(spec: MemberSpec, cfg: MemberRunSpec, data: Trials, opts: _TaskOptions) -> MemberResult:
    """One member where the executor runs it: skip it if this run already finished it (a Ray retry),
    resume its ``last.pt`` if this run wrote it, else train afresh; write its done-file."""
    t0 = time.perf_counter()
    meta = member_meta(spec, cfg, data, opts.meta)
    again = finished_member(spec, meta, opts.export_seed, run_id=opts.run_id)
    if again is not None:
        return again
    last = spec.checkpoint_dir / "last.pt"
    resume = opts.resume or _written_by(last, opts.run_id)
    if not resume:
        (spec.checkpoint_dir / DONE_FILE).unlink(missing_ok=True)  # an earlier run's: stale from now on
    result = train_member(spec, cfg, data, opts.device, export_seed=opts.export_seed, resume=resume,
                          progress=opts.progress and opts.backend == "serial", metric_fn=opts.metric_fn,
                          threads=1 if opts.backend == "processes" else opts.threads,
                          meta=dict(opts.meta, run_id=opts.run_id), log=opts.log or (lambda s: None))
    result.executor = Placement.here(opts.backend, time.perf_counter() - t0).to_dict()
    write_done(spec, result, meta, opts.export_seed, opts.run_id)
    return result


def _written_by(last: Path, run_id: str) -> bool:
    """Whether ``last`` is a readable checkpoint written by the run ``run_id`` (a retried task's own)."""
    if not last.is_file():
        return False
    try:
        return (load_checkpoint(last).get("meta") or {}).get("run_id") == run_id
    except ValueError:
        return False


def train_members(
    specs: Sequence[MemberSpec],
    cfg: MemberRunSpec,
    data: Trials,
    device: Union[str, torch.device] = "cpu",
    *,
    executor: Optional[Executor] = None,
    export_seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    metric_fn: Optional[Callable] = None,
    threads: Optional[int] = None,
    meta: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> List[MemberResult]:
    """Train every member on ``executor`` (default: one after the other in this process).

    Each member is trained by :func:`train_member` where the executor puts it (this process, a local
    worker process, or a Ray task on ``executor.device``) and marked finished by its done-file
    (:data:`DONE_FILE`, with its exported rates). With ``resume``, finished members are not trained
    again (their results are read back, ``executor["reused"]`` True) and the others continue from
    their ``last.pt``. A Ray task that is retried after its worker or node died continues from the
    ``last.pt`` its first attempt wrote. The other options go to :func:`train_member` (``progress``
    only in this process; a custom ``metric_fn`` cannot be sent to local worker processes). Results
    come back in member order, each with ``executor``: where it ran (backend, Ray node id, host,
    process, seconds).
    """
    executor = executor or Executor()
    dev = torch.device(executor.device or device)
    done: Dict[int, MemberResult] = {}
    todo: List[MemberSpec] = []
    for spec in specs:
        earlier = finished_member(spec, member_meta(spec, cfg, data, meta), export_seed) if resume else None
        if earlier is not None:
            earlier.executor = dict(earlier.executor, reused=True)
            done[spec.index] = earlier
            log(f"{_who(earlier, len(specs))}: finished earlier ({spec.checkpoint_dir / DONE_FILE}); not trained again")
        else:
            todo.append(spec)
    backend = executor.backend(len(todo), dev.type)
    if backend == "processes" and metric_fn is not None:
        raise ValueError("a custom metric_fn cannot be sent to worker processes; use workers=1")
    opts = _TaskOptions(backend, str(dev), executor.threads if backend == "ray" else threads, export_seed, resume,
                        dict(meta or {}), uuid.uuid4().hex, metric_fn, progress, log if backend == "serial" else None)
    if todo:
        log(executor.describe(len(todo), dev.type) + " ...")

    def finished(i: int, res: MemberResult, placement: Any) -> None:
        done[res.index] = res
        _log_member(res, len(specs), log)

    executor.map(_member_task, todo, cfg, data, opts, device_type=dev.type, on_result=finished)
    return [done[s.index] for s in specs]


def _who(res: MemberResult, n: int) -> str:
    return "fit" if n == 1 else f"member {res.index + 1}/{n}"


def _log_member(res: MemberResult, n: int, log: Callable[[str], None]) -> None:
    where = res.executor or {}
    on = f" on Ray node {where['node_id'][:8]} ({where.get('host')})" if where.get("node_id") else ""
    log(f"{_who(res, n)}: {res.epochs_run} epochs in {res.fit_seconds:.0f} s{on}; best validation co-bps "
        f"{res.best_metric:.4f} at epoch {res.best_epoch}")
