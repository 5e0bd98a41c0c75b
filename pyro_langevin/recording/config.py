"""Default settings for a recording nobody has tuned anything on, chosen by its size.

:func:`default_config` starts from the one recipe this project has cross-validated (the NLB small
datasets' defaults at 20 ms, docs/nlb.md "Why each default": bidirectional GRU guide, KL weight 0.1,
dropout 0.2, a 60 ms temporal shift, early stopping on validation co-bps) and sizes it to the data:

* networks: latent 32 and GRU 128 with 40 units or more (MC_Maze_Small's 142), 16 and 64 below;
* dropout 0.2 under 1000 trials, 0.1 from there (the NLB defaults of the small and large datasets);
* batch: a quarter of the trials, 8 to 64;
* epochs: about 2000 optimizer steps over the fit trials of a 5-fold split, 100 to 600 (600 is the
  20 ms MC_Maze_Small default: 75 trials in batches of 25), validated every 10 (every 5 under 200);
* the temporal shift: 60 ms s.d. (NLB's), at most an eighth of the trial's bins;
* one model per fit (``eval.n_models = 1``): its latents are one model's;
* cross-validation (:class:`CVConfig`): 5 folds (fewer below 50 trials), a quarter of the units held
  out in each fold (NLB's MC_Maze_Small holds out 35 of 142); at most 3 folds (:data:`SEARCH_FOLDS`)
  when the recipe is searched, because the search runs inside every fold: a searched fit of a
  100-trial x 100-unit recording takes 583 s on 2 idle CPU cores with 3 folds (five candidates, the
  fold ensemble); with four candidates it took 450 s with 3 folds and 1154 s with 5 (other jobs
  briefly on the machine), against the 15 minutes such a fit is meant to take.

Every setting is a dotted key of :class:`RecordingConfig` (``--set cv.folds=3``, ``--set
model.latent_dim=16``, ``--spec FILE``); the chosen values and the size that chose them are written
into the run folder (``spec.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from pyro_langevin.members import MemberRunSpec
from pyro_langevin.spec import SpecError, register_spec_class

__all__ = ["CVConfig", "RecordingConfig", "default_config", "sized_settings", "QUICK", "GAMMA", "SHIFT_MS",
           "SEARCH_FOLDS"]

#: Damping rate per 100 ms: the NLB default (the released code's factor 0.55 per 20 ms step, -ln(0.45) / 0.2).
GAMMA = 3.993
#: Temporal-shift s.d. in ms (the NLB default: ``fit.shift_std = SHIFT_MS / bin_ms`` bins).
SHIFT_MS = 60.0
#: The most cross-validation folds a searched recipe gets by default (every fold runs its own search).
SEARCH_FOLDS = 3
#: A smoke test's sizes: tiny networks, a few epochs and draws, two folds.
QUICK = {"model.latent_dim": 4, "guide.hidden": 8, "model.d_model": 16, "model.n_heads": 2,
         "model.dim_feedforward": 16, "fit.epochs": 3, "fit.val_every": 1, "eval.select_draws": 2,
         "eval.export_draws": 5, "cv.folds": 2}


@dataclass
class CVConfig:
    """How a recording is scored: ``folds`` K-fold cross-validation over its trials (0: not scored),
    ``heldout_frac`` of its units held out at random in each fold (at least one, never all).

    ``ensemble``: the rates in ``posterior.nc`` pool the final fit's posterior with the K fold models'
    (each fold's model reads its held-in units of every trial), an equal mixture whose mean averages
    the K + 1 models' posterior means; the latents stay the final fit's (every model has its own
    latent coordinates). The folds are trained for their score anyway, so this costs only their
    posterior draws. Measured on the synthetic family (docs/recording.md): rate R^2 to the truth
    +0.01 to +0.11 over the final fit alone.
    """

    folds: int = 5
    heldout_frac: float = 0.25
    ensemble: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds == 1 or self.folds < 0:
            raise SpecError(f"cv.folds must be 0 (no cross-validation) or an integer >= 2, got {self.folds!r}")
        if not 0 < self.heldout_frac < 1:
            raise SpecError(f"cv.heldout_frac must be in (0, 1), got {self.heldout_frac!r}")
        if not isinstance(self.ensemble, bool):
            raise SpecError(f"cv.ensemble must be true or false, got {self.ensemble!r}")

    def n_heldout(self, n_units: int) -> int:
        """Units held out per fold: ``heldout_frac`` of ``n_units``, rounded, at least 1 and at most all but one."""
        return min(max(1, round(self.heldout_frac * n_units)), n_units - 1)


@register_spec_class
@dataclass
class RecordingConfig(MemberRunSpec):
    """The run spec of ``pyro-langevin fit``: ``model``, ``guide``, ``fit`` and ``eval`` as every members'
    run (:class:`~pyro_langevin.members.MemberRunSpec`), and ``cv`` (:class:`CVConfig`)."""

    cv: CVConfig = field(default_factory=CVConfig)


def sized_settings(n_trials: int, n_units: int, n_bins: int, bin_ms: float, search: bool = False) -> Dict[str, Any]:
    """The dotted-key settings :func:`default_config` chooses for a recording of this size (see the module
    docstring); ``search``: the recipe will be searched inside every fold (at most :data:`SEARCH_FOLDS` folds)."""
    folds = 5 if n_trials >= 50 else max(2, min(5, n_trials // 10))
    fit_trials = max(1, math.floor(n_trials * (1 - 1 / folds) * 0.8))  # a fold's fit trials (inner split 0.2)
    batch = int(min(64, max(8, round(n_trials / 4))))
    steps = math.ceil(fit_trials / batch)
    epochs = int(min(600, max(100, round(2000 / steps / 10) * 10)))
    big = n_units >= 40
    dropout = 0.2 if n_trials < 1000 else 0.1
    return {
        "model.dt": bin_ms / 100.0, "model.gamma": GAMMA,
        "model.latent_dim": 32 if big else 16, "guide.hidden": 128 if big else 64, "guide.name": "bigru",
        "model.dropout": dropout, "guide.dropout": dropout,
        "fit.batch_size": batch, "fit.epochs": epochs, "fit.val_every": 10 if epochs >= 200 else 5,
        "fit.lr": 3e-3, "fit.weight_decay": 2e-5, "fit.cd_keep": 0.5, "fit.kl_final": 0.1,
        "fit.kl_ramp": 0.25, "fit.weight_decay_ramp": 0.25, "fit.patience": 8, "fit.lr_plateau_patience": 3,
        "fit.shift_std": min(SHIFT_MS / bin_ms, n_bins / 8),
        "eval.n_models": 1, "cv.folds": min(folds, SEARCH_FOLDS) if search else folds,
    }


def default_config(n_trials: int, n_units: int, n_bins: int, bin_ms: float, quick: bool = False,
                   overrides: Optional[Mapping[str, Any]] = None, search: bool = False) -> RecordingConfig:
    """The default :class:`RecordingConfig` of a recording with ``n_trials`` trials, ``n_units`` units
    and ``n_bins`` bins of ``bin_ms`` ms (:func:`sized_settings`), then the ``quick`` smoke-test sizes,
    then ``overrides`` (dotted keys)."""
    settings = sized_settings(n_trials, n_units, n_bins, bin_ms, search)
    if quick:
        settings.update(QUICK)
    settings.update(overrides or {})
    return RecordingConfig().override(settings)
