"""The spike-smoothing baseline: Gaussian-smoothed held-in counts, a Poisson GLM per held-out neuron.

The reference every score in the project is compared with (NLB's own baseline, with its penalty, and
for a recording also its kernel width, chosen on the training trials only). Rates come out as the
model's do (:class:`~pyro_langevin.scoring.Rates`, expected counts per bin in the batch layout), so
they are written and scored exactly like the model's. Entries outside a batch's ``mask`` (the
padding of shorter trials) are neither smoothed over nor fitted.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.scoring import Rates, masked_counts, score_local
from pyro_langevin.smoothing import smooth_spikes

__all__ = ["GLM_ALPHAS", "KERNEL_SD_MS", "GLM_CV_MAX_ROWS", "fit_poisson_glm", "choose_glm_alpha", "smoothing_baseline",
           "score_smoothing_split"]

#: Poisson GLM penalties tried by :func:`choose_glm_alpha` (nlb_tools' per-dataset values among them).
GLM_ALPHAS = (1e-3, 1e-2, 0.1, 1.0, 10.0)
#: Kernel widths (s.d., ms) tried when :func:`smoothing_baseline` chooses its kernel (``kern_sd_ms="cv"``).
KERNEL_SD_MS = (20.0, 40.0, 60.0, 80.0, 100.0)
#: At most this many rows (bins of whole training trials, drawn at random) choose the penalty and
#: kernel; the chosen GLM is then fitted on every row. Below it (MC_Maze_Small: 10,500 rows at 5 ms)
#: nothing changes; full-size MC_Maze (241,000 rows at 5 ms) took over 20 minutes to choose on all
#: of them, and with hundreds of rows per feature the penalty barely matters.
GLM_CV_MAX_ROWS = 40_000


def fit_poisson_glm(x: np.ndarray, y: np.ndarray, alpha: float, max_iter: int = 200):
    """Fit one Poisson GLM (log link) per column of ``y``, all at once; return a predict function.

    Minimises sklearn ``PoissonRegressor``'s objective, ``mean(exp(eta) - y * eta) + alpha/2 ||w||^2``
    per output (intercept unpenalised), with full-batch L-BFGS in torch: the same fit, but all
    held-out neurons in one solve (sklearn fits them one by one, ~100x slower here).
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-8)  # standardise for conditioning; undone below
    xs = (xt - mu) / sd
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.log(yt.mean(0).clamp_min(1e-8)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        eta = xs @ w + b  # fit in standardised coordinates, penalise the raw-scale weights
        loss = (torch.exp(eta) - yt * eta).mean(0).sum() + 0.5 * alpha * (w / sd[:, None]).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / sd[:, None]).detach()
    b_raw = (b - (mu / sd) @ w).detach()

    def predict(x_new: np.ndarray) -> np.ndarray:
        eta = torch.as_tensor(x_new, dtype=torch.float64) @ w_raw + b_raw
        return torch.exp(eta).numpy()

    return predict


def _some_trials(groups: np.ndarray, n_trials: int, max_rows: int, seed: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Rows of whole trials, drawn at random, at most ``max_rows`` of them (all rows when they fit):
    (row mask, the kept rows' trial numbers renumbered 0 .. n - 1, n)."""
    if groups.size <= max_rows:
        return np.ones(groups.size, dtype=bool), groups, n_trials
    order = np.random.default_rng(seed + 1).permutation(n_trials)
    rows_per_trial = np.bincount(groups, minlength=n_trials)[order]
    n = max(int(np.searchsorted(np.cumsum(rows_per_trial), max_rows, side="right")), min(n_trials, 3))
    keep = np.sort(order[:n])
    rows = np.isin(groups, keep)
    return rows, np.searchsorted(keep, groups[rows]), n


def _glm_nll(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_trials: int, alphas: Sequence[float],
             folds: int, seed: int, max_rows: int = GLM_CV_MAX_ROWS) -> np.ndarray:
    """Held-out Poisson deviance part (``sum(pred - y log pred)``) of each penalty, K-fold over whole
    trials (at most ``max_rows`` rows of them, :data:`GLM_CV_MAX_ROWS`)."""
    rows, groups, n_trials = _some_trials(groups, n_trials, max_rows, seed)
    x, y = x[rows], y[rows]
    order = np.random.default_rng(seed).permutation(n_trials)
    scores = []
    for alpha in alphas:
        nll = 0.0
        for part in np.array_split(order, folds):
            held_rows = np.isin(groups, part)
            # a shorter solve is enough to rank penalties; the chosen one is refitted in full
            pred = fit_poisson_glm(x[~held_rows], y[~held_rows], alpha, max_iter=60)(x[held_rows])
            nll += float(np.sum(pred - y[held_rows] * np.log(np.maximum(pred, 1e-12))))
        scores.append(nll)
    return np.asarray(scores)


def choose_glm_alpha(x: np.ndarray, y: np.ndarray, n_trials: int, alphas: Sequence[float] = GLM_ALPHAS,
                     folds: int = 3, seed: int = 0, groups: Optional[np.ndarray] = None,
                     max_rows: Optional[int] = None) -> float:
    """The GLM penalty with the best held-out Poisson likelihood, by K-fold over TRAINING trials.

    ``x`` and ``y`` hold ``n_trials`` trials' rows in trial-major order (as :func:`smoothing_baseline`
    flattens them), or any rows with ``groups`` giving each row's trial (0 .. n_trials - 1); folds
    split whole trials. nlb_tools' fixed alpha (0.1 for MC_Maze_Small) overfits when there are few
    samples per feature, e.g. 20 ms bins of a small dataset, where its baseline then scores below a
    constant rate. At most :data:`GLM_CV_MAX_ROWS` rows (whole trials, drawn at random) take part.
    """
    if groups is None:
        groups = np.repeat(np.arange(n_trials), x.shape[0] // n_trials)
    cap = GLM_CV_MAX_ROWS if max_rows is None else max_rows
    return float(alphas[int(np.argmin(_glm_nll(x, y, groups, n_trials, alphas, folds, seed, cap)))])


def _smoothed(batch: Batch, sd_bins: float) -> np.ndarray:
    """Gaussian-smoothed held-in input, averaging over observed entries only when some are not (padding)."""
    x = batch.input.cpu().numpy()
    seen = batch.mask[:, : batch.n_observed_bins, : batch.n_heldin].cpu().numpy()
    if seen.all():
        return smooth_spikes(x, sd_bins)
    weight = smooth_spikes(seen.astype(np.float64), sd_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = smooth_spikes(np.where(seen, x, 0.0), sd_bins) / weight
    return np.where(seen & np.isfinite(out), out, 0.0)


def _rows(batch: Batch, tgt: np.ndarray) -> np.ndarray:
    """Row mask (trial-major, observed bins) of bins whose held-out counts are all observed."""
    t, n_in = batch.n_observed_bins, batch.n_heldin
    return ~np.isnan(tgt[:, :t, n_in:]).any(axis=-1).reshape(-1)


def _choose(train: Batch, tgt: np.ndarray, widths_ms: Sequence[float], bin_ms: float, alpha: Union[float, str],
            seed: int = 0) -> Tuple[float, float]:
    """The (kernel sd in ms, alpha) with the best held-out Poisson likelihood, K-fold over training trials."""
    n_in, t = train.n_heldin, train.n_observed_bins
    rows = _rows(train, tgt)
    groups = np.repeat(np.arange(train.n_trials), t)[rows]
    y = tgt[:, :t, n_in:].reshape(-1, train.n_heldout)[rows]
    alphas = GLM_ALPHAS if alpha == "cv" else (float(alpha),)
    best = (np.inf, widths_ms[0], alphas[0])
    for sd in widths_ms:
        x = np.log(_smoothed(train, sd / bin_ms).reshape(-1, n_in) + 1e-4)[rows]
        nll = _glm_nll(x, y, groups, train.n_trials, alphas, 3, seed)
        k = int(np.argmin(nll))
        if nll[k] < best[0]:
            best = (float(nll[k]), float(sd), float(alphas[k]))
    return best[1], best[2]


def smoothing_baseline(
    train: Batch,
    eval: Batch,
    bin_ms: float,
    kern_sd_ms: Union[float, str] = 60.0,
    alpha: Union[float, str, None] = None,
    info: Optional[Dict[str, Any]] = None,
) -> Rates:
    """The spike-smoothing baseline: :class:`~pyro_langevin.scoring.Rates` (counts per bin) of
    ``train`` (its ``train``) and ``eval`` (its ``eval``), the model's layout.

    Held-in rates are Gaussian-smoothed held-in counts; held-out rates come from a Poisson GLM
    per held-out neuron (:func:`fit_poisson_glm`, sklearn ``PoissonRegressor``'s objective), fitted
    on the training trials' observed bins from their log smoothed held-in counts; forward rates (of
    both splits) are each neuron's mean count per bin in the training trials' forward window.

    Parameters
    ----------
    train : Batch
        Trials with held-out neurons (and forward bins) observed; only they fit the GLM.
    eval : Batch
        Trials to predict (only their ``input`` and ``mask`` are read).
    bin_ms : float
    kern_sd_ms : float or "cv"
        The kernel's standard deviation in ms (NLB's per-dataset values are 30-60), or ``"cv"``:
        chosen with the penalty among :data:`KERNEL_SD_MS` by 3-fold cross-validation over
        ``train``'s trials (for data nobody has tuned a kernel on).
    alpha : float or "cv", optional
        The GLM penalty. Default ``"cv"``: chosen among :data:`GLM_ALPHAS` by 3-fold
        cross-validation over ``train``'s trials (:func:`choose_glm_alpha`); a number fixes it.
    info : dict, optional
        Receives the kernel and penalty used (``kern_sd_ms``, ``alpha``).
    """
    alpha = "cv" if alpha is None else alpha
    t, n_in = train.n_observed_bins, train.n_heldin
    tgt = masked_counts(train)
    rows = _rows(train, tgt)
    if not rows.any():
        raise NLBDataError("smoothing_baseline: training trials must have all held-out counts observed")
    if kern_sd_ms == "cv":
        kern_sd_ms, alpha = _choose(train, tgt, KERNEL_SD_MS, bin_ms, alpha)
    sm_tr = _smoothed(train, kern_sd_ms / bin_ms)
    sm_ev = _smoothed(eval, kern_sd_ms / bin_ms)
    feats = lambda x: np.log(x.reshape(-1, n_in) + 1e-4)  # noqa: E731
    x_tr, x_ev = feats(sm_tr), feats(sm_ev)
    y_tr = tgt[:, :t, n_in:].reshape(-1, train.n_heldout)
    if rows.all():
        a = choose_glm_alpha(x_tr, y_tr, train.n_trials) if alpha == "cv" else float(alpha)
        predict = fit_poisson_glm(x_tr, y_tr, a)
    else:  # padding: fit on the observed bins only
        groups = np.repeat(np.arange(train.n_trials), t)[rows]
        a = choose_glm_alpha(x_tr[rows], y_tr[rows], train.n_trials, groups=groups) if alpha == "cv" else float(alpha)
        predict = fit_poisson_glm(x_tr[rows], y_tr[rows], a)
    if info is not None:
        info.update(kern_sd_ms=float(kern_sd_ms), alpha=float(a))
    pred_tr, pred_ev = predict(x_tr), predict(x_ev)
    fwd = tgt[:, t:, :]
    mean_fwd = np.nanmean(fwd, axis=(0, 1)) if fwd.size and not np.isnan(fwd).all() \
        else np.nanmean(tgt[:, :t, :], axis=(0, 1))
    floor = 1e-6

    def full(smoothed: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
        observed = np.concatenate([smoothed, predicted.reshape(n, t, -1)], axis=-1)
        forward = np.tile(mean_fwd, (n, train.n_forward_bins, 1))
        return np.maximum(np.concatenate([observed, forward], axis=1), floor)

    return Rates(full(sm_tr, pred_tr, train.n_trials), full(sm_ev, pred_ev, eval.n_trials), n_in, t)


def score_smoothing_split(scored: Batch, decoder_fit: Batch, bin_ms: float, kern_sd_ms: Union[float, str] = 60.0,
                          info: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """The smoothing baseline fitted on ``decoder_fit`` (GLM and behaviour decoder), scored on ``scored``
    (:func:`~pyro_langevin.scoring.score_local`)."""
    r = smoothing_baseline(decoder_fit, scored, bin_ms, kern_sd_ms, info=info)
    return score_local(r.eval, scored, r.train, decoder_fit)
