"""Per-trial log densities read off Pyro traces, and eval mode for everything a model or guide calls.

Shared by the importance-sampled evidence (:mod:`pyro_langevin.evidence`) and annealed importance
sampling (:mod:`pyro_langevin.ais`): both need ``log p(x, z)`` and ``log q(z | x)`` summed per trial
of the ``"trials"`` plate, and both must run the networks without dropout.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

__all__ = ["TRIALS_PLATE", "trial_log_density", "latent_sites", "check_guide_covers_model", "evaluation_mode"]

#: The plate every site of a model or guide of this project is in.
TRIALS_PLATE = "trials"


def _per_trial(log_prob: torch.Tensor, site: dict, n: int) -> torch.Tensor:
    """A site's log-density summed to one value per trial of the ``"trials"`` plate, float64 (n,)."""
    name = site["name"]
    frames = [f for f in site["cond_indep_stack"] if f.name == TRIALS_PLATE]
    if not frames:
        raise ValueError(f"site {name!r} is outside the {TRIALS_PLATE!r} plate: its density cannot be split per "
                         "trial (a global latent has no per-trial evidence)")
    dim = frames[0].dim
    if log_prob.dim() == 0:
        raise ValueError(f"site {name!r}: a scalar log-density inside the {TRIALS_PLATE!r} plate")
    if log_prob.dim() != -dim or log_prob.shape[0] != n:
        raise ValueError(f"site {name!r}: log-density of shape {tuple(log_prob.shape)} does not have the {n} trials "
                         f"of the {TRIALS_PLATE!r} plate (dim {dim}) as its leftmost batch dimension")
    return log_prob.reshape(n, -1).sum(1, dtype=torch.float64)


def trial_log_density(trace: "poutine.Trace", n: int, observed: bool = True) -> torch.Tensor:
    """Per-trial sum of the log-densities of a trace's sample sites, float64 (n,).

    Latent sites always count; observed sites (and sites fixed by ``poutine.condition``) only when
    ``observed`` is True. Differentiable in the sites' values (on their device).

    Raises
    ------
    ValueError
        A site outside the ``"trials"`` plate, or scaled (KL annealing, subsampling).
    """
    total = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic"):
            continue
        if site["is_observed"] and not observed:
            continue
        if float(site["scale"]) != 1.0:
            raise ValueError(f"site {name!r} has scale {float(site['scale'])}: the evidence needs the model and guide "
                             "as they are (no KL annealing, no subsampling)")
        lp = _per_trial(scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"]), site, n)
        total = lp if total is None else total + lp
    return torch.zeros(n, dtype=torch.float64) if total is None else total


def latent_sites(trace: "poutine.Trace") -> list[str]:
    """Names of a trace's unobserved sample sites, in the order they were sampled."""
    return [name for name, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not s["infer"].get("_deterministic")]


def check_guide_covers_model(model_trace: "poutine.Trace", guide_trace: "poutine.Trace") -> None:
    """The guide must sample exactly the model's latent sites (else the weights are not p/q)."""
    model_latent, guide_latent = set(latent_sites(model_trace)), set(latent_sites(guide_trace))
    if model_latent - guide_latent:
        raise ValueError(f"model latent site(s) {sorted(model_latent - guide_latent)[:5]} are not sampled by the guide: "
                         "the importance weights need the guide's density of every latent")
    if guide_latent - model_latent:
        raise ValueError(f"guide site(s) {sorted(guide_latent - model_latent)[:5]} are not in the model "
                         "(auxiliary guide sites are not supported)")


@contextmanager
def evaluation_mode(*callables: Callable) -> Iterator[None]:
    """Every ``nn.Module`` that runs inside the block runs in eval mode (no dropout); modes are
    restored afterwards.

    The ``callables`` that are modules are switched at once (a guide's ``shared_context`` checks its
    mode before it runs anything). A model or guide wrapped in something that is not a module
    (``poutine.block(model)``, a closure, a ``functools.partial``) is reached through a global
    forward pre-hook: each module is put in eval mode, with all its submodules, the first time it is
    called inside the block.
    """
    switched: list[torch.nn.Module] = []

    def to_eval(modules: Iterable[torch.nn.Module]) -> None:
        for m in modules:
            if m.training:
                m.training = False
                switched.append(m)

    def hook(module: torch.nn.Module, args) -> None:
        if module.training:
            to_eval(module.modules())

    for c in callables:
        if isinstance(c, torch.nn.Module):
            to_eval(c.modules())
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for m in switched:
            m.training = True
