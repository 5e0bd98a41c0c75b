"""Initial-state-only guide: a posterior over ``(z_0, v_0)``; the whole path follows the prior.

This is the ablation that asks how much the inferred inputs (the per-step forces of the GRU guide)
matter: ``q(z_0, v_0 | x)`` comes from a bidirectional GRU over the held-in spikes and every
``v_t`` (t >= 1) is drawn from the model's own transition ``model.transition``. The latent path
is then a sample of the prior dynamics from an inferred start, so the fit depends on how well the
learned potential alone can reproduce the trial.
"""

from __future__ import annotations

from pyro_langevin.guides.base import EncoderGuide

__all__ = ["InitialStateGuide"]


class InitialStateGuide(EncoderGuide):
    """``q(z_0, v_0 | x)`` from a GRU encoder; ``q(v_t | z_{t-1}, v_{t-1}) = p(v_t | z_{t-1}, v_{t-1})``.

    Parameters
    ----------
    model : LangevinFlow
        The model (held by reference).
    n_heldin : int
        Neurons the guide reads.
    hidden : int
        GRU state size per direction.
    bidirectional : bool
        Read the trial in both directions (default) or forwards only.
    dropout : float
        Dropout on the GRU inputs and outputs.

    Notes
    -----
    With ``TraceMeanField_ELBO`` every per-step KL is exactly zero (q equals p), so the ELBO
    reduces to the likelihood plus the KL of the initial state.
    """
