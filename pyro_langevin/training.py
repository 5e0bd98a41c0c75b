"""``fit()``: stochastic variational inference for a model and guide over :class:`Batch` data.

The loss is a Pyro ELBO (``TraceMeanField_ELBO`` by default: analytic per-step KL between the
guide's and the model's Normal transitions, conditioned on the sampled past), differentiated
through ``elbo.differentiable_loss`` and stepped with a PyTorch Adam optimizer, which gives the
loop full control of learning-rate plateaus, weight-decay ramps and clipping.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import pyro
import torch

from pyro_langevin.batch import Batch, BatchError
from pyro_langevin.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointMismatchError,
    _clone,
    _module_sizes,
    _rng_state,
    _set_rng_state,
    _snapshot,
    load_checkpoint,
    load_state_checked,
    restore_checkpoint,
    save_checkpoint,
)
from pyro_langevin.elbo import MarkovMeanFieldELBO, make_elbo
from pyro_langevin.handlers import scale_latents
from pyro_langevin.inputs import counts_with_features, encoder_features
from pyro_langevin.options import check_device
from pyro_langevin.posterior import eval_mode
from pyro_langevin.progress import progress_bar

__all__ = [
    "FitConfig", "FitResult", "fit", "coordinated_dropout", "weight_decay_groups", "default_device", "save_checkpoint",
    "load_checkpoint", "restore_checkpoint", "load_state_checked", "TrainingDivergedError",
    "CheckpointMismatchError",
]

MetricFn = Callable[[torch.nn.Module, torch.nn.Module, Batch], dict[str, float]]

_log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        Final weight decay; ramps linearly from 0 over ``weight_decay_ramp_epochs``.
    optimizer : {"adam", "adamw"}
        ``"adam"``: weight decay as an L2 term in the gradient (the reference code's form; it is
        negligible next to an ELBO summed over a minibatch of trials). ``"adamw"``: decoupled
        weight decay, which shrinks weights by ``lr * weight_decay`` per step whatever the loss scale.
    kl_start, kl_final, kl_ramp_epochs
        KL weight (a ``scale_latents`` handler on model and guide) ramps linearly from ``kl_start``
        to ``kl_final`` over ``kl_ramp_epochs``. A proper ELBO has ``kl_final = 1``.
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
    weight_decay_ramp_epochs: int = 50
    optimizer: Literal["adam", "adamw"] = "adam"
    kl_start: float = 0.0
    kl_final: float = 1.0
    kl_ramp_epochs: int = 50
    cd_keep: float = 1.0
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
            "optimizer": self.optimizer in ("adam", "adamw"),
            "cd_keep": 0 < self.cd_keep <= 1,
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
            raise ValueError(f"FitConfig: invalid value for {', '.join(bad)}: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    def ramp(self, epoch: int, start: float, final: float, epochs: int) -> float:
        """Linear ramp value at ``epoch`` (0-based)."""
        if epochs <= 0:
            return final
        frac = min(1.0, (epoch + 1) / epochs)
        return start + frac * (final - start)

    def kl_weight(self, epoch: int) -> float:
        return self.ramp(epoch, self.kl_start, self.kl_final, self.kl_ramp_epochs)

    def weight_decay_at(self, epoch: int) -> float:
        return self.ramp(epoch, 0.0, self.weight_decay, self.weight_decay_ramp_epochs)


@dataclass
class FitResult:
    """What :func:`fit` returns. The model and guide hold the best parameters when it returns."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = math.nan
    best_state: Optional[dict[str, Any]] = None
    stopped_early: bool = False
    seconds: float = 0.0
    faults: list[dict[str, Any]] = field(default_factory=list)
    """Numerical faults recovered from (epoch, step, what, lr before and after)."""


class TrainingDivergedError(FloatingPointError):
    """Training kept producing non-finite values after ``FitConfig.max_retries`` recoveries.

    Attributes
    ----------
    epoch, step : int
        Where the last fault happened (``step`` is the minibatch within the epoch, -1 for checks
        at the end of the epoch such as validation).
    what : str
        What was non-finite.
    faults : list of dict
        Every fault of the run.
    """

    def __init__(self, message: str, epoch: int, step: int, what: str, faults: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.epoch, self.step, self.what, self.faults = epoch, step, what, faults


class _Fault(Exception):
    """Internal: a numerical fault at (epoch, step)."""

    def __init__(self, epoch: int, step: int, what: str) -> None:
        super().__init__(what)
        self.epoch, self.step, self.what = epoch, step, what


class _Interrupted(Exception):
    def __init__(self, signum: int, epoch: int, step: int) -> None:
        super().__init__(signum)
        self.signum, self.epoch, self.step = signum, epoch, step


def coordinated_dropout(batch: Batch, keep: float, generator: Optional[torch.Generator] = None) -> Batch:
    """Hide a random ``1 - keep`` of the held-in input entries from the guide; score only those.

    For a Bernoulli(keep) mask ``M`` the guide's encoder features (:func:`~pyro_langevin.inputs.encoder_features`,
    ``log1p`` counts) become ``features(input) * M / keep``: rescaled *after* the nonlinear transform,
    so their expectation over the mask equals the unmasked features and the encoder sees the same
    input distribution in training as at test time. (Rescaling the raw counts before ``log1p`` would
    shrink the features by 20-36% on average at keep 0.5-0.7.) The batch's ``input`` carries the
    count-scale values with those features. The likelihood mask of the observed held-in entries
    becomes ``mask & ~M``, so the model is never rewarded for copying an input it was shown.
    Held-out neurons and forward bins are unaffected.
    """
    if keep >= 1.0:
        return batch
    if generator is None:
        m = torch.rand(batch.input.shape, device=batch.device) < keep
    else:
        m = torch.rand(batch.input.shape, generator=generator, device=generator.device).to(batch.device) < keep
    new_input = counts_with_features(encoder_features(batch.input) * m / keep)
    mask = batch.mask.clone()
    t, n_in = batch.n_observed_bins, batch.n_heldin
    mask[:, :t, :n_in] &= ~m
    return batch.with_inputs(new_input, mask)


#: Parameters never decayed: the prior's physics (potential, damping, noise), whatever their shape.
_PHYSICAL_PREFIXES = ("model.potential.", "model.dynamics.")


def weight_decay_groups(named_params: list[tuple[str, torch.nn.Parameter]]) -> tuple[list, list]:
    """Split parameters into ``(decayed, not_decayed)``.

    Decayed: weight matrices of the networks (``*weight*`` tensors with two or more dimensions:
    linear, GRU and attention weights). Not decayed: biases, norms, per-trial variational
    parameters, and every parameter of the prior's physics (log-frequencies, couplings, damping,
    noise), whose size is meaningful rather than a complexity to shrink.
    """
    decayed, kept = [], []
    for name, p in named_params:
        is_weight = p.dim() >= 2 and "weight" in name.rsplit(".", 1)[-1]
        (decayed if is_weight and not name.startswith(_PHYSICAL_PREFIXES) else kept).append(p)
    return decayed, kept


class _SignalGuard:
    """Defer SIGINT/SIGTERM during a fit to the next step boundary (a second signal stops at once)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.previous: dict[int, Any] = {}
        self.received: Optional[int] = None

    def __enter__(self) -> "_SignalGuard":
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                prev = signal.getsignal(sig)
                if prev in (signal.SIG_IGN, None):
                    continue
                self.previous[sig] = prev
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # impatient: second signal, stop now
            previous = self.previous.get(signum)
            self.restore()
            _reraise_signal(signum, previous, frame)
        self.received = signum

    def restore(self) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous = {}

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _reraise_signal(signum: int, previous: Any, frame: Any = None, message: str = "") -> None:
    """Behave as the signal would have without our handler: KeyboardInterrupt, exit, or the old handler."""
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, frame)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt(message) if message else KeyboardInterrupt()
    raise SystemExit(128 + signum)


def validation_loss(model: torch.nn.Module, guide: torch.nn.Module, batch: Batch, elbo=None, n_samples: int = 1) -> float:
    """Negative ELBO per scored count entry on ``batch`` (no dropout, full KL weight)."""
    elbo = elbo or MarkovMeanFieldELBO()
    with eval_mode(model, guide), torch.no_grad():
        total = sum(elbo.loss(model, guide, batch) for _ in range(n_samples)) / n_samples
    return float(total) / max(1, int(batch.mask.sum()))


def _check_fit_inputs(model: Any, guide: Any, train: Batch, valid: Optional[Batch]) -> None:
    """Validate the batches and their agreement with each other and with the model and guide."""
    for name, b in (("train", train), ("valid", valid)):
        if b is None:
            continue
        if not isinstance(b, Batch):
            raise TypeError(f"{name}: expected a Batch (see pyro_langevin.make_batch), got {type(b).__name__}")
        try:
            b.validate()
        except BatchError as exc:
            raise BatchError(f"{name}.{exc}") from exc
        if not bool(b.mask.any()):
            raise BatchError(f"{name}.mask: no entry is scored (mask is all False)")
    if valid is not None:
        if valid.n_heldin != train.n_heldin:
            raise BatchError(f"valid: {valid.n_heldin} held-in neurons but train has {train.n_heldin}")
        if valid.n_neurons != train.n_neurons:
            raise BatchError(
                f"valid: {valid.n_neurons} neurons (held-in + held-out) but train has {train.n_neurons}"
            )
        if valid.n_observed_bins != train.n_observed_bins or valid.n_bins != train.n_bins:
            warnings.warn(
                f"valid has {valid.n_observed_bins}+{valid.n_forward_bins} bins, train "
                f"{train.n_observed_bins}+{train.n_forward_bins}", stacklevel=3,
            )
    n_model = getattr(model, "n_neurons", None)
    if isinstance(n_model, int) and n_model != train.n_neurons:
        raise BatchError(
            f"train: {train.n_neurons} neurons (held-in + held-out) but the model was built for n_neurons={n_model}"
        )
    n_guide = getattr(guide, "n_heldin", None)
    if isinstance(n_guide, int) and n_guide != train.n_heldin:
        raise BatchError(f"train: {train.n_heldin} held-in neurons but the guide reads n_heldin={n_guide}")


def _is_invalid_value_error(exc: BaseException) -> bool:
    """A torch/Pyro distribution rejecting non-finite parameters (argument validation)."""
    text = str(exc)
    return isinstance(exc, ValueError) and ("invalid values" in text or "nan" in text.lower() and "constraint" in text)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0].rstrip(":")[:300]


def _check_select_on(config: FitConfig, metric_fn: Optional[MetricFn], model: Any, guide: Any,
                     valid: Optional[Batch], history: list[dict[str, float]]) -> None:
    """Fail before any training when ``config.select_on`` names no validation metric.

    The names are ``val_loss`` plus the keys ``metric_fn`` returns; unless an earlier epoch of a
    resumed run recorded them, ``metric_fn`` is called once on the current state (random state
    restored afterwards, so the run is unchanged).
    """
    if config.select_on == "val_loss" or valid is None or any(config.select_on in h for h in history):
        return
    if metric_fn is None:
        raise ValueError(f"FitConfig.select_on={config.select_on!r}: fit has no metric_fn, so the only "
                         "validation metric is 'val_loss'")
    rng = _rng_state()
    try:
        with eval_mode(model, guide), torch.no_grad():
            names = set(metric_fn(model, guide, valid)) | {"val_loss"}
    finally:
        _set_rng_state(rng)
    if config.select_on not in names:
        raise ValueError(f"FitConfig.select_on={config.select_on!r} is not among the validation metrics {sorted(names)}")


def fit(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    train: Batch,
    valid: Optional[Batch] = None,
    config: Optional[FitConfig] = None,
    *,
    device: Union[str, torch.device, None] = None,
    metric_fn: Optional[MetricFn] = None,
    checkpoint_dir: Union[str, Path, None] = None,
    resume: Union[str, Path, None] = None,
    init_rates: bool = True,
    progress: bool = True,
    meta: Optional[dict[str, Any]] = None,
    handle_signals: bool = True,
) -> FitResult:
    """Train ``model`` and ``guide`` by SVI on ``train``, selecting the best state on ``valid``.

    Parameters
    ----------
    model, guide : torch.nn.Module
        Callables ``model(batch)`` and ``guide(batch)`` with matching latent sites.
    train : Batch
        Training trials (their ``mask`` says which counts are scored).
    valid : Batch, optional
        Validation trials, never trained on: they drive early stopping, LR plateaus and the choice
        of the returned state. Without them the final state is returned. Must have the same
        held-in and total neuron counts as ``train``.
    config : FitConfig, optional
    device : str or torch.device, optional
        Default: ``cuda`` when available, else ``cpu``.
    metric_fn : callable, optional
        ``metric_fn(model, guide, valid) -> dict`` of extra validation metrics (run in eval mode);
        ``config.select_on`` may name one of them.
    checkpoint_dir : path, optional
        Writes ``last.pt`` (atomically) every ``config.checkpoint_every`` epochs and after the last
        one, and ``best.pt`` when the validation metric improves. A checkpoint holds model, guide,
        optimizer and scheduler states, every RNG state, the epoch, the config, the history, the
        model/guide sizes and ``meta``.
    resume : path, optional
        A checkpoint (``last.pt``) to continue from. Training continues at the epoch after it, so
        that an interrupted and resumed run ends with the same parameters as an uninterrupted one
        (same data, device and config; ``config.epochs`` may change). Shapes are checked first.
    init_rates : bool
        Set the decoder's readout bias to the log mean training counts (skipped on resume).
    progress : bool
        Show a progress bar with the loss and the validation metric.
    meta : dict, optional
        Anything needed to rebuild the model and guide (constructor settings, dataset name); saved
        as ``checkpoint["meta"]``.
    handle_signals : bool
        With ``checkpoint_dir``, SIGINT and SIGTERM (in the main thread) stop the fit at the next
        step: ``last.pt`` is written with the state at the start of the current epoch (an exact
        resume point), the model and guide are left holding that state, and ``KeyboardInterrupt``
        (SIGINT) or ``SystemExit(128 + signum)`` (SIGTERM) is raised. A second signal stops at once.

    Returns
    -------
    FitResult
        History (one dict per epoch), the best epoch and the faults recovered from; ``model`` and
        ``guide`` are left holding the best parameters (or the last ones without ``valid``).

    Raises
    ------
    BatchError
        Invalid data, or data that disagree with each other or with the model/guide sizes.
    CheckpointMismatchError
        ``resume`` names a checkpoint of a differently sized model or guide.
    TrainingDivergedError
        Non-finite values persisted through ``config.max_retries`` recoveries. The model and guide
        hold the last good state (also written to ``last.pt`` with ``checkpoint_dir``).
    """
    config = config or FitConfig()
    if not isinstance(config, FitConfig):
        raise TypeError(f"config: expected a FitConfig, got {type(config).__name__}")
    device = check_device(device)
    _check_fit_inputs(model, guide, train, valid)
    train = train.to(device)
    if valid is not None:
        valid = valid.to(device)
    model.to(device)
    guide.to(device)

    torch.manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    shuffle_gen = torch.Generator().manual_seed(config.seed)

    named = [(f"model.{k}", p) for k, p in model.named_parameters()] + [(f"guide.{k}", p) for k, p in guide.named_parameters()]
    first: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for k, p in named:
        first.setdefault(id(p), (k, p))
    names = {i: k for i, (k, _) in first.items()}
    unique = list(first.values())
    params = [p for _, p in unique]
    decayed, not_decayed = weight_decay_groups(unique)
    optimizer_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # group 0 is decayed (its rate ramps), group 1 never is
    optimizer = optimizer_cls([{"params": decayed}, {"params": not_decayed}], lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=config.select_mode, factor=config.lr_plateau_factor,
        patience=config.lr_plateau_patience, min_lr=config.lr_min,
    )
    elbo = make_elbo(config.elbo, config.num_particles)
    result = FitResult()
    start_epoch, bad_validations = 0, 0
    best = math.inf if config.select_mode == "min" else -math.inf
    sizes = {"model": _module_sizes(model), "guide": _module_sizes(guide)}

    if resume is not None:
        # on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the device
        ckpt = load_checkpoint(resume, map_location="cpu")
        saved = ckpt.get("sizes") or {}
        load_state_checked(model, ckpt["model"], "model", saved.get("model"))
        load_state_checked(guide, ckpt["guide"], "guide", saved.get("guide"))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = ckpt["epoch"] + 1
        result.history = list(ckpt["history"])
        result.best_epoch, best = ckpt["best_epoch"], ckpt["best_metric"]
        result.best_state = ckpt.get("best_state")
        result.faults = list(ckpt.get("faults", []))
        bad_validations = ckpt["bad_validations"]
        shuffle_gen.set_state(ckpt["shuffle_rng"])
        _set_rng_state(ckpt["rng"])
        changed = {k: (v, getattr(config, k)) for k, v in ckpt.get("config", {}).items()
                   if hasattr(config, k) and getattr(config, k) != v
                   and k not in ("epochs", "patience", "checkpoint_every", "max_retries", "val_every")}
        if changed:
            warnings.warn("resuming with a different config: " + ", ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), stacklevel=2)
        if meta is None:
            meta = ckpt.get("meta")
    elif init_rates and hasattr(model, "decoder") and hasattr(model.decoder, "init_rates"):
        counts = (train.target.nan_to_num() * train.mask).sum((0, 1)) / train.mask.sum((0, 1)).clamp_min(1)
        model.decoder.init_rates(counts)

    def capture(epoch_done: int) -> dict[str, Any]:
        """The full training state at an epoch boundary, in memory (tensors cloned)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": _clone(model.state_dict()), "guide": _clone(guide.state_dict()),
            "optimizer": _clone(optimizer.state_dict()), "scheduler": copy.deepcopy(scheduler.state_dict()),
            "epoch": epoch_done, "config": dataclasses.asdict(config), "history_len": len(result.history),
            "best_epoch": result.best_epoch, "best_metric": best, "best_state": result.best_state,
            "bad_validations": bad_validations, "shuffle_rng": shuffle_gen.get_state(), "rng": _rng_state(),
            "faults": list(result.faults), "sizes": sizes, "meta": meta,
        }

    def write(snap: dict[str, Any], name: str, **extra: Any) -> Optional[Path]:
        if checkpoint_dir is None:
            return None
        payload = {k: v for k, v in snap.items() if k != "history_len"}
        payload["history"] = result.history[: snap["history_len"]]
        payload.update(extra)
        return save_checkpoint(Path(checkpoint_dir) / name, payload)

    def restore(snap: dict[str, Any]) -> None:
        nonlocal best, bad_validations
        model.load_state_dict(snap["model"])
        guide.load_state_dict(snap["guide"])
        optimizer.load_state_dict(_clone(snap["optimizer"]))  # clone: Adam updates its state in place
        scheduler.load_state_dict(copy.deepcopy(snap["scheduler"]))
        del result.history[snap["history_len"]:]
        result.best_epoch, best, result.best_state = snap["best_epoch"], snap["best_metric"], snap["best_state"]
        bad_validations = snap["bad_validations"]

    def first_bad_grad() -> str:
        for p in params:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return names[id(p)]
        return "?"

    def first_bad_param() -> Optional[str]:
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in params])
        if bool(finite.all()):  # one device sync per epoch
            return None
        return names[id(params[int((~finite).nonzero()[0])])]

    fork_devices = [device] if device.type == "cuda" else []
    n = train.n_trials
    guard = _SignalGuard(handle_signals and checkpoint_dir is not None)

    def run_epoch(epoch: int) -> tuple[dict[str, float], bool, bool]:
        """One epoch of steps plus validation; raises _Fault or _Interrupted."""
        nonlocal best, bad_validations
        model.train()
        guide.train()
        kl_w = config.kl_weight(epoch)
        optimizer.param_groups[0]["weight_decay"] = config.weight_decay_at(epoch)
        perm = torch.randperm(n, generator=shuffle_gen)
        total = torch.zeros((), device=device, dtype=torch.float64)
        scored = torch.zeros((), device=device, dtype=torch.long)
        for step, start in enumerate(range(0, n, config.batch_size)):
            if guard.received is not None:
                raise _Interrupted(guard.received, epoch, step)
            mb = coordinated_dropout(train[perm[start : start + config.batch_size].to(device)], config.cd_keep)
            try:
                with scale_latents(kl_w), pyro.validation_enabled(config.validate_args):
                    loss = elbo.differentiable_loss(model, guide, mb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            except ValueError as exc:
                if not _is_invalid_value_error(exc):
                    raise
                raise _Fault(epoch, step, f"a distribution parameter ({_first_line(exc)})") from exc
            gnorm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            # one device sync per step: loss and total gradient norm both finite?
            if not bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)):
                if not bool(torch.isfinite(loss.detach())):
                    raise _Fault(epoch, step, f"the loss ({loss.item()})")
                raise _Fault(epoch, step, f"the gradient (total norm {gnorm.item()}; first non-finite in {first_bad_grad()})")
            optimizer.step()
            total += loss.detach()
            scored += mb.mask.sum()
        bad = first_bad_param()
        if bad is not None:
            raise _Fault(epoch, -1, f"parameter {bad} after the optimizer step")
        record: dict[str, float] = {"epoch": epoch, "loss": float(total) / max(1, int(scored)), "kl_weight": kl_w,
                                    "lr": optimizer.param_groups[0]["lr"]}
        scheduled = (epoch + 1) % config.val_every == 0
        validate = valid is not None and (scheduled or epoch + 1 == config.epochs)
        improved = False
        if validate:
            # validation draws from a forked RNG: it never changes the training random stream
            with torch.random.fork_rng(devices=fork_devices):
                try:
                    record["val_loss"] = validation_loss(model, guide, valid, n_samples=config.val_samples)
                    if metric_fn is not None:
                        with eval_mode(model, guide):
                            record.update(metric_fn(model, guide, valid))
                except ValueError as exc:
                    if not _is_invalid_value_error(exc):
                        raise
                    raise _Fault(epoch, -1, f"a distribution parameter during validation ({_first_line(exc)})") from exc
            if config.select_on not in record:
                raise KeyError(f"select_on={config.select_on!r} is not among the validation metrics {sorted(record)}")
            value = record[config.select_on]
            if not math.isfinite(value):
                raise _Fault(epoch, -1, f"the validation metric {config.select_on} ({value})")
            if scheduled:  # an off-schedule final validation only takes part in model selection
                scheduler.step(value)
            improved = value < best if config.select_mode == "min" else value > best
            if improved:
                best, result.best_epoch = value, epoch
                result.best_state = _snapshot(model, guide)
                if scheduled:
                    bad_validations = 0
            elif scheduled:
                bad_validations += 1
        return record, validate, improved

    _check_select_on(config, metric_fn, model, guide, valid, result.history)
    t0 = time.perf_counter()
    bar = progress_bar(total=config.epochs, initial=min(start_epoch, config.epochs), disable=not progress,
                       desc="fit", unit="epoch")
    snap = capture(start_epoch - 1)
    retries = 0
    epoch = start_epoch
    pending: Optional[tuple[int, Any, str]] = None
    with guard:
        try:
            while epoch < config.epochs:
                try:
                    record, validated, improved = run_epoch(epoch)
                except _Fault as fault:
                    retries += 1
                    lr_before = optimizer.param_groups[0]["lr"]
                    info = {"epoch": fault.epoch, "step": fault.step, "what": fault.what, "lr_before": lr_before}
                    where = f"epoch {fault.epoch}, " + (f"step {fault.step}" if fault.step >= 0 else "end-of-epoch checks")
                    if retries > config.max_retries:
                        restore(snap)
                        info["lr_after"] = lr_before
                        result.faults.append(info)
                        path = write(snap, "last.pt")
                        raise TrainingDivergedError(
                            f"training diverged: non-finite value in {fault.what} at {where}, after "
                            f"{config.max_retries} recoveries from the state at the start of epoch {snap['epoch'] + 1} "
                            f"(learning rate now {lr_before:.3g}, started at {config.lr:.3g}). The model and guide hold "
                            "that last good state" + (f" (saved to {path})" if path else "") +
                            ". Check the data, or lower FitConfig.lr or grad_clip.",
                            fault.epoch, fault.step, fault.what, result.faults,
                        ) from fault.__cause__
                    lrs = [g["lr"] * config.fault_lr_factor for g in optimizer.param_groups]
                    restore(snap)
                    for g, lr in zip(optimizer.param_groups, lrs):
                        g["lr"] = lr
                    scheduler._last_lr = lrs  # keep get_last_lr() truthful
                    info["lr_after"] = lrs[0]
                    result.faults.append(info)
                    warnings.warn(
                        f"fit: non-finite value in {fault.what} at {where}; restored the state at the start of "
                        f"epoch {snap['epoch'] + 1} and lowered the learning rate {lr_before:.3g} -> {lrs[0]:.3g} "
                        f"(retry {retries} of {config.max_retries})", RuntimeWarning, stacklevel=2,
                    )
                    continue
                retries = 0
                result.history.append(record)
                stop = validated and config.patience > 0 and bad_validations >= config.patience
                snap = capture(epoch)
                if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs or stop:
                    write(snap, "last.pt")
                if improved:
                    write(snap, "best.pt")
                postfix = {"loss": f"{record['loss']:.4f}"}
                if valid is not None and result.best_epoch >= 0:
                    postfix[config.select_on] = f"{best:.4f}"
                bar.set_postfix(postfix, refresh=False)  # drawn by update(): throttled off a terminal
                bar.update(1)
                epoch += 1
                if stop:
                    result.stopped_early = True
                    break
                if guard.received is not None:
                    raise _Interrupted(guard.received, epoch, 0)
        except _Interrupted as intr:
            restore(snap)
            path = write(snap, "last.pt", interrupted=True)
            name = signal.Signals(intr.signum).name
            message = (f"fit interrupted by {name} at epoch {intr.epoch} step {intr.step}; state at the start of "
                       f"epoch {snap['epoch'] + 1} saved to {path} (continue with fit(..., resume={str(path)!r}))")
            _log.warning(message)  # stderr by default; a command line prints its own line instead
            pending = (intr.signum, guard.previous.get(intr.signum), message)
        finally:
            bar.close()
    if pending is not None:  # outside the handlers, so the traceback is the user's, not ours
        _reraise_signal(pending[0], pending[1], None, pending[2])
    if result.best_state is not None:
        model.load_state_dict(result.best_state["model"])
        guide.load_state_dict(result.best_state["guide"])
    result.best_metric = best if result.best_epoch >= 0 else math.nan
    result.seconds = time.perf_counter() - t0
    return result
