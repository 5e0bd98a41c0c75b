"""Training-time augmentation of a :class:`~pyro_langevin.batch.Batch` (besides coordinated dropout).

:func:`temporal_shift` moves each neuron's spike train of each trial by a few bins, so that the
model cannot lean on the exact relative timing of neurons in the few training trials of a small
dataset. lfads-torch's ``TemporalShift`` draws separate shifts for the encoder's input and the
reconstruction target; here one shift per (trial, neuron) moves both, and the forward bins with
the observed ones (shifting the observed bins alone cost 0.03 fp-bps under cross-validation, see
docs/nlb.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from pyro_langevin.batch import Batch

__all__ = ["temporal_shift", "draw_shifts"]


def draw_shifts(shape: tuple[int, ...], std: float, max_shift: int,
                generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """Integer shifts ``round(N(0, std))`` clamped to ``[-max_shift, max_shift]``, of ``shape``, as a long tensor."""
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=gen_device)
    return (noise * std).round().clamp(-max_shift, max_shift).long().to(device)


def temporal_shift(batch: Batch, std: float, max_shift: int, generator: Optional[torch.Generator] = None) -> Batch:
    """Shift each (trial, neuron) spike train by its own whole number of bins.

    Parameters
    ----------
    batch : Batch
        Training trials (before coordinated dropout: ``input`` equals the target's held-in columns).
    std : float
        Standard deviation of the shifts, in bins (0 returns ``batch`` unchanged).
    max_shift : int
        Largest shift, in bins, either way.
    generator : torch.Generator, optional
        Source of the shifts (the global RNG when None).

    Returns
    -------
    Batch
        The shifted batch. A neuron shifted by ``s`` bins holds, at bin ``t``, what it emitted at
        ``t - s``, over the observed and forward bins together (so its forward bins stay in time
        with its observed ones). Target bins a shift would read from outside the trial (before bin 0
        or past the last forward bin) are left out of the likelihood (``mask`` False): they are not
        observations. The input's held-in neurons move with their target columns, so the guide
        reads the train the likelihood scores, but the guide never reads data it would not have at
        test time: an input bin whose source lies outside the observed window (before bin 0 for a
        positive shift, in the forward window for a negative one) is hidden from it, i.e. zero, as
        coordinated dropout hides entries (nothing is fabricated in its place), while the target
        there keeps the real forward counts. ``behavior`` is not shifted.
    """
    if std < 0 or max_shift < 0:
        raise ValueError(f"temporal_shift: std and max_shift must be >= 0, got std={std!r}, max_shift={max_shift!r}")
    if std == 0 or max_shift == 0:
        return batch
    n, t, n_all, n_in = batch.n_trials, batch.n_observed_bins, batch.n_neurons, batch.n_heldin
    span, dev = batch.n_bins, batch.device
    shifts = draw_shifts((n, 1, n_all), std, max_shift, generator, dev)
    source = torch.arange(span, device=dev).view(1, span, 1) - shifts  # (trial, bin, neuron): the bin each entry reads
    index = source.clamp(0, span - 1)
    target = torch.gather(batch.target, 1, index)
    mask = torch.gather(batch.mask, 1, index) & (source >= 0) & (source < span)
    # the guide reads only observed held-in bins: an input whose source is before the trial or in the
    # forward window is hidden (zero), never filled with a neighbouring bin's count
    source_in = source[:, :t, :n_in].expand(n, t, n_in)
    read = torch.gather(batch.input, 1, index[:, :t, :n_in].clamp(max=t - 1).expand(n, t, n_in))
    shifted_input = torch.where((source_in >= 0) & (source_in < t), read, torch.zeros_like(read))
    return replace(batch, input=shifted_input, target=target, mask=mask)
