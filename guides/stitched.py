"""Any guide of the package over several sessions: a read-in per session in front of its shared core.

:class:`StitchedGuide` wraps a guide built for ``layout.readin_dim`` input features (its GRU,
heads and per-step laws are shared by every session) and gives each session a read-in: a
``Linear`` from the session's held-in units' encoder features (``log1p`` counts,
:func:`~pyro_langevin.inputs.encoder_features`) to the shared features. The wrapped guide then reads
a batch whose encoder features are the read-in's output (:func:`~pyro_langevin.inputs.counts_with_features`
carries them in the count-scale ``input``), so only its read-in changes. The read-in is linear in
the encoder features, so coordinated dropout's rescaling keeps its expectation, as for one session.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from pyro_langevin.batch import Batch
from pyro_langevin.inputs import counts_with_features, encoder_features
from pyro_langevin.registration import PyroRegistered
from pyro_langevin.sessions import SessionLayout

__all__ = ["StitchedGuide"]


class StitchedGuide(PyroRegistered):
    """Per-session read-ins in front of a shared guide (see the module docstring).

    Parameters
    ----------
    inner : nn.Module
        A guide of the stitched model reading ``layout.readin_dim`` held-in "neurons" (e.g.
        ``GRUGuide(model, layout.readin_dim)``); it registers its own parameters.
    layout : SessionLayout
        Sessions, read-in width, whether the read-ins train (``requires_grad``), their initial values.
    """

    def __init__(self, inner: nn.Module, layout: SessionLayout) -> None:
        super().__init__()
        self.inner = inner
        self.layout = layout
        self.n_heldin = layout.n_heldin
        self.readin = nn.ModuleDict({s.name: nn.Linear(s.n_heldin, layout.readin_dim) for s in layout.sessions})
        with torch.no_grad():
            for name, init in (layout.readin_init or {}).items():
                self.readin[name].weight.copy_(torch.as_tensor(init["weight"]))
                self.readin[name].bias.copy_(torch.as_tensor(init["bias"]))
        self.readin.requires_grad_(layout.train_readin)
        self.deterministic_prepare = getattr(inner, "deterministic_prepare", False)
        self.supports_draws_plate = getattr(inner, "supports_draws_plate", False)

    def pyro_parameters(self):
        return self.readin.named_parameters(prefix="readin")

    def features(self, batch: Batch) -> torch.Tensor:
        """The shared input features (trial, T, readin_dim): each trial through its session's read-in."""
        x = encoder_features(batch.input)
        session = self.layout.session_of(batch.index.to(x.device))
        out = x.new_zeros(*x.shape[:2], self.layout.readin_dim)
        for i, s in enumerate(self.layout.sessions):
            rows = (session == i).nonzero().squeeze(-1)
            if rows.numel():
                cols = torch.as_tensor(self.layout.heldin_columns(i), device=x.device)
                out = out.index_copy(0, rows, self.readin[s.name](x.index_select(0, rows).index_select(-1, cols)))
        return out

    def shared_batch(self, batch: Batch) -> Batch:
        """``batch`` as the wrapped guide reads it: the read-in features as its (count-scale) input."""
        return Batch(input=counts_with_features(self.features(batch)), target=batch.target, mask=batch.mask,
                     index=batch.index, behavior=batch.behavior)

    def forward(self, batch: Batch) -> None:
        self.register_params()
        return self.inner(self.shared_batch(batch))

    @contextmanager
    def shared_context(self, batch: Batch) -> Iterator[None]:
        """The wrapped guide's ``shared_context`` on the read-in batch (posterior draws share one encoder pass)."""
        with self.inner.shared_context(self.shared_batch(batch)):
            yield
