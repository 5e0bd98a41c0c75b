"""LangevinFlow as a Pyro model: Langevin latent dynamics, Transformer decoder, Poisson spikes."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.decoder import TransformerDecoder
from pyro_langevin.potentials import Potential, make_potential
from pyro_langevin.registration import PyroRegistered
from pyro_langevin.transition import LangevinParams, Transition, TransitionOutput, langevin_transition, make_transition

__all__ = ["LangevinFlow", "velocity_site", "STABLE_OMEGA_DT"]

#: Default ceiling of ``omega * dt`` for the oscillator potential. One step of the splitting maps a
#: mode of frequency omega by a matrix with trace ``1 - h^2 + a`` and determinant ``a``
#: (``h = omega dt``, ``a = exp(-gamma dt / m)`` the velocity decay), stable while
#: ``h^2 < 2 (1 + a)``: ``h < sqrt(2)`` whatever the damping. 1.35 keeps a margin; it is 27 rad per
#: time unit (43 Hz) at 5 ms bins and 6.75 (10.7 Hz) at 20 ms bins.
STABLE_OMEGA_DT = 1.35


def velocity_site(t: int) -> str:
    """Name of the velocity sample site at bin ``t`` (``"v_0"``, ``"v_1"``, ...)."""
    return f"v_{t}"


class LangevinFlow(PyroRegistered):
    """The generative model: ``z_0, v_0 ~ N(0, I)``, Langevin transitions, Poisson observations.

    Sample sites: ``z_0``, ``v_0``, ``v_1`` ... ``v_{T+F-1}`` (one per bin, inside
    ``pyro.markov``), and the observed ``spikes``; deterministic sites ``z`` (trial, time, D),
    ``v`` and ``rates`` (trial, time, neuron; expected counts per bin). Rates depend on the latent
    path only, so prior predictive sampling is meaningful.

    Every call registers the parameters with Pyro's param store under the instance's own
    ``pyro_name`` (see :mod:`pyro_langevin.registration`), so plain ``pyro.infer.SVI`` with a
    ``pyro.optim`` optimiser trains them, and ``poutine`` handlers, ``Predictive`` and autoguides
    apply unchanged. Interventions act on the sample sites: ``poutine.do(model, {"z_0": z, "v_0": v})``
    starts every trial from a chosen state; clamping every ``v_t`` makes the path deterministic.

    Parameters
    ----------
    n_neurons : int
        All neurons predicted (held-in + held-out).
    latent_dim : int
        D, size of the position (and of the velocity).
    dt, gamma, sigma, mass, learn_gamma, learn_sigma, overdamped
        Passed to :class:`~pyro_langevin.transition.LangevinParams`.
    potential : str or Potential
        ``"oscillators"`` (default), ``"zero"``, ``"quadratic"``, ``"mlp"`` or a module.
    potential_kwargs : dict, optional
        Options of the named potential (e.g. ``boundary="ring"``).
    decoder_kwargs : dict, optional
        Options of :class:`~pyro_langevin.decoder.TransformerDecoder`.

    Notes
    -----
    Every site broadcasts over plates outside ``"trials"`` (dim -1): inside
    ``pyro.plate("draws", S, dim=-2)`` one call draws S independent latent paths of every trial
    (sites of shape (S, trial, ...)), as ``posterior_means`` does (:attr:`supports_draws_plate`).
    """

    #: Sites broadcast over a ``pyro.plate("draws", S, dim=-2)`` around the call (see Notes).
    supports_draws_plate: bool = True

    def __init__(
        self,
        n_neurons: int,
        latent_dim: int = 16,
        *,
        dt: float = 0.05,
        gamma: float = 2.0,
        sigma: Optional[float] = None,
        mass: float = 1.0,
        learn_gamma: bool = False,
        learn_sigma: bool = False,
        overdamped: bool = False,
        potential: str | Potential = "oscillators",
        potential_kwargs: Optional[dict[str, Any]] = None,
        decoder_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        for name, value in (("n_neurons", n_neurons), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.n_neurons = n_neurons
        self.latent_dim = latent_dim
        if isinstance(potential, str):
            kwargs = dict(potential_kwargs or {})
            if potential == "oscillators":
                kwargs.setdefault("max_omega", STABLE_OMEGA_DT / dt if math.isfinite(dt) and dt > 0 else 1.0)
            potential = make_potential(potential, latent_dim, **kwargs)
        elif potential_kwargs:
            raise ValueError("potential_kwargs only apply to a potential given by name")
        if potential.latent_dim != latent_dim:
            raise ValueError(f"potential has latent_dim={potential.latent_dim}, model has {latent_dim}")
        self.potential = potential
        self.dynamics = LangevinParams(
            dt=dt, gamma=gamma, sigma=sigma, mass=mass,
            learn_gamma=learn_gamma, learn_sigma=learn_sigma, overdamped=overdamped,
        )
        max_omega = getattr(potential, "max_omega", None)
        if max_omega is not None and not overdamped and max_omega * dt > math.sqrt(2.0):
            raise ValueError(
                f"the prior step is unstable for frequencies omega with omega * dt > sqrt(2) (whatever the "
                f"damping): the potential allows omega up to {max_omega:.3g} and dt={dt}; lower "
                f"potential_kwargs['max_omega'] to at most {math.sqrt(2.0) / dt:.3g} (or use a smaller dt)"
            )
        self.decoder = TransformerDecoder(latent_dim, n_neurons, **(decoder_kwargs or {}))

    def transition_fn(self) -> Transition:
        """The prior transition as ``step(z, v) -> (z_t, v_loc, v_scale)`` of ``p(v_t | z_{t-1}, v_{t-1})``.

        Build it once per model or guide call and apply it at every bin (its constants, such as the
        potential's stiffness matrix, are computed once). Guides build their posteriors on it.
        """
        return make_transition(self.potential.force_fn(), self.dynamics)

    def transition(self, z: torch.Tensor, v: torch.Tensor) -> TransitionOutput:
        """One prior step from ``(z, v)``; in loops prefer :meth:`transition_fn`."""
        return langevin_transition(z, v, self.potential.force, self.dynamics)

    def initial_prior(self, n_trials: int, like: torch.Tensor) -> dist.Distribution:
        """``Normal(0, I)`` over a D-vector, batched over trials (used for ``z_0`` and ``v_0``)."""
        zeros = like.new_zeros(n_trials, self.latent_dim)
        return dist.Normal(zeros, 1.0).to_event(1)

    def forward(
        self,
        batch: Optional[Batch] = None,
        *,
        n_trials: Optional[int] = None,
        n_bins: Optional[int] = None,
    ) -> torch.Tensor:
        """Run the model; return sampled or observed spike counts (trial, time, neuron).

        Give a :class:`Batch` to condition on its ``target`` under its ``mask``; give ``n_trials``
        and ``n_bins`` instead to sample from the prior predictive.
        """
        self.register_params()
        if batch is not None:
            if batch.n_neurons != self.n_neurons:
                raise ValueError(f"batch has {batch.n_neurons} neurons but the model was built for {self.n_neurons}")
            n_trials, n_bins = batch.n_trials, batch.n_bins
            like = batch.target
        elif n_trials is None or n_bins is None:
            raise ValueError("give a batch, or n_trials and n_bins for prior sampling")
        else:
            like = self.decoder.readout.bias
        with pyro.plate("trials", n_trials, dim=-1):
            z = pyro.sample("z_0", self.initial_prior(n_trials, like))
            v = pyro.sample(velocity_site(0), self.initial_prior(n_trials, like))
            zs, vs = [z], [v]
            transition = self.transition_fn()
            for t in pyro.markov(range(1, n_bins)):
                step = transition(z, v)
                z = step.z_next
                v = pyro.sample(velocity_site(t), dist.Normal(step.v_loc, step.v_scale).to_event(1))
                zs.append(z)
                vs.append(v)
            z_path = pyro.deterministic("z", torch.stack(zs, dim=-2), event_dim=2)
            v_path = pyro.deterministic("v", torch.stack(vs, dim=-2), event_dim=2)
            rates = pyro.deterministic("rates", torch.exp(self.decoder(z_path, v_path)), event_dim=2)
            return self.observe(rates, batch)

    def observe(self, rates: torch.Tensor, batch: Optional[Batch]) -> torch.Tensor:
        """The observation site(s), inside the ``"trials"`` plate: ``spikes`` ~ Poisson(``rates``) under
        ``batch.mask`` (sampled when ``batch`` is None). A stitched model has one site per session."""
        obs_dist = dist.Poisson(rates)
        if batch is None:
            return pyro.sample("spikes", obs_dist.to_event(2))
        # Entries outside the mask may hold anything (NaN for missing data): a NaN there would
        # still poison the gradient through the masked log-prob (0 * NaN), so fill them first.
        observed = torch.where(batch.mask, batch.target, torch.zeros_like(batch.target))
        return pyro.sample("spikes", obs_dist.mask(batch.mask).to_event(2), obs=observed)

    model = forward
