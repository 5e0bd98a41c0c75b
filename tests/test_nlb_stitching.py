"""Issue 30: ``examples/nlb.py --dataset mc_maze_small,mc_maze_medium,mc_maze_large`` stitches the MC_Maze
scaling sets into one model and writes ONE submission, on synthetic files in the NLB layout (the real
Medium and Large files are not reachable here)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from nwb_factory import make_dandi_dataset
from pyro_langevin.nlb.cli import nlb_main

SETS = {"mc_maze_small": (16, 8, 3), "mc_maze_medium": (20, 10, 4), "mc_maze_large": (24, 12, 5)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dandi")
    for i, (name, (n_train, n_heldin, n_heldout)) in enumerate(SETS.items()):
        make_dandi_dataset(root, "mc_maze", dataset=name, n_train=n_train, n_val=6, n_test=3, n_heldin=n_heldin,
                           n_heldout=n_heldout, seed=i)
    return root


def test_three_maze_sets_stitched_into_one_submission(root, tmp_path, capsys):
    out = tmp_path / "run"
    code = nlb_main(["--dataset", ",".join(SETS), "--data-dir", str(root), "--bin-ms", "20", "--quick",
                     "--set", "eval.n_models=1", "--epochs", "2", "--out", str(out), "--no-progress", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert [s["name"] for s in metrics["layout"]["sessions"]] == list(SETS)
    with h5py.File(out / "submission.h5", "r") as f:
        assert sorted(f) == sorted(f"{n}_20" for n in SETS)
        for name, (_, n_heldin, n_heldout) in SETS.items():
            g = f[f"{name}_20"]
            assert g["eval_rates_heldin"].shape[-1] == n_heldin and g["eval_rates_heldout"].shape[-1] == n_heldout
            assert g["train_rates_heldout"].shape[0] == metrics["datasets"][name]["n_train"]
            assert np.isfinite(g["eval_rates_heldout"][()]).all() and (g["eval_rates_heldout"][()] > 0).all()
    for name in SETS:
        assert np.isfinite(metrics["datasets"][name]["eval"]["model"]["co-bps"])


def test_a_dataset_named_twice_is_one_error_line(root, tmp_path, capsys):
    code = nlb_main(["--dataset", "mc_maze_small,mc_maze_small", "--data-dir", str(root), "--bin-ms", "20",
                     "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "named twice" in err[0] and not (tmp_path / "x").exists()
