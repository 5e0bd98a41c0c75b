"""Posterior summaries by sampling the guide and replaying the model, streamed over samples and trials.

Several draws of a chunk of trials are one guide + model pass: inside ``pyro.plate("draws", k)``
when the model and guide broadcast over it (:func:`plate_supported`), else by tiling the trials.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import pyro
import torch
from pyro import poutine

from pyro_langevin.batch import Batch, BatchError

__all__ = ["posterior_means", "posterior_rates", "eval_mode", "check_posterior_inputs", "plate_supported"]


class eval_mode:
    """Context manager: put modules in eval mode (no dropout), restore their modes afterwards."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.modules = modules

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc) -> None:
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


def check_posterior_inputs(model: Callable, guide: Callable, batch: Batch, **counts: int) -> None:
    """Check ``batch`` (a valid :class:`Batch` whose sizes agree with the model's ``n_neurons`` and
    the guide's ``n_heldin``) and that each of ``counts`` (``n_samples=...``) is an int >= 1.

    Raises
    ------
    TypeError, BatchError, ValueError
        Each naming the field.
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"batch: expected a Batch (see pyro_langevin.make_batch), got {type(batch).__name__}")
    try:
        batch.validate()
    except BatchError as exc:
        raise BatchError(f"batch.{exc}") from exc
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    n_model = getattr(model, "n_neurons", None)
    if isinstance(n_model, int) and n_model != batch.n_neurons:
        raise BatchError(
            f"batch: {batch.n_neurons} neurons (held-in + held-out) but the model was built for n_neurons={n_model}"
        )
    n_guide = getattr(guide, "n_heldin", None)
    if isinstance(n_guide, int) and n_guide != batch.n_heldin:
        raise BatchError(f"batch: {batch.n_heldin} held-in neurons but the guide reads n_heldin={n_guide}")


def _draws_per_pass(n_trials: int, n_samples: int, max_tiled: int, draws_per_pass: Optional[int]) -> int:
    """Draws taken together for a chunk of ``n_trials``: as many as fit in ``max_tiled`` tiled trials."""
    if draws_per_pass is not None:
        return min(draws_per_pass, n_samples)
    return max(1, min(n_samples, max_tiled // n_trials))


#: The plate of posterior draws: outside ``"trials"`` (dim -1), as Pyro's ``vectorize_particles``.
DRAWS_PLATE, DRAWS_DIM = "draws", -2


def plate_supported(model: Callable, guide: Callable) -> bool:
    """Whether ``model`` and ``guide`` both declare ``supports_draws_plate`` (their sites broadcast over
    a leading draws dimension: :class:`~pyro_langevin.models.LangevinFlow` and the package's guides)."""
    return bool(getattr(model, "supports_draws_plate", False) and getattr(guide, "supports_draws_plate", False))


def _trace_draws(model: Callable, guide: Callable, chunk: Batch, k: int, plate: bool = False) -> "poutine.Trace":
    """One guide + model pass giving ``k`` draws of every trial of ``chunk``; the model trace, whose
    sites have shape (k, trial, ...).

    With ``plate`` the pass runs inside ``pyro.plate("draws", k, dim=-2)``; otherwise ``chunk`` is tiled
    ``k`` times along the trial axis (draw j of trial i is row j * n + i) and the values reshaped.
    Both take the same random numbers in the same order, so the draws agree up to float rounding.
    """
    if plate:
        with pyro.plate(DRAWS_PLATE, k, dim=DRAWS_DIM):
            guide_trace = poutine.trace(guide).get_trace(chunk)
            return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(chunk)
    n = chunk.n_trials
    if k > 1:
        # Batch indexing keeps ``index`` (the mean-field guide keys on it)
        chunk = chunk[torch.arange(n, device=chunk.device).repeat(k)]
    guide_trace = poutine.trace(guide).get_trace(chunk)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(chunk)
    for node in trace.nodes.values():
        value = node.get("value")
        if node["type"] == "sample" and isinstance(value, torch.Tensor) and value.shape[:1] == (k * n,):
            node["value"] = value.reshape(k, n, *value.shape[1:])
    return trace


class _Moments:
    """Running count, mean and (optionally) sum of squared deviations, merged a block of draws at a time.

    Blocks are merged with Chan et al.'s parallel update, which for one-draw blocks is Welford's.
    Float64 sites stay float64; everything else is summed in float32.
    """

    def __init__(self, with_m2: bool) -> None:
        self.with_m2 = with_m2
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, draws: torch.Tensor) -> None:
        """Merge ``draws`` of shape (k, trial, ...): ``k`` draws of every trial."""
        draws = draws.to(torch.float64 if draws.dtype == torch.float64 else torch.float32)
        k = draws.shape[0]
        block_mean = draws.mean(0)
        block_m2 = (draws - block_mean).square_().sum(0) if self.with_m2 else None
        if self.mean is None:
            self.count, self.mean, self.m2 = k, block_mean, block_m2
            return
        total = self.count + k
        delta = block_mean - self.mean
        self.mean.add_(delta, alpha=k / total)
        if self.with_m2:
            self.m2.add_(block_m2).add_(delta.square_(), alpha=self.count * k / total)
        self.count = total

    def std(self) -> torch.Tensor:
        """Population standard deviation of the draws so far (zeros for one draw)."""
        return (self.m2 / self.count).sqrt()


def _chunk_moments(
    model: Callable, guide: Callable, chunk: Batch, sites: tuple[str, ...], n_samples: int, per_pass: int,
    return_std: bool, check_finite: bool, start: int, plate: bool = False,
) -> dict[str, _Moments]:
    """Moments of ``sites`` over ``n_samples`` draws of ``chunk``, ``per_pass`` draws a pass."""
    n = chunk.n_trials
    moments = {s: _Moments(return_std) for s in sites}
    for first in range(0, n_samples, per_pass):
        k = min(per_pass, n_samples - first)
        model_trace = _trace_draws(model, guide, chunk, k, plate)
        for s in sites:
            if s not in model_trace.nodes:
                available = [name for name, node in model_trace.nodes.items() if node["type"] == "sample"]
                raise KeyError(f"site {s!r} is not in the model; its sites are {available}")
            draws = model_trace.nodes[s]["value"]
            if draws.shape[:2] != (k, n):
                raise ValueError(f"site {s!r} has shape {tuple(draws.shape)}; expected {k} draws of {n} trials "
                                 "first (every site inside the 'trials' plate)")
            if check_finite:
                finite = torch.isfinite(draws).flatten(1).all(1)
                if not bool(finite.all()):
                    bad = first + int((~finite).nonzero()[0])
                    raise FloatingPointError(
                        f"posterior draw {bad} of site {s!r} has NaN or infinite values for trials "
                        f"{start}..{start + n - 1}; the fitted parameters or the guide are broken"
                    )
            moments[s].add(draws)
        # drop this pass's traces now: otherwise they stay alive while the next pass is
        # built, and the peak holds two passes' intermediates (measured: ~2x at S > 1)
        del model_trace, draws
    return moments


@torch.no_grad()
def posterior_means(
    model: Callable,
    guide: Callable,
    batch: Batch,
    sites: Sequence[str] = ("rates",),
    n_samples: int = 50,
    batch_size: int = 256,
    *,
    return_std: bool = False,
    check_finite: bool = True,
    max_tiled: Optional[int] = None,
    draws_per_pass: Optional[int] = None,
    share_encoder: bool = True,
    draws_plate: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """Mean over ``n_samples`` posterior draws of deterministic model sites (e.g. ``rates``, ``z``).

    Trials are taken in chunks of ``batch_size``; several draws of a chunk are taken in one
    vectorised guide + model pass: ``k`` draws of the chunk are one pass inside
    ``pyro.plate("draws", k, dim=-2)`` (as Pyro's ``vectorize_particles``) when the model and guide
    support it (:func:`plate_supported`: LangevinFlow and every guide of the package), else ``k``
    copies of the chunk's trials tiled along the trial axis (independent draws, since every site is
    inside the ``"trials"`` plate; the same random numbers as the plate). At most ``max_tiled``
    draws x trials are traced at once. Memory is bounded by ``max_tiled`` and
    does not grow with ``n_samples``: only running means (and, with ``return_std``, running sums of
    squared deviations) of one chunk are kept. Dropout is off while sampling. Quantiles are not
    offered: they need every draw at once, which is exactly the memory this function avoids.

    Parameters
    ----------
    model, guide : callable
        ``model(batch)`` and ``guide(batch)``; the guide's draws are replayed through the model.
        Trials must be independent given the parameters (true of every guide in
        ``pyro_langevin.guides``), so that a tiled batch gives independent draws.
    batch : Batch
        Trials to summarise (validated first).
    sites : sequence of str
        Deterministic (or sample) sites of the model to average; trial is their first dimension.
    n_samples : int
        Posterior draws per trial (reference: 50).
    batch_size : int
        Trials per chunk.
    return_std : bool
        Also return ``"<site>_std"``: the standard deviation over the draws (population form,
        merged a pass at a time with Chan's parallel update; zeros for one draw).
    check_finite : bool
        Raise ``FloatingPointError`` (naming the site, draw and trials) when a draw is NaN or
        infinite, instead of returning non-finite rates.
    max_tiled : int, optional
        Most tiled trials (chunk trials x draws) in one pass; default ``batch_size``, so the memory
        bound ``batch_size`` always gave holds. Raise it to vectorise more draws (about 1 MiB per
        tiled trial at MC_Maze size, 180 bins x 142 neurons, latent 32).
    draws_per_pass : int, optional
        Draws per pass, overriding ``max_tiled``; 1 is the per-draw loop (one pass per draw, the
        random stream of earlier versions).
    share_encoder : bool
        Let a guide with ``shared_context`` (a :class:`~pyro_langevin.guides.StepwiseGuide` whose
        ``deterministic_prepare`` is True: every guide of the package) run its encoder once per
        chunk of trials rather than once per draw; its output is the same
        in eval mode, so the draws are unchanged up to float rounding. ``False`` re-encodes every
        pass (the behaviour before).
    draws_plate : bool, optional
        Draws in a ``"draws"`` plate (True) or by tiled trials (False); default: the plate when
        :func:`plate_supported`. The two give the same draws for the same seed up to float rounding.

    Returns
    -------
    dict of site name -> tensor on the CPU, shape (trial, time, ...)

    Raises
    ------
    BatchError
        Invalid ``batch``, or one whose sizes disagree with the model or guide.
    KeyError
        A requested site is not in the model.
    FloatingPointError
        A non-finite draw (with ``check_finite``).
    """
    check_posterior_inputs(model, guide, batch, n_samples=n_samples, batch_size=batch_size)
    for name, value in (("max_tiled", max_tiled), ("draws_per_pass", draws_per_pass)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    max_tiled = batch_size if max_tiled is None else max_tiled
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    if not sites:
        raise ValueError("sites: give at least one model site name (e.g. 'rates')")
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    stds: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    modules = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    chunk_size = min(batch_size, max_tiled)
    plate = plate_supported(model, guide) if draws_plate is None else bool(draws_plate)
    with eval_mode(*modules):
        for start in range(0, batch.n_trials, chunk_size):
            chunk = batch[start : start + chunk_size]
            n = chunk.n_trials
            per_pass = _draws_per_pass(n, n_samples, max_tiled, draws_per_pass)
            # a StepwiseGuide runs its encoder (deterministic in eval mode) once per chunk, not per draw
            share = getattr(guide, "shared_context", None) if share_encoder else None
            with share(chunk) if share is not None else nullcontext():
                moments = _chunk_moments(model, guide, chunk, sites, n_samples, per_pass, return_std, check_finite, start,
                                         plate)
            for s in sites:
                out[s].append(moments[s].mean.cpu())
                if return_std:
                    stds[s].append(moments[s].std().cpu())
    result = {s: torch.cat(v) for s, v in out.items()}
    if return_std:
        result.update({f"{s}_std": torch.cat(v) for s, v in stds.items()})
    return result


def posterior_rates(
    model: Callable, guide: Callable, batch: Batch, n_samples: int = 50, batch_size: int = 256
) -> torch.Tensor:
    """Posterior-mean rates (expected counts per bin), shape (trial, T + F, neuron), on the CPU."""
    return posterior_means(model, guide, batch, ("rates",), n_samples, batch_size)["rates"]
