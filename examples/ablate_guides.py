"""Ablate the inference side (guides) and the prior side (potential, damping, noise) on Lorenz data.

Every variant is fitted with the same ``fit`` call and the same epoch budget, then scored on the
validation trials:

* ``valid ELBO/bin``: the ELBO (full KL weight, eval mode, mean of 4 draws) per trial-bin;
* ``rate R2``: posterior-mean rates (20 draws) against the true rates, all neurons and bins;
* ``co-bps``: bits per spike of the held-out neurons (the guide never reads them);
* ``fit s``: wall time of ``fit`` (plus, for the non-amortized mean-field guide, the time of its
  test-time inference on the validation trials with the model frozen and held-out neurons hidden).

Run::

    python examples/ablate_guides.py                 # default budget (~20 min on 2 CPU cores): runs/ablate
    python examples/ablate_guides.py --quick         # smoke run, well under a minute: runs/ablate-quick
    python examples/ablate_guides.py --only gru,initial_state --epochs 100 --out runs/ablate-100
    python examples/ablate_guides.py --resume        # run the variants an interrupted run did not finish

The last line printed is the results as JSON; ``--out`` also gets ``results.json`` (written after
every variant) and ``table.md``. An ``--out`` that holds an earlier run needs ``--resume`` (keep its
finished variants) or ``--overwrite``.
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

from pyro_langevin.atomic import atomic_path
from pyro_langevin.batch import Batch
from pyro_langevin.console import Session, run_command
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import (
    AutoregressiveGuide,
    BiGRUGuide,
    GRUGuide,
    InitialStateGuide,
    MeanFieldGuide,
)
from pyro_langevin.models import LangevinFlow
from pyro_langevin.options import ArgumentParser, OptionError, add_run_arguments, check_run_options
from pyro_langevin.posterior import eval_mode, posterior_rates
from pyro_langevin.training import FitConfig, fit

from pyro_langevin.metrics import bits_per_spike, rate_r2

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
    p = ArgumentParser(prog="examples/ablate_guides.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "ablate", "epochs per variant (default 40, quick 2)", "tiny data and 2 epochs per variant")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    return p.parse_args(argv)


def chosen_variants(only: str | None) -> list[str]:
    """The variants of ``--only`` (default all), checked."""
    names = VARIANTS if only is None else [s.strip() for s in only.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise OptionError(f"--only: unknown or no variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    return names


def finished_rows(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The variants an earlier run with the same epoch budget finished (``--resume``)."""
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OptionError(f"--resume: {path} is not JSON ({exc}); rerun with --overwrite") from None
    other = sorted({r.get("epochs") for r in rows} - {epochs}, key=str)
    if other:
        raise OptionError(f"--resume: {path} holds variants fitted for {other} epochs, this run asks for {epochs}; "
                          "use the same options, or --overwrite")
    return rows


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
        kl_ramp=0.25, weight_decay_ramp=0.25,
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
            f"| {r['heldout_bps']:.3f} | {r['fit_seconds']:.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, session: Session) -> dict[str, Any]:
    """Check the options, fit every chosen variant not yet finished; return the results."""
    names = chosen_variants(args.only)
    epochs = args.epochs or (2 if args.quick else 40)
    opts = session.options = check_run_options(args, "ablate")
    out, device = opts.out, opts.device
    rows = [r for r in finished_rows(out / "results.json", epochs) if r["variant"] in names] if args.resume else []
    if args.quick:
        data = make_lorenz(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12, n_heldout=3, seed=args.seed)
        latent_dim = 4
    else:
        data = make_lorenz(n_conditions=40, trials_per_condition=8, n_bins=50, n_neurons=30, n_heldout=5, seed=args.seed)
        latent_dim = 8
    for name in names:
        if any(r["variant"] == name for r in rows):
            print(f"== {name}: finished in the earlier run (kept)", file=sys.stderr, flush=True)
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        session.interrupt_note = lambda: (f"interrupted during variant {name}; {len(rows)} finished variant(s) saved in "
                                          f"{out / 'results.json'}; rerun with --resume")
        rows.append(run_variant(name, data, args, epochs, device, latent_dim))
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    table = format_table(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)
    results = {"out": str(out), "epochs": epochs, "n_train": data.train.n_trials, "n_valid": data.valid.n_trials,
               "results": rows}
    print(json.dumps(results, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    return results


def main(argv: list[str] | None = None) -> int:
    """Run as a command: exit status 0, 2 (bad input), 130 (Ctrl-C) or 143 (SIGTERM)."""
    return run_command(lambda session: run(parse_args(argv), session), "examples/ablate_guides.py")


if __name__ == "__main__":
    sys.exit(main())
