"""Prior/posterior predictive draws as ArviZ InferenceData, count checks, figures, and the examples."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin.batch import make_batch
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide, MeanFieldGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.checks import ppc_pvalues, psth, psth_correlation, randomized_pit
from pyro_langevin.plots import save_ppc_figures
from pyro_langevin.predictive import (
    credible_intervals,
    posterior_predictive,
    predictive_checks,
    prior_predictive,
    save_netcdf,
    to_inference_data,
)
from pyro_langevin.training import FitConfig, fit

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small():
    """Model, guide and a batch with held-out neurons and 3 unobserved forward bins."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = make_batch(torch.poisson(torch.ones(5, 10, 6), generator=g), torch.poisson(torch.ones(5, 10, 2), generator=g),
                       n_forward=3, index=[2, 3, 5, 7, 11])
    model = LangevinFlow(8, 4, decoder_kwargs={"d_model": 16, "dim_feedforward": 32})
    return model, GRUGuide(model, 6, hidden=16), batch


@pytest.fixture(scope="module")
def idata(small):
    model, guide, batch = small
    return predictive_checks(model, guide, batch, n_samples=12, sample_chunk=5, trial_chunk=3, seed=0)


def test_prior_predictive_counts(small):
    model, _, _ = small
    draws = prior_predictive(model, n_trials=4, n_bins=9, n_samples=6, seed=0)
    spikes = draws["spikes"]
    assert spikes.shape == (6, 4, 9, 8)
    assert np.issubdtype(spikes.dtype, np.integer) and (spikes >= 0).all()
    assert draws["z"].shape == (6, 4, 9, 4)
    assert (draws["rates"] > 0).all()
    assert spikes.std() > 0  # actual draws, not a constant


def test_posterior_predictive_samples_fresh_spikes(small):
    """``spikes`` are released from the data (uncondition): draws differ from the observation."""
    model, guide, batch = small
    draws = posterior_predictive(model, guide, batch, n_samples=4, sample_chunk=3, trial_chunk=2)
    assert draws["spikes"].shape == (4, 5, 13, 8)
    assert not np.array_equal(draws["spikes"][0], batch.target.numpy())
    assert not np.array_equal(draws["spikes"][0], draws["spikes"][1])


def test_inference_data_groups_and_dims(idata, small):
    _, _, batch = small
    for group in ("prior", "prior_predictive", "posterior", "posterior_predictive", "observed_data", "constant_data"):
        assert group in idata.groups()
    assert idata.posterior_predictive["spikes"].dims == ("chain", "draw", "trial", "time", "neuron")
    assert idata.prior_predictive["spikes"].dims == ("chain", "draw", "trial", "time", "neuron")
    assert idata.posterior["z"].dims == ("chain", "draw", "trial", "time", "latent")
    assert idata.posterior["rates"].dims == ("chain", "draw", "trial", "time", "neuron")
    assert idata.observed_data["spikes"].dims == ("trial", "time", "neuron")
    assert idata.posterior_predictive.sizes["draw"] == 12
    assert list(idata.posterior.coords["trial"].values) == [2, 3, 5, 7, 11]
    obs = idata.observed_data["spikes"].values
    assert np.isnan(obs[:, 10:]).all() and not np.isnan(obs[:, :10]).any()  # forward bins unobserved
    assert (idata.prior_predictive["spikes"].values >= 0).all()


def test_netcdf_round_trip(idata, tmp_path):
    path = save_netcdf(idata, tmp_path / "sub" / "ppc.nc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    np.testing.assert_array_equal(back.posterior_predictive["spikes"].values, idata.posterior_predictive["spikes"].values)


def test_to_inference_data_rejects_misaligned_prior(small):
    model, guide, batch = small
    prior = prior_predictive(model, n_trials=3, n_bins=batch.n_bins, n_samples=2)
    with pytest.raises(ValueError, match="trial"):
        to_inference_data(batch, prior=prior)


def test_credible_intervals(small):
    model, guide, batch = small
    ci = credible_intervals(model, guide, batch, n_samples=10, prob=0.8, trial_chunk=2)
    assert ci["rates"].mean.shape == (5, 13, 8) and ci["z"].mean.shape == (5, 13, 4)
    for s in ci.values():
        assert (s.lower <= s.mean + 1e-6).all() and (s.mean <= s.upper + 1e-6).all()
        assert (s.upper - s.lower).mean() > 0


def test_predictive_works_with_a_non_amortized_guide(small):
    model, _, batch = small
    guide = MeanFieldGuide(model, 12, batch.n_observed_bins)
    draws = posterior_predictive(model, guide, batch, n_samples=3)
    assert draws["z"].shape == (3, 5, 13, 4)


def test_count_checks(idata):
    table = ppc_pvalues(idata)
    assert list(table.index) == ["mean", "variance", "fano", "zero_fraction", "max"]
    assert {"observed", "predicted", "p_pooled", "p_median", "frac_extreme"} <= set(table.columns)
    assert table["p_pooled"].between(0, 1).all()
    u = randomized_pit(idata)
    assert u.shape == (5 * 10 * 8,) and (u >= 0).all() and (u <= 1).all()
    assert ppc_pvalues(idata, "prior_predictive").shape == table.shape
    with pytest.raises(KeyError):
        ppc_pvalues(idata, "nonexistent")


def test_psth_by_condition():
    x = np.arange(4 * 2 * 1, dtype=float).reshape(4, 2, 1)
    out = psth(x, conditions=[0, 1, 0, 1])
    np.testing.assert_allclose(out[0], (x[0] + x[2]) / 2)
    np.testing.assert_allclose(psth(x), x.mean(0))


def test_figures_written(idata, tmp_path):
    written = save_ppc_figures(idata, tmp_path, conditions=[0, 0, 1, 1, 1])
    for tag in ("prior", "posterior"):
        for name in ("rootogram", "psth", "fano", "pit"):
            assert written[f"{tag}_{name}"].stat().st_size > 0


def test_posterior_predictive_tracks_lorenz_psth():
    """A fitted model's posterior predictive PSTH follows the observed per-condition PSTH; an
    unfitted model, or the fitted model with its decoder's neurons shuffled, does not."""
    tpc = 6
    data = make_lorenz(n_conditions=6, trials_per_condition=tpc, n_bins=20, n_neurons=12, base_rate=1.0, seed=0)
    train = data.train
    conditions = train.index.numpy() // tpc

    def build():
        torch.manual_seed(0)
        m = LangevinFlow(12, 4, dt=0.1, decoder_kwargs={"d_model": 16, "dim_feedforward": 32})
        return m, GRUGuide(m, 12, hidden=16)

    def tracking(model, guide) -> float:
        draws = posterior_predictive(model, guide, train, n_samples=10, sites=("spikes",))
        return psth_correlation(to_inference_data(train, posterior=draws), "posterior_predictive", conditions)

    model, guide = build()
    config = FitConfig(epochs=40, batch_size=32, lr=1e-2, kl_ramp=0.25, weight_decay_ramp=0, val_every=40)
    fit(model, guide, train, None, config, device="cpu", progress=False)
    fitted = tracking(model, guide)

    unfitted = tracking(*build())
    shuffled = copy.deepcopy(model)
    perm = torch.roll(torch.arange(12), 5)
    with torch.no_grad():
        shuffled.decoder.readout.weight.copy_(model.decoder.readout.weight[perm])
        shuffled.decoder.readout.bias.copy_(model.decoder.readout.bias[perm])
    guide.__dict__["prior"] = shuffled  # the same fitted guide, now building on the broken model
    broken = tracking(shuffled, guide)
    assert fitted > 0.7, fitted
    assert unfitted < 0.5 and broken < 0.5, (unfitted, broken)
    assert fitted - max(unfitted, broken) > 0.3


def _run_example(script: str, tmp_path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--no-progress", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_example_ablate_guides_quick(tmp_path):
    out = _run_example("ablate_guides.py", tmp_path)
    names = {r["variant"] for r in out["results"]}
    assert {"gru", "bigru", "initial_state", "meanfield", "autoregressive", "prior_zero", "prior_overdamped"} <= names
    for r in out["results"]:
        assert np.isfinite(r["valid_elbo_per_bin"]) and np.isfinite(r["rate_r2"]) and np.isfinite(r["heldout_bps"])
    assert (tmp_path / "out" / "table.md").is_file()


@pytest.mark.slow
def test_example_ppc_quick(tmp_path):
    out = _run_example("ppc.py", tmp_path)
    assert Path(out["netcdf"]).is_file()
    assert {"prior_predictive", "posterior_predictive", "observed_data", "posterior"} <= set(out["groups"])
    assert all(Path(p).is_file() for p in out["figures"])
    assert set(out["pvalues"]) == {"mean", "variance", "fano", "zero_fraction", "max"}
