"""One NLB run as asked for: the request that ``nlb``, ``nlb --cv`` and ``tune`` all take.

A :class:`NLBRequest` says which data (dataset, folder, bins, phase), where the outputs go, which
configuration the members train with (the dataset's default, a given :class:`NLBConfig`, dotted-key
overrides, an epoch count, the quick smoke-test sizes), the bins they fit at, and how they run
(seed, device, threads, worker processes or a Ray cluster, where the checkpoints go, resume, progress
bar). The command line builds one from its options (:mod:`pyro_langevin.nlb.cli`); Python callers
build it themselves::

    request = NLBRequest("mc_maze_small", "~/dandi", bin_ms=5, out="runs/mms", overrides={"eval.n_models": 1})
    metrics = run_nlb(request)
    cv = cross_validate(request, k=5)
    on_ray = request.replace(address="auto", cpus_per_member=2, storage="/nfs/runs/mms")

Its fields are checked when it is made (dataset, bins, phase, fitting bins, epochs, threads,
workers, Ray resources, storage); :meth:`NLBRequest.spec` checks the configuration and :meth:`NLBRequest.torch_device` the device.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from pyro_langevin.devices import check_device
from pyro_langevin.nlb.coarse import resolve_fit_bin
from pyro_langevin.nlb.config import NLBConfig, default_config
from pyro_langevin.nlb.data import check_args
from pyro_langevin.executor import Executor
from pyro_langevin.spec import SpecError, check_buildable

__all__ = ["NLBRequest"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class NLBRequest:
    """An NLB run as asked for (see the module docstring).

    Attributes
    ----------
    dataset : str
        An NLB'21 dataset name (``"mc_maze_small"`` ...).
    data_dir : path
        The DANDI layout and/or preprocessed ``{dataset}-{bin}ms-{phase}/`` folders
        (:func:`~pyro_langevin.nlb.data.load_nlb`).
    bin_ms : {5, 20}
        The bins rates are scored and written at.
    phase : {"val", "test"}
    out : path
        Output folder of the run.
    seed : int
        Seeds the validation splits and folds, the members' fits and the posterior draws.
    fit_bin_ms : int, optional
        The bins the members fit at (default :data:`~pyro_langevin.nlb.coarse.FIT_BIN_MS`: 20 ms,
        also for 5 ms data, whose rates are interpolated back; :mod:`pyro_langevin.nlb.coarse`).
    config : NLBConfig, optional
        Replaces the dataset's default configuration (:func:`~pyro_langevin.nlb.config.default_config`
        at the fitting bins); ``overrides`` and ``epochs`` still apply.
    overrides : mapping
        Dotted keys of :class:`~pyro_langevin.nlb.config.NLBConfig` (``{"fit.lr": 1e-3}``).
    epochs : int, optional
        The members' epoch count (the ramps follow it).
    quick : bool
        The smoke-test configuration (tiny networks, a few epochs, few draws).
    device : str or torch.device, optional
        ``cuda`` when available, else ``cpu``.
    threads : int
        torch CPU threads of a fit (1: this model's many small sequential operations run no faster
        on more, and far slower on a shared machine).
    workers : int
        Without ``address``: models trained at once in local worker processes (CPU only; ensemble
        members, folds).
    address : str, optional
        Train the models as Ray tasks on this cluster (``"auto"`` or ``"HOST:PORT"``;
        :class:`~pyro_langevin.executor.Executor`).
    cpus_per_member, gpus_per_member : float
        Ray resources of one model (fractions allowed); with ``address`` only.
    storage : path, optional
        Where the models' checkpoints go (default ``out``): on a cluster, a folder every node and
        this machine mount at the same path (NFS ...), so a member retried on another node, or a
        resumed run, finds them.
    resume : bool
        Continue the run from its checkpoints: finished members are read back, the others resume
        their ``last.pt``.
    progress : bool
        Show progress bars.
    """

    dataset: str
    data_dir: PathLike
    bin_ms: int = 5
    phase: str = "val"
    out: PathLike = "runs/nlb"
    seed: int = 0
    fit_bin_ms: Optional[int] = None
    config: Optional[NLBConfig] = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    epochs: Optional[int] = None
    quick: bool = False
    device: Union[str, torch.device, None] = None
    threads: int = 1
    workers: int = 1
    address: Optional[str] = None
    cpus_per_member: float = 1.0
    gpus_per_member: float = 0.0
    storage: Optional[PathLike] = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_args(self.dataset, self.bin_ms, self.phase)
        resolve_fit_bin(self.bin_ms, self.fit_bin_ms)
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "overrides", dict(self.overrides))
        for name, low in (("epochs", 1), ("threads", 1), ("workers", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is None and name == "epochs":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.storage is not None:
            if "://" in str(self.storage):
                raise SpecError(f"storage must be a folder every node mounts (NFS ...), not a URL: {self.storage}")
            object.__setattr__(self, "storage", Path(self.storage).expanduser())
        if self.address is None and (self.cpus_per_member != 1.0 or self.gpus_per_member != 0.0):
            raise SpecError("cpus_per_member and gpus_per_member are Ray resources: give address too (the local "
                            "pool runs one process per model)")
        self.executor()

    @property
    def fit_bin(self) -> int:
        """The bin width the members fit at (``fit_bin_ms`` resolved)."""
        return resolve_fit_bin(self.bin_ms, self.fit_bin_ms)

    def replace(self, **changes: Any) -> "NLBRequest":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def spec(self) -> NLBConfig:
        """The members' configuration, at the fitting bins: ``config`` or the dataset's default, then
        ``overrides``, then ``epochs``. Every section checks its fields, and the model and guide must
        build (on a forked RNG, tiny sizes).

        Raises
        ------
        SpecError
            An unknown key, a value of the wrong type or range, or settings the constructors refuse.
        """
        cfg = self.config if self.config is not None else default_config(self.dataset, self.fit_bin, quick=self.quick)
        changes = dict(self.overrides)
        if self.epochs is not None:
            changes["fit.epochs"] = self.epochs
        return check_buildable(cfg.override(changes) if changes else cfg)

    def torch_device(self) -> torch.device:
        """The torch device of the fits (:func:`~pyro_langevin.devices.check_device`)."""
        return check_device(self.device)

    def meta(self) -> Dict[str, Any]:
        """What the run's checkpoints record, and what a resumed run must match."""
        return {"dataset": self.dataset, "bin_ms": self.bin_ms, "phase": self.phase, "seed": self.seed,
                "fit_bin_ms": self.fit_bin}

    def executor(self) -> Executor:
        """Where the models train: the local pool of ``workers`` or, with ``address``, Ray tasks."""
        return Executor(workers=self.workers, address=self.address, cpus_per_member=self.cpus_per_member,
                        gpus_per_member=self.gpus_per_member)

    @property
    def checkpoint_root(self) -> Path:
        """The folder under which the models' checkpoints go: ``storage``, else ``out``."""
        return self.storage if self.storage is not None else self.out

    def default_workers(self, n_models: int) -> int:
        """One worker per CPU core, at most ``n_models`` (what the command line uses)."""
        return max(1, min(n_models, os.cpu_count() or 1))
