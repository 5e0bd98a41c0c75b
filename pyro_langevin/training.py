"""``fit()``: stochastic variational inference for a model and guide over :class:`Batch` data.

The loss is a Pyro ELBO (``TraceMeanField_ELBO`` by default: analytic per-step KL between the
guide's and the model's Normal transitions, conditioned on the sampled past), differentiated
through ``elbo.differentiable_loss`` and stepped with a PyTorch Adam optimizer, which gives the
loop full control of learning-rate plateaus, weight-decay ramps and clipping.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from pyro_langevin.batch import Batch
from pyro_langevin.handlers import scale_latents
from pyro_langevin.posterior import eval_mode

__all__ = ["FitConfig", "FitResult", "fit", "coordinated_dropout", "default_device", "save_checkpoint", "load_checkpoint"]

MetricFn = Callable[[torch.nn.Module, torch.nn.Module, Batch], dict[str, float]]


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
        Final L2 weight decay; ramps linearly from 0 over ``weight_decay_ramp_epochs``.
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
    elbo : {"meanfield", "trace"}
        ``TraceMeanField_ELBO`` (analytic KL) or ``Trace_ELBO`` (Monte Carlo).
    num_particles : int
    val_samples : int
        Posterior samples averaged in the default validation loss.
    seed : int
    """

    epochs: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 2e-5
    weight_decay_ramp_epochs: int = 50
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
    val_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "cd_keep": 0 < self.cd_keep <= 1,
            "grad_clip": self.grad_clip > 0,
            "val_every": self.val_every >= 1,
            "select_mode": self.select_mode in ("min", "max"),
            "elbo": self.elbo in ("meanfield", "trace"),
            "num_particles": self.num_particles >= 1,
            "kl_final": self.kl_final >= 0 and self.kl_start >= 0,
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


def coordinated_dropout(batch: Batch, keep: float, generator: Optional[torch.Generator] = None) -> Batch:
    """Hide a random ``1 - keep`` of the held-in input entries from the guide; score only those.

    The guide sees ``input * M / keep`` for a Bernoulli(keep) mask ``M``; the likelihood mask of the
    observed held-in entries becomes ``mask & ~M``, so the model is never rewarded for copying an
    input it was shown. Held-out neurons and forward bins are unaffected.
    """
    if keep >= 1.0:
        return batch
    m = torch.rand(batch.input.shape, generator=generator, device="cpu").to(batch.device) < keep
    new_input = batch.input * m / keep
    mask = batch.mask.clone()
    t, n_in = batch.n_observed_bins, batch.n_heldin
    mask[:, :t, :n_in] &= ~m
    return batch.with_inputs(new_input, mask)


def _make_elbo(config: FitConfig):
    cls = TraceMeanField_ELBO if config.elbo == "meanfield" else Trace_ELBO
    return cls(num_particles=config.num_particles, vectorize_particles=False)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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


def _snapshot(model: torch.nn.Module, guide: torch.nn.Module) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "guide": {k: v.detach().clone() for k, v in guide.state_dict().items()},
    }


def validation_loss(model: torch.nn.Module, guide: torch.nn.Module, batch: Batch, elbo=None, n_samples: int = 1) -> float:
    """Negative ELBO per scored count entry on ``batch`` (no dropout, full KL weight)."""
    elbo = elbo or TraceMeanField_ELBO()
    with eval_mode(model, guide), torch.no_grad():
        total = sum(elbo.loss(model, guide, batch) for _ in range(n_samples)) / n_samples
    return float(total) / max(1, int(batch.mask.sum()))


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
        of the returned state. Without them the final state is returned.
    config : FitConfig, optional
    device : str or torch.device, optional
        Default: ``cuda`` when available, else ``cpu``.
    metric_fn : callable, optional
        ``metric_fn(model, guide, valid) -> dict`` of extra validation metrics (run in eval mode);
        ``config.select_on`` may name one of them.
    checkpoint_dir : path, optional
        Writes ``last.pt`` at every validation and ``best.pt`` when the metric improves.
    resume : path, optional
        A ``last.pt`` to continue from (same config and data).
    init_rates : bool
        Set the decoder's readout bias to the log mean training counts (skipped on resume).
    progress : bool
        Show a progress bar with the loss and the validation metric.

    Returns
    -------
    FitResult
        History (one dict per epoch) and the best epoch; ``model`` and ``guide`` are left holding
        the best parameters (or the last ones without ``valid``).
    """
    config = config or FitConfig()
    device = torch.device(device) if device is not None else default_device()
    train = train.validate().to(device)
    if valid is not None:
        valid = valid.validate().to(device)
    model.to(device)
    guide.to(device)

    torch.manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    shuffle_gen = torch.Generator().manual_seed(config.seed)

    params = list({id(p): p for p in [*model.parameters(), *guide.parameters()]}.values())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=config.select_mode, factor=config.lr_plateau_factor,
        patience=config.lr_plateau_patience, min_lr=config.lr_min,
    )
    elbo = _make_elbo(config)
    result = FitResult()
    start_epoch, bad_validations = 0, 0
    best = math.inf if config.select_mode == "min" else -math.inf

    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=device)
        model.load_state_dict(ckpt["model"])
        guide.load_state_dict(ckpt["guide"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = ckpt["epoch"] + 1
        result.history = ckpt["history"]
        result.best_epoch, best = ckpt["best_epoch"], ckpt["best_metric"]
        result.best_state = ckpt.get("best_state")
        bad_validations = ckpt["bad_validations"]
        shuffle_gen.set_state(ckpt["shuffle_rng"])
        _set_rng_state(ckpt["rng"])
    elif init_rates and hasattr(model, "decoder"):
        counts = (train.target * train.mask).sum((0, 1)) / train.mask.sum((0, 1)).clamp_min(1)
        model.decoder.init_rates(counts)

    def checkpoint(epoch: int, name: str) -> None:
        if checkpoint_dir is None:
            return
        save_checkpoint(Path(checkpoint_dir) / name, {
            "model": model.state_dict(), "guide": guide.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "config": dataclasses.asdict(config), "history": result.history,
            "best_epoch": result.best_epoch, "best_metric": best, "best_state": result.best_state,
            "bad_validations": bad_validations, "shuffle_rng": shuffle_gen.get_state(), "rng": _rng_state(),
        })

    t0 = time.perf_counter()
    n = train.n_trials
    bar = tqdm(range(start_epoch, config.epochs), disable=not progress, desc="fit", unit="epoch",
               initial=start_epoch, total=config.epochs)
    for epoch in bar:
        model.train()
        guide.train()
        kl_w = config.kl_weight(epoch)
        for group in optimizer.param_groups:
            group["weight_decay"] = config.weight_decay_at(epoch)
        perm = torch.randperm(n, generator=shuffle_gen)
        total, scored = 0.0, 0
        for start in range(0, n, config.batch_size):
            mb = coordinated_dropout(train[perm[start : start + config.batch_size].to(device)], config.cd_keep)
            with scale_latents(kl_w):
                loss = elbo.differentiable_loss(model, guide, mb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {epoch}; lower lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            total += loss.item()
            scored += int(mb.mask.sum())
        record: dict[str, float] = {"epoch": epoch, "loss": total / max(1, scored), "kl_weight": kl_w,
                                    "lr": optimizer.param_groups[0]["lr"]}
        validate = valid is not None and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs)
        if validate:
            record["val_loss"] = validation_loss(model, guide, valid, n_samples=config.val_samples)
            if metric_fn is not None:
                with eval_mode(model, guide):
                    record.update(metric_fn(model, guide, valid))
            if config.select_on not in record:
                raise KeyError(f"select_on={config.select_on!r} is not among the validation metrics {sorted(record)}")
            value = record[config.select_on]
            scheduler.step(value)
            improved = value < best if config.select_mode == "min" else value > best
            if improved:
                best, result.best_epoch, bad_validations = value, epoch, 0
                result.best_state = _snapshot(model, guide)
                checkpoint(epoch, "best.pt")
            else:
                bad_validations += 1
        result.history.append(record)
        if validate:
            checkpoint(epoch, "last.pt")
        postfix = {"loss": f"{record['loss']:.4f}"}
        if valid is not None and result.best_epoch >= 0:
            postfix[config.select_on] = f"{best:.4f}"
        bar.set_postfix(postfix)
        if validate and config.patience and bad_validations >= config.patience:
            result.stopped_early = True
            break
    bar.close()
    if result.best_state is not None:
        model.load_state_dict(result.best_state["model"])
        guide.load_state_dict(result.best_state["guide"])
    result.best_metric = best if result.best_epoch >= 0 else math.nan
    result.seconds = time.perf_counter() - t0
    return result
