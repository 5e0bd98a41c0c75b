"""A family of synthetic lab recordings with known rates: the truth the recipe search and the
recordings benchmark are checked against.

:func:`make_recording` draws one recording of a kind of :data:`KINDS`:

* ``"lorenz"``: a chaotic attractor (the 3-D Lorenz system), one initial condition per condition,
  every trial of a condition on the same path (LFADS's synthetic benchmark);
* ``"rotation"``: rotational dynamics, a 2-D damped rotation at ``freq_hz`` (3 Hz by default)
  embedded with a slow third direction, the initial phase and amplitude set by the condition and
  perturbed by latent noise on every trial (so single trials differ);
* ``"pulses"``: input-driven dynamics, a 3-D stable linear system kicked by two input pulses at
  trial-specific times (uniform over the trial's first and second halves), the pulses' direction
  set by the condition: what happens when is known only from the trial's own spikes.

The latent path is integrated on a 1 ms grid over ``n_bins * bin_ms`` ms, standardised, and read
out log-linearly: unit ``n`` fires at ``base_n * exp(gain_n * (w_n . x - min_n))`` Hz, where
``min_n`` is the smallest projection over the recording, so each unit's lowest rate is its baseline
(uniform in ``base_hz``) and its highest is its peak (log-uniform in ``peak_hz``). Spikes are a
Poisson process on the 1 ms grid; with ``jitter_ms > 0`` each spike time is moved by a normal
jitter of that s.d. (the true rate is then the 1 ms rate smoothed by the same Gaussian, which is
what the jittered spikes are drawn from). Counts and true rates are binned to ``bin_ms`` (5 or 20).

The same ``(kind, seed)`` gives the same latent paths and readout whatever ``bin_ms``: the 5 and 20 ms
versions of a recording are one system binned two ways (their spikes are independent draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from scipy.ndimage import gaussian_filter1d

from pyro_langevin.data.lorenz import lorenz_trajectories

__all__ = ["KINDS", "SyntheticRecording", "make_recording", "FAMILY", "family"]

#: The kinds of latent dynamics :func:`make_recording` draws.
KINDS = ("lorenz", "rotation", "pulses")
#: Lorenz time units per second of recording: about two turns around a lobe per second.
LORENZ_SPEED = 1.5


@dataclass
class SyntheticRecording:
    """One synthetic recording with its truth.

    Attributes
    ----------
    counts : ndarray of int64, shape (trial, time, unit)
        Spike counts per bin.
    rates : ndarray, shape (trial, time, unit)
        True expected counts per bin (what the counts are Poisson draws of).
    latents : ndarray, shape (trial, time, dim)
        The standardised latent path at the bin centres.
    conditions : ndarray of str, shape (trial,)
    bin_ms : float
    kind : str
    settings : dict
        The arguments it was made with.
    """

    counts: np.ndarray
    rates: np.ndarray
    latents: np.ndarray
    conditions: np.ndarray
    bin_ms: float
    kind: str
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def rates_hz(self) -> np.ndarray:
        """True rates in Hz, (trial, time, unit)."""
        return self.rates * (1000.0 / self.bin_ms)

    @property
    def name(self) -> str:
        """A short name: kind, trials x units, bin width and jitter."""
        s = self.settings
        jitter = f"-jit{s['jitter_ms']:g}" if s.get("jitter_ms") else ""
        return f"{self.kind}-{self.counts.shape[0]}x{self.counts.shape[2]}-{self.bin_ms:g}ms{jitter}"

    def save(self, path: Union[str, Path]) -> Path:
        """Write an ``.npz`` that ``pyro-langevin fit --arrays FILE --counts counts --condition condition``
        reads (and ``rates``, ``latents`` for scoring)."""
        path = Path(path)
        np.savez_compressed(path, counts=self.counts, condition=self.conditions, rates=self.rates,
                            latents=self.latents, bin_ms=self.bin_ms)
        return path


def _lorenz_paths(n_cond: int, n_ms: int, rng: np.random.Generator) -> np.ndarray:
    dt = LORENZ_SPEED / 1000.0 / 2  # two RK4 steps per ms
    start = rng.uniform(-15, 15, size=(n_cond, 3)) + np.array([0.0, 0.0, 25.0])
    on = lorenz_trajectories(start, 2001, 0.005)[:, -1]
    return lorenz_trajectories(on, 2 * n_ms, dt)[:, ::2]


def _rotation_paths(conds: np.ndarray, n_cond: int, n_ms: int, freq_hz: float, noise: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Damped 2-D rotation (decay over ~1.5 s) plus a slow third direction, with OU latent noise per trial."""
    phase = 2 * np.pi * np.arange(n_cond) / n_cond
    amp = 1.0 + 0.5 * rng.uniform(size=n_cond)
    omega, decay = 2 * np.pi * freq_hz / 1000.0, 1.0 / 1500.0
    n = conds.size
    x = np.zeros((n, n_ms, 3))
    state = np.stack([amp[conds] * np.cos(phase[conds]), amp[conds] * np.sin(phase[conds]),
                      np.cos(phase[conds] / 2)], axis=1)
    rot = np.array([[np.cos(omega), -np.sin(omega)], [np.sin(omega), np.cos(omega)]]) * np.exp(-decay)
    kick = noise * np.sqrt(2 * decay)
    for t in range(n_ms):
        x[:, t] = state
        state = np.concatenate([state[:, :2] @ rot.T, state[:, 2:] * np.exp(-decay / 2)], axis=1)
        state += kick * rng.normal(size=state.shape)
    return x


def _pulse_paths(conds: np.ndarray, n_cond: int, n_ms: int, rng: np.random.Generator) -> np.ndarray:
    """A stable 3-D linear system (a 4 Hz damped rotation and a decaying mode) kicked by two 30 ms pulses
    at trial-specific times, their directions set by the condition."""
    omega, d1, d2 = 2 * np.pi * 4.0 / 1000.0, 1.0 / 250.0, 1.0 / 150.0
    a = np.array([[-d1, -omega, 0.0], [omega, -d1, 0.0], [0.0, 0.0, -d2]])
    step = np.eye(3) + a + a @ a / 2  # 1 ms, second order
    dirs = rng.normal(size=(n_cond, 2, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    n = conds.size
    onsets = np.stack([rng.integers(0, max(1, n_ms // 2 - 30), n),
                       rng.integers(n_ms // 2, max(n_ms // 2 + 1, n_ms - 30), n)], axis=1)
    x = np.zeros((n, n_ms, 3))
    state = np.zeros((n, 3))
    for t in range(n_ms):
        x[:, t] = state
        drive = np.zeros((n, 3))
        for p in range(2):
            on = (t >= onsets[:, p]) & (t < onsets[:, p] + 30)
            drive[on] += dirs[conds[on], p] * 0.04
        state = state @ step.T + drive
    return x


def make_recording(kind: str = "lorenz", n_trials: int = 60, n_units: int = 48, n_bins: int = 50,
                   bin_ms: float = 20.0, n_conditions: int = 12, base_hz: Tuple[float, float] = (5.0, 20.0),
                   peak_hz: Tuple[float, float] = (60.0, 300.0), jitter_ms: float = 0.0, freq_hz: float = 3.0,
                   latent_noise: float = 0.3, seed: int = 0) -> SyntheticRecording:
    """Draw one synthetic recording (see the module docstring).

    Parameters
    ----------
    kind : {"lorenz", "rotation", "pulses"}
    n_trials, n_units, n_bins : int
        Its size: trials, units and bins of ``bin_ms`` ms.
    n_conditions : int
        Conditions (trial ``i`` has condition ``i % n_conditions``).
    base_hz, peak_hz : (low, high)
        Each unit's baseline is uniform in ``base_hz``, its peak log-uniform in ``peak_hz``.
    jitter_ms : float
        Spike-time jitter s.d. (0: none).
    freq_hz, latent_noise : float
        The rotation's frequency and per-trial latent noise (``"rotation"`` only).
    seed : int
        Seeds everything; the latent paths and readout depend on ``(kind, seed, n_trials, n_units,
        n_conditions, n_bins * bin_ms)`` only.

    Returns
    -------
    SyntheticRecording
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n_trials < 1 or n_units < 1 or n_bins < 2 or bin_ms <= 0 or n_conditions < 1:
        raise ValueError("n_trials, n_units, n_conditions >= 1, n_bins >= 2 and bin_ms > 0 are required")
    if not (0 < base_hz[0] <= base_hz[1] < peak_hz[0] <= peak_hz[1]):
        raise ValueError(f"need 0 < base_hz <= peak_hz ranges, got base {base_hz}, peak {peak_hz}")
    settings = dict(kind=kind, n_trials=n_trials, n_units=n_units, n_bins=n_bins, bin_ms=bin_ms,
                    n_conditions=n_conditions, base_hz=list(base_hz), peak_hz=list(peak_hz), jitter_ms=jitter_ms,
                    freq_hz=freq_hz, latent_noise=latent_noise, seed=seed)
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    n_ms = int(round(n_bins * bin_ms))
    conds = np.arange(n_trials) % n_conditions
    if kind == "lorenz":
        x = _lorenz_paths(n_conditions, n_ms, rng)[conds]
    elif kind == "rotation":
        x = _rotation_paths(conds, n_conditions, n_ms, freq_hz, latent_noise, rng)
    else:
        x = _pulse_paths(conds, n_conditions, n_ms, rng)
    x = (x - x.mean(axis=(0, 1))) / x.std(axis=(0, 1))
    w = rng.normal(size=(x.shape[-1], n_units))
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    proj = x @ w  # (trial, ms, unit)
    lo, hi = proj.min(axis=(0, 1)), proj.max(axis=(0, 1))
    base = rng.uniform(*base_hz, size=n_units)
    peak = np.exp(rng.uniform(np.log(peak_hz[0]), np.log(peak_hz[1]), size=n_units))
    gain = np.log(peak / base) / np.maximum(hi - lo, 1e-9)
    rate_ms = base * np.exp(gain * (proj - lo)) / 1000.0  # expected spikes per ms

    spike_rng = np.random.default_rng([seed, KINDS.index(kind), int(bin_ms * 1000)])
    fine = spike_rng.poisson(rate_ms)
    if jitter_ms > 0:
        fine = _jitter(fine, jitter_ms, spike_rng)
        rate_ms = gaussian_filter1d(rate_ms, jitter_ms, axis=1, mode="nearest")
    per = int(round(bin_ms))
    t_used = n_bins * per

    def binned(a: np.ndarray) -> np.ndarray:
        return a[:, :t_used].reshape(n_trials, n_bins, per, n_units).sum(axis=2)

    centres = (np.arange(n_bins) * per + per // 2).clip(max=n_ms - 1)
    return SyntheticRecording(counts=binned(fine).astype(np.int64), rates=binned(rate_ms), latents=x[:, centres],
                              conditions=np.array([f"c{c:02d}" for c in conds]), bin_ms=float(bin_ms), kind=kind,
                              settings=settings)


def _jitter(fine: np.ndarray, sd_ms: float, rng: np.random.Generator) -> np.ndarray:
    """Move every spike of a 1 ms count array by a rounded normal jitter (reflected at the trial's edges)."""
    n, t, u = fine.shape
    tr, tm, un = np.nonzero(fine)
    reps = fine[tr, tm, un]
    tr, tm, un = np.repeat(tr, reps), np.repeat(tm, reps), np.repeat(un, reps)
    moved = tm + np.rint(rng.normal(scale=sd_ms, size=tm.size)).astype(int)
    moved = np.abs(moved)
    moved = np.where(moved >= t, 2 * (t - 1) - moved, moved).clip(0, t - 1)
    out = np.zeros_like(fine)
    np.add.at(out, (tr, moved, un), 1)
    return out


#: The benchmark's family (``benchmarks/recordings.py``): name -> :func:`make_recording` arguments.
#: Sizes span ~10 to ~200 trials and ~20 to ~150 units; 20 ms and 5 ms bins; with and without jitter.
FAMILY: Dict[str, Dict[str, Any]] = {
    "lorenz-60x48": dict(kind="lorenz", n_trials=60, n_units=48, n_bins=50, bin_ms=20),
    "lorenz-10x30": dict(kind="lorenz", n_trials=10, n_units=30, n_bins=50, bin_ms=20, n_conditions=5),
    "lorenz-60x48-5ms-jitter": dict(kind="lorenz", n_trials=60, n_units=48, n_bins=200, bin_ms=5, jitter_ms=5.0),
    "rotation-100x100": dict(kind="rotation", n_trials=100, n_units=100, n_bins=50, bin_ms=20),
    "rotation-30x20-jitter": dict(kind="rotation", n_trials=30, n_units=20, n_bins=50, bin_ms=20, jitter_ms=10.0,
                                  n_conditions=6),
    "pulses-200x150": dict(kind="pulses", n_trials=200, n_units=150, n_bins=50, bin_ms=20),
    "pulses-60x48-5ms": dict(kind="pulses", n_trials=60, n_units=48, n_bins=200, bin_ms=5),
}


def family(names: Optional[Any] = None, seed: int = 0) -> Dict[str, SyntheticRecording]:
    """The recordings of :data:`FAMILY` (or those ``names``), each drawn with ``seed``."""
    chosen = list(FAMILY) if names is None else list(names)
    unknown = [n for n in chosen if n not in FAMILY]
    if unknown:
        raise ValueError(f"unknown recordings {unknown}; the family is {list(FAMILY)}")
    return {n: make_recording(**FAMILY[n], seed=seed) for n in chosen}
