"""Issue 30's real-data evaluation (examples/stitching_mc_maze.py): MC_Maze_Small pseudo-sessions.

Pseudo-sessions share no trial and each sees its own units; a cross-session prediction comes through
the TARGET session's read-out; the smoke run on the real training trials writes every score.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin.batch import make_batch
from pyro_langevin.spec import RunSpec, build_stitched
from pyro_langevin.stitching import embed_session, stitch_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("stitching_mc_maze", ROOT / "examples" / "stitching_mc_maze.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_pseudo_sessions_share_no_trial_and_draw_their_own_units(example, seed):
    sessions = example.make_pseudo_sessions(75, 142, 3, 100, 25, seed)
    trials = np.concatenate([s.trials for s in sessions])
    assert sorted(trials.tolist()) == list(range(75))  # every training trial once: none in two sessions
    assert [len(s.trials) for s in sessions] == [25, 25, 25]
    for s in sessions:
        assert (len(s.heldin), len(s.heldout)) == (75, 25)
        assert not np.intersect1d(s.heldin, s.heldout).size and len(np.unique(s.units)) == 100
        assert s.units.min() >= 0 and s.units.max() < 142
    assert len({tuple(s.units) for s in sessions}) == 3  # different neurons: partial overlap only
    overlap = example.describe(sessions)["shared_units"]
    assert all(0 < v < 100 for v in overlap.values())
    again = example.make_pseudo_sessions(75, 142, 3, 100, 25, seed)
    assert all(np.array_equal(a.units, b.units) and np.array_equal(a.trials, b.trials) for a, b in zip(sessions, again))


def test_cross_session_rates_come_through_the_target_sessions_read_out(example):
    g = torch.Generator().manual_seed(0)
    a = make_batch(torch.poisson(torch.full((6, 8, 5), 1.0), generator=g), torch.poisson(torch.full((6, 8, 2), 1.0), generator=g))
    b = make_batch(torch.poisson(torch.full((6, 8, 4), 1.0), generator=g), torch.poisson(torch.full((6, 8, 3), 1.0), generator=g))
    _, layout = stitch_batches([a, b], ["A", "B"], readin_dim=4)
    spec = RunSpec().override({"model.latent_dim": 4, "model.d_model": 8, "model.n_heads": 2, "model.dim_feedforward": 8,
                               "guide.hidden": 8})
    model, guide = build_stitched(spec, layout)
    with torch.no_grad():  # B's read-out: a constant 3 counts per bin whatever the latents
        model.decoder.readout.sessions["B"].weight.zero_()
        model.decoder.readout.sessions["B"].bias.fill_(float(np.log(3.0)))
    post = example.posterior(model, guide, embed_session(a, layout, "A"), "cpu", 3)
    cross = example.cross_rates(post, layout, "B")
    assert cross.shape == (6, 8, 7)
    np.testing.assert_allclose(cross, 3.0, rtol=1e-4)
    own = example.cross_rates(post, layout, "A")  # A's trials through A's own read-out: latent-driven
    assert own.shape == (6, 8, 7) and own.std() > 1e-4 and not np.allclose(own, 3.0)


def test_quick_run_on_the_real_training_trials_scores_everything(example, tmp_path):
    out = tmp_path / "run"
    assert example.main(["--quick", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "stitching_mc_maze.json").read_text())
    (record,) = metrics["results"]
    assert sorted(t for s in record["sessions"] for t in s["trials"]) == list(range(75))
    assert len(record["folds"]) == 2
    for fold in record["folds"]:
        assert {w["session"] for w in fold["within"]} == {"s0", "s1", "s2"}
        assert len(fold["cross"]) == 6 and {(c["source"], c["target"]) for c in fold["cross"]} == {
            (x, y) for x in ("s0", "s1", "s2") for y in ("s0", "s1", "s2") if x != y}
        for c in fold["cross"]:
            assert 0 < c["n_unseen"] <= c["n_new"] < 100
            assert all(np.isfinite(list(c[p].values())).all() for p in ("new", "unseen"))
        assert all(np.isfinite([v["stitched"]["cross"], v["separate"]["own"], v["smoothed_spikes_own"]]).all()
                   for v in fold["velocity"])
    shot = record["few_shot"]
    assert shot["session"] == "s0" and [r["k"] for r in shot["by_k"]] == [5]
    assert len(shot["test_rows"]) == 5 and not set(shot["test_rows"]) & set(shot["by_k"][0]["rows"])
    assert set(metrics["summary"]) == {"within", "cross", "velocity", "few_shot"}
    assert (out / "stitching_mc_maze.png").stat().st_size > 0
