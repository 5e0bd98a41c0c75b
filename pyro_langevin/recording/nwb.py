"""Read a lab recording from an NWB file with pynwb: trials aligned on an event, binned units.

What is read (docs/recording.md has the whole convention):

* the **trials table** (``intervals/trials``): ``start_time`` and ``stop_time`` (seconds), the
  alignment event (``--align``: any numeric column, default ``start_time``), and optionally a
  condition column (``--condition``) and a selection of rows (``--trials``: a pandas query over its
  columns, e.g. ``"split == 'train'"`` or ``"id < 50"``);
* the **units table** (``units``): ``spike_times`` (seconds, the session's clock), the ``id``
  column (``--units``), any scalar column for a selection (``--where "quality == 'good'"``) and,
  when present, ``obs_intervals`` (spike times outside them are refused as outside the recording);
* optionally a **TimeSeries** (``--behavior NAME``) in ``acquisition`` or in a ``processing``
  module (``NAME``, ``module/NAME`` or ``module/container/NAME``), averaged within each bin.

Bins: ``--window START,STOP`` (ms around the event) gives every trial the same bins; the window must
lie inside each trial (``--drop-short`` drops trials it does not fit). Without a window each trial
is binned from its ``start_time`` to its ``stop_time`` on one grid relative to the event: shorter
trials are padded, and the padding is masked (:class:`~pyro_langevin.recording.data.Recording`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from pyro_langevin.recording.data import Recording, RecordingError, check_conditions

__all__ = ["read_nwb", "TOLERANCE_S"]

PathLike = Union[str, Path]
#: Times closer than this (seconds) are equal: trial bounds in float files are not exact (1.05 - 0.25).
TOLERANCE_S = 1e-6


def _scalar_frame(table: Any) -> pd.DataFrame:
    """The table's one-value-per-row columns as a DataFrame indexed by ``id`` (ragged ones left out)."""
    from hdmf.common.table import VectorData, VectorIndex, DynamicTableRegion

    cols: Dict[str, np.ndarray] = {}
    for name in table.colnames:
        col = table[name]
        if isinstance(col, (VectorIndex, DynamicTableRegion)) or not isinstance(col, VectorData):
            continue
        values = np.asarray(col.data[:])
        if values.ndim != 1:
            continue
        if values.dtype.kind in "SO":
            values = np.asarray([v.decode() if isinstance(v, bytes) else v for v in values.tolist()], dtype=object)
        cols[name] = values
    return pd.DataFrame(cols, index=pd.Index(np.asarray(table.id.data[:]), name="id"))


def _query(frame: pd.DataFrame, expr: str, path: Path, option: str, table: str) -> pd.DataFrame:
    """``frame.query(expr)``, with a one-line error naming the option, the file and the table's columns."""
    try:
        picked = frame.query(expr, engine="python")
    except Exception as exc:  # pandas raises UndefinedVariableError, SyntaxError, TypeError ...
        cols = ", ".join(["id", *frame.columns])
        name = re.search(r"name '([^']+)' is not defined", str(exc))
        if name:
            raise RecordingError(f"{path}: {option} {expr!r}: the {table} table has no column {name.group(1)!r} "
                                 f"(its columns: {cols})") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecordingError(f"{path}: {option} {expr!r} is not a valid selection over the {table} table "
                             f"({type(exc).__name__}: {first}; columns: {cols})") from None
    if not isinstance(picked, pd.DataFrame):
        raise RecordingError(f"{path}: {option} {expr!r} does not select rows of the {table} table")
    return picked


def _ragged(table: Any, name: str) -> List[np.ndarray]:
    """A ragged column (e.g. ``spike_times``) as one array per row, read in one go."""
    index = table[name]
    ends = np.asarray(index.data[:], dtype=np.int64)
    flat = np.asarray(index.target.data[:])
    return np.split(flat, ends[:-1]) if ends.size else []


def _open(path: Path):
    try:
        from pynwb import NWBHDF5IO
    except ImportError as exc:
        raise RecordingError(f"{path}: reading NWB files needs pynwb ({exc}): pip install -e '.[recording]'") from None
    if not path.is_file():
        raise RecordingError(f"{path}: file not found")
    try:
        io = NWBHDF5IO(str(path), "r", load_namespaces=True)
        return io, io.read()
    except Exception as exc:  # h5py / hdmf / pynwb errors, whatever their class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecordingError(f"{path}: not a readable NWB file ({first})") from None


def _trials(nwb: Any, path: Path) -> pd.DataFrame:
    table = nwb.trials if nwb.trials is not None else (nwb.intervals or {}).get("trials")
    if table is None or len(table) == 0:
        raise RecordingError(f"{path}: no trials table (intervals/trials): fit --nwb bins the trials it lists; add one "
                             "(NWBFile.add_trial with start_time, stop_time and event columns), or bin the data yourself "
                             "and pass --arrays")
    frame = _scalar_frame(table)
    missing = [c for c in ("start_time", "stop_time") if c not in frame]
    if missing:
        raise RecordingError(f"{path}: the trials table has no {' or '.join(missing)} column")
    return frame


def _grid(frame: pd.DataFrame, events: np.ndarray, window_ms: Optional[Tuple[float, float]], bin_ms: float,
          align: str, drop_short: bool, path: Path, notes: List[str]) -> Tuple[pd.DataFrame, np.ndarray, float, int]:
    """The trials kept, their events, the grid's first edge (ms from the event) and its number of bins."""
    start, stop = frame["start_time"].to_numpy(float), frame["stop_time"].to_numpy(float)
    if window_ms is not None:
        a, b = window_ms
        if not b - a >= bin_ms:
            raise RecordingError(f"{path}: --window {a:g},{b:g} leaves no bins of {bin_ms:g} ms (START must be below "
                                 f"STOP by at least one bin)")
        n_bins = (b - a) / bin_ms
        if abs(n_bins - round(n_bins)) > 1e-9:
            raise RecordingError(f"{path}: --bin-ms {bin_ms:g} does not divide the window {a:g}..{b:g} ms "
                                 f"({b - a:g} ms); choose a window that is a whole number of bins")
        late = events + b / 1000.0 > stop + TOLERANCE_S
        early = events + a / 1000.0 < start - TOLERANCE_S
        bad = late | early
        if bad.any():
            parts = []
            if late.any():
                parts.append(f"runs past the end of {int(late.sum())} of {len(frame)} trials (trials.stop_time)")
            if early.any():
                parts.append(f"starts before the start of {int(early.sum())} of {len(frame)} trials (trials.start_time)")
            if not drop_short:
                raise RecordingError(f"{path}: the window {a:g}..{b:g} ms around {align} {' and '.join(parts)}; "
                                     "shorten --window, or pass --drop-short to drop the trials it does not fit")
            if bad.all():
                raise RecordingError(f"{path}: the window {a:g}..{b:g} ms around {align} fits none of the "
                                     f"{len(frame)} trials (--drop-short would drop them all); shorten --window")
            notes.append(f"--drop-short: dropped {int(bad.sum())} of {len(frame)} trials the window "
                         f"{a:g}..{b:g} ms does not fit (ids {_ids(frame.index[bad])})")
            frame, events = frame[~bad], events[~bad]
        return frame, events, float(a), int(round(n_bins))
    rel_start = (start - events) * 1000.0
    rel_stop = (stop - events) * 1000.0
    a = math.floor(rel_start.min() / bin_ms + 1e-9) * bin_ms
    b = math.ceil(rel_stop.max() / bin_ms - 1e-9) * bin_ms
    return frame, events, float(a), int(round((b - a) / bin_ms))


def _ids(ids: Sequence[Any], n: int = 5) -> str:
    ids = list(ids)
    return ", ".join(str(i) for i in ids[:n]) + (", ..." if len(ids) > n else "")


def _find_series(nwb: Any, name: str, path: Path):
    """The TimeSeries ``name`` in acquisition or processing (``NAME``, ``module/NAME``, ``module/container/NAME``)."""
    from pynwb import TimeSeries

    found: Dict[str, Any] = {}

    def collect(prefix: str, obj: Any) -> None:
        if isinstance(obj, TimeSeries):
            found[prefix] = obj
        for child in getattr(obj, "children", ()):
            if isinstance(child, TimeSeries):
                found[f"{prefix}/{child.name}"] = child

    for key, obj in nwb.acquisition.items():
        collect(f"acquisition/{key}", obj)
    for mod_name, module in nwb.processing.items():
        for key, obj in module.data_interfaces.items():
            collect(f"{mod_name}/{key}", obj)
    matches = [p for p in found if p == name or p.endswith("/" + name)]
    if not matches:  # a container holding one series, named by the container
        matches = [p for p in found if p.rsplit("/", 1)[0].endswith("/" + name) or p.rsplit("/", 1)[0] == name]
    if len(matches) == 1:
        return matches[0], found[matches[0]]
    listed = ", ".join(sorted(found)) or "none"
    if not matches:
        raise RecordingError(f"{path}: no TimeSeries {name!r} for --behavior in acquisition or processing (there are: {listed})")
    raise RecordingError(f"{path}: --behavior {name!r} matches several TimeSeries ({', '.join(matches)}); name one by its path")


def _bin_series(series: Any, where: str, edges: np.ndarray) -> np.ndarray:
    """A TimeSeries averaged within each bin ``edges`` (trial, bins + 1) in seconds: (trial, bins, channels).

    A bin holding no sample takes the linear interpolation at its centre; bins outside the series' time
    range are NaN.
    """
    data = np.asarray(series.data[:], dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[0] == 0:
        raise RecordingError(f"{where}: expected data of shape (time,) or (time, channels), got {np.shape(series.data)}")
    if series.timestamps is not None:
        ts = np.asarray(series.timestamps[:], dtype=np.float64)
    else:
        ts = float(series.starting_time or 0.0) + np.arange(data.shape[0]) / float(series.rate)
    order = np.argsort(ts, kind="stable")
    ts, data = ts[order], data[order]
    valid = np.isfinite(data)
    cs = np.concatenate([np.zeros((1, data.shape[1])), np.cumsum(np.where(valid, data, 0.0), axis=0)])
    cn = np.concatenate([np.zeros((1, data.shape[1])), np.cumsum(valid, axis=0)])
    pos = np.searchsorted(ts, edges, side="left")  # (trial, bins + 1)
    lo, hi = pos[:, :-1], pos[:, 1:]
    sums, counts = cs[hi] - cs[lo], cn[hi] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums / counts
    centres = 0.5 * (edges[:, :-1] + edges[:, 1:])
    empty = counts == 0
    if empty.any():
        for c in range(data.shape[1]):
            ok = valid[:, c]
            interp = np.interp(centres, ts[ok], data[ok, c], left=np.nan, right=np.nan) if ok.any() \
                else np.full(centres.shape, np.nan)
            out[:, :, c] = np.where(empty[:, :, c], interp, out[:, :, c])
    return out


def _check_spikes(times: np.ndarray, unit_id: Any, intervals: Optional[np.ndarray], path: Path) -> None:
    """Refuse spike times outside the recording: not finite, negative, or outside the unit's obs_intervals."""
    bad = ~np.isfinite(times) | (times < 0)
    why = "negative or not a number: NWB times are seconds from the session's reference time"
    if intervals is not None and intervals.size and not bad.any():
        lo, hi = float(np.min(intervals[:, 0])), float(np.max(intervals[:, 1]))
        bad = (times < lo - TOLERANCE_S) | (times > hi + TOLERANCE_S)
        why = f"the unit's obs_intervals span {lo:g}..{hi:g} s"
    if bad.any():
        raise RecordingError(f"{path}: units.spike_times of unit {unit_id}: {int(bad.sum())} spike times outside the "
                             f"recording (first {float(times[bad][0]):g} s; {why})")


def read_nwb(
    path: PathLike,
    *,
    bin_ms: float = 20.0,
    align: str = "start_time",
    window_ms: Optional[Tuple[float, float]] = None,
    units: Optional[Sequence[int]] = None,
    where: Optional[str] = None,
    min_rate_hz: Optional[float] = None,
    trials: Optional[str] = None,
    condition: Optional[str] = None,
    behavior: Optional[str] = None,
    drop_short: bool = False,
) -> Recording:
    """Bin the units of an NWB file into trials (see the module docstring and docs/recording.md).

    Parameters
    ----------
    path : path
        The NWB file.
    bin_ms : float
        Bin width in ms.
    align : str
        The trials column holding each trial's alignment event in seconds (default ``start_time``).
    window_ms : (float, float), optional
        ``(START, STOP)`` in ms relative to the event; a whole number of bins, inside every trial.
        Without it, each trial is binned from its start to its stop (padded to the longest).
    units : sequence of int, optional
        Ids (the units table's ``id``) to keep.
    where : str, optional
        A pandas query over the units table's scalar columns (``"quality == 'good'"``).
    min_rate_hz : float, optional
        Keep units whose mean rate over the binned trials is at least this (Hz).
    trials : str, optional
        A pandas query over the trials table (``"split == 'train'"``, ``"id < 50"``).
    condition : str, optional
        A trials column labelling each trial's condition (two values at least).
    behavior : str, optional
        A TimeSeries averaged within each bin (kept for decoding).
    drop_short : bool
        Drop trials the window does not fit (or that lack the event) instead of refusing them.

    Returns
    -------
    Recording

    Raises
    ------
    RecordingError
        One line naming the file and the field: no trials table, an unknown event column (the
        columns are listed), a window that leaves no bins, is not a whole number of bins or runs
        past a trial's end, no units left after selection, spike times outside the recording, a
        units table without spike times, a condition column with one value, an unknown TimeSeries.
    """
    path = Path(path)
    if not (isinstance(bin_ms, (int, float)) and not isinstance(bin_ms, bool) and bin_ms > 0):
        raise RecordingError(f"{path}: --bin-ms must be a positive number of ms, got {bin_ms!r}")
    io, nwb = _open(path)
    try:
        return _read(nwb, path, float(bin_ms), align, window_ms, units, where, min_rate_hz, trials, condition,
                     behavior, drop_short)
    finally:
        io.close()


def _read(nwb, path, bin_ms, align, window_ms, units, where, min_rate_hz, trials, condition, behavior,
          drop_short) -> Recording:
    notes: List[str] = []
    frame = _trials(nwb, path)
    if trials is not None:
        frame = _query(frame, trials, path, "--trials", "trials")
        if frame.empty:
            raise RecordingError(f"{path}: --trials {trials!r} selects no trials")
    if align not in frame.columns:
        raise RecordingError(f"{path}: the trials table has no column {align!r} to --align on; its columns: "
                             f"{', '.join(frame.columns)}")
    try:
        events = frame[align].to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise RecordingError(f"{path}: trials.{align} holds {frame[align].dtype} values, not times in seconds; "
                             "--align needs an event time column") from None
    missing = ~np.isfinite(events)
    if missing.any():
        if not drop_short:
            raise RecordingError(f"{path}: trials.{align} has no time (NaN) for {int(missing.sum())} of {len(frame)} "
                                 f"trials (ids {_ids(frame.index[missing])}); select trials that have it with --trials, "
                                 "or pass --drop-short to drop them")
        if missing.all():
            raise RecordingError(f"{path}: trials.{align} has no time (NaN) for any of the {len(frame)} trials")
        notes.append(f"--drop-short: dropped {int(missing.sum())} trials without a {align} time")
        frame, events = frame[~missing], events[~missing]
    frame, events, first_ms, n_bins = _grid(frame, events, window_ms, bin_ms, align, drop_short, path, notes)

    # units: which, then their spikes binned on every trial's grid
    table = nwb.units
    if table is None or len(table) == 0:
        raise RecordingError(f"{path}: no units table (units): fit --nwb bins sorted units' spike_times")
    if "spike_times" not in table.colnames:
        raise RecordingError(f"{path}: the units table has no spike_times column (its columns: {', '.join(table.colnames)})")
    unit_frame = _scalar_frame(table)
    rows = np.arange(len(unit_frame))
    chosen = []
    if units is not None:
        wanted = list(dict.fromkeys(int(u) for u in units))
        have = {int(i): r for r, i in enumerate(unit_frame.index)}
        unknown = [u for u in wanted if u not in have]
        if unknown:
            raise RecordingError(f"{path}: --units: no unit with id {_ids(unknown)} in the units table ({len(have)} units, "
                                 f"ids {_ids(sorted(have))})")
        rows = np.asarray([have[u] for u in wanted], dtype=int)
        chosen.append(f"--units ({len(rows)} ids)")
    if where is not None:
        picked = set(_query(unit_frame, where, path, "--where", "units").index.tolist())
        rows = np.asarray([r for r in rows if unit_frame.index[r] in picked], dtype=int)
        chosen.append(f"--where {where!r}")
    if rows.size == 0:
        raise RecordingError(f"{path}: no units left after selection ({', '.join(chosen)}; the units table has "
                             f"{len(unit_frame)} units)")
    spikes = _ragged(table, "spike_times")
    intervals = _ragged(table, "obs_intervals") if "obs_intervals" in table.colnames else None
    ids = unit_frame.index.to_numpy()
    edges = events[:, None] + (first_ms + bin_ms * np.arange(n_bins + 1))[None, :] / 1000.0  # seconds
    counts = np.zeros((len(frame), n_bins, rows.size))
    for j, r in enumerate(rows):
        times = np.asarray(spikes[r], dtype=np.float64)
        iv = None if intervals is None else np.asarray(intervals[r], dtype=np.float64).reshape(-1, 2)
        _check_spikes(times, ids[r], iv, path)
        pos = np.searchsorted(np.sort(times), edges, side="left")
        counts[:, :, j] = np.diff(pos, axis=1)
    start, stop = frame["start_time"].to_numpy(float), frame["stop_time"].to_numpy(float)
    observed = (edges[:, :-1] >= start[:, None] - TOLERANCE_S) & (edges[:, 1:] <= stop[:, None] + TOLERANCE_S)
    if not observed.any(axis=1).all():
        short = frame.index[~observed.any(axis=1)]
        raise RecordingError(f"{path}: trials {_ids(short)} are shorter than one {bin_ms:g} ms bin (trials.start_time "
                             "to stop_time): no bins; select longer trials with --trials or use smaller --bin-ms")
    counts *= observed[:, :, None]
    padded = (~observed).any(axis=1)
    if padded.any():
        notes.append(f"{int(padded.sum())} of {len(frame)} trials are shorter than the grid ({n_bins} bins of "
                     f"{bin_ms:g} ms): {int((~observed).sum())} bins outside them are padded and masked")
    if min_rate_hz is not None:
        rates = counts.sum(axis=(0, 1)) / (observed.sum() * bin_ms / 1000.0)
        keep = rates >= min_rate_hz
        if not keep.any():
            raise RecordingError(f"{path}: no units left after selection ({', '.join(chosen + [f'--min-rate {min_rate_hz:g} Hz'])}): "
                                 f"{rows.size} units before --min-rate, the highest mean rate in the binned trials is "
                                 f"{rates.max():.3g} Hz")
        if not keep.all():
            notes.append(f"--min-rate {min_rate_hz:g} Hz: left out {int((~keep).sum())} of {rows.size} units")
        rows, counts = rows[keep], counts[:, :, keep]

    cond = None
    if condition is not None:
        if condition not in frame.columns:
            raise RecordingError(f"{path}: the trials table has no column {condition!r} for --condition; its columns: "
                                 f"{', '.join(frame.columns)}")
        cond = check_conditions(frame[condition].to_numpy(), f"{path}: trials.{condition}")
    beh = None
    beh_name = None
    if behavior is not None:
        beh_name, series = _find_series(nwb, behavior, path)
        beh = _bin_series(series, f"{path}: {beh_name}", edges)
        if np.isnan(beh[observed]).all():
            raise RecordingError(f"{path}: {beh_name} has no samples within the binned trials (--behavior)")
    time_ms = first_ms + bin_ms * (np.arange(n_bins) + 0.5)
    rec = Recording(counts=counts, observed=observed, bin_ms=bin_ms, time_ms=time_ms,
                    trial_ids=frame.index.to_numpy(), unit_ids=ids[rows], source=str(path), align=align,
                    conditions=cond, condition_name=condition, behavior=beh, behavior_name=beh_name, notes=notes)
    rec.reading = {"nwb": str(path), "align": align, "window_ms": None if window_ms is None else list(window_ms),
                   "bin_ms": bin_ms, "units": None if units is None else [int(u) for u in units], "where": where,
                   "min_rate_hz": min_rate_hz, "trials": trials, "condition": condition, "behavior": behavior,
                   "drop_short": drop_short}
    return rec
