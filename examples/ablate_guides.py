"""Ablate the inference side (guides) and the prior side (potential, damping, noise) on Lorenz data.

Every variant is fitted with the same ``fit`` call and the same epoch budget, selects its checkpoint
on half of the validation trials, and is scored on the other half (the test trials, which no fit
uses; the non-amortized mean-field guide is fitted to their held-in spikes with the model frozen):

* ``ELBO/bin``: the ELBO (full KL weight, eval mode, mean of 4 draws) per trial-bin;
* ``rate R2``: posterior-mean rates (20 draws) against the true rates, all neurons and bins;
* ``co-bps``: bits per spike of the held-out neurons (the guide never reads them);
* ``evidence/bin``: held-out log evidence ``log p(x)`` of the test trials (all neurons and bins) by
  importance sampling with the variant's own guide as proposal (``pyro_langevin.evidence``,
  ``--particles`` draws per trial), per trial-bin; ``d evidence``: its paired difference to the
  best variant, summed over the test trials, with the standard error of the per-trial differences;
* ``gap/bin``: evidence minus the ELBO of the same draws (the guide's posterior gap);
* ``k>0.7``: share of test trials whose Pareto k-hat exceeds 0.7 (estimate not trusted there);
* ``fit s``: wall time of ``fit`` (plus, for the non-amortized mean-field guide, the time of its
  test-time inference on the test trials with the model frozen and held-out neurons hidden).

The evidence of a model does not depend on the guide; only the estimate's quality does. So a second
table (``--fixed-model``, default the ``gru`` and ``bigru`` variants' models, each in turn) fits every
guide to ONE fixed model
(frozen) and estimates that model's evidence with each: good proposals must agree (within their
Monte Carlo error), poor ones (k-hat > 0.7) fall short. ``--check-k`` also scores every variant with
2K draws and records how far the total moved.

Run::

    python examples/ablate_guides.py                 # default budget (~30 min on 2 CPU cores): runs/ablate
    python examples/ablate_guides.py --quick         # smoke run, well under a minute: runs/ablate-quick
    python examples/ablate_guides.py --only gru,initial_state --epochs 100 --out runs/ablate-100
    python examples/ablate_guides.py --resume        # run the variants an interrupted run did not finish

The last line printed is the results as JSON; ``--out`` also gets ``results.json`` (written after
every variant), ``fixed_model.json``, ``table.md`` and ``evidence.png`` (the evidence of every
variant, and of the fixed model under every guide). An ``--out`` that holds an earlier run needs ``--resume`` (keep its
finished variants) or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_langevin.atomic import atomic_path
from pyro_langevin.batch import Batch
from pyro_langevin.console import Session, run_command
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.evidence import Evidence, compare, log_evidence
from pyro_langevin.metrics import bits_per_spike, rate_r2
from pyro_langevin.models import LangevinFlow
from pyro_langevin.options import ArgumentParser, OptionError, add_run_arguments, check_run_options, positive_int
from pyro_langevin.plots import plot_evidence_compare
from pyro_langevin.posterior import eval_mode, posterior_rates
from pyro_langevin.spec import GUIDES, FitConfig, RunSpec, build, load_run, run_meta
from pyro_langevin.training import fit

#: Guide variants: every guide of the run spec's registry (``guide.name``), fitted with the default prior.
GUIDE_VARIANTS: list[str] = list(GUIDES)
#: Prior variants: dotted keys of the run spec, fitted with the GRU guide.
PRIORS: dict[str, dict[str, Any]] = {
    "prior_zero": {"model.potential": "zero"},
    "prior_quadratic": {"model.potential": "quadratic"},
    "prior_mlp": {"model.potential": "mlp"},
    "prior_learn_gamma_sigma": {"model.learn_gamma": True, "model.learn_sigma": True},
    "prior_overdamped": {"model.overdamped": True},
}
VARIANTS: list[str] = [*GUIDE_VARIANTS, *PRIORS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/ablate_guides.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "ablate", "epochs per variant (default 40, quick 2)", "tiny data and 2 epochs per variant")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--particles", type=positive_int, default=None,
                   help="guide draws per test trial for the log evidence (default 1000, quick 50)")
    p.add_argument("--check-k", action="store_true", help="also estimate every evidence with twice the draws")
    p.add_argument("--fixed-model", default="gru,bigru",
                   help="comma-separated variants whose fitted models every guide is refitted to, each in turn "
                        "(default gru,bigru), or 'none' to skip those tables")
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


def fit_guide_only(model: LangevinFlow, guide: torch.nn.Module, train: Batch, valid: Batch | None, config: FitConfig,
                   device, progress: bool) -> float:
    """Fit a guide's parameters with the model frozen (its readout left as it is); return seconds."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        result = fit(model, guide, train, valid, config, device=device, init_rates=False, progress=progress)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return result.seconds


def infer_trials(model: LangevinFlow, guide: torch.nn.Module, batch: Batch, config: FitConfig, device, progress: bool) -> float:
    """Fit a non-amortized guide's parameters for ``batch`` with the model frozen; return seconds.

    Held-out neurons are hidden from this fit, so their bits/spike stay a fair held-out score.
    """
    return fit_guide_only(model, guide, heldin_only(batch), None, config, device, progress)


@torch.no_grad()
def elbo_per_bin(model, guide, batch: Batch, n_draws: int = 4) -> float:
    """ELBO (full KL weight, eval mode) per trial-bin, averaged over ``n_draws`` guide draws."""
    elbo = TraceMeanField_ELBO()
    with eval_mode(model, guide):
        loss = sum(float(elbo.loss(model, guide, batch)) for _ in range(n_draws)) / n_draws
    return -loss / (batch.n_trials * batch.n_bins)


def split_validation(valid: Batch, seed: int) -> tuple[Batch, Batch]:
    """Disjoint halves of the validation trials: (select, test). ``select`` picks each fit's
    checkpoint; ``test`` trials enter no fit and every score is computed on them."""
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(valid.n_trials))
    half = valid.n_trials // 2
    return valid[perm[:half].sort().values], valid[perm[half:].sort().values]


def base_spec(data, epochs: int, seed: int, latent_dim: int) -> RunSpec:
    """The one budget every variant shares (the GRU guide and the default prior)."""
    n_total = int(max(data.train.index.max(), data.valid.index.max())) + 1
    return RunSpec().override({
        "model.latent_dim": latent_dim, "model.dt": 0.1, "guide.name": "gru", "guide.hidden": 64,
        "guide.n_trials": n_total, "guide.n_observed_bins": data.train.n_observed_bins,
        "fit.epochs": epochs, "fit.batch_size": 64, "fit.lr": 5e-3, "fit.weight_decay": 1e-5, "fit.kl_ramp": 0.25,
        "fit.weight_decay_ramp": 0.25, "fit.val_every": max(1, epochs // 10), "fit.seed": seed,
    })


def variant_spec(name: str, base: RunSpec) -> RunSpec:
    """``base`` with the variant's guide (``guide.name``) or prior (model keys)."""
    return base.override(PRIORS[name] if name in PRIORS else {"guide.name": name})


def score_evidence(model, guide, test: Batch, particles: int, seed: int, check_k: bool) -> dict[str, Any]:
    """Joint and held-out-neuron log evidence of ``test`` (same draws), and with ``check_k`` the joint
    again with twice the draws."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # k-hat is recorded and tabulated
        ev = log_evidence(model, guide, test, particles, quantity="heldout", seed=seed)
        out = {"evidence": ev.joint.to_dict(), "heldout_evidence": ev.to_dict(), "k_check": None}
        if check_k:
            ev2 = log_evidence(model, guide, test, 2 * particles, seed=seed + 1)
            out["k_check"] = {"K": particles, "elpd_K": ev.joint.total(), "elpd_2K": ev2.total(),
                              "change": ev2.total() - ev.joint.total(), "se": ev.joint.summary()["se_nats"],
                              "mc_se_K": ev.joint.summary()["mc_se_nats"], "mc_se_2K": ev2.summary()["mc_se_nats"]}
    return out


def run_variant(name: str, data, test: Batch, select: Batch, args: argparse.Namespace, epochs: int, device,
                latent_dim: int, particles: int, out: Path) -> dict[str, Any]:
    spec = variant_spec(name, base_spec(data, epochs, args.seed, latent_dim))
    model, guide = build(spec, data.train.n_neurons, data.train.n_heldin)
    config, guide_name = spec.fit, spec.guide.name
    amortized = guide_name != "meanfield"
    progress = not args.no_progress
    # The mean-field guide has no parameters trained for the held-out trials during fit, so its
    # validation loss would not select anything meaningful: it keeps the final state instead.
    result = fit(model, guide, data.train, select if amortized else None, config, device=device, progress=progress,
                 checkpoint_dir=out / "variants" / name / "checkpoints",
                 meta=run_meta(spec, data.train.n_neurons, data.train.n_heldin))
    seconds = result.seconds
    if not amortized:
        seconds += infer_trials(model, guide, test, config, device, progress)
    model.cpu()
    guide.cpu()
    rates = posterior_rates(model, guide, test, n_samples=20).numpy()
    n_in, t = test.n_heldin, test.n_observed_bins
    spikes = test.target.numpy()
    true = data.valid_rates[_rows(data.valid, test)]
    return {
        "variant": name,
        "guide": guide_name,
        "prior": {k.split(".", 1)[1]: v for k, v in PRIORS.get(name, {}).items()} or {"potential": "oscillators"},
        "epochs": epochs,
        "train_loss": result.history[-1]["loss"],
        "valid_elbo_per_bin": elbo_per_bin(model, guide, test),
        "rate_r2": rate_r2(true[:, :t], rates[:, :t]),
        "heldout_bps": float(bits_per_spike(rates[:, :t, n_in:], spikes[:, :t, n_in:])),
        "fit_seconds": seconds,
        "best_epoch": result.best_epoch,
        "n_test_trials": test.n_trials,
        **score_evidence(model, guide, test, particles, args.seed, args.check_k),
    }


def _rows(batch: Batch, subset: Batch) -> np.ndarray:
    """Rows of ``batch`` holding the trials of ``subset`` (matched by ``index``)."""
    pos = {int(i): k for k, i in enumerate(batch.index.tolist())}
    return np.asarray([pos[int(i)] for i in subset.index.tolist()])


def fixed_model_rows(base: str, data, test: Batch, select: Batch, args: argparse.Namespace, epochs: int, device,
                     latent_dim: int, particles: int, out: Path) -> list[dict[str, Any]]:
    """Every guide refitted to the frozen model of variant ``base``; that one model's evidence under each."""
    model, _, spec, _ = load_run(out / "variants" / base / "checkpoints", "best")
    rows = []
    for name in GUIDE_VARIANTS:
        with torch.random.fork_rng(devices=[]):  # as build() seeds a guide, but for the loaded model
            torch.manual_seed(spec.fit.seed)
            guide = spec.override({"guide.name": name}).guide.build(model, data.train.n_heldin)
        config = spec.fit
        print(f"== fixed model {base}: guide {name}", file=sys.stderr, flush=True)
        if name == "meanfield":
            seconds = infer_trials(model, guide, test, config, device, not args.no_progress)
        else:
            seconds = fit_guide_only(model, guide, data.train, select, config, device, not args.no_progress)
        model.cpu()
        guide.cpu()
        rows.append({"model": base, "guide": name, "fit_seconds": seconds,
                     "elbo_per_bin": elbo_per_bin(model, guide, test),
                     **score_evidence(model, guide, test, particles, args.seed, args.check_k)})
    return rows


def evidence_table(rows: list[dict[str, Any]], key: str) -> Any:
    """:func:`~pyro_langevin.evidence.compare` of the rows' joint evidence, named by ``key``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return compare({r[key]: Evidence.from_dict(r["evidence"]) for r in rows})


def format_table(rows: list[dict[str, Any]], n_bins: int) -> str:
    comp = evidence_table(rows, "variant")
    head = ("| variant | guide | prior | ELBO/bin | rate R2 | co-bps | evidence/bin | d evidence (nats) "
            "| gap/bin | k>0.7 | fit s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        prior = ",".join(f"{k}={v}" for k, v in r["prior"].items())
        c = comp.loc[r["variant"]]
        per_bin = c["n_trials"] * n_bins
        lines.append(
            f"| {r['variant']} | {r['guide']} | {prior} | {r['valid_elbo_per_bin']:.2f} | {r['rate_r2']:.3f} "
            f"| {r['heldout_bps']:.3f} | {c['elpd'] / per_bin:.2f} | {-c['d_elpd']:.0f} +- {c['dse']:.0f} "
            f"| {c['gap'] / per_bin:.2f} | {c['frac_khat_gt_0_7']:.2f} | {r['fit_seconds']:.1f} |"
        )
    return "\n".join(lines)


def format_fixed_table(rows: list[dict[str, Any]], n_bins: int) -> str:
    comp = evidence_table(rows, "guide")
    lines = [f"fixed model: the {rows[0]['model']} variant's; every guide refitted to it (model frozen)", "",
             "| guide | ELBO/bin | evidence/bin | d evidence (nats) | MC s.e. (nats) | gap/bin | k>0.7 |",
             "|" + "---|" * 7]
    for r in rows:
        c = comp.loc[r["guide"]]
        per_bin = c["n_trials"] * n_bins
        lines.append(f"| {r['guide']} | {r['elbo_per_bin']:.2f} | {c['elpd'] / per_bin:.3f} | {-c['d_elpd']:.1f} +- "
                     f"{c['dse']:.1f} | {c['mc_se']:.1f} | {c['gap'] / per_bin:.2f} | {c['frac_khat_gt_0_7']:.2f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, session: Session) -> dict[str, Any]:
    """Check the options, fit every chosen variant not yet finished; return the results."""
    names = chosen_variants(args.only)
    fixed_models = [] if args.fixed_model == "none" else [m.strip() for m in args.fixed_model.split(",") if m.strip()]
    if any(m not in names for m in fixed_models):
        raise OptionError(f"--fixed-model {args.fixed_model!r}: each must be among the variants run ({','.join(names)}); "
                          "name one of them, or 'none'")
    epochs = args.epochs or (2 if args.quick else 40)
    particles = args.particles or (50 if args.quick else 1000)
    opts = session.options = check_run_options(args, "ablate")
    out, device = opts.out, opts.device
    rows = [r for r in finished_rows(out / "results.json", epochs) if r["variant"] in names] if args.resume else []
    if args.quick:
        data = make_lorenz(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12, n_heldout=3, seed=args.seed)
        latent_dim = 4
    else:
        data = make_lorenz(n_conditions=40, trials_per_condition=8, n_bins=50, n_neurons=30, n_heldout=5, seed=args.seed)
        latent_dim = 8
    select, test = split_validation(data.valid, args.seed)
    for name in names:
        if any(r["variant"] == name for r in rows):
            print(f"== {name}: finished in the earlier run (kept)", file=sys.stderr, flush=True)
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        session.interrupt_note = lambda: (f"interrupted during variant {name}; {len(rows)} finished variant(s) saved in "
                                          f"{out / 'results.json'}; rerun with --resume")
        rows.append(run_variant(name, data, test, select, args, epochs, device, latent_dim, particles, out))
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    table = format_table(rows, test.n_bins)
    fixed: list[dict[str, Any]] = []
    tables = {"every variant, own guide": evidence_table(rows, "variant")}
    for base in fixed_models:
        session.interrupt_note = lambda: f"interrupted while refitting guides to the {base} model"
        mine = fixed_model_rows(base, data, test, select, args, epochs, device, latent_dim, particles, out)
        fixed += mine
        with atomic_path(out / "fixed_model.json") as tmp:
            tmp.write_text(json.dumps(fixed, indent=1))
        table += "\n\n" + format_fixed_table(mine, test.n_bins)
        tables[f"{base} model, every guide"] = evidence_table(mine, "guide")
    (out / "table.md").write_text(table + "\n")
    fig = plot_evidence_compare(tables, title=f"held-out log evidence of {test.n_trials} Lorenz test trials (K={particles})")
    fig.savefig(out / "evidence.png", dpi=120, bbox_inches="tight")
    print(table)
    results = {"out": str(out), "epochs": epochs, "particles": particles, "n_train": data.train.n_trials,
               "n_select": select.n_trials, "n_test": test.n_trials, "results": rows, "fixed_model": fixed}
    print(json.dumps(results, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    return results


def main(argv: list[str] | None = None) -> int:
    """Run as a command: exit status 0, 2 (bad input), 130 (Ctrl-C) or 143 (SIGTERM)."""
    return run_command(lambda session: run(parse_args(argv), session), "examples/ablate_guides.py")


if __name__ == "__main__":
    sys.exit(main())
