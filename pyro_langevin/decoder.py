"""Decoder from the latent path to log-rates: a one-layer non-causal Transformer and a linear readout."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TransformerDecoder", "sinusoidal_encoding", "bound_log_rates"]

#: Log-rates are bounded smoothly to [MIN_LOG_RATE, MAX_LOG_RATE] (e^-12 ~ 6e-6 and e^12 ~ 1.6e5
#: counts per bin): a diverging step cannot overflow, a silent neuron cannot reach log(0), and unlike
#: a hard clamp the bound keeps a gradient everywhere.
MAX_LOG_RATE = 12.0
MIN_LOG_RATE = -12.0


def bound_log_rates(x: torch.Tensor, lo: float = MIN_LOG_RATE, hi: float = MAX_LOG_RATE) -> torch.Tensor:
    """Smooth two-sided bound: ``lo + softplus(x - lo)``, then ``hi - softplus(hi - .)``.

    Within a few units of the bounds' interior it is the identity to < 1e-2 (to 6e-6 at distance
    12), and its derivative is positive everywhere.
    """
    x = lo + F.softplus(x - lo)
    return hi - F.softplus(hi - x)


def sinusoidal_encoding(n_bins: int, d_model: int, device=None, dtype=None) -> torch.Tensor:
    """The standard sine/cosine positional encoding, shape (n_bins, d_model)."""
    pos = torch.arange(n_bins, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
    angle = pos / torch.pow(10000.0, i / d_model)
    enc = torch.zeros(n_bins, d_model, device=device)
    enc[:, 0::2] = torch.sin(angle)
    enc[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return enc if dtype is None else enc.to(dtype)


class TransformerDecoder(nn.Module):
    """Map the latent sequence ``[z_t, v_t]`` to log-rates of every neuron in every bin.

    Parameters
    ----------
    latent_dim : int
        D; the decoder reads ``2 D`` features per bin (position and velocity).
    n_neurons : int
        Held-in plus held-out neurons.
    d_model, n_heads, dim_feedforward : int
        Transformer sizes (one encoder layer, pre-norm, attending over all bins).
    dropout : float
    positional : {"sinusoidal", "none"}
        Add a sinusoidal positional encoding to the projected latents.
    """

    def __init__(
        self,
        latent_dim: int,
        n_neurons: int,
        d_model: int = 64,
        n_heads: int = 4,
        dim_feedforward: int = 128,
        dropout: float = 0.05,
        positional: Literal["sinusoidal", "none"] = "sinusoidal",
    ) -> None:
        super().__init__()
        if positional not in ("sinusoidal", "none"):
            raise ValueError(f"positional must be 'sinusoidal' or 'none', got {positional!r}")
        self.positional = positional
        self.project = nn.Linear(2 * latent_dim, d_model)
        self.layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, n_neurons)

    @torch.no_grad()
    def init_rates(self, mean_counts: torch.Tensor) -> None:
        """Set the readout bias to ``log(mean counts per bin)`` so training starts at the right scale."""
        self.readout.bias.copy_(torch.log(mean_counts.clamp_min(1e-3)).to(self.readout.bias))

    def forward(self, z: torch.Tensor, v: torch.Tensor, pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-rates of shape (..., trial, time, neuron) from ``z``, ``v`` of shape (..., trial, time, D).

        Leading dimensions (e.g. posterior draws in a ``pyro.plate("draws", S)``) are batched with the
        trials: the Transformer sees ``prod(...) * trial`` sequences. ``pad_mask`` (trial, time) or
        (..., trial, time), True where a bin is padding, broadcasts over them.
        """
        x = torch.cat(torch.broadcast_tensors(z, v), dim=-1)
        lead, (n_bins, width) = x.shape[:-2], x.shape[-2:]
        h = self.project(x.reshape(-1, n_bins, width))
        if self.positional == "sinusoidal":
            h = h + sinusoidal_encoding(h.shape[-2], h.shape[-1], device=h.device, dtype=h.dtype)
        if pad_mask is not None:
            pad_mask = pad_mask.expand(*lead, n_bins).reshape(-1, n_bins)
        h = self.norm(self.layer(h, src_key_padding_mask=pad_mask))
        out = bound_log_rates(self.readout(h))
        return out.reshape(*lead, n_bins, out.shape[-1])
