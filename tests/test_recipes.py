"""The recipe chosen on the recording (issue 29): the synthetic family's sizes and rates, Poisson data
thinning as a score of rates, the search's nesting inside the cross-validation, and a recording where
the temporal shift hurts getting a recipe without it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyro_langevin.data.synthetic import FAMILY, KINDS, family, make_recording
from pyro_langevin.recording.data import Recording
from pyro_langevin.thinning import thin, thinned_bits_per_spike

#: Tiny networks and short fits for the search tests.
TINY = {"model.latent_dim": 4, "guide.hidden": 16, "model.d_model": 16, "model.n_heads": 2,
        "model.dim_feedforward": 16, "fit.epochs": 16, "fit.val_every": 4, "fit.lr": 0.01, "fit.patience": 0,
        "fit.batch_size": 16, "eval.select_draws": 3, "eval.export_draws": 5}


# ----- the family ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILY))
def test_the_family_has_the_stated_sizes_and_realistic_rates(name):
    rec = family([name])[name]
    spec = FAMILY[name]
    assert rec.counts.shape == (spec["n_trials"], spec["n_bins"], spec["n_units"])
    assert rec.rates.shape == rec.counts.shape and rec.bin_ms == spec["bin_ms"]
    assert rec.counts.dtype == np.int64 and (rec.counts >= 0).all()
    hz = rec.rates_hz
    base, peak = hz.min(axis=(0, 1)), hz.max(axis=(0, 1))
    # baselines 5-20 Hz, peaks in the tens to a few hundred Hz (binning averages the 1 ms extremes a little)
    assert 4.0 < base.min() and base.max() < 25.0, (base.min(), base.max())
    assert 40.0 < peak.min() and peak.max() < 310.0, (peak.min(), peak.max())
    # the counts are Poisson draws of the rates: totals agree within a few Poisson s.d.
    assert abs(rec.counts.sum() - rec.rates.sum()) < 5 * np.sqrt(rec.rates.sum())
    assert len(set(rec.conditions.tolist())) == spec.get("n_conditions", 12)


def test_the_family_spans_the_sizes_kinds_bins_and_jitter_the_benchmark_needs():
    specs = list(FAMILY.values())
    assert {s["kind"] for s in specs} == set(KINDS)
    assert min(s["n_trials"] for s in specs) <= 10 and max(s["n_trials"] for s in specs) >= 200
    assert min(s["n_units"] for s in specs) <= 20 and max(s["n_units"] for s in specs) >= 150
    assert {s["bin_ms"] for s in specs} == {5, 20}
    assert any(s.get("jitter_ms") for s in specs) and any(not s.get("jitter_ms") for s in specs)


def test_one_system_binned_two_ways_and_jitter_moves_spikes_within_their_trial():
    a = make_recording("rotation", n_trials=6, n_units=5, n_bins=40, bin_ms=5, seed=3)
    b = make_recording("rotation", n_trials=6, n_units=5, n_bins=10, bin_ms=20, seed=3)
    np.testing.assert_allclose(a.rates.reshape(6, 10, 4, 5).sum(axis=2), b.rates, rtol=1e-10)
    sharp = make_recording("pulses", n_trials=20, n_units=8, n_bins=100, bin_ms=5, seed=1)
    jittered = make_recording("pulses", n_trials=20, n_units=8, n_bins=100, bin_ms=5, jitter_ms=10.0, seed=1)
    # the same spikes, moved within their trial: every (trial, unit) keeps its spike count, the bins change
    np.testing.assert_array_equal(jittered.counts.sum(axis=1), sharp.counts.sum(axis=1))
    assert (jittered.counts != sharp.counts).mean() > 0.1
    roughness = lambda r: np.abs(np.diff(r, axis=1)).mean()  # noqa: E731
    assert roughness(jittered.rates) < roughness(sharp.rates)  # the truth is the rate smoothed by the jitter
    with pytest.raises(ValueError, match="kind must be one of"):
        make_recording("spiral")


def test_pulses_come_at_trial_specific_times():
    rec = make_recording("pulses", n_trials=24, n_units=10, n_bins=50, bin_ms=20, n_conditions=2, seed=0)
    same = rec.latents[rec.conditions == "c00"]
    # trials of one condition differ (their pulse times do), unlike the Lorenz condition repeats
    assert np.abs(same - same.mean(axis=0)).mean() > 0.2
    lorenz = make_recording("lorenz", n_trials=24, n_units=10, n_bins=50, bin_ms=20, n_conditions=2, seed=0)
    rep = lorenz.latents[lorenz.conditions == "c00"]
    assert np.abs(rep - rep.mean(axis=0)).max() < 1e-9


# ----- data thinning -----------------------------------------------------------------------------------
def test_thinning_splits_counts_into_independent_poisson_parts():
    g = np.random.default_rng(0)
    rates = g.uniform(0.5, 4.0, size=(200, 30, 6))
    y = g.poisson(rates).astype(float)
    y1, y2 = thin(y, 0.7, seed=1)
    np.testing.assert_array_equal(y1 + y2, y)
    assert y1.mean() / y.mean() == pytest.approx(0.7, abs=0.01)
    # independence given the rates: the residuals of the two parts are uncorrelated
    r1, r2 = (y1 - 0.7 * rates).ravel(), (y2 - 0.3 * rates).ravel()
    assert abs(np.corrcoef(r1, r2)[0, 1]) < 0.02
    with pytest.raises(ValueError, match="keep"):
        thin(y, 1.0)
    with pytest.raises(ValueError, match="whole"):
        thin(y + 0.5, 0.5)


def test_the_thinned_score_prefers_the_true_rates_to_a_copy_of_the_spikes_it_read():
    """What co-smoothing of held-out units cannot see: rates that copy the counts the model read."""
    g = np.random.default_rng(2)
    rates = np.exp(g.normal(0.5, 0.6, size=(40, 50, 10)))
    y1, y2 = thin(g.poisson(rates).astype(float), 0.7, seed=3)
    truth = thinned_bits_per_spike(0.7 * rates, y2, 0.7)
    copied = thinned_bits_per_spike(0.5 * (y1 + 0.7 * rates), y2, 0.7)  # half spikes read, half truth
    assert truth > copied + 0.05
    assert truth > thinned_bits_per_spike(np.full_like(rates, 0.7 * rates.mean()), y2, 0.7)


# ----- the search, nested in the cross-validation -----------------------------------------------------------
def _recording(kind="rotation", **kw) -> tuple:
    syn = make_recording(kind, **kw)
    return syn, Recording.from_arrays(syn.counts, syn.bin_ms, conditions=syn.conditions)


def test_a_folds_search_never_sees_its_scored_trials(tmp_path):
    """The search receives each fold's OTHER trials only; a search that saw a scored trial fails here."""
    from pyro_langevin.recording.run import cross_validate_recording, recording_config

    _, rec = _recording(n_trials=18, n_units=8, n_bins=12, n_conditions=3, seed=4)
    rec.trial_ids = np.arange(100, 118)  # the file's ids, not rows
    cfg = recording_config(rec, dict(TINY, **{"cv.folds": 3, "fit.epochs": 2, "fit.val_every": 1}))
    seen = []

    def spy(trial_sets, folder):
        seen.extend(set(t.trial_ids.tolist()) for t in trial_sets)
        return [{"winner": "b", "margin": 0.1, "keep": 0.7, "n_trials": t.n_trials, "seconds": 0.0,
                 "candidates": {"a": {"overrides": {}, "score": 0.0}, "b": {"overrides": {"fit.shift_std": 0.0},
                                                                             "score": 0.1}}} for t in trial_sets]

    cv = cross_validate_recording(rec, cfg, tmp_path / "cv", seed=0, progress=False, search=spy, log=lambda s: None)
    assert len(seen) == 3
    for fold, trials in zip(cv["folds"], seen):
        scored = {100 + i for i in fold["scored_trials"]}
        assert not scored & trials, "a fold's search read trials the fold scores"
        assert scored | trials == set(range(100, 118))
        assert fold["recipe"] == "b" and json.loads((tmp_path / "cv" / f"fold{fold['fold']}" / "search.json").read_text())[
            "trial_rows"] == sorted(set(range(18)) - set(fold["scored_trials"]))
    # the folds trained the winner: their checkpoints record its setting, not the base recipe's
    from pyro_langevin.checkpoints import load_checkpoint

    meta = load_checkpoint(tmp_path / "cv" / "fold0" / "checkpoints" / "best.pt")["meta"]
    assert meta["spec"]["fit"]["shift_std"] == 0.0 and cfg.fit.shift_std > 0


@pytest.mark.slow
def test_a_recording_where_the_shift_hurts_gets_a_recipe_without_it(tmp_path):
    """A fast (8 Hz) rotation at 20 ms: a 4-bin temporal shift smears it; the search keeps the timing."""
    from pyro_langevin.recording.recipes import ray_for_search, search_recipe
    from pyro_langevin.recording.run import recording_config

    syn, rec = _recording(n_trials=40, n_units=24, n_bins=25, bin_ms=20, freq_hz=8.0, latent_noise=0.1,
                          peak_hz=(150.0, 300.0), n_conditions=8, seed=5)
    cfg = recording_config(rec, dict(TINY, **{"cv.folds": 0, "fit.epochs": 40, "fit.val_every": 8}))
    candidates = {"shift": {"fit.shift_std": 4.0}, "no-shift": {"fit.shift_std": 0.0}}
    with ray_for_search(True, cpus=2):
        (result,) = search_recipe([rec], cfg, tmp_path, seed=0, candidates=candidates, log=lambda s: None)
    assert result["winner"] == "no-shift", result
    assert result["margin"] > 0 and set(result["candidates"]) == {"shift", "no-shift"}
    assert all(c["validations"] >= 1 for c in result["candidates"].values())


@pytest.mark.slow
def test_fit_command_searches_reports_the_choice_and_saves_arviz_draws(tmp_path, capsys):
    import arviz as az

    from pyro_langevin.cli import main

    syn = make_recording("rotation", n_trials=20, n_units=10, n_bins=15, n_conditions=4, seed=6)
    path = syn.save(tmp_path / "rec.npz")
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(dict(TINY, **{"fit.epochs": 4, "fit.val_every": 2})))
    out = tmp_path / "run"
    code = main(["fit", "--arrays", str(path), "--counts", "counts", "--condition", "condition", "--cv", "2",
                 "--spec", str(spec), "--save-draws", "6", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    recipe = metrics["recipe"]
    assert recipe["mode"] == "search" and recipe["winner"] in recipe["candidates"]
    assert len(recipe["folds"]) == 2 and sum(recipe["wins"].values()) == 2
    assert set(recipe["scores"]) == set(recipe["candidates"]) and recipe["margin"]["runner_up"] != recipe["winner"]
    for fold in metrics["cv"]["folds"]:
        assert fold["recipe"] in recipe["candidates"] and not set(fold["search"]["trial_rows"]) & set(fold["scored_trials"])
    assert "recipe   chosen on the recording" in captured.out
    assert json.loads(captured.out.strip().splitlines()[-1])["recipe"] == recipe["winner"]
    # the final fit refitted every trial for the winner's epochs in its searches, no validation split
    assert metrics["fit"]["refit"] and metrics["fit"]["epochs_run"] == recipe["epochs"] >= 1
    assert metrics["fit"]["n_fit_trials"] == 20 and metrics["fit"]["valid_trials"] == []
    # the final fit trained the winner (spec.json and the checkpoint say so)
    winner = recipe["candidates"][recipe["winner"]]
    stored = json.loads((out / "spec.json").read_text())
    for key, value in winner.items():
        section, name = key.split(".")
        assert stored[section][name] == value
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["rates"].dims == ("chain", "draw", "trial", "time", "unit")
    assert idata.posterior["latents"].shape[:3] == (1, 6, 20)
    np.testing.assert_allclose(idata.posterior["rates"].mean(("chain", "draw")), idata.posterior["rates_mean"],
                               rtol=0.6, atol=0.5)  # the kept draws are among those the mean averages
    table = az.summary(idata, var_names=["rates"], coords={"trial": [0], "unit": [0]}, kind="stats")
    assert len(table) == 15 and {"mean", "sd", "hdi_3%", "hdi_97%"} <= set(table.columns)
    assert az.hdi(idata, var_names=["latents"], hdi_prob=0.9)["latents"].shape == (20, 15, 4, 2)


def test_recipe_mode_and_save_draws_are_checked():
    from pyro_langevin.recording.run import fit_recording
    from pyro_langevin.spec import SpecError

    _, rec = _recording(n_trials=6, n_units=4, n_bins=6, n_conditions=2)
    with pytest.raises(SpecError, match="recipe must be one of"):
        fit_recording(rec, "unused", recipe="best", log=lambda s: None)
    with pytest.raises(SpecError, match="save_draws"):
        fit_recording(rec, "unused", save_draws=-1, log=lambda s: None)


def test_the_final_fit_refits_for_the_winners_epochs_in_the_searches_it_finished():
    from pyro_langevin.recording.config import default_config
    from pyro_langevin.recording.recipes import refit_config, summarize_recipe_choice

    def search(winner, a, b, stopped=False):
        return {"winner": winner, "keep": 0.7, "candidates": {
            "x": {"score": a[0], "best_epoch": a[1], "stopped": stopped and winner != "x"},
            "y": {"score": b[0], "best_epoch": b[1], "stopped": False}}}

    cands = {"x": {}, "y": {"fit.shift_std": 0.0}}
    # x wins twice; its third search was cut by ASHA at epoch 9 and does not count
    choice = summarize_recipe_choice([search("x", (0.2, 99), (0.1, 40)), search("x", (0.3, 59), (0.2, 40)),
                                      search("y", (0.1, 9), (0.2, 40), stopped=True)], cands)
    assert choice["winner"] == "x" and choice["wins"] == {"x": 2, "y": 1}
    assert choice["epochs"] == 80  # median of 100 and 60
    assert choice["margin"]["runner_up"] == "y" and choice["margin"]["mean"] == pytest.approx((0.1 + 0.1 - 0.1) / 3)
    base = default_config(60, 48, 50, 20.0)
    refit = refit_config(base, 80)
    ramp = lambda c, name: getattr(c.fit, name) * c.fit.epochs  # noqa: E731  ramp length in epochs
    assert refit.fit.epochs == 80 and refit.fit.patience == 0
    assert ramp(refit, "kl_ramp") == pytest.approx(ramp(base, "kl_ramp"))
    assert ramp(refit, "weight_decay_ramp") == pytest.approx(ramp(base, "weight_decay_ramp"))


def test_the_searched_candidates_include_a_smaller_network_sized_from_the_defaults():
    """Issue 29 asks for latent size and guide width among the candidates: ``small`` quarters the sized
    latent (at least 4) and halves the guide (at least 16), without the shift; it builds."""
    from pyro_langevin.recording.config import default_config
    from pyro_langevin.recording.recipes import CANDIDATES, candidate_config, recipe_candidates

    for (n, u), (latent, hidden) in {(100, 100): (8, 64), (30, 20): (4, 32)}.items():
        base = default_config(n, u, 50, 20.0, search=True)
        cands = recipe_candidates(base)
        assert set(cands) == set(CANDIDATES) | {"small"}
        small = candidate_config(base, cands["small"])
        assert (small.model.latent_dim, small.guide.hidden, small.fit.shift_std) == (latent, hidden, 0.0)
        assert small.model.latent_dim < base.model.latent_dim and small.guide.hidden < base.guide.hidden
