"""Reading and writing nlb_tools-style HDF5 tensor files, with validation.

The files hold flat datasets (``train_spikes_heldin`` ...) or one group per dataset
(``mc_maze_small`` / ``mc_maze_small_20``) as ``nlb_tools.make_tensors.save_to_h5`` writes them.
Every failure raises :class:`~pyro_langevin.data.errors.NLBDataError` naming the file and field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import h5py
import numpy as np

from pyro_langevin.atomic import atomic_path
from pyro_langevin.data.errors import NLBDataError

__all__ = ["read_h5", "write_h5", "check_spike_array", "as_ragged"]

PathLike = Union[str, os.PathLike]


def _read_group(group: h5py.Group, path: Path) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in group.keys():
        try:
            obj = group[key]
            out[key] = _read_group(obj, path) if isinstance(obj, h5py.Group) else obj[()]
        except NLBDataError:
            raise
        except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError for damaged data
            raise NLBDataError(f"{path}: field '{group.name.rstrip('/')}/{key}' cannot be read "
                               f"(file corrupt or truncated?): {exc}") from exc
    return out


def read_h5(
    path: PathLike,
    required: Iterable[str] = (),
    spike_fields: Optional[Iterable[str]] = None,
) -> Dict[str, Any]:
    """Read a whole HDF5 file into a (nested) dict of arrays, validating it.

    Parameters
    ----------
    path : path-like
        The ``.h5`` file.
    required : iterable of str
        Top-level keys that must be present.
    spike_fields : iterable of str, optional
        Keys (top level) whose arrays must be 3-D spike counts: whole, non-negative numbers
        where not NaN. Default: every top-level key containing ``"spikes"``.

    Returns
    -------
    dict
        ``{key: np.ndarray or dict}``.

    Raises
    ------
    NLBDataError
        If the file is missing, not HDF5, truncated, lacks a required field or holds bad counts.
    """
    path = Path(path)
    if not path.is_file():
        raise NLBDataError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise NLBDataError(f"{path}: not a readable HDF5 file (corrupt or truncated?): {exc}") from exc
    with f:
        data = _read_group(f, path)
    missing = [k for k in required if k not in data]
    if missing:
        raise NLBDataError(f"{path}: missing required field(s) {missing}; found {sorted(data)}")
    fields = [k for k in data if "spikes" in k] if spike_fields is None else list(spike_fields)
    for key in fields:
        if key in data:
            check_spike_array(data[key], f"{path}: field '{key}'")
    return data


def check_spike_array(arr: Any, where: str) -> np.ndarray:
    """Check ``arr`` is a 3-D array of whole non-negative counts (NaN allowed); return it as float.

    Parameters
    ----------
    arr : array-like
    where : str
        Prefix for the error message (file and field name).
    """
    a = np.asarray(arr)
    if a.dtype == object or not np.issubdtype(a.dtype, np.number):
        raise NLBDataError(f"{where}: expected a numeric array, got dtype {a.dtype}")
    if a.ndim != 3:
        raise NLBDataError(f"{where}: expected 3 dimensions (trial, time, neuron), got shape {a.shape}")
    a = a.astype(np.float64)
    finite = a[~np.isnan(a)]
    if np.isinf(finite).any():
        raise NLBDataError(f"{where}: contains infinite values")
    if (finite < 0).any():
        raise NLBDataError(f"{where}: contains negative spike counts")
    if (finite != np.round(finite)).any():
        raise NLBDataError(f"{where}: spike counts must be whole numbers (are these rates?)")
    return a


def as_ragged(arr: Any) -> np.ndarray:
    """A 1-D object array of 1-D arrays from a list of index arrays.

    nlb_tools builds ``eval_cond_idx`` with ``np.array(list, dtype=object)``, which silently makes a
    2-D object array of scalars when every condition has the same number of trials.
    """
    arr = np.asarray(arr, dtype=object)
    rows = list(arr) if arr.ndim == 1 else [np.asarray(list(row)) for row in arr]
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = np.asarray(row).reshape(-1)
    return out


def _write_group(group: h5py.Group, data: Mapping[str, Any]) -> None:
    for key, val in data.items():
        if isinstance(val, Mapping):
            _write_group(group.require_group(key), val)
            continue
        arr = np.asarray(val)
        if arr.dtype == object:  # ragged index lists (eval_cond_idx) -> variable-length ints
            arr = as_ragged(arr)
            sub = np.asarray(arr[0]).dtype if arr.size else np.dtype("int64")
            sub = np.int32 if np.issubdtype(sub, np.integer) else np.float32
            dset = group.create_dataset(key, shape=arr.shape, dtype=h5py.vlen_dtype(sub))
            for i, item in enumerate(arr):
                dset[i] = np.asarray(item, dtype=sub)
            continue
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        elif arr.dtype == bool:
            pass
        elif np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int32)
        group.create_dataset(key, data=arr, compression="gzip" if arr.ndim else None)


def write_h5(path: PathLike, data: Mapping[str, Any]) -> Path:
    """Write a (nested) dict of arrays to ``path`` atomically (temp file, then rename).

    Floats are stored as float32 and integers as int32 (as ``nlb_tools.save_to_h5`` does);
    object arrays of index arrays become variable-length datasets. An existing file is replaced.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_group(f, data)
    return path
