"""Small Pyro effect handlers used in training."""

from __future__ import annotations

from pyro.poutine.messenger import Messenger

__all__ = ["scale_latents"]


class scale_latents(Messenger):
    """Multiply the scale of every latent (non-observed) sample site by ``scale``.

    Wrapping both the model and the guide in it weights the KL part of the ELBO (the KL-weight ramp)
    and leaves the likelihood alone, for ``Trace_ELBO`` (scaled log p and log q) and
    ``TraceMeanField_ELBO`` (scaled analytic KL) alike.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.scale
