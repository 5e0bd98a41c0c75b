"""Neural Latents Benchmark (NLB'21) adapters: NWB or preprocessed tensors -> :class:`NLBData`.

Two on-disk layouts are understood (``data_dir`` may hold either, or be either):

* the DANDI layout ``dandi download`` writes: ``{dandiset}/sub-*/sub-*_desc-train_*.nwb`` and
  ``..._desc-test_*.nwb`` (dandisets in :data:`DANDISETS`), loaded through nlb_tools
  (``NWBDataset``, ``resample``, ``make_train_input_tensors``, ``make_eval_input_tensors``,
  ``make_eval_target_tensors``);
* preprocessed folders ``{dataset}-{bin:02d}ms-{phase}/`` holding ``train_input.h5``,
  ``eval_input.h5`` and, when known, ``eval_target.h5`` (nlb-lightning naming). Loading NWB writes
  this layout as a cache.

Phases: ``'val'`` trains on the 'train' split and evaluates on the 'val' split (whose held-out
data is in the training NWB, so ``eval_target.h5`` is made); ``'test'`` trains on 'train' + 'val'
and evaluates on the test file's trials (held-out data unknown).

Trial ``index`` values: training trials are ``0 .. n_train-1``, evaluation trials follow them.
Spike counts everywhere are counts per bin.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from pyro_langevin.batch import Batch, make_batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.h5 import as_ragged, check_spike_array, read_h5, write_h5
from pyro_langevin.data.splits import (
    TrialSizes, build_training_batch, concat_batches, heldin_only, split_train_valid,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DANDISETS", "BIN_SIZES", "PHASES", "FORWARD_MS", "NLBData", "NLBDataError", "load_nlb",
    "load_preprocessed", "preprocess_nwb", "find_nwb_files", "load_nwb_dataset",
    "nwb_tensors", "folder_name", "group_name", "split_train_valid", "heldin_only",
    "concat_batches", "build_training_batch",
]

#: NLB'21 dataset name -> DANDI dandiset id.
DANDISETS: Dict[str, str] = {
    "mc_maze": "000128",
    "mc_rtt": "000129",
    "area2_bump": "000127",
    "dmfc_rsg": "000130",
    "mc_maze_large": "000138",
    "mc_maze_medium": "000139",
    "mc_maze_small": "000140",
}
BIN_SIZES = (5, 20)
PHASES = ("val", "test")
#: Forward-prediction window of every NLB dataset (nlb_tools' ``fp_len``), ms.
FORWARD_MS = 200

PathLike = Union[str, Path]


# ----- names and argument checks -----------------------------------------------------------------
def check_args(dataset: str, bin_ms: int, phase: str) -> None:
    """Raise :class:`NLBDataError` unless the dataset name, bin size and phase are valid."""
    if dataset not in DANDISETS:
        raise NLBDataError(f"unknown NLB dataset {dataset!r}; expected one of {sorted(DANDISETS)}")
    if isinstance(bin_ms, bool) or bin_ms not in BIN_SIZES:
        raise NLBDataError(f"bin size must be 5 or 20 ms (the NLB bin sizes), got {bin_ms!r}")
    if phase not in PHASES:
        raise NLBDataError(f"phase must be 'val' or 'test', got {phase!r}")


def folder_name(dataset: str, bin_ms: int, phase: str) -> str:
    """Preprocessed folder name, e.g. ``mc_maze_small-05ms-val``."""
    return f"{dataset}-{bin_ms:02d}ms-{phase}"


def group_name(dataset: str, bin_ms: int) -> str:
    """nlb_tools' h5 group for a dataset and bin size (``mc_maze`` or ``mc_maze_20``)."""
    return dataset if bin_ms == 5 else f"{dataset}_{bin_ms}"


_FOLDER_RE = re.compile(r"^(?P<dataset>[a-z0-9_]+)-(?P<bin>\d+)ms-(?P<phase>\w+)$")


# ----- the container -----------------------------------------------------------------------------
@dataclass
class NLBData(TrialSizes):
    """One NLB dataset at one bin size and phase, in the project's data contract.

    Attributes
    ----------
    dataset, bin_ms, phase : str, int, str
        e.g. ``"mc_maze_small"``, 5, ``"val"``.
    train : Batch
        Training trials: held-in and held-out neurons, observed and forward bins all observed
        (``mask`` True where nlb_tools gave a count), ``behavior`` (trial, T, B) when the dataset's
        behaviour is a time series (hand/finger velocity).
    eval : Batch
        Evaluation trials: ``input`` = held-in spikes (what the guide reads). Held-out neurons and
        forward bins are masked out, unless the eval target is known (then they hold the target
        counts, for scoring only: never train on them, see :func:`build_training_batch`).
    eval_target : dict or None
        The eval target arrays as nlb_tools makes them (``eval_spikes_heldout``,
        ``eval_spikes_heldin_forward``, ``eval_spikes_heldout_forward``, ``train_behavior``,
        ``eval_behavior``, ``psth``, ``eval_cond_idx``, ``train_decode_mask`` ...), only those known.
    train_behavior : array or None
        nlb_tools' training behaviour as given: (trial, T, B) velocities, or (trial, 5) trial-level
        values for dmfc_rsg (is_eye, theta, is_short, ts, tp).
    source : Path or None
        The preprocessed folder the arrays came from (or were cached to).
    """

    dataset: str
    bin_ms: int
    phase: str
    train: Batch
    eval: Batch
    eval_target: Optional[Dict[str, Any]] = None
    train_behavior: Optional[np.ndarray] = None
    source: Optional[Path] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def has_eval_target(self) -> bool:
        return self.eval_target is not None

    @property
    def guide_input_shape(self) -> Tuple[int, int]:
        """(T, N_in): the per-trial shape of ``Batch.input``, all a guide reads."""
        return (self.n_observed_bins, self.n_heldin)

    @property
    def group(self) -> str:
        """nlb_tools h5 group name for submissions and targets."""
        return group_name(self.dataset, self.bin_ms)

    def training_batch(self, valid_frac: float = 0.0, seed: int = 0) -> Tuple[Batch, Optional[Batch]]:
        """Batch to fit on, and a validation split of training trials (or None).

        The fitting batch holds the training trials not held out for validation, fully observed,
        plus validation and evaluation trials with only their held-in observed spikes (mask False
        elsewhere). The validation batch keeps its held-out neurons and forward bins for scoring.
        """
        if valid_frac > 0:
            fit, valid = split_train_valid(self.train, valid_frac, seed)
            return build_training_batch(fit, [valid, self.eval]), valid
        return build_training_batch(self.train, [self.eval]), None


# ----- arrays -> Batch -----------------------------------------------------------------------------
def _nan_split(arr: Optional[np.ndarray]) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    if arr is None:
        return None, None
    nan = np.isnan(arr)
    return np.where(nan, 0.0, arr), nan


def _batch_from_arrays(heldin, heldout, hin_fwd, hout_fwd, *, n_heldout, n_forward, behavior,
                       index) -> Batch:
    """make_batch, with NaN entries (no data, as nlb_tools marks them) masked out."""
    parts = [_nan_split(a) for a in (heldin, heldout, hin_fwd, hout_fwd)]
    beh = None
    if behavior is not None and np.ndim(behavior) == 3:
        beh = np.asarray(behavior, dtype=np.float32)
    batch = make_batch(parts[0][0], parts[1][0], parts[2][0], parts[3][0],
                       n_heldout=n_heldout, n_forward=n_forward, behavior=beh, index=index)
    nan = torch.zeros_like(batch.mask)
    t, n_in = batch.n_observed_bins, batch.n_heldin
    slots = [(slice(None, t), slice(None, n_in)), (slice(None, t), slice(n_in, None)),
             (slice(t, None), slice(None, n_in)), (slice(t, None), slice(n_in, None))]
    for (_, isnan), (rows, cols) in zip(parts, slots):
        if isnan is not None and isnan.size:
            nan[:, rows, cols] = torch.as_tensor(isnan)
    if nan.any():
        batch = batch.with_inputs(batch.input, batch.mask & ~nan)
    return batch.validate()


def _refuse_all_nan(where: str, **arrays: Optional[np.ndarray]) -> None:
    """An all-NaN field holds no data: training on it, or decoding from it, would mean nothing."""
    for name, arr in arrays.items():
        if arr is not None and np.size(arr) and bool(np.isnan(np.asarray(arr, dtype=np.float64)).all()):
            raise NLBDataError(f"{where}: '{name}' is all NaN (no data); check how the file was made")


def _get(d: Mapping[str, Any], key: str, where: str) -> Optional[np.ndarray]:
    if key not in d:
        return None
    return check_spike_array(d[key], f"{where}: field '{key}'")


def nlbdata_from_dicts(
    dataset: str,
    bin_ms: int,
    phase: str,
    train: Mapping[str, Any],
    eval_input: Mapping[str, Any],
    eval_target: Optional[Mapping[str, Any]] = None,
    source: Optional[Path] = None,
) -> NLBData:
    """Build :class:`NLBData` from nlb_tools tensor dicts (what the three h5 files hold).

    ``eval_target`` may be the file's top level (with the ``{dataset}[_20]`` group) or the group.
    """
    check_args(dataset, bin_ms, phase)
    where = str(source) if source is not None else "train_input"
    if "train_spikes_heldin" not in train:
        raise NLBDataError(f"{where}: training tensors lack 'train_spikes_heldin'")
    heldin = _get(train, "train_spikes_heldin", where)
    heldout = _get(train, "train_spikes_heldout", where)
    if heldout is None or heldout.shape[2] == 0:
        raise NLBDataError(f"{where}: no held-out units in the training data "
                           "('train_spikes_heldout' missing or empty): co-smoothing needs them")
    hin_f = _get(train, "train_spikes_heldin_forward", where)
    hout_f = _get(train, "train_spikes_heldout_forward", where)
    n_fwd = FORWARD_MS // bin_ms
    if hin_f is not None and hin_f.shape[1] != n_fwd:
        n_fwd = hin_f.shape[1]
    n_tr, t, n_in = heldin.shape
    n_out = heldout.shape[2]
    beh = train.get("train_behavior")
    beh = None if beh is None else np.asarray(beh, dtype=np.float64)
    if beh is not None and beh.ndim == 3 and beh.shape[:2] != (n_tr, t):
        raise NLBDataError(f"{where}: 'train_behavior' has shape {beh.shape}, expected ({n_tr}, {t}, B)")
    _refuse_all_nan(where, train_spikes_heldin=heldin, train_behavior=beh)
    train_batch = _batch_from_arrays(heldin, heldout, hin_f, hout_f, n_heldout=n_out,
                                     n_forward=n_fwd, behavior=beh, index=np.arange(n_tr))

    if "eval_spikes_heldin" not in eval_input:
        raise NLBDataError(f"{where}: evaluation tensors lack 'eval_spikes_heldin'")
    ev_in = _get(eval_input, "eval_spikes_heldin", where)
    if ev_in.shape[1:] != (t, n_in):
        raise NLBDataError(f"{where}: 'eval_spikes_heldin' has (time, neuron) {ev_in.shape[1:]} but "
                           f"training held-in spikes have {(t, n_in)}")
    n_ev = ev_in.shape[0]
    _refuse_all_nan(where, eval_spikes_heldin=ev_in)

    target = None
    if eval_target is not None:
        grp = group_name(dataset, bin_ms)
        target = dict(eval_target.get(grp, eval_target))
        if "eval_spikes_heldout" not in target:
            raise NLBDataError(f"{where}: eval target has no '{grp}/eval_spikes_heldout' "
                               f"(groups/keys found: {sorted(eval_target)})")
    ev_out = ev_hin_f = ev_hout_f = None
    if target is not None:
        ev_out = _get(target, "eval_spikes_heldout", f"{where} eval target")
        if ev_out.shape != (n_ev, t, n_out):
            raise NLBDataError(f"{where}: eval target 'eval_spikes_heldout' has shape {ev_out.shape}, "
                               f"expected {(n_ev, t, n_out)}")
        ev_hin_f = _get(target, "eval_spikes_heldin_forward", f"{where} eval target")
        ev_hout_f = _get(target, "eval_spikes_heldout_forward", f"{where} eval target")
        for name, arr, cols in (("eval_spikes_heldin_forward", ev_hin_f, n_in),
                                ("eval_spikes_heldout_forward", ev_hout_f, n_out)):
            if arr is not None and arr.shape != (n_ev, n_fwd, cols):
                raise NLBDataError(f"{where}: eval target '{name}' has shape {arr.shape}, "
                                   f"expected {(n_ev, n_fwd, cols)}")
        if (ev_hin_f is None) != (ev_hout_f is None):
            ev_hin_f = ev_hout_f = None  # the Batch needs both forward blocks or neither
    eval_batch = _batch_from_arrays(ev_in, ev_out, ev_hin_f, ev_hout_f, n_heldout=n_out,
                                    n_forward=n_fwd, behavior=None,
                                    index=np.arange(n_tr, n_tr + n_ev))
    return NLBData(dataset=dataset, bin_ms=bin_ms, phase=phase, train=train_batch, eval=eval_batch,
                   eval_target=target, train_behavior=beh, source=source)


# ----- preprocessed folders ------------------------------------------------------------------------
def load_preprocessed(folder: PathLike, dataset: Optional[str] = None, bin_ms: Optional[int] = None,
                      phase: Optional[str] = None) -> NLBData:
    """Load a ``{dataset}-{bin:02d}ms-{phase}/`` folder (train_input.h5, eval_input.h5[, eval_target.h5]).

    Missing ``dataset``, ``bin_ms`` or ``phase`` are read from the folder name; given ones must agree.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NLBDataError(f"{folder}: preprocessed NLB folder not found")
    m = _FOLDER_RE.match(folder.name)
    if m:
        named = (m["dataset"], int(m["bin"]), m["phase"])
        for given, got, what in zip((dataset, bin_ms, phase), named, ("dataset", "bin size", "phase")):
            if given is not None and given != got:
                raise NLBDataError(f"{folder}: folder name says {what} {got!r} but {given!r} was asked for")
        dataset, bin_ms, phase = named
    if dataset is None or bin_ms is None or phase is None:
        raise NLBDataError(f"{folder}: cannot tell dataset/bin/phase from the folder name; pass them")
    check_args(dataset, bin_ms, phase)
    train = read_h5(folder / "train_input.h5", required=["train_spikes_heldin"])
    if "train_spikes_heldout" not in train:
        raise NLBDataError(f"{folder / 'train_input.h5'}: no held-out units ('train_spikes_heldout' "
                           f"missing; fields: {sorted(train)})")
    eval_input = read_h5(folder / "eval_input.h5", required=["eval_spikes_heldin"])
    target_path = folder / "eval_target.h5"
    target = read_h5(target_path, spike_fields=()) if target_path.exists() else None
    if target is not None:
        grp = group_name(dataset, bin_ms)
        if grp not in target:
            raise NLBDataError(f"{target_path}: no group '{grp}' (found {sorted(target)})")
    return nlbdata_from_dicts(dataset, bin_ms, phase, train, eval_input, target, source=folder)


# ----- NWB through nlb_tools -------------------------------------------------------------------------
def _nlb_tools():
    try:
        from nlb_tools import make_tensors, nwb_interface
    except ImportError as exc:
        raise NLBDataError("loading NWB files needs nlb_tools: `pip install --no-deps nlb-tools` "
                           "plus pandas<3 and pynwb") from exc
    from pyro_langevin.nlb import compat as nlb_compat

    nlb_compat.apply_patches()
    return nwb_interface, make_tensors


def find_nwb_files(data_dir: PathLike, dataset: str) -> Dict[str, Optional[Path]]:
    """Find the DANDI train/test NWB files of ``dataset`` under ``data_dir``.

    Looks in ``data_dir/{dandiset}/sub-*/``, ``data_dir/sub-*/`` and ``data_dir`` itself; files are
    told apart by ``desc-train`` / ``desc-test`` in their names.

    Returns
    -------
    dict
        ``{"train": Path or None, "test": Path or None}``.
    """
    check_args(dataset, 5, "val")
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise NLBDataError(f"{data_dir}: data directory not found")
    roots = [data_dir / DANDISETS[dataset], data_dir]
    found: Dict[str, Optional[Path]] = {"train": None, "test": None}
    for root in roots:
        if not root.is_dir():
            continue
        files = sorted(root.glob("sub-*/*.nwb")) + sorted(root.glob("*.nwb"))
        for kind in ("train", "test"):
            hits = [f for f in files if f"desc-{kind}" in f.name] or \
                   [f for f in files if kind in f.name.lower()]
            if found[kind] is None and hits:
                if len(hits) > 1:
                    raise NLBDataError(f"{root}: several {kind} NWB files: {[h.name for h in hits]}")
                found[kind] = hits[0]
        if found["train"] or found["test"]:
            break
    return found


def load_nwb_dataset(path: PathLike, bin_ms: int, require_heldout: bool = False):
    """Load one NWB file with ``nlb_tools.nwb_interface.NWBDataset`` and resample it to ``bin_ms``.

    Raises
    ------
    NLBDataError
        If the file is missing or unreadable, or ``require_heldout`` and it has no held-out units.
    """
    nwb_interface, _ = _nlb_tools()
    path = Path(path)
    if not path.is_file():
        raise NLBDataError(f"{path}: NWB file not found")
    try:
        ds = nwb_interface.NWBDataset(str(path))
    except Exception as exc:
        raise NLBDataError(f"{path}: nlb_tools cannot load this NWB file "
                           f"({type(exc).__name__}: {exc})") from exc
    signals = set(ds.data.columns.get_level_values(0))
    if "spikes" not in signals:
        raise NLBDataError(f"{path}: no held-in units (units table empty or all marked heldout)")
    if require_heldout and "heldout_spikes" not in signals:
        raise NLBDataError(f"{path}: no held-out units (the units table's 'heldout' column is all "
                           "False); this is not an NLB training file")
    if bin_ms != ds.bin_width:
        ds.resample(bin_ms)
    return ds


def _splits(ds) -> set:
    return set(ds.trial_info["split"].astype(str)) if "split" in ds.trial_info else set()


@contextmanager
def _serial_smoothing():
    """nlb_tools smooths spikes in a forked ``multiprocessing.Pool``; forking a process whose other
    threads (Ray's, torch's) hold locks can deadlock the child, and did (a stitched NLB run after a Ray
    test hung in ``Pool.terminate``). Within this block its ``_poolmap`` maps in this process."""
    import nlb_tools.nwb_interface as ni

    before = ni._poolmap
    ni._poolmap = lambda f, X, nprocs=None, chunksize=None: list(map(f, X))
    try:
        yield
    finally:
        ni._poolmap = before


def nwb_tensors(
    dataset: str,
    data_dir: PathLike,
    bin_ms: int = 5,
    phase: str = "val",
    include_psth: bool = True,
) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[Dict[str, Any]]]:
    """Make the three tensor dicts from DANDI NWB files with nlb_tools.

    Returns
    -------
    (train_input, eval_input, eval_target or None)
        ``eval_input`` holds only ``eval_spikes_heldin`` (held-out spikes of evaluation trials
        go to ``eval_target`` alone). ``eval_target`` (phase 'val' only) is nested under
        :func:`group_name`, as ``make_eval_target_tensors`` makes it.
    """
    check_args(dataset, bin_ms, phase)
    _, mt = _nlb_tools()
    files = find_nwb_files(data_dir, dataset)
    if files["train"] is None:
        raise NLBDataError(
            f"{data_dir}: no training NWB file for {dataset} (looked for "
            f"{DANDISETS[dataset]}/sub-*/*desc-train*.nwb; get it with "
            f"`dandi download DANDI:{DANDISETS[dataset]}`)"
        )
    ds = load_nwb_dataset(files["train"], bin_ms, require_heldout=True)
    splits = _splits(ds)
    need = {"train", "val"}
    if not need <= splits:
        raise NLBDataError(f"{files['train']}: trials table lacks split(s) {sorted(need - splits)} "
                           f"(found {sorted(splits)})")
    common = dict(save_file=False, return_dict=True)
    if phase == "val":
        train = mt.make_train_input_tensors(ds, dataset, "train", include_behavior=True,
                                            include_forward_pred=True, **common)
        ev = mt.make_eval_input_tensors(ds, dataset, "val", **common)
        with _serial_smoothing():  # the PSTHs smooth spikes
            target = mt.make_eval_target_tensors(ds, dataset, "train", "val", include_psth=include_psth,
                                                 **common)
    else:
        if files["test"] is None:
            raise NLBDataError(f"{data_dir}: phase 'test' needs the test NWB file for {dataset} "
                               f"({DANDISETS[dataset]}/sub-*/*desc-test*.nwb)")
        train = mt.make_train_input_tensors(ds, dataset, ["train", "val"], include_behavior=True,
                                            include_forward_pred=True, **common)
        ds_test = load_nwb_dataset(files["test"], bin_ms)
        if "test" not in _splits(ds_test):
            raise NLBDataError(f"{files['test']}: no 'test' trials in the trials table")
        ev = mt.make_eval_input_tensors(ds_test, dataset, "test", **common)
        target = None
    eval_input = {"eval_spikes_heldin": ev["eval_spikes_heldin"]}
    if target is not None:
        for grp in target.values():
            for key in ("eval_cond_idx", "train_cond_idx"):
                if key in grp:
                    grp[key] = as_ragged(grp[key])
    return dict(train), eval_input, target


def preprocess_nwb(
    dataset: str,
    data_dir: PathLike,
    bin_ms: int = 5,
    phase: str = "val",
    out_dir: Optional[PathLike] = None,
    include_psth: bool = True,
) -> Path:
    """Write the preprocessed folder ``{out_dir}/{dataset}-{bin:02d}ms-{phase}/`` from NWB files.

    ``train_input.h5`` is written last, so a folder holding it is complete.
    """
    train, ev, target = nwb_tensors(dataset, data_dir, bin_ms, phase, include_psth)
    return _write_cache(Path(out_dir or data_dir) / folder_name(dataset, bin_ms, phase), train, ev, target)


def _write_cache(folder: Path, train, ev, target) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if target is not None:
        write_h5(folder / "eval_target.h5", target)
    write_h5(folder / "eval_input.h5", ev)
    write_h5(folder / "train_input.h5", train)
    return folder


# ----- the entry point -----------------------------------------------------------------------------
def load_nlb(
    dataset: str,
    data_dir: PathLike,
    bin_ms: int = 5,
    phase: str = "val",
    cache: bool = True,
    cache_dir: Optional[PathLike] = None,
    include_psth: bool = True,
) -> NLBData:
    """Load an NLB'21 dataset as :class:`NLBData`.

    Parameters
    ----------
    dataset : str
        One of :data:`DANDISETS` (mc_maze, mc_rtt, area2_bump, dmfc_rsg, mc_maze_large,
        mc_maze_medium, mc_maze_small).
    data_dir : path-like
        A folder holding the DANDI layout (``{dandiset}/sub-*/*.nwb``) and/or preprocessed
        folders ``{dataset}-{bin:02d}ms-{phase}/``; or such a folder itself.
    bin_ms : {5, 20}
    phase : {'val', 'test'}
    cache : bool
        When loading NWB, write the preprocessed folder (under ``cache_dir`` or ``data_dir``) and
        read it on later calls. An unwritable location only warns.
    cache_dir : path-like, optional
        Where preprocessed folders are looked for first and written.
    include_psth : bool
        Make PSTHs for psth R^2 in the 'val' eval target (nlb_tools reloads the file: slow for
        the big datasets).

    Returns
    -------
    NLBData

    Raises
    ------
    NLBDataError
        Unknown dataset, bad bin size or phase, missing files/folders, no held-out units, corrupt h5.
    """
    check_args(dataset, bin_ms, phase)
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise NLBDataError(f"{data_dir}: data directory not found")
    name = folder_name(dataset, bin_ms, phase)
    candidates = [Path(cache_dir) / name] if cache_dir is not None else []
    candidates += [data_dir / name]
    if data_dir.name == name or (data_dir / "train_input.h5").exists():
        candidates.insert(0, data_dir)
    for folder in candidates:
        if (folder / "train_input.h5").exists():
            return load_preprocessed(folder, dataset, bin_ms, phase)
        if folder.is_dir() and any(folder.iterdir()):
            raise NLBDataError(f"{folder}: preprocessed folder lacks train_input.h5")
    files = find_nwb_files(data_dir, dataset)
    if files["train"] is None and files["test"] is None:
        raise NLBDataError(
            f"{data_dir}: no NLB data for {dataset}: neither a preprocessed folder {name}/ "
            f"(train_input.h5, eval_input.h5) nor DANDI NWB files "
            f"({DANDISETS[dataset]}/sub-*/*.nwb, `dandi download DANDI:{DANDISETS[dataset]}`)"
        )
    train, ev, target = nwb_tensors(dataset, data_dir, bin_ms, phase, include_psth)
    source = None
    if cache:
        folder = Path(cache_dir or data_dir) / name
        try:
            source = _write_cache(folder, train, ev, target)
        except OSError as exc:
            warnings.warn(f"could not write the NLB cache to {folder}: {exc}", RuntimeWarning)
    return nlbdata_from_dicts(dataset, bin_ms, phase, train, ev, target, source=source)
