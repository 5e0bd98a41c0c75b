"""Weigh priors by held-out evidence: fit two or three priors with one guide and budget, then rank them
by the importance-sampled log evidence of trials the fits never used (``pyro_langevin.evidence``).

Datasets (``--datasets``):

* ``lorenz``: the synthetic Lorenz population of ``examples/ablate_guides.py`` (40 conditions x 8
  trials, 50 bins, 30 neurons of which 5 held out), the GRU guide, 40 epochs, latent 8. The fit
  trains on the 256 training trials and selects its checkpoint on half of the 64 validation
  trials; the evidence is computed on the other 32, which are also scored by co-bps (the 5
  held-out neurons given the held-in spikes) and rate R^2 to the true rates of posterior-mean
  rates (bias-free). ``--lorenz-seeds N`` repeats this N times, each with a new data draw and fit
  (seed ``--seed + i`` as Lorenz "fold" i): replicates for a fit-level spread.
* ``mc_maze_small``: real MC_Maze_Small, TRAINING trials only (75, phase val; the 25 validation
  trials are never read), summed into 20 ms bins, with the NLB 20 ms single-model configuration
  (``default_config("mc_maze_small", 20)`` with ``eval.n_models=1``: bidirectional GRU guide,
  latent 32, temporal shift and coordinated dropout in training). ``--folds K`` splits the 75
  trials into K folds; for fold f the fit trains on the other trials (a fifth of them held-in only,
  selecting the checkpoint on co-bps) and the evidence is computed on fold f's trials, which enter
  no fit. Pooling the folds gives every training trial one out-of-fold estimate.

Priors (``--priors``): ``oscillators`` (the default coupled-oscillator potential), ``zero`` (free
particle) and ``mlp`` (a learned MLP potential); same guide, budget and seed for each.

For every fit the evidence is computed with K guide draws per trial (``--particles``) for two
quantities from the same draws: ``joint`` (log p(x) of all of a trial's counts: the number to
compare priors with) and ``heldout`` (log p(held-out neurons and forward bins | held-in spikes):
co-smoothing and forward prediction together). For MC_Maze_Small each fold's held-out trials are
also scored by co-bps and fp-bps of posterior-mean rates (bias-free; ``score_spread`` in the summary
gives the per-fold differences to the oscillators, mean +- s.e. over folds; on Lorenz co-bps and
rate R^2 per seed). ``--k-trend 250,1000,4000`` rescores the fold-0 fits of every prior
(reloaded from their ``best.pt``) with each K, so one sees whether the totals and their differences
still move with K (``k_trend.json`` and a table). That cannot show how far the IWAE still is from
log p(x): ``--ais S`` rescores the fold-0 fits of every prior with annealed importance sampling
(S temperatures, ``--ais-chains`` chains) on the first ``--ais-trials`` held-out trials, beside the
IWAE of the same trials (AIS - IWAE is a lower bound of the IWAE's bias on real trials), and runs
bidirectional Monte Carlo on as many trials simulated from each fitted model (the AIS schedule's
gap, and the IWAE's bias bracket at K): ``ais.json`` and ``ais.md``, which also give the oscillators
minus each prior by AIS and by the IWAE per fold and mean +- s.e. over folds (``--ais-folds``; with
``--resume`` the rows of an earlier run are kept and only new fits or settings are run, so folds
can be added in later runs). ``--fit-folds 0`` fits only the listed folds (e.g. for ``--ais`` alone).

Outputs in ``--out``: ``results.json`` (per-trial numbers of every fit, written after each),
``compare.csv`` (one row per dataset, fold, quantity and model, and pooled rows with fold
``all``: ``model, elpd, se, d_elpd, dse, khat_max, frac_khat_gt_0_7`` and more), ``compare.png``
(pooled comparison per dataset) and ``table.md``.

Run::

    python examples/compare.py --quick                     # smoke run: runs/compare-quick
    python examples/compare.py                             # ~40 min on 2 CPU cores: runs/compare
    python examples/compare.py --datasets mc_maze_small --folds 3 --particles 1000 --data-dir /path/to/data
    python examples/compare.py --datasets mc_maze_small --fit-folds 0 --ais 200 --ais-trials 8  # AIS + BDMC
    python examples/compare.py --datasets lorenz --lorenz-seeds 3      # co-bps, rate R^2, evidence: 3 seeds

The last line printed is a JSON summary. An ``--out`` holding an earlier run needs ``--resume``
(keep its finished fits; an interrupted fit continues from its ``last.pt``) or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from pyro_langevin.atomic import atomic_path
from pyro_langevin.batch import Batch
from pyro_langevin.console import Session, run_command
from pyro_langevin.data.lorenz import LorenzData, make_lorenz
from pyro_langevin.data.splits import build_training_batch, kfold_indices, split_train_valid
from pyro_langevin.bdmc import bdmc
from pyro_langevin.evidence import Evidence, compare, compare_folds, format_compare, log_evidence
from pyro_langevin.metrics import rate_r2
from pyro_langevin.options import ArgumentParser, OptionError, add_run_arguments, check_run_options, positive_int
from pyro_langevin.plots import plot_evidence_compare
from pyro_langevin.posterior import posterior_rates
from pyro_langevin.scoring import score_local
from pyro_langevin.checkpoints import restore_checkpoint
from pyro_langevin.spec import RunSpec, build, run_meta
from pyro_langevin.training import fit

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("lorenz", "mc_maze_small")
#: Prior name -> dotted keys of the run spec.
PRIORS: dict[str, dict[str, Any]] = {
    "oscillators": {},
    "zero": {"model.potential": "zero"},
    "mlp": {"model.potential": "mlp"},
}
CSV_COLUMNS = ["dataset", "fold", "quantity", "model", "elpd", "se", "d_elpd", "dse", "khat_max", "frac_khat_gt_0_7",
               "rank", "warning", "elbo", "gap", "mc_se", "nats_per_spike", "bits_per_spike", "d_bits_per_spike",
               "n_trials", "num_particles"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/compare.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "compare", "epochs per fit (default: 40 on Lorenz, the NLB 20 ms budget on MC_Maze_Small; "
                      "quick 2)", "tiny networks, 2 epochs, 50 draws")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--priors", default=",".join(PRIORS), help=f"comma-separated subset of {','.join(PRIORS)}")
    p.add_argument("--folds", type=positive_int, default=None,
                   help="folds over the 75 MC_Maze_Small training trials (default 3, quick 2; at least 2)")
    p.add_argument("--lorenz-seeds", type=positive_int, default=1,
                   help="Lorenz replicates: data drawn and fitted with seeds --seed .. --seed + N - 1 (folds 0 .. N-1)")
    p.add_argument("--particles", type=positive_int, default=None, help="guide draws per trial K (default 1000, quick 50)")
    p.add_argument("--k-trend", default=None,
                   help="comma-separated K values: rescore each dataset's fold-0 fits with each (e.g. 250,1000,4000)")
    p.add_argument("--fit-folds", default=None,
                   help="comma-separated MC_Maze_Small folds to fit (default: all); the others are skipped")
    p.add_argument("--ais", type=positive_int, default=None,
                   help="AIS temperatures S: rescore each dataset's fold-0 fits by AIS and run BDMC (ais.json)")
    p.add_argument("--ais-trials", type=positive_int, default=8, help="held-out (and simulated) trials for --ais")
    p.add_argument("--ais-chains", type=positive_int, default=8, help="AIS chains per trial for --ais")
    p.add_argument("--ais-leapfrog", type=positive_int, default=5, help="leapfrog steps per HMC transition for --ais")
    p.add_argument("--ais-folds", default="0", help="comma-separated folds whose fits --ais rescores (default 0)")
    p.add_argument("--bdmc", action=argparse.BooleanOptionalAction, default=True,
                   help="with --ais, also run bidirectional Monte Carlo on simulated trials (default: on)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "tests" / "data",
                   help="folder holding mc_maze_small-05ms-val/ or the DANDI files (default: the repository's tests/data)")
    return p.parse_args(argv)


def names(text: str, known, option: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen:
        raise OptionError(f"{option}: unknown or no name(s) {unknown}; choose from {','.join(known)}")
    return chosen


@dataclass
class Task:
    """One fit: its training batch, selection batch, evidence batch and run spec."""

    dataset: str
    fold: int
    prior: str
    spec: RunSpec
    train: Batch
    select: Batch
    evidence: Batch
    metric_fn: Callable | None = None  # validation metrics during the fit
    score_fn: Callable | None = None  # scores of the evidence trials after it (default: metric_fn)

    @property
    def key(self) -> str:
        return f"{self.dataset}/fold{self.fold}/{self.prior}"


def lorenz_score(data: LorenzData, n_samples: int = 20, seed: int = 0) -> Callable[[Any, Any, Batch], dict[str, float]]:
    """Bias-free scores of Lorenz validation trials from posterior-mean rates (``n_samples`` seeded
    draws given the held-in spikes): ``co_bps`` (NLB's bits/spike of the held-out neurons) and
    ``rate_r2`` (R^2 to the true rates, every neuron, as in ``examples/ablate_guides.py``)."""
    true = dict(zip(data.valid.index.tolist(), data.valid_rates))

    def score(model, guide, batch: Batch) -> dict[str, float]:
        torch.manual_seed(seed)
        rates = posterior_rates(model, guide, batch, n_samples=n_samples).numpy()
        t = batch.n_observed_bins
        truth = np.stack([true[i] for i in batch.index.tolist()])
        return {"co_bps": score_local(rates, batch)["co-bps"], "rate_r2": rate_r2(truth[:, :t], rates[:, :t])}

    return score


def lorenz_tasks(args: argparse.Namespace, priors: list[str], epochs: int | None) -> list[Task]:
    """One fit per prior on Lorenz; selection and evidence on disjoint halves of the validation trials.
    Replicate i (``--lorenz-seeds``, recorded as fold i) draws the data and seeds the fit with ``--seed + i``."""
    tasks = []
    for i in range(args.lorenz_seeds):
        seed = args.seed + i
        if args.quick:
            data = make_lorenz(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12, n_heldout=3, seed=seed)
            latent, hidden, n_epochs = 4, 16, epochs or 2
        else:
            data = make_lorenz(n_conditions=40, trials_per_condition=8, n_bins=50, n_neurons=30, n_heldout=5, seed=seed)
            latent, hidden, n_epochs = 8, 64, epochs or 40
        perm = torch.as_tensor(np.random.default_rng(seed).permutation(data.valid.n_trials))
        half = data.valid.n_trials // 2
        select, evidence = data.valid[perm[:half].sort().values], data.valid[perm[half:].sort().values]
        base = RunSpec().override({
            "model.latent_dim": latent, "model.dt": 0.1, "guide.name": "gru", "guide.hidden": hidden,
            "fit.epochs": n_epochs, "fit.batch_size": 64, "fit.lr": 5e-3, "fit.weight_decay": 1e-5,
            "fit.kl_ramp": 0.25, "fit.weight_decay_ramp": 0.25, "fit.val_every": max(1, n_epochs // 10),
            "fit.seed": seed,
        })
        tasks += [Task("lorenz", i, p, base.override(PRIORS[p]), data.train, select, evidence,
                       score_fn=lorenz_score(data, seed=seed)) for p in priors]
    return tasks


def mc_maze_tasks(args: argparse.Namespace, priors: list[str], epochs: int | None, folds: int) -> list[Task]:
    """Fold f of the 75 training trials at 20 ms is scored by fits of every prior on the other folds."""
    from pyro_langevin.nlb.coarse import coarsen_batch
    from pyro_langevin.nlb.config import default_config
    from pyro_langevin.nlb.data import load_nlb
    from pyro_langevin.nlb.members import cobps_metric

    data = load_nlb("mc_maze_small", args.data_dir, bin_ms=5, phase="val")
    train20 = coarsen_batch(data.train, 4)  # training trials only; the validation trials are never read
    tasks = []
    for f, part in enumerate(kfold_indices(train20.n_trials, folds, args.seed)):
        if args.fit_folds is not None and f not in args.fit_folds:
            continue
        rest = torch.as_tensor(np.setdiff1d(np.arange(train20.n_trials), part))
        fit_trials, select = split_train_valid(train20[rest], 0.2, args.seed + f)
        for p in priors:
            cfg = default_config("mc_maze_small", 20, quick=args.quick, epochs=epochs,
                                 overrides={"eval.n_models": 1, **PRIORS[p]})
            cfg = cfg.override({"fit.seed": args.seed + f})
            tasks.append(Task("mc_maze_small", f, p, cfg, build_training_batch(fit_trials, [select]), select,
                              train20[torch.as_tensor(part)], cobps_metric(cfg.eval.select_draws, args.seed)))
    return tasks


def run_task(task: Task, args: argparse.Namespace, out: Path, device, particles: int) -> dict[str, Any]:
    """Fit the task's model and guide, then compute the evidence of its held-out trials."""
    spec = task.spec
    fit_cfg = spec.member_fit(spec.fit.seed) if hasattr(spec, "member_fit") else spec.fit
    model, guide = build(spec, task.train.n_neurons, task.train.n_heldin)
    ckpt = out / task.key / "checkpoints"
    last = ckpt / "last.pt"
    result = fit(model, guide, task.train, task.select, fit_cfg, device=device, metric_fn=task.metric_fn,
                 checkpoint_dir=ckpt, resume=last if args.resume and last.is_file() else None,
                 progress=not args.no_progress, meta=run_meta(spec, task.train.n_neurons, task.train.n_heldin))
    model.cpu()
    guide.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # k-hat is in the record and the table
        ev = log_evidence(model, guide, task.evidence, particles, quantity="heldout", seed=args.seed,
                          progress=not args.no_progress)
    # the bias-free predictive score of the same held-out trials: co-bps of posterior-mean rates
    score_fn = task.score_fn or task.metric_fn
    scores = score_fn(model, guide, task.evidence) if score_fn is not None else {}
    return {"scores": scores, "key": task.key, "dataset": task.dataset, "fold": task.fold, "prior": task.prior,
            "fit_seconds": result.seconds, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "evidence_seconds": ev.seconds, "n_fit_trials": task.train.n_trials, "n_evidence_trials": task.evidence.n_trials,
            "joint": ev.joint.to_dict(), "heldout": ev.to_dict()}


def k_trend(tasks: list[Task], ks: list[int], args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Each dataset's fold-0 fits, reloaded from ``best.pt``, scored with every K (joint quantity):
    the totals, and the paired difference of each prior to the best at each K."""
    rows = []
    for task in (t for t in tasks if t.fold == 0):
        model, guide = build(task.spec, task.train.n_neurons, task.train.n_heldin)
        restore_checkpoint(out / task.key / "checkpoints" / "best.pt", model, guide)
        for k in ks:
            print(f"== k-trend {task.key}: K={k}", file=sys.stderr, flush=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ev = log_evidence(model, guide, task.evidence, k, seed=args.seed + k, progress=not args.no_progress)
            rows.append({"dataset": task.dataset, "prior": task.prior, "K": k, "evidence": ev.to_dict(),
                         **{key: ev.summary()[key] for key in ("elpd_nats", "se_nats", "mc_se_nats", "khat_max",
                                                               "frac_khat_gt_0_7", "seconds")}})
    return rows


def format_k_trend(rows: list[dict[str, Any]]) -> str:
    """Per dataset and K: each prior's total and its paired difference to the best at that K."""
    lines = ["| dataset | K | " + " | ".join(["prior", "elpd", "d_elpd to best +- dse", "k>0.7", "seconds"]) + " |",
             "|" + "---|" * 7]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for k in sorted({r["K"] for r in rows if r["dataset"] == dataset}):
            mine = [r for r in rows if r["dataset"] == dataset and r["K"] == k]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                table = compare({r["prior"]: Evidence.from_dict(r["evidence"]) for r in mine})
            for prior, c in table.iterrows():
                sec = next(r["seconds"] for r in mine if r["prior"] == prior)
                lines.append(f"| {dataset} | {k} | {prior} | {c['elpd']:.1f} | {c['d_elpd']:.1f} +- {c['dse']:.1f} "
                             f"| {c['frac_khat_gt_0_7']:.2f} | {sec:.1f} |")
    return "\n".join(lines)


def _ais_setting(row: dict[str, Any]) -> tuple:
    """What makes two ``ais.json`` rows the same measurement: the fit, the trials and the schedule."""
    return tuple(row[k] for k in ("dataset", "fold", "prior", "trials", "steps", "chains", "leapfrog", "K"))


def ais_check(tasks: list[Task], args: argparse.Namespace, out: Path, particles: int,
              done: set[tuple] = frozenset()) -> list[dict[str, Any]]:
    """The fits of ``--ais-folds``, reloaded from ``best.pt``: AIS and the IWAE on the first
    ``--ais-trials`` held-out trials, and (``--bdmc``) BDMC on as many trials simulated from the fit.
    Settings in ``done`` (``_ais_setting``, from an earlier run) are skipped."""
    rows, options = [], {"num_leapfrog": args.ais_leapfrog}
    for task in (t for t in tasks if t.fold in args.ais_folds):
        trials = task.evidence[:args.ais_trials]
        setting = (task.dataset, task.fold, task.prior, trials.n_trials, args.ais, args.ais_chains, args.ais_leapfrog,
                   particles)
        if setting in done:
            print(f"== ais {task.key}: finished in the earlier run (kept)", file=sys.stderr, flush=True)
            continue
        model, guide = build(task.spec, task.train.n_neurons, task.train.n_heldin)
        restore_checkpoint(out / task.key / "checkpoints" / "best.pt", model, guide)
        print(f"== ais {task.key}: S={args.ais} on {trials.n_trials} trials", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            iwae = log_evidence(model, guide, trials, particles, seed=args.seed)
            ais = log_evidence(model, guide, trials, args.ais_chains, method="ais", num_steps=args.ais,
                               max_tiled=trials.n_trials * args.ais_chains, ais_options=options, seed=args.seed)
            check = bdmc(model, guide, trials, args.ais_chains, args.ais, iwae_particles=(particles,),
                         ais_options=options, seed=args.seed) if args.bdmc else None
        low, high = check.iwae_bias(particles) if check is not None else (np.full(1, np.nan), np.full(1, np.nan))
        rows.append({"dataset": task.dataset, "fold": task.fold, "prior": task.prior, "trials": trials.n_trials,
                     "steps": args.ais,
                     "chains": args.ais_chains, "leapfrog": args.ais_leapfrog, "K": particles,
                     "iwae": iwae.to_dict(), "ais": ais.to_dict(), "bdmc": None if check is None else check.summary(),
                     "iwae_total": iwae.total(), "ais_total": ais.total(),
                     "ais_minus_iwae": float(ais.total() - iwae.total()),
                     "ais_mc_se": float(np.sqrt(np.sum(ais.mc_se ** 2))),
                     "bdmc_gap_total": float(check.gap.sum()) if check is not None else float("nan"),
                     "sim_iwae_bias_total": [float(low.sum()), float(high.sum())],
                     "seconds": {"iwae": iwae.seconds, "ais": ais.seconds, **(check.seconds if check is not None else {})}})
    return rows


def format_ais(rows: list[dict[str, Any]]) -> str:
    """Per dataset and prior: IWAE and AIS totals on the real trials, and the BDMC numbers."""
    lines = ["| dataset | fold | prior | trials | S x C x L | IWAE (K) | AIS +- mc_se | AIS - IWAE | BDMC gap (sim.) "
             "| IWAE bias bracket (sim.) | AIS s |", "|" + "---|" * 11]
    for r in rows:
        lo, hi = r["sim_iwae_bias_total"]
        lines.append(f"| {r['dataset']} | {r.get('fold', 0)} | {r['prior']} | {r['trials']} | {r['steps']} x {r['chains']} x {r['leapfrog']} "
                     f"| {r['iwae_total']:.1f} ({r['K']}) | {r['ais_total']:.1f} +- {r['ais_mc_se']:.1f} "
                     f"| {r['ais_minus_iwae']:.1f} | {r['bdmc_gap_total']:.1f} | [{lo:.1f}, {hi:.1f}] "
                     f"| {r['seconds']['ais']:.0f} |")
    return "\n".join(lines)


def ais_spread(checks: list[dict[str, Any]], reference: str = "oscillators") -> list[dict[str, Any]]:
    """Per dataset and AIS setting: ``reference`` minus each other prior, by AIS and by the IWAE of the
    same trials, per fold (+- trial-level dse) and mean +- s.e. over folds (``compare_folds``; only
    folds holding every prior)."""
    groups: dict[tuple, dict[int, dict[str, dict[str, Any]]]] = {}
    for r in checks:
        setting = (r["dataset"], r["trials"], r["steps"], r["chains"], r["leapfrog"], r["K"])
        groups.setdefault(setting, {}).setdefault(r["fold"], {})[r["prior"]] = r
    out = []
    for (dataset, trials, steps, chains, leapfrog, k), by_fold in groups.items():
        priors = set().union(*by_fold.values())
        complete = {f: v for f, v in sorted(by_fold.items()) if set(v) == priors}
        if reference not in priors or len(priors) < 2 or not complete:
            continue
        for method in ("ais", "iwae"):
            table = compare_folds({f: {p: Evidence.from_dict(r[method]) for p, r in v.items()}
                                   for f, v in complete.items()}, reference)
            out += [{"dataset": dataset, "method": method, "trials": trials, "steps": steps, "chains": chains,
                     "leapfrog": leapfrog, "K": k, **row} for row in table.to_dict("records")]
    return out


def format_ais_spread(rows: list[dict[str, Any]]) -> str:
    """``ais_spread`` as a table: per fold d +- dse, and the mean +- s.e. over folds."""
    lines = ["| dataset | method | trials per fold | prior | fold | reference - prior (nats) |", "|" + "---|" * 6]
    for r in rows:
        method = "AIS" if r["method"] == "ais" else f"IWAE (K = {r['K']})"
        if r["fold"] == "mean":
            d = (f"**{r['d_elpd']:.1f} +- {r['se_folds']:.1f}** (s.e. over {int(r['n_folds'])} folds; "
                 f"{int(r['n_positive'])} ahead)")
        else:
            d = f"{r['d_elpd']:.1f} +- {r['dse']:.1f}"
        lines.append(f"| {r['dataset']} | {method} | {r['trials']} | {r['model']} | {r['fold']} | {d} |")
    return "\n".join(lines)


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OptionError(f"--resume: {path} is not JSON ({exc}); rerun with --overwrite") from None


def _pooled(evs: list[Evidence]) -> Evidence:
    """The evidence of several folds' disjoint trials as one set (each trial scored by a fit that never saw it)."""
    cat = lambda name: np.concatenate([getattr(e, name) for e in evs])  # noqa: E731
    return Evidence(trial=cat("trial"), log_evidence=cat("log_evidence"), elbo=cat("elbo"), khat=cat("khat"),
                    ess=cat("ess"), mc_se=cat("mc_se"), n_spikes=cat("n_spikes"), null_log_lik=cat("null_log_lik"),
                    num_particles=evs[0].num_particles, quantity=evs[0].quantity,
                    seconds=float(sum(e.seconds for e in evs)))


def tables(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The CSV frame (per fold and pooled) and the pooled joint comparison of each dataset."""
    frames, pooled_joint = [], {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        folds = sorted({r["fold"] for r in mine})
        priors = list(dict.fromkeys(r["prior"] for r in mine))
        complete = [f for f in folds if {r["prior"] for r in mine if r["fold"] == f} == set(priors)]
        for quantity in ("joint", "heldout"):
            ev = {(r["fold"], r["prior"]): Evidence.from_dict(r[quantity]) for r in mine}
            groups = {str(f): {p: ev[f, p] for p in priors} for f in complete}
            if len(complete) > 1:
                groups["all"] = {p: _pooled([ev[f, p] for f in complete]) for p in priors}
            for fold, models in groups.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    table = compare(models)
                if quantity == "joint" and (fold == "all" or len(groups) == 1):
                    pooled_joint[dataset] = table
                row = table.reset_index().assign(dataset=dataset, fold=fold, quantity=quantity)
                row.attrs = {}
                frames.append(row)
    frame = pd.concat(frames, ignore_index=True)[CSV_COLUMNS] if frames else pd.DataFrame(columns=CSV_COLUMNS)
    return frame, pooled_joint


def fold_spread(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Per dataset, quantity and prior: the d_elpd to the pooled best, per fold, with its mean and s.d."""
    out = []
    for (dataset, quantity), g in frame.groupby(["dataset", "quantity"], sort=False):
        pooled = g[g["fold"] == "all"]
        if pooled.empty:
            continue
        best = pooled.sort_values("rank")["model"].iloc[0]
        per_fold = g[g["fold"] != "all"]
        for model in pooled["model"]:
            diffs = []
            for _, fg in per_fold.groupby("fold"):
                elpd = fg.set_index("model")["elpd"]
                diffs.append(float(elpd[best] - elpd[model]))
            out.append({"dataset": dataset, "quantity": quantity, "model": model, "vs": best,
                        "d_elpd_per_fold": diffs, "mean": float(np.mean(diffs)),
                        "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan"),
                        "folds_best_ahead": int(sum(d > 0 for d in diffs))})
    return out


def score_spread(rows: list[dict[str, Any]], reference: str = "oscillators") -> list[dict[str, Any]]:
    """Per dataset, score (co-bps, fp-bps, rate R^2) and prior: the reference prior minus it on each
    fold's held-out trials, with the mean +- s.e. over folds (a fit-level error: each fold is its own
    fit; on Lorenz each "fold" is a seed, its own data draw and fit)."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset and r.get("scores")]
        by = {(r["fold"], r["prior"]): r["scores"] for r in mine}
        for score in ("co_bps", "fp_bps", "rate_r2"):
            for prior in dict.fromkeys(r["prior"] for r in mine if r["prior"] != reference):
                diffs = [by[f, reference][score] - by[f, prior][score] for f in sorted({r["fold"] for r in mine})
                         if (f, reference) in by and (f, prior) in by and score in by[f, prior]]
                if not diffs:
                    continue
                se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
                out.append({"dataset": dataset, "score": score, "reference": reference, "prior": prior,
                            "per_fold": diffs, "mean": float(np.mean(diffs)), "se_folds": se,
                            "folds_reference_ahead": int(sum(d > 0 for d in diffs))})
    return out


def run(args: argparse.Namespace, session: Session) -> dict[str, Any]:
    """Check the options, run every fit not yet finished, write the tables and figure."""
    datasets = names(args.datasets, DATASETS, "--datasets")
    priors = names(args.priors, PRIORS, "--priors")
    if len(priors) < 2:
        raise OptionError("--priors: give at least two priors to compare")
    folds = args.folds or (2 if args.quick else 3)
    if folds < 2:
        raise OptionError(f"--folds must be at least 2, got {folds}")
    particles = args.particles or (50 if args.quick else 1000)
    try:
        ks = [int(k) for k in args.k_trend.split(",") if k.strip()] if args.k_trend else []
    except ValueError:
        raise OptionError(f"--k-trend: expected comma-separated integers, got {args.k_trend!r}") from None
    if any(k < 1 for k in ks):
        raise OptionError(f"--k-trend: every K must be >= 1, got {args.k_trend!r}")
    try:
        args.ais_folds = sorted({int(f) for f in args.ais_folds.split(",") if f.strip()})
    except ValueError:
        raise OptionError(f"--ais-folds: expected comma-separated fold numbers, got {args.ais_folds!r}") from None
    if args.fit_folds is not None:
        try:
            args.fit_folds = sorted({int(f) for f in args.fit_folds.split(",") if f.strip()})
        except ValueError:
            raise OptionError(f"--fit-folds: expected comma-separated fold numbers, got {args.fit_folds!r}") from None
        if not args.fit_folds or any(not 0 <= f < folds for f in args.fit_folds):
            raise OptionError(f"--fit-folds: folds are 0 .. {folds - 1}, got {args.fit_folds}")
    opts = session.options = check_run_options(args, "compare")
    out, device = opts.out, opts.device
    if "mc_maze_small" in datasets and not args.data_dir.exists():
        raise OptionError(f"--data-dir {args.data_dir} does not exist")
    rows = load_rows(out / "results.json") if args.resume else []
    tasks = []
    if "lorenz" in datasets:
        tasks += lorenz_tasks(args, priors, args.epochs)
    if "mc_maze_small" in datasets:
        tasks += mc_maze_tasks(args, priors, args.epochs, folds)
    for i, task in enumerate(tasks):
        if any(r["key"] == task.key for r in rows):
            print(f"== {task.key}: finished in the earlier run (kept)", file=sys.stderr, flush=True)
            continue
        print(f"== [{i + 1}/{len(tasks)}] {task.key}: fit on {task.train.n_trials} trials, evidence on "
              f"{task.evidence.n_trials} held-out trials (K={particles})", file=sys.stderr, flush=True)
        session.interrupt_note = lambda: (f"interrupted during {task.key}; {len(rows)} finished fit(s) saved in "
                                          f"{out / 'results.json'}; rerun with --resume")
        rows.append(run_task(task, args, out, device, particles))
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps(rows))
    frame, pooled = tables(rows)
    frame.to_csv(out / "compare.csv", index=False)
    lines = []
    for dataset, table in pooled.items():
        lines += [f"## {dataset} (joint log evidence, K={particles}; pooled over folds)", "",
                  "```", format_compare(table), "```", ""]
    (out / "table.md").write_text("\n".join(lines))
    print("\n".join(lines), file=sys.stderr)
    trend: list[dict[str, Any]] = []
    if args.k_trend:
        path = out / "k_trend.json"
        trend = json.loads(path.read_text()) if args.resume and path.is_file() else []
        done = {(r["dataset"], r["prior"], r["K"]) for r in trend}
        todo = [k for k in ks if any((t.dataset, t.prior, k) not in done for t in tasks if t.fold == 0)]
        trend += [r for r in k_trend(tasks, todo, args, out) if (r["dataset"], r["prior"], r["K"]) not in done]
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(trend))
        text = format_k_trend(trend)
        (out / "k_trend.md").write_text(text + "\n")
        print(text, file=sys.stderr)
    checks: list[dict[str, Any]] = []
    spread: list[dict[str, Any]] = []
    if args.ais:
        checks = load_rows(out / "ais.json") if args.resume else []
        checks += ais_check(tasks, args, out, particles, done={_ais_setting(r) for r in checks})
        with atomic_path(out / "ais.json") as tmp:
            tmp.write_text(json.dumps(checks))
        spread = ais_spread(checks) if "oscillators" in priors else []
        text = format_ais(checks) + ("\n\n" + format_ais_spread(spread) if spread else "")
        (out / "ais.md").write_text(text + "\n")
        print(text, file=sys.stderr)
    figure = None
    if pooled:
        fig = plot_evidence_compare(pooled, title="priors weighed by held-out log evidence")
        figure = out / "compare.png"
        fig.savefig(figure, dpi=120, bbox_inches="tight")
    summary = {
        "out": str(out), "particles": particles, "folds": folds, "csv": str(out / "compare.csv"),
        "figure": None if figure is None else str(figure),
        "fits": [{k: r[k] for k in ("key", "fit_seconds", "best_epoch", "epochs_run", "evidence_seconds")} for r in rows],
        "k_trend": [{k: r[k] for k in r if k != "evidence"} for r in trend],
        "pooled": {d: t.reset_index()[["model", "elpd", "se", "d_elpd", "dse", "khat_max", "frac_khat_gt_0_7",
                                       "bits_per_spike"]].to_dict("records") for d, t in pooled.items()},
        "fold_spread": fold_spread(frame),
        "scores": [{k: r.get("scores", {}).get(k) for k in ("co_bps", "fp_bps", "rate_r2")} | {"key": r["key"]}
                   for r in rows],
        "score_spread": score_spread(rows) if "oscillators" in priors else [],
        "ais": [{k: r[k] for k in r if k not in ("iwae", "ais", "bdmc")} for r in checks],
        "ais_spread": spread,
    }
    print(json.dumps(summary, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run as a command: exit status 0, 2 (bad input), 130 (Ctrl-C) or 143 (SIGTERM)."""
    return run_command(lambda session: run(parse_args(argv), session), "examples/compare.py")


if __name__ == "__main__":
    sys.exit(main())
