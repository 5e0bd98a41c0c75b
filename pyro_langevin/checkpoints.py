"""Checkpoints of a fit: atomic writes, loading with shape checks that explain size mismatches.

A checkpoint written by :func:`pyro_langevin.training.fit` is a ``torch.save`` dict with the model,
guide, optimizer and scheduler states, RNG states, epoch, config, history, best state, the
constructor sizes of model and guide (``sizes``) and an optional user ``meta`` dict.
:class:`TrainingState` is that dict's writer and reader: it captures the state of a fit at an
epoch boundary, writes it atomically, and rolls a fit back to it (after a fault) or resumes from it.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from pyro_langevin.atomic import atomic_path
from pyro_langevin.errors import InputError

__all__ = [
    "CHECKPOINT_FORMAT", "CheckpointMismatchError", "save_checkpoint", "load_checkpoint",
    "load_state_checked", "restore_checkpoint", "TrainingState", "clone_state", "module_sizes",
    "rng_state", "set_rng_state", "RESUME_MAY_CHANGE", "resume_conflicts",
]

#: Version of the checkpoint layout written by :func:`~pyro_langevin.training.fit`.
CHECKPOINT_FORMAT = 2

#: Settings a resumed run may change (the last part of a dotted key: ``fit.epochs``, or a flat name):
#: how long it trains, how patient it is and how often it writes and validates. Any other setting
#: that differs from the checkpoint's makes a different run.
RESUME_MAY_CHANGE = ("epochs", "patience", "checkpoint_every", "max_retries", "val_every")


class CheckpointMismatchError(InputError):
    """A checkpoint's tensors do not fit the model or guide it is loaded into."""


def rng_state() -> dict[str, Any]:
    """Every global random state a fit draws from: torch (CPU and CUDA), NumPy and Python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Set the global random states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`fit` (a dict with model, guide, optimizer, config, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is unreadable or truncated: {exc}") from exc


def clone_state(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples whose tensors are cloned (detached, same device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, clone_state(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


#: Integer attributes recorded from the model and guide so that size mismatches can be explained.
_SIZE_ATTRS = ("n_neurons", "n_heldin", "n_heldout", "latent_dim", "hidden", "hidden_size", "n_trials")


def module_sizes(module: Any) -> dict[str, int]:
    """The constructor sizes a module exposes (``n_neurons``, ``latent_dim``, ``n_heldin`` ...)."""
    sizes = {}
    for name in _SIZE_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            sizes[name] = value
    return sizes


def _fmt_sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items()) or "(sizes not recorded)"


def load_state_checked(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    label: str = "model",
    saved_sizes: Optional[dict[str, int]] = None,
) -> None:
    """``module.load_state_dict(state)`` after checking every tensor's name and shape.

    Parameters
    ----------
    module : torch.nn.Module
    state : dict
        A state dict, e.g. ``checkpoint["model"]``.
    label : str
        What ``module`` is, for messages (``"model"`` or ``"guide"``).
    saved_sizes : dict, optional
        The sizes recorded when the checkpoint was written (``checkpoint["sizes"][label]``).

    Raises
    ------
    CheckpointMismatchError
        Naming the first mismatching tensor with both shapes and, when known, the constructor
        sizes (e.g. ``n_neurons=12`` in the checkpoint vs ``n_neurons=10`` here).
    """
    own = module.state_dict()
    problems = [  # shape mismatches first: they say the most
        f"tensor {key!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in this {label}"
        for key, value in state.items() if key in own and tuple(own[key].shape) != tuple(value.shape)
    ]
    problems += [f"tensor {key!r} is in the checkpoint but not in this {label}" for key in state if key not in own]
    missing = [k for k in own if k not in state]
    if missing:
        problems.append(f"this {label} has tensors missing from the checkpoint: {missing[:5]}")
    if problems:
        here = module_sizes(module)
        msg = f"checkpoint does not fit the {label}: {problems[0]}"
        if len(problems) > 1:
            msg += f" (and {len(problems) - 1} more mismatches)"
        if saved_sizes is not None:
            diff = {k: (saved_sizes[k], here[k]) for k in saved_sizes if k in here and saved_sizes[k] != here[k]}
            if diff:
                msg += ". Sizes differ: " + ", ".join(f"{k}={a} in the checkpoint vs {k}={b} here" for k, (a, b) in diff.items())
            else:
                msg += f". Checkpoint {label}: {_fmt_sizes(saved_sizes)}; this {label}: {_fmt_sizes(here)}"
        msg += f". Build the {label} with the checkpoint's settings (checkpoint['meta'], checkpoint['sizes'])."
        raise CheckpointMismatchError(msg)
    module.load_state_dict(state)


def restore_checkpoint(
    checkpoint: Union[str, Path, dict[str, Any]],
    model: torch.nn.Module,
    guide: Optional[torch.nn.Module] = None,
    map_location: Union[str, torch.device] = "cpu",
    best: bool = False,
) -> dict[str, Any]:
    """Load a :func:`fit` checkpoint's parameters into ``model`` (and ``guide``), checking shapes.

    Parameters
    ----------
    checkpoint : path or dict
        A file written by :func:`fit` or its loaded contents.
    model, guide : torch.nn.Module
    map_location : str or torch.device
    best : bool
        Load the best validated state stored in the checkpoint instead of the last one.

    Returns
    -------
    dict
        The checkpoint (``epoch``, ``config``, ``meta``, ``history`` ...).
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location)
    states = ckpt["best_state"] if best and ckpt.get("best_state") is not None else ckpt
    sizes = ckpt.get("sizes") or {}
    load_state_checked(model, states["model"], "model", sizes.get("model"))
    if guide is not None:
        load_state_checked(guide, states["guide"], "guide", sizes.get("guide"))
    return ckpt


class TrainingState:
    """Everything a fit needs to continue exactly, and its checkpoints (the layout above).

    Parameters
    ----------
    model, guide : torch.nn.Module
    optimizer : torch.optim.Optimizer
    selector
        Anything with ``state_dict()`` / ``load_state_dict(d)`` whose dict's entries are stored at a
        checkpoint's top level (:class:`~pyro_langevin.selection.Selector`: the LR scheduler and the
        best-state bookkeeping).
    shuffle : torch.Generator
        The generator of the minibatch order.
    config : dict
        The fit's options, stored as ``checkpoint["config"]``.
    meta : dict, optional
        Anything needed to rebuild the model and guide, stored as ``checkpoint["meta"]``.
    checkpoint_dir : path, optional
        Where :meth:`write` puts files (without one it writes nothing).

    Attributes
    ----------
    epoch : int
        The last completed epoch (-1 before the first).
    history : list of dict
        One record per completed epoch.
    faults : list of dict
        The numerical faults recovered from.
    """

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 selector: Any, shuffle: torch.Generator, *, config: dict[str, Any],
                 meta: Optional[dict[str, Any]] = None, checkpoint_dir: Union[str, Path, None] = None) -> None:
        self.model, self.guide, self.optimizer, self.selector, self.shuffle = model, guide, optimizer, selector, shuffle
        self.config, self.meta = config, meta
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.sizes = {"model": module_sizes(model), "guide": module_sizes(guide)}
        self.epoch = -1
        self.history: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []

    def capture(self) -> dict[str, Any]:
        """The state now, at an epoch boundary, in memory: a checkpoint dict (tensors cloned)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": clone_state(self.model.state_dict()), "guide": clone_state(self.guide.state_dict()),
            "optimizer": clone_state(self.optimizer.state_dict()), **self.selector.state_dict(),
            "epoch": self.epoch, "config": self.config, "history": list(self.history),
            "shuffle_rng": self.shuffle.get_state(), "rng": rng_state(),
            "faults": list(self.faults), "sizes": self.sizes, "meta": self.meta,
        }

    def write(self, snapshot: dict[str, Any], name: str, **extra: Any) -> Optional[Path]:
        """Save ``snapshot`` (plus ``extra`` entries) atomically as ``checkpoint_dir / name``; its path, or None."""
        if self.checkpoint_dir is None:
            return None
        return save_checkpoint(self.checkpoint_dir / name, {**snapshot, **extra})

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Roll back to ``snapshot``: parameters (shapes checked), optimizer, selector, epoch and history.

        The random streams and the fault log go on (a retry after a fault draws afresh); :meth:`resume`
        sets those too.
        """
        sizes = snapshot.get("sizes") or {}
        load_state_checked(self.model, snapshot["model"], "model", sizes.get("model"))
        load_state_checked(self.guide, snapshot["guide"], "guide", sizes.get("guide"))
        self.optimizer.load_state_dict(clone_state(snapshot["optimizer"]))  # clone: Adam updates its state in place
        self.selector.load_state_dict(snapshot)
        self.epoch = snapshot["epoch"]
        self.history = list(snapshot["history"])

    def resume(self, path: Union[str, Path]) -> dict[str, Any]:
        """Continue from the checkpoint at ``path``: :meth:`restore`, the random streams, the faults, ``meta``.

        ``meta`` is taken from the checkpoint unless this state was given one. Returns the checkpoint.

        Raises
        ------
        CheckpointMismatchError
            The checkpoint is of a differently sized model or guide.
        """
        ckpt = load_checkpoint(path, map_location="cpu")  # RNG states must stay CPU tensors
        self.restore(ckpt)
        self.faults = list(ckpt.get("faults", []))
        self.shuffle.set_state(ckpt["shuffle_rng"])
        set_rng_state(ckpt["rng"])
        if self.meta is None:
            self.meta = ckpt.get("meta")
        return ckpt


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_conflicts(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``KEY=old there, new here`` for every setting of ``wanted`` that a checkpoint's ``saved`` meta
    holds differently: why resuming it would not continue the same run.

    Nested dicts (a run spec) compare key by key; keys ``saved`` lacks (older checkpoints) and
    :data:`RESUME_MAY_CHANGE` are skipped.
    """
    old, new = _flatten(saved), _flatten(wanted)
    return [f"{k}={old[k]!r} there, {v!r} here" for k, v in new.items()
            if k in old and k.rsplit(".", 1)[-1] not in RESUME_MAY_CHANGE and old[k] != v]
