"""Which trials and units of a stitched batch belong to which session: the layout of many sessions in one Batch.

Several sessions (recordings of one circuit through different units) share one
:class:`~pyro_langevin.batch.Batch` of the project's data contract. Its neuron axis is the union of the
sessions' units, held-in first: ``[held-in of session 0 | held-in of session 1 | ... | held-out of
session 0 | held-out of session 1 | ...]``, so ``input`` is every session's held-in block and
coordinated dropout, temporal shifts and the validation splits work unchanged. A trial belongs to
one session: its ``index`` lies in that session's range of trial ids (session ``i`` owns
``offset_i .. offset_i + n_trials_i - 1``), and the other sessions' columns are zero and masked.

:class:`SessionLayout` says all this, plus the read-in settings (its width, whether it trains, and
an optional initial value per session, e.g. from principal-components regression); it is plain
data and round-trips through :meth:`SessionLayout.to_dict` (checkpoints store it in their meta).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from pyro_langevin.errors import InputError

__all__ = ["Session", "SessionLayout", "SessionError", "check_session_name"]


class SessionError(InputError):
    """Sessions that cannot be stitched as asked; the message names the session."""


def check_session_name(name: str) -> str:
    """``name`` itself when it can name a session's parameters (non-empty, no ``.``)."""
    if not isinstance(name, str) or not name or "." in name:
        raise SessionError(f"session name {name!r}: must be a non-empty string without '.' (it names the "
                           "session's parameters); give names with --session-names")
    return name


@dataclass(frozen=True)
class Session:
    """One session of a layout: its name, held-in and held-out unit counts and number of trial ids."""

    name: str
    n_heldin: int
    n_heldout: int
    n_trials: int

    @property
    def n_units(self) -> int:
        return self.n_heldin + self.n_heldout


@dataclass(frozen=True)
class SessionLayout:
    """Sessions in one stitched batch (see the module docstring).

    Attributes
    ----------
    sessions : tuple of Session
    readin_dim : int
        Width of the read-in: the features every session's held-in units are mapped to, which the
        guide's shared recurrent core reads.
    train_readin : bool
        Whether the read-ins train (False: they keep their initial value, e.g. the PCR alignment).
    readin_init : dict, optional
        Session name -> ``{"weight": (readin_dim, n_heldin) list, "bias": (readin_dim,) list}``: the
        read-in's initial value (default: PyTorch's random ``Linear`` initialisation).
    """

    sessions: Tuple[Session, ...]
    readin_dim: int = 16
    train_readin: bool = True
    readin_init: Optional[Dict[str, Dict[str, list]]] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.sessions]
        if not names:
            raise SessionError("a layout needs at least one session")
        for name in names:
            check_session_name(name)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SessionError(f"session names must differ: {', '.join(dup)} given twice")
        for s in self.sessions:
            if s.n_heldin < 1 or s.n_heldout < 0 or s.n_trials < 1:
                raise SessionError(f"session {s.name}: needs >= 1 held-in unit and >= 1 trial, got {s}")
        if self.readin_dim < 1:
            raise SessionError(f"readin_dim must be >= 1, got {self.readin_dim}")

    # ----- sizes and places --------------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return [s.name for s in self.sessions]

    @property
    def n_heldin(self) -> int:
        return sum(s.n_heldin for s in self.sessions)

    @property
    def n_neurons(self) -> int:
        return sum(s.n_units for s in self.sessions)

    @property
    def n_trials(self) -> int:
        return sum(s.n_trials for s in self.sessions)

    def position(self, name: str) -> int:
        if name not in self.names:
            raise SessionError(f"no session {name!r} in the layout (sessions: {', '.join(self.names)})")
        return self.names.index(name)

    def trial_offset(self, i: int) -> int:
        """First trial id of session ``i``."""
        return sum(s.n_trials for s in self.sessions[:i])

    def heldin_columns(self, i: int) -> np.ndarray:
        """Columns of session ``i``'s held-in units in the stitched batch."""
        start = sum(s.n_heldin for s in self.sessions[:i])
        return np.arange(start, start + self.sessions[i].n_heldin)

    def heldout_columns(self, i: int) -> np.ndarray:
        """Columns of session ``i``'s held-out units in the stitched batch."""
        start = self.n_heldin + sum(s.n_heldout for s in self.sessions[:i])
        return np.arange(start, start + self.sessions[i].n_heldout)

    def columns(self, i: int) -> np.ndarray:
        """Columns of every unit of session ``i`` in the session's own order (held-in, then held-out)."""
        return np.concatenate([self.heldin_columns(i), self.heldout_columns(i)])

    def session_of(self, index: torch.Tensor) -> torch.Tensor:
        """The session number of each trial id in ``index`` (long tensor, same shape and device)."""
        ends = torch.as_tensor(np.cumsum([s.n_trials for s in self.sessions]), device=index.device)
        which = torch.bucketize(index, ends, right=True)
        if bool((index < 0).any()) or bool((which >= len(self.sessions)).any()):
            raise SessionError(f"trial ids must lie in 0..{self.n_trials - 1} (the sessions' trials), got "
                               f"{int(index.min())}..{int(index.max())}")
        return which

    # ----- changes -----------------------------------------------------------------------------
    def with_session(self, session: Session) -> "SessionLayout":
        """This layout with ``session`` appended (its trial ids follow the others')."""
        if session.name in self.names:
            raise SessionError(f"session {session.name!r} is already in the run (sessions: {', '.join(self.names)})")
        return replace(self, sessions=self.sessions + (session,), readin_init=None)

    def with_readin_init(self, init: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> "SessionLayout":
        """This layout with initial read-ins ``name -> (weight (readin_dim, n_heldin), bias (readin_dim,))``."""
        out = {}
        for name, (w, b) in init.items():
            s = self.sessions[self.position(name)]
            w, b = np.asarray(w, dtype=float), np.asarray(b, dtype=float)
            if w.shape != (self.readin_dim, s.n_heldin) or b.shape != (self.readin_dim,):
                raise SessionError(f"session {name}: read-in init of shape {w.shape}, {b.shape}, expected "
                                   f"({self.readin_dim}, {s.n_heldin}), ({self.readin_dim},)")
            out[name] = {"weight": w.tolist(), "bias": b.tolist()}
        return replace(self, readin_init=out)

    # ----- plain data --------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"sessions": [vars(s).copy() for s in self.sessions], "readin_dim": self.readin_dim,
                "train_readin": self.train_readin, "readin_init": self.readin_init}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SessionLayout":
        return cls(tuple(Session(**s) for s in d["sessions"]), int(d["readin_dim"]), bool(d["train_readin"]),
                   d.get("readin_init"))

    @classmethod
    def of(cls, names: Sequence[str], heldin: Sequence[int], heldout: Sequence[int], trials: Sequence[int],
           readin_dim: int = 16, train_readin: bool = True) -> "SessionLayout":
        """A layout from per-session lists of names, held-in and held-out unit counts and trial counts."""
        return cls(tuple(Session(n, int(a), int(b), int(t)) for n, a, b, t in zip(names, heldin, heldout, trials)),
                   readin_dim, train_readin)
