"""Held-out evidence by importance sampling (pyro_langevin.evidence) and the log_likelihood group."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from scipy.special import gammaln, logsumexp, xlogy

from pyro_langevin.batch import make_batch
from pyro_langevin.evidence import (
    KHAT_THRESHOLD, compare, evidence_from_log_weights, format_compare, log_evidence,
)
from pyro_langevin.guides import GRUGuide, StepwiseGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.predictive import predictive_checks

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

TINY_DECODER = {"d_model": 8, "n_heads": 1, "dim_feedforward": 8, "dropout": 0.0}


def tiny_model(n_neurons: int = 3, latent_dim: int = 1, seed: int = 1) -> LangevinFlow:
    """A model small enough to integrate by brute force: 1-D latent, 3 neurons, 2 counts per bin."""
    torch.manual_seed(seed)
    model = LangevinFlow(n_neurons, latent_dim=latent_dim, dt=0.2, potential="quadratic", decoder_kwargs=TINY_DECODER)
    with torch.no_grad():
        model.decoder.readout.bias.fill_(math.log(2.0))
    return model.eval()


def sampled_batch(model: LangevinFlow, n_trials: int, n_obs: int, n_fwd: int, n_heldin: int, seed: int = 0):
    """Trials drawn from the model's prior predictive, split into held-in/held-out and observed/forward."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        x = model(n_trials=n_trials, n_bins=n_obs + n_fwd)
    return make_batch(x[:, :n_obs, :n_heldin], x[:, :n_obs, n_heldin:], x[:, n_obs:, :n_heldin],
                      x[:, n_obs:, n_heldin:])


class TinyScaleGuide(StepwiseGuide):
    """A deliberately bad proposal: every latent site has a tiny fixed scale around the prior mean."""

    deterministic_prepare = True

    def __init__(self, model: LangevinFlow, scale: float = 1e-3) -> None:
        super().__init__(model)
        self.scale = scale

    def initial(self, ctx, batch):
        zeros = batch.input.new_zeros(batch.n_trials, self.prior.latent_dim)
        return dist.Normal(zeros, self.scale).to_event(1), dist.Normal(zeros, self.scale).to_event(1)

    def step(self, t, z, v, prior, ctx):
        return dist.Normal(prior.v_loc, prior.v_scale * self.scale).to_event(1)


@pytest.fixture(scope="module")
def fitted_tiny():
    """The tiny model with a GRU guide fitted to 3 trials (the model frozen), and those trials."""
    model = tiny_model()
    batch = sampled_batch(model, 3, n_obs=3, n_fwd=1, n_heldin=2, seed=1)
    pyro.clear_param_store()
    guide = GRUGuide(model, 2, hidden=8, dropout=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    pyro.set_rng_seed(0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO())
    for _ in range(300):
        svi.step(batch)
    return model, guide.eval(), batch


def test_mean_log_weight_is_trace_elbo_on_the_same_draws(fitted_tiny):
    """One draw per trial: the summed log weights are Pyro's Trace_ELBO estimate of the same draw
    (the full log joint, forward bins and masks included, minus the guide's log density)."""
    model, guide, batch = fitted_tiny
    masked = batch.with_inputs(batch.input, batch.mask.clone().index_fill_(2, torch.tensor([2]), False))
    for b in (batch, masked):
        pyro.set_rng_seed(7)
        ev = log_evidence(model, guide, b, num_particles=1, seed=None, warn=False)
        pyro.set_rng_seed(7)
        elbo = -Trace_ELBO().loss(model, guide, b)
        assert ev.elbo.sum() == pytest.approx(elbo, rel=1e-6, abs=1e-3)
        assert np.array_equal(ev.elbo, ev.log_evidence)  # K = 1: the bound is the ELBO


def test_estimate_never_below_elbo_and_rises_with_k():
    model = LangevinFlow(8, latent_dim=4, dt=0.1, decoder_kwargs=TINY_DECODER)
    batch = sampled_batch(tiny_model(8, 4, seed=1), 6, n_obs=6, n_fwd=2, n_heldin=6, seed=1)
    guide = GRUGuide(model, 6, hidden=8)
    totals = {}
    for k in (1, 8, 64):
        runs = [log_evidence(model, guide, batch, k, seed=s, warn=False) for s in range(3)]
        for ev in runs:
            assert (ev.log_evidence >= ev.elbo - 1e-9).all()
            assert (ev.gap >= -1e-9).all()
        totals[k] = np.mean([ev.total() for ev in runs])
    assert totals[1] < totals[8] < totals[64]


def test_estimate_matches_brute_force_marginal_likelihood(fitted_tiny):
    """log p(x) by 2e5 prior draws (rates from the model, Poisson by hand) against the guide's
    importance-sampling estimate with K = 20000: equal within their Monte Carlo errors."""
    model, guide, batch = fitted_tiny
    pyro.set_rng_seed(1)
    x = batch.target.double().numpy()
    lls = []
    with torch.no_grad():
        for _ in range(4):
            rates = poutine.trace(model).get_trace(n_trials=50_000, n_bins=batch.n_bins).nodes["rates"]["value"]
            r = rates.double().numpy()[None]
            lls.append((xlogy(x[:, None], r) - r - gammaln(x[:, None] + 1)).sum((2, 3)))
    ll = np.concatenate(lls, axis=1)
    brute = logsumexp(ll, axis=1) - math.log(ll.shape[1])
    w = np.exp(ll - logsumexp(ll, axis=1, keepdims=True))
    brute_se = np.sqrt((ll.shape[1] * (w ** 2).sum(1) - 1) / ll.shape[1])
    ev = log_evidence(model, guide, batch, 20_000, max_tiled=20_000, seed=0, warn=False)
    assert (ev.mc_se < 0.1).all() and (brute_se < 0.1).all()
    tol = 4 * np.sqrt(ev.mc_se ** 2 + brute_se ** 2) + 0.01
    assert np.all(np.abs(ev.log_evidence - brute) < tol), (ev.log_evidence, brute, tol)
    # the guide is a far better proposal than the prior: its ELBO is much closer to log p(x)
    assert np.all(brute - ev.elbo < 0.75 * (brute - ll.mean(axis=1)))


def test_compare_ranks_the_data_generating_model_first():
    truth = tiny_model(6, 4, seed=2)
    batch = sampled_batch(truth, 30, n_obs=5, n_fwd=1, n_heldin=4, seed=2)
    wrong = copy.deepcopy(truth)
    with torch.no_grad():
        wrong.decoder.readout.bias.add_(0.5)  # every rate 1.65 times too high
    torch.manual_seed(0)
    models = {"wrong": (wrong, GRUGuide(wrong, 4, hidden=8)), "truth": (truth, GRUGuide(truth, 4, hidden=8))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = compare(models, batch, num_particles=100, seed=0)
    assert list(table.index) == ["truth", "wrong"]
    assert list(table["rank"]) == [0, 1]
    assert table.loc["truth", "d_elpd"] == 0 and table.loc["truth", "dse"] == 0
    assert table.loc["wrong", "d_elpd"] > 4 * table.loc["wrong", "dse"] > 0
    assert table.loc["truth", "bits_per_spike"] > table.loc["wrong", "bits_per_spike"]
    for col in ("elpd", "se", "d_elpd", "dse", "warning", "khat_max", "frac_khat_gt_0_7", "nats_per_spike"):
        assert col in table.columns
    assert "truth" in format_compare(table)
    # a paired difference is far tighter than the two standard errors: the point of dse
    assert table.loc["wrong", "dse"] < table.loc["truth", "se"]


def test_khat_flags_a_bad_proposal():
    model = tiny_model()
    batch = sampled_batch(model, 8, n_obs=3, n_fwd=0, n_heldin=3, seed=3)
    with pytest.warns(RuntimeWarning, match=r"k-hat > 0.67 \(ArviZ's threshold for 1000 draws\)"):
        bad = log_evidence(model, TinyScaleGuide(model), batch, 1000, seed=0)
    assert bad.flagged.mean() >= 0.75 and np.nanmax(bad.khat) > 1.0
    assert bad.to_frame()["flagged"].sum() == bad.flagged.sum()
    prior_guide = poutine.block(model, hide=["spikes"])  # the prior as proposal: weights = p(x | z), bounded
    good = log_evidence(model, prior_guide, batch, 1000, seed=0, warn=False)
    assert good.khat_threshold == pytest.approx(1 - 1 / 3) and np.all(good.khat < good.khat_threshold)
    assert good.total() > bad.total()


def test_heldout_quantity_is_the_joint_minus_the_heldin_evidence(fitted_tiny):
    model, guide, batch = fitted_tiny
    cond = log_evidence(model, guide, batch, 500, quantity="heldout", seed=0, warn=False)
    joint = log_evidence(model, guide, batch, 500, seed=0, warn=False)
    heldin = evidence_from_log_weights(cond.log_weights_heldin, warn=False)
    np.testing.assert_allclose(cond.log_weights, joint.log_weights)  # same draws
    np.testing.assert_allclose(cond.joint.log_evidence, joint.log_evidence)
    np.testing.assert_allclose(cond.joint.n_spikes, joint.n_spikes)
    back = type(cond).from_dict(json.loads(json.dumps(cond.to_dict())))
    np.testing.assert_allclose(back.log_evidence, cond.log_evidence)
    np.testing.assert_allclose(back.joint.elbo, joint.elbo)
    np.testing.assert_allclose(cond.log_evidence, joint.log_evidence - heldin.log_evidence)
    scored = batch.mask.clone()
    scored[:, :batch.n_observed_bins, :batch.n_heldin] = False
    np.testing.assert_allclose(cond.n_spikes, (batch.target * scored).sum((1, 2)).numpy())
    assert (cond.log_evidence < 0).all()


def test_log_weight_summaries_and_bad_input():
    const = evidence_from_log_weights(np.full((2, 30), -3.0), warn=False)
    np.testing.assert_allclose(const.log_evidence, -3.0)
    np.testing.assert_allclose(const.ess, 30.0)
    np.testing.assert_allclose(const.mc_se, 0.0, atol=1e-7)
    with pytest.warns(RuntimeWarning, match="at least 25 draws"):
        few = evidence_from_log_weights(np.zeros((2, 5)))
    assert np.isnan(few.khat).all() and not few.flagged.any()
    with pytest.raises(FloatingPointError, match="non-finite"):
        evidence_from_log_weights(np.array([[0.0, -np.inf]]))
    model = tiny_model()
    batch = sampled_batch(model, 2, 3, 0, 3)
    guide = GRUGuide(model, 3, hidden=4)
    with pytest.raises(ValueError, match="num_particles"):
        log_evidence(model, guide, batch, 0)
    with pytest.raises(ValueError, match="quantity"):
        log_evidence(model, guide, batch, 2, quantity="marginal")
    with pytest.raises(ValueError, match="nothing to predict"):
        log_evidence(model, guide, batch, 2, quantity="heldout")
    with pytest.raises(ValueError, match="not sampled by the guide"):
        log_evidence(model, poutine.block(guide, hide=["z_0"]), batch, 2)


def test_log_likelihood_group_lets_arviz_loo_and_waic_run():
    model = tiny_model(5, 4, seed=4)
    batch = sampled_batch(model, 4, n_obs=6, n_fwd=2, n_heldin=4, seed=4)
    guide = GRUGuide(model, 4, hidden=8)
    idata = predictive_checks(model, guide, batch, n_samples=40, seed=0)
    ll = idata.log_likelihood["spikes"]
    assert ll.dims == ("chain", "draw", "trial", "time", "neuron") and ll.shape == (1, 40, 4, 8, 5)
    rates = idata.posterior["rates"].values[0]
    x = batch.target.numpy()
    np.testing.assert_allclose(ll.values[0], xlogy(x, rates) - rates - gammaln(x + 1), rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # k-hat warnings of a 40-draw toy
        loo = az.loo(idata, pointwise=True)
        waic = az.waic(idata)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(waic.elpd_waic)
    assert loo.pareto_k.shape == (4, 8, 5)
    # leave-one-out can only lose against the in-sample log pointwise predictive density
    lppd = float(np.sum(logsumexp(ll.values[0], axis=0) - np.log(40)))
    assert loo.elpd_loo <= lppd + 1e-6
    # masked entries (unknown forward bins of evaluation trials) are NaN; select the observed block
    masked = batch.with_inputs(batch.input, batch.mask.clone().index_fill_(1, torch.tensor([6, 7]), False))
    idata_m = predictive_checks(model, guide, masked, n_samples=40, seed=0)
    assert np.isnan(idata_m.log_likelihood["spikes"].values[..., 6:, :]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert np.isfinite(az.loo(idata_m.isel(time=slice(0, 6))).elpd_loo)


def test_example_compare_quick(tmp_path):
    """examples/compare.py --quick: fits on Lorenz and on real MC_Maze_Small training trials, writes the
    table with the required columns (per fold and pooled) and the figure."""
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(root / "examples" / "compare.py"), "--quick", "--no-progress",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    table = pd.read_csv(out / "compare.csv")
    required = ["model", "elpd", "se", "d_elpd", "dse", "khat_max", "frac_khat_gt_0_7"]
    assert set(required) <= set(table.columns)
    assert set(table["dataset"]) == {"lorenz", "mc_maze_small"}
    pooled = table[(table["dataset"] == "mc_maze_small") & (table["fold"] == "all") & (table["quantity"] == "joint")]
    assert sorted(pooled["model"]) == ["mlp", "oscillators", "zero"] and (pooled["n_trials"] == 75).all()
    assert np.isfinite(pooled[required[1:]].to_numpy(dtype=float)).all()
    assert (out / "compare.png").is_file() and summary["figure"] == str(out / "compare.png")
    rerun = subprocess.run([sys.executable, str(root / "examples" / "compare.py"), "--quick", "--no-progress",
                            "--out", str(out)], capture_output=True, text=True, timeout=60, cwd=root)
    assert rerun.returncode == 2 and "--resume" in rerun.stderr  # an earlier run is never replaced silently
