"""Figures (matplotlib, written to files; no display needed): fitted rates and latents, and the
predictive checks of :mod:`pyro_langevin.checks`.

Predictive-check figures (each returns a ``Figure``): hanging rootogram with a predictive band,
PSTH with credible bands, per-neuron Fano factor observed vs predicted, PIT histogram and ECDF
difference, plus ArviZ's own ``plot_ppc`` and ``plot_bpv`` where the data allow them (no
unobserved entries). :func:`save_ppc_figures` writes them all as PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: E402

from pyro_langevin.checks import neuron_statistics, observed_and_draws, psth, randomized_pit  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "plot_rates_and_latents",
    "plot_rootogram",
    "plot_psth",
    "plot_fano",
    "plot_pit",
    "plot_credible_intervals",
    "plot_evidence_compare",
    "save_ppc_figures",
]



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
    aligned_latents: Optional[np.ndarray] = None,
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
    aligned_latents : array, shape (trial, time, 3), optional
        The latents mapped onto the true states' coordinates (e.g. by
        :func:`pyro_langevin.dynamics.ridge_decode`); drawn instead of the principal components.
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
    if aligned_latents is None:
        _latent_panel(fig.add_subplot(bottom[0, 0], projection="3d"), _top_components(latents), trials, colours,
                      "inferred latents z (top 3 principal components)", ("PC 1", "PC 2", "PC 3"))
    else:
        _latent_panel(fig.add_subplot(bottom[0, 0], projection="3d"), aligned_latents, trials, colours,
                      "inferred latents mapped to Lorenz coordinates (ridge)", ("x", "y", "z"))
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


def _ax(ax, figsize=(5, 3.5)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_rootogram(
    idata: az.InferenceData, group: str = "posterior_predictive", max_count: Optional[int] = None,
    prob: float = 0.9, ax=None,
):
    """Hanging rootogram of the spike-count distribution (all observed entries pooled).

    Bars of height ``sqrt(observed frequency)`` hang from the curve ``sqrt(expected frequency)``
    (predictive mean); the shaded band is the ``prob`` interval of ``sqrt(frequency)`` over draws.
    A bar ending below zero means the count is under-predicted, above zero over-predicted.
    """
    obs, draws = observed_and_draws(idata, group)
    ok = ~np.isnan(obs)
    y, rep = obs[ok].astype(int), draws[:, ok].astype(int)
    kmax = int(max_count if max_count is not None else max(y.max(), np.quantile(rep, 0.999)))
    ks = np.arange(kmax + 1)
    f_obs = np.array([(y == k).sum() for k in ks], dtype=float)
    f_rep = np.stack([np.bincount(np.clip(r, 0, kmax + 1), minlength=kmax + 2)[: kmax + 1] for r in rep]).astype(float)
    exp_ = np.sqrt(f_rep.mean(axis=0))
    lo, hi = np.quantile(np.sqrt(f_rep), [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    fig, ax = _ax(ax)
    ax.bar(ks, np.sqrt(f_obs), bottom=exp_ - np.sqrt(f_obs), width=0.8, color="0.75", label="observed (hanging)")
    ax.fill_between(ks, lo, hi, alpha=0.3, color="C0", step=None, label=f"{int(prob * 100)}% predictive")
    ax.plot(ks, exp_, "o-", color="C0", label="predicted")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("spike count per bin")
    ax.set_ylabel("sqrt(frequency)")
    ax.set_title(f"Rootogram ({group.replace('_', ' ')})")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def plot_psth(
    idata: az.InferenceData, group: str = "posterior_predictive", neurons: Optional[Sequence[int]] = None,
    conditions: Optional[Sequence] = None, condition: Optional[object] = None, prob: float = 0.9,
):
    """PSTH of a few neurons: observed vs the predictive mean with a ``prob`` credible band.

    With ``conditions`` (a label per trial) the PSTH of one ``condition`` (default: the first)
    is shown, otherwise the mean over all trials.
    """
    obs, draws = observed_and_draws(idata, group)
    if conditions is not None:
        labels = np.asarray(conditions)
        condition = np.unique(labels)[0] if condition is None else condition
        keep = labels == condition
        obs, draws = obs[keep], draws[:, keep]
    o, r = psth(obs), psth(draws)  # (time, neuron), (S, time, neuron)
    with warnings.catch_warnings():  # bins with no observed entries (forward bins) are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(r, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
        mean = np.nanmean(r, axis=0)
    neurons = list(range(min(6, o.shape[-1]))) if neurons is None else list(neurons)
    ncol = min(3, len(neurons))
    nrow = int(np.ceil(len(neurons) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False, sharex=True)
    t = np.arange(o.shape[0])
    for ax, n in zip(axes.flat, neurons):
        ax.fill_between(t, lo[:, n], hi[:, n], color="C0", alpha=0.3, label=f"{int(prob * 100)}% band")
        ax.plot(t, mean[:, n], color="C0", label="predicted")
        ax.plot(t, o[:, n], color="k", lw=1, label="observed")
        ax.set_title(f"neuron {n}", fontsize=9)
    for ax in axes.flat[len(neurons):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper right")
    fig.supxlabel("time bin")
    fig.supylabel("mean count per bin")
    title = f"PSTH ({group.replace('_', ' ')})" + ("" if conditions is None else f", condition {condition}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_fano(idata: az.InferenceData, group: str = "posterior_predictive", prob: float = 0.9, ax=None):
    """Per-neuron Fano factor (variance / mean over observed bins): observed vs predicted interval."""
    obs, draws = observed_and_draws(idata, group)
    f_obs = neuron_statistics(obs)["fano"]
    f_rep = neuron_statistics(draws)["fano"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(f_rep, axis=0)
        lo, hi = np.nanquantile(f_rep, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    fig, ax = _ax(ax, (4, 4))
    ax.errorbar(f_obs, med, yerr=[med - lo, hi - med], fmt="o", ms=3, color="C0", alpha=0.8, label="one neuron")
    both = np.concatenate([f_obs[np.isfinite(f_obs)], hi[np.isfinite(hi)]])
    lim = [min(1.0, both.min()) * 0.95, both.max() * 1.05] if both.size else [0, 2]
    ax.plot(lim, lim, "k--", lw=0.8, label="predicted = observed")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("observed Fano factor")
    ax.set_ylabel(f"predicted Fano factor (median, {int(prob * 100)}%)")
    ax.set_title(f"Fano factor per neuron ({group.replace('_', ' ')})", fontsize=10)
    return fig


def plot_pit(idata: az.InferenceData, group: str = "posterior_predictive", seed: int = 0, bins: int = 20):
    """Randomized PIT: histogram and ECDF minus the uniform CDF, with a 95% DKW band."""
    u = randomized_pit(idata, group, seed)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    a1.hist(u, bins=bins, range=(0, 1), density=True, color="0.7")
    a1.axhline(1, color="k", lw=0.8)
    a1.set_xlabel("randomized PIT")
    a1.set_ylabel("density")
    grid = np.linspace(0, 1, 201)
    ecdf = np.searchsorted(np.sort(u), grid, side="right") / u.size
    eps = np.sqrt(np.log(2 / 0.05) / (2 * u.size))
    a2.fill_between(grid, -eps, eps, color="C0", alpha=0.2, label="95% band (DKW)")
    a2.plot(grid, ecdf - grid, color="C0")
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xlabel("u")
    a2.set_ylabel("ECDF(u) - u")
    a2.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"PIT ({group.replace('_', ' ')}, {u.size} counts)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_credible_intervals(
    summary, trial: int = 0, units: Optional[Sequence[int]] = None, truth: Optional[np.ndarray] = None,
    label: str = "rate (counts/bin)", unit_name: str = "neuron",
):
    """Posterior mean and credible band over time for a few units of one trial.

    Parameters
    ----------
    summary : pyro_langevin.predictive.CredibleSummary
        Arrays (trial, time, unit) from :func:`~pyro_langevin.predictive.credible_intervals`.
    trial : int
        Row of the trial to show.
    units : sequence of int, optional
        Neurons or latent dimensions (default: the first four).
    truth : ndarray (trial, time, unit), optional
        Ground truth to overlay (e.g. the true Lorenz rates).
    label : str
        y-axis label.
    unit_name : str
        What a unit is, for the panel titles: ``"neuron"`` (rates) or ``"latent"`` (latent states).
    """
    mean, lo, hi = summary.mean[trial], summary.lower[trial], summary.upper[trial]
    units = list(range(min(4, mean.shape[-1]))) if units is None else list(units)
    fig, axes = plt.subplots(1, len(units), figsize=(3.0 * len(units), 2.6), squeeze=False)
    t = np.arange(mean.shape[0])
    for ax, u in zip(axes[0], units):
        ax.fill_between(t, lo[:, u], hi[:, u], color="C1", alpha=0.3, label=f"{int(summary.prob * 100)}% CI")
        ax.plot(t, mean[:, u], color="C1", label="posterior mean")
        if truth is not None:
            ax.plot(t[: truth.shape[1]], truth[trial, :, u], "k--", lw=1, label="truth")
        ax.set_title(f"{unit_name} {u}", fontsize=10)
        ax.set_xlabel("time bin")
    axes[0, 0].set_ylabel(label)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Posterior of trial {trial}: mean and {int(summary.prob * 100)}% credible interval", fontsize=11)
    fig.tight_layout()
    return fig


def plot_evidence_compare(tables: Mapping[str, pd.DataFrame], title: str = "held-out log evidence"):
    """One panel per comparison table of :func:`pyro_langevin.evidence.compare` (as ``az.plot_compare``).

    Each model (best at the top) shows its evidence relative to the best model with the standard
    error of the paired per-trial difference (``-d_elpd +- dse``, filled), its ELBO on the same
    draws relative to the same best evidence (open square: the distance between them is the
    guide's gap), and in red a model with trials whose k-hat exceeds 0.7 (estimate not trusted).

    Parameters
    ----------
    tables : mapping of panel title -> DataFrame
        Outputs of :func:`~pyro_langevin.evidence.compare` (columns ``d_elpd``, ``dse``, ``elpd``,
        ``elbo``, ``warning``, ``n_trials``).
    title : str
        Figure title.
    """
    from matplotlib.lines import Line2D

    rows = max(len(t) for t in tables.values())
    height = 1.9 + 0.45 * rows
    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), height), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        table = table.sort_values("rank")
        best = float(table["elpd"].iloc[0])
        y = -np.arange(len(table), dtype=float)
        colours = ["tab:red" if w else "tab:blue" for w in table["warning"]]
        for yi, d, e, elbo, c in zip(y, table["d_elpd"], table["dse"], table["elbo"], colours):
            ax.errorbar(-d, yi, xerr=e, fmt="o", color=c, capsize=3, zorder=3)
            ax.plot(elbo - best, yi, "s", mfc="none", mec=c, zorder=3)
        ax.axvline(0.0, color="0.6", lw=0.8, ls="--")
        ax.set_yticks(y, list(table.index))
        ax.set_ylim(y[-1] - 0.6, 0.6)
        n = int(table["n_trials"].iloc[0])
        shown = np.abs(np.concatenate([table["d_elpd"], table["elbo"] - best]))
        typical = float(np.median(shown[shown > 0])) if (shown > 0).any() else 1.0
        scale = ""
        if shown.max() > 8 * typical:  # one far-off model would flatten the rest: log beyond the typical
            ax.set_xscale("symlog", linthresh=typical)
            ax.set_xlim(-1.5 * shown.max(), 0.5 * typical)
            scale = "; symmetric log axis"
        ax.set_xlabel(f"relative to the best evidence\n(nats, sum over {n} held-out trials{scale})")
        ax.set_title(f"{name} ({table.attrs.get('quantity', 'joint')} log evidence)", fontsize=10)
    handles = [
        Line2D([], [], marker="o", color="0.3", ls="-", label="log evidence - best, +- s.e. of the paired difference"),
        Line2D([], [], marker="s", mfc="none", mec="0.3", ls="none", label="ELBO of the same draws - best evidence"),
        Line2D([], [], marker="o", color="tab:blue", ls="none", label="k-hat <= 0.7 on every trial"),
        Line2D([], [], marker="o", color="tab:red", ls="none", label="k-hat > 0.7 on some trial (not trusted)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.55 / height, 1, 1))
    return fig


def _arviz_figures(idata: az.InferenceData, group: str) -> dict[str, object]:
    """ArviZ's ``plot_ppc`` and ``plot_bpv`` on the spikes, when every entry is observed."""
    if np.isnan(idata.observed_data["spikes"].values).any():
        return {}  # ArviZ pools all entries; unobserved (NaN) ones would break its histograms
    figs = {}
    short = "posterior" if group.startswith("posterior") else "prior"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            n_draws = idata[group].sizes["chain"] * idata[group].sizes["draw"]
            ax = np.ravel(az.plot_ppc(idata, group=short, var_names=["spikes"], kind="cumulative", observed=True,
                                      num_pp_samples=min(50, n_draws), random_seed=0))[0]
            ax.set_xlabel("spike count per bin")
            ax.set_ylabel("fraction of bins with at most that count")
            ax.set_title(f"ArviZ plot_ppc: count distribution, observed vs {group.replace('_', ' ')}")
            figs["arviz_ppc"] = ax.figure
        except Exception:  # pragma: no cover - depends on the ArviZ version
            pass
        if short == "posterior":
            try:
                ax = np.ravel(az.plot_bpv(idata, kind="t_stat", t_stat="mean", var_names=["spikes"]))[0]
                ax.set_xlabel("mean spike count per bin, T (curve: draws T_rep; dot: observed T_obs)")
                ax.set_ylabel("density of T_rep")
                ax.set_title(f"ArviZ plot_bpv of the mean count: bpv = {P_VALUE}")
                figs["arviz_bpv_mean"] = ax.figure
            except Exception:  # pragma: no cover
                pass
    return figs


def save_ppc_figures(
    idata: az.InferenceData,
    out_dir: Union[str, Path],
    groups: Sequence[str] = ("prior_predictive", "posterior_predictive"),
    conditions: Optional[Sequence] = None,
    arviz_plots: bool = True,
) -> dict[str, Path]:
    """Write every figure of every available predictive group as PNG; return name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for group in groups:
        if group not in idata.groups():
            continue
        tag = "prior" if group.startswith("prior") else "posterior"
        figs = {
            "rootogram": plot_rootogram(idata, group),
            "psth": plot_psth(idata, group, conditions=conditions),
            "fano": plot_fano(idata, group),
            "pit": plot_pit(idata, group),
        }
        if arviz_plots:
            figs.update(_arviz_figures(idata, group))
        for name, fig in figs.items():
            path = out / f"{tag}_{name}.png"
            with warnings.catch_warnings():  # ArviZ's legends use loc="best", slow only with huge data
                warnings.filterwarnings("ignore", message="Creating legend with loc")
                fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written[f"{tag}_{name}"] = path
    return written
