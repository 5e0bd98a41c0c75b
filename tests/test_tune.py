"""``pyro-langevin tune``: Ray Tune search on the real MC_Maze_Small tensors in tests/data.

One local Ray instance (2 CPUs, no dashboard) serves the module; the two-node test runs last and
builds its own simulated cluster. The PBT restore test needs no Ray.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

from pyro_langevin.checkpoints import load_checkpoint  # noqa: E402
from pyro_langevin.cli import main as cli_main  # noqa: E402
from pyro_langevin.nlb.config import default_config  # noqa: E402
from pyro_langevin.nlb.data import load_nlb  # noqa: E402
from pyro_langevin.nlb.scoring import RATE_KEYS, check_rates  # noqa: E402
from pyro_langevin.options import OptionError  # noqa: E402
from pyro_langevin.nlb.request import NLBRequest  # noqa: E402
from pyro_langevin.nlb.tune import (  # noqa: E402
    parse_space, restore_state, train_trial, trial_config, trial_seed, tune,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
QUICK = ["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--bin-ms", "5", "--phase", "val", "--quick"]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as tune() sets it: Ray's nice 15 crawls on a busy CI box
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def maze():
    return load_nlb("mc_maze_small", DATA, bin_ms=5, phase="val")


def check_submission(path, data):
    with h5py.File(path, "r") as f:
        rates = {k: f["mc_maze_small"][k][()] for k in f["mc_maze_small"]}
    assert set(RATE_KEYS) <= set(rates)
    shapes = {"train_rates_heldin": (data.n_train, 140, data.n_heldin), "eval_rates_heldout": (data.n_eval, 140, data.n_heldout),
              "eval_rates_heldin_forward": (data.n_eval, 40, data.n_heldin)}
    for key, shape in shapes.items():
        assert rates[key].shape == shape
    for key in RATE_KEYS:
        check_rates(rates[key], key, 5)  # finite, non-negative counts per bin
    return rates


def test_search_space_parsing_and_mapping():
    space = parse_space(items=["lr=loguniform:1e-4:1e-2", "latent_dim=choice:8,16", "dropout=0.2"], scheduler="asha")
    assert space["lr"] == ["loguniform", 1e-4, 1e-2] and space["latent_dim"] == ["choice", 8, 16]
    assert space["dropout"] == ["const", 0.2] and space["hidden"][0] == "choice"
    cfg = trial_config(default_config("mc_maze_small", 5), {"dropout": 0.2, "latent_dim": 8, "lr": 1e-3})
    assert (cfg.model.dropout, cfg.guide.dropout, cfg.model.latent_dim, cfg.fit.lr, cfg.eval.n_models) == (0.2, 0.2, 8, 1e-3, 1)
    assert "shift_std" not in parse_space() and parse_space(items=["shift_std=uniform:1:6"])["shift_std"] == ["uniform", 1, 6]
    assert trial_config(default_config("mc_maze_small", 20), {"shift_std": 4.5}).fit.shift_std == 4.5
    assert "hidden" not in parse_space(scheduler="pbt") and parse_space(items=["hidden=32"])["hidden"] == ["const", 32]
    for bad in (["beta=0.1"], ["lr=loguniform:0:1"], ["latent_dim=uniform:4:8"], ["lr=fast"], ["hidden=choice:8,16"]):
        with pytest.raises(OptionError):
            parse_space(items=bad)  # the last: PBT keeps sizes fixed


def test_bad_input_one_line_exit_2(tmp_path, capsys, monkeypatch):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": ["loguniform", 1e-4, 1e-2], "momentum": 0.9}))
    cases = [(["--space-file", str(space)], "unknown key 'momentum'"),
             (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9"),
             (["--scheduler", "pbt", "--space", "hidden=choice:8,16"], "PBT keeps the sizes fixed")]
    for extra, words in cases:
        assert cli_main(["tune", *QUICK, "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    monkeypatch.setitem(sys.modules, "ray", None)  # ray not installed
    assert cli_main(["tune", *QUICK, "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'pyro-langevin[tune]'" in capsys.readouterr().err


def test_more_gpus_than_exist(local_ray, tmp_path, capsys):
    assert cli_main(["tune", *QUICK, "--out", str(tmp_path / "o"), "--gpus-per-trial", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpus-per-trial 0.5: the Ray cluster has 0 GPUs" in err


def test_pbt_exploit_restores_optimizer_state_and_epoch(maze, tmp_path):
    """A donor's checkpoint, restored into another trial: optimizer state, epoch and parameters
    exactly as saved (the mutated learning rate apart), and training continues as the donor would."""
    cfg = trial_config(default_config("mc_maze_small", 5, quick=True, epochs=2), {})
    params = {"lr": cfg.fit.lr}
    reports = []
    train_trial(cfg, params, maze, tmp_path / "donor", reports.append, trial_id="search_00000")
    assert [r["epoch"] for r in reports] == [1, 2]
    donor = load_checkpoint(tmp_path / "donor" / "checkpoints" / "last.pt")

    mutated = trial_config(cfg, {"lr": cfg.fit.lr * 2})
    got = load_checkpoint(restore_state(tmp_path / "donor" / "checkpoints", mutated, tmp_path / "other",
                                        trial_id="search_00000"))
    assert got["epoch"] == donor["epoch"] == 1
    assert got["optimizer"]["state"].keys() == donor["optimizer"]["state"].keys()
    for i, s in donor["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(got["optimizer"]["state"][i][k], v), (i, k)
    for g, d in zip(got["optimizer"]["param_groups"], donor["optimizer"]["param_groups"]):
        assert g["lr"] == pytest.approx(2 * d["lr"]) and g["params"] == d["params"]
    for part in ("model", "guide"):
        assert all(torch.equal(got[part][k], v) for k, v in donor[part].items())
    assert got["rng"]["torch"].equal(donor["rng"]["torch"]) and got["best_metric"] == donor["best_metric"]
    assert (tmp_path / "other" / "checkpoints" / "best.pt").is_file()

    # unmutated: one more epoch from the restored copy == one more epoch of the donor itself
    longer = cfg.override({"fit.epochs": 3})
    train_trial(longer, params, maze, tmp_path / "copy", reports.append, trial_id="search_00000",
                resume=restore_state(tmp_path / "donor" / "checkpoints", longer, tmp_path / "copy", trial_id="search_00000"))
    train_trial(longer, params, maze, tmp_path / "donor", reports.append, trial_id="search_00000",
                resume=tmp_path / "donor" / "checkpoints" / "last.pt")
    a, b = (load_checkpoint(tmp_path / w / "checkpoints" / "last.pt") for w in ("copy", "donor"))
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    assert reports[-1]["val_co_bps"] == reports[-2]["val_co_bps"]


def test_an_exploit_starts_the_recipients_stopping_count_afresh_and_trials_have_their_own_seeds(maze, tmp_path):
    """A donor about to stop early must not stop its recipient (issue 24): its counts reset on exploit,
    never on a trial's own restart; and each trial is initialised from its own seed."""
    cfg = trial_config(default_config("mc_maze_small", 5, quick=True, epochs=2), {})
    train_trial(cfg, {}, maze, tmp_path / "donor", lambda r: None, trial_id="search_00001", seed=trial_seed("search_00001"))
    last = tmp_path / "donor" / "checkpoints" / "last.pt"
    from pyro_langevin.checkpoints import save_checkpoint

    ckpt = load_checkpoint(last)
    ckpt["bad_validations"], ckpt["scheduler"]["num_bad_epochs"] = 8, 2  # the donor has run out of patience (8)
    save_checkpoint(last, ckpt)
    own = load_checkpoint(restore_state(last.parent, cfg, tmp_path / "own", trial_id="search_00001"))
    assert own["bad_validations"] == 8 and own["scheduler"]["num_bad_epochs"] == 2  # its own restart: as saved
    other = load_checkpoint(restore_state(last.parent, cfg, tmp_path / "other", trial_id="search_00002"))
    assert other["bad_validations"] == 0 and other["scheduler"]["num_bad_epochs"] == 0
    assert other["meta"]["trial_id"] == "search_00002" and other["epoch"] == ckpt["epoch"]
    patient = cfg.override({"fit.patience": 8, "fit.epochs": 3})
    reports = []
    train_trial(patient, {}, maze, tmp_path / "other", reports.append, trial_id="search_00002",
                resume=tmp_path / "other" / "checkpoints" / "last.pt")
    assert [r["epoch"] for r in reports] == [3]  # it trained on (with the donor's count it would train no epoch)
    assert trial_seed("search_00001") != trial_seed("search_00002") == 2 and trial_seed("x_00002", 10) == 12
    donor = load_checkpoint(tmp_path / "donor" / "checkpoints" / "best.pt")
    assert donor["meta"]["seed"] == 1 and donor["meta"]["spec"]["fit"]["seed"] == 1


def test_quick_search_writes_outputs(local_ray, maze, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["tune", *QUICK, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done: best validation co-bps") == 2
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert {"lr", "kl_final", "dropout", "cd_keep", "weight_decay", "best_val_co_bps", "epochs", "seconds"} <= set(trials)
    assert np.isfinite(trials["best_val_co_bps"]).all() and (trials["epochs"] == 4).all()
    best = json.loads((out / "best_config.json").read_text())
    assert best["best_val_co_bps"] == pytest.approx(trials["best_val_co_bps"].max())
    assert set(best["params"]) == {"lr", "kl_final", "dropout", "cd_keep", "weight_decay"}  # PBT: sizes fixed
    assert best["config"]["model"]["latent_dim"] == 4
    # a 5 ms search trains nlb's member recipe: it fits at 20 ms and writes 5 ms rates (issue 24)
    assert best["fit_bin_ms"] == 20 and best["config"]["model"]["dt"] == pytest.approx(0.2)
    # each trial from its own seed: their first checkpoints (before any exploit) say so
    first = [load_checkpoint(sorted(d.glob("checkpoint_*"))[0] / "last.pt")["meta"] for d in (out / "search").glob("_trainable_*")]
    assert len(first) == 2 and len({m["seed"] for m in first}) == 2 and len({m["spec"]["fit"]["seed"] for m in first}) == 2
    assert sorted(trials["seed"]) == sorted(m["seed"] for m in first)
    assert (out / "population.png").stat().st_size > 1000 and (out / "search").is_dir()
    history = pd.read_csv(out / "population.csv")  # every reported result, the plot's data
    assert set(history["trial_id"]) == set(trials["trial_id"]) and len(history) >= 8
    # PBT exploited: the weaker trial continued from the other's checkpoint after the first perturbation
    donors = history.dropna(subset=["restored_from"])
    assert ((donors["restored_from"] != donors["trial_id"]) & donors["restored_from"].isin(trials["trial_id"])).any()
    check_submission(out / "submission.h5", maze)


def test_resume_continues_an_interrupted_search(local_ray, tmp_path):
    """Ctrl-C after the first results; --resume finishes the same trials from their checkpoints."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pyro_langevin.cli", "tune", *QUICK, "--out", str(out), "--scheduler", "random",
           "--epochs", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 180
    while not list(out.glob("search/*/checkpoint_000001")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "with --resume" in text.splitlines()[-1]
    before = {p.parent.name: len(list(p.parent.glob("checkpoint_*"))) for p in out.glob("search/*/params.json")}
    assert len(before) == 2 and max(before.values()) < 8

    best = tune(NLBRequest("mc_maze_small", DATA, 5, "val", out, quick=True, epochs=8, resume=True),
                scheduler="random", log=lambda s: None)
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials["epochs"] == 8).all() and not best["unfinished"]
    history = pd.read_csv(out / "population.csv")  # both runs' results
    assert set(history["trial_id"]) == set(trials["trial_id"]) and len(history) >= 2 * 8
    assert any(n > 0 for n in before.values())  # the interrupt came after a first checkpoint
    since = {}
    for folder, n in before.items():
        progress = pd.read_csv(out / "search" / folder / "progress.csv")
        assert progress["training_iteration"].iloc[-1] == 8 and progress["epoch"].iloc[-1] == 8
        since[folder] = int(progress["iterations_since_restore"].iloc[-1])
    # the search continued from a checkpoint (Tune restores the last one its state recorded): fewer than
    # 8 validations since, for a trial that had one. A trial whose checkpoint folder the interrupt wrote
    # before Tune's experiment state recorded it (or caught before its first, on a loaded machine)
    # starts afresh, so the test asks it of one trial, not of each (it failed in a clean-clone run)
    assert any(since[f] < 8 for f, n in before.items() if n), (before, since)


def test_two_node_cluster_runs_trials_on_both_nodes(two_node_cluster, tmp_path):
    tune(NLBRequest("mc_maze_small", DATA, 5, "val", tmp_path / "out", quick=True), scheduler="random",
         num_samples=2, cpus_per_trial=1, log=lambda s: None)
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert trials["node_id"].nunique() == 2 and set(trials["node_id"]) == two_node_cluster
