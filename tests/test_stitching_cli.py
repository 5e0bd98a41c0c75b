"""Issue 30: ``pyro-langevin fit`` with several array files (stitched sessions) and ``--from RUN``.

Two small synthetic sessions of one latent system seen through different units: the CLI round trip
writes everything a one-session run writes plus one posterior.nc per session, per-session CV scores
and the shared-latent figure; ``--from`` adds a third session into a new folder and leaves the old run
byte-identical; every bad input of the issue is one ``error:`` line naming the file, exit 2, nothing
written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pyro_langevin.cli import main
from pyro_langevin.recording.data import Recording
from pyro_langevin.recording.stitch import fit_recordings

SMALL = ["--set", "model.latent_dim=4", "--set", "model.d_model=8", "--set", "model.n_heads=2", "--set",
         "model.dim_feedforward=8", "--set", "guide.hidden=8", "--set", "fit.epochs=2", "--set", "eval.export_draws=3",
         "--set", "eval.select_draws=2"]


def _session(path: Path, n_trials: int, n_units: int, seed: int, n_bins: int = 12) -> Path:
    """Trials of three conditions of one 2-D latent path, seen through ``n_units`` random units."""
    r = np.random.default_rng(seed)
    cond = np.arange(n_trials) % 3
    t = np.arange(n_bins)
    lat = np.stack([np.stack([np.sin(t / 3 + c), np.cos(t / 4 + c)], -1) for c in cond])
    rates = np.exp(lat @ (0.7 * r.normal(size=(2, n_units))) - 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, spikes=r.poisson(rates), cond=np.asarray([f"c{c}" for c in cond]))
    return path


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_cli_round_trip_with_two_array_files_then_a_new_session(tmp_path, capsys):
    a, b, c = (_session(tmp_path / f"{n}.npz", t, u, s) for n, t, u, s in (("A", 18, 8, 1), ("B", 12, 6, 2), ("C", 9, 5, 3)))
    out = tmp_path / "run"
    code, io = _run(["fit", "--arrays", str(a), "--arrays", str(b), "--counts", "spikes", "--condition", "cond",
                     "--bin-ms", "20", "--out", str(out), "--cv", "2", "--quick", "--workers", "1", "--no-progress",
                     *SMALL], capsys)
    assert code == 0, io.err
    head = json.loads(io.out.strip().splitlines()[-1])
    assert head["out"] == str(out) and "co_bps" in head
    for name, (n_trials, n_units) in {"A": (18, 8), "B": (12, 6)}.items():
        with xr.open_dataset(out / "sessions" / name / "posterior.nc", group="posterior") as post:
            assert post["rates_mean"].dims == ("trial", "time", "unit")
            assert post["rates_mean"].shape == (n_trials, 12, n_units)
            assert post["latents_mean"].shape == (n_trials, 12, 4)  # the shared latent space
            assert {"rates_lower", "rates_upper", "latents_lower", "condition_rates_mean"} <= set(post.data_vars)
    with xr.open_dataset(out / "posterior.nc", group="posterior") as pooled:
        assert pooled.sizes["trial"] == 30 and pooled.sizes["unit"] == 14
    metrics = json.loads((out / "metrics.json").read_text())
    for name in "AB":
        s = metrics["sessions"][name]["cv"]
        assert s["model"]["co-bps"]["n"] == 2 and np.isfinite(s["smoothing"]["co-bps"]["mean"])
    assert metrics["stitch"]["readin_init_used"] == "pcr" and metrics["stitch"]["readin_trained"] is False  # the default
    assert (out / "shared_latents.png").stat().st_size > 0 and (out / "spec.json").is_file()
    assert (out / "checkpoints" / "best.pt").is_file()

    before = _digest(out)
    new = tmp_path / "run_new"
    code, io = _run(["fit", "--from", str(out), "--arrays", str(c), "--counts", "spikes", "--bin-ms", "20",
                     "--out", str(new), "--no-progress", "--epochs", "2"], capsys)
    assert code == 0, io.err
    assert _digest(out) == before  # the old run is never changed
    with xr.open_dataset(new / "sessions" / "C" / "posterior.nc", group="posterior") as post:
        assert post["rates_mean"].shape == (9, 12, 5)
    assert json.loads((new / "metrics.json").read_text())["added_session"] == "C"


@pytest.fixture(scope="module")
def stitched_run(tmp_path_factory):
    """A tiny stitched run of sessions A and B (2 epochs, no CV), fitted through the Python API."""
    root = tmp_path_factory.mktemp("stitched")
    recs = [Recording.from_arrays(np.load(_session(root / f"{n}.npz", 10, 5, s))["spikes"], 20.0, source=str(root / f"{n}.npz"))
            for n, s in (("A", 1), ("B", 2))]
    fit_recordings(recs, root / "run", overrides={"cv.folds": 0, "fit.epochs": 1, "model.latent_dim": 4,
                                                    "guide.hidden": 8, "model.d_model": 8, "model.n_heads": 2,
                                                    "eval.export_draws": 2}, progress=False, log=lambda s: None)
    return root


def _one_session_run(root: Path) -> Path:
    from pyro_langevin.batch import make_batch
    from pyro_langevin.spec import RunSpec, build, run_meta
    from pyro_langevin.training import fit

    spec = RunSpec().override({"fit.epochs": 1, "model.latent_dim": 4, "guide.hidden": 8, "model.d_model": 8,
                               "model.n_heads": 2})
    model, guide = build(spec, 5, 5)
    b = make_batch(np.ones((4, 12, 5)))
    fit(model, guide, b, b, spec.fit, progress=False, checkpoint_dir=root / "single" / "checkpoints",
        meta=run_meta(spec, 5, 5))
    return root / "single"


@pytest.mark.parametrize("case", ["window", "too_few_trials", "duplicate_stems", "duplicate_names", "from_single",
                                  "from_not_a_run", "already_in_run", "from_other_bin_width"])
def test_every_bad_stitching_input_is_one_error_line_naming_the_file_exit_2_nothing_written(
        case, stitched_run, tmp_path, capsys):
    root = stitched_run
    a = root / "A.npz"
    bad = tmp_path / "bad"
    common = ["--counts", "spikes", "--bin-ms", "20", "--out", str(bad), "--no-progress"]
    argv, named = {
        "window": (["--arrays", str(a), "--arrays", str(_session(tmp_path / "W.npz", 10, 5, 4, n_bins=10))], "W.npz"),
        "too_few_trials": (["--arrays", str(a), "--arrays", str(_session(tmp_path / "S.npz", 4, 5, 4)), "--cv", "2"],
                           "S.npz"),
        "duplicate_stems": (["--arrays", str(a), "--arrays", str(_session(tmp_path / "x" / "A.npz", 10, 5, 4))],
                            str(tmp_path / "x" / "A.npz")),
        "duplicate_names": (["--arrays", str(a), "--arrays", str(root / "B.npz"), "--session-names", "S,S"], "B.npz"),
        "from_single": (["--from", str(_one_session_run(tmp_path)), "--arrays", str(_session(tmp_path / "N.npz", 6, 4, 5))],
                        "single"),
        "from_not_a_run": (["--from", str(tmp_path), "--arrays", str(_session(tmp_path / "N.npz", 6, 4, 5))],
                           str(tmp_path)),
        "already_in_run": (["--from", str(root / "run"), "--arrays", str(a)], "A.npz"),
        "from_other_bin_width": (["--from", str(root / "run"), "--arrays", str(_session(tmp_path / "N.npz", 6, 4, 5)),
                                  "--bin-ms", "10"], "N.npz"),
    }[case]
    before = _digest(root / "run")
    code, io = _run(["fit", *common, *argv], capsys)
    lines = [line for line in io.err.strip().splitlines() if line]
    assert code == 2, io.err
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], lines
    assert not bad.exists()
    assert _digest(root / "run") == before


def test_add_session_keeps_every_shared_and_old_session_parameter_bit_identical(stitched_run, tmp_path):
    import torch

    from pyro_langevin.recording.new_session import add_session
    from pyro_langevin.spec import load_run

    root = stitched_run
    new = Recording.from_arrays(np.load(_session(tmp_path / "C.npz", 8, 4, 7))["spikes"], 20.0, source=str(tmp_path / "C.npz"))
    metrics = add_session(root / "run", new, tmp_path / "grown", epochs=3, progress=False, log=lambda s: None)
    assert metrics["fit"]["epochs_run"] == 3
    old, grown = load_run(root / "run"), load_run(tmp_path / "grown")
    assert grown.model.layout.names == ["A", "B", "C"]
    for part in ("model", "guide"):
        before, after = getattr(old, part).state_dict(), getattr(grown, part).state_dict()
        assert set(before) < set(after)
        assert all(torch.equal(before[k], after[k]) for k in before)  # shared and old sessions' parameters
        added = set(after) - set(before)
        assert added and all(".C." in k for k in added)
    # the new session's own read-in and read-out did train: they left their (seeded) initial values
    from pyro_langevin.spec import build_stitched

    init_model, init_guide = build_stitched(grown.spec, grown.model.layout)
    assert not torch.equal(init_model.decoder.readout.sessions["C"].weight, grown.model.decoder.readout.sessions["C"].weight)
    assert not torch.equal(init_guide.readin["C"].weight, grown.guide.readin["C"].weight)


def test_the_stitching_example_runs_quick_and_scores_both_recipes_on_held_out_trials(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("stitching_example", Path(__file__).parents[1] / "examples" / "stitching.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--quick", "--epochs", "2", "--sessions", "3", "--out", str(tmp_path / "x"), "--no-progress",
                         "--few-shot", "5,all"]) == 0
    metrics = json.loads((tmp_path / "x" / "stitching.json").read_text())
    (record,) = metrics["results"]
    assert [s["trials"] for s in record["sessions"]] == [10, 35, 60]
    for recipe in ("stitched", "separate"):
        assert len(record[recipe]["rate_r2"]) == 3 and np.isfinite(record[recipe]["one_map_r2"])
    assert [r["k"] for r in record["few_shot"]["by_k"]] == [5, 30]  # the last session: 60 trials, half train
    assert all(np.isfinite([r["added_rate_r2"], r["scratch_rate_r2"]]).all() for r in record["few_shot"]["by_k"])
    assert (tmp_path / "x" / "stitching.png").stat().st_size > 0


def test_repeated_nwb_files_stitch_with_one_alignment_and_window_for_all(tmp_path, capsys):
    from nwb_factory import write_recording_nwb

    day1, day2 = tmp_path / "day1.nwb", tmp_path / "day2.nwb"
    write_recording_nwb(day1, n_trials=12, n_units=6, n_mua=1, seed=1)
    write_recording_nwb(day2, n_trials=10, n_units=5, n_mua=1, seed=2)
    out = tmp_path / "run"
    code, io = _run(["fit", "--nwb", str(day1), "--nwb", str(day2), "--align", "go_cue_time", "--window", "-100,300",
                     "--bin-ms", "20", "--condition", "reach_dir", "--where", "quality == 'good'", "--cv", "0",
                     "--out", str(out), "--no-progress", *SMALL], capsys)
    assert code == 0, io.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: (v["trials"], v["units"]) for k, v in metrics["sessions"].items()} == {"day1": (12, 5), "day2": (10, 4)}
    with xr.open_dataset(out / "sessions" / "day2" / "posterior.nc", group="posterior") as post:
        assert post["rates_mean"].shape == (10, 20, 4)
        np.testing.assert_allclose(post["time"].values[[0, -1]], [-90.0, 290.0])


def test_whether_the_read_in_trains_is_an_explicit_option():
    import argparse

    from pyro_langevin.recording.cli import add_fit_arguments

    p = add_fit_arguments(argparse.ArgumentParser())
    base = ["--arrays", "A.npz", "--arrays", "B.npz"]
    assert p.parse_args(base).train_readin is None  # default: fixed after PCR, trained after a random start
    assert p.parse_args(base + ["--train-readin"]).train_readin is True
    assert p.parse_args(base + ["--freeze-readin"]).train_readin is False
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--train-readin", "--freeze-readin"])


def test_an_interrupted_stitched_run_resumes_from_its_checkpoint_and_refuses_other_settings(tmp_path, capsys, monkeypatch):
    """Ctrl-C after epoch 2 of a 6-epoch stitched fit, then ``--resume``: the resumed run trains epochs 3-5
    only and ends bit-identical to an uninterrupted run (shared and per-session parameters, Adam moments);
    ``--resume`` with another learning rate or another read-in initialisation is refused, nothing written."""
    import os
    import signal

    import torch

    import pyro_langevin.recording.stitch as stitch
    from pyro_langevin.checkpoints import load_checkpoint

    a, b = (_session(tmp_path / f"{n}.npz", t, u, s) for n, t, u, s in (("A", 12, 6, 1), ("B", 9, 5, 2)))
    at = SMALL.index("fit.epochs=2")
    small = SMALL[:at - 1] + SMALL[at + 1:]  # every SMALL setting but its epochs
    args = lambda out: ["fit", "--arrays", str(a), "--arrays", str(b), "--counts", "spikes", "--condition", "cond",  # noqa: E731
                        "--bin-ms", "20", "--cv", "0", "--epochs", "6", "--out", str(out), "--no-progress", *small]
    trained, stop_at, fit = [], [], stitch.fit

    def watched_fit(*pos, **kw):  # the stitched run's own fit, with a callback that sees every epoch it trains
        def callback(epoch, record):
            trained.append(epoch)
            if epoch in stop_at:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: fit saves the epoch boundary and stops
        return fit(*pos, callback=callback, **kw)

    monkeypatch.setattr(stitch, "fit", watched_fit)
    straight = tmp_path / "straight"
    code, io = _run(args(straight), capsys)
    assert code == 0, io.err
    assert trained == list(range(6))

    run = tmp_path / "run"
    trained.clear()
    stop_at.append(2)
    code, io = _run(args(run), capsys)
    assert code == 130, io.err
    assert "interrupted" in io.err and "--resume" in io.err
    assert trained == [0, 1, 2] and load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert not (run / "metrics.json").exists()

    stop_at.clear()
    before = _digest(run)
    for other in (["--set", "fit.lr=0.5"], ["--readin-init", "random"]):
        trained.clear()
        code, io = _run([*args(run), "--resume", *other], capsys)
        lines = [line for line in io.err.strip().splitlines() if line]
        assert code == 2 and len(lines) == 1 and "--resume:" in lines[0], io.err
        assert trained == [] and _digest(run) == before

    code, io = _run([*args(run), "--resume"], capsys)
    assert code == 0, io.err
    assert trained == [3, 4, 5]  # continued from the checkpoint, not restarted
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fit"]["epochs_run"] == 6
    done, ref = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(straight / "checkpoints" / "last.pt")
    assert done["epoch"] == ref["epoch"] == 5
    for part in ("model", "guide"):  # shared (potential, decoder core, guide core) and each session's read-in/out
        assert done[part].keys() == ref[part].keys()
        assert any(".A." in k for k in done[part]) and any(".B." in k for k in done[part])
        assert all(torch.equal(done[part][k], ref[part][k]) for k in ref[part]), part
    for sa, sb in zip(done["optimizer"]["state"].values(), ref["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert metrics["fit"]["best_epoch"] == json.loads((straight / "metrics.json").read_text())["fit"]["best_epoch"]
