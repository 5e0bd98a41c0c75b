"""The model and training defects of issue 8, each pinned by a test that failed before its fix."""

import math

import pytest
import torch

from pyro_langevin import make_batch
from pyro_langevin.batch import Batch
from pyro_langevin.decoder import MAX_LOG_RATE, MIN_LOG_RATE, bound_log_rates
from pyro_langevin.elbo import MarkovMeanFieldELBO
from pyro_langevin.guides import GRUGuide
from pyro_langevin.inputs import encoder_features
from pyro_langevin.models import LangevinFlow
from pyro_langevin.potentials import CoupledOscillatorPotential
from pyro_langevin.training import coordinated_dropout, weight_decay_groups
from pyro_langevin.transition import LangevinParams


def _counts(n=40, t=30, n_in=20, rate=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.full((n, t, n_in), rate), generator=g)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_coordinated_dropout_keeps_the_encoder_input_distribution(keep):
    """In expectation over the mask the encoder sees the same features as at test time."""
    x = _counts()
    b = make_batch(x)
    g = torch.Generator().manual_seed(1)
    feats = torch.stack([encoder_features(coordinated_dropout(b, keep, generator=g).input) for _ in range(400)])
    test_time = encoder_features(x)
    rel = (feats.mean(0).mean() - test_time.mean()) / test_time.mean()
    assert abs(float(rel)) < 0.01, rel
    # per entry too (400 masks: the Monte Carlo error of the mean is ~ sqrt((1-keep)/keep/400))
    err = (feats.mean(0) - test_time).abs().max() / test_time.max()
    assert float(err) < 6 * math.sqrt((1 - keep) / keep / 400)
    # the old rule (counts * M / keep before log1p) shrinks the features: what the fix removed
    m = torch.rand((400, *x.shape), generator=g) < keep
    old = encoder_features(x * m / keep).mean()
    assert float(old / test_time.mean()) < 0.9


def _prior_z(model, n_trials, n_bins):
    """Prior position paths (trial, time, D) from the model's own transition (no decoder: the
    Transformer's attention over thousands of bins would need gigabytes)."""
    with torch.no_grad():
        z = model.initial_prior(n_trials, model.decoder.readout.bias).sample()
        v = model.initial_prior(n_trials, model.decoder.readout.bias).sample()
        step, zs = model.transition_fn(), [z]
        for _ in range(1, n_bins):
            out = step(z, v)
            z, v = out.z_next, out.v_loc + out.v_scale * torch.randn_like(v)
            zs.append(z)
    return torch.stack(zs, dim=1)


def _randomise(pot: CoupledOscillatorPotential, scale: float, seed: int, omega_sd: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pot.kernel.copy_(torch.randn(pot.kernel.shape, generator=g))
        pot.log_coupling.fill_(math.log(scale))
        pot.log_omega.add_(torch.randn(pot.log_omega.shape, generator=g) * omega_sd)


@pytest.mark.parametrize("form", ["gram", "reference"])
def test_default_stiffness_is_positive_definite_and_capped_for_every_parameter_value(form):
    """Extreme random parameters: the default's eigenvalues stay in (0, max_omega^2]."""
    lo = []
    for seed in range(20):
        pot = CoupledOscillatorPotential(16, coupling_form=form)
        _randomise(pot, scale=math.exp(4 * (seed % 5) - 6), seed=seed, omega_sd=3.0)
        eig = torch.linalg.eigvalsh(pot.stiffness_matrix().detach())
        assert float(eig.abs().max()) <= pot.max_omega**2 * (1 + 1e-5)
        lo.append(float(eig.min()))
    if form == "gram":
        assert min(lo) > 0
    else:  # the released form is indefinite: the contrast that makes the check above meaningful
        assert min(lo) < 0


@pytest.mark.parametrize("seed", [0, 1])
def test_default_prior_variance_stays_bounded_over_ten_trials_length(seed):
    """Random kernels and strong couplings, at the default frequencies: variance bounded, not growing."""
    n_bins = 1800  # 10x a 180-bin MC_Maze trial at 5 ms
    model = LangevinFlow(3, latent_dim=16, dt=0.05, gamma=4.0)
    _randomise(model.potential, scale=3.0, seed=seed)
    eig = torch.linalg.eigvalsh(model.potential.stiffness_matrix().detach())
    z = _prior_z(model, 200, n_bins)
    var = z.var(0).max(-1).values  # largest per-unit variance at each bin
    bound = 1.0 / float(eig.min())  # stationary variance of the softest mode at unit temperature
    assert float(var.max()) < 1.5 * bound + 1.0, (float(var.max()), bound)
    # and it has stopped growing: the last 10% is no wider than the 40-50% stretch (+ MC noise)
    assert float(var[-180:].mean()) < 1.3 * float(var[720:900].mean()) + 0.2


def test_the_released_indefinite_coupling_explodes_where_the_default_does_not():
    """The contrast that makes the previous test meaningful: the reference form is not confining."""
    model = LangevinFlow(3, latent_dim=16, dt=0.05, gamma=4.0, potential_kwargs={"coupling_form": "reference"})
    _randomise(model.potential, scale=3.0, seed=0)
    assert torch.linalg.eigvalsh(model.potential.stiffness_matrix().detach()).min() < 0
    z = _prior_z(model, 50, 600)
    assert float(z.var(0).max()) > 100.0


def test_stiffness_is_capped_for_a_stable_step_at_20_ms_bins():
    """dt = 0.2: the largest frequency stays below 2 / dt whatever the parameters, and z stays bounded."""
    model = LangevinFlow(3, latent_dim=8, dt=0.2, gamma=4.0)
    with torch.no_grad():
        model.potential.log_omega.fill_(5.0)  # omega ~ 150 rad per unit: omega * dt ~ 30 uncapped
        model.potential.log_coupling.fill_(3.0)
    top = torch.linalg.eigvalsh(model.potential.stiffness_matrix().detach()).max().sqrt()
    assert float(top) * 0.2 <= 1.35 + 1e-4  # stable below sqrt(2) whatever the damping
    z = _prior_z(model, 100, 350)  # 10x a 35-bin trial
    assert torch.isfinite(z).all() and float(z.abs().max()) < 20.0
    with pytest.raises(ValueError, match="unstable"):
        LangevinFlow(3, latent_dim=8, dt=0.2, potential_kwargs={"max_omega": 9.0})


def test_weight_decay_reaches_weight_matrices_only():
    model = LangevinFlow(7, latent_dim=4, learn_gamma=True)
    guide = GRUGuide(model, 5, hidden=8)
    named = [(f"model.{k}", p) for k, p in model.named_parameters()] + [(f"guide.{k}", p) for k, p in guide.named_parameters()]
    decayed, kept = weight_decay_groups(named)
    ids = {id(p) for p in decayed}
    name_of = {id(p): k for k, p in named}
    decayed_names = {name_of[i] for i in ids}
    assert "model.decoder.readout.weight" in decayed_names
    assert "guide.encoder.gru.weight_ih_l0" in decayed_names
    assert "model.decoder.layer.self_attn.in_proj_weight" in decayed_names
    for k, p in named:
        if k.startswith(("model.potential.", "model.dynamics.")) or k.endswith("bias") or "norm" in k:
            assert id(p) not in ids, k
    assert {id(p) for p in decayed}.isdisjoint({id(p) for p in kept})
    assert len(decayed) + len(kept) == len(named)


def test_sigma_follows_a_learned_gamma_at_unit_temperature():
    params = LangevinParams(dt=0.05, gamma=2.0, learn_gamma=True)
    with torch.no_grad():
        params.raw_gamma.fill_(3.0)
    assert torch.allclose(params.sigma**2, 2.0 * params.gamma * params.mass)
    a, s = params.coefficients()
    assert torch.allclose(a**2 + s**2, torch.tensor(1.0), atol=1e-6)  # stationary velocity variance 1
    # a given sigma stays fixed
    fixed = LangevinParams(dt=0.05, gamma=2.0, sigma=1.0, learn_gamma=True)
    with torch.no_grad():
        fixed.raw_gamma.fill_(3.0)
    assert torch.allclose(fixed.sigma, torch.tensor(1.0))


def test_log_rates_are_bounded_smoothly_with_a_gradient_everywhere():
    x = torch.tensor([-50.0, -5.0, 0.0, 3.0, 20.0, 50.0], requires_grad=True)
    y = bound_log_rates(x)
    assert float(y.min()) >= MIN_LOG_RATE and float(y.max()) <= MAX_LOG_RATE
    assert torch.allclose(y[1:4], x[1:4], atol=1e-3)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert (g > 0).all()  # a hard clamp had zero gradient above 12


def test_nan_in_masked_targets_does_not_reach_the_gradient():
    x = _counts(n=6, t=10, n_in=5)
    b = make_batch(x[:, :, :4], x[:, :, 4:])
    target = b.target.clone()
    mask = b.mask.clone()
    mask[:, -3:, -1] = False
    target[:, -3:, -1] = float("nan")
    nb = Batch(input=b.input, target=target, mask=mask, index=b.index).validate()
    model = LangevinFlow(nb.n_neurons, latent_dim=4)
    guide = GRUGuide(model, nb.n_heldin, hidden=8)
    loss = MarkovMeanFieldELBO().differentiable_loss(model, guide, nb)
    loss.backward()
    assert torch.isfinite(loss)
    for p in list(model.parameters()) + list(guide.parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"latent_dim": 3.5}, "latent_dim"),
    ({"latent_dim": 0}, "latent_dim"),
    ({"dt": float("nan")}, "dt"),
    ({"gamma": -1.0}, "gamma"),
    ({"dt": float("inf")}, "dt"),
])
def test_model_refuses_bad_sizes_and_constants(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LangevinFlow(5, **kwargs)
