"""The one data contract for a batch of trials.

Every model, guide, training loop, metric and data adapter in pyro-langevin passes trials around as
a :class:`Batch`. Shapes are ``(trial, time, neuron)``.

* ``input``  : ``(trial, T, N_in)`` held-in spike counts in the observed bins: all the guide reads.
* ``target`` : ``(trial, T + F, N_in + N_out)`` spike counts the likelihood scores. Held-out neurons
  are the trailing ``N_out`` columns and forward-prediction bins the trailing ``F`` rows, so
  ``target[:, :T, :N_in]`` equals ``input`` (before coordinated dropout).
* ``mask``   : ``(trial, T + F, N_in + N_out)`` bool, True where ``target`` holds a real count that
  enters the likelihood (False for unknown held-out neurons or forward bins of evaluation trials,
  and for entries hidden by coordinated dropout's complement).
* ``index``  : ``(trial,)`` long, each trial's row in its dataset (non-amortized guides key on it).
* ``behavior``: optional ``(trial, T, B)`` behaviour (e.g. hand velocity) kept for decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["Batch", "make_batch", "BatchError"]


class BatchError(ValueError):
    """Raised when arrays do not satisfy the batch contract; the message names the field."""


def _as_tensor(x: ArrayLike, name: str, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - defensive
        raise BatchError(f"{name}: cannot convert {type(x).__name__} to an array ({exc})") from exc
    if arr.dtype == object:
        raise BatchError(f"{name}: expected a numeric array, got dtype object")
    return torch.as_tensor(arr, dtype=dtype)


def check_counts(x: torch.Tensor, name: str, ndim: int = 3, allow_empty: bool = False) -> None:
    """Raise :class:`BatchError` unless ``x`` is a ``ndim``-D array of finite, whole, non-negative counts."""
    if x.dim() != ndim:
        raise BatchError(
            f"{name}: expected {ndim} dimensions (trial, time, neuron), got shape {tuple(x.shape)}"
        )
    if x.numel() == 0 and not allow_empty:
        raise BatchError(f"{name}: empty array of shape {tuple(x.shape)} (no trials, bins or neurons)")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise BatchError(f"{name}: contains NaN or infinite values (first at index {bad})")
    if (x < 0).any():
        bad = (x < 0).nonzero()[0].tolist()
        raise BatchError(f"{name}: contains negative counts (first at index {bad})")
    if (x != torch.round(x)).any():
        bad = (x != torch.round(x)).nonzero()[0].tolist()
        raise BatchError(f"{name}: spike counts must be whole numbers (first non-integer at index {bad})")


@dataclass(frozen=True)
class Batch:
    """A set of trials in the project's data contract (see the module docstring)."""

    input: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor
    behavior: Optional[torch.Tensor] = None

    # ----- sizes -------------------------------------------------------------------------------
    @property
    def n_trials(self) -> int:
        return self.input.shape[0]

    @property
    def n_observed_bins(self) -> int:
        """T: bins with held-in data (the guide reads these)."""
        return self.input.shape[1]

    @property
    def n_bins(self) -> int:
        """T + F: observed plus forward-prediction bins."""
        return self.target.shape[1]

    @property
    def n_forward_bins(self) -> int:
        return self.n_bins - self.n_observed_bins

    @property
    def n_heldin(self) -> int:
        return self.input.shape[2]

    @property
    def n_neurons(self) -> int:
        """N_in + N_out: all neurons the model predicts."""
        return self.target.shape[2]

    @property
    def n_heldout(self) -> int:
        return self.n_neurons - self.n_heldin

    @property
    def device(self) -> torch.device:
        return self.input.device

    # ----- operations --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_trials

    def __getitem__(self, idx) -> "Batch":
        """Select trials (an int, slice, index tensor or boolean mask)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Batch(
            input=self.input[idx],
            target=self.target[idx],
            mask=self.mask[idx],
            index=self.index[idx],
            behavior=None if self.behavior is None else self.behavior[idx],
        )

    def to(self, device: Union[str, torch.device]) -> "Batch":
        """Move every tensor to ``device``."""
        return Batch(
            input=self.input.to(device),
            target=self.target.to(device),
            mask=self.mask.to(device),
            index=self.index.to(device),
            behavior=None if self.behavior is None else self.behavior.to(device),
        )

    def with_inputs(self, input: torch.Tensor, mask: torch.Tensor) -> "Batch":
        """A copy with another guide input and likelihood mask (used by coordinated dropout)."""
        return replace(self, input=input, mask=mask)

    def validate(self) -> "Batch":
        """Check shapes, dtypes and values; return ``self`` or raise :class:`BatchError`."""
        check_counts(self.input, "input")
        if self.target.dim() != 3:
            raise BatchError(
                f"target: expected 3 dimensions (trial, time, neuron), got shape {tuple(self.target.shape)}"
            )
        n, t, n_in = self.input.shape
        if self.target.shape[0] != n:
            raise BatchError(f"target: {self.target.shape[0]} trials but input has {n}")
        if self.target.shape[1] < t:
            raise BatchError(f"target: {self.target.shape[1]} bins but input has {t} observed bins")
        if self.target.shape[2] < n_in:
            raise BatchError(f"target: {self.target.shape[2]} neurons but input has {n_in} held-in neurons")
        if self.mask.shape != self.target.shape:
            raise BatchError(f"mask: shape {tuple(self.mask.shape)} differs from target {tuple(self.target.shape)}")
        if self.mask.dtype != torch.bool:
            raise BatchError(f"mask: expected dtype bool, got {self.mask.dtype}")
        observed = self.target[self.mask]
        if not torch.isfinite(observed).all():
            raise BatchError("target: NaN or infinite counts where mask is True")
        if (observed < 0).any() or (observed != torch.round(observed)).any():
            raise BatchError("target: counts where mask is True must be non-negative whole numbers")
        if self.index.shape != (n,):
            raise BatchError(f"index: expected shape ({n},), got {tuple(self.index.shape)}")
        if self.behavior is not None and (self.behavior.dim() != 3 or self.behavior.shape[:2] != (n, t)):
            raise BatchError(
                f"behavior: expected shape ({n}, {t}, B), got {tuple(self.behavior.shape)}"
            )
        return self


def make_batch(
    heldin: ArrayLike,
    heldout: Optional[ArrayLike] = None,
    heldin_forward: Optional[ArrayLike] = None,
    heldout_forward: Optional[ArrayLike] = None,
    *,
    n_heldout: Optional[int] = None,
    n_forward: Optional[int] = None,
    behavior: Optional[ArrayLike] = None,
    index: Optional[Sequence[int]] = None,
) -> Batch:
    """Build a validated :class:`Batch` from nlb_tools-style arrays.

    Parameters
    ----------
    heldin : array, shape (trial, T, N_in)
        Held-in spike counts in the observed bins.
    heldout : array, shape (trial, T, N_out), optional
        Held-out neurons' counts. ``None`` for evaluation trials: then give ``n_heldout`` and the
        entries are masked out of the likelihood.
    heldin_forward, heldout_forward : arrays, shape (trial, F, N_in) and (trial, F, N_out), optional
        Counts in the forward-prediction bins; ``None`` means unknown (masked, needs ``n_forward``).
    n_heldout, n_forward : int, optional
        Sizes to use when the matching arrays are not given (default 0).
    behavior : array, shape (trial, T, B), optional
    index : sequence of int, optional
        Trial ids; default ``0 .. trial-1``.

    Returns
    -------
    Batch
    """
    x = _as_tensor(heldin, "heldin")
    check_counts(x, "heldin")
    n, t, n_in = x.shape

    def part(arr, name, rows, cols_default):
        if arr is None:
            return None, cols_default
        a = _as_tensor(arr, name)
        check_counts(a, name, allow_empty=True)
        if a.dim() != 3 or a.shape[0] != n or (rows is not None and a.shape[1] != rows):
            want = f"({n}, {rows if rows is not None else 'F'}, ...)"
            raise BatchError(f"{name}: expected shape {want} to match heldin {tuple(x.shape)}, got {tuple(a.shape)}")
        return a, a.shape[2]

    ho, n_out = part(heldout, "heldout", t, n_heldout or 0)
    hif, _ = part(heldin_forward, "heldin_forward", None, 0)
    f = hif.shape[1] if hif is not None else None
    hof, _ = part(heldout_forward, "heldout_forward", f, 0)
    if f is None:
        f = hof.shape[1] if hof is not None else (n_forward or 0)
    if n_forward is not None and f != n_forward:
        raise BatchError(f"forward arrays have {f} bins but n_forward={n_forward}")
    if hif is not None and hif.shape[2] != n_in:
        raise BatchError(f"heldin_forward: {hif.shape[2]} neurons but heldin has {n_in}")
    if hof is not None and hof.shape[2] != n_out:
        raise BatchError(f"heldout_forward: {hof.shape[2]} neurons but heldout has {n_out}")
    if ho is None and n_heldout is None and hof is not None:
        n_out = hof.shape[2]

    n_all = n_in + n_out
    target = torch.zeros(n, t + f, n_all)
    mask = torch.zeros(n, t + f, n_all, dtype=torch.bool)
    target[:, :t, :n_in] = x
    mask[:, :t, :n_in] = True
    if ho is not None:
        target[:, :t, n_in:] = ho
        mask[:, :t, n_in:] = True
    if hif is not None:
        target[:, t:, :n_in] = hif
        mask[:, t:, :n_in] = True
    if hof is not None:
        target[:, t:, n_in:] = hof
        mask[:, t:, n_in:] = True
    beh = None if behavior is None else _as_tensor(behavior, "behavior")
    idx = torch.arange(n) if index is None else torch.as_tensor(index, dtype=torch.long)
    return Batch(input=x, target=target, mask=mask, index=idx, behavior=beh).validate()
