"""Figures of a fitted recording (matplotlib, written to files), each from numbers computed elsewhere.

* :func:`plot_rasters`: example units: every trial's spikes (a raster, trials sorted by condition),
  the inferred rate of every trial (a heat map in Hz) and two example trials' rates with their
  posterior bands over their spikes;
* :func:`plot_psths`: PSTHs by condition: the observed mean rate and the model's condition-averaged
  rate with its posterior band;
* :func:`plot_latents`: the condition-averaged latent paths on their top principal components;
* :func:`plot_cv`: each fold's co-bps of the model and of the smoothing baseline, paired;
* :func:`plot_shared_latents`: a stitched fit's sessions' condition-averaged latents on one plane.

They take a :class:`~pyro_langevin.recording.summary.PosteriorSummary` (and the recording's axes) or
cross-validation records, and return a ``Figure``; :func:`save_figures` writes them all as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402

from pyro_langevin.recording.data import Recording  # noqa: E402
from pyro_langevin.recording.summary import PosteriorSummary, latent_components  # noqa: E402

__all__ = ["example_units", "example_trials", "plot_rasters", "plot_psths", "plot_latents", "plot_cv", "save_figures",
           "plot_shared_latents"]


_MAGMA = plt.get_cmap("magma").with_extremes(bad="white")  # padding (NaN) in white
_GREYS = plt.get_cmap("Greys").with_extremes(bad=(0.85, 0.92, 1.0))  # padding in pale blue


def _colours(n: int) -> List[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def example_units(recording: Recording, k: int = 4) -> List[int]:
    """Columns of the ``k`` units with the highest mean rate (they show the most in a raster)."""
    return [int(u) for u in np.argsort(-recording.mean_rates_hz(), kind="stable")[:k]]


def example_trials(summary: PosteriorSummary, k: int = 2) -> List[int]:
    """Rows of ``k`` example trials: the first trial of each of the first ``k`` conditions (or the first ``k``)."""
    rows = [int(np.flatnonzero(summary.trial_condition == c)[0]) for c in range(len(summary.conditions))][:k]
    return rows if len(rows) == k else list(range(min(k, len(summary.trial_condition))))


def _time_label(recording: Recording) -> str:
    return f"time from {recording.align} (ms)"


def plot_rasters(recording: Recording, summary: PosteriorSummary, units: Optional[Sequence[int]] = None,
                 trials: Optional[Sequence[int]] = None):
    """Rasters with inferred rates for example units (rows): all trials' spikes, all trials' inferred
    rates (Hz), and example trials' posterior mean and band over their spikes."""
    units = example_units(recording) if units is None else list(units)
    trials = example_trials(summary) if trials is None else list(trials)
    hz = 1000.0 / recording.bin_ms
    order = np.lexsort((np.arange(recording.n_trials), summary.trial_condition))
    colours = _colours(len(summary.conditions))
    t = recording.time_ms
    edges = (t[0] - recording.bin_ms / 2, t[-1] + recording.bin_ms / 2)
    fig, axes = plt.subplots(len(units), 3, figsize=(14, 2.6 * len(units) + 0.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0, 1.15, 1.0]})
    for i, u in enumerate(units):
        uid = recording.unit_ids[u]
        ax = axes[i, 0]
        counts = np.where(recording.observed[order], recording.counts[order, :, u], np.nan)
        top = max(1, int(np.nanmax(counts)))
        image = ax.imshow(counts, aspect="auto", cmap=_GREYS, interpolation="none", vmin=0, vmax=top,
                          extent=(edges[0], edges[1], recording.n_trials - 0.5, -0.5))
        fig.colorbar(image, ax=ax, label=f"spikes per {recording.bin_ms:g} ms bin", ticks=range(top + 1))
        if len(summary.conditions) > 1:  # condition of each row, as a colour strip on the left
            starts = np.flatnonzero(np.diff(np.r_[-1, summary.trial_condition[order]]))
            for y0, y1 in zip(starts, np.r_[starts[1:], recording.n_trials]):
                ax.axhspan(y0 - 0.5, y1 - 0.5, xmin=0, xmax=0.015, color=colours[summary.trial_condition[order][y0]])
        ax.set_ylabel("trial (by condition)" if len(summary.conditions) > 1 else "trial")
        ax.set_title(f"unit {uid}: spike counts ({recording.mean_rates_hz()[u]:.1f} Hz mean)", fontsize=10)
        ax = axes[i, 1]
        image = ax.imshow(summary.rates_mean[order, :, u] * hz, aspect="auto", cmap=_MAGMA, interpolation="none",
                          extent=(edges[0], edges[1], recording.n_trials - 0.5, -0.5))
        fig.colorbar(image, ax=ax, label="inferred rate (Hz)")
        ax.set_title(f"unit {uid}: posterior-mean rate, every trial", fontsize=10)
        ax = axes[i, 2]
        for j, row in enumerate(trials):
            colour = f"C{j}"
            ax.fill_between(t, summary.rates_lower[row, :, u] * hz, summary.rates_upper[row, :, u] * hz, color=colour,
                            alpha=0.25, lw=0)
            ax.plot(t, summary.rates_mean[row, :, u] * hz, color=colour,
                    label=f"trial {recording.trial_ids[row]}" + (f" ({summary.conditions[summary.trial_condition[row]]})"
                                                                 if len(summary.conditions) > 1 else ""))
            spikes = np.flatnonzero(recording.counts[row, :, u] > 0)  # ticks along the bottom, one row per trial
            ax.scatter(t[spikes], np.full(spikes.size, 0.04 + 0.06 * j), marker="|", s=40, color=colour,
                       transform=ax.get_xaxis_transform())
        ax.set_xlim(*edges)
        ax.set_ylim(bottom=-0.15 * ax.get_ylim()[1])
        ax.set_ylabel("rate (Hz)")
        ax.set_title(f"unit {uid}: {len(trials)} trials, mean, {int(summary.prob * 100)}% band, spikes", fontsize=10)
        if i == 0:
            ax.legend(fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel(_time_label(recording))
    handles = [plt.matplotlib.patches.Patch(color=c) for c in colours]
    if len(summary.conditions) > 1:
        fig.legend(handles, [f"condition {c}" for c in summary.conditions], loc="lower center",
                   ncol=min(8, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(f"Binned spike rasters and inferred rates of the {len(units)} units with the highest mean rate "
                 f"({recording.n_trials} trials, {recording.bin_ms:g} ms bins)", fontsize=12)
    fig.tight_layout(rect=(0, 0.04 if len(summary.conditions) > 1 else 0, 1, 0.97))
    return fig


def plot_psths(recording: Recording, summary: PosteriorSummary, units: Optional[Sequence[int]] = None):
    """PSTHs by condition for example units: observed mean rate (thin, +- s.e. dotted band) and the
    model's condition-averaged rate with its posterior band."""
    units = example_units(recording, 6) if units is None else list(units)
    hz = 1000.0 / recording.bin_ms
    colours = _colours(len(summary.conditions))
    ncol = min(3, len(units))
    nrow = int(np.ceil(len(units) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.0 * nrow + 0.8), squeeze=False, sharex=True)
    t = recording.time_ms
    for ax, u in zip(axes.flat, units):
        for c, colour in enumerate(colours):
            ax.fill_between(t, summary.cond_rates_lower[c, :, u] * hz, summary.cond_rates_upper[c, :, u] * hz,
                            color=colour, alpha=0.25, lw=0)
            ax.plot(t, summary.cond_rates_mean[c, :, u] * hz, color=colour, lw=1.8)
            ax.plot(t, summary.psth[c, :, u] * hz, color=colour, lw=0.8, ls="--")
        ax.set_title(f"unit {recording.unit_ids[u]}", fontsize=10)
        ax.axvline(0.0, color="0.6", lw=0.6)
    for ax in axes.flat[len(units):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("rate (Hz)")
    for ax in axes[-1]:
        ax.set_xlabel(_time_label(recording))
    handles = [plt.Line2D([], [], color="k", lw=1.8), plt.Line2D([], [], color="k", lw=0.8, ls="--"),
               plt.matplotlib.patches.Patch(color="k", alpha=0.25)]
    labels = ["model (condition average)", "observed PSTH", f"{int(summary.prob * 100)}% posterior band"]
    if len(summary.conditions) > 1:
        handles += [plt.matplotlib.patches.Patch(color=c) for c in colours][:12]
        labels += [f"condition {c}" for c in summary.conditions][:12]
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    by = "by condition" if len(summary.conditions) > 1 else "over all trials (no --condition)"
    fig.suptitle(f"PSTHs {by}: observed vs LangevinFlow ({summary.n_draws} posterior draws)", fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return fig


def plot_latents(recording: Recording, summary: PosteriorSummary, components: Optional[Dict[str, Any]] = None,
                 trials_per_condition: Optional[int] = None):
    """Latent paths by condition: the condition-averaged latents on their top principal components,
    as paths in the PC1-PC2 plane (dot: first bin, cross: the alignment event; thin: a few single
    trials' posterior means on the same components: 5 per condition, 10 without conditions) and over
    time with their posterior bands. The components are those of the condition averages, or of the
    single trials when there is one condition (:func:`~pyro_langevin.recording.summary.latent_components`)."""
    pcs = latent_components(summary) if components is None else components
    if trials_per_condition is None:
        trials_per_condition = 5 if len(summary.conditions) > 1 else 10
    k = pcs["mean"].shape[-1]
    colours = _colours(len(summary.conditions))
    t = recording.time_ms
    zero = int(np.argmin(np.abs(t)))
    fig = plt.figure(figsize=(13, 2.4 * k + 1.2))
    grid = fig.add_gridspec(k, 2, width_ratios=[1.1, 1.4])
    ax = fig.add_subplot(grid[:, 0])
    single = (summary.latents_mean.astype(np.float64) - pcs["centre"]) @ pcs["axes"]  # (trial, time, k)
    for c, colour in enumerate(colours):
        for row in np.flatnonzero(summary.trial_condition == c)[:trials_per_condition]:
            ax.plot(single[row, :, 0], single[row, :, 1] if k > 1 else t, color=colour, lw=0.5, alpha=0.35)
    for c, colour in enumerate(colours):
        path = pcs["mean"][c]
        name = f"condition {summary.conditions[c]}" if len(colours) > 1 else summary.conditions[c]
        ax.plot(path[:, 0], path[:, 1] if k > 1 else t, color=colour, lw=2.0, label=f"{name} (average)")
        ax.scatter(path[0, 0], path[0, 1] if k > 1 else t[0], color=colour, s=18)
        if t[0] <= 0 <= t[-1]:
            ax.scatter(path[zero, 0], path[zero, 1] if k > 1 else t[zero], color=colour, marker="x", s=30)
    ax.set_xlabel(f"latent PC 1 ({100 * pcs['explained'][0]:.0f}% of variance)")
    ax.set_ylabel(f"latent PC 2 ({100 * pcs['explained'][1]:.0f}% of variance)" if k > 1 else _time_label(recording))
    ax.set_title(f"averaged (thick) and single-trial (thin) posterior-mean paths\n(dot: {t[0]:g} ms, cross: "
                 f"{recording.align})", fontsize=10)
    if len(summary.conditions) <= 12:
        ax.legend(fontsize=7, loc="best")
    for i in range(k):
        axi = fig.add_subplot(grid[i, 1])
        for c, colour in enumerate(colours):
            axi.fill_between(t, pcs["lower"][c, :, i], pcs["upper"][c, :, i], color=colour, alpha=0.25, lw=0)
            axi.plot(t, pcs["mean"][c, :, i], color=colour, lw=1.3)
        axi.axvline(0.0, color="0.6", lw=0.6)
        axi.set_ylabel(f"PC {i + 1}")
        if i == 0:
            axi.set_title(f"latent PCs over time, {int(summary.prob * 100)}% posterior band", fontsize=10)
        if i == k - 1:
            axi.set_xlabel(_time_label(recording))
    by = "by condition" if len(summary.conditions) > 1 else "over all trials (no --condition)"
    whose = "condition averages" if pcs["basis"] == "conditions" else "single trials"
    fig.suptitle(f"Latent paths {by} ({summary.latents_mean.shape[-1]} latent dimensions; top {k} principal "
                 f"components of the {whose})", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_cv(records: Sequence[Dict[str, Any]], summary: Dict[str, Any]):
    """Each fold's held-out co-bps for the smoothing baseline and LangevinFlow (paired lines), with the
    mean +- s.e. over folds."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    base = [r["smoothing"]["co-bps"] for r in records]
    model = [r["model"]["co-bps"] for r in records]
    for f, (b, m) in enumerate(zip(base, model)):
        ax.plot([0, 1], [b, m], "-o", color="0.6", ms=4, lw=0.8, label="one fold" if f == 0 else None)
    for x, who in ((0, "smoothing"), (1, "model")):
        s = summary[who]["co-bps"]
        ax.errorbar([x + 0.12], [s["mean"]], yerr=[s["se"]], fmt="s", color="C3", capsize=4,
                    label="mean +- s.e." if x == 0 else None)
    ax.set_xticks([0, 1], ["smoothing baseline", "LangevinFlow"])
    ax.set_xlim(-0.4, 1.5)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_ylabel("co-bps on held-out units (bits / spike)")
    d = summary["difference"]["co-bps"]
    ax.set_title(f"{len(records)}-fold cross-validation: co-bps difference\n(LangevinFlow - smoothing) "
                 f"{d['mean']:+.3f} +- {d['se']:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def save_figures(out: Union[str, Path], recording: Recording, summary: PosteriorSummary,
                 cv: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """Write ``rasters.png``, ``psth.png``, ``latents.png`` (and ``cv.png`` with cross-validation
    results) into ``out``; return name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = {"rasters": plot_rasters(recording, summary), "psth": plot_psths(recording, summary),
            "latents": plot_latents(recording, summary)}
    if cv is not None and cv.get("folds"):
        figs["cv"] = plot_cv(cv["folds"], cv["summary"])
    written = {}
    for name, fig in figs.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[name] = path
    return written


def plot_shared_latents(plane: Dict[str, Any]):
    """Every session's condition-averaged latent paths in one shared plane
    (:func:`~pyro_langevin.recording.summary.shared_latent_plane`): colour = condition, line style and
    marker = session (dot: first bin)."""
    conditions = sorted({c for labels in plane["conditions"].values() for c in labels})
    colour = dict(zip(conditions, _colours(len(conditions))))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    for j, (name, paths) in enumerate(plane["paths"].items()):
        for c, label in enumerate(plane["conditions"][name]):
            ax.plot(paths[c, :, 0], paths[c, :, 1], styles[j % len(styles)], color=colour[label], lw=1.5)
            ax.scatter(paths[c, 0, 0], paths[c, 0, 1], color=colour[label], s=14)
    ax.set_xlabel(f"shared latent PC 1 ({100 * plane['explained'][0]:.0f}% of variance)")
    ax.set_ylabel(f"shared latent PC 2 ({100 * plane['explained'][1]:.0f}% of variance)")
    ax.set_title(f"{len(plane['paths'])} sessions, one latent space: condition averages\n(colour: condition, "
                 "line style: session, dot: first bin)", fontsize=10)
    handles = [Line2D([], [], ls=styles[j % len(styles)], color="0.25", label=name) for j, name in enumerate(plane["paths"])]
    if len(conditions) <= 12:
        handles += [Line2D([], [], color=colour[c], label=f"condition {c}") for c in conditions]
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    return fig
