"""A recording as trials x bins x units, the shape every reader fills, and its batches.

A :class:`Recording` holds spike counts ``(trial, time, unit)`` on one grid of bins aligned on an
event, with ``observed`` saying which bins of which trial lie inside the trial: trials of unequal
length are padded at the end (or, aligned on an event, at either end) and the padding is masked.
:meth:`Recording.batch` turns it into the project's one data contract
(:class:`~pyro_langevin.batch.Batch`): the chosen held-out units become the trailing columns, the
padding is ``mask`` False (never scored, never a target), the guide reads zeros there.

Readers: :func:`~pyro_langevin.recording.nwb.read_nwb` (an NWB file, read with pynwb),
:func:`read_arrays` (an ``.npz`` or ``.h5`` file holding a counts array) and
:meth:`Recording.from_arrays` (NumPy arrays in Python). Bad input raises :class:`RecordingError`,
one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pyro_langevin.batch import Batch, BatchError, check_counts
from pyro_langevin.errors import InputError

__all__ = ["Recording", "RecordingError", "read_arrays", "check_conditions", "ARRAY_SUFFIXES"]

PathLike = Union[str, Path]
#: File types ``read_arrays`` reads.
ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")


class RecordingError(InputError):
    """A recording that cannot be read or used as asked; the message names the file and the field."""


def check_conditions(labels: Sequence[Any], where: str) -> np.ndarray:
    """Condition labels as strings, one per trial; refuse a single value (nothing to compare).

    ``where`` names the file and field for the message (``"rec.nwb: trials.condition"``).
    """
    out = np.asarray([str(x) for x in np.asarray(labels).tolist()], dtype=object)
    values = sorted(set(out.tolist()))
    if len(values) < 2:
        shown = repr(values[0]) if values else "none"
        raise RecordingError(f"{where} has one value ({shown}) across the {len(out)} trials: conditions need a "
                             "field that tells at least two apart (or leave --condition out)")
    return out


@dataclass
class Recording:
    """Spike counts of a recording on one grid of bins (see the module docstring).

    Attributes
    ----------
    counts : ndarray, shape (trial, time, unit)
        Spike counts per bin (whole numbers, float64); zero where ``observed`` is False.
    observed : ndarray of bool, shape (trial, time)
        True for bins inside the trial; False for padding.
    bin_ms : float
        Bin width in ms.
    time_ms : ndarray, shape (time,)
        Each bin's centre in ms relative to the alignment event.
    trial_ids, unit_ids : ndarray
        Ids from the file (the trials and units tables' ``id``), or 0.. for arrays.
    source : str
        Where the data came from (a file path, or ``"arrays"``).
    align : str
        The event bins are aligned on (a trials column, ``start_time``, or ``"bin 0"`` for arrays).
    conditions : ndarray of str, optional
        A condition label per trial (for PSTHs and figures).
    condition_name : str, optional
    behavior : ndarray, shape (trial, time, B), optional
        Behaviour per bin (NaN where unknown), for decoding.
    behavior_name : str, optional
    notes : list of str
        What reading did that a user should know (padding, dropped trials, units left out).
    reading : dict
        The options it was read with (recorded in the run's metrics and checkpoints).
    """

    counts: np.ndarray
    observed: np.ndarray
    bin_ms: float
    time_ms: np.ndarray
    trial_ids: np.ndarray
    unit_ids: np.ndarray
    source: str = "arrays"
    align: str = "bin 0"
    conditions: Optional[np.ndarray] = None
    condition_name: Optional[str] = None
    behavior: Optional[np.ndarray] = None
    behavior_name: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    reading: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, t, u = self.counts.shape
        where = self.source
        if self.observed.shape != (n, t):
            raise RecordingError(f"{where}: observed has shape {self.observed.shape}, expected ({n}, {t})")
        for name, arr, size in (("time_ms", self.time_ms, t), ("trial_ids", self.trial_ids, n),
                                ("unit_ids", self.unit_ids, u)):
            if np.shape(arr) != (size,):
                raise RecordingError(f"{where}: {name} has shape {np.shape(arr)}, expected ({size},)")
        if self.conditions is not None and np.shape(self.conditions) != (n,):
            raise RecordingError(f"{where}: {self.condition_name or 'conditions'} has shape "
                                 f"{np.shape(self.conditions)}, expected one label per trial ({n},)")
        if self.behavior is not None and (self.behavior.ndim != 3 or self.behavior.shape[:2] != (n, t)):
            raise RecordingError(f"{where}: {self.behavior_name or 'behavior'} has shape {self.behavior.shape}, "
                                 f"expected (trial, time, B) with {n} trials and {t} bins")
        if not self.observed.any(axis=1).all():
            raise RecordingError(f"{where}: trial {self.trial_ids[~self.observed.any(axis=1)][0]} has no observed bins")

    # ----- sizes ---------------------------------------------------------------------------------
    @property
    def n_trials(self) -> int:
        return self.counts.shape[0]

    @property
    def n_bins(self) -> int:
        return self.counts.shape[1]

    @property
    def n_units(self) -> int:
        return self.counts.shape[2]

    @property
    def n_padded_trials(self) -> int:
        """Trials with at least one padded (unobserved) bin."""
        return int((~self.observed).any(axis=1).sum())

    def mean_rates_hz(self) -> np.ndarray:
        """Each unit's mean firing rate over the observed bins, in Hz."""
        seconds = self.observed.sum() * self.bin_ms / 1000.0
        return self.counts.sum(axis=(0, 1)) / seconds

    def size(self) -> Dict[str, int]:
        """``{"trials", "units", "bins"}``: what the defaults are chosen by."""
        return {"trials": self.n_trials, "units": self.n_units, "bins": self.n_bins}

    def subset(self, trials: Optional[np.ndarray] = None, units: Optional[np.ndarray] = None) -> "Recording":
        """The recording restricted to rows ``trials`` and columns ``units`` (index arrays or masks)."""
        tr = slice(None) if trials is None else trials
        un = slice(None) if units is None else units
        return dataclasses.replace(
            self, counts=self.counts[tr][:, :, un], observed=self.observed[tr], trial_ids=self.trial_ids[tr],
            unit_ids=self.unit_ids[un], conditions=None if self.conditions is None else self.conditions[tr],
            behavior=None if self.behavior is None else self.behavior[tr], notes=list(self.notes))

    # ----- the batch -----------------------------------------------------------------------------
    def unit_order(self, heldout: Sequence[int] = ()) -> np.ndarray:
        """Columns of ``counts`` in batch order: held-in units (ascending), then ``heldout`` as given."""
        heldout = np.asarray(heldout, dtype=int)
        if len(set(heldout.tolist())) != heldout.size or (heldout.size and not
                                                           (0 <= heldout.min() and heldout.max() < self.n_units)):
            raise RecordingError(f"held-out units must be distinct columns in 0..{self.n_units - 1}, got {heldout.tolist()}")
        if heldout.size >= self.n_units:
            raise RecordingError(f"{self.source}: cannot hold out all {self.n_units} units: the guide reads the others")
        heldin = np.setdiff1d(np.arange(self.n_units), heldout)
        return np.concatenate([heldin, heldout]).astype(int)

    def batch(self, heldout: Sequence[int] = ()) -> Batch:
        """The trials as a :class:`~pyro_langevin.batch.Batch` with ``heldout`` units (columns of
        ``counts``) as the trailing held-out neurons; no forward bins.

        ``mask`` is True on observed bins (every unit), False on padding; ``index`` is the row of
        each trial (``trial_ids`` keeps the file's ids); ``behavior`` is carried as given.
        """
        order = self.unit_order(heldout)
        n_in = self.n_units - len(heldout)
        target = torch.as_tensor(self.counts[:, :, order], dtype=torch.float32)
        mask = torch.as_tensor(np.repeat(self.observed[:, :, None], self.n_units, axis=2))
        beh = None if self.behavior is None else torch.as_tensor(self.behavior, dtype=torch.float32)
        return Batch(input=target[:, :, :n_in].clone(), target=target, mask=mask,
                     index=torch.arange(self.n_trials), behavior=beh).validate()

    # ----- from arrays ---------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        counts: Any,
        bin_ms: float,
        *,
        observed: Any = None,
        behavior: Any = None,
        conditions: Optional[Sequence[Any]] = None,
        trial_ids: Optional[Sequence[Any]] = None,
        unit_ids: Optional[Sequence[Any]] = None,
        start_ms: float = 0.0,
        source: str = "arrays",
        counts_name: str = "counts",
        behavior_name: str = "behavior",
        condition_name: str = "conditions",
    ) -> "Recording":
        """A recording from arrays: ``counts`` (trial, time, unit) whole non-negative counts per ``bin_ms`` bin.

        ``observed`` (trial, time) bool marks the bins inside each trial (default all); ``behavior``
        is (trial, time, B) or (trial, time); ``conditions`` one label per trial; ``start_ms`` the
        first bin's start relative to the alignment event. ``source`` and the ``*_name`` arguments
        name the file and fields in error messages.

        Raises
        ------
        RecordingError
            Counts of the wrong rank, negative, non-integer, NaN or infinite (naming the first
            offending entry), misshapen companions, or a condition array with one value.
        """
        where = f"{source}: {counts_name}"
        try:
            raw = torch.as_tensor(np.asarray(counts))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RecordingError(f"{where}: not a numeric array ({exc})") from None
        if raw.dtype == torch.bool or not (raw.is_floating_point() or raw.dtype in
                                           (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise RecordingError(f"{where}: expected a numeric array of counts, got dtype {np.asarray(counts).dtype}")
        try:
            check_counts(raw, where)
        except BatchError as exc:
            raise RecordingError(str(exc).replace("(trial, time, neuron)", "(trial, time, unit)")) from None
        arr = raw.numpy().astype(np.float64)
        n, t, u = arr.shape
        if not (isinstance(bin_ms, (int, float)) and not isinstance(bin_ms, bool) and bin_ms > 0):
            raise RecordingError(f"{source}: --bin-ms must be a positive number of ms, got {bin_ms!r}")
        obs = np.ones((n, t), bool) if observed is None else np.asarray(observed, dtype=bool)
        if obs.shape != (n, t):
            raise RecordingError(f"{source}: observed has shape {obs.shape}, expected (trial, time) = ({n}, {t})")
        beh = None
        if behavior is not None:
            beh = np.asarray(behavior, dtype=np.float64)
            beh = beh[:, :, None] if beh.ndim == 2 else beh
            if beh.ndim != 3 or beh.shape[:2] != (n, t):
                raise RecordingError(f"{source}: {behavior_name} has shape {np.shape(behavior)}, expected (trial, time, B) "
                                     f"or (trial, time) matching {counts_name} ({n}, {t})")
        cond = None
        if conditions is not None:
            if np.shape(conditions) != (n,):
                raise RecordingError(f"{source}: {condition_name} has shape {np.shape(conditions)}, expected one label "
                                     f"per trial ({n},)")
            cond = check_conditions(conditions, f"{source}: {condition_name}")
        time_ms = start_ms + bin_ms * (np.arange(t) + 0.5)
        padded = int((~obs).any(axis=1).sum())
        notes = [f"{padded} of {n} trials have padded bins (masked)"] if padded else []
        return cls(counts=arr * obs[:, :, None], observed=obs, bin_ms=float(bin_ms), time_ms=time_ms,
                   trial_ids=np.arange(n) if trial_ids is None else np.asarray(trial_ids),
                   unit_ids=np.arange(u) if unit_ids is None else np.asarray(unit_ids), source=source,
                   conditions=cond, condition_name=condition_name if cond is not None else None,
                   behavior=beh, behavior_name=behavior_name if beh is not None else None, notes=notes)


def _load_arrays(path: Path) -> Tuple[Dict[str, Any], List[str]]:
    """Every array of an ``.npz`` or ``.h5`` file by key (h5: dataset paths such as ``group/name``)."""
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise RecordingError(f"{path}: --arrays reads {', '.join(ARRAY_SUFFIXES)} files, not {path.suffix or 'this file'}")
    if not path.is_file():
        raise RecordingError(f"{path}: file not found")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as exc:  # numpy's zip and format errors, whatever their class
            raise RecordingError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        return arrays, sorted(arrays)
    import h5py

    arrays: Dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    except Exception as exc:
        raise RecordingError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for key, value in arrays.items():  # h5py gives strings as bytes
        if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
            arrays[key] = np.asarray([v.decode() if isinstance(v, bytes) else v for v in value.tolist()], dtype=object)
    return arrays, sorted(arrays)


def read_arrays(
    path: PathLike,
    bin_ms: float,
    counts: str = "counts",
    behavior: Optional[str] = None,
    condition: Optional[str] = None,
    start_ms: float = 0.0,
) -> Recording:
    """A recording from an ``.npz`` or ``.h5`` file: ``counts`` (trial, time, unit) under the key ``counts``.

    Parameters
    ----------
    path : path
        The file (``.npz``; ``.h5`` / ``.hdf5`` with datasets at any depth, keys ``group/name``).
    bin_ms : float
        The bins' width in ms.
    counts : str
        Key of the spike counts: whole, non-negative, finite numbers, rank 3.
    behavior, condition : str, optional
        Keys of a behaviour array (trial, time[, B]) and of one condition label per trial.
    start_ms : float
        The first bin's start relative to the alignment event (labels the time axis).

    Raises
    ------
    RecordingError
        A missing file or key (the message lists the keys there are), or bad counts.
    """
    path = Path(path)
    arrays, keys = _load_arrays(path)
    for role, key in (("--counts", counts), ("--behavior", behavior), ("--condition", condition)):
        if key is not None and key not in arrays:
            raise RecordingError(f"{path}: no array {key!r} ({role}); the file holds: {', '.join(keys) or 'nothing'}")
    rec = Recording.from_arrays(arrays[counts], bin_ms, behavior=None if behavior is None else arrays[behavior],
                                conditions=None if condition is None else arrays[condition], start_ms=start_ms,
                                source=str(path), counts_name=f"counts {counts!r}",
                                behavior_name=behavior or "behavior", condition_name=condition or "conditions")
    rec.reading = {"arrays": str(path), "counts": counts, "behavior": behavior, "condition": condition,
                   "bin_ms": bin_ms, "start_ms": start_ms}
    return rec
