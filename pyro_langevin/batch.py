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

from pyro_langevin.errors import InputError

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["Batch", "make_batch", "BatchError"]


class BatchError(InputError):
    """Raised when arrays do not satisfy the batch contract; the message names the field."""


def _as_tensor(x: ArrayLike, name: str, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
    """``x`` as a tensor (of ``dtype``, or its own numeric dtype when ``dtype`` is None)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise BatchError(f"{name}: cannot convert {type(x).__name__} to an array ({exc})") from exc
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise BatchError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:  # torch lacks uint16/32/64 ops
            arr = arr.astype(np.int64)
        t = torch.as_tensor(arr)
    if t.is_complex():
        raise BatchError(f"{name}: expected real-valued counts, got dtype {t.dtype}")
    return t if dtype is None else t.to(dtype)


_DIM_NAMES = ("trial", "time", "neuron")
#: Largest accepted count per bin: float32 represents every whole number up to 2**24 exactly.
MAX_COUNT = 2**24


def check_counts(x: torch.Tensor, name: str, ndim: int = 3, allow_empty: bool = False) -> None:
    """Raise :class:`BatchError` unless ``x`` holds finite, whole, non-negative counts.

    Parameters
    ----------
    x : torch.Tensor
        Spike counts, ``ndim``-dimensional (``(trial, time, neuron)`` for 3).
    name : str
        The field name used in error messages (e.g. ``"heldin"``).
    ndim : int
        Required number of dimensions.
    allow_empty : bool
        Accept a size-0 ``time`` or ``neuron`` axis (e.g. no held-out neurons). Zero trials never
        pass unless this is set.

    Raises
    ------
    BatchError
        The message starts with ``name`` and says what is wrong and where (first offending index).
    """
    if x.dim() != ndim:
        raise BatchError(
            f"{name}: expected {ndim} dimensions (trial, time, neuron), got {x.dim()} with shape {tuple(x.shape)}"
        )
    if x.is_complex():
        raise BatchError(f"{name}: expected real-valued counts, got dtype {x.dtype}")
    if x.numel() == 0 and not allow_empty:
        empty = [_DIM_NAMES[i] if ndim == 3 else f"axis {i}" for i, s in enumerate(x.shape) if s == 0]
        what = {"trial": "no trials", "time": "no time bins (empty trials)", "neuron": "zero neurons"}
        reasons = ", ".join(what.get(e, e) for e in empty)
        raise BatchError(f"{name}: empty array of shape {tuple(x.shape)} ({reasons})")
    if x.dtype == torch.bool or x.numel() == 0:
        return
    if x.is_floating_point():
        finite = torch.isfinite(x)
        if not finite.all():
            idx = (~finite).nonzero()[0].tolist()
            value = x[tuple(idx)].item()
            raise BatchError(f"{name}: contains NaN or infinite counts (first {value} at index {idx})")
    neg = x < 0
    if neg.any():
        idx = neg.nonzero()[0].tolist()
        raise BatchError(f"{name}: contains negative counts (first {x[tuple(idx)].item()} at index {idx})")
    can_exceed = x.is_floating_point() or torch.iinfo(x.dtype).max > MAX_COUNT
    too_big = x > MAX_COUNT if can_exceed else None
    if too_big is not None and too_big.any():
        idx = too_big.nonzero()[0].tolist()
        raise BatchError(
            f"{name}: count {x[tuple(idx)].item()} at index {idx} exceeds {MAX_COUNT} (2**24, the largest "
            "whole number float32 holds exactly); is this really a spike count per bin?"
        )
    if x.is_floating_point():
        frac = x != torch.round(x)
        if frac.any():
            idx = frac.nonzero()[0].tolist()
            raise BatchError(
                f"{name}: spike counts must be whole numbers (first non-integer {x[tuple(idx)].item()} at index {idx})"
            )


def _counts(x: ArrayLike, name: str, allow_empty: bool = False) -> torch.Tensor:
    """Check counts in their own dtype (so float64 0.5 or 1e40 cannot hide in float32), return float32."""
    t = _as_tensor(x, name, dtype=None)
    check_counts(t, name, allow_empty=allow_empty)
    return t.to(torch.float32)


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
        if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
            i = int(idx)
            n = self.n_trials
            if not -n <= i < n:
                raise IndexError(f"trial {i} out of range for a batch of {n} trials")
            i = i % n
            idx = slice(i, i + 1)
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
        """Check shapes, dtypes and values; return ``self`` or raise :class:`BatchError`.

        Checks: ``input`` holds finite whole non-negative counts, 3-D, with at least one trial, bin
        and neuron; ``target`` and ``mask`` are 3-D with the same shape, as many trials as
        ``input`` and at least its bins and neurons; ``mask`` is bool and selects only valid counts
        (entries outside the mask may hold anything, e.g. NaN for missing data); ``index`` is a
        ``(trial,)`` integer tensor; ``behavior`` (if any) is ``(trial, T, B)``.
        """
        for field_name in ("input", "target", "mask", "index"):
            if not isinstance(getattr(self, field_name), torch.Tensor):
                raise BatchError(f"{field_name}: expected a torch.Tensor, got {type(getattr(self, field_name)).__name__}")
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
        if not self.target.is_floating_point():
            raise BatchError(f"target: expected a floating-point dtype, got {self.target.dtype}")
        if self.mask.shape != self.target.shape:
            raise BatchError(f"mask: shape {tuple(self.mask.shape)} differs from target {tuple(self.target.shape)}")
        if self.mask.dtype != torch.bool:
            raise BatchError(f"mask: expected dtype bool, got {self.mask.dtype}")
        if self.mask.device != self.target.device or self.input.device != self.target.device:
            raise BatchError(
                f"target: input, target and mask must share a device, got {self.input.device}, "
                f"{self.target.device}, {self.mask.device}"
            )
        observed = self.target[self.mask]
        if not torch.isfinite(observed).all():
            raise BatchError("target: NaN or infinite counts where mask is True")
        if (observed < 0).any() or (observed != torch.round(observed)).any():
            raise BatchError("target: counts where mask is True must be non-negative whole numbers")
        if self.index.shape != (n,):
            raise BatchError(f"index: expected shape ({n},), got {tuple(self.index.shape)}")
        if self.index.is_floating_point() or self.index.is_complex() or self.index.dtype == torch.bool:
            raise BatchError(f"index: expected an integer dtype, got {self.index.dtype}")
        if self.behavior is not None and (
            not isinstance(self.behavior, torch.Tensor) or self.behavior.dim() != 3 or self.behavior.shape[:2] != (n, t)
        ):
            shape = tuple(self.behavior.shape) if hasattr(self.behavior, "shape") else type(self.behavior).__name__
            raise BatchError(f"behavior: expected shape ({n}, {t}, B), got {shape}")
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
    for name, value in (("n_heldout", n_heldout), ("n_forward", n_forward)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
            raise BatchError(f"{name}: expected a non-negative int, got {value!r}")
    x = _counts(heldin, "heldin")
    n, t, n_in = x.shape

    def part(arr, name, rows, cols, what_cols):
        """Check one optional array: (n, rows, cols) where rows/cols None mean 'any'."""
        if arr is None:
            return None
        a = _counts(arr, name, allow_empty=True)
        if a.shape[0] != n:
            raise BatchError(f"{name}: {a.shape[0]} trials but heldin has {n} (shapes {tuple(a.shape)} vs {tuple(x.shape)})")
        if rows is not None and a.shape[1] != rows:
            raise BatchError(f"{name}: {a.shape[1]} bins but {rows} expected (shape {tuple(a.shape)}, heldin {tuple(x.shape)})")
        if cols is not None and a.shape[2] != cols:
            verb = "is" if what_cols.startswith("n_") else "has"
            raise BatchError(f"{name}: {a.shape[2]} neurons but {what_cols} {verb} {cols} (shape {tuple(a.shape)})")
        return a

    ho = part(heldout, "heldout", t, n_heldout, "n_heldout")
    n_out = ho.shape[2] if ho is not None else n_heldout
    hif = part(heldin_forward, "heldin_forward", n_forward, n_in, "heldin")
    f = hif.shape[1] if hif is not None else n_forward
    hof = part(heldout_forward, "heldout_forward", f, n_out,
               "heldout" if ho is not None else "n_heldout")
    if n_out is None:
        n_out = hof.shape[2] if hof is not None else 0
    if f is None:
        f = hof.shape[1] if hof is not None else 0

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
    if index is None:
        idx = torch.arange(n)
    else:
        raw = _as_tensor(index, "index", dtype=None)
        if raw.dim() != 1 or raw.shape[0] != n:
            raise BatchError(f"index: expected {n} trial ids (one per heldin trial), got shape {tuple(raw.shape)}")
        if raw.is_floating_point() and not (torch.isfinite(raw).all() and (raw == torch.round(raw)).all()):
            raise BatchError("index: trial ids must be whole numbers")
        if raw.dtype == torch.bool:
            raise BatchError("index: trial ids must be integers, got bool")
        idx = raw.to(torch.long)
    return Batch(input=x, target=target, mask=mask, index=idx, behavior=beh).validate()
