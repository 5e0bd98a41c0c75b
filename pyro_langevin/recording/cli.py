"""``pyro-langevin fit``: your own recording (an NWB file or arrays) in; rates, latents and an honest score out.

    pyro-langevin fit --nwb rec.nwb --align move_onset_time --window -250,450 --bin-ms 20 --out runs/rec
    pyro-langevin fit --arrays counts.npz --counts spikes --bin-ms 10 --condition cond --out runs/rec

Every option is checked, and the recording read, before anything is written: bad input (an option,
a file, a table or column that is not there, a window that does not fit, counts that are not counts,
an ``--out`` holding an earlier run without ``--resume``/``--overwrite``) ends with one ``error:``
line naming the file and the field, and exit status 2 (:mod:`pyro_langevin.console`). The run itself
is :func:`~pyro_langevin.recording.run.fit_recording`; at the end a one-screen summary is printed and,
as the last line, the headline numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

from pyro_langevin.console import Session, run_command
from pyro_langevin.executor import Executor
from pyro_langevin.options import (
    ArgumentParser,
    OptionError,
    add_executor_arguments,
    add_run_arguments,
    add_spec_arguments,
    check_out,
    check_run_options,
    default_out,
    executor_options,
    non_negative_int,
    one_line,
    positive_int,
    spec_overrides,
)
from pyro_langevin.recording.config import RecordingConfig
from pyro_langevin.recording.data import Recording, read_arrays
from pyro_langevin.spec import SpecError

__all__ = ["fit_main", "add_fit_arguments", "read_recording", "sources", "print_headline"]

#: Options that read the NWB tables (refused with --arrays).
NWB_ONLY = ("align", "trials", "where", "units", "min_rate", "drop_short")


def _window(text: str) -> Tuple[float, float]:
    """argparse type: ``START,STOP`` in ms."""
    parts = text.split(",")
    try:
        a, b = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,STOP in ms (e.g. -250,450), got {text!r}") from None
    return a, b


def _ids(text: str) -> list:
    """argparse type: comma-separated unit ids."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated unit ids (e.g. 3,7,12), got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_fit_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``pyro-langevin fit``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--nwb", type=Path, metavar="FILE", action="append",
                     help="an NWB file with a trials table and a units table; repeat it to stitch sessions (one "
                          "file each) into one model")
    src.add_argument("--arrays", type=Path, metavar="FILE", action="append",
                     help="an .npz or .h5 file with a counts array (trial, time, unit) under --counts; repeat it to "
                          "stitch sessions")
    s = p.add_argument_group("many sessions (docs/stitching.md)")
    s.add_argument("--session-names", type=_names, default=None, metavar="A,B,...",
                   help="the sessions' names, one per file (default: the files' stems)")
    s.add_argument("--from", dest="from_run", type=Path, default=None, metavar="RUN",
                   help="add the file as a new session to the stitched run RUN (only its read-in and read-out "
                        "train; RUN is not changed; the grown run goes to --out)")
    s.add_argument("--readin-dim", type=non_negative_int, default=0, metavar="D",
                   help="width of the per-session read-in (default: the smallest session's units, at most 32)")
    s.add_argument("--readin-init", choices=("auto", "pcr", "random"), default="auto",
                   help="read-in initialisation: PCR alignment of the condition averages (needs --condition), "
                        "random, or auto (PCR when every session has conditions)")
    trains = s.add_mutually_exclusive_group()
    trains.add_argument("--freeze-readin", dest="train_readin", action="store_false", default=None,
                        help="keep the read-ins at their initial value (default after PCR)")
    trains.add_argument("--train-readin", dest="train_readin", action="store_true", default=None,
                        help="train the read-ins after their initialisation (default after a random start)")
    g = p.add_argument_group("what to read")
    g.add_argument("--bin-ms", type=_positive_float, default=20.0, help="bin width in ms (default 20)")
    g.add_argument("--align", default="start_time", metavar="EVENT",
                   help="trials column holding the event to align on, in seconds (default start_time)")
    g.add_argument("--window", type=_window, default=None, metavar="START,STOP",
                   help="ms around the event, a whole number of bins inside every trial (e.g. -250,450); default: "
                        "each trial from start_time to stop_time, shorter ones padded and masked")
    g.add_argument("--drop-short", action="store_true",
                   help="drop the trials the window does not fit (or that lack the event) instead of refusing them")
    g.add_argument("--trials", default=None, metavar="EXPR",
                   help="select trials: a pandas query over the trials table, e.g. \"split == 'train'\" or \"id < 50\"")
    g.add_argument("--units", type=_ids, default=None, metavar="ID,...", help="keep these unit ids (the units table's id)")
    g.add_argument("--where", default=None, metavar="EXPR",
                   help="select units: a pandas query over the units table, e.g. \"quality == 'good'\"")
    g.add_argument("--min-rate", type=_non_negative_float, default=None, metavar="HZ",
                   help="keep units firing at least this mean rate over the binned trials")
    g.add_argument("--condition", default=None, metavar="NAME",
                   help="a trials column (NWB) or an array (--arrays) labelling each trial's condition, for "
                        "PSTHs and figures")
    g.add_argument("--behavior", default=None, metavar="NAME",
                   help="a TimeSeries in acquisition/processing (NWB) or an array (trial, time[, B]) (--arrays), "
                        "averaged per bin; cross-validated decoding R^2 is reported")
    g.add_argument("--counts", default="counts", metavar="KEY", help="the counts array's key in --arrays (default counts)")
    add_run_arguments(p, "fit/RECORDING", "training epochs (default: chosen by the recording's size)",
                      quick_help="a smoke run: tiny model, 3 epochs, 2 folds")
    p.add_argument("--cv", type=non_negative_int, default=None, metavar="K",
                   help="K-fold co-smoothing cross-validation (default: 5, fewer for small recordings; 0: no score)")
    p.add_argument("--recipe", choices=("search", "default"), default=None,
                   help="search (the default for one recording): choose the recipe on the recording's own trials "
                        "(candidates scored by Poisson data thinning, ASHA on Ray; inside every CV fold on its other "
                        "trials); default: the sized defaults as they are, no search (docs/recording.md)")
    p.add_argument("--save-draws", type=non_negative_int, default=0, metavar="N",
                   help="also store N posterior draws of every trial's rates and latents in posterior.nc, with "
                        "(chain, draw) dimensions for az.summary / az.hdi / az.plot_posterior (default 0: summaries only)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="cross-validation folds trained at once, one process each (CPU; default one per core)")
    add_executor_arguments(p, storage=False)  # the folds' checkpoints stay in --out
    add_spec_arguments(p, "pyro_langevin.recording.config.RecordingConfig, e.g. --set cv.heldout_frac=0.3")
    # "--window -250,450" is a value, not an option (argparse takes only plain negative numbers as values)
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.]*,-?[\d.]+$")
    return p


def _names(text: str) -> list:
    """argparse type: comma-separated session names."""
    return [x.strip() for x in text.split(",")]


def sources(args: argparse.Namespace) -> list:
    """The files the options name, one per session (``--arrays`` or ``--nwb``, in order)."""
    return list(args.arrays if args.arrays is not None else args.nwb)


def read_recording(args: argparse.Namespace, path: Optional[Path] = None) -> Recording:
    """The recording of ``path`` (default: the one file the options name) read as the options say
    (raises a one-line error naming the file and the field)."""
    if args.arrays is not None:
        path = path or args.arrays[0]
        used = [f"--{name.replace('_', '-')}" for name in NWB_ONLY
                if getattr(args, name) not in (None, False, "start_time")]
        if used:
            verb = "reads" if len(used) == 1 else "read"
            raise OptionError(f"{', '.join(used)} {verb} the NWB trials and units tables: not with --arrays {path}")
        start = 0.0 if args.window is None else args.window[0]
        rec = read_arrays(path, args.bin_ms, args.counts, args.behavior, args.condition, start_ms=start)
        if args.window is not None and abs((args.window[1] - args.window[0]) - rec.n_bins * args.bin_ms) > 1e-6:
            raise OptionError(f"--window {args.window[0]:g},{args.window[1]:g} is {args.window[1] - args.window[0]:g} ms, "
                              f"but {path} holds {rec.n_bins} bins of {args.bin_ms:g} ms")
        return rec
    from pyro_langevin.recording.nwb import read_nwb

    if args.counts != "counts":
        raise OptionError("--counts names the counts array of --arrays: not with --nwb")
    return read_nwb(path or args.nwb[0], bin_ms=args.bin_ms, align=args.align, window_ms=args.window, units=args.units,
                    where=args.where, min_rate_hz=args.min_rate, trials=args.trials, condition=args.condition,
                    behavior=args.behavior, drop_short=args.drop_short)


def _fit(args: argparse.Namespace, session: Session) -> None:
    files = sources(args)
    if args.from_run is not None or len(files) > 1 or args.session_names is not None:
        from pyro_langevin.recording.stitch_cli import fit_sessions  # heavy: only for stitched runs

        if args.recipe == "search" or args.save_draws:
            raise OptionError(f"--{'recipe search' if args.recipe == 'search' else 'save-draws'} is for one-session fits; "
                              "a stitched run fits the sized defaults and writes posterior summaries")

        return fit_sessions(args, session, files, read_recording, print_headline)
    source = files[0]
    name = f"fit/{Path(source).stem}"
    if args.cv == 1:
        raise OptionError("--cv needs K >= 2 folds (or 0: no cross-validation)")
    on = executor_options(args)  # checked before anything is read or written
    if args.out is None:
        args.out = default_out(name, args.quick)
    check_out(args.out, resume=args.resume, overwrite=args.overwrite)  # before reading: nothing is written yet
    recording = read_recording(args)
    from pyro_langevin.recording.run import format_summary, recording_config, fit_recording  # heavy: after the checks

    try:
        changes = spec_overrides(args, RecordingConfig())
        if args.cv is not None:
            changes["cv.folds"] = args.cv
        cfg = recording_config(recording, changes, args.quick, args.epochs, search=(args.recipe or "search") == "search")
    except SpecError as exc:
        raise OptionError(one_line(exc)) from None
    run = session.options = check_run_options(args, name)
    workers = args.workers or max(1, min(cfg.cv.folds * cfg.eval.n_models or 1, os.cpu_count() or 1))
    session.interrupt_note = lambda: (f"interrupted; the checkpoints are in {run.out}/cv/fold*/ and {run.out}/checkpoints/: "
                                      "rerun the same command with --resume")
    executor = Executor(workers=workers, address=on["address"], cpus_per_member=on["cpus_per_member"],
                        gpus_per_member=on["gpus_per_member"])
    with executor.connected():  # a cluster: joined and its resources checked before any work
        metrics = fit_recording(recording, run.out, config=cfg, overrides=changes, epochs=args.epochs,
                                quick=args.quick, seed=args.seed, device=run.device, workers=workers,
                                executor=executor if executor.on_ray else None, resume=args.resume,
                                progress=not args.no_progress, recipe=args.recipe or "search",
                                save_draws=args.save_draws)
    print(format_summary(metrics))
    print_headline(metrics, run.out)


def print_headline(metrics: dict, out: Path) -> None:
    """The last line of ``pyro-langevin fit``: the headline numbers as JSON."""
    cv = metrics["cv"]
    head = {"out": str(out), "seconds": metrics["seconds"]["total"]}
    if metrics.get("recipe"):
        head["recipe"] = metrics["recipe"]["winner"]
    if cv:
        sm = cv["summary"]
        head.update({"co_bps": sm["model"]["co-bps"]["mean"], "co_bps_se": sm["model"]["co-bps"]["se"],
                     "smoothing_co_bps": sm["smoothing"]["co-bps"]["mean"],
                     "difference": sm["difference"]["co-bps"]["mean"], "difference_se": sm["difference"]["co-bps"]["se"]})
        if "vel R2" in sm["model"]:
            head.update({"vel_r2": sm["model"]["vel R2"]["mean"], "smoothing_vel_r2": sm["smoothing"]["vel R2"]["mean"]})
    print(json.dumps(head))


def fit_main(argv: Optional[Sequence[str]] = None, prog: str = "pyro-langevin fit") -> int:
    """Fit a recording from command-line arguments; return the exit status."""
    p = add_fit_arguments(ArgumentParser(
        prog=prog, description="Fit LangevinFlow to your own recording: NWB or arrays in; rates, latents, figures "
                               "and a cross-validated co-smoothing score out."))
    return run_command(lambda session: _fit(p.parse_args(argv), session), prog)
