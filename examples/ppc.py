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
    python examples/ppc.py --checkpoint runs/ppc/checkpoints --out runs/ppc-again   # reuse a fit

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

from pyro_langevin.checkpoints import load_checkpoint
from pyro_langevin.checks import P_VALUE, ppc_pvalues, psth_correlation, randomized_pit
from pyro_langevin.console import Session, run_command
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.metrics import rate_r2
from pyro_langevin.models import LangevinFlow
from pyro_langevin.options import ArgumentParser, OptionError, add_run_arguments, check_run_options, positive_int
from pyro_langevin.plots import plot_credible_intervals, save_ppc_figures
from pyro_langevin.predictive import credible_intervals, predictive_checks, save_netcdf
from pyro_langevin.training import FitConfig, fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/ppc.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "ppc", "training epochs (default 40, quick 3)", "tiny data, 3 epochs and 20 draws")
    p.add_argument("--samples", type=positive_int, default=None, help="predictive draws (default 100, quick 20)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="folder with best.pt (or last.pt) and model.json from an earlier run: skip fitting")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"data": dict(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12, n_heldout=3),
                "latent_dim": 4, "hidden": 16, "epochs": args.epochs or 3, "samples": args.samples or 20}
    return {"data": dict(n_conditions=20, trials_per_condition=10, n_bins=50, n_neurons=30, n_heldout=5),
            "latent_dim": 8, "hidden": 64, "epochs": args.epochs or 40, "samples": args.samples or 100}


def reused_setup(ck_dir: Path) -> dict[str, Any]:
    """The settings of the fit in ``--checkpoint`` (its model.json), checked."""
    meta_path = ck_dir / "model.json"
    if not meta_path.is_file():
        raise OptionError(f"--checkpoint {ck_dir}: no model.json (write it by running this script without --checkpoint)")
    if not any((ck_dir / name).is_file() for name in ("best.pt", "last.pt")):
        raise OptionError(f"--checkpoint {ck_dir}: neither best.pt nor last.pt")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise OptionError(f"--checkpoint {meta_path}: not JSON ({exc})") from None


def run(args: argparse.Namespace, session: Session) -> dict[str, Any]:
    """Check the options, fit (or load) the model, run the checks; return the summary."""
    cfg = setup(args) if args.checkpoint is None else reused_setup(args.checkpoint)
    if args.samples is not None:
        cfg["samples"] = args.samples
    seed = cfg.get("seed", args.seed)
    meta = {"script": "ppc", "data": cfg["data"], "latent_dim": cfg["latent_dim"], "hidden": cfg["hidden"],
            "seed": seed}  # what a resumed fit must match
    opts = session.options = check_run_options(args, "ppc", meta)
    out, device = opts.out, opts.device
    data = make_lorenz(seed=seed, **cfg["data"])
    tpc = cfg["data"]["trials_per_condition"]
    model = LangevinFlow(data.train.n_neurons, latent_dim=cfg["latent_dim"], dt=0.1)
    guide = GRUGuide(model, data.train.n_heldin, hidden=cfg["hidden"])

    if args.checkpoint is not None:
        ck_dir = args.checkpoint
        path = ck_dir / "best.pt" if (ck_dir / "best.pt").is_file() else ck_dir / "last.pt"
        ckpt = load_checkpoint(path)
        state = ckpt.get("best_state") if path.name == "best.pt" and ckpt.get("best_state") else ckpt
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        fit_info = {"loaded": str(path)}
    else:
        ck_dir = opts.checkpoint_dir
        ck_dir.mkdir(parents=True, exist_ok=True)
        (ck_dir / "model.json").write_text(json.dumps({**cfg, "seed": seed}))
        epochs = cfg["epochs"]
        config = FitConfig(epochs=epochs, batch_size=64, lr=5e-3, weight_decay=1e-5,
                           kl_ramp=0.25, weight_decay_ramp=0.25,
                           val_every=max(1, epochs // 10), seed=seed)
        result = fit(model, guide, data.train, data.valid, config, device=device, checkpoint_dir=ck_dir,
                     resume=opts.resume_from, progress=not args.no_progress, meta=meta)
        fit_info = {"epochs": epochs, "best_epoch": result.best_epoch, "fit_seconds": result.seconds}
    model.cpu()
    guide.cpu()

    valid = data.valid
    conditions = (valid.index.numpy() // tpc).tolist()
    idata = predictive_checks(model, guide, valid, n_samples=cfg["samples"], seed=seed)
    idata.constant_data["condition"] = ("trial", np.asarray(conditions))
    nc = save_netcdf(idata, out / "ppc.nc")
    figures = save_ppc_figures(idata, out / "figures", conditions=conditions)

    ci = credible_intervals(model, guide, valid, n_samples=min(cfg["samples"], 50), prob=0.9)
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
