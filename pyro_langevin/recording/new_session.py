"""A new session for a saved stitched run: only its read-in and read-out train, the rest frozen.

:func:`add_session` (``pyro-langevin fit --from RUN --arrays NEW.npz --out RUN_NEW``) loads the stitched
run, grows its :class:`~pyro_langevin.sessions.SessionLayout` by the new session, copies every saved
parameter, turns ``requires_grad`` off for all but the new session's read-in and read-out
(:func:`~pyro_langevin.stitching.grow`) and fits those on the new session's trials, into a new
folder; the old run is only read. :func:`check_new_session` is every check, done before anything is
written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from pyro_langevin.devices import check_device
from pyro_langevin.recording.data import Recording, RecordingError
from pyro_langevin.recording.stitch import check_same_grid, fit_record, session_outputs, write_metrics
from pyro_langevin.sessions import Session, SessionError, SessionLayout, check_session_name
from pyro_langevin.spec import SpecError, load_run, run_meta
from pyro_langevin.stitching import embed_session, grow, split_sessions
from pyro_langevin.training import fit

__all__ = ["stitched_run", "check_new_session", "add_session"]

PathLike = Union[str, Path]


def stitched_run(run: PathLike) -> Any:
    """The saved stitched run in ``run`` (``load_run`` of its best checkpoint), or a one-line error."""
    run = Path(run)
    try:
        loaded = load_run(run, "best")
    except (FileNotFoundError, SpecError, ValueError) as exc:
        raise RecordingError(f"--from {run}: not a saved run ({str(exc).splitlines()[0]})") from None
    if "sessions" not in (loaded.checkpoint.get("meta") or {}):
        raise RecordingError(f"--from {run}: a one-session run, not a stitched one: sessions can be added only to a "
                             "run fitted with several --arrays/--nwb files")
    return loaded


def check_new_session(run: PathLike, recording: Recording, name: Optional[str] = None):
    """``(loaded run, grown layout, name)`` once ``recording`` can join the stitched run ``run``: the run
    is a stitched one, the name is new, the bins are the run's, there are trials to fit and validate.

    Raises
    ------
    RecordingError
        One line naming the run or the file.
    """
    loaded = stitched_run(run)
    meta = loaded.checkpoint["meta"]
    layout = SessionLayout.from_dict(meta["sessions"])
    name = name or Path(recording.source).stem
    try:
        check_session_name(name)
        grown = layout.with_session(Session(name, recording.n_units, 0, recording.n_trials))
    except SessionError as exc:
        raise RecordingError(f"{recording.source}: {exc}") from None
    if meta.get("grid"):
        check_same_grid(recording, meta["grid"], f"the run {run}")
    if recording.n_trials < 2:
        raise RecordingError(f"{recording.source}: {recording.n_trials} trial; the new session needs at least 2 "
                             "(one validates)")
    return loaded, grown, name


def add_session(run: PathLike, recording: Recording, out: PathLike, *, name: Optional[str] = None,
                epochs: Optional[int] = None, seed: int = 0, device: Any = None, progress: bool = True,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Add ``recording`` as a new session to the stitched run ``run``; write the grown run to ``out``.

    Only the new session's read-in and read-out train: every other parameter has ``requires_grad``
    off (:func:`~pyro_langevin.stitching.freeze_shared`), so Adam never steps it and the shared
    parameters (and the other sessions') stay bit-identical. The new read-in starts random, its
    read-out bias at the log mean counts. ``out`` gets ``spec.json``, ``checkpoints/`` (the grown
    run: every session, loadable with ``load_run``), ``sessions/<name>/posterior.nc`` and figures,
    and ``metrics.json``. ``run`` is only read.
    """
    t_start = time.perf_counter()
    out, dev = Path(out), check_device(device)
    loaded, grown, name = check_new_session(run, recording, name)
    meta = loaded.checkpoint["meta"]
    cfg = loaded.spec
    fit_cfg = dataclasses.replace(cfg.fit, seed=seed, **({"epochs": int(epochs)} if epochs else {}))
    cfg = dataclasses.replace(cfg, fit=fit_cfg)
    batch = embed_session(recording.batch(), grown, name)
    fit_trials, valid = split_sessions(batch, grown, cfg.eval.valid_frac, seed)
    try:
        model, guide, trainable = grow(cfg, loaded.model, loaded.guide, grown.sessions[-1], fit_trials)
    except SessionError as exc:
        raise RecordingError(f"--from {run}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log(f"adding session {name} ({recording.source}: {recording.n_trials} trials x {recording.n_units} units) to "
        f"{run}: training only {', '.join(trainable)}; {fit_trials.n_trials} fit, {valid.n_trials} validation trials")
    t0 = time.perf_counter()
    result = fit(model, guide, fit_trials, valid, cfg.fit, device=dev, checkpoint_dir=out / "checkpoints",
                 progress=progress, init_rates=False,
                 meta=run_meta(cfg, grown.n_neurons, grown.n_heldin, **{k: v for k, v in meta.items() if k not in
                               ("spec", "spec_class", "spec_module", "n_neurons", "n_heldin", "sessions")},
                               sessions=grown.to_dict(), added_session=name, added_to=str(run)))
    new_run = load_run(out, "best", map_location=dev)
    record = fit_record(result, new_run.checkpoint, time.perf_counter() - t0, fit_trials.n_trials)
    _, _, paths = session_outputs(new_run.model, new_run.guide, grown, [recording], [name], cfg, out, seed, dev, log)
    metrics = {"added_session": name, "from": str(run), "sessions": {name: {"source": recording.source,
               "trials": recording.n_trials, "units": recording.n_units, **paths[name]}},
               "trained": trainable, "fit": record, "seconds": {"total": round(time.perf_counter() - t_start, 1)},
               "seed": seed, "device": str(dev), "spec": cfg.to_dict(),
               "outputs": {"spec": str(out / "spec.json"), "checkpoints": str(out / "checkpoints"),
                           "metrics": str(out / "metrics.json")}}
    write_metrics(out, metrics)
    return metrics
