"""Figures of the dynamics readout (:mod:`pyro_langevin.dynamics`): each function takes the numbers
that module returns and returns a matplotlib ``Figure`` (labelled axes with units, a title, legends);
:func:`save` writes it as a small PNG.

Kept apart from :mod:`pyro_langevin.plots` (the predictive-check figures) because these take the
readout's dataclasses, not ArviZ data, and import nothing of ArviZ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pyro_langevin.dynamics import (  # noqa: E402
    Decoding, Energetics, FlowField, Intervention, NormalModes, PowerSpectrum, RotationFit,
)

__all__ = [
    "save", "direction_palette", "plot_modes", "plot_energy", "plot_flow_field", "plot_rotation", "plot_state_alignment",
    "plot_velocity_decoding", "plot_interventions",
]


def save(fig: "plt.Figure", path: Union[str, Path], dpi: int = 100) -> Path:
    """Write ``fig`` as PNG (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def direction_palette(n_directions: int) -> dict:
    """Colours of reach-direction labels 0 .. n - 1 on a colour wheel (the same in every figure)."""
    cmap = plt.get_cmap("hsv")
    return {k: cmap(0.9 * k / n_directions) for k in range(n_directions)}


def _condition_colours(conditions: Optional[Sequence], n: int, cyclic: bool,
                       palette: Optional[Mapping] = None) -> tuple[list, list, list]:
    """Per-trial colours, and the sorted labels with their colours (for a legend); ``palette``
    (label -> colour) fixes them across figures."""
    labels = np.zeros(n, dtype=int) if conditions is None else np.asarray(conditions)
    uniq = list(np.unique(labels))
    cmap = plt.get_cmap("hsv" if cyclic else "viridis")
    denom = len(uniq) if cyclic else max(len(uniq) - 1, 1)
    colour_of = {u: cmap(k / denom * (0.9 if cyclic else 1.0)) for k, u in enumerate(uniq)}
    if palette is not None:
        colour_of.update({u: palette[u] for u in uniq if u in palette})
    return [colour_of[c] for c in labels], uniq, [colour_of[u] for u in uniq]


def plot_modes(modes: NormalModes, spectrum: Optional[PowerSpectrum] = None, reference_hz: Optional[float] = None,
               reference_label: str = "reference", spectrum_label: str = "data PSTH power") -> "plt.Figure":
    """Normal modes (natural, damped and discrete-step frequencies with damping ratios) and, beside
    them, the data's PSTH power spectrum with the modes' damped frequencies marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax = axes[0]
    idx = np.arange(len(modes.frequency_hz))
    ax.plot(idx, modes.frequency_hz, "o", color="C0", label="natural frequency")
    ax.plot(idx, modes.damped_frequency_hz, "s", color="C1", ms=4, label="damped frequency")
    ax.plot(idx, modes.step_frequency_hz, "x", color="C2", label=f"discrete step (dt = {100 * modes.dt_units:g} ms)")
    ax.set_xlabel("mode (sorted by stiffness)")
    ax.set_ylabel("frequency (Hz)")
    ax2 = ax.twinx()
    ax2.plot(idx, modes.damping_ratio, "-", color="0.5", lw=1, label="damping ratio (right axis)")
    ax2.axhline(1.0, color="0.5", ls=":", lw=1)
    ax2.set_ylabel("damping ratio zeta (1: critical)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    ax.set_title(f"Normal modes of the learned potential\n(gamma = {modes.gamma_per_unit:.3g} per 100 ms, "
                 f"T = {modes.temperature:.3g}, S from {modes.source.replace('_', ' ')})", fontsize=10)
    ax = axes[1]
    if spectrum is not None:
        ax.plot(spectrum.frequency_hz, spectrum.power, "k", lw=1.5, label=spectrum_label)
        ax.set_ylabel("normalised power (per frequency bin)")
    top = ax.get_ylim()[1] if spectrum is not None else 1.0
    for k, f in enumerate(modes.damped_frequency_hz):
        ax.axvline(f, ymax=0.12, color="C1", lw=1.2, label="model modes (damped)" if k == 0 else None)
    if reference_hz is not None:
        ax.axvline(reference_hz, color="C3", ls="--", lw=1.5, label=f"{reference_label}: {reference_hz:.2f} Hz")
    hi = max(float(np.max(modes.frequency_hz)) * 1.3, (reference_hz or 0) * 1.5, 5.0)
    if spectrum is not None:
        hi = min(hi, float(spectrum.frequency_hz[-1]))
        ax.set_title(f"Spectrum of the data vs the model's modes\n(resolution {spectrum.resolution_hz:.2f} Hz, "
                     f"peak {spectrum.peak_hz:.2f} Hz)", fontsize=10)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, top)
    ax.set_xlabel("frequency (Hz)")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _band(ax, t: np.ndarray, x: np.ndarray, colour: str, label: str) -> None:
    m, s = np.nanmean(x, 0), np.nanstd(x, 0)
    ax.plot(t, m, color=colour, lw=1.5, label=label)
    ax.fill_between(t, m - s, m + s, color=colour, alpha=0.2)


def _event(ax, event_ms: Optional[float], label: Optional[str]) -> None:
    if event_ms is not None:
        ax.axvline(event_ms, color="k", ls="--", lw=1, label=label)


def plot_energy(en: Energetics, time_ms: Optional[np.ndarray] = None, event_ms: Optional[float] = None,
                event_label: str = "movement onset", n_observed_bins: Optional[int] = None) -> "plt.Figure":
    """Kinetic and potential energy over time (mean and s.d. over trials), the force share over
    time and the per-trial force shares."""
    t = en.time_ms if time_ms is None else time_ms
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True,
                             gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]})
    ax = axes[0]
    _band(ax, t, en.kinetic_energy, "C0", "kinetic m|v|^2/2")
    _band(ax, t, en.potential_energy, "C1", "potential U(z)")
    ax.axhline(en.equipartition_kinetic_energy, color="0.3", ls=":", lw=1,
               label="equilibrium mean D T / 2 (kinetic; potential too if U is quadratic)")
    _event(ax, event_ms, event_label)
    if n_observed_bins is not None and n_observed_bins < len(t):
        ax.axvspan(t[n_observed_bins], t[-1], color="0.9", label="forward bins (no data)")
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("energy (model units)")
    ax.set_title("Energy along posterior-mean paths (mean +- s.d. over trials)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    ax = axes[1]
    ax.plot(t, en.force_share_per_time, "C2", lw=1.5, label="potential / (potential + guide), over trials")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("force share")
    ax2 = ax.twinx()
    ax2.plot(t, en.guide_force_over_noise_per_time, "C3", lw=1, alpha=0.7, label="RMS guide force / prior noise (right)")
    ax2.set_ylabel("guide force / prior noise per step")
    _event(ax, event_ms, event_label)
    ax.set_xlabel("time (ms)")
    ax.set_title(f"Share of velocity change from the potential (overall {en.force_share:.2f})", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17),
              ncol=2)
    ax = axes[2]
    ax.hist(en.force_share_per_trial, bins=np.linspace(0, 1, 21), color="C2", alpha=0.8, label="trials")
    ax.axvline(en.force_share, color="k", lw=1, label="all trials pooled")
    ax.set_xlabel("force share per trial")
    ax.set_ylabel("trials")
    ax.set_title("Force share per trial", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17))
    return fig


def plot_flow_field(flow: FlowField, conditions: Optional[Sequence] = None, condition_names: Optional[Mapping] = None,
                    cyclic: bool = False, max_paths: int = 40, title: str = "",
                    palette: Optional[Mapping] = None) -> "plt.Figure":
    """Energy contours and force arrows of the potential on the top-2 PC plane, posterior paths
    (solid, dot at the start) and noise-free prior rollouts from the same starts (dashed), coloured
    by condition."""
    fig, ax = plt.subplots(figsize=(7.5, 6.2), constrained_layout=True)
    xx, yy = np.meshgrid(flow.grid_pc1, flow.grid_pc2)
    cs = ax.contourf(xx, yy, flow.energy, levels=15, cmap="Greys", alpha=0.45)
    fig.colorbar(cs, ax=ax, label="potential energy U (model units)")
    norm = np.hypot(flow.force_pc1, flow.force_pc2)
    scale = np.where(norm > 0, norm, 1.0) ** 0.5  # arrow length ~ sqrt(|F|): direction stays readable
    ax.quiver(xx, yy, flow.force_pc1 / scale, flow.force_pc2 / scale, color="0.35", width=0.003)
    n = flow.paths.shape[0]
    colours, uniq, ucol = _condition_colours(conditions, n, cyclic, palette)
    rng = np.random.default_rng(0)
    shown = np.sort(rng.choice(n, size=min(n, max_paths), replace=False))
    for i in shown:
        ax.plot(*flow.paths[i].T, color=colours[i], lw=1.2, alpha=0.9)
        ax.plot(*flow.paths[i, 0], "o", color=colours[i], ms=3)
        if flow.prior_paths is not None:
            ax.plot(*flow.prior_paths[i].T, color=colours[i], lw=0.8, ls="--", alpha=0.8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", lw=1.2, label="posterior-mean path (dot: start)"),
               Line2D([], [], color="0.3", lw=0.8, ls="--", label="prior rollout (no noise, no guide force)"),
               Line2D([], [], color="0.35", marker=r"$\rightarrow$", lw=0, ms=10, label="force -grad U (length ~ sqrt)")]
    if conditions is not None and len(uniq) <= 12:
        handles += [Line2D([], [], color=c, lw=2, label=str((condition_names or {}).get(u, u))) for u, c in zip(uniq, ucol)]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85)
    r = flow.explained_variance_ratio
    ax.set_xlabel(f"PC 1 of posterior z ({100 * r[0]:.0f}% of variance; latent units)")
    ax.set_ylabel(f"PC 2 of posterior z ({100 * r[1]:.0f}% of variance; latent units)")
    ax.set_title(title or f"Learned potential on the top-2 PC plane ({len(shown)} of {n} trials)", fontsize=10)
    return fig


def plot_rotation(fits: Mapping[str, RotationFit], conditions: Optional[Sequence] = None,
                  condition_names: Optional[Mapping] = None, cyclic: bool = False, title: str = "",
                  palette: Optional[Mapping] = None) -> "plt.Figure":
    """Condition-averaged paths in the top rotational (jPCA) plane of each fit, one panel per fit,
    with the fit's R^2 (skew-symmetric and unconstrained) and the plane's frequency.

    ``conditions``: the label of each averaged path (rows of ``projection``, sorted labels)."""
    fig, axes = plt.subplots(1, len(fits), figsize=(4.6 * len(fits), 4.9), constrained_layout=True, squeeze=False)
    for ax, (name, rot) in zip(axes[0], fits.items()):
        c = rot.projection.shape[0]
        labels = list(range(c)) if conditions is None else list(conditions)
        colours, _, _ = _condition_colours(labels, c, cyclic, palette)
        for k in range(c):
            p = rot.projection[k]
            label = None if conditions is None else str((condition_names or {}).get(labels[k], labels[k]))
            ax.plot(*p.T, color=colours[k], lw=1.5, label=label)
            ax.plot(*p[0], "o", color=colours[k], ms=4)
            ax.annotate("", xy=p[-1], xytext=p[-2], arrowprops=dict(arrowstyle="->", color=colours[k], lw=1.5))
        ax.set_xlabel("jPC 1 (units of the series)")
        ax.set_ylabel("jPC 2")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"{name.replace('_', ' ')}\nR^2 skew {rot.r2_skew:.2f}, full {rot.r2_full:.2f} "
                     f"(ratio {rot.skew_to_full_ratio:.2f})\ntop plane {rot.frequency_hz:.2f} Hz, "
                     f"{100 * rot.plane_variance_share:.0f}% of variance", fontsize=9)
    if conditions is not None and len(conditions) <= 12:
        fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, title="condition (dot: start)",
                   title_fontsize=7, loc="outside right center")
    fig.suptitle(title or "Condition-averaged paths in the top rotational plane", fontsize=10)
    return fig


def plot_state_alignment(truth: np.ndarray, aligned: np.ndarray, time_ms: np.ndarray, trials: Sequence[int] = (0, 1, 2),
                         r2_per_output: Optional[Sequence[float]] = None,
                         names: Sequence[str] = ("x", "y", "z"), title: str = "") -> "plt.Figure":
    """True states (trial, time, B) against the latents mapped onto them (ridge, held-out trials)."""
    b = truth.shape[-1]
    fig, axes = plt.subplots(b, len(trials), figsize=(3.6 * len(trials), 1.9 * b + 0.6), constrained_layout=True,
                             sharex=True, squeeze=False)
    for j, tr in enumerate(trials):
        for i in range(b):
            ax = axes[i, j]
            ax.plot(time_ms, truth[tr, :, i], "k", lw=2, label="true state")
            ax.plot(time_ms, aligned[tr, :, i], "C3", lw=1.3, label="latents mapped by ridge")
            if j == 0:
                r2 = "" if r2_per_output is None else f" (R^2 {r2_per_output[i]:.2f})"
                ax.set_ylabel(f"{names[i]} (standardised){r2}", fontsize=8)
            if i == 0:
                ax.set_title(f"held-out trial {tr}", fontsize=9)
            if i == b - 1:
                ax.set_xlabel("time (ms, model units)")
            ax.tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "Lorenz state recovered from the latents", fontsize=10)
    return fig


def plot_velocity_decoding(dec: Decoding, velocity: np.ndarray, time_ms: np.ndarray, conditions: Sequence,
                           condition_names: Optional[Mapping] = None, latent_paths_2d: Optional[np.ndarray] = None,
                           event_ms: Optional[float] = None, event_label: str = "movement onset",
                           avg_conditions: Optional[Sequence] = None, palette: Optional[Mapping] = None) -> "plt.Figure":
    """Hand-velocity decoding from latents on held-out trials: R^2 over time, condition-averaged
    true and decoded hand paths (velocity integrated over time), and condition-averaged latent
    paths on their top two PCs (``latent_paths_2d``, (condition, time, 2), one row per entry of
    ``avg_conditions``, the conditions averaged: default all)."""
    n_panels = 3 if latent_paths_2d is not None else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4.2), constrained_layout=True)
    ax = axes[0]
    ax.plot(time_ms, dec.r2_per_time, "C0", lw=1.5, label="R^2 across held-out trials at each bin")
    ax.axhline(dec.r2, color="C0", ls=":", label=f"all bins pooled: {dec.r2:.2f}")
    _event(ax, event_ms, event_label)
    ax.set_ylim(-1.0, 1.0)  # bins where the velocity hardly varies over trials (before onset) fall far below
    ax.text(0.02, 0.03, "while the hand is still, R^2 measures nothing\n(values below -1 not shown)",
            transform=ax.transAxes, fontsize=7, va="bottom")
    ax.set_xlabel("time (ms from trial start)" if event_ms is None else "time (ms)")
    ax.set_ylabel("R^2 (hand velocity x, y)")
    ax.set_title("Hand velocity decoded from latents (cross-validated ridge)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    labels = np.asarray(conditions)
    uniq = np.unique(labels) if avg_conditions is None else np.asarray(avg_conditions)
    colours, _, _ = _condition_colours(uniq, len(uniq), cyclic=True, palette=palette)
    dt_s = (time_ms[1] - time_ms[0]) / 1000.0
    ax = axes[1]
    for u, col in zip(uniq, colours):
        true_path = np.cumsum(velocity[labels == u].mean(0), axis=0) * dt_s
        dec_path = np.cumsum(dec.predicted[labels == u].mean(0), axis=0) * dt_s
        ax.plot(*true_path[:, :2].T, color=col, lw=2)
        ax.plot(*dec_path[:, :2].T, color=col, lw=1.2, ls="--")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", lw=2, label="true (condition mean)"),
               Line2D([], [], color="0.3", lw=1.2, ls="--", label="decoded")]
    handles += [Line2D([], [], color=c, lw=2, label=str((condition_names or {}).get(u, u))) for u, c in zip(uniq, colours)]
    ax.legend(handles=handles, fontsize=6, ncol=2, loc="best")
    ax.set_xlabel("hand x (mm, integrated velocity)")
    ax.set_ylabel("hand y (mm)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title("Condition-averaged hand paths: true vs decoded", fontsize=10)
    if latent_paths_2d is not None:
        ax = axes[2]
        for k, col in enumerate(colours):
            ax.plot(*latent_paths_2d[k].T, color=col, lw=1.5)
            ax.plot(*latent_paths_2d[k, 0], "o", color=col, ms=4)
        ax.set_xlabel("PC 1 of condition-averaged z (latent units)")
        ax.set_ylabel("PC 2 (latent units)")
        ax.set_title("Condition-averaged latent paths (dot: start)", fontsize=10)
    return fig


def plot_interventions(interventions: Mapping[str, Intervention], baseline_psth_hz: np.ndarray, time_ms: np.ndarray,
                       neuron: Optional[int] = None, condition: int = 0,
                       event_ms: Optional[float] = None, event_label: str = "movement onset") -> "plt.Figure":
    """Counterfactual prior predictives: latent displacement from the baseline over time, how far
    each neuron's PSTH moves (relative to its own modulation), and one neuron's PSTH under each."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    names = list(interventions)
    ax = axes[0]
    for k, name in enumerate(names):
        ax.plot(time_ms, interventions[name].latent_shift_per_time, color=f"C{k}", lw=1.5, label=name)
    _event(ax, event_ms, event_label)
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("|z - z_baseline| (latent units, RMS over trials)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    ax.set_title("Noise-free prior response to each intervention", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    data = [interventions[n].psth_shift_relative for n in names]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=15, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("PSTH change / PSTH modulation (per neuron)")
    ax.set_title("How far each neuron's PSTH moves (RMS over conditions and time)", fontsize=10)
    ax = axes[2]
    if neuron is None:  # the neuron whose PSTH moves most (Hz) over all interventions
        neuron = int(np.argmax(np.sum([interventions[n].psth_shift_hz for n in names], axis=0)))
    ax.plot(time_ms, baseline_psth_hz[condition, :, neuron], "k", lw=2, label="fitted prior (baseline)")
    for k, name in enumerate(names):
        ax.plot(time_ms, interventions[name].psth_hz[condition, :, neuron], color=f"C{k}", lw=1.2, label=name)
    _event(ax, event_ms, event_label)
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("predicted rate (Hz)")
    ax.set_title(f"Neuron {neuron}, condition {condition}: prior-predictive PSTH", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle("Interventions with pyro.poutine.do (starts from each trial's posterior z_0, v_0)", fontsize=11)
    return fig
