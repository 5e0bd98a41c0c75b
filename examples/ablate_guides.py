"""Ablate the inference side (guides) and the prior side (potential, damping, noise) on Lorenz data.

Every variant is fitted with the same ``fit`` call and the same epoch budget, then scored on the
validation trials:

* ``valid ELBO/bin``: the ELBO (full KL weight, eval mode, mean of 4 draws) per trial-bin;
* ``rate R2``: posterior-mean rates (20 draws) against the true rates, all neurons and bins;
* ``co-bps``: bits per spike of the held-out neurons (the guide never reads them);
* ``fit s``: wall time of ``fit`` (plus, for the non-amortized mean-field guide, the time of its
  test-time inference on the validation trials with the model frozen and held-out neurons hidden).

Run::

    python examples/ablate_guides.py                 # default budget (~20 min on 2 CPU cores)
    python examples/ablate_guides.py --quick         # smoke run, well under a minute
    python examples/ablate_guides.py --only gru,initial_state --epochs 100

The last line printed is the results as JSON; ``--out`` also gets ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_langevin.batch import Batch
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import (
    AutoregressiveGuide,
    BiGRUGuide,
    GRUGuide,
    InitialStateGuide,
    MeanFieldGuide,
)
from pyro_langevin.models import LangevinFlow
from pyro_langevin.posterior import eval_mode, posterior_rates
from pyro_langevin.training import FitConfig, default_device, fit

try:  # the NLB definition itself, when nlb_tools is installed
    from nlb_tools.evaluation import bits_per_spike
except Exception:  # pragma: no cover - depends on the environment
    from pyro_langevin.metrics import bits_per_spike
from pyro_langevin.metrics import rate_r2

GuideFactory = Callable[[LangevinFlow, int, int, int], torch.nn.Module]

#: name -> (model options, guide factory(model, n_heldin, n_trials, n_observed_bins))
GUIDES: dict[str, GuideFactory] = {
    "gru": lambda m, n_in, n_tr, t: GRUGuide(m, n_in, hidden=64),
    "bigru": lambda m, n_in, n_tr, t: BiGRUGuide(m, n_in, hidden=64),
    "initial_state": lambda m, n_in, n_tr, t: InitialStateGuide(m, n_in, hidden=64),
    "meanfield": lambda m, n_in, n_tr, t: MeanFieldGuide(m, n_tr, t),
    "autoregressive": lambda m, n_in, n_tr, t: AutoregressiveGuide(m, n_in, hidden=64, mlp_hidden=64),
    "autoregressive_flow": lambda m, n_in, n_tr, t: AutoregressiveGuide(m, n_in, hidden=64, mlp_hidden=64, flow=True),
}
PRIORS: dict[str, dict[str, Any]] = {
    "prior_zero": {"potential": "zero"},
    "prior_quadratic": {"potential": "quadratic"},
    "prior_mlp": {"potential": "mlp"},
    "prior_learn_gamma_sigma": {"learn_gamma": True, "learn_sigma": True},
    "prior_overdamped": {"overdamped": True},
}
VARIANTS: list[str] = [*GUIDES, *PRIORS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data and 3 epochs (smoke run)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 40, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small recurrent steps do not gain from more, and a "
                        "shared machine slows down badly when oversubscribed)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def heldin_only(batch: Batch) -> Batch:
    """The batch with held-out neurons masked out of the likelihood (for test-time inference)."""
    mask = batch.mask.clone()
    mask[:, :, batch.n_heldin:] = False
    return batch.with_inputs(batch.input, mask)


def infer_trials(model: LangevinFlow, guide: torch.nn.Module, batch: Batch, config: FitConfig, device, progress: bool) -> float:
    """Fit a non-amortized guide's parameters for ``batch`` with the model frozen; return seconds.

    Held-out neurons are hidden from this fit, so their bits/spike stay a fair held-out score.
    """
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        result = fit(model, guide, heldin_only(batch), None, config, device=device, init_rates=False, progress=progress)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return result.seconds


@torch.no_grad()
def elbo_per_bin(model, guide, batch: Batch, n_draws: int = 4) -> float:
    """ELBO (full KL weight, eval mode) per trial-bin, averaged over ``n_draws`` guide draws."""
    elbo = TraceMeanField_ELBO()
    with eval_mode(model, guide):
        loss = sum(float(elbo.loss(model, guide, batch)) for _ in range(n_draws)) / n_draws
    return -loss / (batch.n_trials * batch.n_bins)


def run_variant(name: str, data, args: argparse.Namespace, epochs: int, device, latent_dim: int) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model_kwargs = PRIORS.get(name, {})
    guide_name = name if name in GUIDES else "gru"
    train, valid = data.train, data.valid
    n_total = int(max(train.index.max(), valid.index.max())) + 1
    model = LangevinFlow(train.n_neurons, latent_dim=latent_dim, dt=0.1, **model_kwargs)
    guide = GUIDES[guide_name](model, train.n_heldin, n_total, train.n_observed_bins)
    config = FitConfig(
        epochs=epochs, batch_size=64, lr=5e-3, weight_decay=1e-5,
        kl_ramp_epochs=max(1, epochs // 4), weight_decay_ramp_epochs=max(1, epochs // 4),
        val_every=max(1, epochs // 10), seed=args.seed,
    )
    amortized = guide_name != "meanfield"
    progress = not args.no_progress
    # The mean-field guide has no parameters trained for the validation trials during fit, so its
    # validation loss would not select anything meaningful: it keeps the final state instead.
    result = fit(model, guide, train, valid if amortized else None, config, device=device, progress=progress)
    seconds = result.seconds
    if not amortized:
        seconds += infer_trials(model, guide, valid, config, device, progress)
    model.cpu()
    guide.cpu()
    rates = posterior_rates(model, guide, valid, n_samples=20).numpy()
    n_in, t = valid.n_heldin, valid.n_observed_bins
    spikes = valid.target.numpy()
    return {
        "variant": name,
        "guide": guide_name,
        "prior": {k: v for k, v in model_kwargs.items()} or {"potential": "oscillators"},
        "epochs": epochs,
        "train_loss": result.history[-1]["loss"],
        "valid_elbo_per_bin": elbo_per_bin(model, guide, valid),
        "rate_r2": rate_r2(data.valid_rates[:, :t], rates[:, :t]),
        "heldout_bps": float(bits_per_spike(rates[:, :t, n_in:], spikes[:, :t, n_in:])),
        "fit_seconds": seconds,
        "best_epoch": result.best_epoch,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| variant | guide | prior | valid ELBO/bin | rate R2 | co-bps | fit s |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        prior = ",".join(f"{k}={v}" for k, v in r["prior"].items())
        lines.append(
            f"| {r['variant']} | {r['guide']} | {prior} | {r['valid_elbo_per_bin']:.2f} | {r['rate_r2']:.3f} "
            f"| {r['heldout_bps']:.3f} | {r['fit_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device) if args.device else default_device()
    names = VARIANTS if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    if args.quick:
        data = make_lorenz(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12, n_heldout=3, seed=args.seed)
        epochs, latent_dim = args.epochs or 2, 4
    else:
        data = make_lorenz(n_conditions=40, trials_per_condition=8, n_bins=50, n_neurons=30, n_heldout=5, seed=args.seed)
        epochs, latent_dim = args.epochs or 40, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(run_variant(name, data, args, epochs, device, latent_dim))
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = format_table(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)
    results = {"out": str(out), "epochs": epochs, "n_train": data.train.n_trials, "n_valid": data.valid.n_trials,
               "results": rows}
    print(json.dumps(results, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    return results


if __name__ == "__main__":
    main()
