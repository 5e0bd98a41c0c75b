"""Trial splits for the data contract: validation split of training trials, held-in-only trials.

Evaluation and validation trials may enter a training batch only through their held-in observed
spikes (:func:`heldin_only`); their held-out neurons and forward bins are for scoring.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.data.errors import NLBDataError

__all__ = ["split_train_valid", "kfold_indices", "heldin_only", "concat_batches", "build_training_batch", "TrialSizes"]


class TrialSizes:
    """The sizes of a run's trials, a ``train`` batch (targets known) and an ``eval`` batch (or None):
    what the members' recipe and the scorers read (:mod:`pyro_langevin.members`). A base of the NLB
    wing's ``NLBData`` and of :class:`~pyro_langevin.members.TrialSet`."""

    train: Batch
    eval: Optional[Batch]

    @property
    def n_heldin(self) -> int:
        return self.train.n_heldin

    @property
    def n_heldout(self) -> int:
        return self.train.n_heldout

    @property
    def n_neurons(self) -> int:
        return self.train.n_neurons

    @property
    def n_observed_bins(self) -> int:
        return self.train.n_observed_bins

    @property
    def n_forward_bins(self) -> int:
        return self.train.n_forward_bins

    @property
    def n_train(self) -> int:
        return self.train.n_trials

    @property
    def n_eval(self) -> int:
        return 0 if self.eval is None else self.eval.n_trials


def split_train_valid(batch: Batch, frac: float = 0.2, seed: int = 0) -> Tuple[Batch, Batch]:
    """Split TRAINING trials into a fitting part and a validation part.

    Both parts keep their full targets: the validation trials' held-out neurons and forward bins
    stay in ``target`` (with ``mask`` True) so they can be scored. To train, pass the validation
    part through :func:`heldin_only` / :func:`build_training_batch`.

    Parameters
    ----------
    batch : Batch
        Training trials (e.g. ``NLBData.train``).
    frac : float
        Fraction of trials for validation, in (0, 1); at least one trial goes to each side.
    seed : int
        Seed of the random permutation.

    Returns
    -------
    (Batch, Batch)
        ``(fit, valid)``, each in the original trial order, ``index`` kept.
    """
    n = len(batch)
    if not 0 < frac < 1:
        raise NLBDataError(f"validation fraction must be in (0, 1), got {frac}")
    n_valid = int(round(frac * n))
    n_valid = min(max(n_valid, 1), n - 1)
    if n < 2:
        raise NLBDataError(f"need at least 2 training trials to carve a validation split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    valid_idx = torch.as_tensor(np.sort(perm[:n_valid]), dtype=torch.long)
    fit_idx = torch.as_tensor(np.sort(perm[n_valid:]), dtype=torch.long)
    return batch[fit_idx], batch[valid_idx]


def kfold_indices(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint folds of ``range(n)`` (sorted row indices) that together cover every row once.

    Fold sizes differ by at most one. Raises :class:`NLBDataError` unless ``2 <= k <= n``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise NLBDataError(f"cross-validation needs 2 <= K <= {n} (the number of training trials), got K={k!r}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, k)]


def heldin_only(batch: Batch) -> Batch:
    """A copy where only held-in neurons in observed bins are kept (mask False, target 0 elsewhere).

    Behaviour is replaced by NaN: nothing but held-in spikes of these trials reaches training.
    """
    t, n_in = batch.n_observed_bins, batch.n_heldin
    target = torch.zeros_like(batch.target)
    mask = torch.zeros_like(batch.mask)
    target[:, :t, :n_in] = batch.target[:, :t, :n_in]
    mask[:, :t, :n_in] = batch.mask[:, :t, :n_in]
    beh = None if batch.behavior is None else torch.full_like(batch.behavior, float("nan"))
    return Batch(input=batch.input.clone(), target=target, mask=mask, index=batch.index.clone(),
                 behavior=beh)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches along trials (same T, F and neurons); missing behaviour becomes NaN."""
    batches = [b for b in batches if b is not None and len(b) > 0]
    if not batches:
        raise NLBDataError("concat_batches: no trials to concatenate")
    first = batches[0]
    for b in batches[1:]:
        if b.target.shape[1:] != first.target.shape[1:] or b.input.shape[1:] != first.input.shape[1:]:
            raise NLBDataError(
                f"concat_batches: shapes differ: input {tuple(b.input.shape[1:])} vs "
                f"{tuple(first.input.shape[1:])}, target {tuple(b.target.shape[1:])} vs "
                f"{tuple(first.target.shape[1:])}"
            )
    index = torch.cat([b.index for b in batches])
    if len(torch.unique(index)) != len(index):
        raise NLBDataError("concat_batches: the same trial index appears twice")
    beh_dims = {b.behavior.shape[2] for b in batches if b.behavior is not None}
    if len(beh_dims) > 1:
        raise NLBDataError(f"concat_batches: behaviour widths differ: {sorted(beh_dims)}")
    behavior = None
    if beh_dims:
        (b_dim,) = beh_dims
        behavior = torch.cat([
            b.behavior if b.behavior is not None
            else torch.full((len(b), b.n_observed_bins, b_dim), float("nan"))
            for b in batches
        ])
    return Batch(
        input=torch.cat([b.input for b in batches]),
        target=torch.cat([b.target for b in batches]),
        mask=torch.cat([b.mask for b in batches]),
        index=index,
        behavior=behavior,
    ).validate()


def build_training_batch(fit: Batch, heldin_only_sets: Sequence[Batch] = ()) -> Batch:
    """Training batch: ``fit`` trials fully, other trials (validation, evaluation) held-in only.

    Parameters
    ----------
    fit : Batch
        Training trials whose held-out neurons and forward bins may be used.
    heldin_only_sets : sequence of Batch
        Trials that contribute only their held-in observed spikes (see :func:`heldin_only`).
    """
    return concat_batches([fit] + [heldin_only(b) for b in heldin_only_sets])
