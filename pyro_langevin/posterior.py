"""Posterior summaries by sampling the guide and replaying the model, streamed over samples and trials."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from pyro import poutine

from pyro_langevin.batch import Batch

__all__ = ["posterior_means", "posterior_rates", "eval_mode"]


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


@torch.no_grad()
def posterior_means(
    model: Callable,
    guide: Callable,
    batch: Batch,
    sites: Sequence[str] = ("rates",),
    n_samples: int = 50,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Mean over ``n_samples`` posterior draws of deterministic model sites (e.g. ``rates``, ``z``).

    Memory does not grow with ``n_samples``: draws are taken one at a time and trials in chunks of
    ``batch_size``; only running sums are kept. Dropout is off while sampling.

    Returns
    -------
    dict of site name -> tensor on the CPU, shape (trial, time, ...)
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    modules = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    with eval_mode(*modules):
        for start in range(0, batch.n_trials, batch_size):
            chunk = batch[start : start + batch_size]
            sums: dict[str, Optional[torch.Tensor]] = {s: None for s in sites}
            for _ in range(n_samples):
                guide_trace = poutine.trace(guide).get_trace(chunk)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(chunk)
                for s in sites:
                    value = model_trace.nodes[s]["value"]
                    sums[s] = value.clone() if sums[s] is None else sums[s].add_(value)
            for s in sites:
                out[s].append((sums[s] / n_samples).cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def posterior_rates(model: Callable, guide: Callable, batch: Batch, n_samples: int = 50, batch_size: int = 256) -> torch.Tensor:
    """Posterior-mean rates (expected counts per bin), shape (trial, T + F, neuron), on the CPU."""
    return posterior_means(model, guide, batch, ("rates",), n_samples, batch_size)["rates"]
