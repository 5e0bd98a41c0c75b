"""Many sessions, one dynamics, on synthetic data: stitched against separate per-session fits.

    python examples/stitching.py --quick --out runs/stitching-quick   # smoke run (tiny model, few epochs)
    python examples/stitching.py --out runs/stitching --seeds 0,1,2    # the evaluation run (measured: docs/stitching.md)

One Lorenz system (pyro_langevin.data.lorenz) is observed by 5 sessions, each through its own random
20-45 units and with 10-60 trials; the sessions' trials start from one shared pool of initial
conditions (``--conditions``, default 8, whose labels the PCR read-in may use: ``--readin-init pcr``;
``--freeze-readin`` keeps the read-ins at their initial value). Each session's trials are split in half: the first half trains (a fifth of it validates,
picking the checkpoint by its ELBO), the second half is held out. Two recipes see the same training
trials: one stitched model of all sessions (:func:`~pyro_langevin.spec.build_stitched`: shared prior,
decoder core and guide core; a read-in and read-out per session) and one model per session. Scored on
the held-out trials only:

* rate R^2 to the true rates, per session, against its number of trials;
* the latents' match to the true Lorenz state: ONE affine map (ridge) from every session's posterior-mean
  latents [z, v] to the Lorenz state, fitted on half of every session's held-out trials and scored on the
  other half, against a separate map per session;
* with ``--few-shot 5,10,20,all``: the last session held out of a stitched fit of the others, then added
  with only K of its training trials (its read-in and read-out alone train), against a model fitted from
  scratch on the same K trials (rate R^2 on its held-out trials).

Writes ``stitching.json`` and ``stitching.png`` to ``--out``; prints the JSON as its last line.
Nothing is selected on what is scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

import numpy as np

from pyro_langevin.batch import make_batch
from pyro_langevin.console import Session, run_command
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.data.splits import split_train_valid
from pyro_langevin.dynamics import ridge_decode
from pyro_langevin.metrics import rate_r2
from pyro_langevin.options import ArgumentParser, add_run_arguments, add_spec_arguments, check_run_options, spec_overrides
from pyro_langevin.posterior import posterior_means
from pyro_langevin.spec import RunSpec, build
from pyro_langevin.stitching import embed_session, train_added, train_stitched
from pyro_langevin.training import fit


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/stitching.py", description=__doc__.split("\n")[0])
    add_run_arguments(p, "stitching", "training epochs (default 200, quick 8)", "tiny model, 8 epochs, one seed")
    add_spec_arguments(p, "pyro_langevin.spec.RunSpec")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    p.add_argument("--sessions", type=int, default=5, help="number of sessions (default 5)")
    p.add_argument("--conditions", type=int, default=8,
                   help="initial conditions the sessions' trials are drawn from (shared; default 8)")
    p.add_argument("--readin-init", choices=("random", "pcr"), default="random",
                   help="the stitched read-ins' initialisation (pcr: from the training trials' condition averages)")
    p.add_argument("--freeze-readin", action="store_true", help="keep the stitched read-ins at their initial value")
    p.add_argument("--no-separate", action="store_true", help="fit only the stitched model")
    p.add_argument("--few-shot", default=None, metavar="K,K,...",
                   help="also hold the last session out of the stitched fit and add it afterwards with only K of its "
                        "training trials (its read-in and read-out alone train), against a model fitted from scratch "
                        "on the same K trials; e.g. 5,10,20 (all: every training trial)")
    return p.parse_args(argv)


def make_sessions(n_sessions: int, seed: int, n_bins: int, n_conditions: int = 8) -> List[Dict[str, Any]]:
    """Sessions of one Lorenz system: own random units (20-45), own trial counts (10-60), trials drawn from
    one shared pool of ``n_conditions`` initial conditions (their labels kept for the PCR read-in)."""
    rng = np.random.default_rng(seed)
    pool = make_lorenz(n_conditions=n_conditions, trials_per_condition=1, n_bins=n_bins, n_neurons=3,
                       valid_fraction=1 / n_conditions, seed=seed)
    states = np.concatenate([pool.train_latents, pool.valid_latents])  # (condition, time, 3), standardised
    trials = np.linspace(10, 60, n_sessions).round().astype(int)
    out = []
    for s in range(n_sessions):
        n_units = int(rng.integers(20, 46))
        w = rng.normal(size=(3, n_units))
        w /= np.linalg.norm(w, axis=0, keepdims=True)
        cond = rng.integers(0, len(states), trials[s])
        lat = states[cond]
        rates = 0.5 * np.exp(lat @ w)
        counts = rng.poisson(rates).astype(float)
        half = trials[s] // 2
        out.append({"name": f"s{s}", "n_trials": int(trials[s]), "n_units": n_units, "rates": rates, "latents": lat, "conditions": [f"c{c}" for c in cond],
                    "train": make_batch(counts[:half]), "test": make_batch(counts[half:], index=np.arange(half, trials[s])),
                    "test_rows": np.arange(half, trials[s])})
    return out


def _posterior(model, guide, batch, device) -> Dict[str, np.ndarray]:
    post = posterior_means(model, guide, batch.to(device), sites=("rates", "z", "v"), n_samples=20)
    return {"rates": post["rates"].numpy(), "latents": np.concatenate([post["z"].numpy(), post["v"].numpy()], -1)}


def fit_stitched(sessions, spec: RunSpec, device, progress: bool, readin_init: str = "random",
                 train_readin: bool = True) -> List[Dict[str, np.ndarray]]:
    labels = {s["name"]: s["conditions"] for s in sessions} if readin_init == "pcr" else None
    model, guide, layout, _ = train_stitched(spec, [s["train"] for s in sessions], [s["name"] for s in sessions],
                                          n_trials=[s["n_trials"] for s in sessions], train_readin=train_readin,
                                          labels=labels, device=device, progress=progress)
    out = []
    for i, s in enumerate(sessions):
        post = _posterior(model, guide, embed_session(s["test"], layout, s["name"]), device)
        post["rates"] = post["rates"][:, :, layout.columns(i)]
        out.append(post)
    return out


def fit_separate(sessions, spec: RunSpec, device, progress: bool) -> List[Dict[str, np.ndarray]]:
    out = []
    for s in sessions:
        fit_part, valid = split_train_valid(s["train"], 0.2, spec.fit.seed)
        model, guide = build(spec, s["n_units"], s["n_units"])
        fit(model, guide, fit_part, valid, spec.fit, device=device, progress=progress)
        out.append(_posterior(model, guide, s["test"], device))
    return out


def few_shot(sessions, spec: RunSpec, device, progress: bool, ks: List[int], readin_init: str, train_readin: bool):
    """Rate R^2 on the last session's held-out trials after adding it with ``k`` training trials to a
    stitched model of the others (:func:`~pyro_langevin.stitching.grow`), and from scratch on the same ``k``."""
    *others, new = sessions
    labels = {s["name"]: s["conditions"] for s in others} if readin_init == "pcr" else None
    model, guide, _, _ = train_stitched(spec, [s["train"] for s in others], [s["name"] for s in others],
                                     n_trials=[s["n_trials"] for s in others], train_readin=train_readin,
                                     labels=labels, device=device, progress=progress)
    truth = new["rates"][new["test_rows"]]
    out = []
    for k in ks:
        k = min(k, len(new["train"]))
        trials = new["train"][np.arange(k)]
        grown, grown_guide, grown_layout, _ = train_added(spec, model, guide, new["name"], trials, new["n_trials"],
                                                       device=device, progress=progress)
        added = _posterior(grown, grown_guide, embed_session(new["test"], grown_layout, new["name"]), device)["rates"]
        fit_s, valid_s = split_train_valid(trials, 0.2, spec.fit.seed)
        scratch_model, scratch_guide = build(spec, new["n_units"], new["n_units"])
        fit(scratch_model, scratch_guide, fit_s, valid_s, spec.fit, device=device, progress=progress)
        scratch = _posterior(scratch_model, scratch_guide, new["test"], device)["rates"]
        out.append({"k": k, "added_rate_r2": rate_r2(truth, added[:, :, grown_layout.columns(len(others))]),
                    "scratch_rate_r2": rate_r2(truth, scratch)})
    return {"session": new["name"], "trials": new["n_trials"], "units": new["n_units"], "by_k": out}


def latent_maps(sessions, posts) -> Dict[str, float]:
    """R^2 of ONE ridge map from all sessions' latents to the Lorenz state, and the mean of per-session maps."""
    halves = [(np.arange(len(p["latents"])) % 2 == 0) for p in posts]
    truth = [s["latents"][s["test_rows"]] for s in sessions]
    x_fit = np.concatenate([p["latents"][h] for p, h in zip(posts, halves)])
    y_fit = np.concatenate([t[h] for t, h in zip(truth, halves)])
    x_test = np.concatenate([p["latents"][~h] for p, h in zip(posts, halves)])
    y_test = np.concatenate([t[~h] for t, h in zip(truth, halves)])
    one = ridge_decode(x_fit, y_fit, x_test, y_test).r2
    own = [ridge_decode(p["latents"][h], t[h], p["latents"][~h], t[~h]).r2 for p, t, h in zip(posts, truth, halves)]
    return {"one_map_r2": float(one), "per_session_maps_r2": [float(r) for r in own]}


def run(args: argparse.Namespace, session: Session) -> dict:
    epochs = args.epochs or (8 if args.quick else 200)
    sizes = {"model.latent_dim": 4, "model.d_model": 16, "model.n_heads": 2, "model.dim_feedforward": 16,
             "guide.hidden": 16} if args.quick else {"model.latent_dim": 16, "guide.hidden": 64}
    spec = RunSpec().override({**sizes, "model.dt": 0.1, "fit.epochs": epochs, "fit.batch_size": 32, "fit.lr": 5e-3,
                               "fit.kl_ramp": 0.25, "fit.val_every": 2 if args.quick else 5})
    spec = spec.override(spec_overrides(args, spec))
    opts = session.options = check_run_options(args, "stitching")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    n_bins = 20 if args.quick else 50
    results = []
    t0 = time.perf_counter()
    for seed in seeds:
        sessions = make_sessions(args.sessions, seed, n_bins, args.conditions)
        seeded = spec.override({"fit.seed": seed})
        t_fit = time.perf_counter()
        posts = {"stitched": fit_stitched(sessions, seeded, opts.device, not args.no_progress, args.readin_init,
                                          not args.freeze_readin)}
        seconds = {"stitched": round(time.perf_counter() - t_fit, 1)}
        if not args.no_separate:
            t_fit = time.perf_counter()
            posts["separate"] = fit_separate(sessions, seeded, opts.device, not args.no_progress)
            seconds["separate"] = round(time.perf_counter() - t_fit, 1)
        record = {"seed": seed, "sessions": [{"name": s["name"], "trials": s["n_trials"], "units": s["n_units"]}
                                             for s in sessions], "seconds": seconds}
        if args.few_shot:
            ks = [10**9 if k == "all" else int(k) for k in args.few_shot.split(",")]
            record["few_shot"] = few_shot(sessions, seeded, opts.device, not args.no_progress, ks, args.readin_init,
                                          not args.freeze_readin)
        for recipe, ps in posts.items():
            record[recipe] = {"rate_r2": [rate_r2(s["rates"][s["test_rows"]], p["rates"]) for s, p in zip(sessions, ps)],
                              **latent_maps(sessions, ps)}
        results.append(record)
    metrics = {"quick": args.quick, "epochs": epochs, "seeds": seeds, "n_bins": n_bins, "conditions": args.conditions,
               "readin": {"init": args.readin_init, "trained": not args.freeze_readin}, "results": results,
               "seconds": round(time.perf_counter() - t0, 1), "device": str(opts.device), "spec": spec.to_dict()}
    (opts.out / "stitching.json").write_text(json.dumps(metrics, indent=2))
    plot(metrics, opts.out / "stitching.png")
    print(json.dumps({"out": str(opts.out), "seconds": metrics["seconds"]}))
    return metrics


def plot(metrics: dict, path) -> None:
    """Rate R^2 against each session's trial count (stitched vs separate), and the latent maps' R^2."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k, (recipe, colour) in enumerate((("stitched", "C0"), ("separate", "C1"))):
        for j, r in enumerate(r for r in metrics["results"] if recipe in r):
            a.plot([s["trials"] for s in r["sessions"]], r[recipe]["rate_r2"], "o-", color=colour, alpha=0.7,
                   label=recipe if j == 0 else None)
            b.scatter([k - 0.1], [r[recipe]["one_map_r2"]], color=colour, marker="s", label="one map" if j == k == 0 else None)
            b.scatter([k + 0.1] * len(r[recipe]["per_session_maps_r2"]), r[recipe]["per_session_maps_r2"], color=colour,
                      marker="o", alpha=0.6, label="per-session maps" if j == k == 0 else None)
    a.set_xlabel("session's trials (half train, half held out)")
    a.set_ylabel("rate R^2 on held-out trials")
    a.legend()
    b.set_xticks([0, 1], ["stitched", "separate"])
    b.set_ylabel("Lorenz state R^2 (held-out half)")
    b.legend(fontsize=8)
    fig.suptitle(f"{len(metrics['results'][0]['sessions'])} sessions of one Lorenz system"
                 + (" (--quick: smoke run, not evidence)" if metrics["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return run_command(lambda session: run(parse_args(argv), session), "examples/stitching.py")


if __name__ == "__main__":
    sys.exit(main())
