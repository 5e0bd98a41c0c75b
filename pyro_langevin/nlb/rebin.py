"""Coarser bins from finer ones: NLB's 20 ms tensors from its 5 ms tensors.

NLB bins spikes at 5 ms and sums them into 20 ms bins, so a preprocessed 5 ms folder gives the
20 ms one exactly by summing counts over groups of 4 bins (observed and forward windows alike:
140 + 40 bins become 35 + 10). Behaviour (hand velocity) is averaged over each group.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import numpy as np

from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.h5 import read_h5, write_h5

__all__ = ["rebin_counts", "rebin_folder"]

PathLike = Union[str, Path]
_FOLDER = re.compile(r"^(?P<dataset>[a-z0-9_]+)-(?P<bin>\d+)ms-(?P<phase>val|test)$")


def rebin_counts(x: np.ndarray, factor: int, reduce: str = "sum") -> np.ndarray:
    """Sum (or average) ``(trial, time, ...)`` over consecutive groups of ``factor`` bins.

    Raises
    ------
    NLBDataError
        When the number of bins is not a multiple of ``factor``.
    """
    x = np.asarray(x)
    if x.shape[1] % factor:
        raise NLBDataError(f"{x.shape[1]} bins cannot be grouped by {factor}")
    grouped = x.reshape(x.shape[0], x.shape[1] // factor, factor, *x.shape[2:])
    return grouped.sum(2) if reduce == "sum" else grouped.mean(2)


def _rebin_fields(fields: Mapping[str, Any], factor: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, Mapping):
            out[key] = _rebin_fields(value, factor)
        elif "spikes" in key or "rates" in key:
            out[key] = rebin_counts(value, factor, "sum")
        elif "behavior" in key:
            out[key] = rebin_counts(value, factor, "mean")
        elif "psth" in key:
            out[key] = rebin_counts(value, factor, "sum")
        else:  # condition indices and other per-trial fields
            out[key] = value
    return out


def rebin_folder(src: PathLike, dst_parent: PathLike, bin_ms: int = 20) -> Path:
    """Write ``{dataset}-{bin_ms}ms-{phase}/`` under ``dst_parent`` from a finer preprocessed folder.

    Parameters
    ----------
    src : path-like
        A ``{dataset}-05ms-{phase}/`` folder (train_input.h5, eval_input.h5[, eval_target.h5]).
    dst_parent : path-like
        Where the new folder goes (usable as ``--data-dir``).
    bin_ms : int
        The new bin size, a multiple of the source's.

    Returns
    -------
    Path
        The new folder.
    """
    src = Path(src)
    m = _FOLDER.match(src.name)
    if not m:
        raise NLBDataError(f"{src}: not a preprocessed folder name like mc_maze_small-05ms-val")
    src_bin = int(m["bin"])
    if bin_ms % src_bin or bin_ms <= src_bin:
        raise NLBDataError(f"{bin_ms} ms is not a multiple of the source's {src_bin} ms bins")
    factor = bin_ms // src_bin
    dst = Path(dst_parent) / f"{m['dataset']}-{bin_ms:02d}ms-{m['phase']}"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("train_input.h5", "eval_input.h5", "eval_target.h5"):
        if (src / name).exists():
            fields = read_h5(src / name, spike_fields=())
            if name == "eval_target.h5":  # nlb_tools' group is named by bin size: mc_maze_small -> mc_maze_small_20
                fields = {f"{k}_{bin_ms}" if bin_ms != 5 else k: v for k, v in fields.items()}
            write_h5(dst / name, _rebin_fields(fields, factor))
    return dst
