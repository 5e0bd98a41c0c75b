"""The NLB commands: ``pyro-langevin nlb`` (a run or ``--cv K``) and ``pyro-langevin tune`` (a search).

    pyro-langevin nlb --dataset mc_maze_small --data-dir DIR --bin-ms 5 --phase val --out runs/x
    pyro-langevin tune --dataset mc_maze_small --data-dir DIR --bin-ms 5 --out runs/search

Both check every option before any data is loaded and build one
:class:`~pyro_langevin.nlb.request.NLBRequest`, which :func:`~pyro_langevin.nlb.pipeline.run_nlb`,
:func:`~pyro_langevin.nlb.cv.cross_validate` and :func:`~pyro_langevin.nlb.tune.tune` take. ``nlb``
trains LangevinFlow on an NLB'21 dataset, selects each member's best state on a validation split of
the training trials, exports posterior-mean rates, scores them and the smoothing baseline with
nlb_tools' metrics, writes ``metrics.json`` and ``submission.h5``, prints a metrics table and, as its
last line, the metrics JSON. Bad input (a bad option, missing files, a file without held-out units,
an ``--out`` that holds an earlier run without ``--resume``/``--overwrite``) ends with a one-line
``error:`` message on stderr and exit status 2, and Ctrl-C with one line saying where the checkpoint
is and exit status 130 (SIGTERM: 143) (:mod:`pyro_langevin.console`).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Optional, Sequence

from pyro_langevin.console import Session, run_command
from pyro_langevin.nlb.coarse import resolve_fit_bin
from pyro_langevin.nlb.config import NLBConfig
from pyro_langevin.nlb.data import BIN_SIZES, DANDISETS, PHASES, check_args
from pyro_langevin.nlb.request import NLBRequest
from pyro_langevin.options import (
    ArgumentParser,
    OptionError,
    add_executor_arguments,
    add_run_arguments,
    add_spec_arguments,
    check_out,
    check_resume,
    check_run_options,
    executor_options,
    non_negative_int,
    one_line,
    positive_int,
    spec_overrides,
)
from pyro_langevin.spec import SpecError

__all__ = ["nlb_main", "tune_main", "add_nlb_arguments", "add_tune_arguments", "add_nlb_data_arguments",
           "check_nlb_tools", "NLB_INSTALL"]

#: How to install what the NLB pipeline needs (nlb_tools pins an old pandas, hence --no-deps).
NLB_INSTALL = "pip install -e '.[nlb]' && pip install --no-deps nlb-tools==0.0.4"


def check_nlb_tools() -> None:
    """Raise :class:`~pyro_langevin.options.OptionError` with the install command unless nlb_tools imports."""
    try:
        for module in ("nlb_tools.evaluation", "nlb_tools.make_tensors"):
            importlib.import_module(module)
    except ImportError as exc:
        raise OptionError(f"the NLB pipeline needs nlb_tools ({one_line(exc)}): {NLB_INSTALL}") from None


def _choices(values) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


def add_nlb_data_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--dataset --data-dir --bin-ms --phase --fit-bin-ms`` and the run spec's ``--spec`` / ``--set``
    (shared by ``nlb`` and ``tune``)."""
    p.add_argument("--dataset", required=True, metavar=_choices(sorted(DANDISETS)), help="NLB'21 dataset")
    p.add_argument("--data-dir", required=True, type=Path,
                   help="folder with the DANDI NWB layout and/or preprocessed {dataset}-{bin}ms-{phase}/ folders")
    p.add_argument("--bin-ms", type=int, default=5, metavar=_choices(BIN_SIZES), help="bin size in ms (default 5)")
    p.add_argument("--phase", default="val", metavar=_choices(PHASES),
                   help="'val' (score locally) or 'test' (submission only); default val")
    p.add_argument("--fit-bin-ms", type=int, default=None, metavar=_choices(BIN_SIZES),
                   help="bin size the model fits at (default 20: 5 ms data are summed into 20 ms bins to fit, and "
                        "the rates interpolated back to 5 ms, which cross-validated better and runs 3.5x faster); "
                        "--fit-bin-ms 5 fits 5 ms data at 5 ms")
    add_spec_arguments(p, "pyro_langevin.nlb.config.NLBConfig, e.g. --set eval.n_models=1")
    return p


def _request(args: argparse.Namespace, out: Path, **run: object) -> tuple[NLBRequest, NLBConfig]:
    """The request of the parsed options and its members' configuration, every field checked."""
    check_args(args.dataset, args.bin_ms, args.phase)
    try:
        resolve_fit_bin(args.bin_ms, args.fit_bin_ms)
    except SpecError as exc:
        raise OptionError(f"--fit-bin-ms: {exc}") from None
    try:
        request = NLBRequest(args.dataset, args.data_dir, args.bin_ms, args.phase, out=out, seed=args.seed,
                             fit_bin_ms=args.fit_bin_ms, epochs=args.epochs, quick=args.quick, **run)
        overrides = spec_overrides(args, request.spec())
        request = request.replace(overrides=overrides)
        return request, request.spec()
    except SpecError as exc:
        raise OptionError(one_line(exc)) from None


# ----- nlb -----
def add_nlb_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``pyro-langevin nlb``."""
    add_nlb_data_arguments(p)
    add_run_arguments(p, "nlb/DATASET-BINms-PHASE", "training epochs (default: per-dataset config)")
    p.add_argument("--cv", type=positive_int, default=None, metavar="K",
                   help="K-fold cross-validation over the training trials instead of a submission run: each "
                        "fold's model is scored on trials that chose nothing (writes cv.json and the K fold "
                        "models' averaged rates as submission.h5)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="models trained at once (ensemble members, cross-validation folds), one process and "
                        "one thread each (CPU; default: one per CPU core, at most the number of models)")
    add_executor_arguments(p)
    return p


def _nlb(args: argparse.Namespace, session: Session) -> None:
    """Check every option, then run the pipeline (or the cross-validation) and print its table and JSON."""
    if args.cv is not None and args.cv < 2:
        raise OptionError(f"--cv needs K >= 2 folds, got {args.cv}")
    if "," in args.dataset:
        return _nlb_stitched(args, session)
    executor = executor_options(args)
    request, cfg = _request(args, args.out or Path("."), threads=args.threads, progress=not args.no_progress,
                            resume=args.resume, device=args.device, **executor)
    check_nlb_tools()
    with request.executor().connected():  # a cluster: joined and its resources checked before any work
        _run_nlb(args, session, request, cfg)


def _run_nlb(args: argparse.Namespace, session: Session, request: NLBRequest, cfg: NLBConfig) -> None:
    # what the run records in its checkpoints: a resumed run must match it
    meta = {**request.meta(), "spec": cfg.to_dict()}
    run = session.options = check_run_options(args, f"nlb/{args.dataset}-{args.bin_ms:02d}ms-{args.phase}", meta)
    storage = run.out if request.storage is None else check_out(request.storage, resume=args.resume,
                                                                  overwrite=args.overwrite)
    if args.resume and storage != run.out:
        check_resume(storage / "checkpoints" / "last.pt", meta)
    storage.mkdir(parents=True, exist_ok=True)
    n_models = cfg.eval.n_models * (args.cv or 1)
    request = request.replace(out=run.out, device=run.device, storage=storage,
                              workers=args.workers or request.default_workers(n_models))
    if storage != run.out or args.cv is not None:
        what = "fold" if args.cv is not None else "member"
        session.interrupt_note = lambda: (f"interrupted; the {what}s' checkpoints are in {storage}; rerun with --resume "
                                          "(finished models are not trained again)")
    if args.cv is not None:
        from pyro_langevin.nlb.cv import cross_validate, format_cv_table  # heavy: after the checks

        result = cross_validate(request, k=args.cv)
        print(format_cv_table(result["summary"], args.cv))
        print(f"wrote {run.out / 'cv.json'} and {result['submission']} (the {args.cv} fold models' averaged rates)")
        print(json.dumps({"summary": result["summary"], "ensemble_eval": result["ensemble_eval"]}))
        return
    if cfg.eval.n_models > 1 and storage == run.out:
        session.interrupt_note = lambda: (f"interrupted; each member's checkpoint is in {run.out}/member*/checkpoints; "
                                          "rerun with --resume (finished members are not trained again)")
    from pyro_langevin.nlb.pipeline import format_table, run_nlb  # heavy: after the checks

    metrics = run_nlb(request)
    print(format_table(metrics))
    print(f"wrote {run.out / 'metrics.json'}, {metrics['submission']} and {metrics['submission_smoothing']}")
    print(json.dumps(metrics))


def _nlb_stitched(args: argparse.Namespace, session: Session) -> None:
    """``--dataset A,B,C``: the datasets stitched into one model, one submission (:mod:`pyro_langevin.nlb.stitch`)."""
    names = [n.strip() for n in args.dataset.split(",")]
    if len(set(names)) != len(names):
        raise OptionError(f"--dataset {args.dataset}: a dataset is named twice")
    if args.cv is not None:
        raise OptionError("--cv: not with several --dataset names (cross-validation of a stitched NLB run is not built)")
    executor = executor_options(args)
    run_opts = dict(threads=args.threads, progress=not args.no_progress, resume=args.resume, device=args.device, **executor)
    requests = [_request(argparse.Namespace(**{**vars(args), "dataset": n}), args.out or Path("."), **run_opts)[0]
                for n in names]
    check_nlb_tools()
    meta = {**requests[0].meta(), "dataset": args.dataset, "spec": requests[0].spec().to_dict()}
    run = session.options = check_run_options(args, f"nlb/{'+'.join(names)}-{args.bin_ms:02d}ms-{args.phase}", meta)
    n_models = requests[0].spec().eval.n_models
    requests = [r.replace(out=run.out, device=run.device, storage=run.out,
                          workers=args.workers or r.default_workers(n_models)) for r in requests]
    from pyro_langevin.nlb.stitch import run_nlb_stitched  # heavy: after the checks

    with requests[0].executor().connected():
        metrics = run_nlb_stitched(requests)
    for name, d in metrics["datasets"].items():
        if d["eval"]:
            print(f"{name}: co-bps {d['eval']['model']['co-bps']:.4f} (smoothing {d['eval']['smoothing']['co-bps']:.4f})")
    print(f"wrote {run.out / 'metrics.json'}, {metrics['submission']} and {metrics['submission_smoothing']}")
    print(json.dumps(metrics))


def nlb_main(argv: Optional[Sequence[str]] = None, prog: str = "pyro-langevin nlb") -> int:
    """Run the NLB pipeline from command-line arguments; return the exit status."""
    p = add_nlb_arguments(ArgumentParser(prog=prog, description="Train, score and submit LangevinFlow on an NLB'21 dataset."))
    return run_command(lambda session: _nlb(p.parse_args(argv), session), prog)


# ----- tune -----
def add_tune_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``pyro-langevin tune``."""
    from pyro_langevin.nlb.tune import SCHEDULERS

    add_nlb_data_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/tune/DATASET-BINms-PHASE)")
    p.add_argument("--scheduler", default="pbt", choices=SCHEDULERS, help="default pbt")
    p.add_argument("--num-samples", type=positive_int, default=None, help="trials, the PBT population (default 8; --quick 2)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial, fractions allowed (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed (default 0)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="stop the search after this long")
    p.add_argument("--address", default=None, help="an existing Ray cluster: 'auto' or HOST:PORT (default: a local instance)")
    p.add_argument("--storage", default=None, help="where Ray keeps the experiment (default --out; shared storage on a cluster)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search (Ray's own restore)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny networks, 4 epochs, 2 trials")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per trial (default: per-dataset config)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--space-file", type=Path, default=None, help="JSON search space (see docs/tune.md)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                   help="override one key: lr=loguniform:1e-4:1e-2, latent_dim=choice:16,32, dropout=0.3")
    p.add_argument("--top-k", type=positive_int, default=1, help="submission from the mean rates of the k best trials")
    return p


def _tune(args: argparse.Namespace, session: Session) -> None:
    from pyro_langevin.nlb.tune import BEST, format_params, parse_space, tune

    out = args.out or Path("runs/tune") / f"{args.dataset}-{args.bin_ms:02d}ms-{args.phase}"
    request, _ = _request(args, out, resume=args.resume)
    space = parse_space(args.space_file, args.space, quick=args.quick, scheduler=args.scheduler)
    session.interrupt_note = lambda: "interrupted; the search's state is saved: rerun the same command with --resume"
    best = tune(request, scheduler=args.scheduler, num_samples=args.num_samples, cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial, time_budget=args.time_budget, address=args.address,
                storage=args.storage, space=space, top_k=args.top_k)
    print(f"best trial {best['trial_id']}: validation co-bps {best[BEST]:.4f} ({format_params(best['params'])})")
    print(f"wrote {out}/trials.csv, best_config.json, population.png and {best['submission']}")
    print(json.dumps({k: best[k] for k in ("trial_id", BEST, "best_epoch", "params", "n_trials", "search_seconds")}))
    if best["interrupted"]:  # run_command prints the interrupt line (rerun with --resume), status 130
        raise KeyboardInterrupt


def tune_main(argv: Optional[Sequence[str]] = None, prog: str = "pyro-langevin tune") -> int:
    """Run a hyperparameter search from command-line arguments; return the exit status."""
    p = add_tune_arguments(ArgumentParser(prog=prog, description="Search LangevinFlow's NLB configuration on Ray Tune."))
    return run_command(lambda session: _tune(p.parse_args(argv), session), prog)
