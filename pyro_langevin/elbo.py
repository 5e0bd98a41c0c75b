"""The ELBO used by ``fit``: Pyro's mean-field ELBO, computing only the terms its loss uses.

``TraceMeanField_ELBO`` scores each latent site by ``kl_divergence(q, p)`` (Pyro's KL registry, here
between the guide's and the model's Normal transitions given the sampled past) and the observed
sites by their log-probability. Pyro's generic trace preparation, however, also evaluates
``log_prob`` and score parts of *every* site of model and guide. With one latent site per bin that
is hundreds of log-probabilities per step that the loss never reads: about 20% of an SVI step at
MC_Maze size (``benchmarks/svi_step.py``). :class:`MarkovMeanFieldELBO` skips them and is otherwise
the same estimator; where no analytic KL is registered it uses the single-sample estimate
``log q(v) - log p(v)`` at the guide's reparameterised sample, as Pyro's fallback does.
"""

from __future__ import annotations

from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match

__all__ = ["MarkovMeanFieldELBO", "make_elbo"]


class MarkovMeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` without the unused per-site log-probabilities (see the module docstring).

    Supports guides whose latent sites are all reparameterised and models whose latent sites all
    appear in the guide (every guide in :mod:`pyro_langevin.guides`).
    """

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
                continue
            q_site = guide_trace.nodes.get(name)
            if q_site is None:
                raise ValueError(f"latent site {name!r} of the model is missing from the guide")
            q = q_site["fn"]
            if not q.has_rsample:
                raise NotImplementedError(f"guide site {name!r} is not reparameterisable; use elbo='trace'")
            try:
                kl = kl_divergence(q, site["fn"])
            except NotImplementedError:
                value = q_site["value"]
                kl = q.log_prob(value) - site["fn"].log_prob(value)
            elbo = elbo - scale_and_mask(kl, scale=q_site["scale"], mask=q_site["mask"]).sum()
        for name, q_site in guide_trace.nodes.items():
            if q_site["type"] == "sample" and name not in model_trace.nodes:
                raise ValueError(f"guide site {name!r} is not in the model (auxiliary sites are not supported)")
        loss = -elbo
        return torch_item(loss), loss


def make_elbo(kind: str = "meanfield", num_particles: int = 1):
    """The ELBO ``fit`` uses: ``"meanfield"`` (:class:`MarkovMeanFieldELBO`, analytic per-step KL)
    or ``"trace"`` (Pyro's ``Trace_ELBO``, Monte Carlo log p - log q)."""
    if kind == "meanfield":
        return MarkovMeanFieldELBO(num_particles=num_particles, vectorize_particles=False)
    if kind == "trace":
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=False)
    raise ValueError(f"unknown elbo {kind!r}; choose 'meanfield' or 'trace'")
