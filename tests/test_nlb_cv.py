"""Cross-validation over the training trials (issue 8's protocol) and 5 -> 20 ms rebinning, on the real
MC_Maze_Small files in tests/data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin import members as core_members
from pyro_langevin.nlb import cv as nlb_cv, pipeline as nlb_pipeline
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.nlb.data import load_nlb
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.nlb.rebin import rebin_counts, rebin_folder
from pyro_langevin.data.splits import kfold_indices

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
    real_fit = core_members.fit  # the members' machinery is the core's

    def spy(model, guide, train, valid, config, **kw):
        seen.append((train, valid))
        return real_fit(model, guide, train, valid, config, **kw)

    monkeypatch.setattr(core_members, "fit", spy)
    k = 2
    res = nlb_cv.cross_validate(NLBRequest("mc_maze_small", DATA, 5, "val", tmp_path / "cv", quick=True, progress=False),
                                k=k, data=data, log=lambda s: None)
    assert len(seen) == k and len(res["folds"]) == k
    scored_sets = [set(f["scored_trials"]) for f in res["folds"]]
    train_ids = data.train.index.tolist()
    assert set().union(*scored_sets) == set(train_ids)
    n_in = data.n_heldin
    for (train, valid), scored in zip(seen, scored_sets):
        t = train.n_observed_bins
        assert t == data.n_observed_bins // 4  # 5 ms data fit at 20 ms by default
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
    assert stored["n_models_averaged"] == k
    sub = Path(stored["submission"])
    assert sub.is_file()
    import h5py
    with h5py.File(sub) as f:
        grp = f["mc_maze_small"]
        assert grp["eval_rates_heldout"].shape == (25, data.n_observed_bins, data.n_heldout)
        assert grp["train_rates_heldin"].shape == (75, data.n_observed_bins, n_in)
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


def test_fold_ensemble_run_averages_members_and_workers_change_nothing(tmp_path):
    """run_nlb with n_models=2: members validate on disjoint folds; 2 worker processes give the same rates.
    A user's own Pyro param sites survive the runs, and the members' tensors leave the store (issue 24)."""
    import gc
    import pyro

    mine = pyro.param("users_own_site", torch.ones(2))
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        request = NLBRequest("mc_maze_small", DATA, 5, "val", out, quick=True, progress=False,
                             overrides={"eval.n_models": 2}, workers=workers)
        runs[workers] = nlb_pipeline.run_nlb(request, log=lambda s: None)
    gc.collect()
    assert list(pyro.get_param_store().keys()) == ["users_own_site"]
    assert pyro.param("users_own_site") is mine
    m = runs[1]
    assert m["n_models"] == 2 and len(m["members"]) == 2
    v0, v1 = (set(x["valid_trials"]) for x in m["members"])
    assert v0.isdisjoint(v1) and len(v0 | v1) == 75
    assert (tmp_path / "w1" / "member1" / "checkpoints" / "best.pt").is_file()
    import h5py
    with h5py.File(m["submission"]) as f1, h5py.File(runs[2]["submission"]) as f2:
        a, b = np.asarray(f1["mc_maze_small"]["eval_rates_heldout"]), np.asarray(f2["mc_maze_small"]["eval_rates_heldout"])
    assert a.shape == (25, 140, 35)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_cli_cv_writes_cv_json_and_refuses_one_fold(tmp_path, capsys):
    from pyro_langevin.nlb.cli import nlb_main
    out = tmp_path / "cv"
    code = nlb_main(["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--quick", "--cv", "2",
                     "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2-fold cross-validation" in captured.out
    summary = json.loads(captured.out.strip().splitlines()[-1])["summary"]
    assert summary["model"]["co-bps"]["n"] == 2
    assert (out / "cv.json").is_file() and (out / "submission.h5").is_file()
    code = nlb_main(["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--quick", "--cv", "1",
                     "--out", str(tmp_path / "cv1"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cv" in err[0]


def test_smoothing_baseline_chooses_its_penalty_on_training_trials():
    """At 20 ms nlb_tools' fixed alpha overfits 60 trials; the chosen one beats a constant rate."""
    from pyro_langevin.nlb.baseline import choose_glm_alpha
    g = np.random.default_rng(0)
    x = g.normal(size=(30 * 20, 40))
    w = np.zeros((40, 3))
    w[:3] = 0.8
    y = g.poisson(np.exp(x @ w - 1.0)).astype(float)
    informative = choose_glm_alpha(x, y, n_trials=30)
    y_noise = g.poisson(np.full((600, 3), 0.3)).astype(float)
    noise = choose_glm_alpha(x, y_noise, n_trials=30)
    assert informative <= 0.1 and noise >= 1.0  # little penalty for signal, heavy for noise


def test_the_penalty_is_chosen_on_at_most_glm_cv_max_rows_rows_of_whole_trials(monkeypatch):
    """Full-size data choose on a random subset of whole trials (MC_Maze at 5 ms: 241,000 rows took
    over 20 minutes); data under the cap choose on every row, as before."""
    from pyro_langevin import baseline

    groups = np.repeat(np.arange(50), 20)  # 50 trials x 20 bins
    rows, renumbered, n = baseline._some_trials(groups, 50, 1000, seed=0)
    assert rows.all() and n == 50 and (renumbered == groups).all()
    rows, renumbered, n = baseline._some_trials(groups, 50, 300, seed=0)
    assert n == 15 and rows.sum() == 300 and sorted(set(renumbered)) == list(range(15))
    kept = np.unique(groups[rows])
    assert all(rows[groups == t].all() for t in kept)  # whole trials only

    seen = []
    real = baseline.fit_poisson_glm
    monkeypatch.setattr(baseline, "fit_poisson_glm", lambda x, y, a, **kw: seen.append(len(x)) or real(x, y, a, **kw))
    g = np.random.default_rng(0)
    x = g.normal(size=(200 * 20, 10))
    y = g.poisson(np.exp(0.5 * x[:, :2] - 1.0)).astype(float)
    seen.clear()
    baseline.choose_glm_alpha(x, y, n_trials=200, max_rows=1000)
    assert seen and max(seen) <= 1000 * 2 / 3 + 20  # each fold fits on 2 of 3 parts of 50 trials
    seen.clear()
    baseline.choose_glm_alpha(x, y, n_trials=200, max_rows=10_000)
    assert max(seen) > 2000  # under the cap every row takes part
