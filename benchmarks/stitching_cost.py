"""Cost of a stitched fit of S sessions against the sum of the S sessions' separate fits (issue 30).

A stitched epoch is balanced (``pyro_langevin.stitching.balance_sessions``): every session's fitting
trials are cycled up to the largest session's count, so an epoch covers S x max_s(n_s) trials where the
separate fits cover sum_s(n_s) between them. The claim checked here: with the same epochs, a stitched
fit of S sessions costs about S x max / sum times the separate fits together (1 for equal sessions),
not S times more. Printed per S (the first S of the sessions): trials per epoch, optimiser steps,
wall and process-CPU seconds of ONE stitched fit (``stitching.train_stitched``: read-ins trained from
a random start, a fifth of each session's trials validating) and of the S separate fits summed (each
``spec.build`` + ``training.fit`` on the session's own trials, a fifth validating), their ratio, and
the balanced-epoch prediction S x max / sum. Every fit runs the same epochs, batch size and model.

Data: synthetic sessions of one smooth 2-D latent path seen through each session's own random units
(Poisson counts; the cost does not depend on what is fitted). Each session is fitted separately once;
the row for S sums the first S of them. A one-epoch separate and stitched fit first warm up (not counted).
CPU seconds are the process's (``time.process_time``), steadier than wall seconds on a shared machine.

Usage::

    python benchmarks/stitching_cost.py                             # 5 sessions, 30 epochs, 20 bins, small model
    python benchmarks/stitching_cost.py --epochs 2 --sizes 1,2      # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_args, setup_machine  # noqa: E402

from pyro_langevin import Batch, make_batch  # noqa: E402
from pyro_langevin.data.splits import split_train_valid  # noqa: E402
from pyro_langevin.spec import RunSpec, build  # noqa: E402
from pyro_langevin.stitching import train_stitched  # noqa: E402
from pyro_langevin.training import fit  # noqa: E402

VALID_FRAC = 0.2  # train_stitched's default, used for the separate fits too


def make_sessions(trials: List[int], units: List[int], n_bins: int, seed: int = 0) -> List[Batch]:
    """One Poisson session per (trials, units): a 2-D latent path (phase by trial) through random units."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_bins)
    out = []
    for n_trials, n_units in zip(trials, units):
        phase = rng.uniform(0, 2 * np.pi, n_trials)[:, None]
        lat = np.stack([np.sin(t / 3 + phase), np.cos(t / 4 + phase)], -1)  # (trial, time, 2)
        rates = np.exp(lat @ (0.7 * rng.normal(size=(2, n_units))) - 0.5)
        out.append(make_batch(rng.poisson(rates).astype(float)))
    return out


def timed(fn: Callable[[], Any]) -> Tuple[Any, float, float]:
    """``(result, wall seconds, process CPU seconds)`` of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def fit_separate(spec: RunSpec, batch: Batch, device: Any) -> Dict[str, float]:
    """One session's own fit: its trials per epoch, optimiser steps and seconds."""
    fit_part, valid = split_train_valid(batch, VALID_FRAC, spec.fit.seed)

    def run():
        model, guide = build(spec, batch.n_neurons, batch.n_neurons)
        return fit(model, guide, fit_part, valid, spec.fit, device=device, progress=False)

    result, wall, cpu = timed(run)
    return {"trials_per_epoch": fit_part.n_trials, "steps": _steps(fit_part.n_trials, spec, len(result.history)),
            "wall_s": wall, "cpu_s": cpu}


def fit_stitched(spec: RunSpec, batches: List[Batch], device: Any) -> Dict[str, float]:
    """One stitched fit of ``batches``: its (balanced) trials per epoch, optimiser steps and seconds."""
    names = [f"s{i}" for i in range(len(batches))]
    readin = min(32, min(b.n_neurons for b in batches))  # StitchOptions' default width
    (_, _, layout, result), wall, cpu = timed(lambda: train_stitched(spec, batches, names, readin_dim=readin,
                                                                     valid_frac=VALID_FRAC, device=device))
    # balanced: every session cycled to the largest fitting part (split_sessions splits each as split_train_valid)
    per_epoch = len(batches) * max(split_train_valid(b, VALID_FRAC, spec.fit.seed)[0].n_trials for b in batches)
    return {"trials_per_epoch": per_epoch, "steps": _steps(per_epoch, spec, len(result.history)), "wall_s": wall,
            "cpu_s": cpu}


def _steps(trials_per_epoch: int, spec: RunSpec, epochs: int) -> int:
    return epochs * math.ceil(trials_per_epoch / spec.fit.batch_size)  # fit's minibatch loop


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_args(p)
    p.add_argument("--trials", default="40,20,60,30,50", help="each session's trials (comma-separated)")
    p.add_argument("--units", default="30,20,45,25,40", help="each session's units (comma-separated)")
    p.add_argument("--sizes", default="1,2,3,5", help="numbers of sessions S stitched (the first S)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of every fit (default 30)")
    p.add_argument("--bins", type=int, default=20, help="bins per trial (default 20)")
    p.add_argument("--batch-size", type=int, default=16, help="minibatch trials (default 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = setup_machine(args)
    trials, units = [int(x) for x in args.trials.split(",")], [int(x) for x in args.units.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    if len(trials) != len(units) or max(sizes) > len(trials):
        p.error("--trials and --units need one entry per session, at least max(--sizes) of them")
    spec = RunSpec().override({"model.latent_dim": 8, "model.d_model": 16, "model.n_heads": 2,
                               "model.dim_feedforward": 32, "guide.hidden": 32, "model.dt": 0.1,
                               "fit.epochs": args.epochs, "fit.batch_size": args.batch_size, "fit.lr": 5e-3,
                               "fit.val_every": 5, "fit.seed": args.seed})
    batches = make_sessions(trials, units, args.bins, args.seed)
    fit_separate(spec.override({"fit.epochs": 1}), batches[0], device)  # warm-up (first-call costs), not counted
    fit_stitched(spec.override({"fit.epochs": 1}), batches[:2], device)
    separate = []
    for i, b in enumerate(batches[:max(sizes)]):
        separate.append(fit_separate(spec, b, device))
        print(f"  separate s{i}: {separate[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for s in sizes:
        st = fit_stitched(spec, batches[:s], device)
        sep = {k: sum(r[k] for r in separate[:s]) for k in ("trials_per_epoch", "steps", "wall_s", "cpu_s")}
        fitting = [r["trials_per_epoch"] for r in separate[:s]]
        rows.append({"S": s, "fitting_trials": fitting, "stitched": st, "separate": sep,
                     "cpu_ratio": st["cpu_s"] / sep["cpu_s"], "wall_ratio": st["wall_s"] / sep["wall_s"],
                     "predicted_ratio": s * max(fitting) / sum(fitting)})
        print(f"  stitched S={s}: {st['wall_s']:.1f} s", file=sys.stderr, flush=True)
    print(f"stitched vs separate fits, {args.epochs} epochs, {args.bins} bins, batch {args.batch_size}, latent 8, "
          f"GRU 32, d_model 16; device {args.device}, {args.threads} thread(s)")
    print("| S | sessions' fitting trials | trials/epoch stitched / separate | steps stitched / separate "
          "| CPU s stitched / separate | wall s stitched / separate | CPU ratio | wall ratio | S x max / sum |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st, sep = r["stitched"], r["separate"]
        print(f"| {r['S']} | {','.join(map(str, r['fitting_trials']))} | {st['trials_per_epoch']} / {sep['trials_per_epoch']} "
              f"| {st['steps']} / {sep['steps']} | {st['cpu_s']:.1f} / {sep['cpu_s']:.1f} "
              f"| {st['wall_s']:.1f} / {sep['wall_s']:.1f} | {r['cpu_ratio']:.2f} | {r['wall_ratio']:.2f} "
              f"| {r['predicted_ratio']:.2f} |")
    print(json.dumps({"args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
