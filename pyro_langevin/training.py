"""``fit()``: stochastic variational inference for a model and guide over :class:`Batch` data.

The loss is a Pyro ELBO (``TraceMeanField_ELBO`` by default: analytic per-step KL between the
guide's and the model's Normal transitions, conditioned on the sampled past), differentiated
through ``elbo.differentiable_loss`` and stepped with a PyTorch Adam optimizer, which gives the
loop full control of learning-rate plateaus, weight-decay ramps and clipping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import pyro
import torch

from pyro_langevin.augmentation import temporal_shift
from pyro_langevin.batch import Batch, BatchError
from pyro_langevin.checkpoints import RESUME_MAY_CHANGE, TrainingState, rng_state, set_rng_state
from pyro_langevin.devices import check_device, default_device
from pyro_langevin.elbo import MarkovMeanFieldELBO, make_elbo
from pyro_langevin.handlers import scale_latents
from pyro_langevin.inputs import counts_with_features, encoder_features
from pyro_langevin.posterior import eval_mode
from pyro_langevin.progress import progress_bar
from pyro_langevin.selection import Selector
from pyro_langevin.spec import FitConfig, ramp_epochs

__all__ = [
    "FitConfig", "FitResult", "fit", "coordinated_dropout", "weight_decay_groups", "default_device", "ramp_epochs",
    "validation_loss", "TrainingDivergedError",
]

MetricFn = Callable[[torch.nn.Module, torch.nn.Module, Batch], dict[str, float]]

_log = logging.getLogger(__name__)


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
    rng = rng_state()
    try:
        with eval_mode(model, guide), torch.no_grad():
            names = set(metric_fn(model, guide, valid)) | {"val_loss"}
    finally:
        set_rng_state(rng)
    if config.select_on not in names:
        raise ValueError(f"FitConfig.select_on={config.select_on!r} is not among the validation metrics {sorted(names)}")


@contextlib.contextmanager
def _invalid_values_as_fault(epoch: int, step: int, what: str) -> Iterator[None]:
    """Turn a distribution's rejection of non-finite parameters into a :class:`_Fault` at (epoch, step)."""
    try:
        yield
    except ValueError as exc:
        if not _is_invalid_value_error(exc):
            raise
        raise _Fault(epoch, step, f"{what} ({_first_line(exc)})") from exc


def _unique_parameters(model: torch.nn.Module, guide: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the model then the guide, each shared parameter once (first name)."""
    named = [(f"model.{k}", p) for k, p in model.named_parameters()] + [(f"guide.{k}", p) for k, p in guide.named_parameters()]
    first: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for k, p in named:
        first.setdefault(id(p), (k, p))
    return list(first.values())


def _optimizer(named: list[tuple[str, torch.nn.Parameter]], config: FitConfig) -> torch.optim.Optimizer:
    """Adam or AdamW; group 0 holds the decayed weights (its decay ramps), group 1 is never decayed."""
    decayed, not_decayed = weight_decay_groups(named)
    optimizer_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls([{"params": decayed}, {"params": not_decayed}], lr=config.lr, weight_decay=0.0)


class _Epoch:
    """One epoch: the minibatch steps, then (when due) validation and selection.

    Raises :class:`_Fault` at the first non-finite loss, gradient, parameter or validation metric,
    and :class:`_Interrupted` when a signal arrived, at the next step boundary.
    """

    def __init__(self, state: TrainingState, config: FitConfig, named: list[tuple[str, torch.nn.Parameter]],
                 train: Batch, valid: Optional[Batch], metric_fn: Optional[MetricFn], device: torch.device,
                 guard: _SignalGuard) -> None:
        self.model, self.guide, self.optimizer, self.selector = state.model, state.guide, state.optimizer, state.selector
        self.shuffle, self.config = state.shuffle, config
        self.train, self.valid, self.metric_fn, self.device, self.guard = train, valid, metric_fn, device, guard
        self.names = {id(p): k for k, p in named}
        self.params = [p for _, p in named]
        self.elbo = make_elbo(config.elbo, config.num_particles)

    def __call__(self, epoch: int) -> tuple[dict[str, float], bool, bool]:
        """``(record, validated, improved)`` for ``epoch``."""
        record = self.steps(epoch)
        c = self.config
        scheduled = (epoch + 1) % c.val_every == 0
        if self.valid is None or not (scheduled or epoch + 1 == c.epochs):
            return record, False, False
        record.update(self.validate(epoch))
        if c.select_on not in record:
            raise KeyError(f"select_on={c.select_on!r} is not among the validation metrics {sorted(record)}")
        value = record[c.select_on]
        if not math.isfinite(value):
            raise _Fault(epoch, -1, f"the validation metric {c.select_on} ({value})")
        return record, True, self.selector.observe(epoch, value, scheduled)

    def steps(self, epoch: int) -> dict[str, float]:
        """The minibatch steps of ``epoch`` (in the order the shuffle generator draws); its record."""
        c, model, guide, optimizer = self.config, self.model, self.guide, self.optimizer
        model.train()
        guide.train()
        kl_w = c.kl_weight(epoch)
        optimizer.param_groups[0]["weight_decay"] = c.weight_decay_at(epoch)
        n = self.train.n_trials
        perm = torch.randperm(n, generator=self.shuffle)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        scored = torch.zeros((), device=self.device, dtype=torch.long)
        for step, start in enumerate(range(0, n, c.batch_size)):
            if self.guard.received is not None:
                raise _Interrupted(self.guard.received, epoch, step)
            mb = self.train[perm[start : start + c.batch_size].to(self.device)]
            mb = coordinated_dropout(temporal_shift(mb, c.shift_std, c.max_shift), c.cd_keep)
            with _invalid_values_as_fault(epoch, step, "a distribution parameter"):
                with scale_latents(kl_w), pyro.validation_enabled(c.validate_args):
                    loss = self.elbo.differentiable_loss(model, guide, mb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            # one device sync per step: loss and total gradient norm both finite?
            if not bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)):
                if not bool(torch.isfinite(loss.detach())):
                    raise _Fault(epoch, step, f"the loss ({loss.item()})")
                raise _Fault(epoch, step, f"the gradient (total norm {gnorm.item()}; first non-finite in {self.first_bad_grad()})")
            optimizer.step()
            total += loss.detach()
            scored += mb.mask.sum()
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.params])
        if not bool(finite.all()):  # one device sync per epoch
            bad = self.names[id(self.params[int((~finite).nonzero()[0])])]
            raise _Fault(epoch, -1, f"parameter {bad} after the optimizer step")
        return {"epoch": epoch, "loss": float(total) / max(1, int(scored)), "kl_weight": kl_w,
                "lr": optimizer.param_groups[0]["lr"]}

    def validate(self, epoch: int) -> dict[str, float]:
        """``val_loss`` and the ``metric_fn`` metrics, drawn from a forked RNG: the training stream is unchanged."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), \
                _invalid_values_as_fault(epoch, -1, "a distribution parameter during validation"):
            out = {"val_loss": validation_loss(self.model, self.guide, self.valid, n_samples=self.config.val_samples)}
            if self.metric_fn is not None:
                with eval_mode(self.model, self.guide):
                    out.update(self.metric_fn(self.model, self.guide, self.valid))
        return out

    def first_bad_grad(self) -> str:
        for p in self.params:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return self.names[id(p)]
        return "?"


class _Recovery:
    """After a numerical fault: back to the last epoch boundary at a lower learning rate, or give up."""

    def __init__(self, state: TrainingState, config: FitConfig) -> None:
        self.state, self.config = state, config
        self.retries = 0  # consecutive faults without completing an epoch

    def __call__(self, fault: _Fault, snapshot: dict[str, Any]) -> None:
        """Restore ``snapshot`` and lower the learning rate (warns), or raise :class:`TrainingDivergedError`."""
        c, state = self.config, self.state
        self.retries += 1
        lr_before = state.optimizer.param_groups[0]["lr"]
        info = {"epoch": fault.epoch, "step": fault.step, "what": fault.what, "lr_before": lr_before}
        where = f"epoch {fault.epoch}, " + (f"step {fault.step}" if fault.step >= 0 else "end-of-epoch checks")
        if self.retries > c.max_retries:
            state.restore(snapshot)
            state.faults.append({**info, "lr_after": lr_before})
            path = state.write(snapshot, "last.pt")
            raise TrainingDivergedError(
                f"training diverged: non-finite value in {fault.what} at {where}, after "
                f"{c.max_retries} recoveries from the state at the start of epoch {snapshot['epoch'] + 1} "
                f"(learning rate now {lr_before:.3g}, started at {c.lr:.3g}). The model and guide hold "
                "that last good state" + (f" (saved to {path})" if path else "") +
                ". Check the data, or lower FitConfig.lr or grad_clip.",
                fault.epoch, fault.step, fault.what, state.faults,
            ) from fault.__cause__
        lrs = [g["lr"] * c.fault_lr_factor for g in state.optimizer.param_groups]  # before restore: retries compound
        state.restore(snapshot)
        state.selector.set_lr(lrs)
        state.faults.append({**info, "lr_after": lrs[0]})
        warnings.warn(
            f"fit: non-finite value in {fault.what} at {where}; restored the state at the start of "
            f"epoch {snapshot['epoch'] + 1} and lowered the learning rate {lr_before:.3g} -> {lrs[0]:.3g} "
            f"(retry {self.retries} of {c.max_retries})", RuntimeWarning, stacklevel=3,
        )


def _save_interrupted(state: TrainingState, snapshot: dict[str, Any], intr: _Interrupted,
                      guard: _SignalGuard) -> tuple[int, Any, None, str]:
    """Restore and write the last epoch boundary after a signal; the arguments of :func:`_reraise_signal`."""
    state.restore(snapshot)
    path = state.write(snapshot, "last.pt", interrupted=True)
    message = (f"fit interrupted by {signal.Signals(intr.signum).name} at epoch {intr.epoch} step {intr.step}; state "
               f"at the start of epoch {snapshot['epoch'] + 1} saved to {path} (continue with fit(..., resume={str(path)!r}))")
    _log.warning(message)  # stderr by default; a command line prints its own line instead
    return intr.signum, guard.previous.get(intr.signum), None, message


_RAMPS = ("kl_ramp", "weight_decay_ramp")


def _warn_config_changes(saved: dict[str, Any], config: FitConfig) -> None:
    """Warn about options a resumed run changed; ramps compare in epochs (which old checkpoints stored)."""

    def in_epochs(options: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in options.items() if k not in _RAMPS}
        out.update({f"{k}_epochs": ramp_epochs(options[k], options["epochs"]) for k in _RAMPS if k in options})
        return out

    old, new = in_epochs(saved), in_epochs(dataclasses.asdict(config))
    changed = {k: (v, new[k]) for k, v in old.items() if k in new and k not in RESUME_MAY_CHANGE and new[k] != v}
    if changed:
        warnings.warn("resuming with a different config: " + ", ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), stacklevel=3)


def _init_rates(model: torch.nn.Module, train: Batch) -> None:
    """Set the decoder's readout bias to the log mean scored training counts (when it has ``init_rates``)."""
    if hasattr(model, "decoder") and hasattr(model.decoder, "init_rates"):
        model.decoder.init_rates((train.target.nan_to_num() * train.mask).sum((0, 1)) / train.mask.sum((0, 1)).clamp_min(1))


def _show(bar: Any, record: dict[str, float], selector: Selector, select_on: str) -> None:
    """Advance the progress bar by one epoch, showing the loss and the best validation metric."""
    best = {select_on: f"{selector.best_metric:.4f}"} if selector.best_epoch >= 0 else {}
    bar.set_postfix({"loss": f"{record['loss']:.4f}", **best}, refresh=False)  # drawn by update(): throttled off a terminal
    bar.update(1)


def fit(model: torch.nn.Module, guide: torch.nn.Module, train: Batch, valid: Optional[Batch] = None,
        config: Optional[FitConfig] = None, *, device: Union[str, torch.device, None] = None,
        metric_fn: Optional[MetricFn] = None, checkpoint_dir: Union[str, Path, None] = None,
        resume: Union[str, Path, None] = None, init_rates: bool = True, progress: bool = True,
        meta: Optional[dict[str, Any]] = None, callback: Optional[Callable[[int, dict[str, float]], None]] = None,
        handle_signals: bool = True) -> FitResult:
    """Train ``model`` and ``guide`` by SVI on ``train``, selecting the best state on ``valid``.

    Parameters
    ----------
    model, guide : torch.nn.Module
        Callables ``model(batch)`` and ``guide(batch)`` with matching latent sites.
    train : Batch
        Training trials (their ``mask`` says which counts are scored).
    valid : Batch, optional
        Validation trials, never trained on, with the neurons of ``train``: they drive early
        stopping, LR plateaus and the choice of the returned state (without them, the last one).
    config : FitConfig, optional
    device : str or torch.device, optional
        Default: ``cuda`` when available, else ``cpu``.
    metric_fn : callable, optional
        ``metric_fn(model, guide, valid) -> dict`` of extra validation metrics (run in eval mode);
        ``config.select_on`` may name one of them.
    checkpoint_dir : path, optional
        Writes ``last.pt`` (atomically) every ``config.checkpoint_every`` epochs and after the last
        one, and ``best.pt`` when the validation metric improves: the whole training state
        (:class:`~pyro_langevin.checkpoints.TrainingState`) with the model/guide sizes and ``meta``.
    resume : path, optional
        A checkpoint (``last.pt``) to continue from: an interrupted and resumed run ends with the
        same parameters as an uninterrupted one (same data, device and config; ``config.epochs``
        may change, and with it the ramps). Shapes are checked first, changed options warned about.
        A run that had stopped early trains no further unless ``config.patience`` grew.
    init_rates : bool
        Set the decoder's readout bias to the log mean training counts (skipped on resume).
    progress : bool
        Show a progress bar with the loss and the validation metric.
    meta : dict, optional
        What rebuilds the model and guide (constructor settings, dataset); ``checkpoint["meta"]``.
    callback : callable, optional
        ``callback(epoch, record)`` after each completed epoch, once its checkpoints are written:
        the 0-based epoch and a copy of its history dict (``loss``, ``kl_weight``, ``lr``; on
        validated epochs ``val_loss`` and the ``metric_fn`` metrics). Its exceptions end the fit.
    handle_signals : bool
        With ``checkpoint_dir``, SIGINT and SIGTERM (in the main thread) stop the fit at the next
        step: model, guide and ``last.pt`` get the state at the start of the epoch (an exact resume
        point), then ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(128 + signum)`` (SIGTERM) is
        raised. A second signal stops at once.

    Returns
    -------
    FitResult
        History (a dict per epoch), best epoch, faults; model and guide hold the returned state.

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
    train, valid = train.to(device), None if valid is None else valid.to(device)
    model.to(device)
    guide.to(device)
    pyro.set_rng_seed(config.seed)  # torch (CPU and CUDA), NumPy and Python
    named = _unique_parameters(model, guide)
    optimizer = _optimizer(named, config)
    selector = Selector(model, guide, optimizer, mode=config.select_mode, patience=config.patience,
                        lr_factor=config.lr_plateau_factor, lr_patience=config.lr_plateau_patience, lr_min=config.lr_min)
    state = TrainingState(model, guide, optimizer, selector, torch.Generator().manual_seed(config.seed),
                          config=dataclasses.asdict(config), meta=meta, checkpoint_dir=checkpoint_dir)
    if resume is not None:
        _warn_config_changes(state.resume(resume).get("config", {}), config)
    elif init_rates:
        _init_rates(model, train)
    _check_select_on(config, metric_fn, model, guide, valid, state.history)
    guard = _SignalGuard(handle_signals and checkpoint_dir is not None)
    run_epoch = _Epoch(state, config, named, train, valid, metric_fn, device, guard)
    recover = _Recovery(state, config)
    t0 = time.perf_counter()
    bar = progress_bar(total=config.epochs, initial=min(state.epoch + 1, config.epochs), disable=not progress,
                       desc="fit", unit="epoch")
    # a run that stopped early is finished: resuming it trains on only if the patience grew
    snapshot, stopped_early, pending = state.capture(), resume is not None and selector.should_stop, None
    with guard:
        try:
            while not stopped_early and state.epoch + 1 < config.epochs:
                epoch = state.epoch + 1
                try:
                    record, validated, improved = run_epoch(epoch)
                except _Fault as fault:
                    recover(fault, snapshot)  # back to the snapshot at a lower learning rate, or raise
                    continue
                recover.retries = 0
                state.history.append(record)
                state.epoch = epoch
                stopped_early = validated and selector.should_stop
                snapshot = state.capture()
                if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs or stopped_early:
                    state.write(snapshot, "last.pt")
                if improved:
                    state.write(snapshot, "best.pt")
                _show(bar, record, selector, config.select_on)
                if callback is not None:
                    callback(epoch, dict(record))
                if stopped_early:
                    break
                if guard.received is not None:
                    raise _Interrupted(guard.received, epoch + 1, 0)
        except _Interrupted as intr:
            pending = _save_interrupted(state, snapshot, intr, guard)
        finally:
            bar.close()
    if pending is not None:  # outside the handlers, so the traceback is the user's, not ours
        _reraise_signal(*pending)
    selector.load_best()
    best_metric = selector.best_metric if selector.best_epoch >= 0 else math.nan
    return FitResult(history=state.history, best_epoch=selector.best_epoch, best_metric=best_metric,
                     best_state=selector.best_state, stopped_early=stopped_early, seconds=time.perf_counter() - t0,
                     faults=state.faults)
