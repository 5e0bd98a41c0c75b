"""The GPU path (issue 12): fit, resume with the CUDA RNG state, posterior draws, predictive checks, NLB export.

Every test needs a CUDA device and skips cleanly without one. To check the tests' own logic on a
machine without a GPU, run them on the CPU (the CUDA-specific assertions are then skipped)::

    PYRO_LANGEVIN_TEST_DEVICE=cpu python -m pytest -q tests/test_cuda.py

Tiny models (latent 4, 12 bins, 6 neurons) keep the module to seconds once the GPU is up.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pyro_langevin.checkpoints import load_checkpoint
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.posterior import posterior_means
from pyro_langevin.training import FitConfig, fit

DEVICE = torch.device(os.environ.get("PYRO_LANGEVIN_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
requires_device = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)
DECODER = dict(d_model=8, n_heads=2, dim_feedforward=16)


@pytest.fixture(scope="module")
def data():
    return make_lorenz(n_conditions=2, trials_per_condition=5, n_bins=12, n_neurons=6, n_heldout=2, valid_fraction=0.2)


def build(seed: int = 0) -> tuple[LangevinFlow, GRUGuide]:
    """A tiny model and guide, built on the CPU (``fit`` moves them to its device)."""
    torch.manual_seed(seed)
    model = LangevinFlow(6, 4, potential="quadratic", decoder_kwargs=DECODER)
    return model, GRUGuide(model, 4, hidden=8)


def config(epochs: int) -> FitConfig:
    # coordinated dropout and the guide's draws both use the device's random stream
    return FitConfig(epochs=epochs, batch_size=4, cd_keep=0.7, kl_ramp=4 / epochs, weight_decay_ramp=4 / epochs)


def on_device(module: torch.nn.Module) -> bool:
    return all(p.device.type == DEVICE.type for p in module.parameters())


@requires_device
def test_fit_runs_on_the_device(data):
    model, guide = build()
    result = fit(model, guide, data.train, data.valid, config(2), device=DEVICE, progress=False)
    assert on_device(model) and on_device(guide)
    assert len(result.history) == 2 and np.isfinite([r["loss"] for r in result.history]).all()
    assert np.isfinite(result.history[-1]["val_loss"])


@requires_device
def test_resume_restores_the_device_random_stream(data, tmp_path):
    """Interrupted at epoch 2 and resumed to 4: the same parameters and the same CUDA RNG state."""
    # cuDNN's GRU backward may pick non-deterministic kernels; ask for deterministic ones
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        m1, g1 = build()
        fit(m1, g1, data.train, None, config(4), device=DEVICE, progress=False, checkpoint_dir=tmp_path / "a")
        m2, g2 = build()
        fit(m2, g2, data.train, None, config(2), device=DEVICE, progress=False, checkpoint_dir=tmp_path / "b")
        m3, g3 = build(seed=123)  # other initial values: everything must come from the checkpoint
        fit(m3, g3, data.train, None, config(4), device=DEVICE, progress=False, checkpoint_dir=tmp_path / "b",
            resume=tmp_path / "b" / "last.pt")
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    if ON_CUDA:
        # the same number of device draws of the same sizes since the start: the same Philox state
        assert a["rng"]["cuda"] is not None and len(a["rng"]["cuda"]) == len(b["rng"]["cuda"])
        assert all(torch.equal(x, y) for x, y in zip(a["rng"]["cuda"], b["rng"]["cuda"]))
    for key in ("model", "guide"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, atol=1e-5, rtol=1e-4, msg=f"{key}.{name}")
    torch.testing.assert_close(m3.state_dict(), m1.state_dict(), atol=1e-5, rtol=1e-4)


@requires_device
def test_posterior_draws_on_the_device(data):
    model, guide = build()
    fit(model, guide, data.train, None, config(1), device=DEVICE, progress=False)
    batch = data.valid.to(DEVICE)
    torch.manual_seed(5)
    vec = posterior_means(model, guide, batch, ("rates", "z"), n_samples=200, max_tiled=1000, return_std=True)
    torch.manual_seed(5)
    again = posterior_means(model, guide, batch, ("rates", "z"), n_samples=200, max_tiled=1000, return_std=True)
    loop = posterior_means(model, guide, batch, ("rates", "z"), n_samples=200, draws_per_pass=1, return_std=True)
    assert vec["rates"].device.type == "cpu" and vec["rates"].shape == (len(batch), 12, 6)
    for site in ("rates", "z", "rates_std", "z_std"):
        assert torch.isfinite(vec[site]).all()
        # the same seed gives the same draws (to float tolerance: GPU kernels may reduce in any order)
        torch.testing.assert_close(vec[site], again[site], atol=1e-6, rtol=1e-6)
    se = (2.0 / 200) ** 0.5 * loop["z_std"]
    assert bool(((vec["z"] - loop["z"]).abs() <= 6 * se + 1e-4).all())


@requires_device
def test_predictive_checks_on_the_device(data):
    from pyro_langevin.predictive import predictive_checks

    model, guide = build()
    fit(model, guide, data.train, None, config(1), device=DEVICE, progress=False)
    batch = data.valid.to(DEVICE)
    idata = predictive_checks(model, guide, batch, n_samples=4, sample_chunk=2)
    for group in ("prior", "prior_predictive", "posterior", "posterior_predictive", "observed_data"):
        assert group in idata.groups(), group
    spikes = idata.posterior_predictive["spikes"].values
    assert spikes.shape[-3:] == (len(batch), 12, 6) and spikes.shape[1] == 4
    assert np.isfinite(idata.posterior["rates"].values).all() and (spikes >= 0).all()


@requires_device
def test_nlb_export_on_the_device(tmp_path):
    pytest.importorskip("pynwb")
    pytest.importorskip("nlb_tools")
    from nwb_factory import make_dandi_dataset

    from pyro_langevin.nlb.pipeline import run_nlb
    from pyro_langevin.nlb.request import NLBRequest

    root = tmp_path / "dandi"
    make_dandi_dataset(root, "mc_maze", n_train=24, n_val=8, n_test=4, n_heldin=10, n_heldout=4)
    out = tmp_path / "run"
    metrics = run_nlb(NLBRequest("mc_maze", root, bin_ms=20, phase="val", out=out, epochs=1, device=str(DEVICE),
                                 quick=True, progress=False), log=lambda line: None)
    assert metrics["epochs_run"] == 1
    assert np.isfinite(metrics["eval"]["model"]["co-bps"]) and np.isfinite(metrics["local"]["model"]["co-bps"])
    assert (out / "submission.h5").is_file()
    assert json.loads((out / "metrics.json").read_text())["eval"] == metrics["eval"]
