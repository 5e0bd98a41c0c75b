"""Hyperparameter search over the NLB configuration on Ray Tune (population-based training by default).

    pyro-langevin tune --dataset mc_maze_small --data-dir DIR --bin-ms 5 --out runs/tune

:func:`tune` searches one dataset's :class:`~pyro_langevin.nlb.config.NLBConfig` on a local Ray
instance (started and stopped here) or on an existing cluster (``address="auto"`` or
``"HOST:PORT"``). Each trial trains exactly the member recipe of ``nlb``
(:func:`~pyro_langevin.nlb.members.member_recipe`: the same data preparation, the same fitting
bins, so a 5 ms search fits at 20 ms and its rates are interpolated back, the same member spec),
with one member: the same validation split of the TRAINING trials for every trial (drawn from the
request's seed), the evaluation trials entering training through their held-in observed spikes
only, each trial's model initialised and fitted from its own seed (:func:`trial_seed`), trained by
one :func:`~pyro_langevin.training.fit`. After every validation (``fit.val_every`` epochs), fit's
``callback`` reports the validation co-bps (:func:`~pyro_langevin.nlb.pipeline.cobps_metric`, the
metric ``nlb`` selects on) and the checkpoint folder fit has just written (``last.pt``, ``best.pt``)
to Ray (``tune.report`` with a ``Checkpoint``). A PBT exploit, a ``--resume`` or a restarted trial
gets a checkpoint back (``tune.get_checkpoint``): :func:`restore_state` prepares its ``last.pt`` for
the trial's hyperparameters (the learning rate; and, when the checkpoint is another trial's, a
fresh early-stopping and plateau count, so a donor about to stop does not stop its recipient) and
``fit(..., resume=last.pt)`` restores parameters, optimizer and scheduler state, epoch, history and
every RNG exactly.

Schedulers: ``pbt`` (PopulationBasedTraining: mutates the continuous hyperparameters, sizes stay
fixed), ``asha`` (ASHAScheduler: stops poor trials at rungs) and ``random`` (every trial runs to
the end). The search space (:data:`DEFAULT_SPACE`; keys :data:`SEARCH_KEYS`) is mapped onto the
configuration by :func:`trial_config` alone.

Outputs in ``out``: ``trials.csv`` (one row per trial: its hyperparameters, best validation co-bps,
epochs, seconds, node), ``best_config.json``, ``population.png`` (validation co-bps of every trial
over the search's wall-clock time), ``submission.h5`` (posterior-mean rates of the best trial's
best state, or the mean of the top ``top_k`` trials', through the ``nlb`` export) and Ray's
experiment folder ``out/search`` (or ``storage/search``). The evaluation trials' targets are never
read: nothing here scores them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from pyro_langevin.executor import check_ray_resources, connect_ray, import_ray
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.options import OptionError

__all__ = [
    "CONFIG_KEYS", "SEARCH_KEYS", "SIZE_KEYS", "DEFAULT_SPACE", "QUICK_SPACE", "SCHEDULERS", "parse_space", "trial_config",
    "trial_seed", "restore_state", "train_trial", "tune", "format_params", "METRIC", "BEST",
]

PathLike = Union[str, Path]

#: Searchable keys and the configuration keys (:class:`~pyro_langevin.nlb.config.NLBConfig`'s dotted
#: keys) each one sets: ``kl_final`` is the KL weight after its ramp, ``dropout`` the decoder's and the
#: guide's (one value for both), ``cd_keep`` the coordinated-dropout keep rate, ``latent_dim`` the
#: latent size (a multiple of 4), ``hidden`` the GRU guide's size, ``shift_std`` the temporal shift's
#: s.d. in bins (not in :data:`DEFAULT_SPACE`: searched only when ``--space`` names it).
#: :func:`trial_config` applies them.
CONFIG_KEYS: Dict[str, Tuple[str, ...]] = {
    "lr": ("fit.lr",), "kl_final": ("fit.kl_final",), "dropout": ("model.dropout", "guide.dropout"),
    "cd_keep": ("fit.cd_keep",), "weight_decay": ("fit.weight_decay",), "latent_dim": ("model.latent_dim",),
    "hidden": ("guide.hidden",), "shift_std": ("fit.shift_std",),
}
SEARCH_KEYS = tuple(CONFIG_KEYS)
#: Sizes change the parameter shapes: searched by ``random`` and ``asha``, fixed under ``pbt``.
SIZE_KEYS = ("latent_dim", "hidden")
SCHEDULERS = ("pbt", "asha", "random")

#: The default search space: ``{key: [kind, *args]}`` with kind ``loguniform``/``uniform`` (low,
#: high) or ``choice`` (values); a plain number fixes the key. Centred on the MC_Maze_Small
#: defaults (lr 3e-3, KL 0.1, dropout 0.2, CD keep 0.5, weight decay 2e-5, latent 32, GRU 128).
DEFAULT_SPACE: Dict[str, Any] = {
    "lr": ["loguniform", 1e-3, 1e-2],
    "kl_final": ["loguniform", 0.02, 0.5],
    "dropout": ["uniform", 0.1, 0.5],
    "cd_keep": ["uniform", 0.3, 0.8],
    "weight_decay": ["loguniform", 1e-6, 1e-3],
    "latent_dim": ["choice", 16, 32, 48],
    "hidden": ["choice", 64, 128, 192],
}
#: ``--quick``: the quick configuration's tiny sizes.
QUICK_SPACE: Dict[str, Any] = dict(DEFAULT_SPACE, latent_dim=["choice", 4, 8], hidden=["choice", 8, 16])
_KINDS = ("loguniform", "uniform", "choice")
#: Ray's metric names: the last validation's co-bps (scheduling) and the best so far (ranking).
METRIC, BEST = "val_co_bps", "best_val_co_bps"


# ----- the search space -----
def _number(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"search space: {key}: {text!r} is not a number") from None


def _check_entry(key: str, entry: Any) -> List[Any]:
    """One space entry as ``[kind, *args]`` (``["const", value]`` for a fixed value), checked."""
    if key not in SEARCH_KEYS:
        raise OptionError(f"search space: unknown key {key!r}; the keys are {', '.join(SEARCH_KEYS)}")
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return ["const", entry]
    if not (isinstance(entry, (list, tuple)) and entry and entry[0] in _KINDS):
        raise OptionError(f"search space: {key}: expected a number or [kind, ...] with kind in {_KINDS}, got {entry!r}")
    kind, args = entry[0], [_number(str(a), key) for a in entry[1:]]
    if kind == "choice" and not args:
        raise OptionError(f"search space: {key}: choice needs at least one value")
    if kind != "choice" and not (len(args) == 2 and (args[0] > 0 or kind == "uniform") and args[0] < args[1]):
        raise OptionError(f"search space: {key}: {kind} needs LOW < HIGH (and LOW > 0 for loguniform), got {args}")
    if key in SIZE_KEYS:
        args = [int(a) for a in args]
        if kind != "choice":
            raise OptionError(f"search space: {key} is a size: give 'choice' values or one number")
    return [kind, *args]


def parse_space(file: Optional[PathLike] = None, items: Sequence[str] = (), quick: bool = False,
                scheduler: str = "pbt") -> Dict[str, List[Any]]:
    """The search space: :data:`DEFAULT_SPACE` (``QUICK_SPACE`` with ``quick``; without the sizes
    under ``pbt``, which copies weights between trials: they keep the base configuration's), then the JSON
    ``file`` (``{"lr": ["loguniform", 1e-4, 1e-2], "dropout": 0.3}``), then ``items``
    (``lr=loguniform:1e-4:1e-2``, ``latent_dim=choice:16,32``, ``dropout=0.3``); every key checked."""
    given: Dict[str, Any] = {}
    if file is not None:
        try:
            loaded = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            raise OptionError(f"search space file {file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise OptionError(f"search space file {file}: expected a JSON object {{key: spec}}")
        given.update(loaded)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"--space {item!r}: expected KEY=VALUE or KEY=KIND:ARGS")
        kind, colon, args = value.partition(":")
        given[key.strip()] = [kind, *args.replace(",", ":").split(":")] if colon else _number(value, key)
    defaults = {k: v for k, v in (QUICK_SPACE if quick else DEFAULT_SPACE).items()
                if not (scheduler == "pbt" and k in SIZE_KEYS)}
    space = {key: _check_entry(key, entry) for key, entry in dict(defaults, **given).items()}
    ranged = [k for k in SIZE_KEYS if k in space and scheduler == "pbt" and space[k][0] != "const"]
    if ranged:
        raise OptionError(f"search space: PBT keeps the sizes fixed (it copies weights between trials); give "
                          f"{', '.join(ranged)} one value, or use --scheduler asha/random to search them")
    return space


def _domain(entry: List[Any]) -> Any:
    from ray import tune

    kind, args = entry[0], entry[1:]
    if kind == "const":
        return args[0]
    if kind == "choice":
        return tune.choice(args)
    return (tune.loguniform if kind == "loguniform" else tune.uniform)(*args)


def _clip_to(space: Mapping[str, List[Any]]) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """PBT's explore step scales values by 0.8 or 1.2: keep them inside the space's bounds."""
    bounds = {k: (e[1], e[2]) for k, e in space.items() if e[0] in ("uniform", "loguniform")}

    def clip(config: Dict[str, Any]) -> Dict[str, Any]:
        return {k: min(max(v, bounds[k][0]), bounds[k][1]) if k in bounds else v for k, v in config.items()}

    return clip


def trial_config(base, params: Mapping[str, Any]):
    """The :class:`~pyro_langevin.nlb.config.NLBConfig` of a trial: ``base`` with the searched
    ``params`` set through :data:`CONFIG_KEYS`, one model (no ensemble). The only map from search
    keys to the configuration."""
    from pyro_langevin.spec import SpecError

    changes: Dict[str, Any] = {"eval.n_models": 1}
    for key, value in params.items():
        if key not in CONFIG_KEYS:
            raise OptionError(f"search space: unknown key {key!r}")
        changes.update({k: int(value) if key in SIZE_KEYS else float(value) for k in CONFIG_KEYS[key]})
    try:
        return base.override(changes)
    except SpecError as exc:
        raise OptionError(f"search space: {exc}") from None


# ----- one trial -----
def trial_seed(trial_id: str, seed: int = 0) -> int:
    """A trial's own seed: ``seed`` plus its number in the search (Ray's ids end in ``_00003``), so every
    trial starts from its own initial parameters and the same search gives the same seeds."""
    tail = str(trial_id).rsplit("_", 1)[-1]
    return seed + (int(tail) if tail.isdigit() else zlib.crc32(str(trial_id).encode()) % 100_000)


def restore_state(source: PathLike, cfg, work: PathLike, trial_id: Optional[str] = None) -> Path:
    """Prepare a trial's checkpoint folder from a Ray checkpoint ``source`` (a PBT donor's or its own).

    Copies ``best.pt`` and writes ``last.pt`` into ``{work}/checkpoints`` (through
    :mod:`pyro_langevin.checkpoints`). Everything stays as saved (parameters, optimizer and scheduler
    state, epoch, history, RNG states) except:

    * the learning rate when ``cfg.fit.lr`` differs from the one the state was trained with (a PBT
      mutation): each optimizer group's rate is scaled by the ratio, so reductions by the LR plateau
      schedule are kept. The other searched settings (KL weight, dropout, CD keep rate, weight decay)
      are read from the config at every epoch;
    * when the checkpoint was written by another trial than ``trial_id`` (a PBT exploit), its
      early-stopping and plateau counts start afresh: the recipient continues the donor's state
      with new hyperparameters, and a donor about to stop must not make it train zero epochs.

    Returns the ``last.pt`` to resume from.
    """
    from pyro_langevin.checkpoints import load_checkpoint, save_checkpoint

    source, dest = Path(source), Path(work) / "checkpoints"
    dest.mkdir(parents=True, exist_ok=True)
    if (source / "best.pt").is_file():
        shutil.copyfile(source / "best.pt", dest / "best.pt")
    ckpt = load_checkpoint(source / "last.pt")
    donor = (ckpt.get("meta") or {}).get("trial_id")
    if trial_id is not None and donor != trial_id:
        ckpt["bad_validations"] = 0
        ckpt["scheduler"].update(num_bad_epochs=0, cooldown_counter=0)
        ckpt.setdefault("meta", {})["trial_id"] = trial_id
    ratio = float(cfg.fit.lr) / float(ckpt["config"]["lr"])
    if ratio != 1.0:
        for group in ckpt["optimizer"]["param_groups"]:
            group["lr"] *= ratio
        ckpt["scheduler"]["_last_lr"] = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
        ckpt["config"]["lr"] = float(cfg.fit.lr)
    return save_checkpoint(dest / "last.pt", ckpt)


def train_trial(cfg, params: Mapping[str, Any], data, work: PathLike, report: Callable[[Dict[str, Any]], None], *,
                split_seed: int = 0, seed: Optional[int] = None, trial_id: Optional[str] = None,
                resume: Optional[PathLike] = None, device: str = "cpu") -> None:
    """Train one trial's model; ``report(metrics)`` after every validation (every ``cfg.fit.val_every`` epochs).

    The validation split (``cfg.eval.valid_frac`` of the training trials, drawn from ``split_seed``:
    the same for every trial), the training batch and the member spec are the ``nlb`` pipeline's
    single-model ones (:func:`~pyro_langevin.nlb.members.fold_members`,
    :func:`~pyro_langevin.nlb.members.build_member`) on ``data``, the data at the fitting bins; the
    model is initialised and fitted from ``seed`` (default ``split_seed``). ``fit`` writes ``last.pt``
    (every epoch) and ``best.pt`` to ``{work}/checkpoints`` before each report (their meta names
    ``trial_id``), and continues from ``resume`` (a ``last.pt``) when given. ``metrics``:
    ``val_co_bps`` (this validation), ``best_val_co_bps`` (best so far, the state in ``best.pt``),
    ``epoch`` (epochs done), ``best_epoch`` (0-based).
    """
    from pyro_langevin.checkpoints import load_checkpoint
    from pyro_langevin.nlb.members import build_member, cobps_metric, fold_members
    from pyro_langevin.spec import run_meta
    from pyro_langevin.training import fit

    spec = fold_members(data.train, [data.eval], 1, cfg.eval.valid_frac, split_seed, Path(work))[0]
    spec = dataclasses.replace(spec, seed=split_seed if seed is None else int(seed))
    cfg, model, guide = build_member(spec, cfg, data)
    best = {"metric": -math.inf, "epoch": -1}
    if resume is not None:
        saved = load_checkpoint(resume)
        if saved["best_epoch"] >= 0:
            best.update(metric=float(saved["best_metric"]), epoch=int(saved["best_epoch"]))

    def on_epoch(epoch: int, record: Dict[str, float]) -> None:
        if "co_bps" not in record:
            return
        if record["co_bps"] > best["metric"]:
            best.update(metric=float(record["co_bps"]), epoch=epoch)
        report({METRIC: float(record["co_bps"]), BEST: best["metric"], "epoch": epoch + 1, "best_epoch": best["epoch"]})

    with warnings.catch_warnings():  # a PBT mutation changes the config on purpose
        warnings.filterwarnings("ignore", message="resuming with a different config")
        fit(model, guide, spec.training_batch(), spec.valid, cfg.fit, device=device,
            metric_fn=cobps_metric(cfg.eval.select_draws, split_seed), checkpoint_dir=spec.checkpoint_dir,
            resume=resume, progress=False,
            meta=run_meta(cfg, data.n_neurons, data.n_heldin, params=dict(params), seed=spec.seed,
                          split_seed=split_seed, trial_id=trial_id),
            callback=on_epoch, handle_signals=False)


@dataclass
class _Context:
    """What every trial needs besides its hyperparameters (sent once through Ray's object store):
    the data at the fitting bins, the base configuration, the search's seed, device and threads."""

    data: Any
    base: Any
    seed: int
    device: str
    threads: int


def _trainable(params: Dict[str, Any], ctx: _Context) -> None:
    """Ray Tune function trainable: restore from ``tune.get_checkpoint()`` if any, then train."""
    import ray
    import torch
    from ray import tune

    torch.set_num_threads(ctx.threads)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    work = Path(context.get_trial_dir()) / "work"
    cfg = trial_config(ctx.base, params)
    resume, restored_from = None, None
    given = tune.get_checkpoint()
    if given is not None:
        with given.as_directory() as folder:
            restored_from = _checkpoint_trial(Path(folder))
            resume = restore_state(folder, cfg, work, trial_id=trial_id)
    node = ray.get_runtime_context().get_node_id()

    def report(metrics: Dict[str, Any]) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(work / "checkpoints"))
        tune.report(dict(metrics, node_id=node, restored_from=restored_from or ""), checkpoint=checkpoint)

    seed = trial_seed(trial_id, ctx.seed)
    train_trial(cfg, params, ctx.data, work, report, split_seed=ctx.seed, seed=seed, trial_id=trial_id, resume=resume,
                device=ctx.device)


def _checkpoint_trial(folder: Path) -> Optional[str]:
    """The trial that wrote a Ray checkpoint's ``last.pt`` (its own after a restart, a donor's after a PBT exploit)."""
    from pyro_langevin.checkpoints import load_checkpoint

    try:
        return (load_checkpoint(folder / "last.pt").get("meta") or {}).get("trial_id")
    except (OSError, ValueError):
        return None


# ----- Ray: scheduler, progress (the connection and resource checks: pyro_langevin/executor.py) -----
def _scheduler(name: str, space: Mapping[str, List[Any]], iterations: int, quick: bool):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if name == "pbt":
        mutations = {k: _domain(e) for k, e in space.items() if k not in SIZE_KEYS and e[0] != "const"}
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2 if quick else 3,
                                       hyperparam_mutations=mutations, quantile_fraction=0.25,
                                       resample_probability=0.25, custom_explore_fn=_clip_to(space),
                                       # synch: with more trials than slots, paused trials free their slot
                                       synch=True)
    if name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=iterations,
                             grace_period=max(1, iterations // 8), reduction_factor=3)
    return FIFOScheduler()


def _fit(tuner) -> tuple:
    """``tuner.fit()``; and whether Ctrl-C ended it. Ray's SIGINT handler ends the search, saves its
    state and puts the previous handler back; a handler still Ray's afterwards never fired, and is
    removed here so that a later Ctrl-C behaves as usual."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reuse_actors")  # our trainable is a function
        grid = tuner.fit()
    if not main:
        return grid, False
    interrupted = signal.getsignal(signal.SIGINT) is before and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    signal.signal(signal.SIGINT, before)
    return grid, interrupted


def _progress_callback(log: Callable[[str], None], history: Path, every_s: float = 30.0):
    """One line per finished trial, and a status line at most every ``every_s`` seconds; every
    result appended to the CSV ``history`` (time, trial, epoch, co-bps, and the trial whose checkpoint
    it last started from: itself after a restart, a donor after a PBT exploit; the population plot's
    data, kept across ``--resume``)."""
    from ray import tune

    class Lines(tune.Callback):
        def __init__(self) -> None:
            self.last, self.best = 0.0, -math.inf

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.best = max(self.best, result.get(BEST, -math.inf))
            new = not history.is_file()
            with history.open("a") as f:
                f.write("time,trial_id,epoch,val_co_bps,best_val_co_bps,restored_from\n" if new else "")
                f.write(f"{time.time():.3f},{trial.trial_id},{result.get('epoch')},{result.get(METRIC)},{result.get(BEST)},"
                        f"{result.get('restored_from', '')}\n")
            now = time.time()
            if now - self.last >= every_s:
                self.last = now
                running = sum(t.status == "RUNNING" for t in trials)
                log(f"search: {len(trials)} trials ({running} running); best validation co-bps so far {self.best:.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            log(f"trial {trial.trial_id} done: best validation co-bps {r.get(BEST, math.nan):.4f} after "
                f"{r.get('epoch', 0)} epochs, {r.get('time_total_s', 0.0):.0f} s; {format_params(trial.config)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"trial {trial.trial_id} failed; its error is in {trial.local_path or trial.path}")

    return Lines()


def format_params(params: Mapping[str, Any]) -> str:
    """``lr=0.003 dropout=0.2``: a trial's hyperparameters on one line."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ----- after the search -----
def _summarize(grid, out: Path, space_keys: Sequence[str], seed: int) -> List[Dict[str, Any]]:
    """One row per trial, best first; writes ``trials.csv``."""
    import pandas as pd

    rows = []
    for res in grid:
        m = res.metrics or {}
        if not m:
            continue
        # the trial's own id (a PBT exploit copies the donor's last result, trial_id included)
        trial_id = Path(res.path).name.split("_")[2] + "_" + Path(res.path).name.split("_")[3]
        rows.append({"trial_id": trial_id, **{k: res.config.get(k) for k in space_keys},
                     BEST: m.get(BEST, math.nan), "epochs": m.get("epoch"), "best_epoch": m.get("best_epoch"),
                     "seed": trial_seed(trial_id, seed),
                     "seconds": round(float(m.get("time_total_s", math.nan)), 1), "node_id": m.get("node_id"),
                     "finished": bool(m.get("done", False)), "error": None if res.error is None else type(res.error).__name__,
                     "_result": res})
    rows.sort(key=lambda r: -r[BEST] if math.isfinite(r[BEST]) else math.inf)
    pd.DataFrame([{k: v for k, v in r.items() if k != "_result"} for r in rows]).to_csv(out / "trials.csv", index=False)
    return rows


def _plot(history: Path, path: Path) -> Path:
    """Each trial's validation co-bps against the search's wall-clock time (minutes), from the
    results recorded in ``history`` (a PBT exploit shows as a jump to the donor's level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(history) if history.is_file() else pd.DataFrame(columns=["time", "trial_id", METRIC])
    fig, ax = plt.subplots(figsize=(7, 4))
    t0 = frame["time"].min() if len(frame) else 0.0
    for trial_id, f in frame.groupby("trial_id"):
        ax.plot((f["time"] - t0) / 60.0, f[METRIC], ".-", lw=1, ms=3, label=str(trial_id))
    ax.set_xlabel("search time (min)")
    ax.set_ylabel("validation co-bps")
    ax.set_title(f"population: {frame['trial_id'].nunique()} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _export(rows: Sequence[Mapping[str, Any]], data, seed: int, device: str) -> tuple:
    """Posterior-mean rates of each row's best state (``best.pt`` of its trial's last checkpoint,
    rebuilt by :func:`~pyro_langevin.spec.load_run`), averaged over the rows; and the first row's
    checkpoint ``meta`` (its hyperparameters when that state was reached, its configuration)."""
    from pyro_langevin.nlb.members import export_rates
    from pyro_langevin.nlb.scoring import Rates
    from pyro_langevin.spec import load_run

    rates, first = [], None
    for row in rows:
        with row["_result"].checkpoint.as_directory() as folder:
            model, guide, cfg, ckpt = load_run(Path(folder) / "best.pt", map_location=device)
        rates.append(export_rates(model, guide, data, cfg.eval.export_draws, seed, device))
        first = first or ckpt["meta"]
    return Rates.mean(rates), first


def tune(
    request: NLBRequest,
    *,
    scheduler: str = "pbt",
    num_samples: Optional[int] = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    time_budget: Optional[float] = None,
    address: Optional[str] = None,
    storage: Optional[PathLike] = None,
    space: Optional[Mapping[str, List[Any]]] = None,
    top_k: int = 1,
    num_cpus: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Search the NLB configuration of ``request``'s dataset on Ray Tune; write the outputs to ``request.out``.

    Parameters
    ----------
    request : NLBRequest
        The data, the base configuration the space changes (the dataset's default, as ``nlb`` uses it,
        or ``request.config``, then ``overrides`` and ``epochs``; one model per trial), the fitting bins
        (``nlb``'s: a 5 ms search fits at 20 ms), the output folder (``trials.csv``,
        ``best_config.json``, ``population.png``, ``submission.h5`` and, without ``storage``, Ray's
        experiment folder ``search``), the seed (the validation split shared by all trials, each
        trial's own seed, the exported draws) and ``resume`` (continue the interrupted search:
        Ray's ``Tuner.restore``). ``quick``: 2 trials of the quick configuration (4 epochs).
    scheduler : {"pbt", "asha", "random"}
    num_samples : int, optional
        Trials (the PBT population); default 8 (2 with ``request.quick``).
    cpus_per_trial, gpus_per_trial : float
        Ray resources of one trial (fractions allowed); a trial trains on ``cuda`` when it holds a GPU.
    time_budget : float, optional
        Seconds after which Ray stops the search (the outputs are written from what ran).
    address : str, optional
        None: a local Ray instance, started and stopped here (an instance already initialised in this
        process is used as it is). ``"auto"`` or ``"HOST:PORT"``: an existing cluster.
    storage : path-like, optional
        Where Ray keeps the experiment (default ``request.out``); a multi-node cluster needs storage
        every node reaches (NFS, S3: ``s3://bucket/path``).
    space : dict, optional
        From :func:`parse_space` (default :data:`DEFAULT_SPACE`).
    top_k : int
        ``submission.h5`` averages the rates of the ``top_k`` best trials (1: the best trial's).
    num_cpus : int, optional
        CPUs of a local Ray instance (default: all).

    Returns
    -------
    dict
        ``best_config.json``'s content plus the paths written.
    """
    if scheduler not in SCHEDULERS:
        raise OptionError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise OptionError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    ray = import_ray()
    from ray import tune as rt

    from pyro_langevin.nlb.members import member_recipe
    from pyro_langevin.nlb.scoring import write_submission

    quick, seed, resume = request.quick, request.seed, request.resume
    if quick and request.epochs is None and request.config is None:
        request = request.replace(epochs=4)
    space = space if space is not None else parse_space(quick=quick, scheduler=scheduler)
    base = trial_config(request.spec(), {})
    for key, entry in space.items():  # every value the search may try must make a valid configuration
        for value in entry[1:]:
            trial_config(base, {key: value})
    if scheduler == "pbt" and any(space.get(k, ["const"])[0] != "const" for k in SIZE_KEYS):
        raise OptionError("search space: PBT keeps the sizes fixed; give latent_dim and hidden one value")
    param_space = {key: _domain(entry) for key, entry in space.items()}
    num_samples = num_samples or (2 if quick else 8)
    out = Path(request.out).resolve()
    root = str(storage) if storage is not None else str(out)
    experiment = f"{root.rstrip('/')}/search"
    if resume and not rt.Tuner.can_restore(experiment):
        raise OptionError(f"--resume: no search to continue in {experiment}")
    if not resume and (Path(experiment).exists() or (out / "population.csv").exists()):
        raise OptionError(f"{out} holds an earlier search; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    # the members' recipe of nlb: the same data preparation and fitting bins (the device is Ray's)
    recipe = member_recipe(request.replace(device="cpu"))
    data, fit_data = recipe.data, recipe.fit_data
    started = connect_ray(address, num_cpus)
    try:
        check_ray_resources(cpus_per_trial, gpus_per_trial, per="trial")
        device = "cuda" if gpus_per_trial > 0 else "cpu"
        ctx = _Context(fit_data, base, seed, device, max(1, int(cpus_per_trial)))
        trainable = rt.with_resources(rt.with_parameters(_trainable, ctx=ctx),
                                      {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        iterations = math.ceil(base.fit.epochs / base.fit.val_every)
        t0 = time.perf_counter()
        if resume:
            log(f"resuming the search in {experiment} ...")
            tuner = rt.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            log(f"{data.dataset} {data.bin_ms} ms {data.phase}: {scheduler} search, {num_samples} trials of up to "
                f"{base.fit.epochs} epochs at {fit_data.bin_ms} ms bins ({cpus_per_trial:g} CPU, {gpus_per_trial:g} GPU "
                f"each) on Ray ({'local' if address is None else address}); experiment in {experiment}")
            tuner = rt.Tuner(
                trainable, param_space=param_space,
                tune_config=rt.TuneConfig(metric=METRIC, mode="max", scheduler=_scheduler(scheduler, space, iterations, quick),
                                          num_samples=num_samples, time_budget_s=time_budget,
                                          reuse_actors=True),
                run_config=rt.RunConfig(name="search", storage_path=root, verbose=0,
                                        callbacks=[_progress_callback(log, out / "population.csv")],
                                        # PBT (synchronous) copies a donor's latest checkpoint, taken at the
                                        # same pause; older ones only cost disk (last.pt + best.pt: 8 MB
                                        # each at MC_Maze_Small's default sizes)
                                        checkpoint_config=rt.CheckpointConfig(num_to_keep=4)),
            )
        grid, interrupted = _fit(tuner)
        seconds = time.perf_counter() - t0
        rows = _summarize(grid, out, list(space), seed)
        if interrupted and not rows:
            raise KeyboardInterrupt
        if not rows or not math.isfinite(rows[0][BEST]):
            raise OptionError(f"no trial reported a validation score; see the trial logs in {experiment}")
        top = rows[:max(1, top_k)]
        import torch  # the export runs here, in the driver: on its own GPU if it has one

        rates, saved = _export(top, fit_data, seed, "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        rates = recipe.to_scored_bins(rates)
    finally:
        if started:
            ray.shutdown()
    sub = write_submission(out / "submission.h5", data.dataset, data.bin_ms, rates)
    unfinished = [r["trial_id"] for r in rows if not r["finished"] and r["error"] is None]
    best = {
        "dataset": data.dataset, "bin_ms": data.bin_ms, "fit_bin_ms": fit_data.bin_ms, "phase": data.phase,
        "scheduler": scheduler, "trial_id": rows[0]["trial_id"],
        BEST: rows[0][BEST], "best_epoch": rows[0]["best_epoch"], "params": saved["params"], "config": saved["spec"],
        "top_k": [r["trial_id"] for r in top], "n_trials": len(rows), "search_seconds": round(seconds, 1),
        "unfinished": unfinished, "interrupted": interrupted, "submission": str(sub), "trials_csv": str(out / "trials.csv"),
        "plot": str(_plot(out / "population.csv", out / "population.png")), "experiment": experiment,
    }
    (out / "best_config.json").write_text(json.dumps(best, indent=2, default=float))
    return best
