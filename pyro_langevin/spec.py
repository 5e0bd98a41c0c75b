"""A run spec: the model's, the guide's and the fit's configurations, and the one way to rebuild a fit.

:class:`RunSpec` holds a :class:`ModelConfig` (the :class:`~pyro_langevin.models.LangevinFlow`
settings), a :class:`GuideConfig` (a guide of the registry :data:`GUIDES` and its settings) and a
:class:`FitConfig` (what :func:`~pyro_langevin.training.fit` does). Any field is overridden by a
dotted key (``spec.override({"fit.lr": 1e-3, "model.latent_dim": 32})``; on the command line
``--set fit.lr=1e-3``, or many at once from a file with ``--spec FILE``, :func:`read_spec_file`).
:func:`build` makes the model and guide of a spec, :func:`run_meta` is what a fit stores in its
checkpoints, and :func:`load_run` rebuilds a saved fit from its folder alone. Subclasses of
:class:`RunSpec` (the NLB run's :class:`~pyro_langevin.nlb.config.NLBConfig`) add sections and
register themselves (:func:`register_spec_class`) so that :func:`load_run` finds them by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Mapping, NamedTuple, Optional, Union

import torch

from pyro_langevin.checkpoints import load_checkpoint, restore_checkpoint
from pyro_langevin.errors import InputError
from pyro_langevin.guides.autoregressive import AutoregressiveGuide
from pyro_langevin.guides.bigru import BiGRUGuide
from pyro_langevin.guides.gru import GRUGuide
from pyro_langevin.guides.initial_state import InitialStateGuide
from pyro_langevin.guides.meanfield import MeanFieldGuide
from pyro_langevin.guides.stitched import StitchedGuide
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.models.stitched import StitchedFlow
from pyro_langevin.sessions import SessionLayout

__all__ = [
    "ModelConfig", "GuideConfig", "FitConfig", "ramp_epochs", "RunSpec", "SpecError", "GUIDES", "register_guide",
    "SPEC_CLASSES", "register_spec_class", "build", "build_stitched", "check_buildable", "run_meta", "load_run",
    "LoadedRun", "read_spec_file",
]


class SpecError(InputError):
    """An unknown key or an invalid value in a run spec; the message names it."""


@dataclass
class ModelConfig:
    """Settings of :class:`~pyro_langevin.models.LangevinFlow` (the Transformer decoder's included).

    ``dt`` is the bin width in the 100 ms time unit; ``gamma`` the damping rate, ``sigma`` the noise
    (None: unit temperature, ``sigma^2 = 2 gamma mass``), ``mass`` the particle's mass;
    ``learn_gamma`` / ``learn_sigma`` make those trainable; ``overdamped`` drops the inertia
    (:class:`~pyro_langevin.transition.LangevinParams`). ``potential`` is ``"oscillators"``,
    ``"zero"``, ``"quadratic"`` or ``"mlp"`` with ``potential_kwargs``.
    """

    latent_dim: int = 16
    dt: float = 0.05
    gamma: float = 2.0
    sigma: Optional[float] = None
    mass: float = 1.0
    learn_gamma: bool = False
    learn_sigma: bool = False
    overdamped: bool = False
    potential: str = "oscillators"
    potential_kwargs: Dict[str, Any] = field(default_factory=dict)
    d_model: int = 64
    n_heads: int = 4
    dim_feedforward: int = 128
    dropout: float = 0.05

    def build(self, n_neurons: int) -> LangevinFlow:
        """The model over ``n_neurons`` neurons (held-in + held-out)."""
        return LangevinFlow(n_neurons, **self.model_kwargs())

    def model_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`~pyro_langevin.models.LangevinFlow` (and the stitched model) but the size."""
        return dict(
            latent_dim=self.latent_dim, dt=self.dt, gamma=self.gamma, sigma=self.sigma, mass=self.mass,
            learn_gamma=self.learn_gamma, learn_sigma=self.learn_sigma, overdamped=self.overdamped,
            potential=self.potential, potential_kwargs=dict(self.potential_kwargs) or None,
            decoder_kwargs=dict(d_model=self.d_model, n_heads=self.n_heads,
                                dim_feedforward=self.dim_feedforward, dropout=self.dropout),
        )


@dataclass
class GuideConfig:
    """A guide of :data:`GUIDES` by ``name`` and its settings.

    Names: ``"gru"`` (filtering: reads held-in bins up to t), ``"bigru"`` (smoothing: reads the whole
    trial), ``"initial_state"`` (a posterior over ``(z_0, v_0)`` only, the path from the prior),
    ``"autoregressive"`` (a state-dependent inferred force; ``"autoregressive_flow"`` adds a spline
    flow) and ``"meanfield"`` (per-trial parameters, not amortized).

    ``hidden`` is the GRU size (per direction), ``dropout`` the encoder's, ``initial_state`` the
    ``"gru"`` guide's law of ``(z_0, v_0)``, ``mlp_hidden`` the autoregressive force network's width.
    The mean-field guide has a table of parameters per trial and bin: ``n_trials`` (largest trial
    index + 1) and ``n_observed_bins`` must be set for it (0 otherwise), ``init_scale`` its initial
    posterior scale.
    """

    name: str = "gru"
    hidden: int = 64
    dropout: float = 0.05
    initial_state: str = "backward"
    mlp_hidden: int = 64
    n_trials: int = 0
    n_observed_bins: int = 0
    init_scale: float = 0.1

    def build(self, model: LangevinFlow, n_heldin: int) -> torch.nn.Module:
        """The guide for ``model``, reading ``n_heldin`` held-in neurons."""
        if self.name not in GUIDES:
            raise SpecError(f"unknown guide {self.name!r}; registered: {', '.join(sorted(GUIDES))}")
        return GUIDES[self.name](model, n_heldin, self)


GuideFactory = Callable[[LangevinFlow, int, GuideConfig], torch.nn.Module]


def _meanfield(model: LangevinFlow, n_heldin: int, c: GuideConfig) -> MeanFieldGuide:
    if c.n_trials < 1 or c.n_observed_bins < 1:
        raise SpecError("the mean-field guide has parameters per trial and bin: set guide.n_trials (largest trial "
                        "index + 1) and guide.n_observed_bins")
    return MeanFieldGuide(model, c.n_trials, c.n_observed_bins, init_scale=c.init_scale)


#: Guide name -> factory ``(model, n_heldin, GuideConfig) -> guide``; extend with :func:`register_guide`.
GUIDES: Dict[str, GuideFactory] = {
    "gru": lambda model, n_heldin, c: GRUGuide(model, n_heldin, hidden=c.hidden, initial_state=c.initial_state,
                                               dropout=c.dropout),
    "bigru": lambda model, n_heldin, c: BiGRUGuide(model, n_heldin, hidden=c.hidden, dropout=c.dropout),
    "initial_state": lambda model, n_heldin, c: InitialStateGuide(model, n_heldin, hidden=c.hidden, dropout=c.dropout),
    "autoregressive": lambda model, n_heldin, c: AutoregressiveGuide(model, n_heldin, hidden=c.hidden,
                                                                     mlp_hidden=c.mlp_hidden, dropout=c.dropout),
    "autoregressive_flow": lambda model, n_heldin, c: AutoregressiveGuide(
        model, n_heldin, hidden=c.hidden, mlp_hidden=c.mlp_hidden, flow=True, dropout=c.dropout),
    "meanfield": _meanfield,
}


def register_guide(name: str, factory: GuideFactory) -> None:
    """Make ``GuideConfig(name=name)`` build ``factory(model, n_heldin, guide_config)``."""
    GUIDES[name] = factory


@dataclass
class FitConfig:
    """Training options (defaults suit small data; see ``examples/`` for per-dataset settings).

    Attributes
    ----------
    epochs : int
        Passes over the training trials.
    batch_size : int
    lr : float
        Adam learning rate.
    weight_decay : float
        Final weight decay; ramps linearly from 0 over the first ``weight_decay_ramp`` of the epochs.
    weight_decay_ramp : float
        Length of the ramp as a fraction of ``epochs`` (:func:`ramp_epochs`: rounded down, at least
        one epoch); the default, 1/6, is 50 of the default 300 epochs. Above 1 the ramp outlasts
        this fit: a run fitted in chunks (each resuming the last) keeps one ``n``-epoch ramp with
        ``n / epochs``.
    optimizer : {"adam", "adamw"}
        ``"adam"``: weight decay as an L2 term in the gradient (the reference code's form; it is
        negligible next to an ELBO summed over a minibatch of trials). ``"adamw"``: decoupled
        weight decay, which shrinks weights by ``lr * weight_decay`` per step whatever the loss scale.
    kl_start, kl_final, kl_ramp
        KL weight (a ``scale_latents`` handler on model and guide) ramps linearly from ``kl_start``
        to ``kl_final`` over the first ``kl_ramp`` (a fraction, as ``weight_decay_ramp``) of the
        epochs. A proper ELBO has ``kl_final = 1``. The ramps follow ``epochs``: a run resumed with
        other ``epochs`` continues on the new schedule (``fit`` warns when a ramp's length changes).
    shift_std, shift_max
        Temporal-shift augmentation (:func:`~pyro_langevin.augmentation.temporal_shift`): each
        training step moves every (trial, neuron) spike train by
        ``round(N(0, shift_std))`` bins, at most ``shift_max`` either way (0: ``2 * shift_std``,
        rounded, at least 1). ``shift_std = 0`` (the default) disables it.
    cd_keep : float
        Coordinated dropout: fraction of held-in input entries the guide sees per step; the
        likelihood scores only the hidden ones (1.0 disables it).
    grad_clip : float
        Maximum gradient norm.
    val_every : int
        Validate every this many epochs.
    select_on, select_mode
        Validation metric used for early stopping, LR plateaus and best-model selection.
    patience : int
        Stop after this many validations without improvement (0 disables early stopping).
    lr_plateau_factor, lr_plateau_patience, lr_min
        ``ReduceLROnPlateau`` on the validation metric.
    validate_args : bool
        Pyro/torch argument validation of every distribution during training steps. Off by
        default: the batches are validated once up front and a non-finite loss or gradient is
        caught at its step anyway, while per-site checks cost a device sync per bin on a GPU.
    elbo : {"meanfield", "trace"}
        :class:`~pyro_langevin.elbo.MarkovMeanFieldELBO` (Pyro's mean-field ELBO: analytic
        per-step KL) or ``Trace_ELBO`` (Monte Carlo).
    num_particles : int
    val_samples : int
        Posterior samples averaged in the default validation loss.
    seed : int
    max_retries : int
        Numerical faults (a NaN or infinite loss, gradient, parameter or validation metric, or a
        distribution rejecting non-finite parameters) are caught at the step they happen: the loop
        restores the state at the start of the epoch (model, guide, optimizer, scheduler), multiplies
        the learning rate by ``fault_lr_factor`` and redoes the epoch. After ``max_retries``
        consecutive faults without completing an epoch it raises :class:`TrainingDivergedError`
        (0: raise at the first fault).
    fault_lr_factor : float
        Learning-rate multiplier applied at each recovery, in (0, 1].
    checkpoint_every : int
        With ``checkpoint_dir``, write ``last.pt`` every this many epochs (and after the last one).
        Every checkpoint is an epoch boundary from which ``resume`` reproduces an uninterrupted run.
    """

    epochs: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 2e-5
    weight_decay_ramp: float = 1 / 6
    optimizer: Literal["adam", "adamw"] = "adam"
    kl_start: float = 0.0
    kl_final: float = 1.0
    kl_ramp: float = 1 / 6
    cd_keep: float = 1.0
    shift_std: float = 0.0
    shift_max: int = 0
    grad_clip: float = 200.0
    val_every: int = 5
    select_on: str = "val_loss"
    select_mode: Literal["min", "max"] = "min"
    patience: int = 0
    lr_plateau_factor: float = 0.5
    lr_plateau_patience: int = 6
    lr_min: float = 1e-5
    elbo: Literal["meanfield", "trace"] = "meanfield"
    num_particles: int = 1
    validate_args: bool = False
    val_samples: int = 1
    seed: int = 0
    max_retries: int = 3
    fault_lr_factor: float = 0.5
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "weight_decay_ramp": self.weight_decay_ramp >= 0,
            "kl_ramp": self.kl_ramp >= 0,
            "optimizer": self.optimizer in ("adam", "adamw"),
            "cd_keep": 0 < self.cd_keep <= 1,
            "shift_std": self.shift_std >= 0,
            "shift_max": self.shift_max >= 0,
            "grad_clip": self.grad_clip > 0,
            "val_every": self.val_every >= 1,
            "select_mode": self.select_mode in ("min", "max"),
            "elbo": self.elbo in ("meanfield", "trace"),
            "num_particles": self.num_particles >= 1,
            "kl_final": self.kl_final >= 0 and self.kl_start >= 0,
            "max_retries": self.max_retries >= 0,
            "fault_lr_factor": 0 < self.fault_lr_factor <= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "val_samples": self.val_samples >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise SpecError(f"FitConfig: invalid value for {', '.join(bad)}: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    def ramp(self, epoch: int, start: float, final: float, epochs: int) -> float:
        """Linear ramp value at ``epoch`` (0-based) of a ramp ``epochs`` long."""
        if epochs <= 0:
            return final
        frac = min(1.0, (epoch + 1) / epochs)
        return start + frac * (final - start)

    @property
    def max_shift(self) -> int:
        """The temporal-shift bound in bins: ``shift_max``, or twice ``shift_std`` (at least 1) when 0."""
        return self.shift_max if self.shift_max > 0 else max(1, round(2 * self.shift_std))

    def kl_weight(self, epoch: int) -> float:
        return self.ramp(epoch, self.kl_start, self.kl_final, ramp_epochs(self.kl_ramp, self.epochs))

    def weight_decay_at(self, epoch: int) -> float:
        return self.ramp(epoch, 0.0, self.weight_decay, ramp_epochs(self.weight_decay_ramp, self.epochs))


def ramp_epochs(fraction: float, epochs: int) -> int:
    """Length in epochs of a ramp over ``fraction`` of ``epochs``: rounded down, at least 1."""
    return max(1, math.floor(fraction * epochs + 1e-9))  # + 1e-9: a sixth of 300 epochs is 50, not 49


def _section_fields(section: Any) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


@dataclass
class RunSpec:
    """What a run is: ``model`` (:class:`ModelConfig`), ``guide`` (:class:`GuideConfig`), ``fit``
    (:class:`FitConfig`). Subclasses may add sections (dataclass fields) and register themselves with
    :func:`register_spec_class` so that :func:`load_run` rebuilds them."""

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

    def typed(self, key: str, value: Any) -> Any:
        """``value`` checked against the type of ``key``'s current value (and converted where lossless).

        Integers for int fields, finite numbers for float fields (an int becomes a float), ``True`` or
        ``False`` for bool fields, objects for dict fields, strings for str fields; a field whose
        default is None (``model.sigma``) takes None or a finite number.

        Raises
        ------
        SpecError
            Naming the key and what it expects.
        """
        current = self.get(key)
        section, name = self._split(key)
        optional = _section_fields(type(getattr(self, section)))[name].default is None  # e.g. model.sigma
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if optional and (value is None or current is None):
            ok, want, value = value is None or number, "null or a finite number", None if value is None else value
            value = float(value) if number else value
        elif isinstance(current, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(current, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(current, float):
            ok, want = number, "a finite number"
            value = float(value) if ok else value
        elif isinstance(current, dict):
            ok, want = isinstance(value, dict), 'an object, e.g. {"key": 1}'
        else:
            ok, want = isinstance(value, type(current)), f"a {type(current).__name__}"
        if not ok:
            raise SpecError(f"{key}={value!r}: expected {want}")
        return value


#: :class:`RunSpec` classes by name (``run_meta`` stores the name), for :func:`load_run`.
SPEC_CLASSES: Dict[str, type] = {}

#: Where specs named in checkpoints written before the module was recorded live.
_LEGACY_SPEC_MODULES = {"NLBConfig": "pyro_langevin.nlb.config"}


def register_spec_class(cls: type) -> type:
    """Class decorator: let :func:`load_run` rebuild checkpoints whose spec is a ``cls``.

    A subclass of :class:`RunSpec` that adds sections registers itself where it is defined
    (``@register_spec_class``); :func:`run_meta` records its name and module.
    """
    if not (isinstance(cls, type) and issubclass(cls, RunSpec)):
        raise TypeError(f"register_spec_class: {cls!r} is not a RunSpec subclass")
    SPEC_CLASSES[cls.__name__] = cls
    return cls


register_spec_class(RunSpec)


def _spec_class(meta: Mapping[str, Any]) -> type:
    """The registered spec class a checkpoint's ``meta`` names, importing the package's own module
    that defines it when it is not registered yet."""
    name = meta.get("spec_class", "RunSpec")
    module = meta.get("spec_module") or _LEGACY_SPEC_MODULES.get(name)
    if name not in SPEC_CLASSES and module and module.split(".")[0] == __name__.split(".")[0]:
        importlib.import_module(module)  # it registers its classes
    if name not in SPEC_CLASSES:
        raise SpecError(f"the checkpoint's run spec is a {name!r} (module {module!r}), which is not registered: "
                        f"import the module that defines it, or pass spec_class=")
    return SPEC_CLASSES[name]


def read_spec_file(path: Union[str, Path], spec: RunSpec) -> Dict[str, Any]:
    """The settings of a spec file as dotted keys of ``spec``, each value checked (:meth:`RunSpec.typed`).

    The file is JSON (``.json``) or YAML (``.yaml``/``.yml``; needs PyYAML), either nested by section
    (``{"model": {"latent_dim": 32}, "fit": {"lr": 0.001}}``, the layout of :meth:`RunSpec.to_dict`
    and of a run's stored spec) or flat (``{"model.latent_dim": 32, "fit.lr": 0.001}``). Apply the
    result with :meth:`RunSpec.override`.

    Raises
    ------
    SpecError
        An unreadable file, a malformed document, an unknown key or a value of the wrong type; the
        message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"spec file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise SpecError(f"spec file {path}: reading YAML needs PyYAML (pip install pyyaml), or write JSON") from None
            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except SpecError:
        raise
    except Exception as exc:  # the parsers' own errors, whatever their class
        raise SpecError(f"spec file {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                        f"({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise SpecError(f"spec file {path}: expected a mapping of settings, got {type(doc).__name__}")
    flat: Dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key in spec.sections():
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[str(key)] = value
    try:
        return {key: spec.typed(key, value) for key, value in flat.items()}
    except SpecError as exc:
        raise SpecError(f"spec file {path}: {exc}") from None


def build(spec: RunSpec, n_neurons: int, n_heldin: int,
          sessions: Optional[Mapping[str, Any]] = None) -> tuple[LangevinFlow, torch.nn.Module]:
    """The model and guide of ``spec`` for data with ``n_neurons`` neurons, ``n_heldin`` of them read by the guide.

    Their initial parameters are drawn from ``torch.manual_seed(spec.fit.seed)`` (on a forked RNG,
    leaving the global one untouched): the same spec gives the same initial state in any process
    (PyTorch seeds its default generator at random at start-up). With ``sessions`` (a
    :class:`~pyro_langevin.sessions.SessionLayout` as a dict, whose sizes must match) they are the
    stitched model and guide (:func:`build_stitched`).
    """
    if sessions is not None:
        layout = SessionLayout.from_dict(sessions)
        if (layout.n_neurons, layout.n_heldin) != (n_neurons, n_heldin):
            raise SpecError(f"the sessions have {layout.n_neurons} units ({layout.n_heldin} held in), the data "
                            f"{n_neurons} ({n_heldin})")
        return build_stitched(spec, layout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.fit.seed)
        model = spec.model.build(n_neurons)
        return model, spec.guide.build(model, n_heldin)


def build_stitched(spec: RunSpec, layout: SessionLayout) -> tuple[StitchedFlow, StitchedGuide]:
    """The stitched model of ``spec``'s model settings over ``layout``'s sessions, and ``spec``'s guide
    reading ``layout.readin_dim`` features behind a read-in per session (seeded as :func:`build`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.fit.seed)
        model = StitchedFlow(layout, **spec.model.model_kwargs())
        return model, StitchedGuide(spec.guide.build(model, layout.readin_dim), layout)


def check_buildable(spec: RunSpec) -> RunSpec:
    """``spec`` itself, once its model and guide build (tiny sizes, on a forked RNG).

    Raises
    ------
    SpecError
        Settings the constructors refuse, as one line naming the error.
    """
    try:
        with torch.random.fork_rng(devices=[]):
            build(spec, n_neurons=4, n_heldin=2)
    except SpecError:
        raise
    except Exception as exc:  # whatever the constructors reject, as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"invalid model setting: {type(exc).__name__}: {first}") from None
    return spec


def run_meta(spec: RunSpec, n_neurons: int, n_heldin: int, **extra: Any) -> Dict[str, Any]:
    """What ``fit(..., meta=...)`` stores so that :func:`load_run` can rebuild the run."""
    return {"spec": spec.to_dict(), "spec_class": type(spec).__name__, "spec_module": type(spec).__module__,
            "n_neurons": int(n_neurons), "n_heldin": int(n_heldin), **extra}


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
        The :class:`RunSpec` subclass to rebuild (default: the registered class the checkpoint names,
        :data:`SPEC_CLASSES`; the package's own modules are imported when needed).
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
    spec = (spec_class or _spec_class(meta)).from_dict(meta["spec"])
    model, guide = build(spec, meta["n_neurons"], meta["n_heldin"], meta.get("sessions"))
    restore_checkpoint(ckpt, model, guide, map_location=map_location)
    model.eval()
    guide.eval()
    return LoadedRun(model, guide, spec, ckpt)
