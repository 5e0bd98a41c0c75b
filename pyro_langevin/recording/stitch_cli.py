"""``pyro-langevin fit`` with several files (stitched sessions) or ``--from RUN`` (a session added to a run).

    pyro-langevin fit --arrays A.npz --arrays B.npz --counts spikes --condition cond --bin-ms 20 --out runs/AB
    pyro-langevin fit --from runs/AB --arrays C.npz --counts spikes --bin-ms 20 --out runs/ABC

As for one file (:mod:`pyro_langevin.recording.cli`), every option and every file is checked before
anything is written: different bin widths or windows, a session with too few trials for its folds,
duplicate names, ``--from`` a run that is not a stitched one, a new session already in the run: one
``error:`` line naming the file, exit status 2, no output folder. The runs are
:func:`~pyro_langevin.recording.stitch.fit_recordings` and :func:`~pyro_langevin.recording.stitch.add_session`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pyro_langevin.console import Session
from pyro_langevin.executor import Executor
from pyro_langevin.options import (OptionError, check_out, check_run_options, default_out, executor_options, one_line,
                                   spec_overrides)
from pyro_langevin.recording.config import RecordingConfig
from pyro_langevin.recording.data import Recording
from pyro_langevin.recording.new_session import add_session, check_new_session
from pyro_langevin.recording.stitch import (StitchOptions, check_sessions, check_shared_conditions, fit_recordings,
                                            stitched_config)
from pyro_langevin.spec import SpecError

__all__ = ["fit_sessions", "format_stitched_summary"]

#: ``read_recording(args, path)``: one file as the options say.
Reader = Callable[[argparse.Namespace, Path], Recording]


def _prepare_out(args: argparse.Namespace, name: str) -> None:
    if args.out is None:
        args.out = default_out(name, args.quick)
    if args.from_run is not None and Path(args.out).resolve() == Path(args.from_run).resolve():
        raise OptionError(f"--out {args.out} is the --from run: the grown run goes to a new folder (the old one is "
                          "never changed)")
    check_out(args.out, resume=args.resume, overwrite=args.overwrite)  # before reading: nothing is written yet


def _add(args: argparse.Namespace, session: Session, files: Sequence[Path], read_recording: Reader) -> None:
    if len(files) != 1:
        raise OptionError(f"--from {args.from_run} adds one session at a time; got {len(files)} files")
    if args.resume:
        raise OptionError("--resume: not with --from (adding a session is a short fit; start it again)")
    names = args.session_names
    if names is not None and len(names) != 1:
        raise OptionError(f"--session-names gives {len(names)} names for 1 file")
    _prepare_out(args, f"fit/{Path(args.from_run).name}+{Path(files[0]).stem}")
    recording = read_recording(args, files[0])
    check_new_session(args.from_run, recording, names[0] if names else None)
    run = session.options = check_run_options(args, "fit")
    metrics = add_session(args.from_run, recording, run.out, name=names[0] if names else None, epochs=args.epochs,
                          seed=args.seed, device=run.device, progress=not args.no_progress)
    (name, s), = metrics["sessions"].items()
    f = metrics["fit"]
    print(f"== session {name} added to {metrics['from']} (shared parts frozen: trained "
          f"{len(metrics['trained'])} tensors of its read-in and read-out)\n"
          f"fit      {f['epochs_run']} epochs, best at epoch {f['best_epoch']} (validation loss "
          f"{f['best_val_loss']:.4f}), {f['fit_seconds']:.0f} s\nwrote    {s['posterior']}, {metrics['outputs']['checkpoints']}/, "
          f"{metrics['outputs']['metrics']}")


def fit_sessions(args: argparse.Namespace, session: Session, files: Sequence[Path], read_recording: Reader,
                 print_headline: Callable[[dict, Path], None]) -> None:
    """``pyro-langevin fit`` for several files, or with ``--from`` (see the module docstring).

    ``read_recording(args, path)`` and ``print_headline(metrics, out)`` are the one-file command's
    (:mod:`pyro_langevin.recording.cli`, which calls this), so both commands read and report alike.
    """
    if args.cv == 1:
        raise OptionError("--cv needs K >= 2 folds (or 0: no cross-validation)")
    on = executor_options(args)
    if args.from_run is not None:
        return _add(args, session, files, read_recording)
    if len(files) < 2:
        raise OptionError("--session-names names the sessions of a stitched fit: give two or more --arrays/--nwb files")
    _prepare_out(args, "fit/" + "+".join(Path(f).stem for f in files))
    recordings = [read_recording(args, f) for f in files]
    names = check_sessions(recordings, args.session_names)
    try:
        changes = spec_overrides(args, RecordingConfig())
        if args.cv is not None:
            changes["cv.folds"] = args.cv
        cfg = stitched_config(recordings, changes, args.quick, args.epochs)
        opts = StitchOptions(readin_dim=args.readin_dim, readin_init=args.readin_init, train_readin=args.train_readin)
    except SpecError as exc:
        raise OptionError(one_line(exc)) from None
    if opts.init(recordings) == "pcr":
        check_shared_conditions(recordings)
    run = session.options = check_run_options(args, "fit")
    workers = args.workers or max(1, min(cfg.cv.folds * cfg.eval.n_models or 1, os.cpu_count() or 1))
    session.interrupt_note = lambda: (f"interrupted; the checkpoints are in {run.out}/cv/fold*/ and {run.out}/checkpoints/: "
                                      "rerun the same command with --resume")
    executor = Executor(workers=workers, address=on["address"], cpus_per_member=on["cpus_per_member"],
                        gpus_per_member=on["gpus_per_member"])
    with executor.connected():
        metrics = fit_recordings(recordings, run.out, names=names, config=cfg, overrides=changes, epochs=args.epochs,
                                 quick=args.quick, stitch=opts, seed=args.seed, device=run.device, workers=workers,
                                 executor=executor if executor.on_ray else None, resume=args.resume,
                                 progress=not args.no_progress)
    print(format_stitched_summary(metrics))
    print_headline(metrics, run.out)


def format_stitched_summary(metrics: Mapping[str, Any]) -> str:
    """The one-screen summary of a stitched fit: each session's size and cross-validated score."""
    d, st = metrics["data"], metrics["stitch"]
    lines = [f"== {len(metrics['sessions'])} sessions stitched: {d['bins']} bins of {d['bin_ms']:g} ms; read-in "
             f"{st['readin_dim']} wide, {st['readin_init_used']} init, {'trained' if st['readin_trained'] else 'fixed'}"]
    for name, s in metrics["sessions"].items():
        line = f"  {name:<16} {s['trials']} trials x {s['units']} units"
        cv = s.get("cv")
        if cv:
            m, b, diff = cv["model"]["co-bps"], cv["smoothing"]["co-bps"], cv["difference"]["co-bps"]
            line += (f"   co-bps {m['mean']:.4f} +- {m['se']:.4f}, smoothing {b['mean']:.4f} +- {b['se']:.4f}, "
                     f"difference {diff['mean']:+.4f} +- {diff['se']:.4f}")
        lines.append(line)
        lines.append(f"  {'':<16} {s['posterior']}")
    f = metrics["fit"]
    lines.append(f"fit      {f['epochs_run']} epochs, best at epoch {f['best_epoch']} (validation loss "
                 f"{f['best_val_loss']:.4f}), {f['fit_seconds']:.0f} s")
    o = metrics["outputs"]
    lines.append(f"wrote    {o['spec']}, {o['checkpoints']}/ (load_run), {o['posterior']}, {o['metrics']}, "
                 + ", ".join(Path(p).name for p in o["figures"].values()))
    return "\n".join(lines)
