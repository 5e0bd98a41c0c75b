"""LangevinFlow over several sessions: one latent prior and decoder core, a read-out per session.

:class:`StitchedFlow` is a :class:`~pyro_langevin.models.LangevinFlow` whose potential, transition
and Transformer decoder are shared by every session, and whose last layer is a per-session
read-out (:class:`SessionReadout`: the decoder's features -> the session's units, with the session's
own log-rate bias). It reads a stitched :class:`~pyro_langevin.batch.Batch` laid out by a
:class:`~pyro_langevin.sessions.SessionLayout` (every session's units side by side, each trial
belonging to the session its ``index`` names). Latent sites are those of the one-session model
(``z_0``, ``v_t`` in the ``"trials"`` plate), so every guide's sampling loop fits it unchanged;
each session's spikes are their own observed site ``spikes_<name>`` (its units' columns, masked to
its trials), and the ``rates`` site predicts every session's units for every trial (a trial of
session A seen through session B's read-out: cross-session prediction).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_langevin.batch import Batch
from pyro_langevin.decoder import TransformerDecoder
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.sessions import SessionLayout

__all__ = ["SessionReadout", "StitchedDecoder", "StitchedFlow", "observation_site"]


def observation_site(name: str) -> str:
    """Name of session ``name``'s observed spikes site (``"spikes_<name>"``)."""
    return f"spikes_{name}"


class SessionReadout(nn.Module):
    """One ``Linear(d_model, n_units)`` per session (``sessions[name]``), output in the layout's columns."""

    def __init__(self, d_model: int, layout: SessionLayout) -> None:
        super().__init__()
        self.sessions = nn.ModuleDict({s.name: nn.Linear(d_model, s.n_units) for s in layout.sessions})
        # column j of the stitched layout is column gather[j] of the sessions' outputs side by side
        order = np.concatenate([layout.columns(i) for i in range(len(layout.sessions))])
        self.register_buffer("gather", torch.as_tensor(np.argsort(order), dtype=torch.long), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.cat([lin(h) for lin in self.sessions.values()], dim=-1)
        return out.index_select(-1, self.gather)

    @property
    def bias(self) -> torch.Tensor:
        """Every session's log-rate bias in the layout's columns (a new tensor)."""
        return torch.cat([lin.bias for lin in self.sessions.values()]).index_select(0, self.gather)

    @torch.no_grad()
    def set_bias(self, log_rates: torch.Tensor) -> None:
        """Set the biases from log-rates given in the layout's columns."""
        start = 0
        ordered = log_rates.new_empty(log_rates.shape)
        ordered[self.gather] = log_rates
        for lin in self.sessions.values():
            n = lin.bias.shape[0]
            lin.bias.copy_(ordered[start:start + n].to(lin.bias))
            start += n


class StitchedDecoder(TransformerDecoder):
    """The Transformer decoder with a :class:`SessionReadout` as its last layer."""

    def __init__(self, latent_dim: int, layout: SessionLayout, **kwargs: Any) -> None:
        super().__init__(latent_dim, 1, **kwargs)
        self.readout = SessionReadout(self.norm.normalized_shape[0], layout)

    @torch.no_grad()
    def init_rates(self, mean_counts: torch.Tensor) -> None:
        self.readout.set_bias(torch.log(mean_counts.clamp_min(1e-3)))


class StitchedFlow(LangevinFlow):
    """LangevinFlow with a shared prior and decoder core and a read-out per session (module docstring).

    Parameters
    ----------
    layout : SessionLayout
        The sessions (names, unit counts, trial-id ranges).
    latent_dim, **kwargs
        As :class:`~pyro_langevin.models.LangevinFlow` (``decoder_kwargs`` go to the shared decoder).

    Notes
    -----
    Parameter names: the shared ones are the one-session model's (``potential.*``, ``dynamics.*``,
    ``decoder.project``/``layer``/``norm``); session ``s``'s read-out is ``decoder.readout.sessions.<s>.*``.
    """

    def __init__(self, layout: SessionLayout, latent_dim: int = 16, *,
                 decoder_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(layout.n_neurons, latent_dim, decoder_kwargs=decoder_kwargs, **kwargs)
        self.layout = layout
        self.decoder = StitchedDecoder(latent_dim, layout, **(decoder_kwargs or {}))

    def session_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Session ``name``'s own parameters (its read-out), by their names in the model."""
        return {k: p for k, p in self.named_parameters() if k.startswith(f"decoder.readout.sessions.{name}.")}

    def observe(self, rates: torch.Tensor, batch: Optional[Batch]) -> torch.Tensor:
        """One observed site per session: ``spikes_<name>`` over the session's units (event dims (time,
        unit)), masked to the batch's trials of that session. A session without trials in the batch
        has no site. Without a batch, every session's units are sampled for every trial."""
        layout = self.layout
        if batch is None:
            return torch.cat([pyro.sample(observation_site(s.name), dist.Poisson(
                rates[..., torch.as_tensor(layout.columns(i), device=rates.device)]).to_event(2))
                for i, s in enumerate(layout.sessions)], dim=-1)
        observed = torch.where(batch.mask, batch.target, torch.zeros_like(batch.target))
        session = layout.session_of(batch.index.to(rates.device))
        for i, s in enumerate(layout.sessions):
            mine = session == i
            if not bool(mine.any()):
                continue
            cols = torch.as_tensor(layout.columns(i), device=rates.device)
            mask = batch.mask.index_select(-1, cols) & mine[:, None, None]
            pyro.sample(observation_site(s.name), dist.Poisson(rates.index_select(-1, cols)).mask(mask).to_event(2),
                        obs=observed.index_select(-1, cols))
        return observed
