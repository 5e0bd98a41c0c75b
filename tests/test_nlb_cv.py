"""Cross-validation over the training trials (issue 8's protocol) and 5 -> 20 ms rebinning, on the real
MC_Maze_Small files in tests/data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin import nlb_cv
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.nlb import load_nlb
from pyro_langevin.data.rebin import rebin_counts, rebin_folder
from pyro_langevin.data.splits import kfold_indices
from pyro_langevin.nlb_eval import evaluate_submission

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("n,k", [(75, 5), (75, 4), (10, 10), (7, 2)])
def test_kfold_indices_are_disjoint_and_cover_every_trial_once(n, k):
    folds = kfold_indices(n, k, seed=3)
    assert len(folds) == k
    together = np.concatenate(folds)
    assert sorted(together.tolist()) == list(range(n))  # each row exactly once
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert [f.tolist() for f in folds] == [f.tolist() for f in kfold_indices(n, k, seed=3)]
    assert [f.tolist() for f in folds] != [f.tolist() for f in kfold_indices(n, k, seed=4)] or k == n


@pytest.mark.parametrize("k", [1, 0, 76, 2.5, True])
def test_kfold_indices_refuse_bad_k(k):
    with pytest.raises(NLBDataError, match="K="):
        kfold_indices(75, k)


@pytest.fixture(scope="module")
def data():
    return load_nlb("mc_maze_small", DATA, bin_ms=5, phase="val")


def test_scored_fold_never_reaches_training_targets_or_selection(data, tmp_path, monkeypatch):
    """Capture what each fold's fit sees: the scored trials only as held-in spikes, never in selection."""
    seen = []
    real_fit = nlb_cv.fit

    def spy(model, guide, train, valid, config, **kw):
        seen.append((train, valid))
        return real_fit(model, guide, train, valid, config, **kw)

    monkeypatch.setattr(nlb_cv, "fit", spy)
    k = 2
    res = nlb_cv.cross_validate("mc_maze_small", DATA, 5, "val", tmp_path / "cv", k=k, quick=True, progress=False,
                                data=data, log=lambda s: None)
    assert len(seen) == k and len(res["folds"]) == k
    scored_sets = [set(f["scored_trials"]) for f in res["folds"]]
    train_ids = data.train.index.tolist()
    assert set().union(*scored_sets) == set(train_ids)
    t, n_in = data.n_observed_bins, data.n_heldin
    for (train, valid), scored in zip(seen, scored_sets):
        scored_ids = {train_ids[i] for i in scored}
        assert scored_ids.isdisjoint(valid.index.tolist())  # the scored fold picks no checkpoint
        rows = [i for i, idx in enumerate(train.index.tolist()) if idx in scored_ids]
        assert len(rows) == len(scored_ids)  # present, as held-in spikes
        m = train.mask[rows]
        assert not m[:, :, n_in:].any() and not m[:, t:, :].any()  # no held-out neuron, no forward bin
        assert m[:, :t, :n_in].all()
        # and the inner validation trials do not train on their targets either
        vrows = [i for i, idx in enumerate(train.index.tolist()) if idx in set(valid.index.tolist())]
        assert not train.mask[vrows][:, :, n_in:].any()
    summary = res["summary"]
    for who in ("model", "smoothing", "difference"):
        assert summary[who]["co-bps"]["n"] == k and math.isfinite(summary[who]["co-bps"]["se"])
    diff = [f["model"]["co-bps"] - f["smoothing"]["co-bps"] for f in res["folds"]]
    assert summary["difference"]["co-bps"]["mean"] == pytest.approx(np.mean(diff))
    # the fold ensemble's submission is a valid nlb_tools file with every rate key
    stored = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert stored["n_models"] == k
    sub = Path(stored["submission"])
    assert sub.is_file()
    import h5py
    with h5py.File(sub) as f:
        grp = f["mc_maze_small"]
        assert grp["eval_rates_heldout"].shape == (25, t, data.n_heldout)
        assert grp["train_rates_heldin"].shape == (75, t, n_in)
        assert np.all(np.asarray(grp["eval_rates_heldout"]) > 0)


def test_rebin_sums_counts_and_averages_behaviour(tmp_path):
    x = np.arange(2 * 8 * 3, dtype=float).reshape(2, 8, 3)
    assert np.array_equal(rebin_counts(x, 4), x.reshape(2, 2, 4, 3).sum(2))
    with pytest.raises(NLBDataError):
        rebin_counts(x[:, :7], 4)
    dst = rebin_folder(DATA / "mc_maze_small-05ms-val", tmp_path)
    assert dst.name == "mc_maze_small-20ms-val"
    d5 = load_nlb("mc_maze_small", DATA, bin_ms=5, phase="val")
    d20 = load_nlb("mc_maze_small", tmp_path, bin_ms=20, phase="val")
    assert (d20.n_observed_bins, d20.n_forward_bins) == (35, 10)
    assert torch.equal(d20.train.target, d5.train.target.reshape(75, 45, 4, -1).sum(2))
    assert torch.allclose(d20.train.behavior, d5.train.behavior.reshape(75, 35, 4, 2).mean(2))
