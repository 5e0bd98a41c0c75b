"""The NLB spike-smoothing baseline: Gaussian-smoothed held-in counts, a Poisson GLM per held-out neuron.

Rates come out as the model's do (:class:`~pyro_langevin.nlb.scoring.Rates`, expected counts per
bin in the batch layout), so they are written and scored exactly like the model's.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.nlb.scoring import Rates, masked_counts
from pyro_langevin.smoothing import smooth_spikes

__all__ = ["BASELINE_PARAMS", "GLM_ALPHAS", "fit_poisson_glm", "choose_glm_alpha", "smoothing_baseline"]

#: nlb_tools' smoothing-baseline defaults per dataset: (kernel sd in ms, Poisson GLM alpha).
BASELINE_PARAMS = {"mc_maze": (50, 0.01), "mc_rtt": (30, 0.1), "area2_bump": (30, 0.01),
                   "dmfc_rsg": (60, 0.001), "mc_maze_large": (40, 0.1),
                   "mc_maze_medium": (60, 0.1), "mc_maze_small": (60, 0.1)}


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


#: Poisson GLM penalties tried by :func:`choose_glm_alpha` (nlb_tools' per-dataset values among them).
GLM_ALPHAS = (1e-3, 1e-2, 0.1, 1.0, 10.0)


def choose_glm_alpha(x: np.ndarray, y: np.ndarray, n_trials: int, alphas: Sequence[float] = GLM_ALPHAS,
                     folds: int = 3, seed: int = 0) -> float:
    """The GLM penalty with the best held-out Poisson likelihood, by K-fold over TRAINING trials.

    ``x`` and ``y`` hold ``n_trials`` trials' rows in trial-major order (as :func:`smoothing_baseline`
    flattens them); folds split whole trials. nlb_tools' fixed alpha (0.1 for MC_Maze_Small)
    overfits when there are few samples per feature, e.g. 20 ms bins of a small dataset, where
    its baseline then scores below a constant rate.
    """
    rows = x.shape[0] // n_trials
    order = np.random.default_rng(seed).permutation(n_trials)
    scores = []
    for alpha in alphas:
        nll = 0.0
        for part in np.array_split(order, folds):
            held = np.zeros(n_trials, dtype=bool)
            held[part] = True
            held_rows = np.repeat(held, rows)
            # a shorter solve is enough to rank penalties; the chosen one is refitted in full
            pred = fit_poisson_glm(x[~held_rows], y[~held_rows], alpha, max_iter=60)(x[held_rows])
            nll += float(np.sum(pred - y[held_rows] * np.log(np.maximum(pred, 1e-12))))
        scores.append(nll)
    return float(alphas[int(np.argmin(scores))])


def smoothing_baseline(
    train: Batch,
    eval: Batch,
    bin_ms: int,
    dataset: Optional[str] = None,
    kern_sd_ms: Optional[float] = None,
    alpha: Union[float, str, None] = None,
) -> Rates:
    """NLB spike-smoothing baseline: :class:`~pyro_langevin.nlb.scoring.Rates` (counts per bin) of
    ``train`` (its ``train``) and ``eval`` (its ``eval``), the model's layout.

    Held-in rates are Gaussian-smoothed held-in counts; held-out rates come from a Poisson GLM
    per held-out neuron (:func:`fit_poisson_glm`, sklearn ``PoissonRegressor``'s objective), fitted
    on the training trials from their log smoothed held-in counts; forward rates (of both splits) are
    each neuron's mean count per bin in the training trials' forward window.

    Parameters
    ----------
    train : Batch
        Trials with held-out neurons (and forward bins) observed; only they fit the GLM.
    eval : Batch
        Trials to predict (only their ``input`` is read).
    bin_ms : int
    dataset : str, optional
        Picks nlb_tools' default kernel width and alpha (:data:`BASELINE_PARAMS`).
    kern_sd_ms : float, optional
        Override the kernel width (default nlb_tools' per dataset, 60 ms without a dataset).
    alpha : float or "cv", optional
        The GLM penalty. Default ``"cv"``: chosen among :data:`GLM_ALPHAS` by 3-fold
        cross-validation over ``train``'s trials (:func:`choose_glm_alpha`); a number fixes it
        (nlb_tools' recipe uses :data:`BASELINE_PARAMS`).
    """
    sd, _ = BASELINE_PARAMS.get(dataset, (60, 0.1))
    sd = kern_sd_ms if kern_sd_ms is not None else sd
    alpha = "cv" if alpha is None else alpha
    t, n_in = train.n_observed_bins, train.n_heldin
    tgt = masked_counts(train)
    if np.isnan(tgt[:, :t, n_in:]).any():
        raise NLBDataError("smoothing_baseline: training trials must have all held-out counts observed")
    sm_tr = smooth_spikes(train.input.cpu().numpy(), sd / bin_ms)
    sm_ev = smooth_spikes(eval.input.cpu().numpy(), sd / bin_ms)
    feats = lambda x: np.log(x.reshape(-1, n_in) + 1e-4)  # noqa: E731
    x_tr, x_ev = feats(sm_tr), feats(sm_ev)
    y_tr = tgt[:, :t, n_in:].reshape(-1, train.n_heldout)
    a = choose_glm_alpha(x_tr, y_tr, train.n_trials) if alpha == "cv" else float(alpha)
    predict = fit_poisson_glm(x_tr, y_tr, a)
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
