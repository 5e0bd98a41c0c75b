"""Plain Pyro trains the model and guides: SVI + pyro.optim, autoguides, Predictive, poutine, render_model."""

from __future__ import annotations

import copy

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoLowRankMultivariateNormal, AutoNormal

from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide, MeanFieldGuide
from pyro_langevin.models import LangevinFlow, velocity_site
from pyro_langevin.training import FitConfig, fit

N_IN, N_OUT, D = 6, 2, 3


@pytest.fixture(scope="module")
def trials():
    """Six Lorenz training trials, 12 bins, 6 held-in + 2 held-out neurons."""
    return make_lorenz(n_conditions=2, trials_per_condition=4, n_bins=12, n_neurons=N_IN + N_OUT,
                       n_heldout=N_OUT, seed=1).train


def small_model(**kwargs) -> LangevinFlow:
    return LangevinFlow(N_IN + N_OUT, D, dt=0.1, decoder_kwargs={"d_model": 8, "dim_feedforward": 16}, **kwargs)


def snapshot(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def unchanged(before: dict[str, torch.Tensor], *modules) -> list[str]:
    now = {f"{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters()}
    return [n for n, p in before.items() if torch.equal(p, now[n])]


def svi_losses(model, guide, batch, steps: int, elbo=None, lr: float = 1e-2) -> list[float]:
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo or TraceMeanField_ELBO())
    return [svi.step(batch) for _ in range(steps)]


def improved(losses: list[float]) -> bool:
    return sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05 * abs(sum(losses[:5]) / 5)


@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO(), Trace_ELBO()], ids=["meanfield", "trace"])
def test_svi_trains_every_model_and_guide_tensor(trials, elbo):
    model = small_model()
    guide = GRUGuide(model, N_IN, hidden=8)
    before = snapshot(model, guide)
    losses = svi_losses(model, guide, trials, 40, elbo)
    assert unchanged(before, model, guide) == []
    assert improved(losses), losses
    # the param store holds the modules' own tensors, so fit() and SVI train the same objects
    store = pyro.get_param_store()
    for module in (model, guide):
        for name, p in module.named_parameters():
            assert store[f"{module.pyro_name}$$${name}"] is p


def test_fit_and_svi_train_the_same_tensors(trials):
    model = small_model()
    guide = GRUGuide(model, N_IN, hidden=8)
    config = FitConfig(epochs=2, batch_size=64, lr=1e-2, val_every=2, seed=0)
    fit(model, guide, trials, None, config, device="cpu", progress=False)
    after_fit = snapshot(model, guide)
    svi_losses(model, guide, trials, 2)
    assert unchanged(after_fit, model, guide) == []


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoLowRankMultivariateNormal])
def test_autoguide_fits_model_on_fixed_trials(trials, autoguide):
    model = small_model()
    guide = autoguide(model)
    before = snapshot(model)
    losses = svi_losses(model, guide, trials, 40, Trace_ELBO(), lr=2e-2)
    assert unchanged(before, model) == []  # the model's decoder and potential train too
    assert improved(losses), losses


def test_autoguide_list_initial_state_plus_project_guide(trials):
    model = small_model()
    steps = GRUGuide(model, N_IN, hidden=8).steps_only()
    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, expose=["z_0", velocity_site(0)])))
    guide.append(steps)
    losses = svi_losses(model, guide, trials, 40)
    assert improved(losses), losses
    # each site has exactly one owner, and the per-step laws start from the AutoNormal draw
    steps.eval()  # no encoder dropout, so the forces below are the ones the guide used
    tr = poutine.trace(guide).get_trace(trials)
    latent = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["infer"].get("is_auxiliary")
              and n.startswith(("z_", "v_"))]
    assert sorted(latent) == sorted(["z_0"] + [velocity_site(t) for t in range(trials.n_bins)])
    prior = model.transition(tr.nodes["z_0"]["value"], tr.nodes["v_0"]["value"])
    q_v1 = tr.nodes["v_1"]["fn"].base_dist
    force, log_scale = steps.force_head(steps.encode(trials)[0][:, 1])
    torch.testing.assert_close(q_v1.loc, prior.v_loc + force)


def test_steps_only_guide_alone_says_what_is_missing(trials):
    guide = GRUGuide(small_model(), N_IN, hidden=8).steps_only()
    with pytest.raises(LookupError, match="z_0"):
        poutine.trace(guide).get_trace(trials)


def _prior_paths(model, data=None, n_trials=4, n_bins=6, num_samples=3) -> dict[str, torch.Tensor]:
    program = model if data is None else poutine.do(model, data=data)
    return Predictive(program, num_samples=num_samples, return_sites=["z", "rates"])(n_trials=n_trials, n_bins=n_bins)


def test_do_initial_state_fixes_the_start_of_every_prior_path():
    model = small_model()
    z0, v0 = torch.full((4, D), 0.5), torch.full((4, D), -1.0)
    free = _prior_paths(model)
    forced = _prior_paths(model, {"z_0": z0, "v_0": v0})
    assert free["z"][:, :, 0].std() > 0.1
    torch.testing.assert_close(forced["z"][:, :, 0], z0.expand(3, 4, D))
    with torch.no_grad():
        z1 = model.transition(z0, v0).z_next  # the first step is deterministic given (z_0, v_0)
    torch.testing.assert_close(forced["z"][:, :, 1], z1.expand(3, 4, D))
    assert forced["z"][:, :, 2].std() > 1e-3  # the noise of v_1 still acts


def test_do_every_velocity_zero_without_potential_holds_the_latent_still():
    model = small_model(potential="zero").eval()  # no decoder dropout: the rates are a function of the path
    n_bins, z0 = 5, torch.randn(4, D)
    data = {"z_0": z0, **{velocity_site(t): torch.zeros(4, D) for t in range(n_bins)}}
    forced = _prior_paths(model, data, n_bins=n_bins)
    torch.testing.assert_close(forced["z"], z0[:, None].expand(3, 4, n_bins, D))
    # with the path clamped, rates are the same in every draw, and differ from the free prior's
    torch.testing.assert_close(forced["rates"], forced["rates"][:1].expand_as(forced["rates"]))
    assert _prior_paths(model, n_bins=n_bins)["rates"].std(0).max() > 1e-3


def test_condition_on_a_latent_scores_it_under_the_prior(trials):
    model = small_model()
    v1 = torch.zeros(trials.n_trials, D)
    tr = poutine.trace(poutine.condition(model, data={"v_1": v1})).get_trace(trials)
    assert tr.nodes["v_1"]["is_observed"] and torch.equal(tr.nodes["v_1"]["value"], v1)


def test_render_model(trials):
    pytest.importorskip("graphviz")
    graph = pyro.render_model(small_model(), model_args=(trials,), render_distributions=True)
    assert "z_0" in graph.source and "spikes" in graph.source


def test_two_models_in_one_process_stay_separate(trials):
    first, second = small_model(), small_model()
    first_guide = MeanFieldGuide(first, int(trials.index.max()) + 1, trials.n_observed_bins)
    svi_losses(first, first_guide, trials, 1)  # first's tensors are now in the param store
    assert first.pyro_name != second.pyro_name
    kept = snapshot(first, first_guide)
    before = snapshot(second)
    guide = GRUGuide(second, N_IN, hidden=8)
    svi_losses(second, guide, trials, 3)
    assert unchanged(kept, first, first_guide) == list(kept)  # not one tensor of the first moved
    assert unchanged(before, second) == []
    # a copy is a new instance with its own name; a name reused by hand raises instead of mixing
    clone = copy.deepcopy(second)
    assert clone.pyro_name not in (first.pyro_name, second.pyro_name)
    poutine.trace(clone).get_trace(trials)
    clone.pyro_name = first.pyro_name
    with pytest.raises(RuntimeError, match="pyro_name"):
        poutine.trace(clone).get_trace(trials)


def test_a_collected_model_leaves_the_param_store_and_the_users_sites_stay(trials):
    """Issue 24: fitting many models in one process must not grow Pyro's store or clear a user's sites."""
    import gc
    import pickle

    store = pyro.get_param_store()
    mine = pyro.param("users_own_site", torch.ones(3))
    for _ in range(3):
        model = LangevinFlow(trials.n_neurons, latent_dim=4)
        guide = GRUGuide(model, trials.n_heldin, hidden=8)
        fit(model, guide, trials, None, FitConfig(epochs=1, batch_size=16), progress=False)
        assert len(store) > 1  # registered while alive (plain Pyro can train them)
        del model, guide
        gc.collect()
        assert list(store.keys()) == ["users_own_site"] and store["users_own_site"] is mine
    model = LangevinFlow(trials.n_neurons, latent_dim=4)
    model(trials)
    n = len(store)
    model.release_params()  # at once, without waiting for the collector
    assert list(store.keys()) == ["users_own_site"]
    copy_of = pickle.loads(pickle.dumps(model))  # released parameters pickle (Pyro's weak back-references gone)
    model(trials)
    copy_of(trials)
    assert len(store) == 2 * n - 1  # each instance under its own names
