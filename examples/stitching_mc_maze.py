"""Stitching on real data: MC_Maze_Small pseudo-sessions, within- and cross-session co-smoothing, few-shot.

    python examples/stitching_mc_maze.py --quick --out runs/stitching-mc-maze-quick   # smoke run (< 1 min)
    python examples/stitching_mc_maze.py --out runs/stitching-mc-maze --seeds 0,1,2    # docs/stitching.md

Data: the 75 TRAINING trials of MC_Maze_Small (tests/data, phase val; the 25 validation trials are never
read), summed into 20 ms bins (35 bins from -250 to +450 ms around movement onset; the forward bins are
not used). All 142 neurons (107 NLB held-in, 35 NLB held-out) were recorded on every training trial, so
any neuron's real spikes can score a prediction.

Pseudo-sessions (per seed): the 75 trials are split at random into 3 disjoint groups of 25; each group
is one session seen through its own random 100 of the 142 neurons (``--units``; pairs of sessions share
about 70 of them), of which a random 25 are the session's held-out units and 75 its held-in units (what
its read-in reads). No trial is in two sessions.

Within-session co-smoothing (``--folds`` K-fold over each session's 25 trials; per fold every session's
other trials train, a fifth of them pick the checkpoint by their ELBO): ONE stitched model of the three
sessions (:func:`~pyro_langevin.stitching.train_stitched`; PCR read-ins from the fitting trials' reach
directions, kept fixed, the project's default with condition labels) against one model per session, and
the smoothing baseline (NLB's 60 ms kernel for MC_Maze_Small; Poisson GLM, its penalty chosen by 3-fold CV)
fitted on the session's training trials. Score: bits/spike of the session's held-out units on its test trials.

Cross-session co-smoothing (same fits): the latents inferred from session A's held-in units on A's test
trials predict session B's units through B's read-out; bits/spike against the real spikes of A's test
trials, on B's units that A's read-in did not read (``new``) and on those A never recorded (``unseen``).
Baseline (``overlap``): the smoothing GLM fitted on B's training trials from the units A's read-in reads
that B also recorded, to B's scored units; ``oracle``: the same GLM fitted on A's training trials from
A's held-in units to B's scored units (spikes a real session A would not have: a reference, not a
baseline a lab could run).

Velocity: ridge (:func:`~pyro_langevin.dynamics.ridge_decode`) from posterior-mean latents [z, v] to hand
velocity, every bin a sample, scored on a session's test trials: ONE decoder fitted on the other two
sessions' training trials (``cross``), one fitted on all three sessions' training trials (``pooled``),
and the session's own decoder (``own``); for the stitched and the separate latents, and from the
session's smoothed held-in spikes (``own``, 60 ms kernel).

Few-shot (``--few-shot``, per seed): session ``seed % 3`` is held out; a stitched model of the other two
(all their 50 trials) is fitted; the held-out session's trials are split into 5 test trials and 20
others, of which the first k (k in ``--few-shot``, nested) train only its new read-in and read-out with
the shared parts frozen (:func:`~pyro_langevin.stitching.train_added`); against a model from scratch on
the same k trials and the smoothing baseline on the same k trials; co-bps on the 5 test trials.

Writes ``stitching_mc_maze.json`` (every number, per seed, fold and session, and summaries: mean, s.d.
and s.e. over the seed x fold x session cells, and paired differences) and ``stitching_mc_maze.png``
to ``--out``; prints a one-line JSON. Nothing is selected on what is scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from pyro_langevin.baseline import smoothing_baseline
from pyro_langevin.batch import Batch, make_batch
from pyro_langevin.console import Session, run_command
from pyro_langevin.data.splits import kfold_indices, split_train_valid
from pyro_langevin.dynamics import reach_direction, ridge_decode
from pyro_langevin.metrics import bits_per_spike
from pyro_langevin.options import (ArgumentParser, OptionError, add_run_arguments, add_spec_arguments, check_run_options,
                                   spec_overrides)
from pyro_langevin.posterior import posterior_means
from pyro_langevin.smoothing import smooth_spikes
from pyro_langevin.spec import RunSpec, build
from pyro_langevin.stitching import embed_session, train_added, train_stitched
from pyro_langevin.training import fit

ROOT = Path(__file__).resolve().parents[1]
BIN_MS = 20
#: The smoothing baseline's kernel (nlb_tools' value for MC_Maze_Small); its GLM penalty is chosen on the
#: fitting trials (:func:`~pyro_langevin.baseline.smoothing_baseline`'s default): NLB's 0.1 (tuned on 75
#: trials at 5 ms) overfits the 17 trials of a pseudo-session badly (-0.97 bits/spike in a check).
KERNEL_MS = 60.0
#: Ridge penalties of the velocity decoders, chosen by 3-fold cross-validation over the fitting TRIALS
#: (sklearn RidgeCV's leave-one-row-out picks too small a penalty on time-correlated rows).
DECODE_ALPHAS = np.logspace(-2, 5, 8)
#: Reach direction (8 sectors) from the mean hand velocity 0-300 ms after movement onset (bins 13-27 of
#: the -250..+450 ms window at 20 ms): the condition labels of the PCR read-ins.
REACH_BINS = (13, 28)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/stitching_mc_maze.py", description=__doc__.split("\n")[0])
    add_run_arguments(p, "stitching-mc-maze", "training epochs of every fit (default 300, quick 3)",
                      "tiny model, 3 epochs, one seed, 2 folds, few-shot k=5")
    add_spec_arguments(p, "pyro_langevin.spec.RunSpec")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: pseudo-session draws (default: --seed)")
    p.add_argument("--folds", type=int, default=None, help="folds over each session's 25 trials (default 3, quick 2)")
    p.add_argument("--units", type=int, default=100, help="neurons each pseudo-session sees, of 142 (default 100)")
    p.add_argument("--heldout", type=int, default=25, help="of which held out within the session (default 25)")
    p.add_argument("--readin-init", choices=("pcr", "random"), default="pcr",
                   help="stitched read-ins: PCR from the fitting trials' reach directions, kept fixed (default), "
                        "or random and trained")
    p.add_argument("--few-shot", default=None, metavar="K,K,...",
                   help="k values of the few-shot study (default 5,10,20; quick 5; 'none' skips it)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "tests" / "data",
                   help="folder holding mc_maze_small-05ms-val/ (default: the repository's tests/data)")
    return p.parse_args(argv)


# ----- data and pseudo-sessions --------------------------------------------------------------------
def load_training_trials(data_dir: Path) -> Dict[str, np.ndarray]:
    """MC_Maze_Small's 75 training trials at 20 ms: ``counts`` (75, 35, 142), every neuron (NLB held-in then
    held-out), observed bins only; ``velocity`` (75, 35, 2) hand velocity in mm/s (bin means)."""
    from pyro_langevin.nlb.coarse import coarsen_batch
    from pyro_langevin.nlb.data import load_nlb

    train = coarsen_batch(load_nlb("mc_maze_small", data_dir, bin_ms=5, phase="val").train, BIN_MS // 5)
    t = train.n_observed_bins
    if not bool(train.mask[:, :t].all()):
        raise OptionError(f"--data-dir {data_dir}: the training trials must have every neuron observed")
    return {"counts": train.target[:, :t].numpy().astype(np.float64), "velocity": train.behavior.numpy().astype(np.float64)}


@dataclass(frozen=True)
class PseudoSession:
    """One pseudo-session: its trials (rows of the 75 training trials) and neurons (of the 142)."""

    name: str
    trials: np.ndarray
    heldin: np.ndarray
    heldout: np.ndarray

    @property
    def units(self) -> np.ndarray:
        """Its neurons in its own order: held-in, then held-out."""
        return np.concatenate([self.heldin, self.heldout])

    def batch(self, counts: np.ndarray, rows: Sequence[int]) -> Batch:
        """Its trials ``rows`` (positions in ``trials``) as its own batch (held-in, held-out units; index = rows)."""
        x = counts[self.trials[np.asarray(rows)]]
        return make_batch(x[:, :, self.heldin], x[:, :, self.heldout], index=np.asarray(rows))


def make_pseudo_sessions(n_trials: int, n_neurons: int, n_sessions: int, n_units: int, n_heldout: int,
                         seed: int) -> List[PseudoSession]:
    """``n_sessions`` disjoint random trial groups, each seen through its own random ``n_units`` neurons,
    ``n_heldout`` of them held out (all sorted)."""
    if not 0 < n_heldout < n_units <= n_neurons:
        raise OptionError(f"--units {n_units}, --heldout {n_heldout}: need 0 < heldout < units <= {n_neurons}")
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(n_trials), n_sessions)
    out = []
    for s, trials in enumerate(groups):
        units = rng.choice(n_neurons, n_units, replace=False)
        out.append(PseudoSession(f"s{s}", np.sort(trials), np.sort(units[n_heldout:]), np.sort(units[:n_heldout])))
    return out


def describe(sessions: Sequence[PseudoSession]) -> Dict[str, Any]:
    """The sessions' trials and neurons, and each pair's shared neurons (all and held-in)."""
    return {"sessions": [{"name": s.name, "trials": s.trials.tolist(), "heldin": s.heldin.tolist(),
                          "heldout": s.heldout.tolist()} for s in sessions],
            "shared_units": {f"{a.name}-{b.name}": int(len(np.intersect1d(a.units, b.units)))
                             for i, a in enumerate(sessions) for b in sessions[i + 1:]},
            "shared_heldin": {f"{a.name}-{b.name}": int(len(np.intersect1d(a.heldin, b.heldin)))
                              for i, a in enumerate(sessions) for b in sessions[i + 1:]},
            "units_in_no_session": int(142 - len(np.unique(np.concatenate([s.units for s in sessions]))))}


# ----- posteriors and scores -----------------------------------------------------------------------
def posterior(model, guide, batch: Batch, device, n_samples: int) -> Dict[str, np.ndarray]:
    """Posterior-mean ``rates`` (trial, time, layout column) and latents [z, v] of ``batch``'s trials."""
    post = posterior_means(model, guide, batch.to(device), sites=("rates", "z", "v"), n_samples=n_samples)
    return {"rates": post["rates"].numpy(), "latents": np.concatenate([post["z"].numpy(), post["v"].numpy()], -1)}


def cross_rates(post: Dict[str, np.ndarray], layout, target: str) -> np.ndarray:
    """Rates of session ``target``'s units (its own order) for the trials of ``post`` (another session's trials
    in ``layout``): the latents inferred from their own session's units through ``target``'s read-out."""
    return post["rates"][:, :, layout.columns(layout.position(target))]


def co_bps(rates: np.ndarray, spikes: np.ndarray) -> float:
    return float(bits_per_spike(rates, spikes))


def glm_rates(counts: np.ndarray, fit_trials: np.ndarray, eval_trials: np.ndarray, inputs: np.ndarray,
              targets: np.ndarray, alpha: Optional[float] = None) -> np.ndarray:
    """The smoothing baseline (NLB's kernel; GLM penalty ``alpha``, default chosen on ``fit_trials``) from neurons ``inputs`` to ``targets``, its GLM
    fitted on ``fit_trials`` (rows of ``counts``); rates of ``targets`` on ``eval_trials``."""
    fit_b = make_batch(counts[fit_trials][:, :, inputs], counts[fit_trials][:, :, targets])
    eval_b = make_batch(counts[eval_trials][:, :, inputs], n_heldout=len(targets))
    return smoothing_baseline(fit_b, eval_b, BIN_MS, KERNEL_MS, alpha).eval[:, :, len(inputs):]


def reach_labels(velocity: np.ndarray, sessions: Sequence[PseudoSession]) -> Dict[str, List[str]]:
    """Each session's trials' reach direction (PCR condition labels), by trial row."""
    return {s.name: [f"d{d}" for d in reach_direction(velocity[s.trials], *REACH_BINS)] for s in sessions}


def decode(x_fit: Sequence[np.ndarray], y_fit: Sequence[np.ndarray], x_test: np.ndarray, y_test: np.ndarray) -> float:
    """R^2 on the test trials of a ridge map fitted on the fitting trials (every bin a sample,
    :func:`~pyro_langevin.dynamics.ridge_decode`), its penalty (:data:`DECODE_ALPHAS`) chosen by 3-fold
    cross-validation over the fitting TRIALS (sklearn ``GridSearchCV`` with ``GroupKFold``)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.concatenate(x_fit), np.concatenate(y_fit)
    groups = np.repeat(np.arange(len(x)), x.shape[1])
    search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": DECODE_ALPHAS}, cv=GroupKFold(3))
    search.fit(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), groups=groups)
    return float(ridge_decode(x, y, x_test, y_test, [search.best_params_["ridge__alpha"]]).r2)


# ----- the studies ---------------------------------------------------------------------------------
def fit_separate(spec: RunSpec, batch: Batch, device, progress: bool):
    """``(model, guide, best_epoch)``: one model of ``spec`` on one session (a fifth of ``batch`` picks the
    checkpoint by its ELBO)."""
    fit_part, valid = split_train_valid(batch, 0.2, spec.fit.seed)
    model, guide = build(spec, batch.n_neurons, batch.n_heldin)
    result = fit(model, guide, fit_part, valid, spec.fit, device=device, progress=progress)
    return model, guide, result.best_epoch


def one_fold(data, sessions: Sequence[PseudoSession], test_rows: np.ndarray, spec: RunSpec, args, device) -> Dict[str, Any]:
    """Within-session, cross-session and velocity scores of one fold (``test_rows`` of every session)."""
    counts, velocity, n = data["counts"], data["velocity"], args.n_samples
    names = [s.name for s in sessions]
    n_trials = len(sessions[0].trials)
    train_rows = np.setdiff1d(np.arange(n_trials), test_rows)
    train = [s.batch(counts, train_rows) for s in sessions]
    test = [s.batch(counts, test_rows) for s in sessions]
    labels = reach_labels(velocity, sessions) if args.readin_init == "pcr" else None
    t0 = time.perf_counter()
    model, guide, layout, result = train_stitched(spec, train, names, n_trials=[n_trials] * len(sessions),
                                                  readin_dim=args.readin_dim, train_readin=labels is None,
                                                  labels=labels, device=device, progress=not args.no_progress)
    seconds = {"stitched": round(time.perf_counter() - t0, 1)}
    best = {"stitched": result.best_epoch}
    stitched_test = [posterior(model, guide, embed_session(b, layout, s.name), device, n) for s, b in zip(sessions, test)]
    stitched_train = [posterior(model, guide, embed_session(b, layout, s.name), device, n)["latents"]
                      for s, b in zip(sessions, train)]
    t0 = time.perf_counter()
    separate = [fit_separate(spec, b, device, not args.no_progress) for b in train]
    seconds["separate"] = round(time.perf_counter() - t0, 1)
    best["separate"] = [e for _, _, e in separate]
    separate_test = [posterior(m, g, b, device, n) for (m, g, _), b in zip(separate, test)]
    separate_train = [posterior(m, g, b, device, n)["latents"] for (m, g, _), b in zip(separate, train)]

    within, cross, vel = [], [], []
    for i, s in enumerate(sessions):
        spikes = counts[s.trials[test_rows]]
        held = spikes[:, :, s.heldout]
        k = len(s.heldin)
        smooth = glm_rates(counts, s.trials[train_rows], s.trials[test_rows], s.heldin, s.heldout, args.glm_alpha)
        within.append({"session": s.name,
                       "stitched": co_bps(stitched_test[i]["rates"][:, :, layout.columns(i)][:, :, k:], held),
                       "separate": co_bps(separate_test[i]["rates"][:, :, k:], held),
                       "smoothing": co_bps(smooth, held)})
        for j, b in enumerate(sessions):
            if i == j:
                continue
            new = ~np.isin(b.units, s.heldin)  # B's units that A's read-in did not read
            unseen = ~np.isin(b.units, s.units)  # B's units that A never recorded
            rates = cross_rates(stitched_test[i], layout, b.name)
            inputs = np.intersect1d(s.heldin, b.units)  # what A's trials show of B's units
            overlap = glm_rates(counts, b.trials[train_rows], s.trials[test_rows], inputs, b.units[new], args.glm_alpha)
            oracle = glm_rates(counts, s.trials[train_rows], s.trials[test_rows], s.heldin, b.units[new], args.glm_alpha)
            truth = spikes[:, :, b.units[new]]
            in_new = unseen[new]
            record = {"source": s.name, "target": b.name, "n_new": int(new.sum()), "n_unseen": int(unseen.sum()),
                      "n_overlap_inputs": int(len(inputs))}
            for part, cols in (("new", np.ones(int(new.sum()), bool)), ("unseen", in_new)):
                record[part] = {"stitched": co_bps(rates[:, :, new][:, :, cols], truth[:, :, cols]),
                                "overlap_smoothing": co_bps(overlap[:, :, cols], truth[:, :, cols]),
                                "oracle_smoothing": co_bps(oracle[:, :, cols], truth[:, :, cols])}
            cross.append(record)
        y_train, y_test = velocity[s.trials[train_rows]], velocity[s.trials[test_rows]]
        others = [j for j in range(len(sessions)) if j != i]
        ys_other = [velocity[sessions[j].trials[train_rows]] for j in others]
        smoothed = lambda rows: smooth_spikes(counts[s.trials[rows]][:, :, s.heldin], KERNEL_MS / BIN_MS)  # noqa: E731
        row = {"session": s.name, "smoothed_spikes_own": decode([smoothed(train_rows)], [y_train], smoothed(test_rows), y_test)}
        for recipe, lat_train, lat_test in (("stitched", stitched_train, [p["latents"] for p in stitched_test]),
                                            ("separate", separate_train, [p["latents"] for p in separate_test])):
            row[recipe] = {"own": decode([lat_train[i]], [y_train], lat_test[i], y_test),
                           "cross": decode([lat_train[j] for j in others], ys_other, lat_test[i], y_test),
                           "pooled": decode(lat_train, [velocity[x.trials[train_rows]] for x in sessions], lat_test[i],
                                            y_test)}
        vel.append(row)
    return {"test_rows": test_rows.tolist(), "seconds": seconds, "best_epoch": best, "within": within, "cross": cross, "velocity": vel}


def few_shot(data, sessions: Sequence[PseudoSession], seed: int, ks: Sequence[int], spec: RunSpec, args, device) -> Dict[str, Any]:
    """Session ``seed % 3`` added with k trials to a stitched fit of the others, against from scratch and smoothing."""
    counts, velocity, n = data["counts"], data["velocity"], args.n_samples
    new = sessions[seed % len(sessions)]
    others = [s for s in sessions if s.name != new.name]
    n_trials = len(new.trials)
    labels = reach_labels(velocity, others) if args.readin_init == "pcr" else None
    model, guide, _, result = train_stitched(spec, [s.batch(counts, np.arange(n_trials)) for s in others],
                                             [s.name for s in others], n_trials=[len(s.trials) for s in others],
                                             readin_dim=args.readin_dim, train_readin=labels is None, labels=labels,
                                             device=device, progress=not args.no_progress)
    order = np.random.default_rng(seed + 1000).permutation(n_trials)
    test_rows, pool = np.sort(order[:5]), order[5:]
    test = new.batch(counts, test_rows)
    held = counts[new.trials[test_rows]][:, :, new.heldout]
    k_in = len(new.heldin)
    out = []
    for k in ks:
        rows = pool[:min(k, len(pool))]
        trials = new.batch(counts, rows)
        grown, grown_guide, layout, added_fit = train_added(spec, model, guide, new.name, trials, n_trials,
                                                            device=device, progress=not args.no_progress)
        added = posterior(grown, grown_guide, embed_session(test, layout, new.name), device, n)["rates"]
        added = added[:, :, layout.columns(layout.position(new.name))][:, :, k_in:]
        m, g, scratch_epoch = fit_separate(spec, trials, device, not args.no_progress)
        scratch = posterior(m, g, test, device, n)["rates"][:, :, k_in:]
        smooth = glm_rates(counts, new.trials[rows], new.trials[test_rows], new.heldin, new.heldout, args.glm_alpha)
        out.append({"k": int(len(rows)), "rows": np.sort(rows).tolist(), "added": co_bps(added, held), "scratch": co_bps(scratch, held),
                    "smoothing": co_bps(smooth, held),
                    "best_epoch": {"added": added_fit.best_epoch, "scratch": scratch_epoch}})
    return {"session": new.name, "test_rows": test_rows.tolist(), "stitched_best_epoch": result.best_epoch, "by_k": out}


# ----- summaries -----------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=float)
    sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "sd": sd, "se": sd / np.sqrt(len(v)), "n": int(len(v))}


def summarize(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean, s.d. and s.e. over every (seed, fold, session) cell, and paired differences."""
    folds = [f for r in results for f in r["folds"]]
    within = [w for f in folds for w in f["within"]]
    cross = [c for f in folds for c in f["cross"]]
    vel = [v for f in folds for v in f["velocity"]]
    out: Dict[str, Any] = {"within": {k: spread([w[k] for w in within]) for k in ("stitched", "separate", "smoothing")}}
    out["within"]["stitched_minus_separate"] = spread([w["stitched"] - w["separate"] for w in within])
    out["within"]["stitched_minus_smoothing"] = spread([w["stitched"] - w["smoothing"] for w in within])
    out["cross"] = {}
    for part in ("new", "unseen"):
        cells = {k: spread([c[part][k] for c in cross]) for k in ("stitched", "overlap_smoothing", "oracle_smoothing")}
        cells["stitched_minus_overlap_smoothing"] = spread([c[part]["stitched"] - c[part]["overlap_smoothing"] for c in cross])
        out["cross"][part] = cells
    out["velocity"] = {"smoothed_spikes_own": spread([v["smoothed_spikes_own"] for v in vel])}
    for recipe in ("stitched", "separate"):
        out["velocity"][recipe] = {k: spread([v[recipe][k] for v in vel]) for k in ("own", "cross", "pooled")}
    shots = [s for r in results if r.get("few_shot") for s in r["few_shot"]["by_k"]]
    if shots:
        out["few_shot"] = {}
        for k in sorted({s["k"] for s in shots}):
            mine = [s for s in shots if s["k"] == k]
            out["few_shot"][str(k)] = {**{m: spread([s[m] for s in mine]) for m in ("added", "scratch", "smoothing")},
                                       "added_minus_scratch": spread([s["added"] - s["scratch"] for s in mine])}
    return out


def run(args: argparse.Namespace, session: Session) -> dict:
    epochs = args.epochs or (3 if args.quick else 300)
    sizes = ({"model.latent_dim": 4, "model.d_model": 16, "model.n_heads": 2, "model.dim_feedforward": 16,
              "guide.hidden": 16} if args.quick else
             {"model.latent_dim": 16, "model.d_model": 32, "model.n_heads": 2, "model.dim_feedforward": 64,
              "guide.hidden": 64})
    # the NLB 20 ms recipe for MC_Maze_Small (pyro_langevin.nlb.config), at a size 2 CPU cores allow
    spec = RunSpec().override({**sizes, "guide.name": "gru", "guide.dropout": 0.2, "model.dropout": 0.2,
                               "model.dt": 0.2, "model.gamma": 3.993, "fit.epochs": epochs, "fit.batch_size": 16,
                               "fit.lr": 5e-3, "fit.kl_final": 0.1, "fit.kl_ramp": 0.25, "fit.weight_decay_ramp": 0.25,
                               "fit.cd_keep": 0.5, "fit.shift_std": 3.0, "fit.val_every": 1 if args.quick else 5})
    spec = spec.override(spec_overrides(args, spec))
    opts = session.options = check_run_options(args, "stitching-mc-maze")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    n_folds = args.folds or (2 if args.quick else 3)
    shots = args.few_shot or ("5" if args.quick else "5,10,20")
    ks = [] if shots == "none" else [int(k) for k in shots.split(",")]
    args.n_samples = 5 if args.quick else 20
    args.readin_dim = 8 if args.quick else 32
    args.glm_alpha = 1.0 if args.quick else None  # quick: no penalty search (a smoke run's seconds)
    data = load_training_trials(args.data_dir)
    n_trials, _, n_neurons = data["counts"].shape
    results, t0 = [], time.perf_counter()

    def write() -> Dict[str, Any]:  # after every fit: an interrupted run keeps what it finished
        metrics = {"quick": args.quick, "epochs": epochs, "seeds": seeds, "folds": n_folds, "bin_ms": BIN_MS,
                   "units": args.units, "heldout": args.heldout,
                   "readin": {"init": args.readin_init, "dim": args.readin_dim, "trained": args.readin_init != "pcr"},
                   "posterior_draws": args.n_samples, "summary": summarize(results), "results": results,
                   "seconds": round(time.perf_counter() - t0, 1), "spec": spec.to_dict()}
        (opts.out / "stitching_mc_maze.json").write_text(json.dumps(metrics, indent=1))
        return metrics

    # every seed's cross-validation first, then every seed's few-shot study
    sessions = {seed: make_pseudo_sessions(n_trials, n_neurons, 3, args.units, args.heldout, seed) for seed in seeds}
    for seed in seeds:
        results.append({"seed": seed, **describe(sessions[seed]), "folds": []})
        for f, test_rows in enumerate(kfold_indices(len(sessions[seed][0].trials), n_folds, seed)):
            print(f"== seed {seed} fold {f}", file=sys.stderr, flush=True)
            results[-1]["folds"].append(one_fold(data, sessions[seed], test_rows,
                                                 spec.override({"fit.seed": seed * 100 + f}), args, opts.device))
            metrics = write()
    for record in results if ks else []:
        print(f"== seed {record['seed']} few-shot", file=sys.stderr, flush=True)
        record["few_shot"] = few_shot(data, sessions[record["seed"]], record["seed"], ks,
                                      spec.override({"fit.seed": record["seed"]}), args, opts.device)
        metrics = write()
    plot(metrics, opts.out / "stitching_mc_maze.png")
    print(json.dumps({"out": str(opts.out), "seconds": metrics["seconds"]}))
    return metrics


def plot(metrics: dict, path) -> None:
    """Within-session co-bps per recipe, cross-session co-bps, velocity R^2 and few-shot co-bps (mean +- s.d.)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = metrics["summary"]
    panels = [("within-session co-bps", {k: s["within"][k] for k in ("stitched", "separate", "smoothing")}),
              ("cross-session co-bps (B's units A did not read)",
               {"stitched": s["cross"]["new"]["stitched"], "overlap\nsmoothing": s["cross"]["new"]["overlap_smoothing"],
                "oracle\nsmoothing": s["cross"]["new"]["oracle_smoothing"]}),
              ("velocity R^2 (test trials)", {f"{r}\n{k}": s["velocity"][r][k] for r in ("stitched", "separate")
                                              for k in ("own", "cross")})]
    fig, axes = plt.subplots(1, 4 if "few_shot" in s else 3, figsize=(16, 3.8))
    for ax, (title, cells) in zip(axes, panels):
        ax.bar(range(len(cells)), [c["mean"] for c in cells.values()], yerr=[c["sd"] for c in cells.values()],
               color=[f"C{i}" for i in range(len(cells))], capsize=3)
        ax.set_xticks(range(len(cells)), list(cells), fontsize=8)
        ax.set_title(title, fontsize=9)
    if "few_shot" in s:
        ax = axes[3]
        ks = sorted(int(k) for k in s["few_shot"])
        for m in ("added", "scratch", "smoothing"):
            ax.errorbar(ks, [s["few_shot"][str(k)][m]["mean"] for k in ks], [s["few_shot"][str(k)][m]["sd"] for k in ks],
                        marker="o", capsize=3, label=m)
        ax.set_xlabel("k trials of the new session")
        ax.set_title("few-shot co-bps (5 test trials)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("MC_Maze_Small pseudo-sessions (mean +- s.d.)" + (" (--quick: smoke run, not evidence)"
                                                                    if metrics["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return run_command(lambda session: run(parse_args(argv), session), "examples/stitching_mc_maze.py")


if __name__ == "__main__":
    sys.exit(main())
