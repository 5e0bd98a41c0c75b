"""A run spec: the model's, the guide's and the fit's own configurations, and the one way to rebuild a fit.

:class:`RunSpec` holds a :class:`ModelConfig` (the :class:`~pyro_langevin.models.LangevinFlow`
settings), a :class:`GuideConfig` (a guide of the registry :data:`GUIDES` and its settings) and the
:class:`~pyro_langevin.training.FitConfig` itself. Any field is overridden by a dotted key
(``spec.override({"fit.lr": 1e-3, "model.latent_dim": 32})``; on the command line
``--set fit.lr=1e-3``). :func:`build` makes the model and guide of a spec, :func:`run_meta` is what a
fit stores in its checkpoints, and :func:`load_run` rebuilds a saved fit from its folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Union

import torch

from pyro_langevin.checkpoints import load_checkpoint, restore_checkpoint
from pyro_langevin.guides.bigru import BiGRUGuide
from pyro_langevin.guides.gru import GRUGuide
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.training import FitConfig

__all__ = [
    "ModelConfig", "GuideConfig", "RunSpec", "SpecError", "GUIDES", "register_guide", "build", "run_meta",
    "load_run", "LoadedRun",
]


class SpecError(ValueError):
    """An unknown key or an invalid value in a run spec; the message names it."""


@dataclass
class ModelConfig:
    """Settings of :class:`~pyro_langevin.models.LangevinFlow` (the Transformer decoder's included)."""

    latent_dim: int = 16
    dt: float = 0.05
    gamma: float = 2.0
    learn_gamma: bool = False
    potential: str = "oscillators"
    potential_kwargs: Dict[str, Any] = field(default_factory=dict)
    d_model: int = 64
    n_heads: int = 4
    dim_feedforward: int = 128
    dropout: float = 0.05

    def build(self, n_neurons: int) -> LangevinFlow:
        """The model over ``n_neurons`` neurons (held-in + held-out)."""
        return LangevinFlow(
            n_neurons, latent_dim=self.latent_dim, dt=self.dt, gamma=self.gamma, learn_gamma=self.learn_gamma,
            potential=self.potential, potential_kwargs=dict(self.potential_kwargs) or None,
            decoder_kwargs=dict(d_model=self.d_model, n_heads=self.n_heads,
                                dim_feedforward=self.dim_feedforward, dropout=self.dropout),
        )


@dataclass
class GuideConfig:
    """A guide of :data:`GUIDES` by ``name`` and its settings.

    ``"gru"``: filtering, reads held-in bins up to t; ``"bigru"``: smoothing, reads the whole trial.
    ``hidden`` is the GRU size (per direction), ``initial_state`` the ``"gru"`` guide's law of
    ``(z_0, v_0)``.
    """

    name: str = "gru"
    hidden: int = 64
    dropout: float = 0.05
    initial_state: str = "backward"

    def build(self, model: LangevinFlow, n_heldin: int) -> torch.nn.Module:
        """The guide for ``model``, reading ``n_heldin`` held-in neurons."""
        if self.name not in GUIDES:
            raise SpecError(f"unknown guide {self.name!r}; registered: {', '.join(sorted(GUIDES))}")
        return GUIDES[self.name](model, n_heldin, self)


GuideFactory = Callable[[LangevinFlow, int, GuideConfig], torch.nn.Module]

#: Guide name -> factory ``(model, n_heldin, GuideConfig) -> guide``; extend with :func:`register_guide`.
GUIDES: Dict[str, GuideFactory] = {
    "gru": lambda model, n_heldin, c: GRUGuide(model, n_heldin, hidden=c.hidden, initial_state=c.initial_state,
                                               dropout=c.dropout),
    "bigru": lambda model, n_heldin, c: BiGRUGuide(model, n_heldin, hidden=c.hidden, dropout=c.dropout),
}


def register_guide(name: str, factory: GuideFactory) -> None:
    """Make ``GuideConfig(name=name)`` build ``factory(model, n_heldin, guide_config)``."""
    GUIDES[name] = factory


def _section_fields(section: Any) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


@dataclass
class RunSpec:
    """What a run is: ``model`` (:class:`ModelConfig`), ``guide`` (:class:`GuideConfig`), ``fit``
    (:class:`~pyro_langevin.training.FitConfig`). Subclasses may add sections (dataclass fields)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self) -> None:
        if self.guide.name not in GUIDES:
            raise SpecError(f"unknown guide {self.guide.name!r} in the spec; registered: {', '.join(sorted(GUIDES))}")

    @classmethod
    def keys(cls) -> Dict[str, type]:
        """Every dotted key (``"fit.lr"`` ...) with its declared type (as a string or a type)."""
        out = {}
        for sec in dataclasses.fields(cls):
            for f in dataclasses.fields(sec.default_factory()):  # type: ignore[misc]
                out[f"{sec.name}.{f.name}"] = f.type
        return out

    def get(self, key: str) -> Any:
        """The value of a dotted key."""
        section, name = self._split(key)
        return getattr(getattr(self, section), name)

    def _split(self, key: str) -> tuple[str, str]:
        known = self.keys()
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1) or \
                [k for k in known if k.split(".", 1)[1] == key][:1]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SpecError(f"unknown {type(self).__name__} key {key!r}{hint} "
                            f"(keys are SECTION.FIELD with SECTION one of {', '.join(self.sections())})")
        section, name = key.split(".", 1)
        return section, name

    @classmethod
    def sections(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def override(self, changes: Optional[Mapping[str, Any]] = None, **kw: Any) -> "RunSpec":
        """A copy with dotted keys changed: ``spec.override({"fit.lr": 1e-3})``.

        Sections are validated again (a :class:`FitConfig` checks its ranges).
        """
        changes = {**(changes or {}), **kw}
        per_section: Dict[str, Dict[str, Any]] = {}
        for key, value in changes.items():
            section, name = self._split(key)
            per_section.setdefault(section, {})[name] = value
        try:
            new = {s: dataclasses.replace(getattr(self, s), **c) for s, c in per_section.items()}
            return dataclasses.replace(self, **new)
        except (TypeError, ValueError) as exc:
            raise SpecError(str(exc)) from None

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Nested plain dict (JSON-ready): ``{"model": {...}, "guide": {...}, "fit": {...}}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, Any]]) -> "RunSpec":
        """Inverse of :meth:`to_dict`; unknown sections or fields raise :class:`SpecError`."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise SpecError(f"unknown {cls.__name__} section(s) {unknown}; expected {list(known)}")
        sections = {}
        for name, values in d.items():
            section_cls = type(known[name].default_factory())  # type: ignore[misc]
            bad = [k for k in values if k not in _section_fields(section_cls)]
            if bad:
                raise SpecError(f"unknown field(s) {bad} in section {name!r}")
            sections[name] = section_cls(**values)
        return cls(**sections)

    def flat(self) -> Dict[str, Any]:
        """``{"fit.lr": ..., ...}``: every dotted key with its value."""
        return {k: self.get(k) for k in self.keys()}


def build(spec: RunSpec, n_neurons: int, n_heldin: int) -> tuple[LangevinFlow, torch.nn.Module]:
    """The model and guide of ``spec`` for data with ``n_neurons`` neurons, ``n_heldin`` of them read by the guide.

    Their initial parameters are drawn from ``torch.manual_seed(spec.fit.seed)`` (on a forked RNG,
    leaving the global one untouched): the same spec gives the same initial state in any process
    (PyTorch seeds its default generator at random at start-up).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.fit.seed)
        model = spec.model.build(n_neurons)
        return model, spec.guide.build(model, n_heldin)


def run_meta(spec: RunSpec, n_neurons: int, n_heldin: int, **extra: Any) -> Dict[str, Any]:
    """What ``fit(..., meta=...)`` stores so that :func:`load_run` can rebuild the run."""
    return {"spec": spec.to_dict(), "spec_class": type(spec).__name__, "n_neurons": int(n_neurons),
            "n_heldin": int(n_heldin), **extra}


class LoadedRun(NamedTuple):
    """A fit rebuilt by :func:`load_run`."""

    model: LangevinFlow
    guide: torch.nn.Module
    spec: RunSpec
    checkpoint: Dict[str, Any]


def load_run(path: Union[str, Path], which: str = "best", spec_class: Optional[type] = None,
             map_location: Union[str, torch.device] = "cpu") -> LoadedRun:
    """Rebuild a fit from its folder: the spec stored in the checkpoint, then its parameters.

    Parameters
    ----------
    path : path
        A checkpoint file, a ``checkpoints`` folder, or a run folder holding ``checkpoints/``.
    which : {"best", "last"}
        ``best.pt`` (the selected state) or ``last.pt``.
    spec_class : type, optional
        The :class:`RunSpec` subclass to rebuild (default: the one named in the checkpoint when it is
        importable here, :class:`RunSpec` or :class:`~pyro_langevin.nlb.config.NLBConfig`).
    map_location : str or torch.device

    Returns
    -------
    LoadedRun
        ``(model, guide, spec, checkpoint)``, model and guide in eval mode.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        p = p / f"{which}.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    ckpt = load_checkpoint(p, map_location=map_location)
    meta = ckpt.get("meta") or {}
    if "spec" not in meta:
        raise SpecError(f"{p} has no run spec in its meta (saved by an older version, or by fit() without "
                        f"meta=run_meta(...)); rebuild the model and guide yourself and use restore_checkpoint")
    if spec_class is None:
        spec_class = RunSpec
        if meta.get("spec_class") == "NLBConfig":
            from pyro_langevin.nlb.config import NLBConfig
            spec_class = NLBConfig
    spec = spec_class.from_dict(meta["spec"])
    model, guide = build(spec, meta["n_neurons"], meta["n_heldin"])
    restore_checkpoint(ckpt, model, guide, map_location=map_location)
    model.eval()
    guide.eval()
    return LoadedRun(model, guide, spec, ckpt)
