"""Data and parameters of a stitched fit: batches of many sessions, balanced epochs, frozen shared parts.

* :func:`stitch_batches`: sessions' own batches (same bins) -> one stitched
  :class:`~pyro_langevin.batch.Batch` and its :class:`~pyro_langevin.sessions.SessionLayout`;
  :func:`embed_session` puts one session's batch into an existing layout;
* :func:`balance_sessions`: every session weighted equally per epoch (shorter sessions' trials cycled);
* :func:`split_sessions`: a validation split carved from each session's own training trials;
* :func:`pcr_layout`: the read-ins' PCR initialisation from the sessions' training trials
  (:mod:`pyro_langevin.pcr`);
* :func:`freeze_shared`: ``requires_grad`` off for everything but chosen sessions' read-in and
  read-out (a new session fitted against a frozen stitched model); :func:`shared_parameters`;
* :func:`grow`: a fitted stitched model and guide with one session more, every saved parameter
  copied, all but the new session's frozen, its read-out bias at its log mean counts;
* :func:`train_stitched` and :func:`train_added`: the two fits the evaluation scripts make (a
  stitched fit of sessions' own batches; a session added to it with the rest frozen).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.splits import split_train_valid
from pyro_langevin.inputs import encoder_features
from pyro_langevin.pcr import condition_averages, pcr_readins
from pyro_langevin.sessions import Session, SessionError, SessionLayout
from pyro_langevin.spec import build_stitched
from pyro_langevin.training import fit

__all__ = ["stitch_batches", "embed_session", "session_view", "session_rows", "concat_trials", "balance_sessions",
           "split_sessions", "pcr_layout",
           "freeze_shared", "shared_parameters", "session_parameter_names", "grow", "train_stitched", "train_added"]


def _check_bins(batches: Sequence[Batch], names: Sequence[str]) -> None:
    first = batches[0]
    for name, b in zip(names, batches):
        if (b.n_observed_bins, b.n_bins) != (first.n_observed_bins, first.n_bins):
            raise SessionError(f"session {name}: {b.n_observed_bins}+{b.n_forward_bins} bins, session {names[0]} "
                               f"{first.n_observed_bins}+{first.n_forward_bins}: stitched sessions share one grid of bins")


def embed_session(batch: Batch, layout: SessionLayout, name: str) -> Batch:
    """Session ``name``'s own batch (its held-in then held-out units; ``index`` its trial rows) in
    ``layout``'s columns and trial ids (other sessions' columns zero and masked)."""
    i = layout.position(name)
    s = layout.sessions[i]
    if (batch.n_heldin, batch.n_heldout) != (s.n_heldin, s.n_heldout):
        raise SessionError(f"session {name}: batch has {batch.n_heldin}+{batch.n_heldout} units, the layout "
                           f"{s.n_heldin}+{s.n_heldout}")
    if len(batch) and (int(batch.index.min()) < 0 or int(batch.index.max()) >= s.n_trials):
        raise SessionError(f"session {name}: trial rows must lie in 0..{s.n_trials - 1}")
    n, t = batch.n_trials, batch.n_bins
    cols = torch.as_tensor(layout.columns(i))
    target = batch.target.new_zeros(n, t, layout.n_neurons)
    mask = torch.zeros(n, t, layout.n_neurons, dtype=torch.bool, device=batch.mask.device)
    target[:, :, cols] = batch.target
    mask[:, :, cols] = batch.mask
    inp = batch.input.new_zeros(n, batch.n_observed_bins, layout.n_heldin)
    inp[:, :, torch.as_tensor(layout.heldin_columns(i))] = batch.input
    return Batch(input=inp, target=target, mask=mask, index=batch.index + layout.trial_offset(i),
                 behavior=batch.behavior)


def stitch_batches(batches: Sequence[Batch], names: Sequence[str], readin_dim: int = 16,
                   train_readin: bool = True, n_trials: Optional[Sequence[int]] = None) -> Tuple[Batch, SessionLayout]:
    """One stitched batch of every session's trials, and its layout (module :mod:`pyro_langevin.sessions`).

    Each session's batch holds its own units (held-in, then held-out) and its trial rows as ``index``
    (``0 .. n_trials - 1``; ``n_trials`` defaults to each batch's size). Behaviour is kept only when
    every session has it with the same width.
    """
    if len(batches) != len(names):
        raise SessionError(f"{len(batches)} batches but {len(names)} session names")
    _check_bins(batches, names)
    counts = list(n_trials) if n_trials is not None else [len(b) for b in batches]
    layout = SessionLayout.of(names, [b.n_heldin for b in batches], [b.n_heldout for b in batches], counts,
                              readin_dim, train_readin)
    parts = [embed_session(b, layout, n) for b, n in zip(batches, names)]
    widths = {None if p.behavior is None else p.behavior.shape[-1] for p in parts}
    behavior = torch.cat([p.behavior for p in parts]) if len(widths) == 1 and None not in widths else None
    stitched = Batch(input=torch.cat([p.input for p in parts]), target=torch.cat([p.target for p in parts]),
                     mask=torch.cat([p.mask for p in parts]), index=torch.cat([p.index for p in parts]),
                     behavior=behavior)
    return stitched.validate(), layout


def session_rows(batch: Batch, layout: SessionLayout, name: str) -> torch.Tensor:
    """Rows of ``batch`` (a stitched batch) whose trials belong to session ``name``."""
    return (layout.session_of(batch.index) == layout.position(name)).nonzero().squeeze(-1)


def balance_sessions(batch: Batch, layout: SessionLayout) -> Batch:
    """``batch`` with each session's trials cycled up to the largest session's count.

    An epoch over the result visits every session equally often (the shorter ones' trials several
    times, in order, the last cycle cut short), as lfads-torch's multi-session loader does. Trials
    keep their ``index``.
    """
    rows = [session_rows(batch, layout, name) for name in layout.names]
    most = max(len(r) for r in rows)
    picked = [r.repeat(-(-most // len(r)))[:most] for r in rows if len(r)]
    return batch[torch.cat(picked)]


def split_sessions(batch: Batch, layout: SessionLayout, frac: float, seed: int) -> Tuple[Batch, Batch]:
    """``(fit, valid)``: :func:`~pyro_langevin.data.splits.split_train_valid` within each session's trials."""
    fits, valids = [], []
    for name in layout.names:
        rows = session_rows(batch, layout, name)
        if len(rows) == 0:
            continue
        if len(rows) < 2:
            raise SessionError(f"session {name}: {len(rows)} training trial; a validation split needs at least 2")
        part, valid = split_train_valid(batch[rows], frac, seed)
        fits.append(part)
        valids.append(valid)
    return concat_trials(fits), concat_trials(valids)


def concat_trials(parts: Sequence[Batch]) -> Batch:
    """Trials of stitched batches of one layout, one after the other (behaviour kept only when all have it)."""
    beh = None if any(p.behavior is None for p in parts) else torch.cat([p.behavior for p in parts])
    return Batch(input=torch.cat([p.input for p in parts]), target=torch.cat([p.target for p in parts]),
                 mask=torch.cat([p.mask for p in parts]), index=torch.cat([p.index for p in parts]), behavior=beh)


def pcr_layout(layout: SessionLayout, batch: Batch, labels: Dict[str, Sequence[str]], observed: Optional[torch.Tensor] = None,
               smooth_bins: float = 2.0, alpha: float = 1.0) -> SessionLayout:
    """``layout`` with PCR-initialised read-ins (:func:`~pyro_langevin.pcr.pcr_readins`) from ``batch``'s trials.

    ``batch`` holds the TRAINING trials only (stitched); ``labels[name]`` gives the condition of each
    of session ``name``'s trial ids (``labels[name][trial_row]``). Only conditions every session has
    are used. Sessions' held-in units only (what the read-in reads), observed bins only.
    """
    feats = encoder_features(batch.input).numpy()
    obs = batch.mask[:, : batch.n_observed_bins, :batch.n_heldin].any(-1).numpy() if observed is None else observed
    per = []
    for i, name in enumerate(layout.names):
        rows = session_rows(batch, layout, name).numpy()
        if len(rows) == 0:
            raise SessionError(f"session {name}: no training trials for the PCR read-in")
        ids = batch.index.numpy()[rows] - layout.trial_offset(i)
        per.append((rows, [str(labels[name][k]) for k in ids]))
    shared = set(per[0][1])
    for _, lab in per[1:]:
        shared &= set(lab)
    conditions = sorted(shared)
    if len(conditions) < 2:
        raise SessionError(f"PCR read-in: the sessions share {len(conditions)} condition label(s) "
                           f"({', '.join(conditions) or 'none'}); use readin init 'random'")
    averages = [condition_averages(feats[rows][:, :, layout.heldin_columns(i)], obs[rows], lab, conditions, smooth_bins)
                for i, (rows, lab) in enumerate(per)]
    init = pcr_readins(averages, layout.readin_dim, alpha)
    return layout.with_readin_init(dict(zip(layout.names, init)))


def session_parameter_names(names: Sequence[str]) -> Tuple[str, ...]:
    """Name prefixes of sessions' own parameters in the model (``model.``) and the guide (``guide.``)."""
    return tuple(p for n in names for p in (f"model.decoder.readout.sessions.{n}.", f"guide.readin.{n}."))


def _named(model: torch.nn.Module, guide: torch.nn.Module):
    yield from ((f"model.{k}", p) for k, p in model.named_parameters())
    yield from ((f"guide.{k}", p) for k, p in guide.named_parameters())


def freeze_shared(model: torch.nn.Module, guide: torch.nn.Module, trainable: Sequence[str]) -> list[str]:
    """Turn ``requires_grad`` off for every parameter but sessions ``trainable``'s read-in and read-out.

    The optimiser then sees no gradient for the frozen ones (Adam skips them: no step, no weight
    decay) and Pyro's param store does not register them, so they stay bit-identical. Returns the
    names (``model.``/``guide.`` prefixed) left trainable.
    """
    own = session_parameter_names(trainable)
    left = []
    for name, p in _named(model, guide):
        keep = name.startswith(own)
        p.requires_grad_(keep)
        if keep:
            left.append(name)
    if not left:
        raise SessionError(f"no parameters of sessions {list(trainable)} in the model or guide")
    return left


def shared_parameters(model: torch.nn.Module, guide: torch.nn.Module, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Copies of every parameter that is not session ``names``'s own (``model.``/``guide.`` prefixed)."""
    own = session_parameter_names(names)
    return {k: p.detach().clone() for k, p in _named(model, guide) if not k.startswith(own)}



def session_view(batch: Batch, layout: SessionLayout, name: str, rates: Optional[np.ndarray] = None):
    """Session ``name``'s trials of a stitched ``batch`` in the session's own layout (its held-in, then
    held-out units; ``index`` its trial rows): the inverse of :func:`embed_session`. With ``rates``
    (rows of ``batch``, layout columns) also returns those trials' rates of the session's units."""
    i = layout.position(name)
    rows = session_rows(batch, layout, name)
    part = batch[rows]
    cols = torch.as_tensor(layout.columns(i))
    view = Batch(input=part.input[:, :, torch.as_tensor(layout.heldin_columns(i))], target=part.target[:, :, cols],
                 mask=part.mask[:, :, cols], index=part.index - layout.trial_offset(i), behavior=part.behavior)
    if rates is None:
        return view
    return view, np.asarray(rates)[rows.numpy()][:, :, layout.columns(i)]


def grow(spec: Any, model: torch.nn.Module, guide: torch.nn.Module, session: Session, train: Batch):
    """``(model, guide, trainable)``: ``model`` and ``guide`` (a fitted stitched pair) grown by ``session``.

    The grown pair (:func:`~pyro_langevin.spec.build_stitched` of ``spec`` over the layout with
    ``session`` appended) holds every parameter of the given pair, and only the new session's read-in and
    read-out train (:func:`freeze_shared`; ``trainable`` names them). The new read-out's bias is the log
    mean count of ``train`` (the new session's training trials, in the grown layout); fit the pair with
    ``fit(..., init_rates=False)`` so no other session's bias is touched.
    """
    layout = model.layout.with_session(session)
    grown_model, grown_guide = build_stitched(spec, layout)
    for new, old in ((grown_model, model), (grown_guide, guide)):
        missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
        if unexpected or not all(f".{session.name}." in k for k in missing):
            raise SessionError(f"the saved parameters do not fit the grown model (missing {missing}, unexpected "
                               f"{unexpected})")
    trainable = freeze_shared(grown_model, grown_guide, [session.name])
    with torch.no_grad():
        mean = (train.target * train.mask).sum((0, 1)) / train.mask.sum((0, 1)).clamp_min(1)
        cols = torch.as_tensor(layout.columns(layout.position(session.name)))
        grown_model.decoder.readout.sessions[session.name].bias.copy_(torch.log(mean[cols].clamp_min(1e-3)))
    return grown_model, grown_guide, trainable


def train_stitched(spec: Any, batches: Sequence[Batch], names: Sequence[str], *, n_trials: Optional[Sequence[int]] = None,
                   readin_dim: int = 16, train_readin: bool = True, labels: Optional[Dict[str, Sequence[str]]] = None,
                   valid_frac: float = 0.2, device: Any = None, progress: bool = False):
    """``(model, guide, layout, result)``: one stitched model of ``spec`` fitted on every session's own batch
    (``result`` the :class:`~pyro_langevin.training.FitResult`).

    :func:`stitch_batches`, then :func:`split_sessions` (``valid_frac`` of each session's trials pick
    the checkpoint by their ELBO), with ``labels`` the PCR read-ins (:func:`pcr_layout`, from the
    fitting trials only), and balanced epochs (:func:`balance_sessions`).
    """
    batch, layout = stitch_batches(batches, names, readin_dim=readin_dim, n_trials=n_trials, train_readin=train_readin)
    fit_part, valid = split_sessions(batch, layout, valid_frac, spec.fit.seed)
    if labels is not None:
        layout = pcr_layout(layout, fit_part, labels)
    model, guide = build_stitched(spec, layout)
    result = fit(model, guide, balance_sessions(fit_part, layout), valid, spec.fit, device=device, progress=progress)
    return model, guide, layout, result


def train_added(spec: Any, model: torch.nn.Module, guide: torch.nn.Module, name: str, trials: Batch, n_trials: int,
                *, valid_frac: float = 0.2, device: Any = None, progress: bool = False):
    """``(model, guide, layout, result)``: the fitted stitched pair grown by session ``name`` (:func:`grow`) and
    fitted on ``trials`` (its own batch, trial rows ``0 .. n_trials - 1``), only its read-in and
    read-out training; ``valid_frac`` of ``trials`` pick the checkpoint by their ELBO."""
    session = Session(name, trials.n_heldin, trials.n_heldout, n_trials)
    layout = model.layout.with_session(session)
    fit_part, valid = split_sessions(embed_session(trials, layout, name), layout, valid_frac, spec.fit.seed)
    grown, grown_guide, _ = grow(spec, model, guide, session, fit_part)
    result = fit(grown, grown_guide, fit_part, valid, spec.fit, device=device, progress=progress, init_rates=False)
    return grown, grown_guide, layout, result
