"""Fit a recording end to end: an honest score by cross-validation, then one fit, its posterior and figures.

:func:`fit_recording` (what ``pyro-langevin fit`` runs) does, in ``out``:

1. ``spec.json``: the run spec (:class:`~pyro_langevin.recording.config.RecordingConfig`), the
   defaults chosen by the recording's size with the user's overrides applied.
2. With ``recipe="search"`` (the default), each fold's recipe is chosen first on the fold's other
   trials (:mod:`~pyro_langevin.recording.recipes`: candidates scored by Poisson data thinning,
   ASHA on Ray Tune), so the cross-validated score is that of the whole procedure; the final fit
   uses the candidate that won the most folds (``metrics.json``: ``recipe``).
3. Co-smoothing cross-validation (``cv/``, :func:`cross_validate_recording`): K folds of the trials;
   in each, a random ``cv.heldout_frac`` of the units is held out. The fold's model never sees its
   scored trials' held-out units (they enter training through their held-in spikes only), never
   chooses anything on them (an inner validation split picks its checkpoint), and is scored on them
   (co-bps; vel R^2 with behaviour), as the smoothing baseline is on the same split. The folds,
   members and scores are the core's (:mod:`pyro_langevin.crossval`), shared with the NLB wing.
4. The fit (``checkpoints/``): the chosen recipe with every unit read by the guide, fitted on
   ``1 - eval.valid_frac`` of the trials, its checkpoint picked by the ELBO of the other trials
   (with no unit held out there is no co-bps to select on); loadable with
   :func:`~pyro_langevin.spec.load_run`.
5. ``posterior.nc`` (:func:`~pyro_langevin.recording.summary.to_inference_data`), the figures
   (:func:`~pyro_langevin.recording.figures.save_figures`) and ``metrics.json``. With ``cv.ensemble``
   (the default) the rates pool the fit's posterior with the K fold models' (:func:`fold_members`):
   an ensemble that costs no training, only the folds' posterior draws; the latents are the fit's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from pyro_langevin.baseline import score_smoothing_split
from pyro_langevin.checkpoints import load_checkpoint, resume_conflicts
from pyro_langevin.crossval import Fold, format_cv_table, summarize_folds, train_folds
from pyro_langevin.data.splits import kfold_indices, split_train_valid
from pyro_langevin.devices import check_device
from pyro_langevin.executor import Executor
from pyro_langevin.members import TrialSet
from pyro_langevin.predictive import save_netcdf
from pyro_langevin.recording.config import RecordingConfig, default_config, sized_settings
from pyro_langevin.recording.data import Recording, RecordingError
from pyro_langevin.recording.figures import save_figures
from pyro_langevin.recording.recipes import (
    RECIPE_MODES,
    candidate_config,
    format_recipe_choice,
    ray_for_search,
    recipe_candidates,
    refit_config,
    search_recipe,
    summarize_recipe_choice,
)
from pyro_langevin.recording.summary import RateMember, summarize_posterior, to_inference_data
from pyro_langevin.spec import SpecError, build, check_buildable, load_run, run_meta
from pyro_langevin.training import fit

__all__ = ["recording_config", "run_meta_of", "check_resumable", "cross_validate_recording", "fit_final",
           "fold_members", "fit_recording", "format_summary", "PROB"]

PathLike = Union[str, Path]
#: ``search(trial_sets, folder) -> results``: chooses a recipe on each trial set
#: (:func:`~pyro_langevin.recording.recipes.search_recipe`).
Search = Callable[[Sequence[Recording], Path], List[Dict[str, Any]]]
#: Mass of every posterior interval written (posterior.nc, figures).
PROB = 0.9


def recording_config(recording: Recording, overrides: Optional[Mapping[str, Any]] = None, quick: bool = False,
                     epochs: Optional[int] = None, search: bool = False) -> RecordingConfig:
    """The run spec of ``recording``: the defaults for its size (:func:`~pyro_langevin.recording.config.default_config`;
    ``search``: for a recipe searched in every fold, fewer folds), then ``overrides`` (dotted keys) and ``epochs``;
    checked to build, and to fit the recording's size.

    Raises
    ------
    SpecError
        An unknown key, a bad value, settings the constructors refuse, or more folds than trials.
    """
    changes = dict(overrides or {})
    if epochs is not None:
        changes["fit.epochs"] = int(epochs)
    cfg = check_buildable(default_config(recording.n_trials, recording.n_units, recording.n_bins, recording.bin_ms,
                                         quick, changes, search))
    if cfg.cv.folds:
        if recording.n_units < 2:
            raise SpecError(f"cross-validation holds units out, and {recording.source} has {recording.n_units} unit; "
                            "set cv.folds=0 (--cv 0) to fit without a score")
        # every fold's fit needs trials for its fit and inner validation splits
        if recording.n_trials < 3 * cfg.cv.folds:
            raise SpecError(f"cv.folds={cfg.cv.folds} needs at least {3 * cfg.cv.folds} trials, {recording.source} "
                            f"has {recording.n_trials}; use fewer folds (--cv K) or --cv 0")
    elif recording.n_trials < 2:
        raise SpecError(f"{recording.source} has {recording.n_trials} trial: the fit needs at least 2 (one validates)")
    return cfg


def run_meta_of(recording: Recording, seed: int) -> Dict[str, Any]:
    """What every checkpoint of the run records about its data (and a resumed run must match)."""
    return {"recording": json.loads(json.dumps(recording.reading, default=str)), "size": recording.size(),
            "run_seed": int(seed)}


def _resume_view(cfg: RecordingConfig, meta: Mapping[str, Any], ignore: Sequence[str] = ()) -> Dict[str, Any]:
    """The settings a checkpoint of this run must share: data, seed, and the spec but for what each fit
    sets itself (and the dotted keys ``ignore``: what a recipe search may set)."""
    spec = cfg.to_dict()
    for key in ("seed", "select_on", "select_mode"):
        spec["fit"].pop(key, None)
    spec.get("cv", {}).pop("ensemble", None)  # what the outputs pool, not how anything trains
    for dotted in ignore:
        section, _, key = dotted.partition(".")
        spec.get(section, {}).pop(key, None)
    return {**meta, "spec": spec}


def _candidate_keys(candidates: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """What a recipe search may set: the candidates' keys, and the ramps a refit rescales."""
    return sorted({k for over in candidates.values() for k in over} | {"fit.kl_ramp", "fit.weight_decay_ramp"})


def check_resumable(out: Path, cfg: RecordingConfig, meta: Mapping[str, Any], ignore: Sequence[str] = ()) -> None:
    """Refuse ``--resume`` when any checkpoint under ``out`` (the folds' and the fit's ``last.pt``) was
    written by a run with other data or settings (:func:`~pyro_langevin.checkpoints.resume_conflicts`).

    Raises
    ------
    RecordingError
        ``--resume: FILE was written by a different run (KEY=... there, ... here)``.
    """
    wanted = _resume_view(cfg, meta, ignore)
    for last in sorted(Path(out).rglob("last.pt")):
        try:
            saved = load_checkpoint(last).get("meta") or {}
        except (ValueError, FileNotFoundError) as exc:
            raise RecordingError(f"--resume: {last}: {exc}; rerun with --overwrite to start afresh") from None
        diffs = resume_conflicts(saved, wanted)
        if diffs:
            raise RecordingError(f"--resume: {last} was written by a different run ({'; '.join(diffs[:4])}); use the "
                                 "same options, or --overwrite to start afresh")


def cross_validate_recording(recording: Recording, cfg: RecordingConfig, out: Path, seed: int = 0,
                             device: Any = "cpu", *, workers: int = 1, executor: Optional[Executor] = None,
                             resume: bool = False, progress: bool = True,
                             meta: Optional[Mapping[str, Any]] = None,
                             search: Optional[Search] = None,
                             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Co-smoothing cross-validation of ``cfg``'s recipe on ``recording`` (see the module docstring).

    Fold ``f`` scores trials ``kfold_indices(n_trials, K, seed)[f]`` and holds out the units
    ``rng.choice(n_units, n_heldout)`` of ``numpy.random.default_rng(seed + 1)`` drawn fold after fold.
    Checkpoints go to ``out/fold{f}/checkpoints``. The smoothing baseline chooses its kernel and GLM
    penalty on the fold's other trials (``kern_sd_ms="cv"``). The folds train on ``executor``
    (default: ``workers`` local worker processes; :class:`~pyro_langevin.executor.Executor` with an
    ``address`` runs them as Ray tasks).

    With ``search`` (``search(trial_sets, folder) -> results``, e.g. a partial of
    :func:`~pyro_langevin.recording.recipes.search_recipe`), each fold's recipe is chosen first on
    the fold's OTHER trials only (``recording.subset(rest)``: its scored trials are not passed), and
    the fold trains the winner; each search's table is kept in ``out/fold{f}/search.json`` (read back
    by ``resume``) and in the fold's record (``recipe``, ``search``).

    Returns
    -------
    dict
        ``k``, ``n_heldout_units``, ``folds`` (per-fold records: scores of the model and the baseline,
        the held-out unit ids, the baseline's kernel and penalty) and ``summary``
        (:func:`~pyro_langevin.crossval.summarize_folds`).
    """
    k = cfg.cv.folds
    n_out = cfg.cv.n_heldout(recording.n_units)
    parts = kfold_indices(recording.n_trials, k, seed)
    rng = np.random.default_rng(seed + 1)
    heldout = [np.sort(rng.choice(recording.n_units, n_out, replace=False)) for _ in range(k)]
    folds = [Fold(f, parts[f], TrialSet(recording.batch(heldout[f]))) for f in range(k)]
    log(f"{k}-fold cross-validation over {recording.n_trials} trials (folds of {min(map(len, parts))}-"
        f"{max(map(len, parts))}), {n_out} of {recording.n_units} units held out at random in each fold")
    chosen: Dict[int, Dict[str, Any]] = {}

    def baseline(data: TrialSet, scored, rest) -> Dict[str, float]:
        info: Dict[str, Any] = {}
        scores = score_smoothing_split(scored, rest, recording.bin_ms, "cv", info=info)
        chosen[len(chosen)] = info
        return scores

    searches: Dict[int, Dict[str, Any]] = {}
    if search is not None:
        log(f"choosing each fold's recipe on its other trials ({', '.join(str(recording.n_trials - len(p)) for p in parts)}) ...")
        searches = dict(enumerate(_searched(recording, parts, search, [out / f"fold{f}" for f in range(k)], resume, log)))
    configs = {f: candidate_config(cfg, s["candidates"][s["winner"]]["overrides"]) for f, s in searches.items()}
    records, _ = train_folds(folds, cfg, out, seed, device, baseline, log=log, executor=executor or Executor(workers=workers),
                             resume=resume, progress=progress, meta=dict(meta or {}), fold_configs=configs or None)
    for f, record in enumerate(records):
        if f in searches:
            record["recipe"], record["search"] = searches[f]["winner"], searches[f]
        record["heldout_units"] = [recording.unit_ids[u].item() for u in heldout[f]]
        record["smoothing_kernel_sd_ms"], record["smoothing_glm_alpha"] = chosen[f]["kern_sd_ms"], chosen[f]["alpha"]
    return {"k": k, "n_heldout_units": n_out, "seed": seed, "folds": records, "summary": summarize_folds(records)}


def _searched(recording: Recording, scored: Sequence[np.ndarray], search: Search, folders: Sequence[Path],
              resume: bool, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """The recipe searches of several folds, each on the fold's OTHER trials only, in one ``search``
    call; ``folder/search.json`` keeps each (``resume`` reads back those of the same trials)."""
    rests = [np.setdiff1d(np.arange(recording.n_trials), s) for s in scored]
    results: Dict[int, Dict[str, Any]] = {}
    for i, (rest, folder) in enumerate(zip(rests, folders)):
        saved = folder / "search.json"
        if resume and saved.is_file():
            earlier = json.loads(saved.read_text())
            if earlier.get("trial_rows") == rest.tolist():
                log(f"{folder.name}: recipe search finished earlier ({saved}): {earlier['winner']}")
                results[i] = earlier
    todo = [i for i in range(len(rests)) if i not in results]
    if todo:
        found = search([recording.subset(trials=rests[i]) for i in todo], folders[todo[0]].parent / "search")
        for i, result in zip(todo, found):
            results[i] = dict(result, trial_rows=rests[i].tolist())
            folders[i].mkdir(parents=True, exist_ok=True)
            (folders[i] / "search.json").write_text(json.dumps(results[i], indent=2, allow_nan=True))
    return [results[i] for i in range(len(rests))]


def fit_final(recording: Recording, cfg: RecordingConfig, out: Path, seed: int = 0, device: Any = "cpu", *,
              resume: bool = False, progress: bool = True, meta: Optional[Mapping[str, Any]] = None,
              refit: bool = False, log: Callable[[str], None] = print):
    """The fit every output comes from: every unit read by the guide, written to ``out/checkpoints``;
    returns ``(load_run(out), record)``.

    By default the checkpoint is picked by the ELBO of ``eval.valid_frac`` validation trials. With
    ``refit`` (``cfg`` from :func:`~pyro_langevin.recording.recipes.refit_config`), every trial is
    fitted for ``cfg.fit.epochs`` epochs and the last state kept: the epoch count the recipe search's
    thinned score chose. A validation ELBO cannot stand in for it: the guide reads the validation
    trials' spikes, so an ELBO rewards a model that copies them into its rates.
    """
    final = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, seed=seed, select_on="val_loss", select_mode="min"))
    batch = recording.batch()
    if refit:
        fit_trials, valid = batch, None
    else:
        fit_trials, valid = split_train_valid(batch, cfg.eval.valid_frac, seed)
    model, guide = build(final, recording.n_units, recording.n_units)
    last = out / "checkpoints" / "last.pt"
    resume_from = last if resume and last.is_file() else None
    log((f"fit: every trial ({fit_trials.n_trials}) for {final.fit.epochs} epochs (the chosen recipe's epochs in its "
         "search), every unit read" if refit else
         f"fit: {fit_trials.n_trials} trials, {valid.n_trials} validation trials (checkpoint by their ELBO), "
         f"every unit read; {final.fit.epochs} epochs at most") + (" (resumed)" if resume_from else ""))
    t0 = time.perf_counter()
    result = fit(model, guide, fit_trials, valid, final.fit, device=device, checkpoint_dir=out / "checkpoints",
                 resume=resume_from, progress=progress,
                 meta=run_meta(final, recording.n_units, recording.n_units, **dict(meta or {}), role="fit"))
    seconds = time.perf_counter() - t0
    if refit:  # the last state is the selected one
        shutil.copyfile(out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt")
    loaded = load_run(out, "best", map_location=device)
    best = loaded.checkpoint
    record = {"best_epoch": len(result.history) - 1 if refit else int(best["best_epoch"]),
              "best_val_loss": math.nan if refit else float(best["best_metric"]), "refit": refit,
              "epochs_run": len(result.history), "stopped_early": bool(result.stopped_early),
              "fit_seconds": round(seconds, 1), "n_fit_trials": fit_trials.n_trials,
              "valid_trials": [] if refit else [recording.trial_ids[i].item() for i in valid.index.tolist()]}
    return loaded, record


def fold_members(recording: Recording, cv: Mapping[str, Any], folder: Path, device: Any = "cpu") -> List[RateMember]:
    """The cross-validation folds' fitted models as :class:`~pyro_langevin.recording.summary.RateMember`:
    fold ``f``'s selected checkpoint (``folder/fold{f}/checkpoints/best.pt``) with the recording read
    as it was trained (its held-out units, ``cv["folds"][f]["heldout_units"]``, trailing).

    Raises
    ------
    RecordingError
        A fold's checkpoint is missing, or was fitted to another number of units.
    """
    row = {uid: i for i, uid in enumerate(recording.unit_ids.tolist())}
    members = []
    for f, record in enumerate(cv["folds"]):
        heldout = [row[u] for u in record["heldout_units"]]
        try:
            model, guide, _, ckpt = load_run(folder / f"fold{f}", "best", map_location=device)
        except FileNotFoundError as exc:
            raise RecordingError(f"the fold ensemble needs every fold's model: {exc} (--set cv.ensemble=false "
                                 "writes the final fit's rates alone)") from None
        meta = ckpt.get("meta") or {}
        if meta.get("n_neurons") != recording.n_units or meta.get("n_heldin") != recording.n_units - len(heldout):
            raise RecordingError(f"{folder / f'fold{f}'}: fitted to {meta.get('n_neurons')} units "
                                 f"({meta.get('n_heldin')} held in), this recording has {recording.n_units} "
                                 f"({recording.n_units - len(heldout)} held in for fold {f})")
        columns = np.empty(recording.n_units, dtype=int)
        columns[recording.unit_order(heldout)] = np.arange(recording.n_units)
        members.append(RateMember(model, guide, recording.batch(heldout), columns))
    return members


def fit_recording(recording: Recording, out: PathLike, *, config: Optional[RecordingConfig] = None,
                  overrides: Optional[Mapping[str, Any]] = None, epochs: Optional[int] = None, quick: bool = False,
                  seed: int = 0, device: Any = None, workers: int = 1, executor: Optional[Executor] = None,
                  resume: bool = False, progress: bool = True, recipe: str = "search",
                  candidates: Optional[Mapping[str, Mapping[str, Any]]] = None, save_draws: int = 0,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Score, fit and summarise ``recording`` into ``out`` (see the module docstring).

    Parameters
    ----------
    recording : Recording
        From :func:`~pyro_langevin.recording.nwb.read_nwb`, :func:`~pyro_langevin.recording.data.read_arrays`
        or :meth:`~pyro_langevin.recording.data.Recording.from_arrays`.
    out : path
        The run folder (created; files in it are replaced).
    config : RecordingConfig, optional
        The run spec (default: :func:`recording_config` of the recording, ``overrides``, ``epochs``, ``quick``).
    seed : int
        Seeds the folds, the held-out units, the splits, the fits and the posterior draws.
    device : str or torch.device, optional
        ``cuda`` when available, else ``cpu``.
    workers : int
        Cross-validation folds trained at once in worker processes (CPU).
    executor : Executor, optional
        Where the folds train instead (e.g. ``Executor(address="auto")``: Ray tasks on a cluster; the
        data go through Ray's object store, the checkpoints to ``out``, which the nodes must share).
    resume : bool
        Continue the folds' and the fit's checkpoints in ``out`` (they must come from the same run,
        :func:`check_resumable`).
    progress : bool
        Show the fit's progress bar.
    recipe : {"search", "default"}
        ``"search"``: choose the recipe on the recording (:mod:`~pyro_langevin.recording.recipes`):
        inside each cross-validation fold on its other trials, and for the final fit the candidate
        that won the most folds (with ``cv.folds = 0``, one search on every trial). ``"default"``:
        the sized defaults as they are.
    candidates : dict, optional
        Name -> dotted-key overrides (default :func:`~pyro_langevin.recording.recipes.recipe_candidates`
        of the run spec).
    save_draws : int
        Also store this many posterior draws of every trial's rates and latents in ``posterior.nc``
        with (chain, draw) dimensions (:func:`~pyro_langevin.recording.summary.to_inference_data`).

    Returns
    -------
    dict
        What ``metrics.json`` holds.
    """
    t_start = time.perf_counter()
    out = Path(out)
    dev = check_device(device)
    if recipe not in RECIPE_MODES:
        raise SpecError(f"recipe must be one of {RECIPE_MODES}, got {recipe!r}")
    searched = recipe == "search"
    cfg = config if config is not None else recording_config(recording, overrides, quick, epochs, search=searched)
    if isinstance(save_draws, bool) or not isinstance(save_draws, int) or save_draws < 0:
        raise SpecError(f"save_draws must be an integer >= 0, got {save_draws!r}")
    cands = {k: dict(v) for k, v in (candidates or recipe_candidates(cfg)).items()}
    meta = run_meta_of(recording, seed)
    if resume:
        check_resumable(out, cfg, meta, ignore=_candidate_keys(cands) if searched else ())
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    n, u, t = recording.n_trials, recording.n_units, recording.n_bins
    log(f"{recording.source}: {n} trials x {t} bins of {recording.bin_ms:g} ms x {u} units"
        + (f"; {recording.n_padded_trials} trials padded" if recording.n_padded_trials else "")
        + (f"; {len(set(recording.conditions.tolist()))} conditions ({recording.condition_name})"
           if recording.conditions is not None else ""))
    for note in recording.notes:
        log(f"  {note}")
    cv, choice, final_cfg = None, None, cfg
    t_cv = time.perf_counter()
    with ray_for_search(searched, workers):
        search = (lambda trials, folder: search_recipe(trials, cfg, folder, seed=seed, device=dev, candidates=cands,
                                                        log=log)) if searched else None
        if cfg.cv.folds:
            cv = cross_validate_recording(recording, cfg, out / "cv", seed, dev, workers=workers, executor=executor,
                                          resume=resume, progress=progress and workers <= 1 and executor is None,
                                          meta=meta, search=search, log=log)
            log(format_cv_table(cv["summary"], cv["k"], "the trials, held-out units drawn per fold"))
        if searched:
            searches = [f["search"] for f in cv["folds"]] if cv else _searched(
                recording, [np.zeros(0, int)], search, [out / "recipe"], resume, log)
            choice = summarize_recipe_choice(searches, cands)
            final_cfg = candidate_config(cfg, cands[choice["winner"]])
            if choice["epochs"]:
                final_cfg = refit_config(final_cfg, choice["epochs"])
            log(f"recipe: {format_recipe_choice(choice)}")
            (out / "spec.json").write_text(json.dumps(final_cfg.to_dict(), indent=2))
    cv_seconds = time.perf_counter() - t_cv
    t_fit = time.perf_counter()
    (model, guide, _, _), final = fit_final(recording, final_cfg, out, seed, dev, resume=resume, progress=progress,
                                            meta=meta, refit=bool(choice and choice["epochs"]), log=log)
    n_draws = max(cfg.eval.export_draws, save_draws)
    members = fold_members(recording, cv, out / "cv", dev) if cv and cfg.cv.ensemble else []
    log(f"posterior: {n_draws} draws of every trial's rates and latents"
        + (f", and {n_draws} of the rates from each of the {len(members)} folds' models (fold ensemble)"
           if members else "")
        + (f" ({save_draws} kept in posterior.nc)" if save_draws else "") + " ...")
    summary = summarize_posterior(model, guide, recording, n_draws, PROB, seed, dev, keep_draws=save_draws,
                                  rate_members=members)
    idata = to_inference_data(summary, recording, attrs={"source": recording.source, "seed": seed})
    nc = save_netcdf(idata, out / "posterior.nc")
    figures = save_figures(out, recording, summary, cv)
    fit_seconds = time.perf_counter() - t_fit
    metrics: Dict[str, Any] = {
        "source": recording.source, "reading": recording.reading,
        "data": {"trials": n, "units": u, "bins": t, "bin_ms": recording.bin_ms, "align": recording.align,
                 "time_ms": [float(recording.time_ms[0]), float(recording.time_ms[-1])],
                 "padded_trials": recording.n_padded_trials, "condition": recording.condition_name,
                 "conditions": summary.conditions, "behavior": recording.behavior_name, "notes": recording.notes,
                 "mean_rate_hz": float(recording.mean_rates_hz().mean())},
        "defaults": {"size": recording.size(), "by_size": sized_settings(n, u, t, recording.bin_ms, searched),
                     "overrides": dict(overrides or {}), "epochs": epochs, "quick": quick},
        "recipe": {"mode": recipe, "candidates": cands, **(choice or {"winner": "default"})},
        "cv": cv, "fit": final,
        "posterior": {"rates": (f"fold ensemble: the fit and the {len(members)} cross-validation folds' models, "
                                "an equal mixture of their posteriors") if members else "the fit",
                      "latents": "the fit", "rate_models": 1 + len(members), "draws_per_model": n_draws},
        "outputs": {"spec": str(out / "spec.json"), "checkpoints": str(out / "checkpoints"), "posterior": str(nc),
                    "figures": {k: str(v) for k, v in figures.items()}, "metrics": str(out / "metrics.json")},
        "seconds": {"cv": round(cv_seconds, 1), "fit_and_outputs": round(fit_seconds, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "seed": seed, "device": str(dev), "workers": workers, "torch_threads": torch.get_num_threads(),
        "host": platform.node(), "spec": final_cfg.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True, default=str))
    return metrics


def _or0(x: float) -> float:
    return x if x == x else 0.0


def format_summary(metrics: Mapping[str, Any]) -> str:
    """The one-screen summary printed at the end of ``pyro-langevin fit``."""
    d, s = metrics["data"], metrics["spec"]
    lines = [f"== {metrics['source']}",
             f"data     {d['trials']} trials x {d['bins']} bins of {d['bin_ms']:g} ms ({d['time_ms'][0]:g}..{d['time_ms'][1]:g} ms "
             f"from {d['align']}, bin centres) x {d['units']} units, {d['mean_rate_hz']:.1f} Hz mean"]
    if d["condition"]:
        lines.append(f"         {len(d['conditions'])} conditions of {d['condition']}")
    for note in d["notes"]:
        lines.append(f"         {note}")
    lines.append(f"settings latent {s['model']['latent_dim']}, {s['guide']['name']} guide {s['guide']['hidden']}, "
                 f"batch {s['fit']['batch_size']}, {s['fit']['epochs']} epochs at most (chosen by size "
                 f"{metrics['defaults']['size']}" + (f"; overrides {metrics['defaults']['overrides']}"
                                                    if metrics['defaults']['overrides'] else "") + ")")
    cv = metrics.get("cv")
    if cv:
        sm = cv["summary"]
        lines.append(f"score    {cv['k']}-fold co-smoothing CV, {cv['n_heldout_units']} of {d['units']} units held out "
                     "per fold (mean +- s.e. over folds):")
        for key in sm["model"]:
            m, b, diff = sm["model"][key], sm["smoothing"][key], sm["difference"][key]
            lines.append(f"         {key:<7} LangevinFlow {m['mean']:.4f} +- {m['se']:.4f}   smoothing {b['mean']:.4f} +- "
                         f"{b['se']:.4f}   difference {diff['mean']:+.4f} +- {diff['se']:.4f}")
        diff = sm["difference"]["co-bps"]
        if not diff["mean"] - 2 * _or0(diff["se"]) > 0:
            lines.append(f"         NOT BETTER THAN SPIKE SMOOTHING: the model's co-bps is {diff['mean']:+.4f} +- "
                         f"{_or0(diff['se']):.4f} over smoothing's on the same folds; prefer smoothed spikes for this recording"
                         if diff["mean"] <= 0 else
                         f"         not clearly better than spike smoothing: {diff['mean']:+.4f} +- {_or0(diff['se']):.4f} "
                         "co-bps over it (under two standard errors)")
    else:
        lines.append("score    none (cv.folds = 0)")
    r = metrics.get("recipe") or {}
    if r.get("mode") == "search":
        lines.append(f"recipe   chosen on the recording (thinned bits/spike, keep {r['keep']:g}): {format_recipe_choice(r)}")
        if cv:
            lines.append(f"         per fold (each on its other trials): {', '.join(r['folds'])}")
    elif r:
        lines.append("recipe   the sized defaults (--recipe default: no search)")
    f = metrics["fit"]
    if f.get("refit"):
        lines.append(f"fit      {f['epochs_run']} epochs on every trial (the chosen recipe's best epoch in its searches), "
                     f"{f['fit_seconds']:.0f} s")
    else:
        lines.append(f"fit      {f['epochs_run']} epochs ({'stopped early' if f['stopped_early'] else 'all'}), best at epoch "
                     f"{f['best_epoch']} (validation loss {f['best_val_loss']:.4f}: negative ELBO per count, nats), "
                     f"{f['fit_seconds']:.0f} s")
    post = metrics.get("posterior") or {}
    if post.get("rate_models", 1) > 1:
        lines.append(f"rates    fold ensemble: the fit and the {post['rate_models'] - 1} folds' models pooled "
                     "(--set cv.ensemble=false: the fit alone); latents: the fit's")
    o = metrics["outputs"]
    lines.append(f"wrote    {o['spec']}, {o['checkpoints']}/ (load_run), {o['posterior']}, {o['metrics']}")
    lines.append(f"         figures: {', '.join(Path(p).name for p in o['figures'].values())}")
    sec = metrics["seconds"]
    lines.append(f"time     {sec['total']:.0f} s ({sec['cv']:.0f} s cross-validation), {metrics['workers']} worker(s), "
                 f"device {metrics['device']}")
    return "\n".join(lines)
