"""The core: transition vs torchsde, closed-form forces, model/guide sites, ELBO, a tiny fit."""

import math

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from scipy.signal import welch

from pyro_langevin import make_batch
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.potentials import CoupledOscillatorPotential, MLPPotential, QuadraticPotential
from pyro_langevin.sde import LangevinSDE, sample_prior_paths
from pyro_langevin.training import FitConfig, coordinated_dropout, fit
from pyro_langevin.transition import LangevinParams, langevin_transition


def tiny_batch(n=6, t=10, n_in=5, n_out=2, f=3):
    g = torch.Generator().manual_seed(1)
    rates = torch.full((n, t + f, n_in + n_out), 1.5)
    c = torch.poisson(rates, generator=g)
    return make_batch(c[:, :t, :n_in], c[:, :t, n_in:], c[:, t:, :n_in], c[:, t:, n_in:])


@pytest.mark.parametrize("boundary", ["chain", "ring"])
@pytest.mark.parametrize("quartic", [0.0, 0.3])
def test_closed_form_force_equals_autograd(boundary, quartic):
    pot = CoupledOscillatorPotential(12, channels=3, boundary=boundary, quartic=quartic)
    z = torch.randn(7, 12)
    closed = pot.force(z)
    auto = pot.autograd_force(z)
    assert torch.allclose(closed, auto, atol=1e-5), (closed - auto).abs().max()
    matrix = pot.force_fn()(z)  # the per-pass stiffness-matrix form used in training
    assert torch.allclose(matrix, auto, atol=1e-5), (matrix - auto).abs().max()
    # and the ring really differs from the chain (the boundary option does something)
    other = CoupledOscillatorPotential(12, channels=3, boundary="ring" if boundary == "chain" else "chain")
    other.load_state_dict(pot.state_dict())
    assert not torch.allclose(other.force(z), closed)


def test_quadratic_force_and_mlp_force_shapes():
    z = torch.randn(4, 6, requires_grad=True)
    q = QuadraticPotential(6, stiffness=2.0)
    assert torch.allclose(q.force(z), q.autograd_force(z))
    m = MLPPotential(6)
    f = m.force(z)
    assert f.shape == z.shape and f.requires_grad


def test_discrete_transition_matches_sdeint_moments():
    """For small dt the splitting scheme and torchsde's Euler-Maruyama agree in mean and variance."""
    torch.manual_seed(0)
    d, n, steps, dt = 4, 4000, 40, 0.01
    pot = CoupledOscillatorPotential(d, channels=2, natural_frequencies=True, freq_range=(0.3, 0.6), coupling=0.5)
    params = LangevinParams(dt=dt, gamma=1.5)
    z0, v0 = torch.full((n, d), 0.8), torch.full((n, d), -0.5)
    with torch.no_grad():
        z, v = z0, v0
        for _ in range(steps):
            out = langevin_transition(z, v, pot.force, params)
            z = out.z_next
            v = out.v_loc + out.v_scale * torch.randn_like(v)
        ts = torch.tensor([0.0, steps * dt])
        zs, vs = sample_prior_paths(LangevinSDE(pot, params), z0, v0, ts, dt=dt / 10)
    z_sde, v_sde = zs[:, -1], vs[:, -1]
    se = lambda x: x.std(0) / math.sqrt(n)  # noqa: E731
    assert torch.all((z.mean(0) - z_sde.mean(0)).abs() < 4 * (se(z) + se(z_sde)) + 0.01)
    assert torch.all((v.mean(0) - v_sde.mean(0)).abs() < 4 * (se(v) + se(v_sde)) + 0.01)
    assert torch.allclose(v.var(0), v_sde.var(0), rtol=0.12)
    assert torch.allclose(z.var(0), z_sde.var(0), rtol=0.15, atol=1e-4)
    # the dynamics moved the state: a broken (static) transition would fail the mean check
    assert (z_sde.mean(0) - z0[0]).abs().max() > 0.05


def test_ou_step_is_stationary_at_unit_temperature():
    params = LangevinParams(dt=0.05, gamma=2.0)  # sigma^2 = 2 gamma m by default
    a, s = params.coefficients()
    assert torch.allclose(a**2 + s**2, torch.tensor(1.0), atol=1e-6)


def _mode_spectra(vectors: np.ndarray, **model_options):
    """Welch power spectra (Hz, per mode) of 16 prior paths of 5 s at 5 ms bins, projected on ``vectors``."""
    torch.manual_seed(0)
    model = LangevinFlow(3, latent_dim=8, dt=0.05, **model_options)
    with torch.no_grad():
        z = poutine.trace(model).get_trace(n_trials=16, n_bins=1000).nodes["z"]["value"].numpy()
    freqs, power = welch(z @ vectors, fs=200.0, nperseg=500, axis=1)  # 0.4 Hz resolution
    return model, freqs, power.mean(0)  # (freq, mode)


def test_prior_produces_oscillations_in_the_1_to_10_hz_band():
    """SPEC 1: with dt = 0.05 (5 ms bins at the 100 ms unit) the default prior rotates at 1-10 Hz.

    Long prior paths (5 s, 0.4 Hz resolution) projected on the potential's normal modes: every
    underdamped mode (damping ratio < 0.4) resonates where a damped oscillator does,
    ``sqrt(omega^2 - gamma^2 / 2)``, inside 1-10 Hz. A free particle (zero potential) has no
    resonance: its spectrum peaks at the lowest frequency in every direction.
    """
    torch.manual_seed(0)
    stiffness = LangevinFlow(3, latent_dim=8, dt=0.05).potential.stiffness_matrix().detach().numpy()
    lam, vectors = np.linalg.eigh(stiffness)
    model, freqs, power = _mode_spectra(vectors)  # the default prior
    omega = np.sqrt(lam)  # per 100 ms
    gamma = float(model.dynamics.gamma)
    zeta = gamma / (2 * omega)
    resonance_hz = 10 * np.sqrt(np.maximum(omega ** 2 - gamma ** 2 / 2, 0)) / (2 * np.pi)
    peaks_hz = freqs[1 + np.argmax(power[1:], axis=0)]
    ringing = zeta < 0.4
    assert ringing.sum() >= 4, zeta
    assert np.all((peaks_hz[ringing] >= 1.0) & (peaks_hz[ringing] <= 10.5)), peaks_hz
    np.testing.assert_allclose(peaks_hz[ringing], resonance_hz[ringing], rtol=0.15, atol=0.4)
    _, freqs, power = _mode_spectra(vectors, potential="zero")
    free_peaks_hz = freqs[1 + np.argmax(power[1:], axis=0)]
    assert np.all(free_peaks_hz < 1.0), free_peaks_hz
    # and the path moves substantially within a 0.7 s trial (the released code's dt left it ~static)
    with torch.no_grad():
        z = poutine.trace(model).get_trace(n_trials=64, n_bins=140).nodes["z"]["value"]
    assert (z[:, -1] - z[:, 0]).abs().mean() > 0.3


def test_model_and_guide_have_the_same_sites_and_finite_elbo():
    b = tiny_batch()
    model = LangevinFlow(b.n_neurons, latent_dim=4)
    guide = GRUGuide(model, b.n_heldin, hidden=8)
    gt = poutine.trace(guide).get_trace(b)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(b)
    latent_model = {k for k, s in mt.nodes.items()
                    if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    latent_guide = {k for k, s in gt.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    assert latent_model == latent_guide
    assert latent_model == {"z_0", *(f"v_{t}" for t in range(b.n_bins))}
    assert mt.nodes["spikes"]["is_observed"]
    assert mt.nodes["rates"]["value"].shape == (b.n_trials, b.n_bins, b.n_neurons)
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, b)
    assert torch.isfinite(loss)


def test_guide_starts_equal_to_prior_transition():
    """Zero-initialised force: every step's q equals p, so the per-step KL is exactly zero."""
    b = tiny_batch()
    model = LangevinFlow(b.n_neurons, latent_dim=4)
    guide = GRUGuide(model, b.n_heldin, hidden=8).eval()
    gt = poutine.trace(guide).get_trace(b)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(b)
    for t in range(1, b.n_bins):
        q, p = gt.nodes[f"v_{t}"]["fn"], mt.nodes[f"v_{t}"]["fn"]
        assert torch.allclose(q.mean, p.mean) and torch.allclose(q.stddev, p.stddev)


def test_masked_entries_do_not_change_the_likelihood():
    """Whatever sits in target where mask is False (unknown held-out or forward counts) is ignored."""
    b = tiny_batch()
    model = LangevinFlow(b.n_neurons, latent_dim=4).eval()
    guide = GRUGuide(model, b.n_heldin, hidden=8).eval()
    gt = poutine.trace(guide).get_trace(b)
    mask = b.mask.clone()
    mask[:, b.n_observed_bins:] = False
    junk = b.target.clone()
    junk[:, b.n_observed_bins:] = 7.0

    def spikes_log_prob(target):
        batch = type(b)(input=b.input, target=target, mask=mask, index=b.index)
        tr = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch)
        tr.compute_log_prob()
        return tr.nodes["spikes"]["log_prob_sum"]

    assert torch.allclose(spikes_log_prob(b.target), spikes_log_prob(junk))
    # sanity: the same junk in a scored entry does change it
    junk2 = b.target.clone()
    junk2[:, 0, 0] = 7.0
    assert not torch.allclose(spikes_log_prob(b.target), spikes_log_prob(junk2))


def test_coordinated_dropout_scores_only_hidden_entries():
    b = tiny_batch()
    cd = coordinated_dropout(b, keep=0.5, generator=torch.Generator().manual_seed(0))
    t, n_in = b.n_observed_bins, b.n_heldin
    seen = cd.input > 0
    assert not (cd.mask[:, :t, :n_in] & seen).any()  # an entry shown to the guide is never scored
    assert torch.equal(cd.mask[:, :, n_in:], b.mask[:, :, n_in:])  # held-out untouched
    assert torch.equal(cd.mask[:, t:], b.mask[:, t:])  # forward bins untouched
    assert 0.3 < cd.mask[:, :t, :n_in].float().mean() < 0.7


def test_tiny_fit_lowers_the_loss(tmp_path):
    data = make_lorenz(n_conditions=8, trials_per_condition=4, n_bins=15, n_neurons=8, seed=3)
    model = LangevinFlow(8, latent_dim=4, dt=0.1, decoder_kwargs={"d_model": 16, "dim_feedforward": 32})
    guide = GRUGuide(model, 8, hidden=16)
    cfg = FitConfig(epochs=30, batch_size=16, lr=1e-2, val_every=5, kl_ramp=1 / 6, seed=0)
    res = fit(model, guide, data.train, data.valid, cfg, device="cpu", checkpoint_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in res.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.05
    assert res.best_epoch >= 0 and (tmp_path / "best.pt").exists()
    val = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert math.isclose(res.best_metric, min(val))


@pytest.mark.parametrize("guide_name, kwargs", [("GRUGuide", {}), ("AutoregressiveGuide", {"flow": True})])
def test_markov_elbo_equals_pyro_trace_mean_field_elbo(guide_name, kwargs):
    """The lean ELBO is the same estimator as Pyro's TraceMeanField_ELBO (value and gradients)."""
    from pyro_langevin import guides
    from pyro_langevin.elbo import MarkovMeanFieldELBO

    b = tiny_batch()
    model = LangevinFlow(b.n_neurons, latent_dim=4).eval()
    guide = getattr(guides, guide_name)(model, b.n_heldin, **kwargs).eval()  # flow: no analytic KL
    for p in guide.parameters():  # move q away from p so the KL terms are not zero
        torch.nn.init.normal_(p, std=0.3)
    results = []
    for elbo in (MarkovMeanFieldELBO(), TraceMeanField_ELBO()):
        torch.manual_seed(5)
        loss = elbo.differentiable_loss(model, guide, b)
        grads = torch.autograd.grad(loss, list(guide.parameters()) + list(model.parameters()), allow_unused=True)
        results.append((loss, grads))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5), (l1, l2)
    for a, c in zip(g1, g2):
        assert (a is None and c is None) or torch.allclose(a, c, rtol=1e-4, atol=1e-5)


def test_adamw_weight_decay_shrinks_weights_where_l2_in_adam_does_not():
    """Decoupled decay acts whatever the ELBO's scale; L2 inside Adam is drowned by a summed ELBO."""
    data = make_lorenz(n_conditions=4, trials_per_condition=4, n_bins=12, n_neurons=6, seed=1)
    norms = {}
    for opt in ("adam", "adamw"):
        model = LangevinFlow(6, latent_dim=4, dt=0.1, decoder_kwargs={"d_model": 8, "n_heads": 2, "dim_feedforward": 16})
        guide = GRUGuide(model, 6, hidden=8)
        torch.manual_seed(0)
        cfg = FitConfig(epochs=8, batch_size=16, lr=1e-2, weight_decay=30.0, weight_decay_ramp=0,
                        optimizer=opt, seed=0)
        fit(model, guide, data.train, None, cfg, device="cpu", progress=False)
        norms[opt] = torch.linalg.vector_norm(guide.encoder.gru.weight_hh_l0).item()
    assert norms["adamw"] < 0.8 * norms["adam"], norms
    with pytest.raises(ValueError, match="optimizer"):
        FitConfig(optimizer="sgd")
