"""Synthetic Lorenz-driven spiking populations (LFADS-style), with ground-truth rates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyro_langevin.batch import Batch, make_batch

__all__ = ["LorenzData", "make_lorenz", "lorenz_trajectories"]


def _lorenz_rhs(x: np.ndarray, sigma: float, rho: float, beta: float) -> np.ndarray:
    dx = sigma * (x[..., 1] - x[..., 0])
    dy = x[..., 0] * (rho - x[..., 2]) - x[..., 1]
    dz = x[..., 0] * x[..., 1] - beta * x[..., 2]
    return np.stack([dx, dy, dz], axis=-1)


def lorenz_trajectories(
    x0: np.ndarray,
    n_steps: int,
    dt: float,
    sigma: float = 10.0,
    rho: float = 28.0,
    beta: float = 8.0 / 3.0,
) -> np.ndarray:
    """Integrate the Lorenz system with classical RK4 from each row of ``x0`` (shape (n, 3)).

    Returns an array of shape (n, n_steps, 3) whose first entry is ``x0``.
    """
    out = np.empty((x0.shape[0], n_steps, 3))
    x = np.asarray(x0, dtype=np.float64)
    f = lambda y: _lorenz_rhs(y, sigma, rho, beta)  # noqa: E731
    for i in range(n_steps):
        out[:, i] = x
        k1 = f(x)
        k2 = f(x + 0.5 * dt * k1)
        k3 = f(x + 0.5 * dt * k2)
        k4 = f(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return out


@dataclass
class LorenzData:
    """A Lorenz spiking dataset split into training and validation trials.

    Attributes
    ----------
    train, valid : Batch
        Spike counts in the batch contract (all neurons held in unless ``n_heldout`` was set).
    train_rates, valid_rates : ndarray, shape (trial, bins, neurons)
        True expected counts per bin.
    train_latents, valid_latents : ndarray, shape (trial, bins, 3)
        Standardised Lorenz states.
    readout : ndarray, shape (3, neurons)
    bias : ndarray, shape (neurons,)
    """

    train: Batch
    valid: Batch
    train_rates: np.ndarray
    valid_rates: np.ndarray
    train_latents: np.ndarray
    valid_latents: np.ndarray
    readout: np.ndarray
    bias: np.ndarray


def make_lorenz(
    n_conditions: int = 100,
    trials_per_condition: int = 10,
    n_bins: int = 50,
    n_neurons: int = 30,
    n_heldout: int = 0,
    steps_per_bin: int = 5,
    dt: float = 0.006,
    base_rate: float = 0.5,
    gain: float = 1.0,
    valid_fraction: float = 0.2,
    burn_in: int = 500,
    seed: int = 0,
) -> LorenzData:
    """Generate an LFADS-style Lorenz spiking dataset, deterministic given ``seed``.

    A 3-D Lorenz system (sigma 10, rho 28, beta 8/3) is integrated with RK4 (step ``dt``) from
    ``n_conditions`` initial conditions taken on the attractor (a random start run for ``burn_in``
    steps). States are sampled every ``steps_per_bin`` steps for ``n_bins`` bins (defaults: 50 bins
    of 0.03 time units, about two turns around a lobe), standardised per dimension over the whole
    set, and mapped to log-rates of ``n_neurons`` neurons::

        log rate = log(base_rate) + gain * w_n . x

    with a random unit-norm readout direction ``w_n`` per neuron (every neuron equally modulated),
    so rates are expected counts per bin with median about ``base_rate``. Each condition is repeated
    in ``trials_per_condition`` trials with independent Poisson counts. A random ``valid_fraction``
    of trials is the validation set. With ``n_heldout > 0`` the last ``n_heldout`` neurons are held
    out: the guide does not read them, the likelihood scores them.

    Returns
    -------
    LorenzData
    """
    if n_heldout >= n_neurons:
        raise ValueError(f"n_heldout={n_heldout} must be smaller than n_neurons={n_neurons}")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    rng = np.random.default_rng(seed)
    start = rng.uniform(-15, 15, size=(n_conditions, 3)) + np.array([0.0, 0.0, 25.0])
    on_attractor = lorenz_trajectories(start, burn_in + 1, dt)[:, -1]
    path = lorenz_trajectories(on_attractor, n_bins * steps_per_bin, dt)[:, ::steps_per_bin]
    latents = (path - path.mean(axis=(0, 1))) / path.std(axis=(0, 1))
    readout = rng.normal(size=(3, n_neurons))
    readout /= np.linalg.norm(readout, axis=0, keepdims=True)
    bias = np.full(n_neurons, np.log(base_rate))
    log_rates = bias + gain * latents @ readout
    rates = np.repeat(np.exp(log_rates), trials_per_condition, axis=0)
    latents = np.repeat(latents, trials_per_condition, axis=0)
    counts = rng.poisson(rates).astype(np.float32)

    n_trials = counts.shape[0]
    order = rng.permutation(n_trials)
    n_valid = max(1, int(round(valid_fraction * n_trials)))
    valid_idx, train_idx = np.sort(order[:n_valid]), np.sort(order[n_valid:])
    n_in = n_neurons - n_heldout

    def batch(idx: np.ndarray) -> Batch:
        c = counts[idx]
        return make_batch(c[..., :n_in], c[..., n_in:] if n_heldout else None, index=idx)

    return LorenzData(
        train=batch(train_idx),
        valid=batch(valid_idx),
        train_rates=rates[train_idx],
        valid_rates=rates[valid_idx],
        train_latents=latents[train_idx],
        valid_latents=latents[valid_idx],
        readout=readout,
        bias=bias,
    )
