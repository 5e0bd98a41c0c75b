"""Fitting 5 ms data at 20 ms (pyro_langevin.nlb.coarse): summed counts in, interpolated rates out."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.nlb.cli import nlb_main
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.nlb import members as nlb_members, pipeline as nlb_pipeline
from pyro_langevin.nlb.coarse import coarsen_batch, coarsen_data, resolve_fit_bin, upsample_rates
from pyro_langevin.nlb.data import load_nlb
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.spec import SpecError, load_run

DATA = Path(__file__).resolve().parent / "data"


def _batch(n=3, t=8, f=4, n_in=2, n_out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 5, (n, t + f, n_in + n_out), generator=g).float()
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[0, t:, :] = False  # trial 0: no forward bins
    mask[1, 5, n_in:] = False  # trial 1: one missing held-out entry inside a group
    target[~mask] = float("nan")  # allowed by the batch contract where the mask is False
    behavior = torch.randn(n, t, 2, generator=g)
    return Batch(input=target[:, :t, :n_in].clone(), target=target, mask=mask, index=torch.tensor([7, 3, 9]),
                 behavior=behavior)


def test_coarsen_batch_sums_counts_and_masks_a_group_unless_all_of_it_is_observed():
    b = _batch()
    c = coarsen_batch(b, 4)
    assert (c.n_observed_bins, c.n_forward_bins, c.n_neurons) == (2, 1, 3)
    assert torch.equal(c.input, b.input.reshape(3, 2, 4, 2).sum(2))
    assert torch.equal(c.index, b.index)
    assert torch.allclose(c.behavior, b.behavior.reshape(3, 2, 4, 2).mean(2))
    assert not c.mask[0, 2:].any() and c.mask[0, :2].all()
    assert not c.mask[1, 1, 2] and c.mask[1, 0, 2] and c.mask[1, 1, :2].all()  # bin 5 lies in group 1
    assert torch.isfinite(c.target).all()  # masked NaNs do not leak into the sums
    full = b.target.nan_to_num(0.0).reshape(3, 3, 4, 3).sum(2)
    assert torch.equal(c.target[c.mask], full[c.mask])


def test_coarsen_batch_refuses_bins_that_do_not_group():
    with pytest.raises(NLBDataError, match="groups of 4"):
        coarsen_batch(_batch(t=6), 4)


def test_coarsen_data_gives_the_20ms_files_from_the_5ms_ones():
    d5 = load_nlb("mc_maze_small", DATA, bin_ms=5, phase="val")
    d20 = coarsen_data(d5, 20)
    assert d20.bin_ms == 20 and (d20.n_observed_bins, d20.n_forward_bins) == (35, 10)
    assert torch.equal(d20.train.target, d5.train.target.reshape(75, 45, 4, -1).sum(2))
    assert torch.equal(d20.eval.input, d5.eval.input.reshape(25, 35, 4, -1).sum(2))
    # a 20 ms entry is observed exactly where all four 5 ms entries are
    assert torch.equal(d20.train.mask, d5.train.mask.reshape(75, 45, 4, -1).all(2))
    assert torch.equal(d20.eval.mask, d5.eval.mask.reshape(25, 45, 4, -1).all(2))
    assert coarsen_data(d5, 5) is d5


def test_upsample_rates_interpolates_between_coarse_centres_and_keeps_the_rate():
    const = np.full((2, 5, 3), 8.0)
    np.testing.assert_allclose(upsample_rates(const, 4), 2.0)  # counts per bin: a quarter each
    ramp = np.arange(5.0)[None, :, None] * 4.0  # linear in time
    up = upsample_rates(ramp, 4)
    assert up.shape == (1, 20, 1)
    centres = (np.arange(20) + 0.5) / 4 - 0.5  # fine-bin centres in coarse-bin units
    inside = (centres >= 0) & (centres <= 4)
    np.testing.assert_allclose(up[0, inside, 0], centres[inside])  # exact on a line
    np.testing.assert_allclose(up[0, ~inside, 0], np.where(centres[~inside] < 0, 0.0, 4.0))  # held flat at the ends
    # each coarse bin's count is kept where the rate is linear around it
    np.testing.assert_allclose(up[0, 4:16, 0].reshape(3, 4).sum(1), ramp[0, 1:4, 0])


@pytest.mark.parametrize("bin_ms,fit,expected", [(5, None, 20), (20, None, 20), (5, 5, 5), (5, 20, 20)])
def test_resolve_fit_bin(bin_ms, fit, expected):
    assert resolve_fit_bin(bin_ms, fit) == expected


@pytest.mark.parametrize("bin_ms,fit", [(20, 5), (5, 10), (5, True)])
def test_resolve_fit_bin_refuses(bin_ms, fit):
    with pytest.raises(SpecError, match="cannot fit"):
        resolve_fit_bin(bin_ms, fit)


@pytest.mark.parametrize("fit_bin_ms,dt", [(None, 0.2), (5, 0.05)])
def test_5ms_run_fits_at_the_fit_bins_and_writes_5ms_rates(tmp_path, fit_bin_ms, dt):
    m = nlb_pipeline.run_nlb(NLBRequest("mc_maze_small", DATA, 5, "val", tmp_path / "run", quick=True, progress=False,
                                        fit_bin_ms=fit_bin_ms), log=lambda s: None)
    fit_bin = fit_bin_ms or 20
    assert m["bin_ms"] == 5 and m["fit_bin_ms"] == fit_bin
    model, guide, spec, _ = load_run(m["checkpoint"])
    assert spec.model.dt == pytest.approx(dt)  # the model is configured for the bins it fits
    # the written 5 ms rates are the fitted model's own rates at its bins, interpolated and divided
    # by the number of 5 ms bins in a fitting bin: values, not only shapes
    d5 = load_nlb("mc_maze_small", DATA, bin_ms=5, phase="val")
    own = nlb_members.export_rates(model, guide, coarsen_data(d5, fit_bin), spec.eval.export_draws, seed=0)
    expected = upsample_rates(own.eval, fit_bin // 5)
    import h5py
    with h5py.File(m["submission"]) as f:
        grp = f["mc_maze_small"]
        written_heldout = grp["eval_rates_heldout"][()]
        written_forward = grp["eval_rates_heldout_forward"][()]
        written_train = np.concatenate([grp["train_rates_heldin"][()], grp["train_rates_heldout"][()]], -1)
    assert written_heldout.shape == (25, 140, 35) and written_forward.shape == (25, 40, 35)
    np.testing.assert_allclose(written_heldout, expected[:, :140, d5.n_heldin:], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(written_forward, expected[:, 140:, d5.n_heldin:], rtol=1e-4, atol=1e-7)
    # counts per 5 ms bin: the mean rate matches the mean 5 ms count (a 4x error would not)
    mean_count = float(d5.train.target[:, :140].mean())
    assert 0.7 < written_train.mean() / mean_count < 1.4
    assert np.isfinite(m["local"]["model"]["co-bps"])  # scored at 5 ms against the 5 ms targets


def test_cli_refuses_a_fit_bin_that_is_not_a_multiple(tmp_path, capsys):
    code = nlb_main(["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--bin-ms", "20", "--fit-bin-ms", "5",
                     "--quick", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--fit-bin-ms" in err and "Traceback" not in err
