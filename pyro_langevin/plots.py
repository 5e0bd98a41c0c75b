"""Figures for fitted models (matplotlib, written to files; no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_rates_and_latents"]


def _top_components(x: np.ndarray, k: int = 3) -> np.ndarray:
    """Project (trial, time, D) onto its first ``k`` principal components."""
    flat = x.reshape(-1, x.shape[-1])
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    return (flat @ vt[:k].T).reshape(*x.shape[:2], -1)


def plot_rates_and_latents(
    path: Union[str, Path],
    true_rates: np.ndarray,
    inferred_rates: np.ndarray,
    spikes: np.ndarray,
    latents: np.ndarray,
    true_latents: Optional[np.ndarray] = None,
    trials: Sequence[int] = (0, 1, 2),
    neurons: Sequence[int] = (0, 1, 2, 3),
    baseline_rates: Optional[np.ndarray] = None,
) -> Path:
    """Save a figure: true vs inferred rates for a few neurons and trials, and latent trajectories.

    Parameters
    ----------
    path : path of the PNG to write.
    true_rates, inferred_rates, spikes : arrays, shape (trial, time, neuron), counts per bin.
    latents : array, shape (trial, time, D)
        Inferred latent positions; shown as their first three principal components.
    true_latents : array, shape (trial, time, 3), optional
        Ground-truth latent states, drawn beside the inferred ones.
    baseline_rates : array, optional
        A baseline's rates (e.g. smoothed spikes), drawn thin for comparison.
    """
    trials = [t for t in trials if t < true_rates.shape[0]]
    neurons = [n for n in neurons if n < true_rates.shape[2]]
    n_cols = 2 if true_latents is not None else 1
    fig = plt.figure(figsize=(4 * len(trials), 2.2 * len(neurons) + 4 * 1.0), constrained_layout=True)
    grid = fig.add_gridspec(len(neurons) + 2, len(trials))
    t_axis = np.arange(true_rates.shape[1])
    for j, trial in enumerate(trials):
        for i, n in enumerate(neurons):
            ax = fig.add_subplot(grid[i, j])
            ax.bar(t_axis, spikes[trial, :, n], color="0.85", width=1.0, label="spikes")
            ax.plot(t_axis, true_rates[trial, :, n], "k", lw=2, label="true rate")
            ax.plot(t_axis, inferred_rates[trial, :, n], "C3", lw=1.5, label="LangevinFlow")
            if baseline_rates is not None:
                ax.plot(t_axis, baseline_rates[trial, :, n], "C0", lw=0.8, label="smoothing")
            ax.set_title(f"trial {trial}, neuron {n}", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="upper right")
            if i == len(neurons) - 1:
                ax.set_xlabel("bin")
            if j == 0:
                ax.set_ylabel("counts / bin")
    pcs = _top_components(latents)
    bottom = grid[len(neurons) :, :].subgridspec(1, n_cols)
    ax = fig.add_subplot(bottom[0, 0], projection="3d")
    for trial in trials:
        ax.plot(*pcs[trial].T, lw=1)
    ax.set_title("inferred latents z (top 3 PCs)", fontsize=9)
    if true_latents is not None:
        ax = fig.add_subplot(bottom[0, 1], projection="3d")
        for trial in trials:
            ax.plot(*true_latents[trial].T, lw=1)
        ax.set_title("true Lorenz states", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
