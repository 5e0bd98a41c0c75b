"""NLB data layer on the real MC_Maze_Small files and bad inputs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.h5 import write_h5
from pyro_langevin.nlb.data import (
    build_training_batch, check_args, concat_batches, find_nwb_files, heldin_only, load_nlb,
    load_nwb_dataset, load_preprocessed, nlbdata_from_dicts, split_train_valid,
)

DATA = Path(__file__).parent / "data"
REAL_NWB = DATA / "000140" / "sub-Jenkins" / "sub-Jenkins_ses-small_desc-test_ecephys.nwb"


@pytest.fixture(scope="module")
def real():
    return load_nlb("mc_maze_small", DATA, bin_ms=5, phase="val")


def test_real_preprocessed_folder_loads(real):
    assert real.dataset == "mc_maze_small" and real.bin_ms == 5 and real.phase == "val"
    assert (real.n_train, real.n_eval) == (75, 25)
    assert (real.n_heldin, real.n_heldout, real.n_observed_bins, real.n_forward_bins) == (107, 35, 140, 40)
    assert real.guide_input_shape == (140, 107)
    assert real.train.target.shape == (75, 180, 142) and bool(real.train.mask.all())
    assert real.train.behavior.shape == (75, 140, 2)
    # eval trials: held-in observed only, everything else masked (no eval target shipped)
    assert not real.has_eval_target
    m = real.eval.mask
    assert bool(m[:, :140, :107].all()) and not bool(m[:, 140:].any()) and not bool(m[:, :, 107:].any())
    assert float(real.eval.target[~m].abs().sum()) == 0.0
    # indices: training rows then evaluation rows
    assert real.train.index.tolist() == list(range(75))
    assert real.eval.index.tolist() == list(range(75, 100))


def test_counts_per_bin_not_hz(real):
    counts = real.train.target[real.train.mask]
    assert torch.equal(counts, counts.round())
    # 5 ms bins: mean count per bin is a small number (tens of Hz -> ~0.05 - 0.2 per bin)
    assert 0.005 < float(counts.mean()) < 1.0


def test_load_folder_directly_and_name_mismatch():
    d = load_preprocessed(DATA / "mc_maze_small-05ms-val")
    assert d.dataset == "mc_maze_small"
    with pytest.raises(NLBDataError, match="folder name says dataset"):
        load_preprocessed(DATA / "mc_maze_small-05ms-val", dataset="mc_maze")
    with pytest.raises(NLBDataError, match="bin size"):
        load_preprocessed(DATA / "mc_maze_small-05ms-val", bin_ms=20)


def test_real_test_nwb_through_nlb_tools():
    from nlb_tools.make_tensors import make_eval_input_tensors
    from nlb_tools.nwb_interface import NWBDataset

    ds = load_nwb_dataset(REAL_NWB, 5)
    assert ds.bin_width == 5
    out = make_eval_input_tensors(ds, "mc_maze_small", "test", save_file=False)
    assert out["eval_spikes_heldin"].shape == (100, 140, 107)
    # same as nlb_tools used directly with the prefix the data README documents
    raw = NWBDataset(str(REAL_NWB.parent), "sub-Jenkins_ses-small_desc-test")
    raw.resample(5)
    ref = make_eval_input_tensors(raw, "mc_maze_small", "test", save_file=False)
    np.testing.assert_array_equal(out["eval_spikes_heldin"], ref["eval_spikes_heldin"])


def test_test_file_alone_is_not_enough(tmp_path):
    files = find_nwb_files(DATA, "mc_maze_small")
    assert files["test"] == REAL_NWB and files["train"] is None
    with pytest.raises(NLBDataError, match="no training NWB file.*dandi download DANDI:000140"):
        load_nlb("mc_maze_small", DATA, bin_ms=5, phase="test", cache_dir=tmp_path)


def test_test_nwb_has_no_heldout_units():
    with pytest.raises(NLBDataError, match="no held-out units"):
        load_nwb_dataset(REAL_NWB, 5, require_heldout=True)


@pytest.mark.parametrize("args,msg", [
    (("mc_mazee", 5, "val"), "unknown NLB dataset 'mc_mazee'"),
    (("mc_maze", 10, "val"), "bin size must be 5 or 20"),
    (("mc_maze", 5, "train"), "phase must be 'val' or 'test'"),
])
def test_bad_arguments(args, msg, tmp_path):
    with pytest.raises(NLBDataError, match=msg):
        check_args(*args)
    with pytest.raises(NLBDataError, match=msg):
        load_nlb(args[0], tmp_path, bin_ms=args[1], phase=args[2])


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(NLBDataError, match="data directory not found"):
        load_nlb("mc_maze", tmp_path / "absent")
    with pytest.raises(NLBDataError, match="no NLB data for mc_maze.*000128"):
        load_nlb("mc_maze", tmp_path)


def test_incomplete_preprocessed_folder(tmp_path):
    folder = tmp_path / "mc_maze-05ms-val"
    folder.mkdir()
    write_h5(folder / "eval_input.h5", {"eval_spikes_heldin": np.ones((2, 140, 3))})
    with pytest.raises(NLBDataError, match="lacks train_input.h5"):
        load_nlb("mc_maze", tmp_path)


def _toy(n_tr=6, n_ev=3, t=8, f=2, n_in=4, n_out=2, heldout=True):
    rng = np.random.default_rng(0)
    train = {"train_spikes_heldin": rng.poisson(1, (n_tr, t, n_in)).astype(float),
             "train_spikes_heldin_forward": rng.poisson(1, (n_tr, f, n_in)).astype(float),
             "train_spikes_heldout_forward": rng.poisson(1, (n_tr, f, n_out)).astype(float),
             "train_behavior": rng.normal(size=(n_tr, t, 2))}
    if heldout:
        train["train_spikes_heldout"] = rng.poisson(1, (n_tr, t, n_out)).astype(float)
    ev = {"eval_spikes_heldin": rng.poisson(1, (n_ev, t, n_in)).astype(float)}
    target = {"mc_maze_20": {"eval_spikes_heldout": rng.poisson(1, (n_ev, t, n_out)).astype(float) + 1,
                             "eval_spikes_heldin_forward": rng.poisson(1, (n_ev, f, n_in)).astype(float) + 1,
                             "eval_spikes_heldout_forward": rng.poisson(1, (n_ev, f, n_out)).astype(float) + 1}}
    return train, ev, target


def test_folder_without_heldout_units(tmp_path):
    train, ev, _ = _toy(heldout=False)
    folder = tmp_path / "mc_maze-20ms-val"
    write_h5(folder / "train_input.h5", train)
    write_h5(folder / "eval_input.h5", ev)
    with pytest.raises(NLBDataError, match="no held-out units"):
        load_nlb("mc_maze", tmp_path, bin_ms=20)


def test_eval_target_group_must_match(tmp_path):
    train, ev, target = _toy()
    folder = tmp_path / "mc_maze-05ms-val"
    write_h5(folder / "train_input.h5", train)
    write_h5(folder / "eval_input.h5", ev)
    write_h5(folder / "eval_target.h5", target)  # group for 20 ms, folder says 5 ms
    with pytest.raises(NLBDataError, match="no group 'mc_maze'"):
        load_nlb("mc_maze", tmp_path, bin_ms=5)


def test_mismatched_eval_neurons():
    train, ev, _ = _toy()
    ev["eval_spikes_heldin"] = ev["eval_spikes_heldin"][:, :, :3]
    with pytest.raises(NLBDataError, match="eval_spikes_heldin"):
        nlbdata_from_dicts("mc_maze", 20, "val", train, ev)


def test_known_eval_target_enters_eval_batch_only_for_scoring():
    train, ev, target = _toy()
    d = nlbdata_from_dicts("mc_maze", 20, "val", train, ev, target)
    assert d.has_eval_target and bool(d.eval.mask.all())
    fit_batch, valid = d.training_batch(valid_frac=0.34, seed=1)
    n_fit = d.n_train - len(valid)
    # no held-out neuron / forward bin of validation or evaluation trials reaches training
    other = fit_batch.mask[n_fit:]
    assert not bool(other[:, :, d.n_heldin:].any()) and not bool(other[:, d.n_observed_bins:].any())
    assert float(fit_batch.target[n_fit:][:, :, d.n_heldin:].abs().sum()) == 0.0
    assert float(fit_batch.target[n_fit:][:, d.n_observed_bins:].abs().sum()) == 0.0
    assert bool(other[:, :d.n_observed_bins, :d.n_heldin].all())
    # their held-in inputs are still there (the guide reads them), behaviour is hidden
    assert torch.isnan(fit_batch.behavior[n_fit:]).all()
    assert sorted(fit_batch.index.tolist()) == list(range(d.n_train + d.n_eval))
    # validation trials keep their held-out data for scoring
    assert bool(valid.mask.all())


def test_nan_in_eval_input_is_masked():
    train, ev, _ = _toy()
    ev["eval_spikes_heldin"][0, 0, 0] = np.nan
    d = nlbdata_from_dicts("mc_maze", 20, "val", train, ev)
    assert not bool(d.eval.mask[0, 0, 0]) and float(d.eval.input[0, 0, 0]) == 0.0


def test_split_train_valid_properties(real):
    fit, valid = split_train_valid(real.train, 0.2, seed=3)
    assert len(fit) + len(valid) == 75 and len(valid) == 15
    assert set(fit.index.tolist()).isdisjoint(valid.index.tolist())
    assert bool(valid.mask.all())  # held-out neurons and forward bins stay in the target
    again = split_train_valid(real.train, 0.2, seed=3)[1]
    assert torch.equal(again.index, valid.index)
    assert not torch.equal(split_train_valid(real.train, 0.2, seed=4)[1].index, valid.index)
    with pytest.raises(NLBDataError):
        split_train_valid(real.train, 1.5)


def test_heldin_only_and_concat(real):
    ho = heldin_only(real.eval)
    assert torch.equal(ho.input, real.eval.input)
    both = concat_batches([real.train, ho])
    assert len(both) == 100 and both.behavior.shape == (100, 140, 2)
    assert torch.isnan(both.behavior[75:]).all()
    with pytest.raises(NLBDataError, match="same trial index"):
        concat_batches([real.train, real.train])
    tb = build_training_batch(real.train, [real.eval])
    assert isinstance(tb, Batch) and not bool(tb.mask[75:, :, 107:].any())
