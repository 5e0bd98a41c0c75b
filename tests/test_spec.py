"""The run spec: dotted overrides, the guide registry, seeded builds and load_run."""

import json

import pyro
import pytest
import torch

from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import BiGRUGuide, GRUGuide
from pyro_langevin.nlb.config import NLBConfig, default_config
from pyro_langevin.posterior import posterior_rates
from pyro_langevin.spec import GUIDES, RunSpec, SpecError, build, load_run, register_guide, run_meta
from pyro_langevin.training import fit


@pytest.fixture(scope="module")
def lorenz():
    return make_lorenz(n_conditions=3, trials_per_condition=4, n_bins=10, n_neurons=8, n_heldout=2, seed=1)


def small_spec(**changes) -> RunSpec:
    return RunSpec().override({"model.latent_dim": 4, "model.d_model": 8, "model.n_heads": 2,
                               "model.dim_feedforward": 8, "guide.hidden": 8, "fit.epochs": 3,
                               "fit.batch_size": 6, "fit.val_every": 1, **changes})


def test_override_by_dotted_key_and_clear_errors():
    spec = small_spec()
    changed = spec.override({"fit.lr": 1e-3, "model.latent_dim": 8, "guide.name": "bigru"})
    assert (changed.fit.lr, changed.model.latent_dim, changed.guide.name) == (1e-3, 8, "bigru")
    assert spec.fit.lr == 3e-3 and spec.model.latent_dim == 4  # a copy: the original is unchanged
    with pytest.raises(SpecError, match="did you mean 'fit.lr'"):
        spec.override({"lr": 1e-3})
    with pytest.raises(SpecError, match="unknown RunSpec key 'fit.nope'"):
        spec.override({"fit.nope": 1})
    with pytest.raises(SpecError, match="lr"):
        spec.override({"fit.lr": -1.0})  # the section validates its own ranges
    with pytest.raises(SpecError, match="unknown guide 'lstm'"):
        spec.override({"guide.name": "lstm"})
    assert spec.get("fit.kl_ramp") == spec.fit.kl_ramp and "eval.n_models" in NLBConfig.keys()


def test_to_dict_round_trips_through_json():
    for spec in (small_spec(), default_config("mc_maze_small", 20)):
        again = type(spec).from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again == spec
    with pytest.raises(SpecError, match="unknown field"):
        RunSpec.from_dict({"model": {"latent_dims": 3}})


def test_build_is_seeded_by_the_spec_not_the_global_rng():
    spec = small_spec()
    torch.manual_seed(123)
    a, ga = build(spec, 8, 6)
    state = torch.get_rng_state()
    torch.manual_seed(456)
    b, gb = build(spec, 8, 6)
    for (k, x), (_, y) in zip(list(a.state_dict().items()) + list(ga.state_dict().items()),
                              list(b.state_dict().items()) + list(gb.state_dict().items())):
        assert torch.equal(x, y), k
    c, _ = build(spec.override({"fit.seed": 1}), 8, 6)
    assert not torch.equal(a.decoder.readout.weight, c.decoder.readout.weight)
    torch.manual_seed(123)
    build(spec, 8, 6)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was


def test_guide_registry_builds_by_name():
    model, guide = build(small_spec(**{"guide.name": "bigru"}), 8, 6)
    assert isinstance(guide, BiGRUGuide) and guide.prior is model
    register_guide("gru_first", lambda m, n_in, c: GRUGuide(m, n_in, hidden=c.hidden, initial_state="first"))
    try:
        _, guide = build(small_spec(**{"guide.name": "gru_first"}), 8, 6)
        assert isinstance(guide, GRUGuide) and guide.initial_state == "first"
    finally:
        del GUIDES["gru_first"]


def test_a_fit_reloads_through_load_run_into_the_same_posterior(lorenz, tmp_path):
    spec = small_spec()
    train, valid = lorenz.train, lorenz.valid
    model, guide = build(spec, train.n_neurons, train.n_heldin)
    fit(model, guide, train, valid, spec.fit, checkpoint_dir=tmp_path / "run" / "checkpoints", progress=False,
        meta=run_meta(spec, train.n_neurons, train.n_heldin, data="lorenz"))
    model.eval(), guide.eval()  # fit leaves the best state loaded
    pyro.set_rng_seed(7)
    expected = posterior_rates(model, guide, valid, n_samples=4)

    loaded_model, loaded_guide, loaded_spec, ckpt = load_run(tmp_path / "run")
    assert loaded_spec == spec and ckpt["meta"]["data"] == "lorenz"
    assert loaded_model is not model and loaded_guide.prior is loaded_model
    pyro.set_rng_seed(7)
    again = posterior_rates(loaded_model, loaded_guide, valid, n_samples=4)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    # the last state is a different one (three epochs, validation picks among them)
    assert load_run(tmp_path / "run" / "checkpoints", "last").checkpoint["epoch"] == 2


def test_load_run_says_what_is_missing(tmp_path, lorenz):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(tmp_path / "nothing")
    spec = small_spec(**{"fit.epochs": 1})
    model, guide = build(spec, lorenz.train.n_neurons, lorenz.train.n_heldin)
    fit(model, guide, lorenz.train, lorenz.valid, spec.fit, checkpoint_dir=tmp_path / "old", progress=False)
    with pytest.raises(SpecError, match="no run spec"):
        load_run(tmp_path / "old")
