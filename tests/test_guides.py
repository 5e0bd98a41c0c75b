"""Ablation guides and prior ablations: matching sites, finite ELBO, and each one trains."""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_langevin.batch import make_batch
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import (
    AutoregressiveGuide,
    BiGRUGuide,
    GRUGuide,
    InitialStateGuide,
    MeanFieldGuide,
    StepwiseGuide,
)
from pyro_langevin.models import LangevinFlow
from pyro_langevin.training import FitConfig, fit

N_IN, N_OUT, D = 6, 2, 4

GUIDES = {
    "gru": lambda m, n_trials, t: GRUGuide(m, N_IN, hidden=16),
    "bigru": lambda m, n_trials, t: BiGRUGuide(m, N_IN, hidden=16),
    "initial_state": lambda m, n_trials, t: InitialStateGuide(m, N_IN, hidden=16),
    "meanfield": lambda m, n_trials, t: MeanFieldGuide(m, n_trials, t),
    "autoregressive": lambda m, n_trials, t: AutoregressiveGuide(m, N_IN, hidden=16, mlp_hidden=16),
    "autoregressive_flow": lambda m, n_trials, t: AutoregressiveGuide(m, N_IN, hidden=16, mlp_hidden=16, flow=True),
}
PRIORS = {
    "oscillators": {},
    "zero": {"potential": "zero"},
    "quadratic": {"potential": "quadratic"},
    "mlp": {"potential": "mlp", "potential_kwargs": {"hidden": 8}},
    "learn_gamma_sigma": {"learn_gamma": True, "learn_sigma": True},
    "overdamped": {"overdamped": True},
}


@pytest.fixture(scope="module")
def forward_batch():
    """6 trials, 10 observed + 3 forward bins, 6 held-in + 2 held-out neurons, ids 10..15."""
    g = torch.Generator().manual_seed(0)
    heldin = torch.poisson(torch.ones(6, 10, N_IN), generator=g)
    heldout = torch.poisson(torch.ones(6, 10, N_OUT), generator=g)
    return make_batch(heldin, heldout, n_forward=3, index=range(10, 16))


@pytest.fixture(scope="module")
def lorenz():
    return make_lorenz(n_conditions=4, trials_per_condition=4, n_bins=12, n_neurons=N_IN + N_OUT,
                       n_heldout=N_OUT, seed=1)


def latent_sites(trace) -> dict[str, torch.Size]:
    return {n: s["value"].shape for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}


@pytest.mark.parametrize("name", list(GUIDES))
def test_guide_sites_match_model(name, forward_batch):
    torch.manual_seed(0)
    model = LangevinFlow(N_IN + N_OUT, D)
    guide = GUIDES[name](model, 16, forward_batch.n_observed_bins)
    model_sites = latent_sites(poutine.trace(model).get_trace(forward_batch))
    guide_sites = latent_sites(poutine.trace(guide).get_trace(forward_batch))
    assert guide_sites == model_sites
    assert len(model_sites) == 1 + forward_batch.n_bins  # z_0 and v_0 .. v_{T+F-1}


@pytest.mark.parametrize("name", list(GUIDES))
def test_elbo_finite(name, forward_batch):
    torch.manual_seed(0)
    model = LangevinFlow(N_IN + N_OUT, D)
    guide = GUIDES[name](model, 16, forward_batch.n_observed_bins)
    for elbo in (TraceMeanField_ELBO(), Trace_ELBO()):
        loss = elbo.differentiable_loss(model, guide, forward_batch)
        assert math.isfinite(loss.item())
        loss.backward()


@pytest.mark.parametrize("name", list(GUIDES))
def test_guide_does_not_hold_model_parameters(name):
    model = LangevinFlow(N_IN + N_OUT, D)
    guide = GUIDES[name](model, 16, 10)
    model_ids = {id(p) for p in model.parameters()}
    assert not model_ids & {id(p) for p in guide.parameters()}
    assert guide.prior is model


@pytest.mark.parametrize("name", ["bigru", "initial_state", "autoregressive"])
def test_amortized_step_starts_at_prior(name, forward_batch):
    """Zero-initialised forces: at initialisation q(v_t | past) is the prior transition."""
    torch.manual_seed(0)
    model = LangevinFlow(N_IN + N_OUT, D)
    guide = GUIDES[name](model, 16, forward_batch.n_observed_bins)
    tr = poutine.trace(guide).get_trace(forward_batch)
    z0, v0 = tr.nodes["z_0"]["value"], tr.nodes["v_0"]["value"]
    prior = model.transition(z0, v0)
    q = tr.nodes["v_1"]["fn"].base_dist
    torch.testing.assert_close(q.loc, prior.v_loc)
    torch.testing.assert_close(q.scale, prior.v_scale)


def test_initial_state_guide_uses_prior_every_step(forward_batch):
    torch.manual_seed(0)
    model = LangevinFlow(N_IN + N_OUT, D)
    guide = InitialStateGuide(model, N_IN, hidden=16)
    with torch.no_grad():  # move the encoder away from its initialisation: the steps must not care
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tr = poutine.trace(guide).get_trace(forward_batch)
    z, v = tr.nodes["z_0"]["value"], tr.nodes["v_0"]["value"]
    for t in range(1, forward_batch.n_bins):
        prior = model.transition(z, v)
        q = tr.nodes[f"v_{t}"]["fn"].base_dist
        torch.testing.assert_close(q.loc, prior.v_loc)
        z, v = prior.z_next, tr.nodes[f"v_{t}"]["value"]


def test_meanfield_checks_index_and_bins(forward_batch):
    model = LangevinFlow(N_IN + N_OUT, D)
    with pytest.raises(ValueError, match="index"):
        MeanFieldGuide(model, 12, 10)(forward_batch)  # ids go up to 15
    with pytest.raises(ValueError, match="observed bins"):
        MeanFieldGuide(model, 16, 8)(forward_batch)
    assert issubclass(MeanFieldGuide, StepwiseGuide)


def test_meanfield_parameters_are_per_trial(forward_batch):
    model = LangevinFlow(N_IN + N_OUT, D)
    guide = MeanFieldGuide(model, 20, 10)
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, forward_batch)
    loss.backward()
    used = guide.v_loc.grad.abs().sum(dim=(1, 2)) > 0
    assert used[10:16].all() and not used[:10].any() and not used[16:].any()


def _trains(model, guide, lorenz, epochs: int = 25) -> tuple[float, float]:
    config = FitConfig(epochs=epochs, batch_size=64, lr=1e-2, weight_decay=0.0, kl_ramp=0,
                       weight_decay_ramp=0, val_every=epochs, seed=0)
    result = fit(model, guide, lorenz.train, None, config, device="cpu", progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses)
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


@pytest.mark.parametrize("name", list(GUIDES))
def test_every_guide_trains(name, lorenz):
    torch.manual_seed(0)
    model = LangevinFlow(lorenz.train.n_neurons, D, dt=0.1, decoder_kwargs={"d_model": 16, "dim_feedforward": 32})
    n_total = int(max(lorenz.train.index.max(), lorenz.valid.index.max())) + 1
    guide = GUIDES[name](model, n_total, lorenz.train.n_observed_bins)
    first, last = _trains(model, guide, lorenz)
    assert last < first - 0.02, (first, last)


@pytest.mark.parametrize("name", list(PRIORS))
def test_every_prior_ablation_trains(name, lorenz):
    torch.manual_seed(0)
    model = LangevinFlow(lorenz.train.n_neurons, D, dt=0.1, decoder_kwargs={"d_model": 16, "dim_feedforward": 32},
                         **PRIORS[name])
    guide = GRUGuide(model, N_IN, hidden=16)
    first, last = _trains(model, guide, lorenz)
    assert last < first - 0.02, (first, last)
