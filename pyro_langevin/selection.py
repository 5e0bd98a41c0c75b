"""What a fit does with its validation metric: keep the best state, stop early, lower the learning rate.

:class:`Selector` is one small object for the three decisions :func:`~pyro_langevin.training.fit`
takes on each validation, so that they are taken (and checkpointed) together.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal, Optional

import torch

from pyro_langevin.checkpoints import clone_state

__all__ = ["Selector"]


class Selector:
    """Best-state selection, early stopping and learning-rate plateaus on one validation metric.

    Parameters
    ----------
    model, guide : torch.nn.Module
        Whose parameters the best state copies.
    optimizer : torch.optim.Optimizer
        Whose learning rates the plateau scheduler (``ReduceLROnPlateau``) lowers.
    mode : {"min", "max"}
        Whether a lower or a higher metric is better.
    patience : int
        Stop after this many scheduled validations without improvement (0: never).
    lr_factor, lr_patience, lr_min
        ``ReduceLROnPlateau``'s ``factor``, ``patience`` and ``min_lr``.

    Attributes
    ----------
    best_epoch : int
        Epoch of the best validation so far (-1 before the first).
    best_metric : float
        Its metric (``inf`` or ``-inf`` before the first).
    best_state : dict or None
        ``{"model": state_dict, "guide": state_dict}`` at that epoch (tensors cloned).
    bad_validations : int
        Scheduled validations since the last improvement.
    """

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 mode: Literal["min", "max"] = "min", patience: int = 0, lr_factor: float = 0.5,
                 lr_patience: int = 6, lr_min: float = 1e-5) -> None:
        self.model, self.guide, self.optimizer = model, guide, optimizer
        self.mode, self.patience = mode, patience
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=lr_factor, patience=lr_patience, min_lr=lr_min,
        )
        self.best_epoch, self.best_metric = -1, math.inf if mode == "min" else -math.inf
        self.best_state: Optional[dict[str, Any]] = None
        self.bad_validations = 0

    def observe(self, epoch: int, value: float, scheduled: bool = True) -> bool:
        """Take the validation ``value`` of ``epoch``; True when it is the best so far.

        An off-schedule validation (the final epoch's) only takes part in model selection: it
        steps neither the plateau scheduler nor the early-stopping count.
        """
        if scheduled:
            self.scheduler.step(value)
        improved = value < self.best_metric if self.mode == "min" else value > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = value, epoch
            self.best_state = {"model": clone_state(self.model.state_dict()), "guide": clone_state(self.guide.state_dict())}
            if scheduled:
                self.bad_validations = 0
        elif scheduled:
            self.bad_validations += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """Early stopping: ``patience`` scheduled validations in a row without improvement."""
        return self.patience > 0 and self.bad_validations >= self.patience

    def set_lr(self, lrs: list[float]) -> None:
        """Set each parameter group's learning rate (a fault recovery), keeping the scheduler's record truthful."""
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = list(lrs)  # what get_last_lr() reports

    def load_best(self) -> None:
        """Load the best state into the model and guide (nothing without one)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state["model"])
            self.guide.load_state_dict(self.best_state["guide"])

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries: ``scheduler``, ``best_epoch``, ``best_metric``, ``best_state``, ``bad_validations``."""
        return {
            "scheduler": copy.deepcopy(self.scheduler.state_dict()), "best_epoch": self.best_epoch,
            "best_metric": self.best_metric, "best_state": self.best_state, "bad_validations": self.bad_validations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set what :meth:`state_dict` returned (a checkpoint dict may hold more entries)."""
        self.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        self.best_epoch, self.best_metric = state["best_epoch"], state["best_metric"]
        self.best_state = state.get("best_state")
        self.bad_validations = state["bad_validations"]
