"""End to end on synthetic NLB-structured NWB files: NWB -> nlb_tools -> cache -> Batch -> scores -> submission."""

import shutil

import h5py
import numpy as np
import pytest

from nwb_factory import make_dandi_dataset, write_nlb_nwb
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.h5 import read_h5
from pyro_langevin.nlb.data import load_nlb, split_train_valid
from pyro_langevin.nlb.scoring import (
    Rates, RateUnitsError, evaluate_submission, score_eval, score_local, score_nlb, write_submission,
)
from pyro_langevin.nlb.baseline import smoothing_baseline


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dandi")
    make_dandi_dataset(root, "mc_maze")
    make_dandi_dataset(root, "dmfc_rsg")
    return root


@pytest.fixture(scope="module")
def maze(root):
    return load_nlb("mc_maze", root, bin_ms=5, phase="val")


@pytest.fixture(scope="module")
def maze_rates(maze):
    return smoothing_baseline(maze.train, maze.eval, 5, "mc_maze")


@pytest.fixture(scope="module")
def dmfc(root):
    return load_nlb("dmfc_rsg", root, bin_ms=20, phase="val")


def test_maze_val_shapes_and_cache(maze, root):
    assert (maze.n_train, maze.n_eval) == (32, 12)
    assert (maze.n_heldin, maze.n_heldout, maze.n_observed_bins, maze.n_forward_bins) == (14, 5, 140, 40)
    assert maze.train.behavior.shape == (32, 140, 2) and np.isfinite(maze.train_behavior).all()
    folder = root / "mc_maze-05ms-val"
    assert maze.source == folder
    assert {p.name for p in folder.iterdir()} == {"train_input.h5", "eval_input.h5", "eval_target.h5"}
    assert set(read_h5(folder / "eval_input.h5")) == {"eval_spikes_heldin"}  # no held-out data there
    target = read_h5(folder / "eval_target.h5")["mc_maze"]
    assert {"eval_spikes_heldout", "eval_spikes_heldin_forward", "psth", "eval_cond_idx",
            "train_behavior", "eval_behavior"} <= set(target)
    again = load_nlb("mc_maze", root, bin_ms=5, phase="val")  # from the cache now
    for a, b in ((maze.train.target, again.train.target), (maze.eval.target, again.eval.target),
                 (maze.eval.mask, again.eval.mask)):
        assert bool((a == b).all())
    # eval target known: eval trials' held-out and forward counts are in the eval batch for scoring
    assert bool(maze.eval.mask.all())
    np.testing.assert_array_equal(maze.eval.target[:, :140, 14:].numpy(), target["eval_spikes_heldout"])


def test_counts_per_bin_match_spike_times(maze):
    # synthetic rates are 10-40 Hz * exp(latent): per 5 ms bin well below 1 on average
    mean = float(maze.train.target[:, :140].mean())
    assert 0.02 < mean < 0.6


def test_maze_scores_and_submission(maze, maze_rates, tmp_path):
    rates = maze_rates
    ours = score_nlb(maze, rates)
    assert set(ours) == {"co-bps", "vel R2", "psth R2", "fp-bps"}
    assert ours["co-bps"] > 0.05 and ours["vel R2"] > 0.2
    write_submission(tmp_path / "sub.h5", "mc_maze", 20, Rates(rates.train[:, ::4], rates.eval[:, ::4], 14, 35))
    sub = write_submission(tmp_path / "sub.h5", "mc_maze", 5, Rates(rates.train * 0 + 1, rates.eval * 0 + 1, 14, 140))
    sub = write_submission(tmp_path / "sub.h5", "mc_maze", 5, rates)  # rewrites the group, keeps _20
    with h5py.File(sub, "r") as f:
        assert set(f) == {"mc_maze", "mc_maze_20"}
        assert set(f["mc_maze"]) == {"train_rates_heldin", "train_rates_heldout", "eval_rates_heldin",
                                     "eval_rates_heldout", "eval_rates_heldin_forward",
                                     "eval_rates_heldout_forward"}
    (res,) = evaluate_submission(maze.source / "eval_target.h5", sub)
    theirs = res["mc_maze_split"]
    for k in ours:
        assert theirs[k] == pytest.approx(ours[k], rel=1e-4, abs=1e-5)


def test_psth_r2_is_one_for_the_psth(maze):
    # rates equal to each condition's true PSTH give psth R2 = 1: checks trial/condition alignment
    tgt = maze.eval_target
    rates = np.full((maze.n_eval, 180, maze.n_neurons), 0.1)
    for c, idx in enumerate(tgt["eval_cond_idx"]):
        rates[np.asarray(idx, int), :140] = tgt["psth"][c]
    out = score_eval(tgt, Rates(np.full((maze.n_train, 180, maze.n_neurons), 0.1), rates, 14, 140), "mc_maze", 5)
    assert out["psth R2"] == pytest.approx(1.0)


def test_partial_target_still_gets_cobps(maze, maze_rates):
    tgt = {"eval_spikes_heldout": maze.eval_target["eval_spikes_heldout"]}
    rates = maze_rates
    out = score_eval(tgt, rates, "mc_maze", 5)
    assert set(out) == {"co-bps"} and out["co-bps"] > 0


def test_local_validation_scores(maze):
    fit, valid = split_train_valid(maze.train, 0.25, seed=0)
    r = smoothing_baseline(fit, valid, 5, "mc_maze")  # rates of fit (train) and valid (eval), one layout
    assert r.train.shape == tuple(fit.target.shape) and r.eval.shape == tuple(valid.target.shape)
    out = score_local(r.eval, valid, r.train, fit)
    assert set(out) == {"co-bps", "fp-bps", "vel R2"} and out["co-bps"] > 0.05
    # mean-rate prediction scores ~0 co-bps by construction
    mean = np.broadcast_to(valid.target.numpy().mean(axis=(0, 1), keepdims=True), valid.target.shape)
    assert abs(score_local(mean, valid)["co-bps"]) < 0.05


def test_hz_rates_are_rejected(maze, maze_rates, tmp_path):
    rates = maze_rates
    hz = Rates(rates.train * 1000 / 5, rates.eval * 1000 / 5, 14, 140)
    with pytest.raises(RateUnitsError, match="not Hz"):
        write_submission(tmp_path / "s.h5", "mc_maze", 5, hz)
    with pytest.raises(RateUnitsError, match="not Hz"):
        score_nlb(maze, hz)
    # nlb_tools' keys are slices of the one layout: held-out neurons and forward bins trailing
    assert rates.eval.shape == (12, 180, 19) and rates.train.shape == (32, 180, 19)
    keys = rates.submission()
    np.testing.assert_array_equal(keys["eval_rates_heldout"], rates.eval[:, :140, 14:])
    np.testing.assert_array_equal(keys["eval_rates_heldin_forward"], rates.eval[:, 140:, :14])
    np.testing.assert_array_equal(keys["train_rates_heldin"], rates.train[:, :140, :14])
    assert "train_rates_heldin_forward" not in keys  # nlb_tools submits no training forward rates


def test_dmfc_val_20ms(dmfc, tmp_path):
    assert dmfc.n_observed_bins == 75 and dmfc.n_forward_bins == 10
    assert dmfc.train.behavior is None and dmfc.train_behavior.shape == (32, 5)
    # held-out target is NaN outside set..go: those entries are masked, not zero-filled counts
    held = dmfc.eval.mask[:, :75, dmfc.n_heldin:]
    assert 0.1 < float(held.float().mean()) < 0.95
    rates = smoothing_baseline(dmfc.train, dmfc.eval, 20, "dmfc_rsg")
    ours = score_nlb(dmfc, rates)
    assert set(ours) == {"co-bps", "tp corr", "psth R2", "fp-bps"} and ours["co-bps"] > 0
    sub = write_submission(tmp_path / "sub.h5", "dmfc_rsg", 20, rates)
    with h5py.File(sub, "r") as f:
        assert list(f) == ["dmfc_rsg_20"]
    (res,) = evaluate_submission(dmfc.source / "eval_target.h5", sub)
    assert res["dmfc_rsg_20_split"]["co-bps"] == pytest.approx(ours["co-bps"], rel=1e-4)
    assert res["dmfc_rsg_20_split"]["tp corr"] == pytest.approx(ours["tp corr"], rel=1e-4)


def test_test_phase_20ms(root):
    d = load_nlb("mc_maze", root, bin_ms=20, phase="test")
    assert (d.n_train, d.n_eval) == (44, 8)  # train + val trials train; test file's trials evaluate
    assert (d.n_observed_bins, d.n_forward_bins) == (35, 10)
    assert not d.has_eval_target and not bool(d.eval.mask[:, :, 14:].any())
    with pytest.raises(NLBDataError, match="eval target is unknown"):
        score_nlb(d, smoothing_baseline(d.train, d.eval, 20, "mc_maze"))
    assert not (root / "mc_maze-20ms-test" / "eval_target.h5").exists()


def test_training_file_without_heldout_units(tmp_path):
    sub = tmp_path / "000128" / "sub-Synth"
    write_nlb_nwb(sub / "sub-Synth_desc-train_behavior+ecephys.nwb", "mc_maze", ["train"] * 4 + ["val"] * 2,
                  n_heldin=6, n_heldout=0)
    with pytest.raises(NLBDataError, match="no held-out units"):
        load_nlb("mc_maze", tmp_path)


def test_unwritable_cache_location_warns(root, tmp_path):
    shutil.copytree(root / "000128", tmp_path / "000128")  # a fresh root: no cache folders yet
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should go")
    with pytest.warns(RuntimeWarning, match="could not write the NLB cache"):
        d = load_nlb("mc_maze", tmp_path, bin_ms=20, phase="val", cache_dir=blocker, include_psth=False)
    assert d.source is None and d.has_eval_target and "psth" not in d.eval_target


@pytest.mark.parametrize("kind,bins,metrics", [
    ("area2_bump", 30, {"co-bps", "vel R2", "psth R2", "fp-bps"}),  # decode masks per bump type
    ("mc_rtt", 30, {"co-bps", "vel R2", "fp-bps"}),  # finger_vel, no PSTHs
])
def test_other_datasets(tmp_path, kind, bins, metrics):
    make_dandi_dataset(tmp_path, kind, n_train=24, n_val=8, n_test=4, n_heldin=8, n_heldout=3)
    d = load_nlb(kind, tmp_path, bin_ms=20, phase="val")
    assert d.n_observed_bins == bins and d.train.behavior.shape == (24, bins, 2)
    if kind == "area2_bump":
        assert d.eval_target["train_decode_mask"].shape == (24, 2)
    rates = smoothing_baseline(d.train, d.eval, 20, kind)
    out = score_nlb(d, rates)
    assert set(out) == metrics and np.isfinite(list(out.values())).all()
    sub = write_submission(tmp_path / "sub.h5", kind, 20, rates)
    (res,) = evaluate_submission(d.source / "eval_target.h5", sub)
    assert res[f"{kind}_20_split"]["co-bps"] == pytest.approx(out["co-bps"], rel=1e-4)
