"""Issue 30: many sessions, one dynamics (the core: stitched model and guides, PCR, frozen shared parts).

Two tiny sessions with different units: the stitched model trains with every guide and its shared
parameters move; each session's read-in and read-out are its own entries in Pyro's param store;
fitting only a new session leaves every shared parameter bit-identical; PCR read-ins recover a known
rotation between two sessions; a one-session model keeps its parameter names.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from pyro_langevin.batch import make_batch
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.models.stitched import observation_site
from pyro_langevin.pcr import pcr_readins
from pyro_langevin.posterior import posterior_rates
from pyro_langevin.sessions import Session, SessionError, SessionLayout
from pyro_langevin.spec import RunSpec, build, build_stitched, load_run, run_meta
from pyro_langevin.stitching import (balance_sessions, embed_session, grow, session_rows, shared_parameters,
                                     split_sessions, stitch_batches)
from pyro_langevin.training import fit

TINY = {"model.latent_dim": 4, "model.d_model": 8, "model.n_heads": 2, "model.dim_feedforward": 8, "guide.hidden": 8,
        "fit.epochs": 3, "fit.batch_size": 8, "fit.val_every": 1}


def _sessions(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = make_batch(torch.poisson(torch.full((12, 10, 6), 1.0), generator=g),
                   torch.poisson(torch.full((12, 10, 2), 2.0), generator=g))
    b = make_batch(torch.poisson(torch.full((5, 10, 4), 0.5), generator=g))
    return stitch_batches([a, b], ["A", "B"], readin_dim=4)


@pytest.mark.parametrize("guide", ["gru", "bigru", "initial_state", "autoregressive", "meanfield"])
def test_stitched_model_trains_with_every_guide_and_shared_parameters_move(guide):
    batch, layout = _sessions()
    spec = RunSpec().override({**TINY, "guide.name": guide, "guide.n_trials": layout.n_trials,
                               "guide.n_observed_bins": 10})
    model, g = build_stitched(spec, layout)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    result = fit(model, g, balance_sessions(batch, layout), batch, spec.fit, progress=False)
    assert np.isfinite(result.history[-1]["loss"])
    moved = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert any(k.startswith("potential.") for k in moved)  # the shared prior learns
    assert {"decoder.project.weight", "decoder.layer.linear1.weight"} <= moved  # the shared decoder core
    assert {"decoder.readout.sessions.A.weight", "decoder.readout.sessions.B.weight"} <= moved
    rates = posterior_rates(model, g, batch, n_samples=2)
    assert rates.shape == (17, 10, 12) and torch.isfinite(rates).all()


def test_each_session_has_its_own_site_and_its_own_params_in_the_store():
    batch, layout = _sessions()
    model, guide = build_stitched(RunSpec().override(TINY), layout)
    trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=pyro.poutine.trace(guide).get_trace(batch))).get_trace(batch)
    for i, name in enumerate(["A", "B"]):
        site = trace.nodes[observation_site(name)]
        assert site["is_observed"] and site["value"].shape == (17, 10, layout.sessions[i].n_units)
        rows = session_rows(batch, layout, name)
        log_prob = site["fn"].log_prob(site["value"])  # per trial: only its own trials are scored
        others = torch.as_tensor([r for r in range(17) if r not in set(rows.tolist())])
        assert bool((log_prob[rows] < 0).all()) and bool((log_prob[others] == 0).all())
    store = pyro.get_param_store()
    own = {n: [k for k in store.keys() if k.startswith((model.pyro_name, guide.pyro_name)) and f".{n}." in k] for n in "AB"}
    assert {k.split("$$$")[1] for k in own["A"]} == {"decoder.readout.sessions.A.weight", "decoder.readout.sessions.A.bias",
                                                     "readin.A.weight", "readin.A.bias"}
    assert not set(own["A"]) & set(own["B"])
    assert store[f"{model.pyro_name}$$$decoder.readout.sessions.A.weight"].shape == (8, 8)  # A: 6 + 2 units
    assert store[f"{model.pyro_name}$$$decoder.readout.sessions.B.weight"].shape == (4, 8)
    # the shared core is registered once, by the wrapped guide under its own name (not twice)
    assert not [k for k in store.keys() if k.startswith(guide.pyro_name) and "readin" not in k]


def test_fitting_a_new_session_leaves_the_shared_parameters_bit_identical():
    batch, layout = _sessions()
    spec = RunSpec().override(TINY)
    model, guide = build_stitched(spec, layout)
    fit(model, guide, batch, None, spec.fit, progress=False)
    new = make_batch(torch.poisson(torch.full((6, 10, 3), 1.0)))
    grown = layout.with_session(Session("C", 3, 0, 6))
    model2, guide2, trainable = grow(spec, model, guide, Session("C", 3, 0, 6), embed_session(new, grown, "C"))
    assert set(trainable) == {"model.decoder.readout.sessions.C.weight", "model.decoder.readout.sessions.C.bias",
                              "guide.readin.C.weight", "guide.readin.C.bias"}
    frozen = shared_parameters(model2, guide2, ["C"])
    assert all(torch.equal(frozen[f"model.{k}"], p) for k, p in model.named_parameters())  # carried over
    c_before = model2.decoder.readout.sessions["C"].weight.detach().clone()
    fit(model2, guide2, embed_session(new, grown, "C"), None, spec.fit.__class__(**{**vars(spec.fit), "weight_decay": 1e-2}),
        progress=False, init_rates=False)
    after = shared_parameters(model2, guide2, ["C"])
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert not torch.equal(c_before, model2.decoder.readout.sessions["C"].weight)


def test_pcr_readins_recover_a_known_rotation():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(6, 20, 3)).cumsum(axis=1)  # condition x time x 3 shared factors
    mix = rng.normal(size=(3, 10))
    x1 = latent @ mix + 0.01 * rng.normal(size=(6, 20, 10))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))  # session 2 sees session 1's units rotated
    x2 = x1 @ q
    (w1, b1), (w2, b2) = pcr_readins([x1, x2], dim=3, alpha=1e-6)
    np.testing.assert_allclose(w2, w1 @ q, atol=1e-3)  # read-in 2 undoes the rotation
    f1 = x1.reshape(-1, 10) @ w1.T + b1
    f2 = x2.reshape(-1, 10) @ w2.T + b2
    np.testing.assert_allclose(f1, f2, atol=1e-3)  # both sessions land on the same shared features
    # the shared features span the latent factors
    lat = latent.reshape(-1, 3) - latent.reshape(-1, 3).mean(0)
    coef, *_ = np.linalg.lstsq(f1 - f1.mean(0), lat, rcond=None)
    assert np.allclose((f1 - f1.mean(0)) @ coef, lat, atol=0.05)


def test_validation_split_and_balance_are_per_session():
    batch, layout = _sessions()
    fit_part, valid = split_sessions(batch, layout, 0.2, 0)
    for name, n in (("A", 12), ("B", 5)):
        assert len(session_rows(valid, layout, name)) == round(0.2 * n) or len(session_rows(valid, layout, name)) == 1
    balanced = balance_sessions(fit_part, layout)
    assert len(session_rows(balanced, layout, "A")) == len(session_rows(balanced, layout, "B")) == 10


def test_layouts_refuse_duplicate_names_and_sessions_already_there():
    with pytest.raises(SessionError, match="given twice"):
        SessionLayout.of(["A", "A"], [2, 2], [0, 0], [3, 3])
    with pytest.raises(SessionError, match="already in the run"):
        SessionLayout.of(["A"], [2], [0], [3]).with_session(Session("A", 2, 0, 3))


def test_load_run_rebuilds_a_stitched_fit_and_a_single_session_model_keeps_its_names(tmp_path):
    batch, layout = _sessions()
    spec = RunSpec().override({**TINY, "fit.epochs": 1})
    model, guide = build_stitched(spec, layout)
    fit(model, guide, batch, batch, spec.fit, progress=False, checkpoint_dir=tmp_path,
        meta=run_meta(spec, layout.n_neurons, layout.n_heldin, sessions=layout.to_dict()))
    loaded = load_run(tmp_path, "best")
    assert loaded.model.layout == layout
    for (k, p), (k2, p2) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(p, p2)
    plain, _ = build(spec, 8, 6)
    assert type(plain) is LangevinFlow and "decoder.readout.weight" in dict(plain.named_parameters())
