"""Read what a fitted LangevinFlow learned: normal modes, energy and forces, flow fields, rotations,
alignment with known states or behaviour, and interventions. Numbers only; figures are in
:mod:`pyro_langevin.dynamics_plots`.

Units. Model time is in units of 100 ms (SPEC section 9): a bin of ``dt`` model units lasts
``100 dt`` ms, an angular frequency ``omega`` per time unit is ``f = 10 omega / (2 pi)`` Hz. Names
of returned fields carry their units (``_hz``, ``_ms``, ``_per_s``, ``counts_per_bin``,
``_per_unit`` for per model time unit). Energies are in the model's own units (mass times latent
units squared per time unit squared); the temperature ``T = sigma^2 / (2 gamma)`` is in the same
units, so kinetic energy per latent dimension is ``T / 2`` at equilibrium (equipartition).

What is here:

* :func:`normal_modes`: the stiffness at the origin (exact ``stiffness_matrix`` of a quadratic
  potential, else the autograd Hessian averaged over given posterior states), its eigenvalues as
  frequencies in Hz, damping ratios, quality factors, the frequency the discrete prior step really
  turns at, and the prior's stationary variance (Gibbs law and the exact discrete one).
* :func:`power_spectrum` / :func:`psth_power_spectrum`: the data's trial-averaged rate spectrum in Hz.
* :func:`latent_paths`: the posterior-mean path of each trial (every guide draw replaced by its
  mean) with, per bin, the potential's kick and the guide's inferred force;
  :func:`energy_and_forces`: kinetic and potential energy over time and the *force share* (below).
* :func:`flow_field`: the potential's force and energy on the plane of the top two principal
  components of posterior ``z``, the posterior paths and the noise-free prior rollouts in it.
* :func:`rotation_fit`: jPCA-style fit of ``dx/dt = M x`` with ``M`` skew-symmetric against ``M``
  unconstrained (Churchland et al., Nature 2012) on condition-averaged paths.
* :func:`ridge_decode` / :func:`cross_validated_decode`: linear (ridge) maps from latents to a
  known state (Lorenz) or to behaviour (hand velocity), scored on held-out trials, per time bin too.
* :func:`prior_response`, :func:`with_stiffness`, :func:`decoupled`, :func:`without_site`,
  :func:`intervention_suite`: counterfactual prior predictives with ``pyro.poutine.do`` on ``z_0`` /
  ``v_0`` and on copies of the model whose potential is cut.

The force share. In bin ``t`` the prior's mean velocity is ``a (v_{t-1} + dt F(z_{t-1}) / m)``; the
potential contributes ``p_t = a dt F(z_{t-1}) / m`` to it (for the overdamped prior,
``F(z_t) / gamma``). A guide's law of ``v_t`` has mean ``prior mean + u_t``; ``u_t`` is the force
the guide infers beyond the prior. Over a set of observed bins ``B`` (a trial, a time bin over
trials, or all)::

    force share = sum_B |p_t|^2 / sum_B (|p_t|^2 + |u_t|^2)

It is 1 when the guide adds no force (the prior's dynamics explain every velocity change but the
noise) and falls towards 0 as the guide's inferred inputs dominate the potential's kicks.
Damping and noise are left out of both sides. Forward bins (no data: the guide uses the prior) are
not counted.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from scipy import linalg as sla
from scipy import signal

from pyro_langevin.batch import Batch, BatchError
from pyro_langevin.models import velocity_site
from pyro_langevin.posterior import eval_mode
from pyro_langevin.potentials import FixedStiffnessPotential, Potential
from pyro_langevin.transition import make_transition

__all__ = [
    "TIME_UNIT_S", "hz_from_omega", "bin_seconds", "jsonable", "principal_components",
    "NormalModes", "stiffness", "normal_modes",
    "PowerSpectrum", "power_spectrum", "psth_power_spectrum",
    "mean_path", "LatentPaths", "latent_paths", "Energetics", "energy_and_forces",
    "FlowField", "flow_field", "prior_rollout",
    "RotationFit", "rotation_fit", "condition_average", "phase_space",
    "Decoding", "ridge_decode", "cross_validated_decode",
    "PriorResponse", "prior_response", "with_stiffness", "decoupled", "without_site", "strongest_site",
    "dominant_mode", "Intervention", "intervention_suite", "reach_direction",
]

#: The model's time unit in seconds (100 ms): ``dt`` is in these units.
TIME_UNIT_S = 0.1


def hz_from_omega(omega: Any) -> Any:
    """Angular frequency per model time unit (100 ms) -> cycles per second: ``10 omega / (2 pi)``."""
    return np.asarray(omega) / (2 * math.pi * TIME_UNIT_S)


def bin_seconds(model: Any) -> float:
    """Length of one model bin in seconds (``dt`` time units of 100 ms)."""
    return float(model.dynamics.dt) * TIME_UNIT_S


def jsonable(value: Any) -> Any:
    """Plain JSON values: arrays to lists, NaN and infinities to None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


class _Summary:
    """``summary()``: the dataclass's fields as JSON values, leaving out the large arrays named in ``_LARGE``."""

    _LARGE: tuple = ()

    def summary(self) -> Dict[str, Any]:
        return jsonable({f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._LARGE})


# ----- normal modes --------------------------------------------------------------------------------
def stiffness(potential: Potential, states: Optional[torch.Tensor] = None) -> tuple[np.ndarray, str]:
    """The stiffness matrix ``S`` (the Hessian of ``U``) and how it was obtained.

    Exact at the origin for a potential with ``stiffness_matrix()`` (the Gram-form oscillators and
    :class:`~pyro_langevin.potentials.FixedStiffnessPotential`; a quartic term has zero Hessian
    there) when ``states`` is None. Otherwise the Hessian of ``U`` by autograd, averaged over
    ``states`` (N, D) (e.g. posterior-mean positions) or at the origin.

    Returns
    -------
    (ndarray (D, D), str)
        ``S`` in float64, symmetrised; the source: ``"stiffness_matrix"``, ``"hessian_at_origin"``
        or ``"hessian_mean_over_states"``.
    """
    d = potential.latent_dim
    if states is None and hasattr(potential, "stiffness_matrix"):
        with torch.no_grad():
            s = potential.stiffness_matrix().detach().double().cpu().numpy()
        return 0.5 * (s + s.T), "stiffness_matrix"
    ref = next(iter([*potential.parameters(), *potential.buffers()]), None)
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    if states is None:
        points, source = torch.zeros(1, d, **kw), "hessian_at_origin"
    else:
        points, source = torch.as_tensor(states, **kw).reshape(-1, d), "hessian_mean_over_states"
    with torch.enable_grad():
        z = points.detach().clone().requires_grad_(True)
        u = potential.energy(z).sum()
        if not u.requires_grad:  # e.g. the zero potential: no graph, Hessian 0
            return np.zeros((d, d)), source
        (g,) = torch.autograd.grad(u, z, create_graph=True)
        rows = []
        for j in range(d):
            (h,) = torch.autograd.grad(g[:, j].sum(), z, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(z) if h is None else h)
    hess = torch.stack(rows, dim=1).mean(0).detach().double().cpu().numpy()  # (D, D)
    return 0.5 * (hess + hess.T), source


@dataclass
class NormalModes(_Summary):
    """Normal modes of the linearised prior (SPEC section 9), sorted by stiffness eigenvalue.

    Attributes
    ----------
    eigenvalues_per_unit2 : (D,) stiffness eigenvalues ``lambda_i`` (per time unit squared, times the mass).
    omega_rad_per_unit : (D,) ``sqrt(lambda_i / m)`` (0 for ``lambda_i <= 0``: free or unstable).
    frequency_hz : (D,) natural frequencies ``10 omega / (2 pi)``.
    damped_frequency_hz : (D,) ``f sqrt(1 - zeta^2)`` for underdamped modes, 0 otherwise.
    step_frequency_hz : (D,) frequency at which the discrete prior step (dt) turns the mode (0: it
        does not oscillate); differs from ``damped_frequency_hz`` where ``omega dt`` is not small.
    step_decay_per_s : (D,) amplitude decay rate of the discrete step per second.
    damping_ratio : (D,) ``zeta = gamma / (2 m omega)`` (inf for omega = 0).
    quality_factor : (D,) ``1 / (2 zeta)``.
    modes : (D, D) eigenvectors, one per column.
    stationary_z_variance_gibbs : (D,) ``T / lambda_i`` per mode (inf where lambda <= 0).
    stationary_z_total_variance_gibbs, stationary_z_total_variance_discrete : trace of the stationary
        position covariance of the Gibbs law and of the discrete linear prior step (None if unstable).
    stationary_v_variance : ``T / m`` per velocity dimension.
    gamma_per_unit, sigma, mass, temperature, dt_units : the prior's constants (``T = sigma^2 / (2 gamma)``).
    friction_rate_per_s : ``10 gamma / m``; velocity memory ``velocity_memory_ms = 100 m / gamma``.
    source : how ``S`` was obtained (see :func:`stiffness`).
    overdamped : the prior has no velocity memory (frequencies then mean nothing: ``relaxation_rate_per_s``).
    """

    eigenvalues_per_unit2: np.ndarray
    omega_rad_per_unit: np.ndarray
    frequency_hz: np.ndarray
    damped_frequency_hz: np.ndarray
    step_frequency_hz: np.ndarray
    step_decay_per_s: np.ndarray
    damping_ratio: np.ndarray
    quality_factor: np.ndarray
    relaxation_rate_per_s: np.ndarray
    modes: np.ndarray
    stationary_z_variance_gibbs: np.ndarray
    stationary_z_total_variance_gibbs: float
    stationary_z_total_variance_discrete: Optional[float]
    stationary_v_variance: float
    gamma_per_unit: float
    sigma: float
    mass: float
    temperature: float
    dt_units: float
    friction_rate_per_s: float
    velocity_memory_ms: float
    source: str
    overdamped: bool

    _LARGE = ("modes",)


def _step_matrix(s: np.ndarray, dt: float, mass: float, a: float) -> np.ndarray:
    """The deterministic linear prior step on ``[z, v]`` for stiffness ``S`` (symplectic Euler, then decay ``a``)."""
    d = s.shape[0]
    eye = np.eye(d)
    return np.block([[eye - dt**2 * s / mass, dt * eye], [-a * dt * s / mass, a * eye]])


def normal_modes(model: Any, states: Optional[torch.Tensor] = None) -> NormalModes:
    """Normal modes of ``model``'s prior: frequencies in Hz, damping, stationary variance.

    Parameters
    ----------
    model : LangevinFlow
        Needs ``model.potential`` and ``model.dynamics`` (damping, noise, mass, dt).
    states : tensor (N, D), optional
        Posterior positions over which to average the autograd Hessian (for any potential; use it
        for those without an exact ``stiffness_matrix``, such as the MLP). Without it: the exact
        ``stiffness_matrix`` where the potential has one, else the Hessian at the origin.

    Returns
    -------
    NormalModes
    """
    pars = model.dynamics
    s, source = stiffness(model.potential, states)
    with torch.no_grad():
        gamma, sigma = float(pars.gamma), float(pars.sigma)
        a_t, s_t = pars.coefficients() if not pars.overdamped else (None, None)
    mass, dt = float(pars.mass), float(pars.dt)
    lam, vecs = np.linalg.eigh(s)
    omega = np.sqrt(np.clip(lam, 0.0, None) / mass)
    with np.errstate(divide="ignore", invalid="ignore"):
        zeta = np.where(omega > 0, gamma / (2 * mass * omega), np.inf)
        quality = np.where(np.isfinite(zeta), 1.0 / (2 * zeta), 0.0)
    freq = hz_from_omega(omega)
    damped = np.where(zeta < 1, freq * np.sqrt(np.clip(1 - zeta**2, 0, None)), 0.0)
    temperature = sigma**2 / (2 * gamma)
    with np.errstate(divide="ignore"):
        var_gibbs = np.where(lam > 0, temperature / np.where(lam > 0, lam, 1.0), np.inf)
    step_f, step_decay = np.zeros_like(lam), np.zeros_like(lam)
    total_discrete: Optional[float] = None
    if not pars.overdamped:
        a = float(a_t)
        for i, l_i in enumerate(lam):
            mu = np.linalg.eigvals(_step_matrix(np.array([[l_i]]), dt, mass, a))
            top = mu[np.argmax(np.abs(mu))]
            step_f[i] = abs(np.angle(top)) / (2 * math.pi * dt * TIME_UNIT_S) if abs(top.imag) > 1e-12 else 0.0
            step_decay[i] = -math.log(max(abs(top), 1e-300)) / (dt * TIME_UNIT_S)
        big = _step_matrix(s, dt, mass, a)
        if np.max(np.abs(np.linalg.eigvals(big))) < 1:
            d = s.shape[0]
            q = np.zeros((2 * d, 2 * d))
            q[d:, d:] = float(s_t) ** 2 * np.eye(d)
            total_discrete = float(np.trace(sla.solve_discrete_lyapunov(big, q)[:d, :d]))
        relax = np.zeros_like(lam)
    else:
        damped = np.zeros_like(lam)
        relax = lam / gamma / TIME_UNIT_S
    return NormalModes(
        eigenvalues_per_unit2=lam, omega_rad_per_unit=omega, frequency_hz=freq, damped_frequency_hz=damped,
        step_frequency_hz=step_f, step_decay_per_s=step_decay, damping_ratio=zeta, quality_factor=quality,
        relaxation_rate_per_s=relax, modes=vecs, stationary_z_variance_gibbs=var_gibbs,
        stationary_z_total_variance_gibbs=float(np.sum(var_gibbs)), stationary_z_total_variance_discrete=total_discrete,
        stationary_v_variance=temperature / mass, gamma_per_unit=gamma, sigma=sigma, mass=mass,
        temperature=temperature, dt_units=dt, friction_rate_per_s=gamma / mass / TIME_UNIT_S,
        velocity_memory_ms=1000 * TIME_UNIT_S * mass / gamma, source=source, overdamped=bool(pars.overdamped),
    )


# ----- spectra -------------------------------------------------------------------------------------
@dataclass
class PowerSpectrum(_Summary):
    """Mean normalised power spectrum of several signals.

    Attributes
    ----------
    frequency_hz : (K,) frequencies (zero-padded periodogram, so finer than the resolution).
    power : (K,) mean over signals of each signal's periodogram divided by its total power (each
        signal counts the same, whatever its amplitude); the DC bin is 0.
    peak_hz : frequency of the largest power above 0 Hz.
    resolution_hz : ``1 / duration``: peaks closer than this cannot be told apart.
    n_signals : signals averaged.
    """

    frequency_hz: np.ndarray
    power: np.ndarray
    peak_hz: float
    resolution_hz: float
    n_signals: int

    _LARGE = ("frequency_hz", "power")


def power_spectrum(x: np.ndarray, bin_s: float, pad: int = 4, segment_bins: Optional[int] = None) -> PowerSpectrum:
    """Normalised periodogram (Hann window, mean removed) of each signal of ``x`` (..., time, channel).

    Every leading index and channel is one signal. Signals with no variance are skipped. With
    ``segment_bins`` (for long signals) Welch's average over half-overlapping segments of that many
    bins replaces the single periodogram.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[-2] < 4:
        raise ValueError(f"x: expected (..., time, channel) with at least 4 time bins, got shape {x.shape}")
    n_t = x.shape[-2]
    sig = np.moveaxis(x, -2, -1).reshape(-1, n_t)
    sig = sig[np.all(np.isfinite(sig), axis=1) & (np.std(sig, axis=1) > 0)]
    if not len(sig):
        raise ValueError("x: no finite signal with non-zero variance")
    if segment_bins is None:
        freq, p = signal.periodogram(sig, fs=1.0 / bin_s, window="hann", nfft=pad * n_t, detrend="constant", axis=-1)
    else:
        n_t = min(int(segment_bins), n_t)
        freq, p = signal.welch(sig, fs=1.0 / bin_s, window="hann", nperseg=n_t, nfft=pad * n_t, detrend="constant",
                               axis=-1)
    p[:, 0] = 0.0
    p = p / p.sum(axis=1, keepdims=True)
    mean = p.mean(0)
    return PowerSpectrum(freq, mean, float(freq[1:][np.argmax(mean[1:])]), 1.0 / (n_t * bin_s), int(len(sig)))


def psth_power_spectrum(counts: np.ndarray, bin_s: float, conditions: Optional[Sequence] = None) -> PowerSpectrum:
    """Power spectrum of the trial-averaged counts (PSTHs, per condition when given) of every neuron.

    ``counts`` (trial, time, neuron), observed bins only (NaN-aware average).
    """
    return power_spectrum(condition_average(counts, conditions), bin_s)


def condition_average(x: np.ndarray, conditions: Optional[Sequence] = None) -> np.ndarray:
    """Mean over trials (NaN-aware) of ``x`` (trial, time, ...): (condition, time, ...) in sorted
    condition order, or (1, time, ...) without ``conditions``."""
    x = np.asarray(x, dtype=np.float64)
    if conditions is None:
        return np.nanmean(x, axis=0, keepdims=True)
    labels = np.asarray(conditions)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"conditions: expected {x.shape[0]} labels (one per trial), got shape {labels.shape}")
    return np.stack([np.nanmean(x[labels == c], axis=0) for c in np.unique(labels)])


# ----- paths, forces and energy --------------------------------------------------------------------
class mean_path(Messenger):
    """Effect handler: every unobserved sample site takes its distribution's mean instead of a draw.

    Around a guide it gives the posterior-mean path (each ``v_t`` at its mean given the mean path
    so far); around the model under ``poutine.do`` it gives the noise-free prior response.
    """

    def _pyro_sample(self, msg: Dict[str, Any]) -> None:
        if msg["is_observed"] or msg["value"] is not None or isinstance(msg["fn"], _Subsample):
            return  # observed sites keep their data; a plate's index site is no draw
        try:
            msg["value"] = msg["fn"].mean
        except NotImplementedError:
            raise ValueError(f"site {msg['name']!r}: its law ({type(msg['fn']).__name__}) has no closed-form mean; "
                             "use path='sample'") from None
        msg["done"] = True


@dataclass
class LatentPaths(_Summary):
    """Posterior paths of a batch with the forces acting on them, one row per trial.

    Attributes
    ----------
    z, v : (trial, time, D) positions and velocities (all bins, observed and forward).
    rates : (trial, time, neuron) rates of the path (expected counts per bin).
    potential_kick : (trial, time, D) ``p_t``: the potential's part of the prior's mean velocity
        change into bin t (0 at t = 0).
    guide_force : (trial, time, D) ``u_t``: the guide's mean minus the prior's mean (0 at t = 0).
    prior_noise_scale : (D,) or scalar, the prior's per-step velocity noise ``s``.
    n_observed_bins : bins with data (later ones are forward bins).
    dt_units : bin length in time units of 100 ms.
    path : ``"mean"`` (posterior-mean path) or ``"sample"`` (one posterior draw per trial).
    """

    z: np.ndarray
    v: np.ndarray
    rates: np.ndarray
    potential_kick: np.ndarray
    guide_force: np.ndarray
    prior_noise_scale: np.ndarray
    n_observed_bins: int
    dt_units: float
    path: str

    _LARGE = ("z", "v", "rates", "potential_kick", "guide_force")

    @property
    def time_ms(self) -> np.ndarray:
        """Bin start times from the trial start, ms."""
        return np.arange(self.z.shape[1]) * self.dt_units * TIME_UNIT_S * 1000


def _site_mean(node: Dict[str, Any]) -> torch.Tensor:
    try:
        return node["fn"].mean
    except NotImplementedError:
        raise ValueError(f"site {node['name']!r}: the guide's law ({type(node['fn']).__name__}) has no closed-form "
                         "mean, so its inferred force cannot be read") from None


def _kicks(model: Any, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's mean of ``v_t`` from ``(z_{t-1}, v_{t-1})`` and its potential part, (trial, time - 1, D)."""
    step = model.transition_fn()
    free = make_transition(torch.zeros_like, model.dynamics)
    loc = step(z[:, :-1], v[:, :-1]).v_loc
    return loc, loc - free(z[:, :-1], v[:, :-1]).v_loc


@torch.no_grad()
def latent_paths(
    model: Any, guide: Callable, batch: Batch, path: Literal["mean", "sample"] = "mean", batch_size: int = 256
) -> LatentPaths:
    """The posterior path of every trial and the forces along it (see the module docstring).

    Parameters
    ----------
    model : LangevinFlow
    guide : callable
        Any guide with the model's sites whose per-step laws have a closed-form mean (every guide of
        :mod:`pyro_langevin.guides` but the spline-flow variant); the model itself (or a guide that
        samples the prior) gives zero guide force.
    batch : Batch
    path : {"mean", "sample"}
        ``"mean"``: every guide draw replaced by its mean (the posterior-mean path, deterministic);
        ``"sample"``: one guide draw per trial.
    batch_size : int
        Trials per pass.

    Returns
    -------
    LatentPaths
    """
    if path not in ("mean", "sample"):
        raise ValueError(f"path must be 'mean' or 'sample', got {path!r}")
    if not isinstance(batch, Batch):
        raise TypeError(f"batch: expected a Batch (see pyro_langevin.make_batch), got {type(batch).__name__}")
    if getattr(model, "n_neurons", batch.n_neurons) != batch.n_neurons:
        raise BatchError(f"batch: {batch.n_neurons} neurons but the model was built for {model.n_neurons}")
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in ("z", "v", "rates", "kick", "force")}
    modules = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    with eval_mode(*modules):
        for start in range(0, batch.n_trials, batch_size):
            chunk = batch[start:start + batch_size]
            with mean_path() if path == "mean" else nullcontext():
                guide_trace = poutine.trace(guide).get_trace(chunk)
            trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(chunk)
            z, v = trace.nodes["z"]["value"], trace.nodes["v"]["value"]
            loc, kick = _kicks(model, z, v)
            q_mean = torch.stack([_site_mean(guide_trace.nodes[velocity_site(t)]) for t in range(1, z.shape[1])], dim=1)
            pad = torch.zeros_like(z[:, :1])
            parts["z"].append(z)
            parts["v"].append(v)
            parts["rates"].append(trace.nodes["rates"]["value"])
            parts["kick"].append(torch.cat([pad, kick], 1))
            parts["force"].append(torch.cat([pad, q_mean - loc], 1))
        _, noise = model.dynamics.coefficients()
    out = {k: torch.cat(v).detach().cpu().numpy() for k, v in parts.items()}
    return LatentPaths(out["z"], out["v"], out["rates"], out["kick"], out["force"],
                       np.asarray(noise.detach().cpu().numpy()), batch.n_observed_bins, float(model.dynamics.dt), path)


@dataclass
class Energetics(_Summary):
    """Energy and force share along posterior paths.

    Attributes
    ----------
    time_ms : (time,) bin start times.
    kinetic_energy, potential_energy : (trial, time) ``m |v|^2 / 2`` and ``U(z)``.
    equipartition_kinetic_energy : ``D T / 2``, the prior's stationary mean kinetic energy.
    potential_kick_sq, guide_force_sq : (trial, time) ``|p_t|^2`` and ``|u_t|^2``.
    force_share : over every observed bin of every trial (module docstring).
    force_share_per_trial : (trial,)
    force_share_per_time : (time,) over trials (NaN at t = 0 and in forward bins).
    guide_force_over_noise_per_time : (time,) RMS ``|u_t|`` over trials divided by the prior's
        per-step velocity noise ``s sqrt(D)``: the inferred force in units of the prior's own noise.
    """

    time_ms: np.ndarray
    kinetic_energy: np.ndarray
    potential_energy: np.ndarray
    equipartition_kinetic_energy: float
    potential_kick_sq: np.ndarray
    guide_force_sq: np.ndarray
    force_share: float
    force_share_per_trial: np.ndarray
    force_share_per_time: np.ndarray
    guide_force_over_noise_per_time: np.ndarray

    _LARGE = ("kinetic_energy", "potential_energy", "potential_kick_sq", "guide_force_sq", "force_share_per_trial",
              "force_share_per_time", "guide_force_over_noise_per_time", "time_ms")

    def summary(self) -> Dict[str, Any]:
        out = super().summary()
        out.update(jsonable({
            "mean_kinetic_energy": float(self.kinetic_energy.mean()),
            "mean_potential_energy": float(self.potential_energy.mean()),
            "force_share_per_trial_quantiles_5_50_95": np.quantile(self.force_share_per_trial, [0.05, 0.5, 0.95]),
        }))
        return out


def _share(kick_sq: np.ndarray, force_sq: np.ndarray, axis: Any = None) -> np.ndarray:
    num = kick_sq.sum(axis=axis)
    den = num + force_sq.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


@torch.no_grad()
def energy_and_forces(model: Any, paths: LatentPaths) -> Energetics:
    """Kinetic and potential energy over time and the force share (module docstring) of ``paths``."""
    pars = model.dynamics
    mass = float(pars.mass)
    temperature = float(pars.sigma) ** 2 / (2 * float(pars.gamma))
    ref = next(model.parameters())
    z = torch.as_tensor(paths.z, dtype=ref.dtype, device=ref.device)
    potential = model.potential.energy(z).cpu().numpy().astype(np.float64)
    kinetic = 0.5 * mass * (paths.v.astype(np.float64) ** 2).sum(-1)
    kick_sq = (paths.potential_kick.astype(np.float64) ** 2).sum(-1)
    force_sq = (paths.guide_force.astype(np.float64) ** 2).sum(-1)
    obs = slice(1, paths.n_observed_bins)
    per_time = np.full(kick_sq.shape[1], np.nan)
    per_time[obs] = _share(kick_sq[:, obs], force_sq[:, obs], axis=0)
    noise = float(np.sqrt(np.mean(np.broadcast_to(paths.prior_noise_scale, (paths.z.shape[-1],)) ** 2)))
    over_noise = np.full(kick_sq.shape[1], np.nan)
    over_noise[obs] = np.sqrt(force_sq[:, obs].mean(0)) / (noise * math.sqrt(paths.z.shape[-1]))
    return Energetics(
        time_ms=paths.time_ms, kinetic_energy=kinetic, potential_energy=potential,
        equipartition_kinetic_energy=0.5 * paths.z.shape[-1] * temperature,
        potential_kick_sq=kick_sq, guide_force_sq=force_sq,
        force_share=float(_share(kick_sq[:, obs], force_sq[:, obs])),
        force_share_per_trial=_share(kick_sq[:, obs], force_sq[:, obs], axis=1),
        force_share_per_time=per_time, guide_force_over_noise_per_time=over_noise,
    )


# ----- flow field ----------------------------------------------------------------------------------
@torch.no_grad()
def prior_rollout(model: Any, z0: torch.Tensor, v0: torch.Tensor, n_bins: int) -> Dict[str, np.ndarray]:
    """Noise-free prior path from each start: ``poutine.do`` on ``z_0``, ``v_0`` and every ``v_t`` at
    its mean (:class:`mean_path`). Returns ``{"z", "v", "rates"}`` arrays (trial, time, ...)."""
    data = {"z_0": torch.as_tensor(z0), "v_0": torch.as_tensor(v0)}
    with eval_mode(model), mean_path():
        trace = poutine.trace(poutine.do(model, data=data)).get_trace(n_trials=int(data["z_0"].shape[0]), n_bins=n_bins)
    return {k: trace.nodes[k]["value"].detach().cpu().numpy() for k in ("z", "v", "rates")}


@dataclass
class FlowField(_Summary):
    """The potential's force on the plane of the top two principal components of posterior ``z``.

    The plane passes through the mean posterior position; the other components are held at that mean.

    Attributes
    ----------
    components : (2, D) orthonormal directions of the plane; ``mean`` : (D,) its origin.
    explained_variance_ratio : (2,) share of the posterior ``z`` variance along each.
    grid_pc1, grid_pc2 : (G,) grid coordinates (latent units along each direction).
    energy : (G, G) ``U`` on the grid (rows: pc2, columns: pc1).
    force_pc1, force_pc2 : (G, G) the force ``-grad U`` projected on the plane (acceleration
        times mass, per time unit squared).
    paths : (trial, time, 2) posterior paths projected on the plane.
    prior_paths : (trial, time, 2) or None, noise-free prior rollouts from each posterior start
        (:func:`prior_rollout`): where the learned dynamics alone would take each trial.
    """

    components: np.ndarray
    mean: np.ndarray
    explained_variance_ratio: np.ndarray
    grid_pc1: np.ndarray
    grid_pc2: np.ndarray
    energy: np.ndarray
    force_pc1: np.ndarray
    force_pc2: np.ndarray
    paths: np.ndarray
    prior_paths: Optional[np.ndarray]

    _LARGE = ("components", "mean", "grid_pc1", "grid_pc2", "energy", "force_pc1", "force_pc2", "paths", "prior_paths")


def principal_components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (D,), top ``k`` directions (k, D) and their explained-variance ratios of rows of ``x`` (N, D)."""
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = sv**2
    return mean, vt[:k], var[:k] / var.sum()


@torch.no_grad()
def flow_field(model: Any, paths: LatentPaths, grid_size: int = 21, margin: float = 0.15,
               rollouts: bool = True) -> FlowField:
    """The force field and energy of ``model``'s potential on the top-2 PC plane of ``paths.z``.

    ``rollouts`` adds the noise-free prior path from each trial's posterior start ``(z_0, v_0)``
    over the same number of bins.
    """
    z = paths.z.astype(np.float64)
    d = z.shape[-1]
    mean, comps, ratio = principal_components(z.reshape(-1, d), 2)
    proj = (z - mean) @ comps.T
    lo, hi = proj.reshape(-1, 2).min(0), proj.reshape(-1, 2).max(0)
    pad = margin * (hi - lo)
    g1 = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid_size)
    g2 = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid_size)
    xx, yy = np.meshgrid(g1, g2)
    pts = mean + xx.reshape(-1, 1) * comps[0] + yy.reshape(-1, 1) * comps[1]
    ref = next(model.parameters())
    zt = torch.as_tensor(pts, dtype=ref.dtype, device=ref.device)
    energy = model.potential.energy(zt).cpu().numpy().reshape(xx.shape)
    force = model.potential.force(zt).cpu().numpy() @ comps.T
    prior = None
    if rollouts:
        kw = {"dtype": ref.dtype, "device": ref.device}
        roll = prior_rollout(model, torch.as_tensor(paths.z[:, 0], **kw), torch.as_tensor(paths.v[:, 0], **kw),
                             paths.z.shape[1])
        prior = (roll["z"] - mean) @ comps.T
    return FlowField(comps, mean, ratio, g1, g2, energy, force[:, 0].reshape(xx.shape), force[:, 1].reshape(xx.shape),
                     proj, prior)


# ----- rotations (jPCA) ----------------------------------------------------------------------------
def phase_space(z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The Langevin state ``[z, v]`` (..., 2 D) with position and velocity each divided by its root
    mean square, so that neither block outweighs the other in a PCA (a single oscillator turns in
    the (z_i, v_i) plane, not in z alone)."""
    z, v = np.asarray(z, dtype=np.float64), np.asarray(v, dtype=np.float64)
    rms = lambda x: float(np.sqrt(np.mean(x**2))) or 1.0  # noqa: E731
    return np.concatenate([z / rms(z), v / rms(v)], axis=-1)


@dataclass
class RotationFit(_Summary):
    """A jPCA-style fit of ``dx/dt = M x`` on condition-averaged paths.

    Attributes
    ----------
    r2_skew, r2_full : R^2 of the derivative predicted by the best skew-symmetric ``M`` and by the
        best unconstrained ``M``.
    skew_to_full_ratio : ``r2_skew / r2_full`` (Churchland et al. 2012 report it for motor cortex).
    frequency_hz : frequency of the top rotational plane (the plane carrying most of the skew fit's
        derivative, see :func:`rotation_fit`).
    period_ms : ``1000 / frequency_hz``.
    plane_frequencies_hz : frequencies of every rotational plane of the skew fit, top plane first.
    rotational : ``skew_to_full_ratio >= threshold`` and ``r2_skew >= threshold``.
    plane : (D, 2) orthonormal basis of the top plane in the input space.
    projection : (condition, time, 2) the centred paths in that plane.
    plane_variance_share : share of the centred paths' variance in the plane.
    n_pcs : dimensions the fit ran in (top principal components of the centred paths).
    """

    r2_skew: float
    r2_full: float
    skew_to_full_ratio: float
    frequency_hz: float
    period_ms: float
    plane_frequencies_hz: np.ndarray
    rotational: bool
    plane: np.ndarray
    projection: np.ndarray
    plane_variance_share: float
    n_pcs: int
    n_conditions: int
    threshold: float

    _LARGE = ("plane", "projection")


def _skew_basis(k: int) -> np.ndarray:
    """Basis of k x k skew-symmetric matrices, shape (k (k - 1) / 2, k, k)."""
    out = []
    for i in range(k):
        for j in range(i + 1, k):
            b = np.zeros((k, k))
            b[i, j], b[j, i] = 1.0, -1.0
            out.append(b)
    return np.array(out)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def rotation_fit(x: np.ndarray, bin_s: float, n_pcs: int = 6, threshold: float = 0.5) -> RotationFit:
    """Fit ``dx/dt = M x`` with ``M`` skew-symmetric and unconstrained (jPCA, Churchland et al. 2012).

    As jPCA does: the cross-condition mean path is subtracted at every time, the centred paths are
    reduced to their top ``n_pcs`` principal components, and ``M`` is fitted by least squares to
    the finite-difference derivative ``(x_{t+1} - x_t) / bin`` against the midpoint
    ``(x_t + x_{t+1}) / 2``. The frequency ``omega`` of a plane of the skew fit is mapped through
    ``2 atan(omega bin / 2) / bin``, which undoes the midpoint rule exactly for a pure rotation.

    The top plane is the skew fit's plane that carries most of its predicted derivative
    (``omega_k^2`` times the paths' variance in plane k). The jPCA codepack orders planes by
    ``|omega|`` alone, which picks a plane of noise whenever fewer than ``n_pcs`` dimensions carry
    signal (a least-squares skew fit on small-variance noise can give it any frequency).

    Parameters
    ----------
    x : (condition, time, D) condition-averaged paths (:func:`condition_average`).
    bin_s : bin length in seconds.
    n_pcs : dimensions of the fit (at most D and the number of centred samples; Churchland et al. used 6).
    threshold : for ``rotational``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 3:
        raise ValueError(f"x: expected (condition, time, D) with at least 3 time bins, got shape {x.shape}")
    c, t, d = x.shape
    centred = x - x.mean(0, keepdims=True) if c > 1 else x - x.mean(1, keepdims=True)
    k = max(2, min(n_pcs, d, c * t - 1))
    _, comps, _ = principal_components(centred.reshape(-1, d), k)
    comps = comps[:k]
    y = centred @ comps.T  # (c, t, k), zero mean over conditions
    deriv = ((y[:, 1:] - y[:, :-1]) / bin_s).reshape(-1, k)
    mid = (0.5 * (y[:, 1:] + y[:, :-1])).reshape(-1, k)
    m_full = np.linalg.lstsq(mid, deriv, rcond=None)[0].T  # deriv ~ mid @ M^T
    basis = _skew_basis(k)
    design = np.stack([(mid @ b.T).ravel() for b in basis], axis=1)
    coef = np.linalg.lstsq(design, deriv.ravel(), rcond=None)[0]
    m_skew = np.tensordot(coef, basis, axes=1)
    r2_full, r2_skew = _r2(deriv, mid @ m_full.T), _r2(deriv, mid @ m_skew.T)
    evals, evecs = np.linalg.eig(m_skew)
    planes, powers, omegas = [], [], []
    for i in np.flatnonzero(evals.imag > 1e-12):  # one eigenvalue +i omega per rotational plane
        q, _ = np.linalg.qr(np.stack([evecs[:, i].real, evecs[:, i].imag], axis=1))
        planes.append(q)
        omegas.append(evals[i].imag)
        powers.append(evals[i].imag**2 * ((mid @ q) ** 2).sum())  # the plane's share of |M_skew x|^2
    order = np.argsort(powers)[::-1]
    omega_true = 2 * np.arctan(np.asarray(omegas)[order] * bin_s / 2) / bin_s
    freqs = omega_true / (2 * math.pi)
    plane_k = planes[order[0]] if planes else np.eye(k)[:, :2]
    plane = comps.T @ plane_k
    proj = centred @ plane
    total = (centred**2).sum()
    ratio = r2_skew / r2_full if r2_full > 0 else float("nan")
    f = float(freqs[0]) if len(freqs) else 0.0
    return RotationFit(
        r2_skew=r2_skew, r2_full=r2_full, skew_to_full_ratio=ratio, frequency_hz=f,
        period_ms=1000.0 / f if f > 0 else float("inf"), plane_frequencies_hz=freqs,
        rotational=bool(ratio >= threshold and r2_skew >= threshold), plane=plane, projection=proj,
        plane_variance_share=float((proj**2).sum() / total) if total > 0 else float("nan"),
        n_pcs=int(k), n_conditions=int(c), threshold=float(threshold),
    )


# ----- alignment and decoding ----------------------------------------------------------------------
#: Ridge penalties searched (RidgeCV, efficient leave-one-out on the fitting rows only).
RIDGE_ALPHAS = tuple(np.logspace(-3, 4, 15))


@dataclass
class Decoding(_Summary):
    """A ridge map from latents to targets, scored on trials it was not fitted on.

    Attributes
    ----------
    r2 : R^2 over every held-out (trial, bin), uniform average over target dimensions (sklearn).
    r2_per_output : (B,) per target dimension.
    r2_per_time : (time,) R^2 across held-out trials at each bin (uniform over dimensions): how
        well trial-to-trial differences at that moment are decoded.
    alpha : chosen ridge penalty (per fit, the median over folds for cross-validation).
    predicted : (trial, time, B) predictions of the held-out trials.
    n_fit_trials, n_test_trials : trials per fit and scored.
    """

    r2: float
    r2_per_output: np.ndarray
    r2_per_time: np.ndarray
    alpha: float
    predicted: np.ndarray
    n_fit_trials: int
    n_test_trials: int

    _LARGE = ("predicted", "r2_per_time")


def _ridge(alphas: Sequence[float]):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))


def _scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    from sklearn.metrics import r2_score

    flat_y, flat_p = y.reshape(-1, y.shape[-1]), pred.reshape(-1, y.shape[-1])
    per_time = np.array([r2_score(y[:, t], pred[:, t]) if y.shape[0] > 1 else np.nan for t in range(y.shape[1])])
    return (float(r2_score(flat_y, flat_p)), r2_score(flat_y, flat_p, multioutput="raw_values"), per_time)


def _check_xy(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"{what}: latents and targets must be (trial, time, .) with the same trials and bins, "
                         f"got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{what}: NaN or infinite values")
    return x, y


def ridge_decode(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 alphas: Sequence[float] = RIDGE_ALPHAS) -> Decoding:
    """Fit a ridge map (features standardised; penalty by leave-one-out on the fitting rows) from
    latents ``x_fit`` (trial, time, F) to targets ``y_fit`` (trial, time, B) and score it on the other
    trials ``x_test``, ``y_test``; every bin is one sample (no lag)."""
    x_fit, y_fit = _check_xy(x_fit, y_fit, "fitting trials")
    x_test, y_test = _check_xy(x_test, y_test, "test trials")
    reg = _ridge(alphas).fit(x_fit.reshape(-1, x_fit.shape[-1]), y_fit.reshape(-1, y_fit.shape[-1]))
    pred = reg.predict(x_test.reshape(-1, x_test.shape[-1])).reshape(y_test.shape)
    r2, per_out, per_time = _scores(y_test, pred)
    return Decoding(r2, per_out, per_time, float(reg[-1].alpha_), pred, x_fit.shape[0], x_test.shape[0])


def cross_validated_decode(x: np.ndarray, y: np.ndarray, n_folds: int = 5, seed: int = 0,
                           groups: Optional[Sequence] = None, alphas: Sequence[float] = RIDGE_ALPHAS) -> Decoding:
    """K-fold cross-validated :func:`ridge_decode` over trials: every trial is predicted by a map
    fitted on the other folds; R^2 of the pooled predictions. With ``groups`` (one label per trial,
    e.g. a condition) the folds keep each group whole (``GroupKFold``)."""
    from sklearn.model_selection import GroupKFold, KFold

    x, y = _check_xy(x, y, "trials")
    splitter = GroupKFold(n_folds) if groups is not None else KFold(n_folds, shuffle=True, random_state=seed)
    pred = np.empty_like(y)
    alphas_used = []
    for fit_idx, test_idx in splitter.split(x, groups=groups):
        dec = ridge_decode(x[fit_idx], y[fit_idx], x[test_idx], y[test_idx], alphas)
        pred[test_idx] = dec.predicted
        alphas_used.append(dec.alpha)
    r2, per_out, per_time = _scores(y, pred)
    return Decoding(r2, per_out, per_time, float(np.median(alphas_used)), pred,
                    int(round(x.shape[0] * (n_folds - 1) / n_folds)), x.shape[0])


def reach_direction(velocity: np.ndarray, start_bin: int, stop_bin: int, n_directions: int = 8) -> np.ndarray:
    """A reach-direction label per trial from hand velocity (trial, time, 2): the angle of the mean
    velocity over bins ``start_bin:stop_bin``, binned into ``n_directions`` sectors centred on
    0, 360 / n, ... degrees. Returns integer labels 0 .. n - 1 (sector k is centred on k * 360 / n)."""
    vel = np.asarray(velocity, dtype=np.float64)
    if vel.ndim != 3 or vel.shape[-1] < 2:
        raise ValueError(f"velocity: expected (trial, time, 2), got shape {vel.shape}")
    mean = vel[:, start_bin:stop_bin, :2].mean(1)
    angle = np.degrees(np.arctan2(mean[:, 1], mean[:, 0])) % 360
    width = 360.0 / n_directions
    return (np.floor((angle + width / 2) / width).astype(int)) % n_directions


# ----- interventions -------------------------------------------------------------------------------
@dataclass
class PriorResponse(_Summary):
    """The prior's response from given starts: the noise-free path and the mean rates over draws.

    Attributes
    ----------
    z_mean_path : (trial, time, D) noise-free path (every ``v_t`` at its mean).
    rates : (trial, time, neuron) mean over ``n_draws`` prior draws (expected counts per bin).
    n_draws : draws per start.
    """

    z_mean_path: np.ndarray
    rates: np.ndarray
    n_draws: int

    _LARGE = ("z_mean_path", "rates")


@torch.no_grad()
def prior_response(model: Any, z0: torch.Tensor, v0: torch.Tensor, n_bins: int, n_draws: int = 20,
                   seed: int = 0) -> PriorResponse:
    """The prior from fixed starts: ``poutine.do(model, {"z_0": z0, "v_0": v0})``.

    The rates are averaged over ``n_draws`` noisy prior draws per start (all in one vectorised pass:
    the starts are tiled along the trial plate). The random stream is seeded, so two calls with the
    same ``seed`` and sizes draw the same noise: a difference between two responses is then the
    intervention's, not Monte Carlo noise (common random numbers).
    """
    z0, v0 = torch.as_tensor(z0), torch.as_tensor(v0)
    if z0.shape != v0.shape or z0.dim() != 2 or z0.shape[1] != model.latent_dim:
        raise ValueError(f"z0, v0: expected two (trial, {model.latent_dim}) tensors, got {tuple(z0.shape)} and "
                         f"{tuple(v0.shape)}")
    n = z0.shape[0]
    mean = prior_rollout(model, z0, v0, n_bins)
    with pyro.poutine.seed(rng_seed=seed), eval_mode(model):
        data = {"z_0": z0.repeat(n_draws, 1), "v_0": v0.repeat(n_draws, 1)}
        trace = poutine.trace(poutine.do(model, data=data)).get_trace(n_trials=n * n_draws, n_bins=n_bins)
    rates = trace.nodes["rates"]["value"].reshape(n_draws, n, n_bins, -1).mean(0)
    return PriorResponse(mean["z"], rates.cpu().numpy(), int(n_draws))


def with_stiffness(model: Any, stiffness_matrix: Any) -> Any:
    """A copy of ``model`` whose potential is the fixed quadratic ``0.5 z^T S z`` (plus the original
    quartic term, if any); ``model`` itself is untouched (its parameters are not shared).

    Raises
    ------
    ValueError
        If the step would be unstable with ``S`` (``omega dt >= sqrt(2)``).
    """
    s = torch.as_tensor(np.asarray(stiffness_matrix))
    quartic = float(getattr(model.potential, "quartic", 0.0))
    pot = FixedStiffnessPotential(s.to(next(model.parameters()).dtype), quartic=quartic)
    if not model.dynamics.overdamped and pot.max_omega * model.dynamics.dt >= math.sqrt(2):
        raise ValueError(f"stiffness: largest frequency {pot.max_omega:.3g} rad per unit makes the step with "
                         f"dt={model.dynamics.dt} unstable (omega dt >= sqrt(2))")
    new = copy.deepcopy(model)
    new.potential = pot.to(next(model.parameters()).device)
    return new


def _oscillator_stiffness(model: Any) -> np.ndarray:
    if not hasattr(model.potential, "stiffness_matrix"):
        raise ValueError(f"the potential ({type(model.potential).__name__}) has no stiffness matrix to cut; "
                         "potential interventions need a quadratic potential (the oscillators)")
    return stiffness(model.potential)[0]


def decoupled(model: Any) -> Any:
    """``model`` with the coupling set to zero: a copy whose stiffness keeps only the diagonal of
    the fitted ``S`` (each unit keeps the stiffness it feels with every other unit at rest)."""
    s = _oscillator_stiffness(model)
    return with_stiffness(model, np.diag(np.diag(s)))


def _site_units(model: Any, site: int) -> np.ndarray:
    pot = model.potential
    channels, sites = getattr(pot, "channels", 1), getattr(pot, "sites", pot.latent_dim)
    if not 0 <= site < sites:
        raise ValueError(f"site must be in 0 .. {sites - 1}, got {site}")
    return np.arange(channels) * sites + site  # z viewed as (channels, sites)


def without_site(model: Any, site: int) -> Any:
    """``model`` with one oscillator (lattice site: its ``channels`` units) removed from the lattice:
    a copy whose stiffness has every coupling between that site's units and the others cut. The
    site's units keep their own stiffness, so they still move (and are still read by the decoder),
    but they no longer push or feel the rest."""
    s = _oscillator_stiffness(model).copy()
    units = _site_units(model, site)
    others = np.setdiff1d(np.arange(s.shape[0]), units)
    s[np.ix_(units, others)] = 0.0
    s[np.ix_(others, units)] = 0.0
    return with_stiffness(model, s)


def strongest_site(model: Any) -> int:
    """The lattice site whose units are most strongly coupled to the rest (Frobenius norm of their
    off-block stiffness)."""
    s = _oscillator_stiffness(model)
    sites = getattr(model.potential, "sites", model.latent_dim)
    norms = []
    for j in range(sites):
        units = _site_units(model, j)
        others = np.setdiff1d(np.arange(s.shape[0]), units)
        norms.append(np.linalg.norm(s[np.ix_(units, others)]))
    return int(np.argmax(norms))


def dominant_mode(modes: NormalModes, z: np.ndarray) -> int:
    """Index of the normal mode along which posterior positions ``z`` (..., D) have the largest mean square."""
    coords = np.asarray(z).reshape(-1, modes.modes.shape[0]) @ modes.modes
    return int(np.argmax((coords**2).mean(0)))


@dataclass
class Intervention(_Summary):
    """One counterfactual and its effect against the baseline (the fitted prior from the same starts).

    Attributes
    ----------
    name, description : what was changed.
    latent_shift_per_time : (time,) RMS over trials of ``|z_int - z_base|`` on the noise-free paths.
    psth_shift_hz : (neuron,) RMS over conditions and bins of the change of each neuron's PSTH (Hz).
    psth_shift_relative : (neuron,) the same over the RMS modulation of the baseline PSTH about its
        mean (1: the change is as large as the neuron's own modulation).
    psth_hz : (condition, time, neuron) the intervened PSTH.
    """

    name: str
    description: str
    latent_shift_per_time: np.ndarray
    psth_shift_hz: np.ndarray
    psth_shift_relative: np.ndarray
    psth_hz: np.ndarray

    _LARGE = ("latent_shift_per_time", "psth_shift_hz", "psth_shift_relative", "psth_hz")

    def summary(self) -> Dict[str, Any]:
        out = super().summary()
        out.update(jsonable({
            "psth_shift_hz_median": float(np.median(self.psth_shift_hz)),
            "psth_shift_hz_max": float(np.max(self.psth_shift_hz)),
            "psth_shift_relative_median": float(np.median(self.psth_shift_relative)),
            "most_moved_neurons": np.argsort(-self.psth_shift_relative)[:5],
            "latent_shift_max": float(np.nanmax(self.latent_shift_per_time)),
        }))
        return out


def intervention_suite(
    model: Any, modes: NormalModes, z0: torch.Tensor, v0: torch.Tensor, n_bins: int, z_paths: np.ndarray,
    conditions: Optional[Sequence] = None, n_draws: int = 20, seed: int = 0, strength: float = 2.0,
) -> Dict[str, Any]:
    """Four counterfactual prior predictives from the posterior starts ``(z0, v0)`` of real trials.

    * ``impulse``: ``do(v_0 = v0 + k e)``, ``e`` the dominant mode of ``z_paths`` (:func:`dominant_mode`),
      ``k = strength * sqrt(T / m)`` (``strength`` stationary velocity s.d.);
    * ``displaced_start``: ``do(z_0 = z0 + k e)``, ``k = strength * sqrt(T / lambda_e)``;
    * ``coupling_off``: :func:`decoupled` copy of the model, same starts;
    * ``site_removed``: :func:`without_site` copy, the :func:`strongest_site` cut out.

    The baseline is ``do(z_0 = z0, v_0 = v0)`` on the fitted model. All runs share the seed, so the
    prior noise is the same draw in each (common random numbers).

    Returns
    -------
    dict
        ``"baseline"`` (:class:`PriorResponse`), ``"baseline_psth_hz"`` (condition, time, neuron),
        ``"interventions"`` (name -> :class:`Intervention`), ``"mode_index"``, ``"mode_frequency_hz"``,
        ``"site"``.
    """
    bin_s = bin_seconds(model)
    ref = next(model.parameters())
    z0 = torch.as_tensor(z0, dtype=ref.dtype, device=ref.device)
    v0 = torch.as_tensor(v0, dtype=ref.dtype, device=ref.device)
    k = dominant_mode(modes, z_paths)
    e = torch.as_tensor(modes.modes[:, k], dtype=ref.dtype, device=ref.device)
    lam = max(float(modes.eigenvalues_per_unit2[k]), 1e-12)
    kick_v = strength * math.sqrt(modes.temperature / modes.mass)
    kick_z = strength * math.sqrt(modes.temperature / lam)

    def respond(m: Any, z: torch.Tensor, v: torch.Tensor) -> PriorResponse:
        return prior_response(m, z, v, n_bins, n_draws=n_draws, seed=seed)

    base = respond(model, z0, v0)
    base_psth = condition_average(base.rates, conditions) / bin_s
    results: Dict[str, Intervention] = {}
    site = strongest_site(model) if hasattr(model.potential, "stiffness_matrix") else None
    runs = [
        ("impulse", f"do(v_0 = v_0 + {kick_v:.3g} e): a kick of {strength:g} stationary velocity s.d. along mode {k} "
                    f"({modes.frequency_hz[k]:.2f} Hz)", lambda: respond(model, z0, v0 + kick_v * e)),
        ("displaced_start", f"do(z_0 = z_0 + {kick_z:.3g} e): a start {strength:g} stationary s.d. along mode {k}",
         lambda: respond(model, z0 + kick_z * e, v0)),
    ]
    if site is not None:
        runs += [
            ("coupling_off", "a copy of the model with every off-diagonal stiffness set to zero (diagonal kept)",
             lambda: respond(decoupled(model), z0, v0)),
            ("site_removed", f"a copy of the model with lattice site {site} (the most strongly coupled) cut from "
                             "its neighbours", lambda: respond(without_site(model, site), z0, v0)),
        ]
    modulation = np.sqrt(((base_psth - base_psth.mean(axis=(0, 1), keepdims=True)) ** 2).mean(axis=(0, 1)))
    for name, text, run in runs:
        r = run()
        psth_hz = condition_average(r.rates, conditions) / bin_s
        shift = np.sqrt(((psth_hz - base_psth) ** 2).mean(axis=(0, 1)))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(modulation > 0, shift / np.where(modulation > 0, modulation, 1.0), np.nan)
        dz = np.sqrt(((r.z_mean_path - base.z_mean_path) ** 2).sum(-1).mean(0))
        results[name] = Intervention(name, text, dz, shift, rel, psth_hz)
    return {"baseline": base, "baseline_psth_hz": base_psth, "interventions": results, "mode_index": k,
            "mode_frequency_hz": float(modes.frequency_hz[k]), "site": site}
