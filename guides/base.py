"""Shared pieces of the ablation guides: the per-step loop over a model's latent sites and encoder heads.

Every guide here has the model's signature ``guide(batch)`` and samples exactly the model's latent
sites: ``z_0``, ``v_0`` and ``v_1 .. v_{T+F-1}`` inside the ``"trials"`` plate. The loop lives in
:class:`StepwiseGuide`; a subclass only says

* what it computes once per batch (:meth:`StepwiseGuide.prepare`, e.g. encoder states),
* the law of ``(z_0, v_0)`` (:meth:`StepwiseGuide.initial`), and
* the law of ``v_t`` in an observed bin (:meth:`StepwiseGuide.step`); returning ``None`` there, and
  in every forward bin (no data), means "use the prior transition ``model.transition``".
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import pyro
import pyro.distributions as dist
from pyro import poutine
import torch
from torch import nn
from torch.nn import functional as F

from pyro_langevin.batch import Batch
from pyro_langevin.inputs import encoder_features
from pyro_langevin.models.langevin_flow import LangevinFlow, velocity_site
from pyro_langevin.registration import PyroRegistered, traced_value
from pyro_langevin.transition import TransitionOutput

__all__ = ["StepwiseGuide", "EncoderGuide", "GRUEncoder", "InitialStateHead", "ForceHead", "shifted_prior"]

#: ``softplus(_SOFTPLUS_ONE) == 1``: initial scales start at one.
_SOFTPLUS_ONE = math.log(math.e - 1.0)


class StepwiseGuide(PyroRegistered):
    """Base class: the per-step loop over ``z_0``, ``v_0``, ``v_1 .. v_{T+F-1}``.

    Every call registers the guide's own parameters with Pyro under its ``pyro_name`` (see
    :mod:`pyro_langevin.registration`), so ``pyro.infer.SVI`` trains them; the model registers its
    own when it runs.

    Parameters
    ----------
    model : LangevinFlow
        Held by plain reference (not a submodule), so ``guide.parameters()`` does not repeat the
        model's parameters and ``fit`` optimises each parameter once.
    """

    #: :meth:`prepare` draws no random numbers in eval mode, so :meth:`shared_context` may reuse it.
    #: False here (a subclass may draw in ``prepare``); the package's guides set it True.
    deterministic_prepare: bool = False
    #: :meth:`initial` and :meth:`step` broadcast over a leading draws dimension of ``z`` and ``v``
    #: (inside ``pyro.plate("draws", S, dim=-2)``: ``posterior_means`` takes S draws in one pass).
    #: False here (a subclass may concatenate per-trial features with the state); the package's
    #: guides set it True. Without it, ``posterior_means`` tiles the trials instead.
    supports_draws_plate: bool = False

    def __init__(self, model: LangevinFlow) -> None:
        super().__init__()
        self.__dict__["prior"] = model
        self.samples_initial = True
        self._shared: Optional[tuple[int, Any]] = None

    def steps_only(self) -> "StepwiseGuide":
        """Leave ``z_0`` and ``v_0`` to another guide part; sample ``v_1 ..`` only. Returns ``self``.

        For a composite guide whose other part owns the initial state::

            guide = AutoGuideList(model)
            guide.append(AutoNormal(poutine.block(model, expose=["z_0", "v_0"])))
            guide.append(GRUGuide(model, n_heldin).steps_only())

        The per-step laws still condition on the sampled ``z_0``, ``v_0``, read from the enclosing
        trace (:func:`~pyro_langevin.registration.traced_value`), so the parts together are the
        joint ``q(z_0, v_0) prod_t q(v_t | z_{t-1}, v_{t-1})`` and the ELBO stays valid.
        """
        self.samples_initial = False
        return self

    @contextmanager
    def shared_context(self, batch: Batch) -> Iterator[None]:
        """Run :meth:`prepare` on ``batch`` once; inside the block, calls on tiled copies reuse it.

        For several posterior draws of the same trials in eval mode (``posterior_means``): the
        encoder is deterministic there, so ``k`` draws need one encoder pass, not ``k``. Inside the
        block every call must be on ``k`` copies of ``batch`` stacked draw-major along the trial
        axis (``batch[arange(n).repeat(k)]``); the prepared tensors are tiled the same way. A
        subclass whose :meth:`prepare` returns anything but tensors (or a tuple of tensors) with
        trials first, or that leaves :attr:`deterministic_prepare` False, is not shared: its calls
        prepare as usual.

        Raises
        ------
        RuntimeError
            In training mode: dropout would give every copy the same mask.
        """
        if self.training:
            raise RuntimeError("shared_context needs eval mode (guide.eval()): with dropout on, the copies would share one mask")
        ctx = self.prepare(batch) if self.deterministic_prepare else None
        self._shared = (batch.n_trials, ctx) if _tileable(ctx, batch.n_trials) else None
        try:
            yield
        finally:
            self._shared = None

    def _context(self, batch: Batch) -> Any:
        """:meth:`prepare` of ``batch``, or the shared context tiled to ``batch`` (see :meth:`shared_context`)."""
        shared = getattr(self, "_shared", None)  # absent on guides unpickled from older versions
        if shared is None:
            return self.prepare(batch)
        n, ctx = shared
        if batch.n_trials % n:
            raise ValueError(f"inside shared_context the batch must be copies of the prepared {n} trials, got {batch.n_trials}")
        return _tile(ctx, batch.n_trials // n)

    # ----- what subclasses say ---------------------------------------------------------------
    def prepare(self, batch: Batch) -> Any:
        """Per-batch context handed to :meth:`initial` and :meth:`step` (default: the batch)."""
        return batch

    def initial(self, ctx: Any, batch: Batch) -> tuple[dist.Distribution, dist.Distribution]:
        """Laws of ``z_0`` and ``v_0``, each with batch shape (trial,) and event shape (D,)."""
        raise NotImplementedError

    def step(
        self, t: int, z: torch.Tensor, v: torch.Tensor, prior: TransitionOutput, ctx: Any
    ) -> Optional[dist.Distribution]:
        """Law of ``v_t`` in observed bin ``t >= 1`` given the sampled ``z_{t-1}``, ``v_{t-1}``.

        ``prior`` is the model's transition from ``(z, v)``. Return ``None`` to use the prior.
        """
        return None

    # ----- the loop ----------------------------------------------------------------------------
    def forward(self, batch: Batch) -> None:
        """Sample every latent site of ``self.prior`` for ``batch`` (observed and forward bins), all
        but ``z_0`` and ``v_0`` after :meth:`steps_only`."""
        self.register_params()
        model = self.prior
        ctx = self._context(batch)
        n_obs = batch.n_observed_bins
        if self.samples_initial:
            trials = pyro.plate("trials", batch.n_trials, dim=-1)
        else:
            # The part that sampled z_0 has recorded the plate's site in this trace already; a second
            # plate of the same name must not record it again (it would clash with that site).
            with poutine.block():
                trials = pyro.plate("trials", batch.n_trials, dim=-1)
        with trials:
            if self.samples_initial:
                q_z0, q_v0 = self.initial(ctx, batch)
                z = pyro.sample("z_0", q_z0)
                v = pyro.sample(velocity_site(0), q_v0)
            else:
                z, v = traced_value("z_0"), traced_value(velocity_site(0))
            transition = model.transition_fn()
            for t in pyro.markov(range(1, batch.n_bins)):
                prior = transition(z, v)
                q = self.step(t, z, v, prior, ctx) if t < n_obs else None
                if q is None:
                    q = dist.Normal(prior.v_loc, prior.v_scale).to_event(1)
                z = prior.z_next
                v = pyro.sample(velocity_site(t), q)


def _tileable(ctx: Any, n: int) -> bool:
    """Whether ``ctx`` is a tensor, or a tuple of tensors, with ``n`` trials first."""
    parts = ctx if isinstance(ctx, tuple) else (ctx,)
    return all(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == n for x in parts)


def _tile(ctx: Any, k: int) -> Any:
    """``k`` copies of every tensor of ``ctx`` stacked along dim 0 (draw-major, as the tiled batch)."""
    if k == 1:
        return ctx
    if isinstance(ctx, tuple):
        return tuple(_tile(x, k) for x in ctx)
    return ctx.repeat(k, *([1] * (ctx.dim() - 1)))


class GRUEncoder(nn.Module):
    """A GRU over the held-in spikes (``log1p`` counts), one or both directions.

    Returns per-bin features ``h`` (trial, T, F) and a trial summary ``h_ic`` (trial, F) for the
    initial state: the last state of each direction (the backward direction's last state has read
    the whole trial from the end to bin 0). ``F = hidden * (2 if bidirectional else 1)``.
    In the bidirectional case ``h_t`` has read the whole trial (a smoothing posterior). With
    ``reverse=True`` a one-directional GRU reads the trial from its last bin to bin 0 (``h`` is
    returned in time order; ``h_ic`` has read the whole trial).
    """

    def __init__(
        self, n_heldin: int, hidden: int = 64, bidirectional: bool = True, dropout: float = 0.05, reverse: bool = False
    ) -> None:
        super().__init__()
        self.n_heldin = n_heldin
        self.reverse = reverse
        self.gru = nn.GRU(n_heldin, hidden, batch_first=True, bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.out_features = hidden * (2 if bidirectional else 1)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.n_heldin != self.n_heldin:
            raise ValueError(f"guide reads {self.n_heldin} held-in neurons, batch has {batch.n_heldin}")
        x = self.dropout(encoder_features(batch.input))
        if self.reverse:
            x = x.flip(1)
        h, h_last = self.gru(x)  # h_last: (directions, trial, hidden)
        if self.reverse:
            h = h.flip(1)
        h_ic = torch.cat(list(h_last), dim=-1)
        return self.dropout(h), self.dropout(h_ic)


class InitialStateHead(nn.Module):
    """Gaussian ``q(z_0)``, ``q(v_0)`` from features; starts near the prior ``N(0, I)``."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Linear(in_features, 4 * latent_dim)
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.zero_()
            self.net.bias[2 * latent_dim:].fill_(_SOFTPLUS_ONE)

    def forward(self, h: torch.Tensor) -> tuple[dist.Distribution, dist.Distribution]:
        z_loc, v_loc, z_raw, v_raw = self.net(h).split(self.latent_dim, dim=-1)
        q_z = dist.Normal(z_loc, F.softplus(z_raw) + 1e-4).to_event(1)
        q_v = dist.Normal(v_loc, F.softplus(v_raw) + 1e-4).to_event(1)
        return q_z, q_v


class ForceHead(nn.Module):
    """Learned stochastic force and log scale-factor on top of the prior transition.

    ``q(v_t) = Normal(prior_loc + u, prior_scale * exp(r))`` with ``(u, r) = net(features)``. The
    last layer is zero-initialised, so ``q`` starts equal to the prior transition.

    Parameters
    ----------
    in_features : int
    latent_dim : int
    hidden : int
        0 for a linear head; otherwise a one-hidden-layer MLP (tanh) of this width.
    """

    def __init__(self, in_features: int, latent_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        last = nn.Linear(hidden or in_features, 2 * latent_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = last if hidden == 0 else nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), last)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(force, log_scale)``, each (..., D)."""
        force, log_scale = self.net(features).split(self.latent_dim, dim=-1)
        return force, log_scale.clamp(-7.0, 5.0)


def shifted_prior(prior: TransitionOutput, force: torch.Tensor, log_scale: torch.Tensor) -> dist.Distribution:
    """``Normal(prior.v_loc + force, prior.v_scale * exp(log_scale))`` with event shape (D,)."""
    return dist.Normal(prior.v_loc + force, prior.v_scale * torch.exp(log_scale)).to_event(1)


class EncoderGuide(StepwiseGuide):
    """A :class:`StepwiseGuide` whose context is a :class:`GRUEncoder`'s output.

    ``q(z_0, v_0)`` comes from the encoder's trial summary through an :class:`InitialStateHead`.
    Subclasses add a per-step law in :meth:`step` (this class alone uses the prior transition for
    every ``v_t``, t >= 1).

    Parameters
    ----------
    model : LangevinFlow
    n_heldin : int
        Neurons the guide reads.
    hidden : int
        GRU state size (per direction).
    bidirectional : bool
        Read the trial in both directions.
    dropout : float
    """

    deterministic_prepare = True
    supports_draws_plate = True

    def __init__(
        self, model: LangevinFlow, n_heldin: int, hidden: int = 64, bidirectional: bool = True, dropout: float = 0.05
    ) -> None:
        super().__init__(model)
        self.n_heldin, self.hidden = n_heldin, hidden
        self.encoder = GRUEncoder(n_heldin, hidden, bidirectional=bidirectional, dropout=dropout)
        self.initial_head = InitialStateHead(self.encoder.out_features, model.latent_dim)

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(batch)

    def initial(self, ctx: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> tuple[dist.Distribution, dist.Distribution]:
        return self.initial_head(ctx[1])
