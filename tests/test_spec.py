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


# ----- issue 24: a complete run spec -------------------------------------------------------------
def test_every_guide_of_the_package_builds_by_name_also_in_the_nlb_config():
    from pyro_langevin import guides as package_guides
    from pyro_langevin.guides.base import StepwiseGuide

    classes = {c for c in vars(package_guides).values()
               if isinstance(c, type) and issubclass(c, StepwiseGuide) and c is not StepwiseGuide}
    built = set()
    for name in GUIDES:
        changes = {"guide.name": name}
        if name == "meanfield":
            with pytest.raises(SpecError, match="guide.n_trials"):
                build(small_spec(**changes), 8, 6)
            changes.update({"guide.n_trials": 12, "guide.n_observed_bins": 10})
        _, guide = build(small_spec(**changes), 8, 6)
        built.add(type(guide))
        nlb = default_config("mc_maze_small", 20, quick=True, overrides=changes)  # the NLB config takes any of them
        assert nlb.guide.name == name
    assert classes <= built, classes - built
    _, flow = build(small_spec(**{"guide.name": "autoregressive_flow"}), 8, 6)
    assert flow.spline is not None


def test_every_model_option_has_a_dotted_key():
    spec = small_spec(**{"model.sigma": 0.5, "model.mass": 2.0, "model.learn_sigma": True, "model.overdamped": False,
                         "model.learn_gamma": True})
    model, _ = build(spec, 8, 6)
    params = model.dynamics
    assert float(params.sigma) == pytest.approx(0.5) and float(params.mass) == 2.0
    assert params.raw_sigma.requires_grad and params.raw_gamma.requires_grad
    over, _ = build(small_spec(**{"model.overdamped": True}), 8, 6)
    assert over.dynamics.overdamped
    assert spec.typed("model.sigma", None) is None and spec.typed("model.sigma", 1) == 1.0
    with pytest.raises(SpecError, match="model.sigma"):
        spec.typed("model.sigma", "loud")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_spec_file_sets_many_keys_nested_or_flat(tmp_path, suffix):
    from pyro_langevin.spec import read_spec_file

    nested = {"model": {"latent_dim": 8, "sigma": 0.3}, "fit": {"lr": 0.001}, "guide.name": "bigru"}
    path = tmp_path / f"spec{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(nested))
    else:
        path.write_text("model:\n  latent_dim: 8\n  sigma: 0.3\nfit:\n  lr: 0.001\nguide.name: bigru\n")
    changes = read_spec_file(path, small_spec())
    assert changes == {"model.latent_dim": 8, "model.sigma": 0.3, "fit.lr": 0.001, "guide.name": "bigru"}
    spec = small_spec().override(changes)
    assert (spec.model.latent_dim, spec.guide.name) == (8, "bigru")
    # a stored run spec is a spec file too
    (tmp_path / "stored.json").write_text(json.dumps(spec.to_dict()))
    assert small_spec().override(read_spec_file(tmp_path / "stored.json", small_spec())) == spec
    for text, words in (('{"model": {"latent_dims": 3}}', "unknown RunSpec key 'model.latent_dims'"),
                        ('{"model.latent_dim": 2.5}', "expected an integer"), ("[1, 2]", "expected a mapping"),
                        ("{not json", "not valid JSON")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(SpecError, match=words):
            read_spec_file(tmp_path / "bad.json", small_spec())


def test_load_run_finds_spec_classes_through_the_registry(tmp_path, lorenz):
    from pyro_langevin.spec import SPEC_CLASSES, register_spec_class

    assert SPEC_CLASSES["NLBConfig"] is NLBConfig and SPEC_CLASSES["RunSpec"] is RunSpec
    meta = run_meta(NLBConfig(), 8, 6)
    assert meta["spec_class"] == "NLBConfig" and meta["spec_module"] == "pyro_langevin.nlb.config"

    import dataclasses

    @dataclasses.dataclass
    class Unregistered(RunSpec):
        pass

    spec = Unregistered().override({"model.latent_dim": 4, "guide.hidden": 8, "fit.epochs": 1})
    model, guide = build(spec, lorenz.train.n_neurons, lorenz.train.n_heldin)
    fit(model, guide, lorenz.train, lorenz.valid, spec.fit, checkpoint_dir=tmp_path / "c", progress=False,
        meta=run_meta(spec, lorenz.train.n_neurons, lorenz.train.n_heldin))
    with pytest.raises(SpecError, match="not registered"):
        load_run(tmp_path / "c")
    register_spec_class(Unregistered)
    try:
        assert type(load_run(tmp_path / "c").spec) is Unregistered
    finally:
        del SPEC_CLASSES["Unregistered"]


def test_nlb_request_checks_its_fields_and_builds_the_members_spec(tmp_path):
    from pyro_langevin.data.errors import NLBDataError
    from pyro_langevin.nlb.request import NLBRequest

    request = NLBRequest("mc_maze_small", tmp_path, bin_ms=5, quick=True, overrides={"fit.lr": 1e-3}, epochs=2)
    cfg = request.spec()
    assert request.fit_bin == 20 and cfg.model.dt == pytest.approx(0.2)  # members fit at 20 ms
    assert (cfg.fit.lr, cfg.fit.epochs) == (1e-3, 2)
    assert request.replace(fit_bin_ms=5).spec().model.dt == pytest.approx(0.05)
    assert request.meta() == {"dataset": "mc_maze_small", "bin_ms": 5, "phase": "val", "seed": 0, "fit_bin_ms": 20}
    with pytest.raises(NLBDataError, match="unknown NLB dataset"):
        NLBRequest("mc_mazy", tmp_path)
    with pytest.raises(SpecError, match="cannot fit"):
        NLBRequest("mc_maze_small", tmp_path, bin_ms=20, fit_bin_ms=5)
    for bad in ({"workers": 0}, {"epochs": 0}, {"seed": -1}, {"threads": True}):
        with pytest.raises(SpecError):
            NLBRequest("mc_maze_small", tmp_path, **bad)
    with pytest.raises(SpecError, match="unknown NLBConfig key"):
        request.replace(overrides={"fit.nope": 1}).spec()
    with pytest.raises(SpecError, match="eval.n_models"):
        request.replace(overrides={"eval.n_models": 0}).spec()
