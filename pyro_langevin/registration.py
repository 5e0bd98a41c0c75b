"""Registration of the model's and guides' parameters with Pyro, one param-store name per instance.

Plain Pyro (``SVI`` with ``pyro.optim``, autoguides, ``Predictive``) trains what the param store
holds: the model and every guide call :meth:`PyroRegistered.register_params` on entry, which puts
each trainable parameter in the store *as the very same tensor* (so SVI and ``fit``, which uses a
torch optimiser over ``module.parameters()``, train one set of tensors).

Names: Pyro's store is global and keyed by name. ``pyro.module("model", m)`` for a second
``m`` in the same process would hand back the first one's stored tensors (and with
``update_module_params`` silently load them), so two models built in one process would train
each other's parameters. Here every instance gets its own name, a readable prefix plus a process-
wide counter (``LangevinFlow_0``, ``GRUGuide_1``; a copy or an unpickled instance gets a fresh one),
and registration raises if the store holds a *different* tensor under one of its names (two
instances given the same ``pyro_name`` by hand, or parameters replaced after registration).
Lifetime: an instance's entries leave the store when the instance is garbage collected (or at
once with :meth:`PyroRegistered.release_params`), so a process that fits many models one after
another (an ensemble, cross-validation folds) does not accumulate their tensors, and nothing here
ever clears the store: a user's own ``pyro.param`` sites stay. Save and restore models with their
``state_dict`` (checkpoints), not with the param store, whose names are per process.
"""

from __future__ import annotations

import itertools
import weakref

import pyro
from pyro.params import param_with_module_name
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn

__all__ = ["PyroRegistered", "traced_value"]

_instances = itertools.count()


def _fresh_name(prefix: str) -> str:
    return f"{prefix}_{next(_instances)}"


def _release(entries: dict[str, "weakref.ref"]) -> None:
    """Remove from Pyro's store the entries still holding the tensors this instance registered."""
    store = pyro.get_param_store()
    for name, ref in list(entries.items()):
        value = ref()
        if value is not None and name in store and store[name] is value:
            del store[name]
            value.__dict__.pop("unconstrained", None)  # Pyro's weak back-reference: it blocks pickling
    entries.clear()


def _track(module: "PyroRegistered") -> None:
    """Give ``module`` an empty record of its store entries, released when it is collected."""
    entries: dict[str, weakref.ref] = {}
    module.__dict__["_store_entries"] = entries
    weakref.finalize(module, _release, entries).atexit = False


class PyroRegistered(nn.Module):
    """An ``nn.Module`` whose parameters Pyro can train; subclasses call :meth:`register_params`.

    Attributes
    ----------
    pyro_name : str
        Prefix of this instance's param-store names (``f"{pyro_name}$$${parameter name}"``).
        Unique per instance by default; may be set by hand (a clash raises at registration).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pyro_name = _fresh_name(type(self).__name__)
        _track(self)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop("_store_entries", None)  # weak references do not pickle; a copy tracks its own
        return state

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and unpickling go through here: a copy is a new instance with new tensors
        super().__setstate__(state)
        self.pyro_name = _fresh_name(type(self).__name__)
        _track(self)

    def release_params(self) -> None:
        """Remove this instance's parameters from Pyro's param store (done anyway when it is collected).

        The module keeps its parameters; its next call registers them again.
        """
        _release(self._store_entries)

    def pyro_parameters(self):
        """``(name, parameter)`` pairs this instance registers (default: all of ``named_parameters``).

        A module that wraps another registered module (which registers its own under its own name)
        leaves that module's parameters out here, so no tensor has two names in the store.
        """
        return self.named_parameters()

    def register_params(self) -> None:
        """Declare every trainable parameter as a Pyro ``param`` site (frozen ones are skipped)."""
        store = pyro.get_param_store()
        for name, value in self.pyro_parameters():
            if not value.requires_grad:
                continue
            full_name = param_with_module_name(self.pyro_name, name)
            if full_name in store and store[full_name] is not value:
                raise RuntimeError(
                    f"Pyro's param store holds another tensor under {full_name!r}: two modules share the "
                    f"pyro_name {self.pyro_name!r}, or this {type(self).__name__}'s parameters were replaced "
                    "after it was registered. Give each instance its own pyro_name (the default is unique), "
                    "or call release_params() before replacing parameters."
                )
            pyro.param(full_name, value)
            self._store_entries[full_name] = weakref.ref(value)


def traced_value(name: str):
    """Value of sample site ``name`` already recorded by the innermost enclosing ``poutine.trace``.

    Lets one part of a composite guide (e.g. an ``AutoGuideList`` part) condition on a site that an
    earlier part sampled. Raises ``LookupError`` if no enclosing trace has recorded ``name``.
    """
    for handler in reversed(_PYRO_STACK):
        if isinstance(handler, TraceMessenger) and name in handler.trace.nodes:
            site = handler.trace.nodes[name]
            if site["type"] == "sample":
                return site["value"]
    raise LookupError(
        f"site {name!r} has not been sampled yet: a guide that does not sample it must run under "
        "poutine.trace (as SVI, Predictive and every ELBO do) after another guide part that does "
        "(e.g. an earlier part of an AutoGuideList)"
    )
