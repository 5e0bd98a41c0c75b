"""Choose the recipe on the recording itself: candidate recipes scored by Poisson data thinning,
with successive halving (ASHA) on Ray Tune.

The defaults of :mod:`~pyro_langevin.recording.config` come from one benchmark session; what
regularises a recording best differs between recordings (AutoLFADS's lesson). :func:`search_recipe`
fits every candidate of :func:`recipe_candidates` (dotted-key overrides of the sized defaults) to the
trials it is given and keeps the best:

* **criterion** (:mod:`pyro_langevin.thinning`): every count is split into independent Poisson
  halves ``y1`` (a ``keep`` share, default 0.7) and ``y2``; a candidate fits ``y1`` of every
  trial (every unit read, as the final fit) and is scored, at each validation, by the bits per
  spike of ``y2`` under its posterior-mean rates: a proper score of every unit's rates that copying
  the spikes it read cannot raise (co-smoothing alone preferred a recipe that recovered the rates
  worse, issue 29). The same score picks each candidate's checkpoint and ranks the candidates;
* **cost**: ASHA (``ray.tune.schedulers.ASHAScheduler``, reduction factor 2, first rung at an
  eighth of the validations) stops the worse half of the candidates at each rung; a set's
  candidates are queued together, so they race each other; every candidate also stops early on
  its own (``fit.patience``);
* **where**: a local Ray instance by default, a cluster with ``address``;
* **nesting**: :func:`~pyro_langevin.recording.run.cross_validate_recording` calls it on each
  fold's other trials only, so a fold's scored trials never choose its recipe.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

from pyro_langevin.recording.config import RecordingConfig
from pyro_langevin.recording.data import Recording
from pyro_langevin.spec import build, check_buildable
from pyro_langevin.thinning import METRIC, thin, thinned_metric
from pyro_langevin.training import fit

__all__ = ["CANDIDATES", "recipe_candidates", "KEEP", "RECIPE_MODES", "candidate_config", "fit_thinned", "search_recipe", "format_search",
           "summarize_recipe_choice", "format_recipe_choice", "ray_for_search", "refit_config"]

#: Candidate recipes: name -> dotted-key overrides of the sized defaults (``default``: none).
CANDIDATES: Dict[str, Dict[str, Any]] = {
    "default": {},
    "no-shift": {"fit.shift_std": 0.0},
    "low-kl": {"fit.kl_final": 0.01},
    "dropout": {"fit.shift_std": 0.0, "model.dropout": 0.4, "guide.dropout": 0.4, "fit.cd_keep": 0.3},
}


def recipe_candidates(base: RecordingConfig) -> Dict[str, Dict[str, Any]]:
    """The candidates searched for ``base`` (the sized defaults): :data:`CANDIDATES`, and ``small``, a
    smaller network without the shift (latent a quarter of ``base``'s, at least 4; guide half as wide,
    at least 16), for recordings whose dynamics need few dimensions (the sized latent follows the
    unit count, not the dynamics)."""
    small = {"fit.shift_std": 0.0, "model.latent_dim": max(4, base.model.latent_dim // 4),
             "guide.hidden": max(16, base.guide.hidden // 2)}
    return {**{k: dict(v) for k, v in CANDIDATES.items()}, "small": small}


#: Share of every count the candidates fit (``y1``); the rest (``y2``) scores them.
KEEP = 0.7
#: ``fit_recording(recipe=...)``: choose on the recording, or keep the sized defaults.
RECIPE_MODES = ("search", "default")


def candidate_config(base: RecordingConfig, overrides: Mapping[str, Any]) -> RecordingConfig:
    """``base`` with a candidate's overrides, checked to build."""
    return check_buildable(base.override(dict(overrides)))


def fit_thinned(recording: Recording, cfg: RecordingConfig, *, keep: float = KEEP, seed: int = 0,
                device: Any = "cpu", callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
                progress: bool = False) -> Dict[str, Any]:
    """Fit ``cfg``'s recipe to the ``y1`` share of ``recording`` (every unit read) and score its rates on ``y2``.

    The thinning is drawn from ``seed`` (the same split for every candidate); the model from
    ``cfg.fit.seed``. Validation every ``cfg.fit.val_every`` epochs computes ``thinned_bps`` (bits per
    spike of ``y2``, :func:`~pyro_langevin.thinning.thinned_metric`), which also stops the fit early
    and picks its returned state. ``callback(epoch, record)`` receives every epoch's record.

    Returns
    -------
    dict
        ``score`` (best ``thinned_bps``), ``best_epoch``, ``epochs_run``, ``seconds``.
    """
    y1, y2 = thin(recording.counts, keep, seed=[seed, 29])
    data = dataclasses.replace(recording, counts=y1).batch()
    held = np.where(recording.observed[:, :, None], y2, np.nan)
    fit_cfg = dataclasses.replace(cfg.fit, select_on=METRIC, select_mode="max")
    model, guide = build(cfg, recording.n_units, recording.n_units)
    t0 = time.perf_counter()
    result = fit(model, guide, data, data, fit_cfg, device=device,
                 metric_fn=thinned_metric(torch.as_tensor(held), keep, cfg.eval.select_draws, seed),
                 progress=progress, callback=callback, handle_signals=False)
    scores = [h[METRIC] for h in result.history if METRIC in h]
    return {"score": float(max(scores)) if scores else math.nan, "best_epoch": int(result.best_epoch),
            "epochs_run": len(result.history), "seconds": round(time.perf_counter() - t0, 1)}


@dataclass
class _Context:
    recordings: List[Recording]
    base: RecordingConfig
    candidates: Dict[str, Dict[str, Any]]
    keep: float
    seed: int
    device: str
    threads: int


def _trainable(params: Dict[str, Any], ctx: _Context) -> None:
    """Ray Tune function trainable: one candidate's thinned fit on one group's trials, reporting every
    validation; a ``finished`` file in the trial's folder when the fit ended on its own before its last
    rung (early stopping), so that ASHA's stops can be told from the fit's own."""
    from ray import tune

    torch.set_num_threads(ctx.threads)
    name, group = params["candidate"], int(params["set"])
    cfg = candidate_config(ctx.base, ctx.candidates[name])
    best = {"score": -math.inf, "epoch": -1}

    def report(epoch: int, record: Dict[str, float]) -> None:
        if METRIC in record:
            if float(record[METRIC]) > best["score"]:
                best.update(score=float(record[METRIC]), epoch=epoch)
            tune.report({METRIC: float(record[METRIC]), "best": best["score"], "best_epoch": best["epoch"],
                         "epoch": epoch + 1})

    fit_thinned(ctx.recordings[group], cfg, keep=ctx.keep, seed=ctx.seed, device=ctx.device, callback=report)
    (Path(tune.get_context().get_trial_dir()) / "finished").touch()


def _grouped_asha(max_t: int):
    """A Ray Tune scheduler that runs one ``ASHAScheduler`` per ``set`` of trials (a fold's
    candidates race each other, never another fold's), so every fold's search shares one experiment."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    class GroupedASHA(FIFOScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.groups: Dict[int, ASHAScheduler] = {}

        def _of(self, trial):
            group = int(trial.config["set"])
            if group not in self.groups:
                self.groups[group] = ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode="max",
                                                   max_t=max_t, grace_period=max(1, max_t // 8), reduction_factor=2)
            return self.groups[group]

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True

        def on_trial_add(self, controller, trial) -> None:
            self._of(trial).on_trial_add(controller, trial)

        def on_trial_result(self, controller, trial, result):
            return self._of(trial).on_trial_result(controller, trial, result)

        def on_trial_complete(self, controller, trial, result) -> None:
            self._of(trial).on_trial_complete(controller, trial, result)

        def on_trial_remove(self, controller, trial) -> None:
            self._of(trial).on_trial_remove(controller, trial)

    return GroupedASHA()


@contextmanager
def ray_for_search(needed: bool, cpus: Optional[int] = None) -> Iterator[None]:
    """A local Ray instance for the search while the block runs (``cpus`` CPUs), unless Ray already
    runs in this process (a cluster joined with ``--address``, or the caller's own) or ``needed`` is False."""
    if not needed:
        yield
        return
    from pyro_langevin.executor import connect_ray

    started = connect_ray(None, cpus=cpus)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def search_recipe(recordings: Sequence[Recording], base: RecordingConfig, out: Path, *, seed: int = 0,
                  device: Any = "cpu", candidates: Optional[Mapping[str, Mapping[str, Any]]] = None, keep: float = KEEP,
                  threads: int = 1, cpus_per_trial: float = 1.0, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Score every candidate recipe on each of ``recordings`` (trial sets: one per cross-validation
    fold) by data thinning, with ASHA among each set's candidates, all in one Ray Tune experiment (see
    the module docstring). Ray must be running (:func:`ray_for_search` or
    :func:`~pyro_langevin.executor.connect_ray`); Ray's files go to ``out/search``.

    Returns
    -------
    list of dict
        Per trial set: ``winner`` (a candidate's name), ``margin`` (its score minus the runner-up's,
        bits/spike), ``keep``, ``n_trials``, ``seconds`` (the whole experiment) and ``candidates``:
        per name its ``overrides``, ``score`` (best ``thinned_bps``), ``validations`` run, whether ASHA
        ``stopped`` it, ``seconds``.
    """
    from ray import tune

    cands = {k: dict(v) for k, v in (candidates or recipe_candidates(base)).items()}
    for over in cands.values():
        candidate_config(base, over)  # refuse a bad candidate before Ray starts anything
    max_t = max(1, base.fit.epochs // base.fit.val_every)
    ctx = _Context(list(recordings), base, cands, keep, seed, str(device), threads)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, ctx=ctx), {"cpu": cpus_per_trial}),
        # Ray varies the alphabetically first key fastest: a set's candidates are queued together and race
        param_space={"set": tune.grid_search(list(range(len(ctx.recordings)))), "candidate": tune.grid_search(list(cands))},
        tune_config=tune.TuneConfig(scheduler=_grouped_asha(max_t)),
        run_config=tune.RunConfig(name="search", storage_path=str(out), verbose=0),
    )
    log(f"recipe search: {len(cands)} candidates x {len(ctx.recordings)} trial set(s) on Ray Tune (ASHA within each set) ...")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = tuner.fit()
    seconds = round(time.perf_counter() - t0, 1)
    tables: List[Dict[str, Dict[str, Any]]] = [{} for _ in ctx.recordings]
    for res in grid:
        name, group = res.config["candidate"], int(res.config["set"])
        if res.error is not None:
            raise RuntimeError(f"recipe search: candidate {name!r} failed: {res.error}")
        m = res.metrics or {}
        tables[group][name] = {"overrides": cands[name], "score": float(m.get("best", math.nan)),
                               "best_epoch": int(m.get("best_epoch", -1)),
                               "validations": int(m.get("training_iteration", 0)),
                               "stopped": (int(m.get("training_iteration", 0)) < max_t
                                           and not (Path(res.path) / "finished").is_file()),
                               "seconds": round(float(m.get("time_total_s", 0.0)), 1)}
    results = []
    for rec, table in zip(ctx.recordings, tables):
        table = {n: table[n] for n in cands}  # candidate order
        ranked = sorted(table, key=lambda k: -_finite(table[k]["score"]))
        margin = table[ranked[0]]["score"] - table[ranked[1]]["score"] if len(ranked) > 1 else math.nan
        result = {"winner": ranked[0], "margin": float(margin), "keep": keep, "n_trials": rec.n_trials,
                  "seconds": seconds, "candidates": table}
        log(f"  on {rec.n_trials} trials: {format_search(result)}")
        results.append(result)
    return results


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def format_search(search: Mapping[str, Any]) -> str:
    """``no-shift 0.1234* default 0.1200 (stopped) ...``: the candidates' scores on one line, the winner starred."""
    cells = []
    for name, c in sorted(search["candidates"].items(), key=lambda kv: -_finite(kv[1]["score"])):
        cells.append(f"{name} {c['score']:.4f}" + ("*" if name == search["winner"] else "")
                     + (" (stopped)" if c.get("stopped") else ""))
    return "  ".join(cells)


def summarize_recipe_choice(searches: Sequence[Mapping[str, Any]],
                            candidates: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The final fit's recipe from the folds' searches (or one search): the candidate that won the most,
    ties broken by its mean rank, then its mean score.

    Returns
    -------
    dict
        ``winner``, ``wins`` and ``mean_rank`` per candidate, ``scores`` (per candidate: mean and s.e.
        over searches of its thinned bits/spike, and the values), ``margin`` (the winner's score minus
        the runner-up's, paired per search: mean, s.e., and the runner-up's name), ``folds`` (each
        search's winner), ``keep`` and ``epochs``: how long the final fit trains (the median of the
        winner's best epoch over the searches, :func:`refit_config`).
    """
    names = list(candidates)
    wins = {n: sum(s["winner"] == n for s in searches) for n in names}
    ranks: Dict[str, List[int]] = {n: [] for n in names}
    for s in searches:
        order = sorted(s["candidates"], key=lambda k: -_finite(s["candidates"][k]["score"]))
        for r, n in enumerate(order):
            ranks[n].append(r + 1)
    mean_rank = {n: float(np.mean(ranks[n])) for n in names}
    values = {n: [float(s["candidates"][n]["score"]) for s in searches] for n in names}
    scores = {n: {**_mean_se(v), "values": v} for n, v in values.items()}
    winner = sorted(names, key=lambda n: (-wins[n], mean_rank[n], -_finite(scores[n]["mean"])))[0]
    others = [n for n in names if n != winner]
    margin: Dict[str, Any] = {"mean": math.nan, "se": math.nan, "runner_up": None}
    if others:
        runner = sorted(others, key=lambda n: (-wins[n], mean_rank[n], -_finite(scores[n]["mean"])))[0]
        margin = {**_mean_se([a - b for a, b in zip(values[winner], values[runner])]), "runner_up": runner}
    return {"winner": winner, "wins": wins, "mean_rank": mean_rank, "scores": scores, "margin": margin,
            "folds": [s["winner"] for s in searches], "keep": searches[0].get("keep", KEEP),
            "epochs": _refit_epochs(searches, winner)}


def _refit_epochs(searches: Sequence[Mapping[str, Any]], winner: str) -> Optional[int]:
    """Epochs of the final fit: the median over searches of the winner's best epoch (+1), from the
    searches that let it finish (all, if ASHA stopped it everywhere); None when none is known."""
    runs = [s["candidates"][winner] for s in searches if s["candidates"][winner].get("best_epoch", -1) >= 0]
    finished = [r for r in runs if not r.get("stopped")] or runs
    if not finished:
        return None
    return int(round(float(np.median([r["best_epoch"] + 1 for r in finished]))))


def refit_config(cfg: RecordingConfig, epochs: int) -> RecordingConfig:
    """``cfg`` trained for ``epochs`` epochs with no validation: its ramps keep their length in epochs
    (their fractions rescaled) and early stopping is off, so the refit follows the winner's own
    search fit up to the epoch the thinned score chose."""
    f = cfg.fit
    scale = f.epochs / max(1, epochs)
    return check_buildable(cfg.override({"fit.epochs": int(epochs), "fit.kl_ramp": f.kl_ramp * scale,
                                         "fit.weight_decay_ramp": f.weight_decay_ramp * scale, "fit.patience": 0}))


def _mean_se(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": math.nan, "se": math.nan}
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan}


def format_recipe_choice(choice: Mapping[str, Any]) -> str:
    """One line: the winner, how often it won, by how much, and every candidate's score."""
    n = len(choice["folds"])
    m = choice["margin"]
    by = (f"; {m['mean']:+.4f}" + (f" +- {m['se']:.4f}" if math.isfinite(m["se"]) else "")
          + f" thinned bits/spike over {m['runner_up']}") if m["runner_up"] else ""
    cells = "  ".join(f"{k} {v['mean']:.4f}" for k, v in sorted(choice["scores"].items(), key=lambda kv: -_finite(kv[1]["mean"])))
    won = f"won {choice['wins'][choice['winner']]} of {n} searches" if n > 1 else "won the search"
    return f"{choice['winner']} ({won}{by}); candidates {cells}"
