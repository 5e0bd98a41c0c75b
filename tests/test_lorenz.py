"""The Lorenz generator and the main example, end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin.data.lorenz import lorenz_trajectories, make_lorenz
from pyro_langevin.metrics import rate_r2

ROOT = Path(__file__).resolve().parents[1]


def test_generator_is_deterministic_and_has_the_documented_shapes():
    a = make_lorenz(n_conditions=6, trials_per_condition=5, n_bins=20, n_neurons=9, n_heldout=2, seed=4)
    b = make_lorenz(n_conditions=6, trials_per_condition=5, n_bins=20, n_neurons=9, n_heldout=2, seed=4)
    c = make_lorenz(n_conditions=6, trials_per_condition=5, n_bins=20, n_neurons=9, n_heldout=2, seed=5)
    assert torch.equal(a.train.target, b.train.target) and np.array_equal(a.valid_rates, b.valid_rates)
    assert not torch.equal(a.train.target, c.train.target)
    n_valid = 6  # 20% of 30 trials
    assert (a.train.n_trials, a.valid.n_trials) == (30 - n_valid, n_valid)
    assert a.train.input.shape == (24, 20, 7) and a.train.target.shape == (24, 20, 9)
    assert a.train_rates.shape == (24, 20, 9) and a.valid_latents.shape == (n_valid, 20, 3)
    assert a.readout.shape == (3, 9) and np.allclose(np.linalg.norm(a.readout, axis=0), 1.0)
    # train and valid are disjoint trials; the validation set is never trained on
    assert not set(a.train.index.tolist()) & set(a.valid.index.tolist())
    # latents are standardised over the whole set, counts are Poisson draws around the rates
    all_latents = np.concatenate([a.train_latents, a.valid_latents])
    assert np.allclose(all_latents.mean((0, 1)), 0, atol=1e-6) and np.allclose(all_latents.std((0, 1)), 1, atol=1e-6)
    counts = a.train.target.numpy()
    assert np.all(counts == np.round(counts)) and abs(counts.mean() / a.train_rates.mean() - 1) < 0.1


def test_rk4_matches_a_fixed_point_and_is_chaotic():
    rho, beta = 28.0, 8.0 / 3.0
    fp = np.array([[np.sqrt(beta * (rho - 1)), np.sqrt(beta * (rho - 1)), rho - 1]])
    assert np.allclose(lorenz_trajectories(fp, 50, 0.01)[0, -1], fp[0], atol=1e-8)
    x = lorenz_trajectories(np.array([[1.0, 1.0, 20.0], [1.0 + 1e-6, 1.0, 20.0]]), 3000, 0.01)
    assert np.abs(x[0, -1] - x[1, -1]).max() > 1.0  # nearby starts separate


def test_rate_r2_uses_true_rates_as_reference():
    rng = np.random.default_rng(0)
    true = rng.gamma(2.0, size=(4, 10, 3))
    assert rate_r2(true, true) == 1.0
    assert rate_r2(true, np.broadcast_to(true.mean((0, 1)), true.shape)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        rate_r2(true, true[:, :5])


def test_lorenz_example_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lorenz.py"), "--quick", "--epochs", "3", "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])  # the last line is the metrics JSON
    saved = json.loads((out / "metrics.json").read_text())
    assert printed == saved
    for key in ("langevinflow", "smoothing"):
        assert np.isfinite(saved[key]["rate_r2"])
    assert saved["epochs"] == 3 and saved["device"] == "cpu"
    png = (out / "lorenz.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "checkpoints" / "best.pt").exists()
