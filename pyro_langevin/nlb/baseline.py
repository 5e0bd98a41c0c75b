"""The NLB spike-smoothing baseline: the core's (:mod:`pyro_langevin.baseline`) with nlb_tools'
per-dataset kernel widths.

Rates come out as the model's do (:class:`~pyro_langevin.scoring.Rates`, expected counts per bin in
the batch layout), so they are written and scored exactly like the model's.
"""

from __future__ import annotations

from typing import Optional, Union

from pyro_langevin.baseline import GLM_ALPHAS, choose_glm_alpha, fit_poisson_glm
from pyro_langevin.baseline import smoothing_baseline as smoothing_rates
from pyro_langevin.batch import Batch
from pyro_langevin.scoring import Rates

__all__ = ["BASELINE_PARAMS", "GLM_ALPHAS", "fit_poisson_glm", "choose_glm_alpha", "kernel_sd_ms", "smoothing_baseline"]

#: nlb_tools' smoothing-baseline defaults per dataset: (kernel sd in ms, Poisson GLM alpha).
BASELINE_PARAMS = {"mc_maze": (50, 0.01), "mc_rtt": (30, 0.1), "area2_bump": (30, 0.01),
                   "dmfc_rsg": (60, 0.001), "mc_maze_large": (40, 0.1),
                   "mc_maze_medium": (60, 0.1), "mc_maze_small": (60, 0.1)}


def kernel_sd_ms(dataset: Optional[str]) -> float:
    """nlb_tools' kernel width for ``dataset`` in ms (:data:`BASELINE_PARAMS`; 60 for an unknown one)."""
    return float(BASELINE_PARAMS.get(dataset, (60, 0.1))[0])


def smoothing_baseline(
    train: Batch,
    eval: Batch,
    bin_ms: int,
    dataset: Optional[str] = None,
    kern_sd_ms: Optional[float] = None,
    alpha: Union[float, str, None] = None,
) -> Rates:
    """NLB spike-smoothing baseline: :class:`~pyro_langevin.scoring.Rates` (counts per bin) of
    ``train`` (its ``train``) and ``eval`` (its ``eval``), the model's layout
    (:func:`pyro_langevin.baseline.smoothing_baseline`).

    Parameters
    ----------
    train : Batch
        Trials with held-out neurons (and forward bins) observed; only they fit the GLM.
    eval : Batch
        Trials to predict (only their ``input`` is read).
    bin_ms : int
    dataset : str, optional
        Picks nlb_tools' default kernel width (:data:`BASELINE_PARAMS`).
    kern_sd_ms : float, optional
        Override the kernel width (default nlb_tools' per dataset, 60 ms without a dataset).
    alpha : float or "cv", optional
        The GLM penalty. Default ``"cv"``: chosen among :data:`GLM_ALPHAS` by 3-fold
        cross-validation over ``train``'s trials (:func:`choose_glm_alpha`); a number fixes it
        (nlb_tools' recipe uses :data:`BASELINE_PARAMS`).
    """
    sd = kern_sd_ms if kern_sd_ms is not None else kernel_sd_ms(dataset)
    return smoothing_rates(train, eval, bin_ms, sd, alpha)
