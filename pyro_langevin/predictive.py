"""Prior and posterior predictive sampling with ``pyro.infer.Predictive``, as ArviZ InferenceData.

* :func:`prior_predictive` runs the model with no data (``model(n_trials=, n_bins=)``).
* :func:`posterior_predictive` draws latents from a fitted guide and re-runs the model on them with
  the observation released (``poutine.uncondition``), so ``spikes`` are fresh Poisson draws.
  Draws are taken in chunks of samples and of trials, so memory per call stays bounded.
* :func:`to_inference_data` / :func:`predictive_checks` package the draws for ArviZ: groups
  ``prior`` and ``prior_predictive``, ``posterior`` (latents ``z`` and ``rates``),
  ``posterior_predictive`` (``spikes``), ``log_likelihood`` (``spikes``: the Poisson log-likelihood
  of each observed count under each posterior draw's rates, so ``az.loo`` / ``az.waic`` run on it;
  see :func:`pointwise_log_likelihood`), ``observed_data`` (``spikes``, NaN where the batch mask is
  False) and ``constant_data`` (``mask``). Dims are ``(trial, time, neuron)`` and
  ``(trial, time, latent)``; ``trial`` coordinates are the batch's trial ids.
* :func:`credible_intervals`: posterior means and equal-tailed credible intervals of rates and
  latents from S posterior draws, streamed over trials.

ArviZ: this module codes against ArviZ 0.x's ``InferenceData`` (``az.from_dict``, ``to_netcdf``),
the line that installs from the package index on Python 3.11 (0.23.x); ArviZ 1.x (xarray
DataTree based) is not available there.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import pyro
from pyro import poutine
from pyro.infer import Predictive
from scipy.special import gammaln, xlogy

from pyro_langevin.batch import Batch
from pyro_langevin.posterior import eval_mode

with warnings.catch_warnings():  # arviz 0.23 announces its 1.0 refactor with a FutureWarning on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "prior_predictive",
    "posterior_predictive",
    "to_inference_data",
    "predictive_checks",
    "save_netcdf",
    "credible_intervals",
    "pointwise_log_likelihood",
    "CredibleSummary",
    "SITE_DIMS",
]

#: ArviZ dims of each site (after the chain and draw dims).
SITE_DIMS: dict[str, list[str]] = {
    "spikes": ["trial", "time", "neuron"],
    "rates": ["trial", "time", "neuron"],
    "z": ["trial", "time", "latent"],
    "v": ["trial", "time", "latent"],
    "mask": ["trial", "time", "neuron"],
}


def _modules(*objs: Any) -> list[torch.nn.Module]:
    return [o for o in objs if isinstance(o, torch.nn.Module)]


def _to_numpy(name: str, x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return x.to(torch.int32).numpy() if name == "spikes" else x.to(torch.float32).numpy()


def _run_predictive(model: Callable, guide: Optional[Callable], n: int, sites: Sequence[str], *args, **kwargs) -> dict[str, np.ndarray]:
    pred = Predictive(model, guide=guide, num_samples=n, return_sites=list(sites), parallel=False)
    out = pred(*args, **kwargs)
    return {s: _to_numpy(s, out[s]) for s in sites}


def prior_predictive(
    model: Callable,
    n_trials: int,
    n_bins: int,
    n_samples: int = 100,
    sites: Sequence[str] = ("spikes", "rates", "z"),
    seed: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Draws from the model with no data: ``model(n_trials=n_trials, n_bins=n_bins)``.

    Parameters
    ----------
    model : callable
        A model such as :class:`~pyro_langevin.models.LangevinFlow` (run in eval mode).
    n_trials, n_bins : int
        Trials per draw and bins per trial.
    n_samples : int
        Number of draws S.
    sites : sequence of str
        Sites to return (``spikes``, ``rates``, ``z``, ``v``, ...).
    seed : int, optional
        Seeds Pyro's RNG first.

    Returns
    -------
    dict of site -> ndarray of shape (S, trial, time, ...)
        ``spikes`` as int32 counts, others float32.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    with eval_mode(*_modules(model)), torch.no_grad():
        return _run_predictive(model, None, n_samples, sites, n_trials=n_trials, n_bins=n_bins)


def _iter_posterior(
    model: Callable,
    guide: Callable,
    batch: Batch,
    sites: Sequence[str],
    n_samples: int,
    sample_chunk: int,
    trial_chunk: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per chunk of trials, all ``n_samples`` posterior-predictive draws (S, chunk, ...)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    released = poutine.uncondition(model)  # ``spikes`` is sampled, not clamped to the data
    with eval_mode(*_modules(model, guide)), torch.no_grad():
        for start in range(0, batch.n_trials, trial_chunk):
            chunk = batch[start : start + trial_chunk]
            parts: dict[str, list[np.ndarray]] = {s: [] for s in sites}
            for s0 in range(0, n_samples, sample_chunk):
                out = _run_predictive(released, guide, min(sample_chunk, n_samples - s0), sites, chunk)
                for s in sites:
                    parts[s].append(out[s])
            yield {s: np.concatenate(v, axis=0) for s, v in parts.items()}


def posterior_predictive(
    model: Callable,
    guide: Callable,
    batch: Batch,
    n_samples: int = 100,
    sites: Sequence[str] = ("spikes", "rates", "z"),
    sample_chunk: int = 25,
    trial_chunk: int = 256,
) -> dict[str, np.ndarray]:
    """Posterior predictive draws for ``batch``: latents from ``guide``, fresh spikes from the model.

    Parameters
    ----------
    model, guide : callable
        A fitted model and guide (both run in eval mode, no dropout).
    batch : Batch
        Trials to condition on (the guide reads ``batch.input``).
    n_samples : int
        Number of draws S.
    sites : sequence of str
        Sites to return.
    sample_chunk, trial_chunk : int
        Draws and trials per ``Predictive`` call (bounds memory while sampling).

    Returns
    -------
    dict of site -> ndarray of shape (S, trial, time, ...)
    """
    chunks = list(_iter_posterior(model, guide, batch, sites, n_samples, sample_chunk, trial_chunk))
    return {s: np.concatenate([c[s] for c in chunks], axis=1) for s in sites}


class CredibleSummary(NamedTuple):
    """Posterior mean and equal-tailed credible interval of a site, each (trial, time, ...)."""

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    prob: float


def credible_intervals(
    model: Callable,
    guide: Callable,
    batch: Batch,
    sites: Sequence[str] = ("rates", "z"),
    n_samples: int = 50,
    prob: float = 0.9,
    sample_chunk: int = 25,
    trial_chunk: int = 64,
) -> dict[str, CredibleSummary]:
    """Posterior mean and ``prob`` equal-tailed credible interval of ``sites`` from S guide draws.

    Only one chunk of trials' draws is held at a time.

    Parameters
    ----------
    model, guide : callable
    batch : Batch
    sites : sequence of str
        Deterministic or latent sites of the model (``rates``: counts per bin; ``z``; ``v``).
    n_samples : int
        Posterior draws S.
    prob : float
        Interval mass in (0, 1): bounds are the ``(1 - prob) / 2`` and ``(1 + prob) / 2`` quantiles.
    sample_chunk, trial_chunk : int
        Draws and trials per ``Predictive`` call.

    Returns
    -------
    dict of site -> CredibleSummary
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    q = [(1 - prob) / 2, (1 + prob) / 2]
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {s: [] for s in sites}
    for draws in _iter_posterior(model, guide, batch, sites, n_samples, sample_chunk, trial_chunk):
        for s in sites:
            x = draws[s].astype(np.float64)
            lo, hi = np.quantile(x, q, axis=0)
            parts[s].append((x.mean(axis=0), lo, hi))
    return {
        s: CredibleSummary(*(np.concatenate([p[i] for p in v]).astype(np.float32) for i in range(3)), prob=prob)
        for s, v in parts.items()
    }


def _group(draws: Optional[dict[str, np.ndarray]], names: Sequence[str]) -> Optional[dict[str, np.ndarray]]:
    if draws is None:
        return None
    picked = {k: draws[k][None] for k in names if k in draws}  # add the chain dim
    return picked or None


def pointwise_log_likelihood(rates: np.ndarray, batch: Batch) -> np.ndarray:
    """Poisson log-likelihood of every observed count of ``batch`` under every draw's rates.

    Parameters
    ----------
    rates : array, shape (S, trial, time, neuron)
        Posterior (or prior) draws of the rates, expected counts per bin (``posterior["rates"]``).
    batch : Batch
        The observed counts (``target``) and which of them are data (``mask``).

    Returns
    -------
    ndarray, shape (S, trial, time, neuron), float32
        ``log Poisson(x | rate)`` in nats; NaN where ``batch.mask`` is False (no data there: select
        the observed block, e.g. ``idata.isel(time=slice(0, T), neuron=slice(0, n_heldin))``, before
        ``az.loo`` when the batch masks entries).
    """
    rates = np.asarray(rates)
    if rates.ndim != 4 or rates.shape[1:] != tuple(batch.target.shape):
        raise ValueError(f"rates: expected shape (S, {', '.join(map(str, batch.target.shape))}), got {rates.shape}")
    mask = batch.mask.detach().cpu().numpy()
    x = np.where(mask, batch.target.detach().cpu().numpy(), 0.0).astype(np.float64)
    log_factorial = gammaln(x + 1.0)
    out = np.empty(rates.shape, dtype=np.float32)
    for s in range(rates.shape[0]):  # one draw at a time: float64 temporaries of one draw only
        r = rates[s].astype(np.float64)
        out[s] = np.where(mask, xlogy(x, r) - r - log_factorial, np.nan)
    return out


def to_inference_data(
    batch: Optional[Batch] = None,
    prior: Optional[dict[str, np.ndarray]] = None,
    posterior: Optional[dict[str, np.ndarray]] = None,
    attrs: Optional[dict[str, Any]] = None,
    log_likelihood: Optional[np.ndarray] = None,
) -> az.InferenceData:
    """Package predictive draws (one chain) and the observed batch as ``arviz.InferenceData``.

    Parameters
    ----------
    batch : Batch, optional
        Observed trials: ``observed_data.spikes`` (float, NaN where ``batch.mask`` is False) and
        ``constant_data.mask`` (int8). Its ``index`` gives the ``trial`` coordinates.
    prior : dict, optional
        Output of :func:`prior_predictive`: ``spikes`` goes to ``prior_predictive``, latent sites
        (``z``, ``v``, ``rates``) to ``prior``.
    posterior : dict, optional
        Output of :func:`posterior_predictive`: ``spikes`` to ``posterior_predictive``, latent
        sites to ``posterior``.
    attrs : dict, optional
        Extra attributes (``n_heldin`` and ``n_observed_bins`` are added from ``batch``).
    log_likelihood : array, shape (S, trial, time, neuron), optional
        Pointwise log-likelihood of the observed counts under the posterior draws
        (:func:`pointwise_log_likelihood`): the ``log_likelihood`` group (variable ``spikes``).

    Returns
    -------
    arviz.InferenceData
    """
    latent = ("z", "v", "rates")
    groups: dict[str, Any] = {
        "prior": _group(prior, latent),
        "prior_predictive": _group(prior, ("spikes",)),
        "posterior": _group(posterior, latent),
        "posterior_predictive": _group(posterior, ("spikes",)),
        "log_likelihood": None if log_likelihood is None else {"spikes": np.asarray(log_likelihood)[None]},
    }
    coords: dict[str, Any] = {}
    attrs = dict(attrs or {})
    if batch is not None:
        obs = batch.target.detach().cpu().numpy().astype(np.float64)
        mask = batch.mask.detach().cpu().numpy()
        obs[~mask] = np.nan
        groups["observed_data"] = {"spikes": obs}
        groups["constant_data"] = {"mask": mask.astype(np.int8)}
        attrs.update(n_heldin=batch.n_heldin, n_observed_bins=batch.n_observed_bins)
        coords["trial"] = batch.index.detach().cpu().numpy()
    sizes: dict[str, int] = {}
    for name, g in groups.items():
        for k, arr in (g or {}).items():
            dims = SITE_DIMS[k]
            for d, n in zip(dims, arr.shape[arr.ndim - len(dims):]):
                if sizes.setdefault(d, n) != n:
                    raise ValueError(
                        f"{name}.{k}: dimension {d!r} has size {n}, another group has {sizes[d]}; draw the prior "
                        "with n_trials=batch.n_trials and n_bins=batch.n_bins so the groups line up"
                    )
    for d in ("trial", "time", "neuron", "latent"):
        if d in sizes and d not in coords:
            coords[d] = np.arange(sizes[d])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        idata = az.from_dict(
            **{k: v for k, v in groups.items() if v is not None},
            coords=coords,
            dims={k: v for k, v in SITE_DIMS.items()},
            attrs=attrs,
        )
    return idata


def predictive_checks(
    model: Callable,
    guide: Optional[Callable],
    batch: Batch,
    n_samples: int = 100,
    n_prior_samples: Optional[int] = None,
    seed: Optional[int] = 0,
    sample_chunk: int = 25,
    trial_chunk: int = 256,
    log_likelihood: bool = True,
) -> az.InferenceData:
    """Prior and (when ``guide`` is given) posterior predictive draws for ``batch`` as InferenceData.

    The prior is drawn for as many trials and bins as ``batch`` has, so the groups line up.

    With a guide, the ``log_likelihood`` group holds the Poisson log-likelihood of every observed
    count under every posterior draw (NaN where ``batch.mask`` is False), so that ``az.loo(idata)``
    and ``az.waic(idata)`` run on it. The draws come from the guide ``q(z | held-in spikes)``, not
    from an exact posterior, and the model's parameters are point estimates: PSIS-LOO here is
    conditional on the guide (docs/evidence.md). To compare priors, use
    :func:`pyro_langevin.evidence.compare` on trials the fit never used.

    Parameters
    ----------
    model, guide : callable
        Fitted model and guide (``guide=None``: prior predictive only).
    batch : Batch
    n_samples : int
        Posterior draws S.
    n_prior_samples : int, optional
        Prior draws (default ``n_samples``).
    seed : int, optional
        Seeds Pyro's RNG before the prior draws.
    sample_chunk, trial_chunk : int
        Streaming sizes for the posterior draws.
    log_likelihood : bool
        Add the ``log_likelihood`` group (needs a guide; S x the batch's size in float32).

    Returns
    -------
    arviz.InferenceData
        Groups ``prior``, ``prior_predictive``, ``observed_data``, ``constant_data`` and, with a
        guide, ``posterior``, ``posterior_predictive`` and ``log_likelihood``.
    """
    prior = prior_predictive(model, batch.n_trials, batch.n_bins, n_prior_samples or n_samples, seed=seed)
    post, log_lik = None, None
    if guide is not None:
        sites = ("spikes", "rates", "z")
        post = posterior_predictive(model, guide, batch, n_samples, sites, sample_chunk=sample_chunk,
                                    trial_chunk=trial_chunk)
        if log_likelihood:
            log_lik = pointwise_log_likelihood(post["rates"], batch)
    return to_inference_data(batch, prior, post, log_likelihood=log_lik)


def save_netcdf(idata: az.InferenceData, path: Union[str, Path]) -> Path:
    """Write ``idata`` to NetCDF (h5netcdf engine) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path), engine="h5netcdf")
    return path
