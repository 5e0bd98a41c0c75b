"""Prior and posterior predictive checks of a LangevinFlow fit on Lorenz data, with ArviZ.

Fits the model with the GRU guide (or loads a checkpoint folder written by an earlier run), then

* draws prior and posterior predictive spikes for the validation trials (``pyro.infer.Predictive``)
  and writes them, with the posterior latents and rates and the observed counts, as ArviZ
  InferenceData to ``OUT/ppc.nc`` (groups prior, prior_predictive, posterior,
  posterior_predictive, observed_data, constant_data; dims trial, time, neuron / latent);
* writes count-data check figures (rootogram, PSTH bands, Fano factor, randomized PIT, ArviZ's
  plot_ppc / plot_bpv, credible intervals of rates and latents) to ``OUT/figures``;
* writes the predictive p-value table to ``OUT/pvalues.csv``.

Run::

    python examples/ppc.py                      # fit (~3 min on 2 CPU cores) and check: runs/ppc
    python examples/ppc.py --quick              # smoke run: runs/ppc-quick
    python examples/ppc.py --checkpoint runs/ppc --out runs/ppc-again   # reuse a fit (load_run)

An ``--out`` that holds an earlier run needs ``--resume`` (continue its fit) or ``--overwrite``.

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pyro_langevin.checks import P_VALUE, ppc_pvalues, psth_correlation, randomized_pit
from pyro_langevin.console import Session, run_command
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.metrics import rate_r2
from pyro_langevin.options import ArgumentParser, OptionError, add_run_arguments, check_run_options, positive_int
from pyro_langevin.plots import plot_credible_intervals, save_ppc_figures
from pyro_langevin.predictive import credible_intervals, predictive_checks, save_netcdf
from pyro_langevin.spec import RunSpec, SpecError, build, load_run, run_meta
from pyro_langevin.training import fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/ppc.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "ppc", "training epochs (default 40, quick 3)", "tiny data, 3 epochs and 20 draws")
    p.add_argument("--samples", type=positive_int, default=None, help="predictive draws (default 100, quick 20)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="an earlier run of this script (its folder, checkpoints folder or .pt file): skip "
                        "fitting and rebuild its model and guide from the checkpoint (pyro_langevin.spec.load_run)")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[dict[str, Any], RunSpec]:
    """The Lorenz data settings and the run spec of a fresh fit."""
    if args.quick:
        data, latent, hidden, epochs = (dict(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12,
                                             n_heldout=3), 4, 16, args.epochs or 3)
    else:
        data, latent, hidden, epochs = (dict(n_conditions=20, trials_per_condition=10, n_bins=50, n_neurons=30,
                                             n_heldout=5), 8, 64, args.epochs or 40)
    spec = RunSpec().override({
        "model.latent_dim": latent, "model.dt": 0.1, "guide.hidden": hidden,
        "fit.epochs": epochs, "fit.batch_size": 64, "fit.lr": 5e-3, "fit.weight_decay": 1e-5,
        "fit.kl_ramp": 0.25, "fit.weight_decay_ramp": 0.25, "fit.val_every": max(1, epochs // 10),
        "fit.seed": args.seed,
    })
    return data, spec


def run(args: argparse.Namespace, session: Session) -> dict[str, Any]:
    """Check the options, fit (or load) the model, run the checks; return the summary."""
    if args.checkpoint is not None:
        try:
            model, guide, spec, ckpt = load_run(args.checkpoint)
        except (FileNotFoundError, SpecError) as exc:
            raise OptionError(f"--checkpoint {args.checkpoint}: {exc}") from None
        data_cfg, seed = ckpt["meta"]["data"], ckpt["meta"]["seed"]
    else:
        data_cfg, spec = setup(args)
        seed = args.seed
    samples = args.samples or (20 if args.quick else 100)
    meta = {"script": "ppc", "data": data_cfg, "seed": seed}
    opts = session.options = check_run_options(args, "ppc", {**meta, "spec": spec.to_dict()})  # a resumed fit must match
    out, device = opts.out, opts.device
    data = make_lorenz(seed=seed, **data_cfg)
    tpc = data_cfg["trials_per_condition"]

    if args.checkpoint is not None:
        fit_info = {"loaded": str(args.checkpoint), "epoch": ckpt["epoch"]}
    else:
        model, guide = build(spec, data.train.n_neurons, data.train.n_heldin)
        result = fit(model, guide, data.train, data.valid, spec.fit, device=device,
                     checkpoint_dir=opts.checkpoint_dir, resume=opts.resume_from, progress=not args.no_progress,
                     meta=run_meta(spec, data.train.n_neurons, data.train.n_heldin, **meta))
        fit_info = {"epochs": spec.fit.epochs, "best_epoch": result.best_epoch, "fit_seconds": result.seconds}
    model.cpu()
    guide.cpu()

    valid = data.valid
    conditions = (valid.index.numpy() // tpc).tolist()
    idata = predictive_checks(model, guide, valid, n_samples=samples, seed=seed)
    idata.constant_data["condition"] = ("trial", np.asarray(conditions))
    nc = save_netcdf(idata, out / "ppc.nc")
    figures = save_ppc_figures(idata, out / "figures", conditions=conditions)

    ci = credible_intervals(model, guide, valid, n_samples=min(samples, 50), prob=0.9)
    t = valid.n_observed_bins
    true = data.valid_rates[:, :t]
    coverage = float(np.mean((true >= ci["rates"].lower[:, :t]) & (true <= ci["rates"].upper[:, :t])))
    for name, fig in {
        "rates_ci": plot_credible_intervals(ci["rates"], truth=data.valid_rates, unit_name="neuron"),
        "latents_ci": plot_credible_intervals(ci["z"], label="latent position z", unit_name="latent"),
    }.items():
        path = out / "figures" / f"posterior_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        figures[f"posterior_{name}"] = path

    table = ppc_pvalues(idata, "posterior_predictive")
    table.to_csv(out / "pvalues.csv")
    print(f"posterior predictive p-values, {P_VALUE} (near 0 or 1: a misfit):", file=sys.stderr)
    print(table.to_string(float_format=lambda x: f"{x:.3f}"), file=sys.stderr)
    pit = randomized_pit(idata, "posterior_predictive", seed=seed)
    ks = stats.kstest(pit, "uniform")
    summary = {
        "out": str(out),
        "netcdf": str(nc),
        "groups": list(idata.groups()),
        "figures": sorted(str(p) for p in figures.values()),
        **fit_info,
        "rate_r2": rate_r2(true, ci["rates"].mean[:, :t]),
        "rate_ci90_coverage": coverage,
        "psth_corr_posterior": psth_correlation(idata, "posterior_predictive", conditions),
        "psth_corr_prior": psth_correlation(idata, "prior_predictive", conditions),
        "pit_ks": {"statistic": float(ks.statistic), "pvalue": float(ks.pvalue)},
        "pvalues": {k: {c: float(v) for c, v in row.items()} for k, row in table.iterrows()},
    }
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run as a command: exit status 0, 2 (bad input), 130 (Ctrl-C) or 143 (SIGTERM)."""
    return run_command(lambda session: run(parse_args(argv), session), "examples/ppc.py")


if __name__ == "__main__":
    sys.exit(main())
