"""The dynamics readout (pyro_langevin.dynamics): modes, spectra, forces, rotations, decoding, interventions."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from pyro_langevin import dynamics as dyn
from pyro_langevin.batch import make_batch
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.potentials import CoupledOscillatorPotential, FixedStiffnessPotential, MLPPotential

ROOT = Path(__file__).resolve().parents[1]


def _random_stiffness(omegas: np.ndarray, mass: float, seed: int = 0) -> np.ndarray:
    """``S = Q diag(m omega^2) Q^T`` with a random rotation ``Q``: modes of known frequencies."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(omegas), len(omegas))))
    return q @ np.diag(mass * omegas**2) @ q.T


# ----- normal modes ------------------------------------------------------------------------------
def test_modes_of_a_hand_built_potential_match_the_analytic_frequencies_and_damping():
    omegas = np.array([2.0, 5.0, 9.0, 14.0])  # rad per 100 ms
    mass, gamma, sigma, dt = 2.0, 6.0, 1.5, 0.01
    model = LangevinFlow(3, latent_dim=4, dt=dt, gamma=gamma, sigma=sigma, mass=mass,
                         potential=FixedStiffnessPotential(torch.tensor(_random_stiffness(omegas, mass))))
    modes = dyn.normal_modes(model)
    assert modes.source == "stiffness_matrix"
    np.testing.assert_allclose(modes.omega_rad_per_unit, omegas, rtol=1e-6)
    np.testing.assert_allclose(modes.frequency_hz, 10 * omegas / (2 * math.pi), rtol=1e-6)
    zeta = gamma / (2 * mass * omegas)  # 0.75, 0.3, 0.167, 0.107
    np.testing.assert_allclose(modes.damping_ratio, zeta, rtol=1e-6)
    np.testing.assert_allclose(modes.quality_factor, 1 / (2 * zeta), rtol=1e-6)
    np.testing.assert_allclose(modes.damped_frequency_hz, modes.frequency_hz * np.sqrt(1 - zeta**2), rtol=1e-6)
    # the discrete step turns each mode at nearly the continuous damped frequency for a small dt
    np.testing.assert_allclose(modes.step_frequency_hz, modes.damped_frequency_hz, rtol=0.03)
    np.testing.assert_allclose(modes.step_decay_per_s, gamma / (2 * mass) * 10, rtol=0.03)
    temperature = sigma**2 / (2 * gamma)
    assert modes.temperature == pytest.approx(temperature)
    np.testing.assert_allclose(modes.stationary_z_variance_gibbs, temperature / (mass * omegas**2), rtol=1e-6)
    assert modes.stationary_v_variance == pytest.approx(temperature / mass)
    assert modes.stationary_z_total_variance_discrete == pytest.approx(modes.stationary_z_total_variance_gibbs, rel=0.03)
    # each mode vector is an eigenvector of S with its eigenvalue
    s = model.potential.stiffness_matrix().double().numpy()
    np.testing.assert_allclose(s @ modes.modes, modes.modes * modes.eigenvalues_per_unit2, atol=1e-8)


def test_an_overdamped_mode_has_no_damped_frequency():
    model = LangevinFlow(3, latent_dim=2, dt=0.05, gamma=10.0,
                         potential=FixedStiffnessPotential(torch.diag(torch.tensor([4.0, 400.0]))))
    modes = dyn.normal_modes(model)  # omega 2 (zeta 2.5: overdamped) and 20 (zeta 0.25)
    assert modes.damped_frequency_hz[0] == 0.0 and modes.step_frequency_hz[0] == 0.0
    assert modes.damped_frequency_hz[1] > 0 and modes.damping_ratio[0] == pytest.approx(2.5)


def test_autograd_hessian_agrees_with_the_exact_stiffness():
    pot = CoupledOscillatorPotential(8, channels=2, quartic=0.3)
    exact, source = dyn.stiffness(pot)
    hess, hsource = dyn.stiffness(pot, states=torch.zeros(3, 8))
    assert (source, hsource) == ("stiffness_matrix", "hessian_mean_over_states")
    np.testing.assert_allclose(hess, exact, rtol=1e-4, atol=1e-4)
    # away from the origin the quartic adds 3 lambda z^2 on the diagonal
    z = torch.full((1, 8), 2.0)
    np.testing.assert_allclose(dyn.stiffness(pot, states=z)[0], exact + np.eye(8) * 3 * 0.3 * 4.0, rtol=1e-4, atol=1e-4)
    # an MLP potential's Hessian averages over the states given
    mlp = MLPPotential(4, confinement=0.7)
    torch.nn.init.normal_(mlp.net[-1].weight)
    states = torch.randn(5, 4)
    one_by_one = np.mean([dyn.stiffness(mlp, states=s[None])[0] for s in states], axis=0)
    np.testing.assert_allclose(dyn.stiffness(mlp, states=states)[0], one_by_one, rtol=1e-5, atol=1e-6)
    assert dyn.stiffness(mlp)[1] == "hessian_at_origin"


# ----- spectra, rotations, decoding --------------------------------------------------------------
def test_power_spectrum_finds_a_sinusoids_frequency():
    t = np.arange(200) * 0.005
    x = np.sin(2 * np.pi * 7.0 * t)[None, :, None] * np.array([1.0, 3.0])  # two channels, one frequency
    spec = dyn.power_spectrum(x, 0.005)
    assert abs(spec.peak_hz - 7.0) < spec.resolution_hz / 2 and spec.n_signals == 2
    assert spec.power.sum() == pytest.approx(1.0)


def _planar_rotation(freq_hz: float, n_cond: int = 8, n_t: int = 60, bin_s: float = 0.01, d: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(n_t) * bin_s
    phase = 2 * np.pi * np.arange(n_cond) / n_cond
    amp = rng.uniform(0.5, 1.5, n_cond)
    angle = 2 * np.pi * freq_hz * t[None] + phase[:, None]
    plane = np.stack([amp[:, None] * np.cos(angle), amp[:, None] * np.sin(angle)], -1)  # (c, t, 2)
    embed, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    return plane @ embed.T + 0.01 * rng.normal(size=(n_cond, n_t, d)), embed


def test_rotation_fit_recovers_a_planar_rotation_and_its_frequency():
    x, embed = _planar_rotation(2.5)
    rot = dyn.rotation_fit(x, 0.01)
    assert rot.r2_skew > 0.95 and rot.skew_to_full_ratio > 0.95 and rot.rotational
    assert abs(rot.frequency_hz - 2.5) / 2.5 < 0.05
    # the top plane is the plane of the rotation
    overlap = np.linalg.svd(rot.plane.T @ embed, compute_uv=False)
    assert overlap.min() > 0.99
    # coarse bins: the midpoint rule alone would read 2 tan(omega h / 2) / h; the fit undoes it
    coarse = dyn.rotation_fit(_planar_rotation(3.0, bin_s=0.04, n_t=20)[0], 0.04)
    assert abs(coarse.frequency_hz - 3.0) / 3.0 < 0.02


def test_a_pure_decay_is_not_called_rotational():
    rng = np.random.default_rng(1)
    t = np.arange(50) * 0.01
    x = rng.normal(size=(8, 1, 10)) * np.exp(-3.0 * t)[None, :, None]
    rot = dyn.rotation_fit(x, 0.01)
    assert rot.r2_full > 0.99 and rot.r2_skew < 0.1 and not rot.rotational


def test_ridge_decoding_scores_held_out_trials():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 20, 6))
    w = rng.normal(size=(6, 3))
    y = x @ w + 0.05 * rng.normal(size=(60, 20, 3))
    dec = dyn.ridge_decode(x[:40], y[:40], x[40:], y[40:])
    assert dec.r2 > 0.99 and dec.predicted.shape == (20, 20, 3) and dec.r2_per_time.shape == (20,)
    noise = rng.normal(size=y.shape)
    assert dyn.cross_validated_decode(x, noise, n_folds=5).r2 < 0.05  # nothing to decode: no skill on held-out trials
    grouped = dyn.cross_validated_decode(x, y, n_folds=4, groups=np.arange(60) // 5)
    assert grouped.r2 > 0.99 and grouped.n_test_trials == 60
    with pytest.raises(ValueError, match="NaN"):
        dyn.ridge_decode(x[:40], np.where(y[:40] > 3, np.nan, y[:40]), x[40:], y[40:])


def test_reach_direction_labels_sectors_of_the_mean_velocity():
    angles = np.radians([0, 44, 46, 90, 180, 269, 359])
    vel = np.stack([np.cos(angles), np.sin(angles)], -1)[:, None, :].repeat(10, 1)
    np.testing.assert_array_equal(dyn.reach_direction(vel, 0, 10, 8), [0, 1, 1, 2, 4, 6, 0])


# ----- forces and interventions on a tiny model ---------------------------------------------------
@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = LangevinFlow(6, latent_dim=4, dt=0.1, decoder_kwargs=dict(d_model=16, n_heads=2, dim_feedforward=16))
    with torch.no_grad():
        spikes = model(n_trials=12, n_bins=15)  # prior predictive data
    batch = make_batch(spikes[:, :12, :5].numpy(), spikes[:, :12, 5:].numpy(), spikes[:, 12:, :5].numpy(),
                       spikes[:, 12:, 5:].numpy())
    return model, batch


def test_force_share_is_one_without_guide_force_and_drops_when_a_force_is_injected(tiny):
    model, batch = tiny
    # prior samples: the model itself as the guide draws every v_t from the prior transition
    prior = dyn.energy_and_forces(model, dyn.latent_paths(model, model, batch, path="sample"))
    assert prior.force_share == pytest.approx(1.0) and np.allclose(prior.force_share_per_trial, 1.0)
    guide = GRUGuide(model, batch.n_heldin, hidden=8)  # zero-initialised force: q = prior
    assert dyn.energy_and_forces(model, dyn.latent_paths(model, guide, batch, path="sample")).force_share == \
        pytest.approx(1.0)
    shares = []
    for push in (0.05, 0.5, 5.0):
        with torch.no_grad():
            guide.force_head.net.bias[:4].fill_(push)  # a constant inferred force on every latent
        paths = dyn.latent_paths(model, guide, batch)  # the posterior-mean path
        np.testing.assert_allclose(paths.guide_force[:, 1:batch.n_observed_bins], push, rtol=1e-4)
        assert np.allclose(paths.guide_force[:, batch.n_observed_bins:], 0.0, atol=1e-5)  # forward bins: the prior
        shares.append(dyn.energy_and_forces(model, paths).force_share)
    assert 1.0 > shares[0] > shares[1] > shares[2] > 0.0


def test_energy_is_kinetic_plus_potential_of_the_path(tiny):
    model, batch = tiny
    paths = dyn.latent_paths(model, model, batch, path="sample")
    en = dyn.energy_and_forces(model, paths)
    np.testing.assert_allclose(en.kinetic_energy, 0.5 * (paths.v**2).sum(-1), rtol=1e-5)
    z = torch.as_tensor(paths.z)
    np.testing.assert_allclose(en.potential_energy, model.potential.energy(z).detach().numpy(), rtol=1e-5)
    assert en.equipartition_kinetic_energy == pytest.approx(0.5 * 4 * 1.0)  # D T / 2 at unit temperature


def test_do_intervention_changes_exactly_the_intervened_sites(tiny):
    model, _ = tiny
    x = torch.full((5, 4), 3.0)

    def traced(m, seed=7):
        pyro.set_rng_seed(seed)
        return poutine.trace(m).get_trace(n_trials=5, n_bins=10)

    plain, done = traced(model), traced(poutine.do(model, data={"z_0": x}))
    # the draw of z_0 is still made (same random stream), but the program runs on the intervened value
    assert torch.equal(done.nodes["z_0"]["value"], plain.nodes["z_0"]["value"])
    assert torch.equal(done.nodes["z"]["value"][:, 0], x) and not torch.equal(plain.nodes["z"]["value"][:, 0], x)
    assert torch.equal(done.nodes["v_0"]["value"], plain.nodes["v_0"]["value"])  # not intervened, not downstream
    step = model.transition_fn()
    for t in range(1, 10):  # v_1 .. v_9: the same noise draw in both runs, only its mean moved
        name = f"v_{t}"
        noise = {}
        for key, tr in (("plain", plain), ("done", done)):
            loc = step(tr.nodes["z"]["value"][:, t - 1], tr.nodes["v"]["value"][:, t - 1]).v_loc
            noise[key] = tr.nodes[name]["value"] - loc
        torch.testing.assert_close(noise["plain"], noise["done"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(done.nodes["z"]["value"][:, 5:], plain.nodes["z"]["value"][:, 5:])


def test_potential_interventions_copy_the_model_and_cut_only_the_named_couplings(tiny):
    model, _ = tiny
    s = model.potential.stiffness_matrix().detach().double().numpy()
    off = decoupled = dyn.decoupled(model)
    np.testing.assert_allclose(off.potential.stiffness_matrix().double().numpy(), np.diag(np.diag(s)), rtol=1e-6)
    site = dyn.strongest_site(model)
    cut = dyn.without_site(model, site).potential.stiffness_matrix().double().numpy()
    units = np.arange(model.potential.channels) * model.potential.sites + site
    others = np.setdiff1d(np.arange(4), units)
    assert np.all(cut[np.ix_(units, others)] == 0) and np.all(cut[np.ix_(others, units)] == 0)
    keep = np.ones_like(s, dtype=bool)
    keep[np.ix_(units, others)] = keep[np.ix_(others, units)] = False
    np.testing.assert_allclose(cut[keep], s[keep], rtol=1e-6)
    # the fitted model is untouched and shares no parameter with the copy; the decoder is the same
    np.testing.assert_allclose(model.potential.stiffness_matrix().detach().double().numpy(), s)
    with torch.no_grad():
        decoupled.decoder.readout.bias.add_(1.0)
    assert not torch.equal(decoupled.decoder.readout.bias, model.decoder.readout.bias)
    assert decoupled.pyro_name != model.pyro_name


def test_intervention_suite_responses(tiny):
    model, batch = tiny
    paths = dyn.latent_paths(model, GRUGuide(model, batch.n_heldin, hidden=8), batch)
    modes = dyn.normal_modes(model)
    z0, v0 = torch.as_tensor(paths.z[:, 0]), torch.as_tensor(paths.v[:, 0])
    suite = dyn.intervention_suite(model, modes, z0, v0, batch.n_bins, paths.z, n_draws=3)
    res = suite["interventions"]
    assert set(res) == {"impulse", "displaced_start", "coupling_off", "site_removed"}
    # an impulse leaves z_0 alone and moves the path from the next bin on; a displaced start moves z_0
    assert res["impulse"].latent_shift_per_time[0] == 0 and res["impulse"].latent_shift_per_time[1] > 0
    k = suite["mode_index"]
    kick = 2.0 * math.sqrt(modes.temperature / modes.eigenvalues_per_unit2[k])
    assert res["displaced_start"].latent_shift_per_time[0] == pytest.approx(kick, rel=1e-4)
    # same noise in every run: repeating the baseline gives the same rates exactly
    again = dyn.prior_response(model, z0, v0, batch.n_bins, n_draws=3, seed=0)
    np.testing.assert_array_equal(again.rates, suite["baseline"].rates)
    assert all(np.all(np.isfinite(r.psth_shift_hz)) and r.psth_hz.shape == (1, batch.n_bins, 6) for r in res.values())
    json.dumps(dyn.jsonable({k: v.summary() for k, v in res.items()}))  # JSON-ready


def test_flow_field_projects_the_force_on_the_top_two_components(tiny):
    model, batch = tiny
    paths = dyn.latent_paths(model, GRUGuide(model, batch.n_heldin, hidden=8), batch)
    flow = dyn.flow_field(model, paths, grid_size=5)
    assert flow.energy.shape == (5, 5) and flow.paths.shape == (12, 15, 2) and flow.prior_paths.shape == (12, 15, 2)
    np.testing.assert_allclose(flow.components @ flow.components.T, np.eye(2), atol=1e-8)
    # at a grid point the arrow is the force there projected on the plane
    z = flow.mean + flow.grid_pc1[1] * flow.components[0] + flow.grid_pc2[3] * flow.components[1]
    f = model.potential.force(torch.as_tensor(z[None], dtype=torch.float32)).detach().numpy()[0] @ flow.components.T
    np.testing.assert_allclose([flow.force_pc1[3, 1], flow.force_pc2[3, 1]], f, rtol=1e-4, atol=1e-5)
    # the rollout is the noise-free prior from the posterior start
    assert np.allclose(flow.prior_paths[:, 0], flow.paths[:, 0], atol=1e-5)


def _example(name: str):
    """An example script imported as a module (its ``main(argv)`` runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dynamics_example_reads_a_lorenz_run(tmp_path, capsys):
    run = tmp_path / "lorenz"
    assert _example("lorenz").main(["--quick", "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["langevinflow"]["lorenz_state_r2"] <= 1
    out = tmp_path / "dyn"
    argv = ["--data", "lorenz", "--run", str(run), "--quick", "--out", str(out)]
    dynamics = _example("dynamics")
    assert dynamics.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((out / "dynamics.json").read_text())["alignment"] == summary["alignment"]
    assert {Path(f).name for f in summary["figures"]} == {
        "modes.png", "energy.png", "flow.png", "rotation.png", "alignment.png", "interventions.png"}
    assert -1 < summary["alignment"]["ridge_train_to_valid_zv"]["r2"] <= 1
    assert 0 <= summary["energy"]["force_share"] <= 1
    # a second readout into the same folder is refused; a folder without a run is named as such
    assert dynamics.main(argv) == 2 and "--out" in capsys.readouterr().err
    assert dynamics.main(["--data", "lorenz", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error: --run" in err and "Traceback" not in err
    assert dynamics.main(["--data", "nlb", "--run", str(run), "--out", str(tmp_path / "y")]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_dynamics_example_reads_an_nlb_run(tmp_path, capsys):
    from pyro_langevin.nlb import members
    from pyro_langevin.nlb.coarse import coarsen_data
    from pyro_langevin.nlb.config import default_config
    from pyro_langevin.nlb.data import load_nlb

    data_dir = ROOT / "tests" / "data"  # real MC_Maze_Small, 5 ms: a one-epoch member at 20 ms, as examples/nlb.py writes it
    fit_data = coarsen_data(load_nlb("mc_maze_small", data_dir, 5, "val"), 20)
    cfg = default_config("mc_maze_small", 20, quick=True, epochs=1)
    (member,) = members.fold_members(fit_data.train, [fit_data.eval], 1, 0.2, 0, tmp_path / "run")
    members.train_member(member, cfg, fit_data, progress=False, log=lambda s: None,
                         meta={"dataset": "mc_maze_small", "bin_ms": 5, "phase": "val", "seed": 0, "fit_bin_ms": 20})
    out = tmp_path / "dyn"
    argv = ["--data", "nlb", "--run", str(tmp_path / "run"), "--data-dir", str(data_dir), "--quick", "--out", str(out)]
    assert _example("dynamics").main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {Path(f).name for f in summary["figures"]} == {
        "modes.png", "energy.png", "flow.png", "rotation.png", "decoding.png", "interventions.png"}
    assert summary["n_trials"] == 75 and sum(summary["conditions"]["trials_per_direction"].values()) == 75
    times = summary["time_ms_from_movement_onset"]
    assert times[0] == -250 and len(times) == 35  # 700 ms of 20 ms bins from 250 ms before movement onset
    assert set(summary["rotation"]) >= {"latent_z_movement_window", "data_psth_movement_window"}
    assert len(summary["velocity_decoding"]["latent_state_zv"]["r2_per_time"]) == 35


def test_bad_input_is_named(tiny):
    model, batch = tiny
    with pytest.raises(TypeError, match="batch: expected a Batch"):
        dyn.latent_paths(model, model, batch.target)
    with pytest.raises(ValueError, match="path must be"):
        dyn.latent_paths(model, model, batch, path="median")
    with pytest.raises(ValueError, match="conditions: expected 12 labels"):
        dyn.condition_average(np.zeros((12, 5, 2)), [0, 1])
    with pytest.raises(ValueError, match="x: expected"):
        dyn.rotation_fit(np.zeros((4, 2, 3)), 0.01)
    with pytest.raises(ValueError, match="z0, v0"):
        dyn.prior_response(model, torch.zeros(3, 4), torch.zeros(3, 5), 10)
    with pytest.raises(ValueError, match="no stiffness matrix"):
        dyn.decoupled(LangevinFlow(6, latent_dim=4, potential="mlp"))
