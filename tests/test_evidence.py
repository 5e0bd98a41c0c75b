"""Held-out evidence by importance sampling (pyro_langevin.evidence) and the log_likelihood group."""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from scipy.special import gammaln, logsumexp, xlogy

from pyro_langevin.batch import make_batch
from pyro_langevin.evidence import (
    KHAT_THRESHOLD, Evidence, compare, compare_folds, evidence_from_log_weights, format_compare, khat_threshold,
    log_evidence, trial_log_weights,
)
from pyro_langevin.guides import GRUGuide, StepwiseGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.predictive import predictive_checks

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

TINY_DECODER = {"d_model": 8, "n_heads": 1, "dim_feedforward": 8, "dropout": 0.0}


def tiny_model(n_neurons: int = 3, latent_dim: int = 1, seed: int = 1) -> LangevinFlow:
    """A model small enough to integrate by brute force: 1-D latent, 3 neurons, 2 counts per bin."""
    torch.manual_seed(seed)
    model = LangevinFlow(n_neurons, latent_dim=latent_dim, dt=0.2, potential="quadratic", decoder_kwargs=TINY_DECODER)
    with torch.no_grad():
        model.decoder.readout.bias.fill_(math.log(2.0))
    return model.eval()


def sampled_batch(model: LangevinFlow, n_trials: int, n_obs: int, n_fwd: int, n_heldin: int, seed: int = 0):
    """Trials drawn from the model's prior predictive, split into held-in/held-out and observed/forward."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        x = model(n_trials=n_trials, n_bins=n_obs + n_fwd)
    return make_batch(x[:, :n_obs, :n_heldin], x[:, :n_obs, n_heldin:], x[:, n_obs:, :n_heldin],
                      x[:, n_obs:, n_heldin:])


class TinyScaleGuide(StepwiseGuide):
    """A deliberately bad proposal: every latent site has a tiny fixed scale around the prior mean."""

    deterministic_prepare = True

    def __init__(self, model: LangevinFlow, scale: float = 1e-3) -> None:
        super().__init__(model)
        self.scale = scale

    def initial(self, ctx, batch):
        zeros = batch.input.new_zeros(batch.n_trials, self.prior.latent_dim)
        return dist.Normal(zeros, self.scale).to_event(1), dist.Normal(zeros, self.scale).to_event(1)

    def step(self, t, z, v, prior, ctx):
        return dist.Normal(prior.v_loc, prior.v_scale * self.scale).to_event(1)


@pytest.fixture(scope="module")
def fitted_tiny():
    """The tiny model with a GRU guide fitted to 3 trials (the model frozen), and those trials."""
    model = tiny_model()
    batch = sampled_batch(model, 3, n_obs=3, n_fwd=1, n_heldin=2, seed=1)
    pyro.clear_param_store()
    guide = GRUGuide(model, 2, hidden=8, dropout=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    pyro.set_rng_seed(0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO())
    for _ in range(300):
        svi.step(batch)
    return model, guide.eval(), batch


def test_mean_log_weight_is_trace_elbo_on_the_same_draws(fitted_tiny):
    """One draw per trial: the summed log weights are Pyro's Trace_ELBO estimate of the same draw
    (the full log joint, forward bins and masks included, minus the guide's log density)."""
    model, guide, batch = fitted_tiny
    masked = batch.with_inputs(batch.input, batch.mask.clone().index_fill_(2, torch.tensor([2]), False))
    for b in (batch, masked):
        pyro.set_rng_seed(7)
        ev = log_evidence(model, guide, b, num_particles=1, seed=None, warn=False)
        pyro.set_rng_seed(7)
        elbo = -Trace_ELBO().loss(model, guide, b)
        assert ev.elbo.sum() == pytest.approx(elbo, rel=1e-6, abs=1e-3)
        assert np.array_equal(ev.elbo, ev.log_evidence)  # K = 1: the bound is the ELBO


def test_estimate_never_below_elbo_and_rises_with_k():
    model = LangevinFlow(8, latent_dim=4, dt=0.1, decoder_kwargs=TINY_DECODER)
    batch = sampled_batch(tiny_model(8, 4, seed=1), 6, n_obs=6, n_fwd=2, n_heldin=6, seed=1)
    guide = GRUGuide(model, 6, hidden=8)
    totals = {}
    for k in (1, 8, 64):
        runs = [log_evidence(model, guide, batch, k, seed=s, warn=False) for s in range(3)]
        for ev in runs:
            assert (ev.log_evidence >= ev.elbo - 1e-9).all()
            assert (ev.gap >= -1e-9).all()
        totals[k] = np.mean([ev.total() for ev in runs])
    assert totals[1] < totals[8] < totals[64]


def brute_force(model: LangevinFlow, target: torch.Tensor, mask: torch.Tensor, draws: int = 200_000,
                seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """log p(x) of the entries ``mask`` keeps, per trial, by ``draws`` prior draws (rates from the model,
    Poisson by hand), and its delta-method Monte Carlo s.e."""
    pyro.set_rng_seed(seed)
    x, keep = target.double().numpy(), mask.numpy()
    lls = []
    with torch.no_grad():
        for _ in range(draws // 50_000):
            rates = poutine.trace(model).get_trace(n_trials=50_000, n_bins=x.shape[1]).nodes["rates"]["value"]
            r = rates.double().numpy()[None]
            lls.append(np.where(keep[:, None], xlogy(x[:, None], r) - r - gammaln(x[:, None] + 1), 0.0).sum((2, 3)))
    ll = np.concatenate(lls, axis=1)
    w = np.exp(ll - logsumexp(ll, axis=1, keepdims=True))
    return logsumexp(ll, axis=1) - math.log(ll.shape[1]), np.sqrt((ll.shape[1] * (w ** 2).sum(1) - 1) / ll.shape[1])


def test_estimate_matches_brute_force_marginal_likelihood(fitted_tiny):
    """log p(x) by 2e5 prior draws against the guide's importance-sampling estimate with K = 20000:
    equal within their Monte Carlo errors."""
    model, guide, batch = fitted_tiny
    brute, brute_se = brute_force(model, batch.target, batch.mask)
    ev = log_evidence(model, guide, batch, 20_000, max_tiled=20_000, seed=0, warn=False)
    assert (ev.mc_se < 0.1).all() and (brute_se < 0.1).all()
    tol = 4 * np.sqrt(ev.mc_se ** 2 + brute_se ** 2) + 0.01
    assert np.all(np.abs(ev.log_evidence - brute) < tol), (ev.log_evidence, brute, tol)
    # the guide is a far better proposal than the prior: its ELBO is much closer to log p(x)
    prior = log_evidence(model, poutine.block(model, hide=["spikes"]), batch, 2000, seed=0, warn=False)
    assert np.all(brute - ev.elbo < 0.75 * (brute - prior.elbo))


def test_compare_ranks_the_data_generating_model_first():
    truth = tiny_model(6, 4, seed=2)
    batch = sampled_batch(truth, 30, n_obs=5, n_fwd=1, n_heldin=4, seed=2)
    wrong = copy.deepcopy(truth)
    with torch.no_grad():
        wrong.decoder.readout.bias.add_(0.5)  # every rate 1.65 times too high
    torch.manual_seed(0)
    models = {"wrong": (wrong, GRUGuide(wrong, 4, hidden=8)), "truth": (truth, GRUGuide(truth, 4, hidden=8))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = compare(models, batch, num_particles=100, seed=0)
    assert list(table.index) == ["truth", "wrong"]
    assert list(table["rank"]) == [0, 1]
    assert table.loc["truth", "d_elpd"] == 0 and table.loc["truth", "dse"] == 0
    assert table.loc["wrong", "d_elpd"] > 4 * table.loc["wrong", "dse"] > 0
    assert table.loc["truth", "bits_per_spike"] > table.loc["wrong", "bits_per_spike"]
    for col in ("elpd", "se", "d_elpd", "dse", "warning", "khat_max", "frac_khat_gt_0_7", "nats_per_spike"):
        assert col in table.columns
    assert "truth" in format_compare(table)
    # a paired difference is far tighter than the two standard errors: the point of dse
    assert table.loc["wrong", "dse"] < table.loc["truth", "se"]


def test_khat_flags_a_bad_proposal():
    model = tiny_model()
    batch = sampled_batch(model, 8, n_obs=3, n_fwd=0, n_heldin=3, seed=3)
    with pytest.warns(RuntimeWarning, match=r"k-hat > 0.67 \(ArviZ's threshold for 1000 draws\)"):
        bad = log_evidence(model, TinyScaleGuide(model), batch, 1000, seed=0)
    assert bad.flagged.mean() >= 0.75 and np.nanmax(bad.khat) > 1.0
    assert bad.to_frame()["flagged"].sum() == bad.flagged.sum()
    prior_guide = poutine.block(model, hide=["spikes"])  # the prior as proposal: weights = p(x | z), bounded
    good = log_evidence(model, prior_guide, batch, 1000, seed=0, warn=False)
    assert good.khat_threshold == pytest.approx(1 - 1 / 3) and np.all(good.khat < good.khat_threshold)
    assert good.total() > bad.total()


def test_heldout_quantity_is_the_joint_minus_the_heldin_evidence(fitted_tiny):
    model, guide, batch = fitted_tiny
    cond = log_evidence(model, guide, batch, 500, quantity="heldout", seed=0, warn=False)
    joint = log_evidence(model, guide, batch, 500, seed=0, warn=False)
    heldin = evidence_from_log_weights(cond.log_weights_heldin, warn=False)
    np.testing.assert_allclose(cond.log_weights, joint.log_weights)  # same draws
    np.testing.assert_allclose(cond.joint.log_evidence, joint.log_evidence)
    np.testing.assert_allclose(cond.joint.n_spikes, joint.n_spikes)
    back = type(cond).from_dict(json.loads(json.dumps(cond.to_dict())))
    np.testing.assert_allclose(back.log_evidence, cond.log_evidence)
    np.testing.assert_allclose(back.joint.elbo, joint.elbo)
    np.testing.assert_allclose(cond.log_evidence, joint.log_evidence - heldin.log_evidence)
    scored = batch.mask.clone()
    scored[:, :batch.n_observed_bins, :batch.n_heldin] = False
    np.testing.assert_allclose(cond.n_spikes, (batch.target * scored).sum((1, 2)).numpy())
    assert (cond.log_evidence < 0).all()


def test_log_weight_summaries_and_bad_input():
    const = evidence_from_log_weights(np.full((2, 30), -3.0), warn=False)
    np.testing.assert_allclose(const.log_evidence, -3.0)
    np.testing.assert_allclose(const.ess, 30.0)
    np.testing.assert_allclose(const.mc_se, 0.0, atol=1e-7)
    with pytest.warns(RuntimeWarning, match="at least 25 draws"):
        few = evidence_from_log_weights(np.zeros((2, 5)))
    assert np.isnan(few.khat).all() and not few.flagged.any()
    with pytest.raises(FloatingPointError, match="non-finite"):
        evidence_from_log_weights(np.array([[0.0, -np.inf]]))
    model = tiny_model()
    batch = sampled_batch(model, 2, 3, 0, 3)
    guide = GRUGuide(model, 3, hidden=4)
    with pytest.raises(ValueError, match="num_particles"):
        log_evidence(model, guide, batch, 0)
    with pytest.raises(ValueError, match="quantity"):
        log_evidence(model, guide, batch, 2, quantity="marginal")
    with pytest.raises(ValueError, match="nothing to predict"):
        log_evidence(model, guide, batch, 2, quantity="heldout")
    with pytest.raises(ValueError, match="not sampled by the guide"):
        log_evidence(model, poutine.block(guide, hide=["z_0"]), batch, 2)


def test_log_likelihood_group_lets_arviz_loo_and_waic_run():
    model = tiny_model(5, 4, seed=4)
    batch = sampled_batch(model, 4, n_obs=6, n_fwd=2, n_heldin=4, seed=4)
    guide = GRUGuide(model, 4, hidden=8)
    idata = predictive_checks(model, guide, batch, n_samples=40, seed=0)
    ll = idata.log_likelihood["spikes"]
    assert ll.dims == ("chain", "draw", "trial", "time", "neuron") and ll.shape == (1, 40, 4, 8, 5)
    rates = idata.posterior["rates"].values[0]
    x = batch.target.numpy()
    np.testing.assert_allclose(ll.values[0], xlogy(x, rates) - rates - gammaln(x + 1), rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # k-hat warnings of a 40-draw toy
        loo = az.loo(idata, pointwise=True)
        waic = az.waic(idata)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(waic.elpd_waic)
    assert loo.pareto_k.shape == (4, 8, 5)
    # leave-one-out can only lose against the in-sample log pointwise predictive density
    lppd = float(np.sum(logsumexp(ll.values[0], axis=0) - np.log(40)))
    assert loo.elpd_loo <= lppd + 1e-6
    # masked entries (unknown forward bins of evaluation trials) are NaN; select the observed block
    masked = batch.with_inputs(batch.input, batch.mask.clone().index_fill_(1, torch.tensor([6, 7]), False))
    idata_m = predictive_checks(model, guide, masked, n_samples=40, seed=0)
    assert np.isnan(idata_m.log_likelihood["spikes"].values[..., 6:, :]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert np.isfinite(az.loo(idata_m.isel(time=slice(0, 6))).elpd_loo)


def test_example_compare_quick(tmp_path):
    """examples/compare.py --quick: fits on Lorenz and on real MC_Maze_Small training trials, writes the
    table with the required columns (per fold and pooled) and the figure."""
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(root / "examples" / "compare.py"), "--quick", "--no-progress",
                           "--ais", "3", "--ais-trials", "2", "--ais-chains", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    table = pd.read_csv(out / "compare.csv")
    required = ["model", "elpd", "se", "d_elpd", "dse", "khat_max", "frac_khat_gt_0_7"]
    assert set(required) <= set(table.columns)
    assert set(table["dataset"]) == {"lorenz", "mc_maze_small"}
    pooled = table[(table["dataset"] == "mc_maze_small") & (table["fold"] == "all") & (table["quantity"] == "joint")]
    assert sorted(pooled["model"]) == ["mlp", "oscillators", "zero"] and (pooled["n_trials"] == 75).all()
    assert np.isfinite(pooled[required[1:]].to_numpy(dtype=float)).all()
    assert (out / "compare.png").is_file() and summary["figure"] == str(out / "compare.png")
    ais = json.loads((out / "ais.json").read_text())  # fold-0 fits rescored by AIS, and BDMC on simulated trials
    assert {(r["dataset"], r["prior"]) for r in ais} == {(d, p) for d in ("lorenz", "mc_maze_small")
                                                         for p in ("oscillators", "zero", "mlp")}
    assert all(r["trials"] == 2 and np.isfinite([r["ais_total"], r["bdmc_gap_total"]]).all() for r in ais)
    assert "AIS - IWAE" in (out / "ais.md").read_text()
    spread = [r for r in summary["score_spread"] if r["score"] == "co_bps" and r["dataset"] == "mc_maze_small"]
    assert {r["prior"] for r in spread} == {"zero", "mlp"} and all(len(r["per_fold"]) == 2 for r in spread)
    lorenz = {s["key"]: s for s in summary["scores"] if s["key"].startswith("lorenz/")}  # co-bps, rate R^2 per prior
    assert sorted(lorenz) == [f"lorenz/fold0/{p}" for p in ("mlp", "oscillators", "zero")]
    assert all(np.isfinite([s["co_bps"], s["rate_r2"]]).all() and s["fp_bps"] is None for s in lorenz.values())
    rerun = subprocess.run([sys.executable, str(root / "examples" / "compare.py"), "--quick", "--no-progress",
                            "--out", str(out)], capture_output=True, text=True, timeout=60, cwd=root)
    assert rerun.returncode == 2 and "--resume" in rerun.stderr  # an earlier run is never replaced silently


def _compare_example(monkeypatch):
    """examples/compare.py imported as a module (registered while the test runs: its dataclass needs it)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("example_compare", Path(__file__).parents[1] / "examples" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_lorenz_score_reads_each_trials_true_rates(monkeypatch):
    """The Lorenz score finds every scored trial's true rates by its index: rates equal to the truth
    give rate R^2 1 and NLB's bits/spike of the truth on the held-out neurons; rates of other trials do not."""
    from pyro_langevin.data.lorenz import make_lorenz
    from pyro_langevin.metrics import bits_per_spike

    example = _compare_example(monkeypatch)
    data = make_lorenz(n_conditions=6, trials_per_condition=4, n_bins=15, n_neurons=12, n_heldout=3, seed=2)
    subset = data.valid[torch.tensor([3, 0, 2])]  # out of order: rows differ from positions in data.valid
    truth = data.valid_rates[[3, 0, 2]]
    monkeypatch.setattr(example, "posterior_rates", lambda model, guide, batch, n_samples: torch.as_tensor(truth))
    scores = example.lorenz_score(data)(None, None, subset)
    assert scores["rate_r2"] == pytest.approx(1.0)
    assert scores["co_bps"] == pytest.approx(bits_per_spike(truth[..., 9:], subset.target[..., 9:].numpy()))
    assert scores["co_bps"] > 0
    assert not np.allclose(truth[0], truth[2])  # different conditions: swapping their rates must show
    monkeypatch.setattr(example, "posterior_rates", lambda model, guide, batch, n_samples: torch.as_tensor(truth[::-1].copy()))
    assert example.lorenz_score(data)(None, None, subset)["rate_r2"] < 0.9


def test_example_compare_lorenz_seeds(tmp_path):
    """--lorenz-seeds 2: Lorenz fold i is the data draw and fit of seed --seed + i (the same as a run with
    that seed), and score_spread gives each prior's co-bps and rate R^2 differences per seed; --ais on
    another fold with --resume adds to ais.json, and ais_spread spans both folds."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(*extra: str) -> dict:
        proc = subprocess.run([sys.executable, str(root / "examples" / "compare.py"), "--quick", "--no-progress",
                               "--datasets", "lorenz", "--priors", "oscillators,zero", "--particles", "30", *extra],
                              capture_output=True, text=True, timeout=120, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ais = ("--ais", "3", "--ais-trials", "2", "--ais-chains", "2", "--no-bdmc")
    first = run("--lorenz-seeds", "2", "--seed", "3", "--out", str(tmp_path / "both"), *ais, "--ais-folds", "0")
    both = run("--lorenz-seeds", "2", "--seed", "3", "--out", str(tmp_path / "both"), *ais, "--ais-folds", "1",
               "--resume")
    alone = run("--seed", "4", "--out", str(tmp_path / "alone"))
    scores = {s["key"]: s for s in both["scores"]}
    for prior in ("oscillators", "zero"):
        again = next(s for s in alone["scores"] if s["key"] == f"lorenz/fold0/{prior}")
        assert scores[f"lorenz/fold1/{prior}"]["co_bps"] == pytest.approx(again["co_bps"], abs=1e-6)
        assert scores[f"lorenz/fold1/{prior}"]["rate_r2"] == pytest.approx(again["rate_r2"], abs=1e-6)
    assert scores["lorenz/fold0/oscillators"]["co_bps"] != scores["lorenz/fold1/oscillators"]["co_bps"]
    spread = {r["score"]: r for r in both["score_spread"]}
    assert set(spread) == {"co_bps", "rate_r2"} and all(r["prior"] == "zero" for r in spread.values())
    for name, r in spread.items():
        diffs = [scores[f"lorenz/fold{f}/oscillators"][name] - scores[f"lorenz/fold{f}/zero"][name] for f in (0, 1)]
        assert r["per_fold"] == pytest.approx(diffs) and r["mean"] == pytest.approx(np.mean(diffs))
        assert r["se_folds"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(2))
    # AIS: the resumed run keeps fold 0's rows and adds fold 1's; the spread over the two folds is theirs
    assert [(r["fold"], r["prior"]) for r in both["ais"]] == [(f, p) for f in (0, 1) for p in ("oscillators", "zero")]
    assert both["ais"][:2] == first["ais"]
    totals = {(r["fold"], r["prior"]): r["ais_total"] for r in both["ais"]}
    mean = next(r for r in both["ais_spread"] if r["method"] == "ais" and r["fold"] == "mean")
    assert mean["n_folds"] == 2 and mean["d_elpd"] == pytest.approx(
        np.mean([totals[f, "oscillators"] - totals[f, "zero"] for f in (0, 1)]))


# ----- annealed importance sampling and bidirectional Monte Carlo ----------------------------------
#: Many short HMC moves: on the tiny model 250 temperatures of 2 leapfrog steps beat 100 of 5 or 50 of 10.
AIS = {"num_leapfrog": 2, "adapt_chains": 4}


def equal_compute_draws(num_chains: int, num_steps: int, num_leapfrog: int = 2, adapt_chains: int = 4) -> int:
    """IWAE draws costing at least what AIS costs: each gradient evaluation (``L + 1`` per transition)
    counted as three model + guide passes (a forward and a backward), the pilot chains as if they ran
    the full schedule (they run at most 100 temperatures): generous to the IWAE."""
    return 3 * (num_chains + adapt_chains) * (num_steps - 1) * (num_leapfrog + 1)


def test_ais_is_unbiased_where_iwae_of_an_unfitted_guide_is_not():
    """An unfitted proposal (the prior mean with a third of its scale) on 8 trials: at equal compute
    the IWAE is visibly low; AIS from the same guide lands on the brute-force log p(x) within its
    Monte Carlo error, with a total error several times smaller."""
    model = tiny_model()
    batch = sampled_batch(model, 8, n_obs=3, n_fwd=1, n_heldin=2, seed=1)
    guide = TinyScaleGuide(model, scale=0.3)
    brute, brute_se = brute_force(model, batch.target, batch.mask)
    ais = log_evidence(model, guide, batch, 10, method="ais", num_steps=250, ais_options=AIS, seed=0, warn=False)
    k = equal_compute_draws(10, 250)
    iwae = log_evidence(model, guide, batch, k, max_tiled=k * 8, seed=0, warn=False)
    assert ais.method == "ais" and ais.num_steps == 250 and ais.num_particles == 10 and ais.spread.shape == (8,)
    ais_err, iwae_err = ais.log_evidence - brute, iwae.log_evidence - brute
    assert iwae_err.sum() < -3.0 and iwae.flagged.all()  # the IWAE's bias dwarfs its Monte Carlo error
    assert abs(ais_err.sum()) < abs(iwae_err.sum()) / 5, (ais_err, iwae_err)
    assert abs(ais_err.sum()) < 3 * math.sqrt(np.sum(ais.mc_se ** 2 + brute_se ** 2)), (ais_err, ais.mc_se)


def test_bdmc_bounds_bracket_the_brute_force_evidence():
    """Forward AIS (lower) and reverse AIS from the true latent path (upper) of trials simulated from
    the model bracket the brute-force log p(x) within their Monte Carlo errors; the IWAE's bias at
    K = 100 lies below the bracket's width."""
    from pyro_langevin.bdmc import bdmc, simulate_trials

    model = tiny_model()
    template = sampled_batch(model, 4, n_obs=3, n_fwd=1, n_heldin=2, seed=5)
    guide = TinyScaleGuide(model, scale=0.3)
    res = bdmc(model, guide, template, num_chains=10, num_steps=150, iwae_particles=(100,), ais_options=AIS, seed=3)
    torch.manual_seed(3)  # bdmc's first draws are the simulation
    sim, latents = simulate_trials(model, template)
    assert set(latents) == {"z_0", "v_0", "v_1", "v_2", "v_3"} and torch.equal(sim.mask, template.mask)
    brute, brute_se = brute_force(model, sim.target, sim.mask)
    lo_se, hi_se = np.sqrt(res.lower.mc_se ** 2 + brute_se ** 2), np.sqrt(res.upper_mc_se ** 2 + brute_se ** 2)
    assert np.all(res.lower.log_evidence - brute < 3 * lo_se + 0.05), (res.lower.log_evidence - brute, lo_se)
    assert np.all(brute - res.upper < 3 * hi_se + 0.05), (res.upper - brute, hi_se)
    assert res.gap.sum() < 2.0 and res.summary()["n_trials"] == 4
    low, high = res.iwae_bias(100)
    assert np.all(low <= high + 1e-9) or res.gap.min() < 0  # a negative gap (Monte Carlo noise) swaps them
    assert high.sum() < -1.0  # the unfitted guide's IWAE at K = 100 is low by more than a nat in total
    assert set(res.seconds) == {"forward", "reverse", "iwae_100"}


def test_masks_and_several_chunks_match_brute_force(fitted_tiny):
    """A mask that drops scattered entries (held-in ones too), trials in several chunks and draws or
    chains in several passes per chunk: IWAE and AIS still estimate the masked log p(x)."""
    model, guide, batch = fitted_tiny
    mask = batch.mask.clone()
    mask[0, 0, 0] = mask[1, 2, 1] = mask[2, 3, :] = mask[1, :, 2] = False
    masked = batch.with_inputs(batch.input, mask)
    brute, brute_se = brute_force(model, masked.target, masked.mask)
    iwae = log_evidence(model, guide, masked, 4000, batch_size=1, max_tiled=1000, seed=0, warn=False)
    np.testing.assert_allclose(iwae.n_spikes, (masked.target * mask).sum((1, 2)).numpy())
    assert np.all(np.abs(iwae.log_evidence - brute) < 4 * np.sqrt(iwae.mc_se ** 2 + brute_se ** 2) + 0.02)
    ais = log_evidence(model, guide, masked, 20, method="ais", num_steps=30, batch_size=2, max_tiled=20,
                       ais_options=AIS, seed=0, warn=False)  # chunks of 2 + 1 trials, 10 + 10 chains per chunk
    assert ais.log_weights.shape == (3, 20)
    assert np.all(np.abs(ais.log_evidence - brute) < 4 * np.sqrt(ais.mc_se ** 2 + brute_se ** 2) + 0.05)


def test_dropout_is_off_even_through_a_wrapper_that_is_not_a_module():
    """Model and guide with dropout, in training mode, reached only through plain functions: the
    evidence equals that of the same modules in eval mode, and their modes are restored."""
    from functools import partial

    torch.manual_seed(0)
    model = LangevinFlow(3, latent_dim=2, dt=0.2, potential="quadratic", decoder_kwargs={**TINY_DECODER, "dropout": 0.5})
    guide = GRUGuide(model, 2, hidden=8, dropout=0.5)
    batch = sampled_batch(tiny_model(3, 2), 3, n_obs=4, n_fwd=1, n_heldin=2, seed=0)
    wrapped_model = partial(lambda m, *a, **k: m(*a, **k), model)
    wrapped_guide = lambda b: guide(b)  # noqa: E731 - a closure is the case being tested
    model.train(), guide.train()
    ev = log_evidence(wrapped_model, wrapped_guide, batch, 64, seed=0, warn=False)
    assert model.training and guide.training and model.decoder.training  # restored
    with torch.no_grad():
        torch.manual_seed(0)
        noisy, _ = trial_log_weights(wrapped_model, wrapped_guide, batch, 64)  # no eval mode: dropout on
    model.eval(), guide.eval()
    ref = log_evidence(model, guide, batch, 64, seed=0, warn=False)
    np.testing.assert_allclose(ev.log_weights, ref.log_weights, rtol=1e-5, atol=1e-4)
    assert not np.allclose(noisy.numpy(), ref.log_weights, atol=1e-2)


def test_heldout_quantities_match_brute_force(fitted_tiny):
    """``heldout`` = log p(x) - log p(x_heldin) (held-out neurons AND forward bins) and
    ``heldout_neurons`` = log p(x_obs) - log p(x_heldin) in the observed bins only, against prior
    draws; by IWAE (same draws) and AIS (two runs)."""
    model, guide, batch = fitted_tiny
    t, n_in = batch.n_observed_bins, batch.n_heldin
    heldin = torch.zeros_like(batch.mask)
    heldin[:, :t, :n_in] = True
    observed = torch.zeros_like(batch.mask)
    observed[:, :t] = True
    (joint, se_j), (held, se_h), (obs, se_o) = (brute_force(model, batch.target, m & batch.mask)
                                                for m in (torch.ones_like(heldin), heldin, observed))
    truth = {"heldout": (joint - held, np.hypot(se_j, se_h)), "heldout_neurons": (obs - held, np.hypot(se_o, se_h))}
    for quantity, (value, se) in truth.items():
        ev = log_evidence(model, guide, batch, 20_000, quantity=quantity, max_tiled=20_000, seed=0, warn=False)
        assert ev.quantity == quantity
        assert np.all(np.abs(ev.log_evidence - value) < 4 * np.hypot(ev.mc_se, se) + 0.02), (quantity, ev.log_evidence, value)
    scored = torch.zeros_like(batch.mask)
    scored[:, :t, n_in:] = True
    np.testing.assert_allclose(ev.n_spikes, (batch.target * scored).sum((1, 2)).numpy())
    assert ev.joint is None and not np.allclose(truth["heldout"][0], truth["heldout_neurons"][0], atol=0.5)
    ais = log_evidence(model, guide, batch, 30, method="ais", num_steps=20, quantity="heldout_neurons",
                       ais_options=AIS, seed=0, warn=False)
    value, se = truth["heldout_neurons"]
    assert ais.log_weights_heldin.shape == (3, 30)
    assert np.all(np.abs(ais.log_evidence - value) < 4 * np.hypot(ais.mc_se, se) + 0.05), (ais.log_evidence, value)


def _evidence(values: np.ndarray, **meta) -> Evidence:
    """An Evidence whose per-trial estimates are ``values`` (30 equal log weights per trial, k-hat 0)."""
    ev = evidence_from_log_weights(np.repeat(np.asarray(values, float)[:, None], 30, axis=1), warn=False)
    return replace(ev, **{"layout": (3, 1, 2, 1), "khat": np.zeros(len(values)), **meta})


def test_compare_refuses_evidences_that_are_not_on_the_same_footing():
    base = _evidence([-1.0, -2.0, -3.0], bin_ms=20.0, units=(1, 2, 3))
    assert list(compare({"a": base, "b": replace(base, log_evidence=base.log_evidence - 1)}).index) == ["a", "b"]
    others = {
        "trials": replace(base, trial=np.array([0, 1, 5])),
        "quantity": replace(base, quantity="heldout"),
        "method": replace(base, method="ais", num_steps=100),
        "bin width": replace(base, bin_ms=5.0),
        "units": replace(base, units=(1, 2, 4)),
        "layout": replace(base, layout=(3, 1, 1, 2)),
    }
    for what, other in others.items():
        with pytest.raises(ValueError, match=f"'b' differs from 'a' in {what}"):
            compare({"a": base, "b": other})
    with pytest.raises(ValueError, match="in quantity.*in bin width") as err:  # every difference, in one error
        compare({"a": base, "b": replace(base, quantity="heldout", bin_ms=5.0)})
    assert str(err.value).count("differs") == 2


def test_compare_folds_reports_fold_level_spread():
    rng = np.random.default_rng(0)
    diffs = [30.0, -10.0, 50.0, 20.0]  # per fold: osc - zero, summed over 5 trials
    folds = {}
    for i, d in enumerate(diffs):
        osc = rng.normal(-100, 5, size=5)
        noise = rng.normal(0, 1, size=5)
        zero = osc - d / 5 + noise - noise.mean()  # trial-level scatter, the fold's difference exact
        folds[(i // 2, i % 2)] = {"osc": _evidence(osc, trial=np.arange(5) + 5 * i), "zero": _evidence(zero, trial=np.arange(5) + 5 * i)}
    table = compare_folds(folds)
    per_fold = table[table["fold"] != "mean"]
    np.testing.assert_allclose(per_fold["d_elpd"], diffs)
    mean = table[table["fold"] == "mean"].iloc[0]
    assert mean["reference"] == "osc" and mean["n_folds"] == 4 and mean["n_positive"] == 3
    assert mean["d_elpd"] == pytest.approx(np.mean(diffs))
    assert mean["se_folds"] == pytest.approx(np.std(diffs, ddof=1) / 2)
    assert "fit-level" in table.attrs["uncertainty"]["se_folds"] and "trial-level" in table.attrs["uncertainty"]["dse"]
    with pytest.raises(ValueError, match="differs from fold"):
        compare_folds({**folds, "x": {k: replace(v, bin_ms=5.0) for k, v in folds[(0, 0)].items()}})


def test_khat_threshold_is_arviz_s():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(10_000) == KHAT_THRESHOLD == 0.7
    assert khat_threshold(10) == 0.0
    ev = _evidence([-1.0, -2.0])
    ev = replace(ev, khat=np.array([0.6, 0.3]), num_particles=100)
    assert ev.flagged.tolist() == [True, False]
    with pytest.warns(RuntimeWarning, match=r"k-hat > 0.50 \(ArviZ's threshold for 100 draws\) for 1 of 2"):
        table = compare({"a": ev})
    assert table.loc["a", "frac_flagged"] == 0.5 and table.loc["a", "frac_khat_gt_0_7"] == 0.0
