"""Fit LangevinFlow to a synthetic Lorenz-driven spiking population and recover its firing rates.

    python examples/lorenz.py                 # default run (about 5 minutes on 2 CPU cores)
    python examples/lorenz.py --quick         # smoke run, well under a minute (runs/lorenz-quick)
    python examples/lorenz.py --device cuda --epochs 400 --out runs/lorenz-gpu
    python examples/lorenz.py --resume        # continue an interrupted run from runs/lorenz/checkpoints

Writes ``metrics.json`` and ``lorenz.png`` to ``--out`` (default ``runs/lorenz``; an ``--out`` that
holds an earlier run needs ``--resume`` or ``--overwrite``) and prints the metrics JSON as its last
line. Rate R^2 (sklearn r2_score, y_true = true rates, uniform over neurons) is reported on the
validation trials for LangevinFlow and for a Gaussian spike-smoothing baseline whose width is
chosen on the training trials. The model state is selected on the validation ELBO only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from pyro_langevin.console import Session, run_command
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.dynamics import latent_paths, ridge_decode
from pyro_langevin.metrics import rate_r2
from pyro_langevin.options import ArgumentParser, add_run_arguments, add_spec_arguments, check_run_options, spec_overrides
from pyro_langevin.plots import plot_rates_and_latents
from pyro_langevin.posterior import posterior_means
from pyro_langevin.smoothing import choose_smoothing_width, smooth_spikes
from pyro_langevin.spec import RunSpec, build, run_meta
from pyro_langevin.training import fit


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/lorenz.py", description=__doc__.split("\n")[0])
    add_run_arguments(p, "lorenz", "training epochs (default 200, quick 15)", "small data and 15 epochs")
    add_spec_arguments(p, "pyro_langevin.spec.RunSpec")
    return p.parse_args(argv)


def run(args: argparse.Namespace, session: Session) -> dict:
    """Check the options, fit, score and plot; return the metrics."""
    epochs = args.epochs or (15 if args.quick else 200)
    spec = RunSpec().override({
        "model.latent_dim": 16, "model.dt": 0.1, "guide.hidden": 64,
        "fit.epochs": epochs, "fit.batch_size": 100, "fit.lr": 5e-3, "fit.weight_decay": 1e-5,
        "fit.kl_ramp": 0.25, "fit.weight_decay_ramp": 0.25, "fit.val_every": 3 if args.quick else 5,
        "fit.seed": args.seed,
    })
    spec = spec.override(spec_overrides(args, spec))  # --spec FILE, then --set KEY=VALUE
    data_cfg = (dict(n_conditions=20, trials_per_condition=5, n_bins=30) if args.quick
                else dict(n_conditions=100, trials_per_condition=10, n_bins=50))
    meta = {"script": "lorenz", "quick": args.quick, "seed": args.seed, "data": data_cfg}  # rebuilds the data
    opts = session.options = check_run_options(args, "lorenz", {**meta, "spec": spec.to_dict()})  # a resume must match
    device = opts.device
    data = make_lorenz(seed=args.seed, **data_cfg)

    model, guide = build(spec, data.train.n_neurons, data.train.n_heldin)  # initial state seeded by fit.seed
    t0 = time.perf_counter()
    result = fit(model, guide, data.train, data.valid, spec.fit, device=device, checkpoint_dir=opts.checkpoint_dir,
                 resume=opts.resume_from, progress=not args.no_progress,
                 meta=run_meta(spec, data.train.n_neurons, data.train.n_heldin, **meta))
    fit_seconds = time.perf_counter() - t0

    post = posterior_means(model, guide, data.valid.to(device), sites=("rates", "z"), n_samples=20)
    rates, latents = post["rates"].numpy(), post["z"].numpy()
    spikes = data.valid.target.numpy()
    width = choose_smoothing_width(data.train.target.numpy(), data.train_rates)
    smoothed = smooth_spikes(spikes, width)

    # The latents drawn beside the true states are mapped onto them (ridge from the posterior-mean
    # [z, v] of the training trials to their Lorenz states), so the two can be compared by eye.
    train_paths = latent_paths(model, guide, data.train.to(device))
    valid_paths = latent_paths(model, guide, data.valid.to(device))
    aligned = ridge_decode(np.concatenate([train_paths.z, train_paths.v], -1), data.train_latents,
                           np.concatenate([valid_paths.z, valid_paths.v], -1), data.valid_latents)

    metrics = {
        "langevinflow": {"rate_r2": rate_r2(data.valid_rates, rates), "lorenz_state_r2": aligned.r2},
        "smoothing": {"rate_r2": rate_r2(data.valid_rates, smoothed), "width_bins": width},
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_metric,
        "epochs": epochs,
        "fit_seconds": round(fit_seconds, 1),
        "device": str(device),
        "seed": args.seed,
        "n_train_trials": data.train.n_trials,
        "n_valid_trials": data.valid.n_trials,
    }
    n = data.valid.n_trials
    plot_rates_and_latents(opts.out / "lorenz.png", data.valid_rates, rates, spikes, latents,
                           true_latents=data.valid_latents, baseline_rates=smoothed, aligned_latents=aligned.predicted,
                           trials=(0, n // 3, 2 * n // 3),  # trials of different conditions
                           r2={"LangevinFlow": metrics["langevinflow"]["rate_r2"],
                               "smoothing": metrics["smoothing"]["rate_r2"]})
    (opts.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"rate R^2 on {data.valid.n_trials} validation trials: LangevinFlow "
          f"{metrics['langevinflow']['rate_r2']:.3f}, smoothing {metrics['smoothing']['rate_r2']:.3f}")
    print(f"wrote {opts.out / 'metrics.json'} and {opts.out / 'lorenz.png'}")
    print(json.dumps(metrics))
    return metrics


def main(argv=None) -> int:
    """Run as a command: exit status 0, 2 (bad input), 130 (Ctrl-C) or 143 (SIGTERM)."""
    return run_command(lambda session: run(parse_args(argv), session), "examples/lorenz.py")


if __name__ == "__main__":
    sys.exit(main())
