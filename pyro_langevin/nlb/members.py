"""The members of an NLB run: the one recipe that ``nlb``, ``nlb --cv`` and ``tune`` train.

The members' machinery is the core's (:mod:`pyro_langevin.members`: :func:`fold_members`,
:func:`build_member`, :func:`train_member`, :func:`train_members`, :func:`export_rates`,
:func:`cobps_metric`, re-exported here), shared with the recording wing. What is the NLB's:

* :func:`member_recipe`: the request's data (:func:`~pyro_langevin.nlb.data.load_nlb`), the same
  data summed into the fitting bins (:func:`~pyro_langevin.nlb.coarse.coarsen_data`), the members'
  configuration at those bins (:meth:`~pyro_langevin.nlb.request.NLBRequest.spec`) and the device;
  :meth:`MemberRecipe.to_scored_bins` brings the members' rates back to the request's bins;
* :func:`at_bins`: a member's trials at another bin width, for scoring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from pyro_langevin.batch import Batch
from pyro_langevin.members import (
    MemberResult, MemberSpec, build_member, cobps_metric, export_rates, fold_members, same_trials, train_member,
    train_members,
)
from pyro_langevin.nlb.coarse import coarsen_data, upsample
from pyro_langevin.nlb.config import NLBConfig
from pyro_langevin.nlb.data import NLBData, load_nlb
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.scoring import Rates

__all__ = [
    "MemberRecipe", "member_recipe", "cobps_metric", "export_rates", "MemberSpec", "MemberResult", "same_trials",
    "at_bins", "fold_members", "build_member", "train_member", "train_members",
]


@dataclass
class MemberRecipe:
    """What every member of a run trains with (:func:`member_recipe`).

    Attributes
    ----------
    data : NLBData
        The request's data, at the bins rates are scored and written at.
    fit_data : NLBData
        The same trials summed into the fitting bins (``data`` itself when they are the same).
    cfg : NLBConfig
        The members' configuration, at the fitting bins (each member sets its own seed).
    device : torch.device
    """

    data: NLBData
    fit_data: NLBData
    cfg: NLBConfig
    device: torch.device

    @property
    def factor(self) -> int:
        """Scored bins per fitting bin."""
        return self.fit_data.bin_ms // self.data.bin_ms

    def to_scored_bins(self, rates: Rates) -> Rates:
        """Members' rates (counts per fitting bin) at the scored bins, interpolated (:func:`~pyro_langevin.nlb.coarse.upsample`)."""
        return upsample(rates, self.factor)


def member_recipe(request: NLBRequest, data: Optional[NLBData] = None) -> MemberRecipe:
    """The data, configuration and device of ``request``'s members; sets the torch CPU threads.

    ``data`` (the request's data, already loaded) replaces loading. The configuration and device
    are checked before the data are loaded.
    """
    cfg = request.spec()
    dev = request.torch_device()
    if dev.type == "cpu":
        torch.set_num_threads(request.threads)
    data = data if data is not None else load_nlb(request.dataset, request.data_dir, bin_ms=request.bin_ms,
                                                  phase=request.phase)
    return MemberRecipe(data, coarsen_data(data, request.fit_bin), cfg, dev)


def at_bins(spec: MemberSpec, train: Batch) -> MemberSpec:
    """``spec`` with its fitting and validation trials taken from ``train`` (another bin width), for
    scoring; its checkpoints and seed stay."""
    return dataclasses.replace(spec, fit_trials=same_trials(train, spec.fit_trials),
                               valid=same_trials(train, spec.valid), heldin_only=[])
