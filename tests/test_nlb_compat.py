"""The pandas-3 shim for nlb_tools: each replacement must behave like the original under pandas 2."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nwb_factory import write_nlb_nwb
from pyro_langevin.nlb import compat as nlb_compat

REAL_NWB = Path(__file__).parent / "data" / "000140" / "sub-Jenkins" / "sub-Jenkins_ses-small_desc-test_ecephys.nwb"
PANDAS3 = nlb_compat.pandas_major() >= 3


@pytest.fixture
def forced():
    """Patches on for the test (even under pandas 2), restored afterwards."""
    was = nlb_compat.patches_active()
    nlb_compat.apply_patches(force=True)
    yield
    if not was:
        nlb_compat.remove_patches()


def _unpatched():
    if PANDAS3:
        pytest.skip("the unpatched nlb_tools does not run under pandas 3")
    nlb_compat.remove_patches()


def _resampled(path, bin_ms=5):
    from nlb_tools.nwb_interface import NWBDataset

    ds = NWBDataset(str(path))
    ds.resample(bin_ms)
    return ds


def test_apply_is_idempotent_and_removable(forced):
    from nlb_tools import make_tensors, nwb_interface

    assert nlb_compat.patches_active()
    assert nlb_compat.apply_patches(force=True)
    assert getattr(make_tensors._make_psth, "_pyro_langevin_patched", False)
    assert isinstance(nwb_interface.np, nlb_compat._CopyingNumpy)
    assert nwb_interface.np.arange is np.arange


def test_only_patches_under_pandas3():
    if nlb_compat.patches_active():
        pytest.skip("patches already active in this session")
    assert nlb_compat.apply_patches() is PANDAS3
    if not PANDAS3:
        assert not nlb_compat.patches_active()


def test_nan_to_num_proxy_never_writes_in_place():
    arr = np.array([1.0, np.nan])
    arr.setflags(write=False)  # what DataFrame.to_numpy() hands out under copy-on-write
    out = nlb_compat._CopyingNumpy().nan_to_num(arr, copy=False)
    assert out.tolist() == [1.0, 0.0] and np.isnan(arr[1])


def test_resample_real_nwb_same_as_unpatched():
    _unpatched()
    ref = _resampled(REAL_NWB).data
    nlb_compat.apply_patches(force=True)
    try:
        got = _resampled(REAL_NWB).data
    finally:
        nlb_compat.remove_patches()
    pd.testing.assert_frame_equal(ref, got)


def test_resample_real_nwb_under_installed_pandas():
    # through our adapter the patches are applied when pandas needs them
    from nlb_tools.make_tensors import make_eval_input_tensors

    from pyro_langevin.nlb.data import load_nwb_dataset

    ds = load_nwb_dataset(REAL_NWB, 5)
    out = make_eval_input_tensors(ds, "mc_maze_small", "test", save_file=False)
    assert out["eval_spikes_heldin"].shape == (100, 140, 107)


def test_calculate_onset_same_as_original(tmp_path):
    from nlb_tools.nwb_interface import NWBDataset

    path = tmp_path / "m.nwb"
    write_nlb_nwb(path, "mc_maze", ["train"] * 8, n_heldin=3, n_heldout=1)

    def onsets(method):
        ds = NWBDataset(str(path))
        ds.resample(5)
        t = ds.data.index.total_seconds().to_numpy()
        peak_at = ds.trial_info["move_onset_time"].dt.total_seconds().to_numpy()[:, None] + 0.15
        speed = 300 * np.exp(-0.5 * ((t[None] - peak_at) / 0.05) ** 2).sum(0)  # one bump per trial
        ds.add_continuous_data(speed[:, None], "speed")
        peaks = method(ds, "speed.0000", 0.2)
        return peaks, ds.trial_info["0000_onset"]

    ours_peaks, ours = onsets(nlb_compat._calculate_onset)
    assert ours.notna().all()
    found = ours.dt.total_seconds().to_numpy()
    move = ours_peaks.dt.total_seconds().to_numpy() - 0.15
    assert np.all(np.abs(found - move) < 0.12)  # onset shortly before the speed peak
    if not PANDAS3:
        from nlb_tools.nwb_interface import NWBDataset as D

        orig = nlb_compat._ORIGINALS.get((D, "calculate_onset"), D.calculate_onset)
        ref_peaks, ref = onsets(orig)
        pd.testing.assert_series_equal(ref_peaks, ours_peaks)
        pd.testing.assert_series_equal(ref, ours)


def test_tuple_safe_frame_compares_rowwise():
    df = nlb_compat._TupleSafeFrame(pd.DataFrame({"a": [1, 2, 1], "b": [3, 3, 4]}))
    assert np.all(df[["a", "b"]] == (1, 3), axis=1).tolist() == [True, False, False]
    assert isinstance(df[df.a == 1], nlb_compat._TupleSafeFrame)


def test_make_psth_same_with_and_without_patch(tmp_path):
    from nlb_tools.make_tensors import make_eval_target_tensors

    path = tmp_path / "m.nwb"
    write_nlb_nwb(path, "mc_maze", ["train"] * 8 + ["val"] * 4, n_heldin=4, n_heldout=2)

    def target():
        ds = _resampled(path, 20)
        ti = ds.trial_info
        out = make_eval_target_tensors(ds, "mc_maze", "train", "val", save_file=False, include_psth=True)
        assert ds.trial_info is ti  # the wrapper restores the caller's table
        return out["mc_maze_20"]

    with_patch = None
    nlb_compat.apply_patches(force=True)
    try:
        with_patch = target()
    finally:
        if not PANDAS3:
            nlb_compat.remove_patches()
    assert with_patch["psth"].shape[0] == 4  # four conditions
    if not PANDAS3:
        ref = target()
        np.testing.assert_array_equal(ref["psth"], with_patch["psth"])
        for a, b in zip(ref["eval_cond_idx"], with_patch["eval_cond_idx"]):
            np.testing.assert_array_equal(np.asarray(a, int), np.asarray(b, int))


def test_bits_per_spike_fallback_agrees_with_nlb_tools_on_nan_and_zero_rates():
    """One bits_per_spike: ablation numbers must not depend on whether nlb_tools is installed."""
    from nlb_tools.evaluation import bits_per_spike as nlb_bps

    from pyro_langevin.metrics import bits_per_spike, nlb_bits_per_spike

    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 0.5, size=(6, 20, 5))
    spikes = rng.poisson(rates).astype(float)
    spikes[0, :4, :] = np.nan  # unobserved entries, their rates must not matter
    rates[0, :4, :] = np.nan
    rates[1, 3, 2] = 0.0  # a zero rate: 1e-9 in both
    spikes[1, 3, 2] = 0.0
    expected = nlb_bps(np.where(np.isnan(spikes), 1.0, rates), spikes.copy())
    assert np.isfinite(expected)
    assert nlb_bits_per_spike(np.where(np.isnan(spikes), 1.0, rates), spikes) == pytest.approx(expected, rel=1e-12)
    assert bits_per_spike(rates, spikes) == pytest.approx(expected, rel=1e-12)
    bad = rates.copy()
    bad[2, 0, 0] = -1.0  # observed entry
    with pytest.raises(ValueError, match="finite and non-negative"):
        bits_per_spike(bad, spikes)
