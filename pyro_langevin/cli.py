"""The ``pyro-langevin`` console script.

    pyro-langevin nlb --dataset mc_maze_small --data-dir DIR --bin-ms 5 --phase val --out runs/x

``nlb`` trains LangevinFlow on an NLB'21 dataset, selects the best state on a validation split of
the training trials, exports posterior-mean rates, scores them and the smoothing baseline with
nlb_tools' metrics, writes ``metrics.json`` and ``submission.h5``, prints a metrics table and, as
its last line, the metrics JSON. Every option is checked before any data is loaded
(:mod:`pyro_langevin.options`); bad input (a bad option, missing files, a file without held-out
units, an ``--out`` that holds an earlier run without ``--resume``/``--overwrite``) ends with a
one-line ``error:`` message on stderr and exit status 2, and Ctrl-C with one line saying where
the checkpoint is and exit status 130 (SIGTERM: 143) (:mod:`pyro_langevin.console`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from pyro_langevin import __version__
from pyro_langevin.console import Session, run_command
from pyro_langevin.nlb.data import BIN_SIZES, DANDISETS, PHASES
from pyro_langevin.options import (
    EXIT_BAD_INPUT,
    ArgumentParser,
    OptionError,
    positive_int,
    add_run_arguments,
    check_fit_bin,
    check_nlb_config,
    check_nlb_tools,
    check_run_options,
)

__all__ = ["main", "nlb_main", "add_nlb_arguments", "add_nlb_data_arguments"]


def _choices(values) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


def add_nlb_data_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--dataset --data-dir --bin-ms --phase`` (shared by ``nlb`` and ``tune``)."""
    p.add_argument("--dataset", required=True, metavar=_choices(sorted(DANDISETS)),
                   help="NLB'21 dataset")
    p.add_argument("--data-dir", required=True, type=Path,
                   help="folder with the DANDI NWB layout and/or preprocessed {dataset}-{bin}ms-{phase}/ folders")
    p.add_argument("--bin-ms", type=int, default=5, metavar=_choices(BIN_SIZES), help="bin size in ms (default 5)")
    p.add_argument("--phase", default="val", metavar=_choices(PHASES),
                   help="'val' (score locally) or 'test' (submission only); default val")
    return p


def add_nlb_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_nlb_data_arguments(p)
    add_run_arguments(p, "nlb/DATASET-BINms-PHASE", "training epochs (default: per-dataset config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the run spec (pyro_langevin.nlb.config.NLBConfig) by its dotted "
                        "key, e.g. --set model.latent_dim=32 --set fit.lr=1e-3 --set eval.n_models=1")
    p.add_argument("--fit-bin-ms", type=int, default=None, metavar=_choices(BIN_SIZES),
                   help="bin size the model fits at (default 20: 5 ms data are summed into 20 ms bins to fit, and "
                        "the rates interpolated back to 5 ms, which cross-validated better and runs 3.5x faster); "
                        "--fit-bin-ms 5 fits 5 ms data at 5 ms")
    p.add_argument("--cv", type=positive_int, default=None, metavar="K",
                   help="K-fold cross-validation over the training trials instead of a submission run: each "
                        "fold's model is scored on trials that chose nothing (writes cv.json and the K fold "
                        "models' averaged rates as submission.h5)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="models trained at once (ensemble members, cross-validation folds), one process and "
                        "one thread each (CPU; default: one per CPU core, at most the number of models)")
    return p


def _nlb(args: argparse.Namespace, session: Session) -> None:
    """Check every option, then run the pipeline and print its table and metrics JSON."""
    fit_bin = check_fit_bin(args.dataset, args.bin_ms, args.phase, args.fit_bin_ms)
    cfg = check_nlb_config(args.dataset, fit_bin, args.phase, quick=args.quick, epochs=args.epochs,
                           overrides=args.set, seed=args.seed)
    check_nlb_tools()
    # what run_nlb records in its checkpoints: a resumed run must match it
    meta = {"dataset": args.dataset, "bin_ms": args.bin_ms, "phase": args.phase, "spec": cfg.to_dict(),
            "seed": args.seed, "fit_bin_ms": fit_bin}
    run = session.options = check_run_options(args, f"nlb/{args.dataset}-{args.bin_ms:02d}ms-{args.phase}", meta)

    if args.cv is not None:
        session.interrupt_note = lambda: (f"interrupted; cross-validation runs cannot be resumed (rerun with "
                                          f"--overwrite); fold checkpoints are in {run.out}")
        _cross_validate(args, cfg, run)
        return
    if cfg.eval.n_models > 1:
        session.interrupt_note = lambda: (f"interrupted; each member's checkpoint is in {run.out}/member*/checkpoints; "
                                          "rerun with --resume")
    from pyro_langevin.nlb.pipeline import format_table, run_nlb  # heavy: after the checks

    workers = args.workers or min(cfg.eval.n_models, os.cpu_count() or 1)
    metrics = run_nlb(args.dataset, args.data_dir, args.bin_ms, args.phase, run.out, device=run.device,
                      seed=args.seed, quick=args.quick, config=cfg, resume=args.resume,
                      progress=not args.no_progress, threads=args.threads, workers=workers, fit_bin_ms=fit_bin)
    print(format_table(metrics))
    print(f"wrote {run.out / 'metrics.json'}, {metrics['submission']} and {metrics['submission_smoothing']}")
    print(json.dumps(metrics))


def _cross_validate(args: argparse.Namespace, cfg, run) -> None:
    """``--cv K``: cross-validation over the training trials; prints the table and the summary JSON."""
    if args.cv < 2:
        raise OptionError(f"--cv needs K >= 2 folds, got {args.cv}")
    if args.resume:
        raise OptionError("--cv runs cannot be resumed; start afresh with --overwrite")
    from pyro_langevin.nlb.cv import cross_validate, format_cv_table  # heavy: after the checks

    workers = args.workers or min(args.cv * cfg.eval.n_models, os.cpu_count() or 1)
    result = cross_validate(args.dataset, args.data_dir, args.bin_ms, args.phase, run.out, k=args.cv, seed=args.seed,
                            config=cfg, device=run.device, threads=args.threads, workers=workers,
                            progress=not args.no_progress, fit_bin_ms=args.fit_bin_ms)
    print(format_cv_table(result["summary"], args.cv))
    print(f"wrote {run.out / 'cv.json'} and {result['submission']} (the {args.cv} fold models' averaged rates)")
    print(json.dumps({"summary": result["summary"], "ensemble_eval": result["ensemble_eval"]}))


def nlb_main(argv: Optional[Sequence[str]] = None, prog: str = "pyro-langevin nlb") -> int:
    """Run the NLB pipeline from command-line arguments; return the exit status."""
    p = add_nlb_arguments(ArgumentParser(prog=prog, description="Train, score and submit LangevinFlow on an NLB'21 dataset."))
    return run_command(lambda session: _nlb(p.parse_args(argv), session), prog)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pyro-langevin``: dispatch to a subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from pyro_langevin.tune import tune_main

    commands = {"nlb": nlb_main, "tune": tune_main}
    if argv and argv[0] == "--version":
        print(f"pyro-langevin {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pyro-langevin {nlb,tune} ... | --version\n\n  nlb    train, score and submit LangevinFlow on an "
              "NLB'21 dataset (pyro-langevin nlb --help)\n  tune   search its configuration on Ray Tune "
              "(pyro-langevin tune --help)")
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] not in commands:
        print(f"pyro-langevin: error: unknown command {argv[0]!r} (expected one of {sorted(commands)})",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return commands[argv[0]](argv[1:], prog=f"pyro-langevin {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
