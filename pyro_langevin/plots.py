"""Figures for fitted models (matplotlib, written to files; no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

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
    r2: Optional[Mapping[str, float]] = None,
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
    r2 : mapping, optional
        Headline scores for the title, e.g. ``{"LangevinFlow": 0.977, "smoothing": 0.655}`` (rate R^2).
    """
    trials = [t for t in trials if t < true_rates.shape[0]]
    neurons = [n for n in neurons if n < true_rates.shape[2]]
    n_cols = 2 if true_latents is not None else 1
    fig = plt.figure(figsize=(4 * len(trials), 2.2 * len(neurons) + 4.5), constrained_layout=True)
    grid = fig.add_gridspec(len(neurons) + 2, len(trials))
    t_axis = np.arange(true_rates.shape[1])
    colours = [f"C{k}" for k in range(len(trials))]
    for j, trial in enumerate(trials):
        for i, n in enumerate(neurons):
            ax = fig.add_subplot(grid[i, j])
            ax.bar(t_axis, spikes[trial, :, n], color="0.85", width=1.0, label="spike count")
            ax.plot(t_axis, true_rates[trial, :, n], "k", lw=2, label="true rate")
            ax.plot(t_axis, inferred_rates[trial, :, n], "C3", lw=1.5, label="LangevinFlow (posterior mean)")
            if baseline_rates is not None:
                ax.plot(t_axis, baseline_rates[trial, :, n], "C0", lw=0.8, label="smoothed spikes (baseline)")
            ax.set_title(f"trial {trial}, neuron {n}", fontsize=10, color=colours[j] if i == 0 else "k")
            ax.tick_params(labelsize=8)
            if i == len(neurons) - 1:
                ax.set_xlabel("time bin", fontsize=9)
            if j == 0:
                ax.set_ylabel("counts / bin", fontsize=9)
            if i == 0 and j == len(trials) - 1:
                ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    bottom = grid[len(neurons) :, :].subgridspec(1, n_cols)
    _latent_panel(fig.add_subplot(bottom[0, 0], projection="3d"), _top_components(latents), trials, colours,
                  "inferred latents z (top 3 principal components)", ("PC 1", "PC 2", "PC 3"))
    if true_latents is not None:
        _latent_panel(fig.add_subplot(bottom[0, 1], projection="3d"), true_latents, trials, colours,
                      "true Lorenz states", ("x", "y", "z"))
    title = "Firing rates and latents on validation trials"
    if r2:
        title += ": rate R\u00b2 " + ", ".join(f"{k} {v:.3f}" for k, v in r2.items())
    fig.suptitle(title, fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latent_panel(ax, paths: np.ndarray, trials: Sequence[int], colours: Sequence[str], title: str,
                  labels: Sequence[str]) -> None:
    """3-D trajectories of ``trials``, one colour per trial (as in the rate panels' titles)."""
    for trial, colour in zip(trials, colours):
        ax.plot(*paths[trial].T, lw=1.2, color=colour, label=f"trial {trial}")
        ax.scatter(*paths[trial, 0], color=colour, s=12)  # the start of each trajectory
    for set_label, text in zip((ax.set_xlabel, ax.set_ylabel, ax.set_zlabel), labels):
        set_label(text, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_title(title + " (dot: start)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
