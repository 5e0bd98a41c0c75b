"""Issues 12 and 25: posterior draws in vectorised passes.

A pass with ``k`` draws traces ``k`` tiled copies of a chunk of trials (issue 12; now the fallback)
or the chunk once inside ``pyro.plate("draws", k)`` (issue 25; the default where model and guide
support it). These tests check that tiled copies are the right trials (exactly, with the randomness
removed), that the streamed moments equal a reference tiled by hand with the same seed, that the
result agrees with the per-draw loop up to Monte Carlo error, that ``max_tiled`` bounds the rows
traced at once, and that the plate gives the tiled draws for the same seed with every guide. Tiny
models (latent 4, 12 bins, 6 neurons) keep the module to a few seconds.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import AutoregressiveGuide, BiGRUGuide, GRUGuide, InitialStateGuide, MeanFieldGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.posterior import eval_mode, plate_supported, posterior_means

DECODER = dict(d_model=8, n_heads=2, dim_feedforward=16)
N_IN, LATENT = 4, 4
GUIDES = {
    "gru": lambda m, data: GRUGuide(m, N_IN, hidden=8),
    "bigru": lambda m, data: BiGRUGuide(m, N_IN, hidden=8),
    "initial_state": lambda m, data: InitialStateGuide(m, N_IN, hidden=8),
    "meanfield": lambda m, data: MeanFieldGuide(m, len(data.train), data.train.n_observed_bins),
    "autoregressive": lambda m, data: AutoregressiveGuide(m, N_IN, hidden=8, mlp_hidden=8),
    "autoregressive_flow": lambda m, data: AutoregressiveGuide(m, N_IN, hidden=8, mlp_hidden=8, flow=True),
}


@pytest.fixture(scope="module")
def data():
    return make_lorenz(n_conditions=2, trials_per_condition=5, n_bins=12, n_neurons=6, n_heldout=2, valid_fraction=0.2)


def build(data, guide: str = "gru", seed: int = 0) -> tuple[LangevinFlow, nn.Module]:
    """A tiny model and guide whose parameters are jittered, so every trial has its own posterior."""
    torch.manual_seed(seed)
    model = LangevinFlow(6, LATENT, potential="quadratic", decoder_kwargs=DECODER)
    g = GUIDES[guide](model, data)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, g


def _center(fn: dist.Distribution) -> torch.Tensor:
    """A deterministic point of ``fn``: its mean, or the transformed mean of its base (for flows)."""
    try:
        return fn.mean
    except NotImplementedError:
        pass
    if isinstance(fn, dist.TransformedDistribution):
        x = _center(fn.base_dist)
        for t in fn.transforms:
            x = t(x)
        return x
    return _center(fn.base_dist)  # Independent, masked, expanded


class _Centered(Messenger):
    """Replace every latent draw by a deterministic point of its law: removes the randomness."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and not site_is_subsample(msg):
            msg["value"] = _center(msg["fn"])


class CenteredGuide(nn.Module):
    """``guide`` without randomness (a module, so ``posterior_means`` turns its dropout off)."""

    def __init__(self, guide: nn.Module) -> None:
        super().__init__()
        self.guide = guide

    def forward(self, batch):
        with _Centered():
            self.guide(batch)


@pytest.mark.parametrize("guide", list(GUIDES))
def test_tiled_pass_gives_each_trial_its_own_posterior_exactly(data, guide):
    """With the randomness removed, k draws in one tiled pass equal k one-draw passes, per trial."""
    model, g = build(data, guide)
    batch = data.train[torch.tensor([5, 1, 7, 0, 2])]  # out of order: the mean-field guide keys on index
    centered = CenteredGuide(g)
    loop = posterior_means(model, centered, batch, ("rates", "z"), n_samples=3, draws_per_pass=1, return_std=True)
    tiled = posterior_means(model, centered, batch, ("rates", "z"), n_samples=3, draws_per_pass=3, return_std=True)
    for s in ("rates", "z"):
        torch.testing.assert_close(tiled[s], loop[s], atol=1e-6, rtol=1e-5)
        assert float(tiled[f"{s}_std"].max()) < 1e-5
    # the trials really differ, so a wrong tiling order could not pass
    assert float((loop["rates"][0] - loop["rates"][1]).abs().max()) > 1e-3


def test_streamed_moments_equal_a_reference_tiled_by_hand(data):
    """Same seed: passes of 2, 2 and 1 draws, merged by Chan's update, equal stacking those draws."""
    model, g = build(data)
    batch = data.train
    n, sizes = len(batch), (2, 2, 1)
    torch.manual_seed(7)
    out = posterior_means(model, g, batch, ("rates", "z"), n_samples=5, draws_per_pass=2, return_std=True)
    torch.manual_seed(7)
    draws = {"rates": [], "z": []}
    with eval_mode(model, g), torch.no_grad():
        for k in sizes:
            tiled = batch[torch.arange(n).repeat(k)]
            tr = poutine.trace(poutine.replay(model, trace=poutine.trace(g).get_trace(tiled))).get_trace(tiled)
            for s in draws:
                value = tr.nodes[s]["value"]
                draws[s].append(value.reshape(k, n, *value.shape[1:]))
    for s in draws:
        stacked = torch.cat(draws[s])  # (draw, trial, ...)
        torch.testing.assert_close(out[s], stacked.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[f"{s}_std"], stacked.std(0, unbiased=False), atol=1e-6, rtol=1e-4)


def test_vectorised_means_match_the_per_draw_loop_up_to_monte_carlo_error(data):
    model, g = build(data)
    batch, s = data.train, 300
    torch.manual_seed(1)
    loop = posterior_means(model, g, batch, ("rates", "z"), n_samples=s, draws_per_pass=1, return_std=True)
    torch.manual_seed(2)
    vec = posterior_means(model, g, batch, ("rates", "z"), n_samples=s, max_tiled=100 * len(batch), return_std=True)
    for site in ("rates", "z"):
        se = math.sqrt(2.0 / s) * loop[f"{site}_std"]  # standard error of a difference of two means
        assert float(loop[f"{site}_std"].max()) > 1e-2  # there is Monte Carlo noise to compare
        assert bool(((vec[site] - loop[site]).abs() <= 6 * se + 1e-5).all())
    # z is near Gaussian (rates, exp of it, are skewed: their std estimate is too noisy at this S)
    torch.testing.assert_close(vec["z_std"], loop["z_std"], rtol=0.25, atol=1e-3)


class Recording(nn.Module):
    """``guide`` behind a wrapper that records the trials of every call in ``seen``. It does not
    declare ``supports_draws_plate``, so its draws are tiled trials."""

    def __init__(self, guide: nn.Module, seen: list) -> None:
        super().__init__()
        self.guide, self.seen = guide, seen

    def forward(self, batch):
        self.seen.append(batch.n_trials)
        self.guide(batch)


def test_max_tiled_bounds_the_trials_traced_at_once(data):
    model, g = build(data)
    seen = []
    batch = data.train  # 8 trials
    out = posterior_means(model, Recording(g, seen), batch, n_samples=5, batch_size=4, max_tiled=8)
    assert seen == [8, 8, 4] * 2  # chunks of 4 trials, 2 draws a pass, 2 + 2 + 1 draws
    assert out["rates"].shape == (8, 12, 6)
    seen.clear()
    posterior_means(model, Recording(g, seen), batch, n_samples=5, batch_size=256, max_tiled=3)
    assert max(seen) == 3 and sum(seen) == 5 * 8  # chunks shrink to the budget, one draw a pass
    seen.clear()
    posterior_means(model, Recording(g, seen), batch, n_samples=4, batch_size=3)  # default budget: batch_size
    assert max(seen) <= 3 and sum(seen) == 4 * 8


def test_tiling_checks_its_options(data):
    model, g = build(data)
    for name in ("max_tiled", "draws_per_pass"):
        with pytest.raises(ValueError, match=f"{name} must be None or an int >= 1, got 0"):
            posterior_means(model, g, data.train, n_samples=2, **{name: 0})


def test_batch_indexing_with_repeated_trials_keeps_their_ids(data):
    batch = data.train
    tiled = batch[torch.arange(3).repeat(2)]
    assert tiled.index.tolist() == batch.index[:3].tolist() * 2
    assert torch.equal(tiled.input[3:], batch.input[:3]) and torch.equal(tiled.mask[:3], batch.mask[:3])


class _CountingPrepare:
    """Count calls of ``guide.prepare`` (the encoder pass) while inside the block."""

    def __init__(self, guide) -> None:
        self.guide, self.calls = guide, 0

    def __enter__(self) -> "_CountingPrepare":
        original = type(self.guide).prepare

        def counted(this, batch):
            self.calls += 1
            return original(this, batch)

        self.guide.prepare = counted.__get__(self.guide)
        return self

    def __exit__(self, *exc) -> None:
        del self.guide.prepare


@pytest.mark.parametrize("guide", list(GUIDES))
def test_shared_encoder_gives_the_same_draws_and_runs_once_per_chunk(data, guide):
    """Same seed: encoding a chunk once and tiling it equals encoding every tiled pass."""
    model, g = build(data, guide)
    batch = data.train  # 8 trials: chunks of 4, 2 draws a pass, passes of 2 + 2 + 1 draws
    kw = dict(sites=("rates", "z"), n_samples=5, batch_size=4, max_tiled=8, return_std=True)
    with _CountingPrepare(g) as per_pass:
        torch.manual_seed(3)
        before = posterior_means(model, g, batch, share_encoder=False, **kw)
    with _CountingPrepare(g) as shared:
        torch.manual_seed(3)
        after = posterior_means(model, g, batch, **kw)
    assert per_pass.calls == 6 and shared.calls == 2  # 2 chunks x 3 passes, vs once per chunk
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-5)
    assert float(after["rates_std"].max()) > 1e-3  # real draws, not a degenerate posterior


def test_shared_context_refuses_training_mode_and_skips_guides_that_may_draw_in_prepare(data):
    model, g = build(data, "gru")
    g.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        with g.shared_context(data.train):
            pass

    class Drawing(GRUGuide):
        deterministic_prepare = False  # e.g. a prepare that samples noise

    torch.manual_seed(0)
    d = Drawing(model, N_IN, hidden=8)
    with _CountingPrepare(d) as counter:
        posterior_means(model, d, data.train, n_samples=4, batch_size=8, max_tiled=16)
    assert counter.calls == 2  # one per pass of 2 draws: not shared
    g.eval()
    with g.shared_context(data.train[:3]):
        with pytest.raises(ValueError, match="copies of the prepared 3 trials"):
            g(data.train[:4])


# ----- issue 25: the draws as a plate -----
@pytest.mark.parametrize("guide", list(GUIDES))
def test_draws_plate_gives_the_tiled_draws_for_the_same_seed(data, guide):
    """k draws of a chunk in one pyro.plate("draws", k) pass: the guide sees the chunk's trials once
    (no copies), the sites have a leading draws dimension, and the means and standard deviations equal
    the tiled passes' for the same seed (the same random numbers, in the same order)."""
    model, g = build(data, guide)
    assert plate_supported(model, g)
    batch = data.train[torch.tensor([5, 1, 7, 0, 2])]  # out of order: the mean-field guide keys on index
    seen = []
    hook = g.register_forward_pre_hook(lambda module, args: seen.append(args[0].n_trials))
    kw = dict(sites=("rates", "z"), n_samples=5, max_tiled=10, return_std=True)
    out = {}
    for plate in (True, False):
        seen.clear()
        torch.manual_seed(4)
        out[plate] = posterior_means(model, g, batch, draws_plate=plate, **kw)
        assert seen == ([5, 5, 5] if plate else [10, 10, 5])  # passes of 2, 2 and 1 draws
    hook.remove()
    for key in out[True]:
        torch.testing.assert_close(out[True][key], out[False][key], atol=1e-6, rtol=1e-5)
    assert float(out[True]["rates_std"].max()) > 1e-3  # real draws
    with eval_mode(model, g), torch.no_grad(), pyro.plate("draws", 3, dim=-2):
        tr = poutine.trace(poutine.replay(model, trace=poutine.trace(g).get_trace(batch))).get_trace(batch)
    assert tr.nodes["z_0"]["value"].shape == (3, 5, LATENT) and tr.nodes["rates"]["value"].shape == (3, 5, 12, 6)
    assert not torch.equal(tr.nodes["rates"]["value"][0], tr.nodes["rates"]["value"][1])  # independent draws


def test_a_guide_without_plate_support_falls_back_to_tiled_trials(data):
    """A guide that does not declare ``supports_draws_plate`` (a wrapper, a user's own guide) is drawn
    by tiling its trials, as before; the default is the plate only when model and guide both declare it."""
    model, g = build(data)
    seen = []
    assert not plate_supported(model, Recording(g, seen)) and not plate_supported(nn.Identity(), g)
    torch.manual_seed(5)
    wrapped = posterior_means(model, Recording(g, seen), data.train, n_samples=4, max_tiled=16)
    assert seen == [16, 16]  # 8 trials x 2 draws a pass, tiled
    torch.manual_seed(5)
    direct = posterior_means(model, g, data.train, n_samples=4, max_tiled=16)
    torch.testing.assert_close(direct["rates"], wrapped["rates"], atol=1e-6, rtol=1e-5)


def test_decoder_batches_leading_dimensions_with_the_trials():
    torch.manual_seed(0)
    model = LangevinFlow(6, LATENT, decoder_kwargs=DECODER).eval()
    z, v = torch.randn(3, 5, 12, LATENT), torch.randn(3, 5, 12, LATENT)
    out = model.decoder(z, v)
    assert out.shape == (3, 5, 12, 6)
    torch.testing.assert_close(out[2, 4], model.decoder(z[2, 4:5], v[2, 4:5])[0], atol=1e-6, rtol=1e-5)
    pad = torch.zeros(5, 12, dtype=torch.bool)
    pad[:, 10:] = True  # padding, broadcast over the leading dimension
    torch.testing.assert_close(model.decoder(z, v, pad)[1], model.decoder(z[1], v[1], pad), atol=1e-6, rtol=1e-5)
