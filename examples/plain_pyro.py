"""LangevinFlow with plain Pyro: SVI + pyro.optim, an autoguide ablation, and an intervention.

Everything here is stock Pyro; ``fit()`` is not used:

1. ``SVI(model, GRUGuide(...), pyro.optim.ClippedAdam, TraceMeanField_ELBO())`` on Lorenz trials;
2. the same model trained with an ``AutoGuideList``: ``AutoNormal`` over the initial state
   ``(z_0, v_0)`` and the GRU guide's per-step forces (``steps_only()``) for ``v_1 ..``;
3. an intervention with ``poutine.do``: every trial starts at rest at the origin
   (``z_0 = v_0 = 0``); ``Predictive`` compares the spread of the prior latent paths and rates
   across trials with the unconstrained prior.

Run::

    python examples/plain_pyro.py --quick     # a few seconds on one CPU core
    python examples/plain_pyro.py             # more trials and steps (about a minute)

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal

from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="examples/plain_pyro.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data and 40 steps")
    p.add_argument("--steps", type=int, default=None, help="SVI steps per guide (default 300, quick 40)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def train(model, guide, batch, steps: int) -> tuple[float, float]:
    """Plain SVI; returns the mean loss (negative ELBO, nats) of the first and last 10 steps."""
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "clip_norm": 200.0}), TraceMeanField_ELBO())
    losses = [svi.step(batch) for _ in range(steps)]
    k = min(10, steps)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def spread(model, data: dict | None, n_trials: int, n_bins: int) -> dict[str, float]:
    """Across-trial std of the prior latent ``z`` in the first bin and of the rates, averaged over draws."""
    program = model if data is None else poutine.do(model, data=data)
    draws = Predictive(program, num_samples=20, return_sites=["z", "rates"])(n_trials=n_trials, n_bins=n_bins)
    return {"z_first_bin": float(draws["z"][:, :, 0].std(1).mean()), "rates": float(draws["rates"].std(1).mean())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    steps = args.steps or (40 if args.quick else 300)
    pyro.set_rng_seed(args.seed)
    size = dict(n_conditions=2, trials_per_condition=4, n_bins=20) if args.quick else \
        dict(n_conditions=4, trials_per_condition=8, n_bins=40)
    data = make_lorenz(n_neurons=20, n_heldout=5, seed=args.seed, **size)
    batch, latent = data.train, 3
    decoder = {"d_model": 16, "dim_feedforward": 32}

    model = LangevinFlow(batch.n_neurons, latent, dt=0.1, decoder_kwargs=decoder)
    gru = train(model, GRUGuide(model, batch.n_heldin, hidden=16), batch, steps)

    # Ablation: an autoguide owns the initial state; the GRU guide's steps start from its draw.
    ablated = LangevinFlow(batch.n_neurons, latent, dt=0.1, decoder_kwargs=decoder)
    guide = AutoGuideList(ablated)
    guide.append(AutoNormal(poutine.block(ablated, expose=["z_0", "v_0"])))
    guide.append(GRUGuide(ablated, batch.n_heldin, hidden=16).steps_only())
    mixed = train(ablated, guide, batch, steps)

    # Intervention on the trained model: what if every trial started at rest at the origin?
    model.eval()  # no decoder dropout in the draws
    n_trials, n_bins = 8, batch.n_bins
    at_rest = {"z_0": torch.zeros(n_trials, latent), "v_0": torch.zeros(n_trials, latent)}
    free, forced = spread(model, None, n_trials, n_bins), spread(model, at_rest, n_trials, n_bins)

    summary = {
        "steps": steps,
        "gru_guide_loss": {"first": round(gru[0], 1), "last": round(gru[1], 1)},
        "autonormal_initial_plus_gru_steps_loss": {"first": round(mixed[0], 1), "last": round(mixed[1], 1)},
        "prior_spread_across_trials": {k: round(v, 4) for k, v in free.items()},
        "do_z0_v0_at_rest_spread_across_trials": {k: round(v, 4) for k, v in forced.items()},
    }
    print(f"SVI with the GRU guide: loss {gru[0]:.1f} -> {gru[1]:.1f} over {steps} steps")
    print(f"AutoNormal(z_0, v_0) + GRU steps:  loss {mixed[0]:.1f} -> {mixed[1]:.1f}")
    print(f"prior across-trial std of z at bin 0 {free['z_first_bin']:.3f}, of rates {free['rates']:.3f}; "
          f"with do(z_0 = v_0 = 0): {forced['z_first_bin']:.3f}, {forced['rates']:.3f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
