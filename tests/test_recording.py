"""Issue 23: your own recording, end to end: ``pyro-langevin fit`` on NWB files or arrays.

On a small synthetic NWB with known rates (pynwb-written: unequal trials, a go cue, reach-direction
conditions, a units ``quality`` column, hand velocity) and on the real DANDI:000140 test NWB in
tests/data: the reader's bins, padding and selections; every bad input of the issue gives one
``error:`` line naming the file and the field, exit status 2 and no output folder; a short fit's
cross-validated co-bps is above the smoothing baseline's on the same folds; the run folder holds a
spec, checkpoints ``load_run`` rebuilds, ``posterior.nc`` with the file's coordinates, metrics and
figures; a second run into the same ``--out`` is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pynwb import NWBHDF5IO

from nwb_factory import write_recording_nwb
from pyro_langevin.cli import main
from pyro_langevin.recording.data import Recording, RecordingError, read_arrays
from pyro_langevin.recording.nwb import read_nwb

DANDI = Path(__file__).resolve().parent / "data" / "000140" / "sub-Jenkins" / "sub-Jenkins_ses-small_desc-test_ecephys.nwb"
#: A short fit (tiny networks, 20 epochs, 2 folds): minutes of the default recipe would be too long here.
SHORT = {"model.latent_dim": 8, "guide.hidden": 32, "model.d_model": 32, "model.n_heads": 2, "model.dim_feedforward": 32,
         "fit.epochs": 20, "fit.val_every": 5, "fit.lr": 0.01, "fit.patience": 0, "model.dropout": 0.0,
         "guide.dropout": 0.0, "fit.shift_std": 0.0, "fit.cd_keep": 0.7, "fit.kl_ramp": 0.5,
         "eval.select_draws": 3, "eval.export_draws": 10, "cv.folds": 2}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "rec.nwb"
    truth = write_recording_nwb(path, n_trials=100, n_units=30)
    return path, truth


def _spikes(path: Path, row: int) -> np.ndarray:
    with NWBHDF5IO(str(path), "r") as io:
        return np.asarray(io.read().units["spike_times"][row])


# ----- reading -----------------------------------------------------------------------------------
def test_nwb_trials_of_unequal_length_are_padded_masked_and_binned_exactly(synthetic):
    path, truth = synthetic
    rec = read_nwb(path, bin_ms=20, condition="reach_dir", behavior="hand_vel")
    lengths = [int(np.floor((tr["stop_time"] - tr["start_time"]) * 50 + 1e-6)) for tr in truth["trials"]]
    assert rec.counts.shape == (100, max(lengths), 30)
    assert rec.observed.sum(axis=1).tolist() == lengths  # every whole bin inside its trial, no other
    assert rec.n_padded_trials == sum(n < max(lengths) for n in lengths) > 0
    assert any("padded and masked" in note for note in rec.notes)
    assert rec.counts[~rec.observed].sum() == 0
    np.testing.assert_allclose(rec.time_ms[:3], [10.0, 30.0, 50.0])  # bin centres from start_time
    # counts: each trial's spikes of unit 3 in [start + 20 k, start + 20 (k + 1)) ms
    times = _spikes(path, 3)
    for i in (0, 7, 42):
        start = truth["trials"][i]["start_time"]
        edges = start + np.arange(lengths[i] + 1) * 0.02
        assert rec.counts[i, : lengths[i], 3].tolist() == np.histogram(times, edges)[0].tolist()
    # known rates: the binned counts of the good units agree with the true expected counts
    ms = truth["rates_hz"] / 1000.0
    expected = sum(ms[int(round(tr["start_time"] * 1000)): int(round(tr["start_time"] * 1000)) + 20 * n, :26].sum()
                   for tr, n in zip(truth["trials"], lengths))
    observed = rec.counts[:, :, :26].sum()
    assert abs(observed - expected) < 4 * math.sqrt(expected)
    assert sorted(set(rec.conditions.tolist())) == ["0", "180", "270", "90"]
    # behaviour: the mean of the 1 kHz samples within each bin
    with NWBHDF5IO(str(path), "r") as io:
        vel = np.asarray(io.read().processing["behavior"]["hand_vel"].data[:])
    i0 = int(round(truth["trials"][5]["start_time"] * 1000))
    np.testing.assert_allclose(rec.behavior[5, 2], vel[i0 + 40: i0 + 60].mean(axis=0), rtol=1e-9)
    # the batch: padding out of the likelihood, chosen units held out as the trailing columns
    batch = rec.batch(heldout=[4, 1])
    assert batch.n_heldin == 28 and batch.n_neurons == 30
    assert torch.equal(batch.target[:, :, 28], torch.as_tensor(rec.counts[:, :, 4], dtype=torch.float32))
    assert torch.equal(batch.mask[:, :, 0], torch.as_tensor(rec.observed))


def test_nwb_selections_align_on_an_event_and_choose_units_and_trials(synthetic):
    path, truth = synthetic
    rec = read_nwb(path, bin_ms=20, align="go_cue_time", window_ms=(-200, 300), where="quality == 'good'",
                   trials="reach_dir == 90", min_rate_hz=1.0)
    assert rec.counts.shape == (25, 25, 26) and rec.observed.all()
    assert rec.unit_ids.tolist() == list(range(26))  # the four 'mua' units are left out
    assert rec.trial_ids.tolist() == [i for i, tr in enumerate(truth["trials"]) if tr["reach_dir"] == 90]
    np.testing.assert_allclose(rec.time_ms[[0, -1]], [-190.0, 290.0])
    picked = read_nwb(path, units=[5, 2], window_ms=(0, 400))
    assert picked.unit_ids.tolist() == [5, 2]
    rates = read_nwb(path, window_ms=(0, 400)).mean_rates_hz()
    kept = read_nwb(path, window_ms=(0, 400), min_rate_hz=5.0)
    assert kept.unit_ids.tolist() == np.flatnonzero(rates >= 5.0).tolist() and len(kept.unit_ids) < 30
    short = read_nwb(path, align="go_cue_time", window_ms=(-200, 600), drop_short=True)
    fits = [tr["go_cue_time"] + 0.6 <= tr["stop_time"] + 1e-6 for tr in truth["trials"]]
    assert short.n_trials == sum(fits) < 100 and any("--drop-short" in note for note in short.notes)


def test_the_dandi_test_nwb_reads_as_nlb_aligns_it():
    rec = read_nwb(DANDI, bin_ms=20, align="move_onset_time", window_ms=(-250, 450))
    assert rec.counts.shape == (100, 35, 107) and rec.observed.all()
    assert rec.trial_ids.tolist() == list(range(100))
    np.testing.assert_allclose(rec.time_ms[[0, -1]], [-240.0, 440.0])
    with NWBHDF5IO(str(DANDI), "r") as io:
        units = io.read().units
        assert rec.unit_ids.tolist() == units.id[:].tolist()
        n_spikes = len(units["spike_times"].target.data[:])
    assert rec.counts.sum() == n_spikes  # every spike of the file lies in one of these windows


def test_arrays_from_npz_and_h5(tmp_path):
    g = np.random.default_rng(0)
    counts = g.poisson(1.0, (12, 10, 5))
    cond = np.array(["a", "b"] * 6)
    np.savez(tmp_path / "rec.npz", spikes=counts, cond=cond, vel=g.normal(size=(12, 10)))
    rec = read_arrays(tmp_path / "rec.npz", 10, counts="spikes", condition="cond", behavior="vel", start_ms=-50)
    assert rec.counts.tolist() == counts.tolist() and rec.behavior.shape == (12, 10, 1)
    np.testing.assert_allclose(rec.time_ms[:2], [-45.0, -35.0])
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f.create_dataset("session/counts", data=counts.astype(np.float32))
    assert read_arrays(tmp_path / "rec.h5", 10, counts="session/counts").counts.sum() == counts.sum()
    rec = Recording.from_arrays(counts, 10, observed=np.arange(10)[None, :] < np.arange(3, 15)[:, None])
    assert rec.n_padded_trials == 7 and rec.counts[~rec.observed].sum() == 0


# ----- bad input: one line naming the file and the field, exit status 2, nothing written ---------------
def _bad_files(tmp: Path) -> dict:
    files = {}
    for name, kw in {"no_trials": dict(with_trials=False), "no_spike_times": dict(with_spike_times=False),
                     "outside": dict(spike_outside=True), "one_condition": dict(one_condition=True)}.items():
        files[name] = tmp / f"{name}.nwb"
        write_recording_nwb(files[name], n_trials=8, n_units=5, n_mua=1, **kw)
    files["good"] = tmp / "good.nwb"
    write_recording_nwb(files["good"], n_trials=8, n_units=5, n_mua=1)
    ok = np.ones((4, 6, 3))
    for name, arr in {"negative": -ok, "fraction": ok * 0.5, "nan": np.where(ok > 0, np.nan, 0), "rank": ok[0]}.items():
        np.savez(tmp / f"{name}.npz", counts=arr)
        files[name] = tmp / f"{name}.npz"
    return files


BAD = [  # (case, file, options, what the line must name)
    ("no trials table", "no_trials", [], ["no trials table"]),
    ("event column missing", "good", ["--align", "move_onset"], ["no column 'move_onset'", "go_cue_time, reach_dir"]),
    ("window leaves no bins", "good", ["--window", "100,100"], ["--window 100,100 leaves no bins"]),
    ("window past the trials' end", "good", ["--align", "go_cue_time", "--window", "-200,800"],
     ["runs past the end of 8 of 8 trials", "trials.stop_time", "--drop-short"]),
    ("no units left", "good", ["--where", "quality == 'excellent'"], ["no units left after selection", "--where"]),
    ("no units above --min-rate", "good", ["--min-rate", "500"], ["no units left after selection", "--min-rate 500 Hz"]),
    ("spike times outside the recording", "outside", [], ["units.spike_times of unit 1", "outside the recording",
                                                          "obs_intervals"]),
    ("units table without spike times", "no_spike_times", [], ["units table has no spike_times column"]),
    ("negative counts", "negative", [], ["counts 'counts'", "negative counts"]),
    ("non-integer counts", "fraction", [], ["counts 'counts'", "whole numbers"]),
    ("NaN counts", "nan", [], ["counts 'counts'", "NaN"]),
    ("counts of the wrong rank", "rank", [], ["counts 'counts'", "expected 3 dimensions (trial, time, unit)"]),
    ("a condition column with one value", "one_condition", ["--condition", "reach_dir"],
     ["trials.reach_dir has one value ('0')"]),
    ("--bin-ms not dividing the window", "good", ["--window", "-200,310", "--bin-ms", "20"],
     ["--bin-ms 20 does not divide the window -200..310 ms"]),
]


@pytest.mark.parametrize("case,name,options,fragments", BAD, ids=[b[0] for b in BAD])
def test_every_bad_input_is_one_line_naming_file_and_field_exit_2_nothing_written(tmp_path, capsys, case, name,
                                                                                  options, fragments):
    files = _bad_files(tmp_path)
    out = tmp_path / "out"
    source = ["--arrays" if files[name].suffix == ".npz" else "--nwb", str(files[name])]
    code = main(["fit", *source, *options, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("pyro-langevin fit: error: "), err
    assert str(files[name]) in err[0], err[0]  # the file ...
    for fragment in fragments:  # ... and the field
        assert fragment in err[0], err[0]
    assert not out.exists()


def test_a_condition_with_one_value_in_the_dandi_file_is_refused(tmp_path, capsys):
    code = main(["fit", "--nwb", str(DANDI), "--condition", "split", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "trials.split has one value ('test')" in err[0] and str(DANDI) in err[0]
    assert not (tmp_path / "o").exists()


# ----- fits ----------------------------------------------------------------------------------------
def test_a_short_fit_on_the_dandi_file_beats_smoothing_on_the_same_folds(tmp_path):
    """Co-smoothing CV on 100 real trials: random held-out units per fold, scored trials unseen."""
    from pyro_langevin.recording.run import cross_validate_recording, recording_config

    rec = read_nwb(DANDI, bin_ms=20, align="move_onset_time", window_ms=(-250, 450))
    cfg = recording_config(rec, SHORT)
    cv = cross_validate_recording(rec, cfg, tmp_path / "cv", seed=0, progress=False, log=lambda s: None)
    folds = cv["folds"]
    assert cv["n_heldout_units"] == 27 and len(folds) == 2
    assert sorted(sum((f["scored_trials"] for f in folds), [])) == list(range(100))
    held = [set(f["heldout_units"]) for f in folds]
    assert held[0] != held[1] and all(len(h) == 27 and h <= set(rec.unit_ids.tolist()) for h in held)
    s = cv["summary"]
    assert s["model"]["co-bps"]["mean"] > s["smoothing"]["co-bps"]["mean"], s
    assert s["difference"]["co-bps"]["mean"] == pytest.approx(
        np.mean([f["model"]["co-bps"] - f["smoothing"]["co-bps"] for f in folds]))


def test_fit_command_end_to_end_on_synthetic_nwb(synthetic, tmp_path, capsys):
    import arviz as az

    from pyro_langevin.recording.config import RecordingConfig
    from pyro_langevin.spec import load_run, read_spec_file

    path, truth = synthetic
    spec = tmp_path / "short.json"
    spec.write_text(json.dumps(SHORT))
    out = tmp_path / "run"
    args = ["fit", "--nwb", str(path), "--condition", "reach_dir", "--behavior", "hand_vel", "--bin-ms", "20",
            "--spec", str(spec), "--out", str(out), "--no-progress", "--workers", "1", "--recipe", "default"]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2-fold co-smoothing CV" in captured.out and "trials padded" in captured.out
    head = json.loads(captured.out.strip().splitlines()[-1])
    assert head["co_bps"] > head["smoothing_co_bps"] and head["vel_r2"] > head["smoothing_vel_r2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["defaults"]["size"] == {"trials": 100, "units": 30, "bins": 45}
    # the run spec: in spec.json (usable as --spec) and in the checkpoints (load_run)
    stored = RecordingConfig().override(read_spec_file(out / "spec.json", RecordingConfig()))
    assert stored.model.latent_dim == 8 and stored.cv.folds == 2 and stored.fit.batch_size == 25  # 100 trials / 4
    model, guide, loaded, _ = load_run(out)
    assert isinstance(loaded, RecordingConfig) and model.n_neurons == 30 and loaded.fit.select_on == "val_loss"
    # posterior.nc: summaries with the file's coordinates, padding NaN
    idata = az.from_netcdf(out / "posterior.nc")
    post = idata.posterior
    assert post["trial"].values.tolist() == list(range(100))
    np.testing.assert_allclose(post["time"].values[:2], [10.0, 30.0])
    assert post["unit"].values.tolist() == list(range(30))
    rates = post["rates_mean"].values
    observed = idata.constant_data["observed"].values.astype(bool)
    assert np.isnan(rates[~observed]).all() and np.isfinite(rates[observed]).all()
    assert (post["rates_lower"].values[observed] <= rates[observed] + 1e-6).all()
    assert (rates[observed] <= post["rates_upper"].values[observed] + 1e-6).all()
    conditions = idata.constant_data["condition"].values
    c = post["condition"].values.tolist().index("90")
    with np.errstate(invalid="ignore"):
        manual = np.nanmean(rates[conditions == "90"], axis=0)
    np.testing.assert_allclose(post["condition_rates_mean"].values[c], manual, rtol=1e-4)
    for name in ("rasters", "psth", "latents", "cv"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    # a second run into the same folder is refused; a resume with other settings too
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an earlier run" in err[0] and "--resume" in err[0]
    assert main([*args, "--resume", "--set", "fit.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume:" in err[0] and "fit.lr=0.01 there, 0.5 here" in err[0]


# ----- the core pieces the wing shares with nlb/ ------------------------------------------------------------
def test_scoring_and_the_baseline_never_read_padding():
    from pyro_langevin.baseline import smoothing_baseline
    from pyro_langevin.scoring import score_local

    g = np.random.default_rng(1)
    counts = g.poisson(2.0, (20, 12, 6)).astype(float)
    observed = np.arange(12)[None, :] < g.integers(6, 13, 20)[:, None]
    rec = Recording.from_arrays(counts, 20, observed=observed)
    batch = rec.batch(heldout=[4, 5])
    # garbage where there is no data: in the input the guide reads and in the unmasked target
    junk = batch.with_inputs(torch.where(batch.mask[:, :, :4], batch.input, torch.full_like(batch.input, 50.0)), batch.mask)
    junk = type(batch)(junk.input, torch.where(batch.mask, batch.target, torch.full_like(batch.target, 70.0)),
                       batch.mask, batch.index)
    a = smoothing_baseline(batch[:12], batch[12:], 20, 40.0, alpha=0.1)
    b = smoothing_baseline(junk[:12], junk[12:], 20, 40.0, alpha=0.1)
    seen = observed[12:]
    np.testing.assert_allclose(a.eval[seen], b.eval[seen], rtol=1e-10)
    rates = a.eval.copy()
    rates[~seen] = 30.0  # absurd rates in padded bins change nothing
    assert score_local(rates, batch[12:])["co-bps"] == pytest.approx(score_local(a.eval, batch[12:])["co-bps"])


def test_decoding_r2_gives_nlb_tools_numbers():
    from nlb_tools.evaluation import fit_and_eval_decoder

    from pyro_langevin.metrics import decoding_r2

    g = np.random.default_rng(2)
    x, w = g.poisson(3.0, (400, 12)).astype(float), g.normal(size=(12, 2))
    y = x @ w + g.normal(size=(400, 2))
    y[5] = np.nan
    for grid in (True, False):
        assert decoding_r2(x[:300], y[:300], x[300:], y[300:], grid) == pytest.approx(
            fit_and_eval_decoder(x[:300], y[:300], x[300:], y[300:], grid), rel=1e-12)


def test_defaults_by_size_start_from_the_cross_validated_nlb_recipe():
    from pyro_langevin.nlb.config import default_config as nlb_default
    from pyro_langevin.recording.config import default_config

    ours = default_config(100, 107, 35, 20.0).flat()
    nlb = nlb_default("mc_maze_small", 20).flat()
    same = [k for k in nlb if not k.startswith(("eval.", "fit.select"))]
    assert {k: (ours[k], nlb[k]) for k in same if ours[k] != nlb[k]} == {}
    small = default_config(30, 12, 20, 10.0)
    assert (small.model.latent_dim, small.guide.hidden, small.cv.folds, small.fit.batch_size) == (16, 64, 3, 8)
    assert small.fit.shift_std == pytest.approx(2.5)  # an eighth of 20 bins, not 60 ms / 10 ms


def test_a_searched_recipe_gets_at_most_three_folds_and_the_same_epochs():
    from pyro_langevin.recording.config import SEARCH_FOLDS, default_config

    for n_trials, plain_folds in ((10, 2), (30, 3), (45, 4), (100, 5)):
        plain = default_config(n_trials, 48, 50, 20.0)
        searched = default_config(n_trials, 48, 50, 20.0, search=True)
        assert plain.cv.folds == plain_folds
        assert searched.cv.folds == min(plain_folds, SEARCH_FOLDS)
        assert (searched.fit.epochs, searched.fit.batch_size) == (plain.fit.epochs, plain.fit.batch_size)
    assert default_config(100, 48, 50, 20.0, overrides={"cv.folds": 5}, search=True).cv.folds == 5  # asked for: kept


def test_the_fold_ensemble_pools_the_fit_and_every_fold_model_unit_by_unit(tmp_path):
    """posterior.nc's rates average the fit's and the K folds' posterior means (the folds read their
    held-in units, so their rate columns are reordered back to the recording's units); latents stay the
    fit's; ``cv.ensemble=false`` writes the fit's rates alone."""
    import pyro
    import xarray as xr

    from pyro_langevin.predictive import posterior_predictive
    from pyro_langevin.recording.run import fit_recording, fold_members
    from pyro_langevin.spec import load_run

    rng = np.random.default_rng(0)
    hz = np.geomspace(2.0, 80.0, 12)[rng.permutation(12)]  # units whose mean rates differ by 40x, shuffled
    counts = rng.poisson(hz * 0.02, size=(24, 15, 12))
    rec = Recording.from_arrays(counts, 20.0)
    over = {**SHORT, "fit.epochs": 2, "eval.export_draws": 4}
    m = fit_recording(rec, tmp_path / "on", overrides=over, recipe="default", progress=False, log=lambda s: None)
    assert m["posterior"]["rate_models"] == 3 and "fold ensemble" in m["posterior"]["rates"]
    members = fold_members(rec, m["cv"], tmp_path / "on" / "cv")
    assert len(members) == 2
    for member, fold in zip(members, m["cv"]["folds"]):
        assert member.batch.input.shape[-1] == 12 - len(fold["heldout_units"])
    # the same draws as fit_recording made (seed 0, one chunk): the fit's, then each fold's
    model, guide, _, _ = load_run(tmp_path / "on")
    pyro.set_rng_seed(0)
    means = [posterior_predictive(model, guide, rec.batch(), n_samples=4, sites=("rates",))["rates"].mean(0)]
    for member in members:
        rates = posterior_predictive(member.model, member.guide, member.batch, n_samples=4, sites=("rates",))["rates"]
        per_unit = rates.mean(0)[..., member.columns]
        # columns put every unit's rate where the recording has it: per-unit means follow the data's 40x range
        assert np.corrcoef(np.log(per_unit.mean((0, 1))), np.log(hz))[0, 1] > 0.9
        means.append(per_unit)
    with xr.open_dataset(tmp_path / "on" / "posterior.nc", group="posterior", engine="h5netcdf") as post:
        np.testing.assert_allclose(post["rates_mean"].values, np.mean(means, 0), rtol=1e-4, atol=1e-6)
        assert post.attrs["rate_models"] == 3
        latents_on = post["latents_mean"].values
    off = fit_recording(rec, tmp_path / "off", overrides={**over, "cv.ensemble": False}, recipe="default",
                        progress=False, log=lambda s: None)
    assert off["posterior"]["rate_models"] == 1
    with xr.open_dataset(tmp_path / "off" / "posterior.nc", group="posterior", engine="h5netcdf") as post:
        np.testing.assert_allclose(post["rates_mean"].values, means[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(post["latents_mean"].values, latents_on, rtol=1e-4, atol=1e-6)
