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

    python examples/ppc.py                      # fit (~3 min on 2 CPU cores) and check
    python examples/ppc.py --quick              # smoke run
    python examples/ppc.py --checkpoint runs/ppc/checkpoints   # reuse a fit

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.metrics import rate_r2
from pyro_langevin.models import LangevinFlow
from pyro_langevin.ppc_plots import (
    plot_credible_intervals,
    ppc_pvalues,
    psth_correlation,
    randomized_pit,
    save_ppc_figures,
)
from pyro_langevin.predictive import credible_intervals, predictive_checks, save_netcdf
from pyro_langevin.training import FitConfig, default_device, fit, load_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, few epochs and draws (smoke run)")
    p.add_argument("--out", default="runs/ppc", help="output folder (default runs/ppc)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 40, quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--samples", type=int, default=None, help="predictive draws (default 100, quick 20)")
    p.add_argument("--checkpoint", default=None,
                   help="folder with best.pt (or last.pt) and model.json from an earlier run: skip fitting")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"data": dict(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12, n_heldout=3),
                "latent_dim": 4, "hidden": 16, "epochs": args.epochs or 3, "samples": args.samples or 20}
    return {"data": dict(n_conditions=20, trials_per_condition=10, n_bins=50, n_neurons=30, n_heldout=5),
            "latent_dim": 8, "hidden": 64, "epochs": args.epochs or 40, "samples": args.samples or 100}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device) if args.device else default_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = setup(args)
    if args.checkpoint is not None:  # rebuild exactly what was fitted
        ck_dir = Path(args.checkpoint)
        meta_path = ck_dir / "model.json"
        if not meta_path.is_file():
            raise SystemExit(f"--checkpoint {ck_dir}: no model.json (write it by running this script without --checkpoint)")
        cfg = json.loads(meta_path.read_text())
        seed = cfg["seed"]
    else:
        seed = args.seed
    data = make_lorenz(seed=seed, **cfg["data"])
    tpc = cfg["data"]["trials_per_condition"]
    model = LangevinFlow(data.train.n_neurons, latent_dim=cfg["latent_dim"], dt=0.1)
    guide = GRUGuide(model, data.train.n_heldin, hidden=cfg["hidden"])

    if args.checkpoint is not None:
        path = ck_dir / "best.pt" if (ck_dir / "best.pt").is_file() else ck_dir / "last.pt"
        ckpt = load_checkpoint(path)
        state = ckpt.get("best_state") if path.name == "best.pt" and ckpt.get("best_state") else ckpt
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        fit_info = {"loaded": str(path)}
    else:
        ck_dir = out / "checkpoints"
        ck_dir.mkdir(parents=True, exist_ok=True)
        (ck_dir / "model.json").write_text(json.dumps({**cfg, "seed": seed}))
        epochs = cfg["epochs"]
        config = FitConfig(epochs=epochs, batch_size=64, lr=5e-3, weight_decay=1e-5,
                           kl_ramp_epochs=max(1, epochs // 4), weight_decay_ramp_epochs=max(1, epochs // 4),
                           val_every=max(1, epochs // 10), seed=seed)
        result = fit(model, guide, data.train, data.valid, config, device=device, checkpoint_dir=ck_dir,
                     progress=not args.no_progress)
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
        "rates_ci": plot_credible_intervals(ci["rates"], truth=data.valid_rates),
        "latents_ci": plot_credible_intervals(ci["z"], label="z"),
    }.items():
        path = out / "figures" / f"posterior_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        figures[f"posterior_{name}"] = path

    table = ppc_pvalues(idata, "posterior_predictive")
    table.to_csv(out / "pvalues.csv")
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


if __name__ == "__main__":
    main()
