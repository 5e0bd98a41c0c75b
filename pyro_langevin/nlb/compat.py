"""Compatibility shim so nlb_tools 0.0.4 runs under pandas 3.

nlb_tools was written for pandas 1.x. Under pandas 3 (copy-on-write, stricter indexing) three
spots break or warn:

* ``NWBDataset.resample`` calls ``np.nan_to_num(arr, copy=False)`` on the read-only array that
  ``DataFrame.to_numpy()`` returns under copy-on-write ("assignment destination is read-only").
  Fix: the ``np`` that ``nlb_tools.nwb_interface`` sees is a proxy whose ``nan_to_num`` copies.
* ``NWBDataset.calculate_onset`` indexes a timedelta-indexed Series by position
  (``peak_signals[0]``), a KeyError under pandas 3. Fix: a method with the same algorithm that
  uses ``.iloc``.
* ``make_tensors._make_psth`` compares a DataFrame with a tuple (deprecated in pandas 3: tuples
  will become scalar-like). Fix: for the duration of the call the trial table is a DataFrame
  subclass that turns a tuple operand of ``==`` into a Series over the columns.

:func:`apply_patches` is called when :mod:`pyro_langevin.nlb.data` imports nlb_tools; it patches
only when pandas >= 3 (or ``force=True``) and is idempotent. :func:`remove_patches` undoes it.
Each replacement behaves like the original under pandas 2, which the tests check.
"""

from __future__ import annotations

import functools
import types
from typing import Dict, Tuple

import numpy as np
import pandas as pd
import scipy.signal as signal

__all__ = ["apply_patches", "remove_patches", "patches_active", "pandas_major", "NLBCompatError"]


class NLBCompatError(RuntimeError):
    """Raised when nlb_tools cannot be made to work with the installed pandas."""


_ORIGINALS: Dict[Tuple[object, str], object] = {}


def pandas_major() -> int:
    """Major version of the installed pandas."""
    return int(pd.__version__.split(".")[0])


# ----- 1. resample: np.nan_to_num(copy=False) on read-only arrays -------------------------------
class _CopyingNumpy(types.ModuleType):
    """Stands in for ``numpy`` inside nlb_tools.nwb_interface; ``nan_to_num`` always copies."""

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def nan_to_num(x, copy=True, **kwargs):  # noqa: D401 - mirrors numpy's signature
        return np.nan_to_num(x, copy=True, **kwargs)


# ----- 2. calculate_onset: positional Series indexing --------------------------------------------
def _calculate_onset(self, field_name, onset_threshold, peak_prominence=0.1, peak_distance_s=0.1,
                     multipeak_threshold=0.2):
    """``NWBDataset.calculate_onset`` with positional access through ``.iloc`` (same algorithm)."""
    sig = functools.reduce(getattr, field_name.split("."), self.data)
    peaks, _ = signal.find_peaks(
        sig, prominence=peak_prominence, distance=peak_distance_s / (self.bin_width / 1000.0)
    )
    peak_times = pd.Series(self.data.index[peaks])
    onset, onset_index = [], []
    for index, row in self.trial_info.iterrows():
        start, end = row["start_time"], row["end_time"]
        trial_peaks = peak_times[(start < peak_times) & (peak_times < end)]
        if len(trial_peaks) == 0:
            continue
        peak_signals = sig.loc[trial_peaks]
        first = peak_signals.iloc[0]
        if (multipeak_threshold is not None and len(trial_peaks) > 1
                and first * multipeak_threshold < peak_signals.iloc[1:].max()):
            continue
        under = sig[start: trial_peaks.iloc[0]] < onset_threshold * first
        if under.sum() > 0:
            onset.append(under[::-1].idxmax())
            onset_index.append(index)
    self.trial_info[field_name.split(".")[-1] + "_onset"] = pd.Series(onset, index=onset_index)
    return peak_times


# ----- 3. _make_psth: DataFrame == tuple ----------------------------------------------------------
class _TupleSafeFrame(pd.DataFrame):
    """A DataFrame whose ``== tuple`` compares row-wise against the columns (pandas 1/2 meaning)."""

    _metadata: list = []

    @property
    def _constructor(self):
        return _TupleSafeFrame

    def __eq__(self, other):  # type: ignore[override]
        if isinstance(other, tuple) and len(other) == self.shape[1]:
            other = pd.Series(list(other), index=self.columns, dtype=object)
        return super().__eq__(other)

    __hash__ = None  # DataFrames are unhashable


def _wrap_make_psth(orig):
    @functools.wraps(orig)
    def _make_psth(dataset, *args, **kwargs):
        old = dataset.trial_info
        dataset.trial_info = _TupleSafeFrame(old)
        try:
            return orig(dataset, *args, **kwargs)
        finally:
            dataset.trial_info = old

    _make_psth._pyro_langevin_patched = True  # type: ignore[attr-defined]
    return _make_psth


def _set(obj, name, value) -> None:
    _ORIGINALS.setdefault((obj, name), getattr(obj, name))
    setattr(obj, name, value)


def apply_patches(force: bool = False) -> bool:
    """Patch nlb_tools for pandas >= 3 (or always with ``force``). Idempotent.

    Parameters
    ----------
    force : bool
        Patch even under pandas < 3 (the replacements behave identically there; used by tests).

    Returns
    -------
    bool
        Whether the patches are active after the call.

    Raises
    ------
    NLBCompatError
        If nlb_tools' internals are not the ones this shim knows (another nlb_tools version).
    """
    if patches_active():
        return True
    if not force and pandas_major() < 3:
        return False
    try:
        from nlb_tools import make_tensors, nwb_interface
    except ImportError as exc:  # pragma: no cover - nlb_tools is an optional dependency
        raise NLBCompatError(
            "nlb_tools is not installed: `pip install --no-deps nlb-tools` (plus pandas, pynwb)"
        ) from exc
    needed = [(nwb_interface, "np"), (nwb_interface.NWBDataset, "calculate_onset"),
              (make_tensors, "_make_psth")]
    for obj, name in needed:
        if not hasattr(obj, name):
            raise NLBCompatError(
                f"nlb_tools has no {getattr(obj, '__name__', obj)}.{name}: this nlb_tools version is "
                f"not supported with pandas {pd.__version__}; install pandas<3"
            )
    _set(nwb_interface, "np", _CopyingNumpy())
    _set(nwb_interface.NWBDataset, "calculate_onset", _calculate_onset)
    _set(make_tensors, "_make_psth", _wrap_make_psth(make_tensors._make_psth))
    return True


def remove_patches() -> None:
    """Undo :func:`apply_patches`."""
    while _ORIGINALS:
        (obj, name), value = _ORIGINALS.popitem()
        setattr(obj, name, value)


def patches_active() -> bool:
    """Whether :func:`apply_patches` is in effect."""
    return bool(_ORIGINALS)
