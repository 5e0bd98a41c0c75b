"""Many recordings, one dynamics: stitch sessions into one LangevinFlow, and add a session to a saved run.

:func:`fit_recordings` (``pyro-langevin fit --arrays A.npz --arrays B.npz ...``; the Python form of
:func:`~pyro_langevin.recording.run.fit_recording` for a list of recordings) fits sessions with
different units into one model (:class:`~pyro_langevin.models.stitched.StitchedFlow`: shared latent
prior and decoder core, a read-in and a read-out per session). In ``out``, like a one-session run
(:func:`~pyro_langevin.recording.run.fit_recording`): ``spec.json``, ``cv/`` (co-smoothing
cross-validation: fold ``f`` scores fold ``f`` of EVERY session's trials, with units held out per
session; scores per session and pooled), ``checkpoints/`` (loadable with
:func:`~pyro_langevin.spec.load_run`), ``posterior.nc`` (every session's trials, their units side by
side, NaN where a trial's session lacks a unit), figures and ``metrics.json``; and per session
``sessions/<name>/posterior.nc`` (the one-session variables: rates of the session's units, latents in
the shared space) with its figures, and ``shared_latents.png``: every session's condition-averaged
latents on one plane.

:func:`~pyro_langevin.recording.new_session.add_session` adds a recording to a saved stitched run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import xarray as xr

from pyro_langevin.baseline import smoothing_baseline
from pyro_langevin.crossval import Fold, format_cv_table, summarize_folds, train_folds
from pyro_langevin.data.splits import kfold_indices
from pyro_langevin.devices import check_device
from pyro_langevin.executor import Executor
from pyro_langevin.members import TrialSet
from pyro_langevin.predictive import save_netcdf
from pyro_langevin.recording.config import RecordingConfig, default_config
from pyro_langevin.recording.data import Recording, RecordingError
from pyro_langevin.recording.figures import plot_cv, plot_shared_latents, save_figures
from pyro_langevin.recording.run import PROB, check_resumable
from pyro_langevin.recording.summary import shared_latent_plane, summarize_posterior, to_inference_data
from pyro_langevin.scoring import score_local
from pyro_langevin.sessions import SessionError, SessionLayout, check_session_name
from pyro_langevin.spec import SpecError, build_stitched, check_buildable, load_run, run_meta
from pyro_langevin.stitching import (balance_sessions, embed_session, pcr_layout, session_rows, session_view,
                                     split_sessions, stitch_batches)
from pyro_langevin.training import fit

__all__ = ["StitchOptions", "session_names", "check_sessions", "check_same_grid", "check_shared_conditions",
           "stitched_config", "cross_validate_sessions", "fit_sessions_final", "fit_record", "session_outputs",
           "write_metrics", "fit_recordings"]

PathLike = Union[str, Path]


@dataclasses.dataclass
class StitchOptions:
    """How sessions are stitched: the read-in's width, its initialisation and whether it trains.

    ``readin_init``: ``"pcr"`` (principal-components regression of the sessions' smoothed,
    condition-averaged training trials; needs shared condition labels), ``"random"``, or ``"auto"``
    (PCR when every session has conditions). ``train_readin``: the read-ins keep training after
    their initialisation (True), stay fixed (False), or None (default): fixed after PCR, trained after
    a random start (docs/stitching.md: on the synthetic sessions of ``examples/stitching.py`` a fixed
    PCR read-in scored above a trained one in each of 3 seeds, and a fixed random one lowest).
    ``readin_dim`` 0: the smallest session's unit count, at most 32. ``pcr_smooth_bins``,
    ``pcr_alpha``: the PCR's Gaussian smoothing (bins) and ridge penalty.
    """

    readin_dim: int = 0
    readin_init: str = "auto"
    train_readin: Optional[bool] = None
    pcr_smooth_bins: float = 2.0
    pcr_alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.readin_init not in ("auto", "pcr", "random"):
            raise SpecError(f"readin init must be 'auto', 'pcr' or 'random', got {self.readin_init!r}")
        if self.readin_dim < 0:
            raise SpecError(f"readin dim must be >= 0, got {self.readin_dim}")

    def trains(self, recordings: Sequence[Recording]) -> bool:
        """Whether the read-ins train: ``train_readin``, or (None) unless they start from PCR."""
        return self.train_readin if self.train_readin is not None else self.init(recordings) != "pcr"

    def dim(self, recordings: Sequence[Recording]) -> int:
        return self.readin_dim or min(32, min(r.n_units for r in recordings))

    def init(self, recordings: Sequence[Recording]) -> str:
        if self.readin_init != "auto":
            return self.readin_init
        return "pcr" if all(r.conditions is not None for r in recordings) else "random"


def session_names(recordings: Sequence[Recording], names: Optional[Sequence[str]] = None) -> List[str]:
    """Each session's name: ``names``, or the stem of its file; duplicates and names with ``.`` refused."""
    if names is not None and len(names) != len(recordings):
        raise RecordingError(f"--session-names gives {len(names)} names for {len(recordings)} files")
    out = list(names) if names is not None else [Path(r.source).stem for r in recordings]
    seen: Dict[str, str] = {}
    for name, rec in zip(out, recordings):
        try:
            check_session_name(name)
        except SessionError as exc:
            raise RecordingError(f"{rec.source}: {exc}") from None
        if name in seen:
            raise RecordingError(f"{rec.source}: session name {name!r} is also {seen[name]}'s; sessions need "
                                 "distinct names (--session-names A,B,...)")
        seen[name] = rec.source
    return out


def _grid(rec: Recording) -> Dict[str, Any]:
    return {"bin_ms": float(rec.bin_ms), "n_bins": int(rec.n_bins), "start_ms": float(rec.time_ms[0] - rec.bin_ms / 2)}


def check_same_grid(rec: Recording, grid: Mapping[str, Any], other: str) -> None:
    """Refuse ``rec`` unless its bins are ``grid``'s (width, count and start): stitched sessions share one grid."""
    mine = _grid(rec)
    if abs(mine["bin_ms"] - grid["bin_ms"]) > 1e-9:
        raise RecordingError(f"{rec.source}: bins of {mine['bin_ms']:g} ms, {other} has {grid['bin_ms']:g} ms: "
                             "stitched sessions share one bin width (--bin-ms)")
    if mine["n_bins"] != grid["n_bins"] or abs(mine["start_ms"] - grid["start_ms"]) > 1e-6:
        raise RecordingError(
            f"{rec.source}: window of {mine['n_bins']} bins from {mine['start_ms']:g} ms, {other} has "
            f"{grid['n_bins']} bins from {grid['start_ms']:g} ms: stitched sessions share one window (--window)")


def check_sessions(recordings: Sequence[Recording], names: Optional[Sequence[str]] = None) -> List[str]:
    """The sessions' names once they can be stitched: distinct names, one bin width and window."""
    out = session_names(recordings, names)
    for rec in recordings[1:]:
        check_same_grid(rec, _grid(recordings[0]), recordings[0].source)
    return out


def check_shared_conditions(recordings: Sequence[Recording]) -> List[str]:
    """The condition labels every session has (the PCR read-in averages over them); at least two."""
    for rec in recordings:
        if rec.conditions is None:
            raise RecordingError(f"{rec.source}: the PCR read-in needs condition labels in every session (--condition), "
                                 "or --readin-init random")
    shared = set(recordings[0].conditions.tolist())
    for rec in recordings[1:]:
        shared &= set(rec.conditions.tolist())
        if len(shared) < 2:
            raise RecordingError(f"{rec.source}: shares {len(shared)} condition label(s) with the sessions before it; the "
                                 "PCR read-in needs at least 2 (or --readin-init random)")
    return sorted(shared)


def stitched_config(recordings: Sequence[Recording], overrides: Optional[Mapping[str, Any]] = None,
                    quick: bool = False, epochs: Optional[int] = None) -> RecordingConfig:
    """The run spec of a stitched fit: the defaults for the sessions' pooled trials (and their largest
    unit count), then ``overrides`` and ``epochs``; every session must have the trials its folds need.

    Raises
    ------
    SpecError
        As :func:`~pyro_langevin.recording.run.recording_config`, naming the session's file.
    """
    changes = dict(overrides or {})
    if epochs is not None:
        changes["fit.epochs"] = int(epochs)
    first = recordings[0]
    cfg = check_buildable(default_config(sum(r.n_trials for r in recordings), max(r.n_units for r in recordings),
                                         first.n_bins, first.bin_ms, quick, changes))
    for rec in recordings:
        if cfg.cv.folds and rec.n_units < 2:
            raise SpecError(f"{rec.source}: {rec.n_units} unit; cross-validation holds units out in every session "
                            "(--cv 0 fits without a score)")
        need = 3 * cfg.cv.folds if cfg.cv.folds else 2
        if rec.n_trials < need:
            raise SpecError(f"{rec.source}: {rec.n_trials} trials, too few for "
                            + (f"cv.folds={cfg.cv.folds} (each session needs {need}); use fewer folds (--cv K) or --cv 0"
                               if cfg.cv.folds else "a fit (at least 2: one validates)"))
    return cfg


def _labels(recordings: Sequence[Recording], names: Sequence[str]) -> Dict[str, Sequence[str]]:
    return {n: r.conditions for n, r in zip(names, recordings)}


def _layout(layout: SessionLayout, train: Any, recordings: Sequence[Recording], names: Sequence[str],
            opts: StitchOptions) -> SessionLayout:
    """``layout`` with the read-ins' initial value from the TRAINING trials ``train`` (PCR), or as it is."""
    if opts.init(recordings) != "pcr":
        return layout
    return pcr_layout(layout, train, _labels(recordings, names), smooth_bins=opts.pcr_smooth_bins, alpha=opts.pcr_alpha)


# ----- cross-validation -------------------------------------------------------------------------
def cross_validate_sessions(recordings: Sequence[Recording], names: Sequence[str], cfg: RecordingConfig,
                            opts: StitchOptions, out: Path, seed: int = 0, device: Any = "cpu", *,
                            workers: int = 1, executor: Optional[Executor] = None, resume: bool = False,
                            progress: bool = True, meta: Optional[Mapping[str, Any]] = None,
                            log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Co-smoothing cross-validation of the stitched recipe: fold ``f`` scores fold ``f`` of every
    session's trials (``kfold_indices(n_trials, K, seed + s)``), holding out ``cv.heldout_frac`` of each
    session's units (``numpy.random.default_rng(seed + 1 + s)``). Scores per session (model and the
    smoothing baseline on the session's own units and trials) and pooled over sessions (``summary``)."""
    k = cfg.cv.folds
    parts = [kfold_indices(r.n_trials, k, seed + s) for s, r in enumerate(recordings)]
    rngs = [np.random.default_rng(seed + 1 + s) for s in range(len(recordings))]
    heldout = [[np.sort(rng.choice(r.n_units, cfg.cv.n_heldout(r.n_units), replace=False)) for _ in range(k)]
               for rng, r in zip(rngs, recordings)]
    folds, layouts = [], []
    for f in range(k):
        batch, layout = stitch_batches([r.batch(heldout[s][f]) for s, r in enumerate(recordings)], names,
                                       opts.dim(recordings), opts.trains(recordings))
        scored = np.concatenate([layout.trial_offset(s) + parts[s][f] for s in range(len(recordings))])
        rest = torch.as_tensor(np.setdiff1d(np.arange(batch.n_trials), scored))
        layout = _layout(layout, batch[rest], recordings, names, opts)  # the fold's training trials only
        layouts.append(layout)
        folds.append(Fold(f, scored, TrialSet(batch, sessions=layout.to_dict())))
    log(f"{k}-fold cross-validation of {len(recordings)} stitched sessions (fold f scores fold f of every session's "
        "trials; units held out per session)")
    per_session: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}

    def baseline(data: TrialSet, scored, rest) -> Dict[str, float]:
        """Each session's smoothing baseline on its own units (kernel and penalty chosen on its other
        trials); pooled: their rates side by side, scored on every session's held-out units."""
        layout = SessionLayout.from_dict(data.sessions)
        pooled_eval = np.ones(tuple(scored.target.shape))  # other sessions' columns are masked: never read
        pooled_fit = np.ones(tuple(rest.target.shape))
        for s, name in enumerate(names):
            sc, re = session_view(scored, layout, name), session_view(rest, layout, name)
            info: Dict[str, Any] = {}
            r = smoothing_baseline(re, sc, recordings[s].bin_ms, "cv", info=info)
            cols = layout.columns(s)
            pooled_eval[np.ix_(session_rows(scored, layout, name).numpy(), np.arange(scored.n_bins), cols)] = r.eval
            pooled_fit[np.ix_(session_rows(rest, layout, name).numpy(), np.arange(rest.n_bins), cols)] = r.train
            per_session[name].append({"smoothing": score_local(r.eval, sc, r.train, re),
                                      "smoothing_kernel_sd_ms": info.get("kern_sd_ms"),
                                      "smoothing_glm_alpha": info.get("alpha")})
        return score_local(pooled_eval, scored, pooled_fit, rest)

    records, ensembles = train_folds(folds, cfg, out, seed, device, baseline, log=log,
                                     executor=executor or Executor(workers=workers), resume=resume,
                                     progress=progress, meta=dict(meta or {}))
    for f, (fold, rates) in enumerate(zip(folds, ensembles)):
        data, layout = fold.data.train, layouts[f]
        scored, rest = fold.split(fold.data)
        pos = {int(i): r for r, i in enumerate(data.index.tolist())}
        rows = lambda b: [pos[int(i)] for i in b.index.tolist()]  # noqa: E731
        for s, name in enumerate(names):
            sc, r_sc = session_view(scored, layout, name, rates.train[rows(scored)])
            re, r_re = session_view(rest, layout, name, rates.train[rows(rest)])
            per_session[name][f]["model"] = score_local(r_sc, sc, r_re, re)
            per_session[name][f]["heldout_units"] = [recordings[s].unit_ids[u].item() for u in heldout[s][f]]
    sessions = {name: {"folds": per_session[name], "summary": summarize_folds(per_session[name])} for name in names}
    return {"k": k, "seed": seed, "folds": records, "summary": summarize_folds(records), "sessions": sessions}


# ----- the fit and its outputs -------------------------------------------------------------------
def _final_cfg(cfg: RecordingConfig, seed: int) -> RecordingConfig:
    return dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, seed=seed, select_on="val_loss", select_mode="min"))


def fit_record(result: Any, best: Mapping[str, Any], seconds: float, n_fit: int) -> Dict[str, Any]:
    return {"best_epoch": int(best["best_epoch"]), "best_val_loss": float(best["best_metric"]),
            "epochs_run": len(result.history), "stopped_early": bool(result.stopped_early),
            "fit_seconds": round(seconds, 1), "n_fit_trials": n_fit}


def fit_sessions_final(recordings: Sequence[Recording], names: Sequence[str], cfg: RecordingConfig,
                       opts: StitchOptions, out: Path, seed: int = 0, device: Any = "cpu", *, resume: bool = False,
                       progress: bool = True, meta: Optional[Mapping[str, Any]] = None,
                       log: Callable[[str], None] = print):
    """The stitched fit every output comes from: every unit read, validation trials carved from each
    session's own trials (their ELBO picks the checkpoint), epochs balanced over sessions; written to
    ``out/checkpoints``. Returns ``(load_run(out), record)``."""
    final = _final_cfg(cfg, seed)
    batch, layout = stitch_batches([r.batch() for r in recordings], names, opts.dim(recordings), opts.trains(recordings))
    fit_trials, valid = split_sessions(batch, layout, cfg.eval.valid_frac, seed)
    layout = _layout(layout, fit_trials, recordings, names, opts)
    model, guide = build_stitched(final, layout)
    last = out / "checkpoints" / "last.pt"
    resume_from = last if resume and last.is_file() else None
    train = balance_sessions(fit_trials, layout)
    log(f"fit: {fit_trials.n_trials} trials of {len(names)} sessions ({train.n_trials} per epoch, sessions weighted "
        f"equally), {valid.n_trials} validation trials; read-in {layout.readin_dim} wide, "
        f"{opts.init(recordings)} init, {'trained' if layout.train_readin else 'fixed'}")
    t0 = time.perf_counter()
    result = fit(model, guide, train, valid, final.fit, device=device, checkpoint_dir=out / "checkpoints",
                 resume=resume_from, progress=progress,
                 meta=run_meta(final, layout.n_neurons, layout.n_heldin, **dict(meta or {}), role="fit",
                               sessions=layout.to_dict()))
    loaded = load_run(out, "best", map_location=device)
    record = fit_record(result, loaded.checkpoint, time.perf_counter() - t0, fit_trials.n_trials)
    record["valid_trials"] = {n: [recordings[s].trial_ids[i].item() for i in session_view(valid, layout, n).index.tolist()]
                              for s, n in enumerate(names)}
    return loaded, record


def session_outputs(model: Any, guide: Any, layout: SessionLayout, recordings: Sequence[Recording],
                     names: Sequence[str], cfg: RecordingConfig, out: Path, seed: int, device: Any,
                     log: Callable[[str], None] = print):
    """Per session: ``sessions/<name>/posterior.nc`` and figures; returns summaries, datasets and paths."""
    summaries, idatas, paths = {}, {}, {}
    for rec, name in zip(recordings, names):
        i = layout.position(name)
        log(f"posterior of session {name}: {cfg.eval.export_draws} draws of its {rec.n_trials} trials ...")
        summary = summarize_posterior(model, guide, rec, cfg.eval.export_draws, PROB, seed, device,
                                      batch=embed_session(rec.batch(), layout, name), rate_columns=layout.columns(i))
        idata = to_inference_data(summary, rec, attrs={"source": rec.source, "seed": seed, "session": name})
        folder = out / "sessions" / name
        folder.mkdir(parents=True, exist_ok=True)
        paths[name] = {"posterior": str(save_netcdf(idata, folder / "posterior.nc")),
                       "figures": {k: str(v) for k, v in save_figures(folder, rec, summary).items()}}
        summaries[name], idatas[name] = summary, idata
    return summaries, idatas, paths


def _pooled_posterior(idatas: Mapping[str, Any]):
    """One InferenceData of every session's trials: trial and unit ids prefixed ``<session>/``, units of
    the other sessions NaN (a trial records only its session's units)."""
    import arviz as az

    groups = {}
    for group in ("posterior", "observed_data", "constant_data"):
        parts = []
        for name, idata in idatas.items():
            ds = idata[group]
            renames = {d: [f"{name}/{v}" for v in ds[d].values] for d in ("trial", "unit") if d in ds.dims}
            parts.append(ds.assign_coords(**renames).assign_coords(session=("trial", [name] * ds.sizes["trial"])))
        per_trial = [p[[v for v in p.data_vars if "trial" in p[v].dims]] for p in parts]
        merged = xr.concat(per_trial, dim="trial", join="outer", data_vars="all", coords="different", compat="equals")
        others = [p[[v for v in p.data_vars if "trial" not in p[v].dims]] for p in parts]
        if any(o.data_vars for o in others):
            merged = xr.merge([merged, *[o.drop_vars("session", errors="ignore") for o in others]], join="outer",
                              compat="no_conflicts")
        groups[group] = merged
    return az.InferenceData(**groups)


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_metrics(out: Path, metrics: Dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True, default=str))


def fit_recordings(recordings: Sequence[Recording], out: PathLike, *, names: Optional[Sequence[str]] = None,
                   config: Optional[RecordingConfig] = None, overrides: Optional[Mapping[str, Any]] = None,
                   epochs: Optional[int] = None, quick: bool = False, stitch: Optional[StitchOptions] = None,
                   seed: int = 0, device: Any = None, workers: int = 1, executor: Optional[Executor] = None,
                   resume: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Score, fit and summarise several sessions stitched into one model (see the module docstring).

    Parameters as :func:`~pyro_langevin.recording.run.fit_recording`, plus ``names`` (default: the
    files' stems) and ``stitch`` (:class:`StitchOptions`). Returns what ``metrics.json`` holds.
    """
    t_start = time.perf_counter()
    out, dev, opts = Path(out), check_device(device), stitch or StitchOptions()
    names = check_sessions(recordings, names)
    cfg = config if config is not None else stitched_config(recordings, overrides, quick, epochs)
    meta = {"recordings": {n: json.loads(json.dumps(r.reading, default=str)) for n, r in zip(names, recordings)},
            "grid": _grid(recordings[0]), "run_seed": int(seed), "stitch": dataclasses.asdict(opts)}
    if resume:
        check_resumable(out, cfg, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    for name, rec in zip(names, recordings):
        log(f"session {name} ({rec.source}): {rec.n_trials} trials x {rec.n_bins} bins of {rec.bin_ms:g} ms x "
            f"{rec.n_units} units")
    t_cv = time.perf_counter()
    cv = None
    if cfg.cv.folds:
        cv = cross_validate_sessions(recordings, names, cfg, opts, out / "cv", seed, dev, workers=workers,
                                     executor=executor, resume=resume, progress=progress and workers <= 1 and executor is None,
                                     meta=meta, log=log)
        for name in names:
            log(format_cv_table(cv["sessions"][name]["summary"], cv["k"], f"session {name}'s trials"))
    cv_seconds = time.perf_counter() - t_cv
    (model, guide, _, _), final = fit_sessions_final(recordings, names, cfg, opts, out, seed, dev, resume=resume,
                                                     progress=progress, meta=meta, log=log)
    summaries, idatas, session_paths = session_outputs(model, guide, model.layout, recordings, names, cfg, out, seed,
                                                        dev, log)
    nc = save_netcdf(_pooled_posterior(idatas), out / "posterior.nc")
    figures = {"shared_latents": _save(plot_shared_latents(shared_latent_plane(summaries)), out / "shared_latents.png")}
    if cv is not None:  # pooled over sessions; each session's own figures are in sessions/<name>/
        figures["cv"] = _save(plot_cv(cv["folds"], cv["summary"]), out / "cv.png")
    metrics = {
        "sessions": {n: {"source": r.source, "trials": r.n_trials, "units": r.n_units,
                         "conditions": summaries[n].conditions, "mean_rate_hz": float(r.mean_rates_hz().mean()),
                         "cv": None if cv is None else cv["sessions"][n]["summary"], **session_paths[n]}
                     for n, r in zip(names, recordings)},
        "data": {"bins": recordings[0].n_bins, "bin_ms": recordings[0].bin_ms, "align": recordings[0].align,
                 "time_ms": [float(recordings[0].time_ms[0]), float(recordings[0].time_ms[-1])]},
        "stitch": {**dataclasses.asdict(opts), "readin_dim": model.layout.readin_dim,
                   "readin_init_used": opts.init(recordings), "readin_trained": model.layout.train_readin},
        "defaults": {"overrides": dict(overrides or {}), "epochs": epochs, "quick": quick},
        "cv": cv, "fit": final,
        "outputs": {"spec": str(out / "spec.json"), "checkpoints": str(out / "checkpoints"), "posterior": str(nc),
                    "figures": figures, "metrics": str(out / "metrics.json")},
        "seconds": {"cv": round(cv_seconds, 1), "total": round(time.perf_counter() - t_start, 1)},
        "seed": seed, "device": str(dev), "workers": workers, "host": platform.node(), "spec": cfg.to_dict(),
    }
    write_metrics(out, metrics)
    return metrics
