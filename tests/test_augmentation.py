"""Temporal-shift augmentation: what moves, what stays, and that training applies it."""

import pytest
import torch

from pyro_langevin import make_batch
from pyro_langevin import training
from pyro_langevin.augmentation import draw_shifts, temporal_shift
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.training import FitConfig, fit


def _batch(n=8, t=20, n_in=5, n_out=3, f=4):
    g = torch.Generator().manual_seed(2)
    c = torch.poisson(torch.full((n, t + f, n_in + n_out), 2.0), generator=g)
    return make_batch(c[:, :t, :n_in], c[:, :t, n_in:], c[:, t:, :n_in], c[:, t:, n_in:])


def test_each_neuron_train_moves_by_its_own_shift_in_input_and_target():
    b = _batch()
    t, n_in, span = b.n_observed_bins, b.n_heldin, b.n_bins
    s = temporal_shift(b, std=2.0, max_shift=4, generator=torch.Generator().manual_seed(7))
    shifts = draw_shifts((b.n_trials, 1, b.n_neurons), 2.0, 4, torch.Generator().manual_seed(7))[:, 0]
    assert shifts.abs().max() <= 4 and (shifts != 0).float().mean() > 0.5
    for i in range(b.n_trials):
        for j in range(b.n_neurons):
            k = int(shifts[i, j])
            lo, hi = max(0, k), min(span, span + k)  # bins that read inside the trial
            assert torch.equal(s.target[i, lo:hi, j], b.target[i, lo - k:hi - k, j])
            assert s.mask[i, lo:hi, j].all() and not s.mask[i, :lo, j].any() and not s.mask[i, hi:, j].any()
            if j < n_in:  # the guide reads the shifted train where it was observed, and nothing else
                first, stop = max(0, k), min(t, t + k)  # input bins whose source is an observed bin
                assert torch.equal(s.input[i, first:stop, j], s.target[i, first:stop, j])
                assert (s.input[i, :first, j] == 0).all() and (s.input[i, stop:, j] == 0).all()
    assert torch.equal(s.index, b.index)


def test_no_shift_returns_the_batch_and_bad_settings_are_refused():
    b = _batch()
    assert temporal_shift(b, 0.0, 3) is b
    with pytest.raises(ValueError, match="std"):
        temporal_shift(b, -1.0, 3)
    with pytest.raises(ValueError, match="shift_std"):
        FitConfig(shift_std=-0.5)
    assert FitConfig(shift_std=0.75).max_shift == 2 and FitConfig(shift_std=0.75, shift_max=5).max_shift == 5


def test_shifts_follow_the_rounded_clamped_normal():
    s = draw_shifts((200, 1, 100), 1.5, 3, torch.Generator().manual_seed(0)).float()
    assert s.abs().max() == 3
    assert abs(float(s.mean())) < 0.05
    assert 1.3 < float(s.std()) < 1.6  # 1.5, rounded (+1/12 variance) and clamped at 2 s.d.


def test_fit_shifts_every_training_minibatch(monkeypatch):
    calls = []

    def spy(batch, std, max_shift, generator=None):
        calls.append((batch.n_trials, std, max_shift))
        return batch

    monkeypatch.setattr(training, "temporal_shift", spy)
    data = make_lorenz(n_conditions=4, trials_per_condition=4, n_bins=12, n_neurons=6, seed=1)
    model = LangevinFlow(6, latent_dim=4, dt=0.1, decoder_kwargs={"d_model": 8, "n_heads": 2, "dim_feedforward": 16})
    guide = GRUGuide(model, 6, hidden=8)
    n = data.train.n_trials
    fit(model, guide, data.train, None, FitConfig(epochs=2, batch_size=5, shift_std=1.5, seed=0),
        device="cpu", progress=False)
    steps = -(-n // 5)
    assert len(calls) == 2 * steps and {c[1:] for c in calls} == {(1.5, 3)}
    assert sum(c[0] for c in calls) == 2 * n


def test_forward_bins_move_with_the_train_and_never_reach_the_guide():
    n, t, f, n_in, n_out = 6, 10, 4, 3, 2
    ramp = torch.arange(t + f, dtype=torch.float32).view(1, -1, 1).expand(n, -1, n_in + n_out).contiguous()
    b = make_batch(ramp[:, :t, :n_in], ramp[:, :t, n_in:], ramp[:, t:, :n_in], ramp[:, t:, n_in:])
    s = temporal_shift(b, std=2.0, max_shift=3, generator=torch.Generator().manual_seed(4))
    shifts = draw_shifts((n, 1, n_in + n_out), 2.0, 3, torch.Generator().manual_seed(4))
    assert (shifts < 0).any() and (shifts > 0).any()
    expected = torch.arange(t + f).view(1, -1, 1) - shifts  # each bin holds the count of bin t - s
    scored = s.mask
    assert torch.equal(s.target[scored], expected.expand_as(s.target)[scored].float())
    assert torch.equal(scored, (expected >= 0) & (expected < t + f))
    assert float(s.input.max()) <= t - 1  # a ramp: any forward count in the input would exceed t - 1
    inside = ((expected[:, :t, :n_in] >= 0) & (expected[:, :t, :n_in] <= t - 1)).expand_as(s.input)
    assert torch.equal(s.input[inside], s.target[:, :t, :n_in][inside])
    # past the observed window (and before bin 0) the input is hidden, not a copy of bin t - 1 (or 0),
    # while the target there holds the real forward counts
    assert (s.input[~inside] == 0).all() and (~inside).any()
    past = (expected[:, :t, :n_in] > t - 1).expand_as(s.input)
    assert past.any() and (s.target[:, :t, :n_in][past] > t - 1).all()


@pytest.mark.parametrize("bin_ms", [5, 20])
def test_nlb_defaults_shift_by_the_same_time_at_both_bin_widths(bin_ms):
    from pyro_langevin.nlb.config import SHIFT_MS, default_config

    cfg = default_config("mc_maze_small", bin_ms)
    assert cfg.fit.shift_std == pytest.approx(SHIFT_MS / bin_ms) and SHIFT_MS > 0
    assert cfg.fit.max_shift == round(2 * SHIFT_MS / bin_ms)
    assert default_config("mc_maze_small", bin_ms, overrides={"fit.shift_std": 0}).fit.shift_std == 0
