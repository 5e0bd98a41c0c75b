"""Fit at coarser bins than the ones scored: a 5 ms run's model fits the same spikes summed into
20 ms bins, and its rates are interpolated back to 5 ms.

Why (docs/nlb.md, "Fitting 5 ms data at 20 ms"): on MC_Maze_Small, under 5-fold cross-validation
paired over the same folds, the five-member ensemble fitted at 20 ms and interpolated scored higher
5 ms co-bps and fp-bps than the one fitted at 5 ms, and the default run took 3.5 times less time
(6.6 against 23.2 minutes on 2 cores). Latent dynamics on a ~100 ms time scale lose little in
20 ms bins, while 5 ms bins give the model four times as many sequential steps, each with a
quarter of the counts.

* :func:`coarsen_data` sums counts over groups of bins (as NLB's own 20 ms files are binned from
  5 ms ones): a coarse bin is observed only where all of its fine bins are.
* :func:`upsample_rates` spreads each coarse bin's rate over its fine bins, linearly interpolated
  between coarse-bin centres (held flat beyond the first and last centre), so a trial's expected
  count over a coarse bin is kept up to the interpolation.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.nlb.data import BIN_SIZES, NLBData
from pyro_langevin.nlb.rebin import rebin_counts
from pyro_langevin.scoring import Rates
from pyro_langevin.spec import SpecError

__all__ = ["FIT_BIN_MS", "resolve_fit_bin", "coarsen_batch", "coarsen_data", "upsample_rates", "upsample"]

#: The bin width a run's model fits at, by the width it is scored at. 5 ms runs fit at 20 ms (the
#: cross-validated winner on MC_Maze_Small; the other datasets take it on that evidence).
FIT_BIN_MS = {5: 20, 20: 20}


def resolve_fit_bin(bin_ms: int, fit_bin_ms: Optional[int] = None) -> int:
    """The bin width the model fits at: ``fit_bin_ms``, or :data:`FIT_BIN_MS` of ``bin_ms``.

    Raises
    ------
    SpecError
        When ``fit_bin_ms`` is not an NLB bin width or not a whole multiple of ``bin_ms`` (a setting,
        not the data).
    """
    fit = FIT_BIN_MS.get(bin_ms, bin_ms) if fit_bin_ms is None else fit_bin_ms
    if isinstance(fit, bool) or fit not in BIN_SIZES or fit % bin_ms:
        raise SpecError(f"cannot fit {bin_ms} ms data at {fit_bin_ms!r} ms bins: the fitting bin width must be "
                           f"one of {BIN_SIZES} and a whole multiple of {bin_ms} ms")
    return int(fit)


def coarsen_batch(batch: Batch, factor: int) -> Batch:
    """Sum a batch's counts over consecutive groups of ``factor`` bins (observed and forward
    windows separately); a coarse entry is in the mask only where all of its fine entries are.
    Behaviour is averaged over each group."""
    t, f = batch.n_observed_bins, batch.n_forward_bins
    if t % factor or f % factor:
        raise NLBDataError(f"{t} observed + {f} forward bins cannot be summed in groups of {factor}; "
                           f"fit at the data's own bins (--fit-bin-ms equal to --bin-ms)")

    def coarse(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        return torch.as_tensor(rebin_counts(x.cpu().numpy(), factor, reduce))

    target = torch.where(batch.mask, batch.target, torch.zeros_like(batch.target))
    mask = coarse(batch.mask.to(torch.float32), "mean") == 1.0
    return Batch(input=coarse(batch.input), target=coarse(target), mask=mask, index=batch.index.clone(),
                 behavior=None if batch.behavior is None else coarse(batch.behavior, "mean"))


def coarsen_data(data: NLBData, bin_ms: int) -> NLBData:
    """``data`` with its training and evaluation batches summed into ``bin_ms`` bins (what a model
    fits on; scoring keeps the original ``data``). The eval target and the raw training behaviour
    are not carried over."""
    if bin_ms == data.bin_ms:
        return data
    if bin_ms % data.bin_ms:
        raise NLBDataError(f"{bin_ms} ms is not a whole multiple of the data's {data.bin_ms} ms bins")
    factor = bin_ms // data.bin_ms
    return NLBData(data.dataset, bin_ms, data.phase, coarsen_batch(data.train, factor),
                   coarsen_batch(data.eval, factor), source=data.source)


def upsample_rates(rates: np.ndarray, factor: int) -> np.ndarray:
    """Rates (counts per coarse bin), shape (trial, T, N), to counts per fine bin, (trial, T * factor, N).

    Each coarse value is placed at its bin's centre and divided by ``factor``; fine bins take the
    linear interpolation between the two nearest centres (the first and last value beyond the
    outermost centres).
    """
    rates = np.asarray(rates)
    n = rates.shape[1]
    u = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0, n - 1)  # fine-bin centres, coarse units
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (u - lo)[None, :, None]
    return ((1 - w) * rates[:, lo] + w * rates[:, hi]) / factor


def upsample(rates: Rates, factor: int) -> Rates:
    """:func:`upsample_rates` of both splits of a run's :class:`~pyro_langevin.nlb.scoring.Rates`."""
    if factor == 1:
        return rates
    return Rates(upsample_rates(rates.train, factor), upsample_rates(rates.eval, factor), rates.n_heldin,
                 rates.n_observed_bins * factor)
