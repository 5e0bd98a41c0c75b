"""Fit LangevinFlow to a synthetic Lorenz-driven spiking population and recover its firing rates.

    python examples/lorenz.py                 # default run (about 5 minutes on 2 CPU cores)
    python examples/lorenz.py --quick         # smoke run, well under a minute
    python examples/lorenz.py --device cuda --epochs 400 --out runs/lorenz-gpu

Writes ``metrics.json`` and ``lorenz.png`` to ``--out`` and prints the metrics JSON as its last
line. Rate R^2 (sklearn r2_score, y_true = true rates, uniform over neurons) is reported on the
validation trials for LangevinFlow and for a Gaussian spike-smoothing baseline whose width is
chosen on the training trials. The model state is selected on the validation ELBO only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.metrics import rate_r2
from pyro_langevin.models import LangevinFlow
from pyro_langevin.plots import plot_rates_and_latents
from pyro_langevin.posterior import posterior_means
from pyro_langevin.smoothing import choose_smoothing_width, smooth_spikes
from pyro_langevin.training import FitConfig, default_device, fit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 200, quick 15)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small data and few epochs, for smoke checks")
    p.add_argument("--out", type=Path, default=Path("runs/lorenz"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small recurrent steps run fastest single-threaded)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    torch.set_num_threads(args.threads)
    if args.quick:
        data = make_lorenz(n_conditions=20, trials_per_condition=5, n_bins=30, seed=args.seed)
        epochs = args.epochs or 15
    else:
        data = make_lorenz(seed=args.seed)
        epochs = args.epochs or 200

    model = LangevinFlow(data.train.n_neurons, latent_dim=16, dt=0.1)
    guide = GRUGuide(model, data.train.n_heldin, hidden=64)
    config = FitConfig(
        epochs=epochs, batch_size=100, lr=5e-3, weight_decay=1e-5,
        kl_ramp_epochs=max(1, epochs // 4), weight_decay_ramp_epochs=max(1, epochs // 4),
        val_every=5 if not args.quick else 3, seed=args.seed,
    )
    t0 = time.perf_counter()
    result = fit(model, guide, data.train, data.valid, config, device=device,
                 checkpoint_dir=args.out / "checkpoints", progress=not args.no_progress)
    fit_seconds = time.perf_counter() - t0

    post = posterior_means(model, guide, data.valid.to(device), sites=("rates", "z"), n_samples=20)
    rates, latents = post["rates"].numpy(), post["z"].numpy()
    spikes = data.valid.target.numpy()
    width = choose_smoothing_width(data.train.target.numpy(), data.train_rates)
    smoothed = smooth_spikes(spikes, width)

    metrics = {
        "langevinflow": {"rate_r2": rate_r2(data.valid_rates, rates)},
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
    args.out.mkdir(parents=True, exist_ok=True)
    n = data.valid.n_trials
    plot_rates_and_latents(args.out / "lorenz.png", data.valid_rates, rates, spikes, latents,
                           true_latents=data.valid_latents, baseline_rates=smoothed,
                           trials=(0, n // 3, 2 * n // 3))  # trials of different conditions
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"rate R^2 on {data.valid.n_trials} validation trials: LangevinFlow "
          f"{metrics['langevinflow']['rate_r2']:.3f}, smoothing {metrics['smoothing']['rate_r2']:.3f}")
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'lorenz.png'}")
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
