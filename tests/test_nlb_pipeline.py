"""The NLB train-and-score pipeline: quick runs on synthetic NLB NWB files, SPEC section 7 pitfalls, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyro
import pytest
import torch

from nwb_factory import make_dandi_dataset, write_nlb_nwb
from pyro_langevin import members as core_members
from pyro_langevin.members import DONE_FILE
from pyro_langevin.nlb import members as nlb_members, pipeline as nlb_pipeline
from pyro_langevin.cli import main as cli_main
from pyro_langevin.nlb.cli import nlb_main
from pyro_langevin.nlb.config import REFERENCE, default_config, gamma_from_reference
from pyro_langevin.nlb.data import load_nlb
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.nlb.scoring import evaluate_submission
from pyro_langevin.spec import SpecError, load_run
from pyro_langevin.training import ramp_epochs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dandi")
    make_dandi_dataset(root, "mc_maze", n_train=24, n_val=8, n_test=4, n_heldin=10, n_heldout=4)
    # dmfc_rsg: tp corr needs >= 2 evaluation trials per condition: the factory's default sizes
    make_dandi_dataset(root, "dmfc_rsg")
    return root


def run_cli(capsys, *args):
    code = nlb_main([str(a) for a in args] + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rates(path, group):
    with h5py.File(path, "r") as f:
        return {k: f[group][k][()] for k in f[group]}


# ----- quick end-to-end runs ----------------------------------------------------------------------
@pytest.mark.parametrize("dataset,metrics", [
    ("mc_maze", {"co-bps", "fp-bps", "vel R2", "psth R2"}),
    ("dmfc_rsg", {"co-bps", "fp-bps", "tp corr", "psth R2"}),
])
def test_quick_run_scores_and_submission(root, tmp_path, capsys, dataset, metrics):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "--dataset", dataset, "--data-dir", root, "--bin-ms", 20,
                              "--phase", "val", "--quick", "--out", out)
    assert code == 0
    last = stdout.strip().splitlines()[-1]
    m = json.loads(last)
    assert m == json.loads((out / "metrics.json").read_text())
    assert "LangevinFlow" in stdout and "smoothing" in stdout  # the table
    for who in ("model", "smoothing"):
        assert set(m["eval"][who]) == metrics
        assert np.isfinite(list(m["eval"][who].values())).all()
        assert {"co-bps", "fp-bps"} <= set(m["local"][who])
        assert np.isfinite(list(m["local"][who].values())).all()
    assert m["export_draws"] == 3 and m["epochs_run"] == 3 and 0 <= m["best_epoch"] < 3
    # nlb_tools' own evaluate accepts both submissions and agrees with our scores
    target = root / f"{dataset}-20ms-val" / "eval_target.h5"
    for sub, who in ((m["submission"], "model"), (m["submission_smoothing"], "smoothing")):
        (res,) = evaluate_submission(target, sub)
        theirs = res[f"{dataset}_20_split"]
        for k, v in m["eval"][who].items():
            assert theirs[k] == pytest.approx(v, rel=1e-3, abs=1e-4), (who, k)


def test_test_phase_writes_submission(root, tmp_path, capsys):
    out = tmp_path / "test"
    code, stdout, _ = run_cli(capsys, "--dataset", "mc_maze", "--data-dir", root, "--bin-ms", 20,
                              "--phase", "test", "--quick", "--out", out)
    assert code == 0
    m = json.loads(stdout.strip().splitlines()[-1])
    assert m["eval"] is None and np.isfinite(m["local"]["model"]["co-bps"])
    rates = read_rates(out / "submission.h5", "mc_maze_20")
    assert rates["eval_rates_heldout"].shape == (4, 35, 4)  # the test file's trials
    assert rates["eval_rates_heldin_forward"].shape == (4, 10, 10)
    assert rates["train_rates_heldin"].shape == (32, 35, 10)  # train + val trials train in 'test'


def test_guide_option_switches_the_default_bidirectional_guide(root, tmp_path, capsys):
    assert default_config("mc_maze", 20).guide.name == "bigru"  # the cross-validated default (docs/nlb.md)
    out = tmp_path / "gru"
    code, stdout, _ = run_cli(capsys, "--dataset", "mc_maze", "--data-dir", root, "--bin-ms", 20,
                              "--phase", "test", "--quick", "--out", out, "--set", "guide.name=gru")
    assert code == 0
    m = json.loads(stdout.strip().splitlines()[-1])
    assert m["spec"]["guide"]["name"] == "gru" and np.isfinite(m["local"]["model"]["co-bps"])


def test_console_script_quick_run(root, tmp_path):
    """`pyro-langevin nlb` end to end in a subprocess (the installed console script when present)."""
    exe = Path(sys.executable).parent / "pyro-langevin"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pyro_langevin.cli"]
    proc = subprocess.run(cmd + ["nlb", "--dataset", "mc_maze", "--data-dir", str(root), "--bin-ms", "20",
                                 "--quick", "--epochs", "1", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["epochs_run"] == 1 and np.isfinite(m["eval"]["model"]["co-bps"])
    assert (tmp_path / "submission.h5").is_file() and (tmp_path / "metrics.json").is_file()


# ----- SPEC section 7 pitfalls --------------------------------------------------------------------
def _tiny_batch(n_trials=3, t=12, n_in=5, seed=0):
    from pyro_langevin.batch import make_batch

    g = torch.Generator().manual_seed(seed)
    return make_batch(torch.poisson(torch.full((n_trials, t, n_in), 1.0), generator=g), n_heldout=2, n_forward=3)


def test_guide_has_no_encoder_lag():
    """The guide's state for step t has read bins 0..t only, and bin t itself."""
    batch = _tiny_batch()
    model = LangevinFlow(batch.n_neurons, latent_dim=4, dt=0.05)
    guide = GRUGuide(model, batch.n_heldin, hidden=8, initial_state="first", dropout=0.0)
    with torch.no_grad():  # make the learned force depend on h_t
        guide.force_head.net.weight.normal_()
    t0 = 6
    later = batch.input.clone()
    later[:, t0 + 1:] += 3.0  # change only bins after t0
    now = batch.input.clone()
    now[:, t0] += 3.0  # change bin t0 only
    h, _ = guide.encode(batch)
    h_later, _ = guide.encode(batch.with_inputs(later, batch.mask))
    h_now, _ = guide.encode(batch.with_inputs(now, batch.mask))
    assert torch.equal(h[:, : t0 + 1], h_later[:, : t0 + 1])
    assert not torch.allclose(h[:, t0 + 1], h_later[:, t0 + 1])
    assert torch.equal(h[:, :t0], h_now[:, :t0])
    assert not torch.allclose(h[:, t0], h_now[:, t0])  # bin t0 is read at step t0, not t0 + 1

    def draws(b):
        pyro.set_rng_seed(1)
        tr = pyro.poutine.trace(guide).get_trace(b)
        return [tr.nodes[f"v_{t}"]["value"] for t in range(batch.n_observed_bins)]

    base, moved = draws(batch), draws(batch.with_inputs(later, batch.mask))
    for t in range(t0 + 1):
        assert torch.equal(base[t], moved[t]), t
    assert not torch.allclose(base[t0 + 1], moved[t0 + 1])


@pytest.fixture(scope="module")
def maze(root):
    return load_nlb("mc_maze", root, bin_ms=20, phase="val")


@pytest.fixture(scope="module")
def real_small():
    """The real MC_Maze_Small tensors (5 ms, val phase) shipped in tests/data."""
    return load_nlb("mc_maze_small", REPO / "tests" / "data", bin_ms=5, phase="val")


@pytest.mark.parametrize("n_models", [1, 5])
@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_training_batch_holds_no_validation_or_eval_targets(request, which, n_models, tmp_path):
    maze = request.getfixturevalue("maze" if which == "synthetic" else "real_small")
    specs = nlb_members.fold_members(maze.train, [maze.eval], n_models, 0.2, seed=0, out=tmp_path)
    assert len(specs) == n_models
    for prep in specs:
        _check_member_batch(maze, prep)
    valid_sets = [set(s.valid.index.tolist()) for s in specs]
    if n_models > 1:  # member i validates on fold i: disjoint folds covering every training trial
        assert sum(map(len, valid_sets)) == maze.n_train and set().union(*valid_sets) == set(range(maze.n_train))


def _check_member_batch(maze, prep):
    tr, t, n_in = prep.training_batch(), maze.n_observed_bins, maze.n_heldin
    held_back = set(prep.valid.index.tolist()) | set(maze.eval.index.tolist())
    assert len(tr) == maze.n_train + maze.n_eval
    for row, idx in enumerate(tr.index.tolist()):
        if idx in held_back:
            assert not tr.mask[row, :, n_in:].any() and not tr.mask[row, t:].any(), idx
            assert float(tr.target[row, :, n_in:].abs().sum()) == 0 and float(tr.target[row, t:].abs().sum()) == 0
            assert tr.mask[row, :t, :n_in].all()  # held-in observed spikes are used
        else:
            assert tr.mask[row].all()
    assert set(prep.fit_trials.index.tolist()).isdisjoint(prep.valid.index.tolist())
    assert set(prep.fit_trials.index.tolist()) | set(prep.valid.index.tolist()) == set(range(maze.n_train))


def test_export_uses_best_checkpoint_and_counts_per_bin(root, maze, tmp_path, monkeypatch):
    """Best != last by construction; the submission holds the best state's rates, in counts per bin."""
    seen = {}
    real_fit = core_members.fit  # the members' machinery is the core's

    def spy_fit(model, guide, train, valid, config, **kw):
        seen["train"], seen["valid"], seen["config"] = train, valid, config
        return real_fit(model, guide, train, valid, config, **kw)

    monkeypatch.setattr(core_members, "fit", spy_fit)
    calls = []

    def decreasing(model, guide, valid):  # the first validation is the best one
        calls.append(1)
        return {"co_bps": -float(len(calls))}

    out = tmp_path / "best"
    cfg = default_config("mc_maze", 20, quick=True, epochs=4, overrides={"fit.lr": 0.05})
    m = nlb_pipeline.run_nlb(NLBRequest("mc_maze", root, 20, "val", out, config=cfg, progress=False),
                             metric_fn=decreasing, log=lambda s: None)
    assert m["best_epoch"] == 0 and m["epochs_run"] == 4
    assert seen["config"].select_on == "co_bps" and seen["config"].select_mode == "max"
    # what fit saw: validation trials held-in only, validation batch = training trials only
    assert set(seen["valid"].index.tolist()) < set(range(maze.n_train))
    rows = [i for i, idx in enumerate(seen["train"].index.tolist()) if idx in set(seen["valid"].index.tolist())]
    assert rows and not seen["train"].mask[rows][:, :, maze.n_heldin:].any()

    def rates_from(which):
        model, guide, spec, ckpt = load_run(out, which)
        assert spec == cfg
        rates = nlb_members.export_rates(model, guide, maze, cfg.eval.export_draws, seed=0)
        return rates.submission(), ckpt

    best, best_ckpt = rates_from("best")
    last, last_ckpt = rates_from("last")
    assert best_ckpt["epoch"] == 0 and last_ckpt["epoch"] == 3
    sub = read_rates(out / "submission.h5", "mc_maze_20")
    for k, v in sub.items():
        np.testing.assert_allclose(v, best[k], rtol=1e-5, atol=1e-7)
    assert not np.allclose(sub["eval_rates_heldout"], last["eval_rates_heldout"], rtol=1e-3)
    # counts per bin: the mean rate matches the mean spike count per 20 ms bin (Hz would be 50x)
    counts = maze.train.target[maze.train.mask].mean().item()
    rate = float(np.mean(np.concatenate([sub["train_rates_heldin"], sub["train_rates_heldout"]], -1)))
    assert 0.3 < rate / counts < 3, (rate, counts)


def test_resume_loads_best_checkpoint(root, tmp_path):
    out = tmp_path / "resume"
    cfg = default_config("mc_maze", 20, quick=True, epochs=2)
    request = NLBRequest("mc_maze", root, 20, "val", out, config=cfg, progress=False)
    first = nlb_pipeline.run_nlb(request, log=lambda s: None)
    sub1 = read_rates(out / "submission.h5", "mc_maze_20")
    lines = []  # a finished run: its member is read back from its done-file, not trained again
    again = nlb_pipeline.run_nlb(request.replace(resume=True), log=lines.append)
    assert again["best_epoch"] == first["best_epoch"] and again["epochs_run"] == 2
    assert any("not trained again" in s for s in lines) and again["members"][0]["executor"]["reused"]
    sub2 = read_rates(out / "submission.h5", "mc_maze_20")
    (out / "checkpoints" / DONE_FILE).unlink()  # a run stopped after its fit: resume last.pt, export best.pt
    lines = []
    third = nlb_pipeline.run_nlb(request.replace(resume=True), log=lines.append)
    assert third["best_epoch"] == first["best_epoch"] and third["epochs_run"] == 2
    assert any("exporting rates from" in s and "best.pt" in s for s in lines)
    sub3 = read_rates(out / "submission.h5", "mc_maze_20")
    for k in sub1:
        np.testing.assert_allclose(sub1[k], sub2[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(sub1[k], sub3[k], rtol=1e-5, atol=1e-7)


def test_default_configs_follow_the_reference():
    for name in ("mc_maze", "mc_maze_small", "area2_bump", "mc_rtt", "dmfc_rsg"):
        for bin_ms in (5, 20):
            cfg = default_config(name, bin_ms)
            assert cfg.model.dt == bin_ms / 100 and cfg.eval.export_draws == 50
            ref = REFERENCE[name]
            assert (cfg.fit.lr, cfg.fit.weight_decay, cfg.fit.cd_keep) == (ref["lr"], ref["weight_decay"], ref["cd_keep"])
            assert cfg.model.gamma == pytest.approx(gamma_from_reference(ref["gamma"]), abs=1e-3)
            member = cfg.member_fit(seed=3)
            assert (member.select_on, member.select_mode, member.seed) == ("co_bps", "max", 3)
            # the ramps take the first quarter of the epochs, as 500 of 2000 in the reference
            assert ramp_epochs(member.kl_ramp, member.epochs) == member.epochs // 4
    assert gamma_from_reference(0.55) == pytest.approx(3.99, abs=0.01)
    with pytest.raises(SpecError, match="unknown NLBConfig key 'lr'; did you mean 'fit.lr'"):
        default_config("mc_maze", 5, overrides={"lr": 1})


# ----- bad input: one line, non-zero exit ---------------------------------------------------------
def _assert_one_line_error(code, out, err, pattern):
    assert code == 2
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert pattern in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(root, tmp_path, capsys):
    base = ["--data-dir", root, "--out", tmp_path / "x", "--quick"]
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", "--data-dir", tmp_path / "nowhere",
                                    "--out", tmp_path / "x"), "data directory not found")
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", "--data-dir", tmp_path, "--out", tmp_path / "x"),
                           "no NLB data for mc_maze")
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_mazy", *base), "unknown NLB dataset 'mc_mazy'")
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", *base, "--bin-ms", 10), "bin size must be 5 or 20")
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", *base, "--bin-ms", "five"), "invalid int value")
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", *base, "--phase", "dev"), "phase must be")
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", *base, "--set", "nope=1"), "unknown NLBConfig key")
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", *base, "--set", "guide.name=lstm"), "unknown guide 'lstm'")
    _assert_one_line_error(*run_cli(capsys, "--data-dir", root), "required: --dataset")


def test_file_without_heldout_units(tmp_path, capsys):
    sub = tmp_path / "000128" / "sub-Synth"
    write_nlb_nwb(sub / "sub-Synth_desc-train_behavior+ecephys.nwb", "mc_maze", ["train"] * 4 + ["val"] * 2,
                  n_heldin=6, n_heldout=0)
    _assert_one_line_error(*run_cli(capsys, "--dataset", "mc_maze", "--data-dir", tmp_path, "--bin-ms", 20,
                                    "--out", tmp_path / "o", "--quick"), "no held-out units")


def test_bad_input_through_the_example_script(tmp_path):
    """`python examples/nlb.py` ends with exit 2 and one line on stderr (the CLI is tested in-process)."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "nlb.py"), "--dataset", "mc_maze_small",
                           "--data-dir", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "data directory not found")


def test_cli_dispatch(capsys):
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0
    assert "nlb" in capsys.readouterr().out
