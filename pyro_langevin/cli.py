"""The ``pyro-langevin`` console script.

    pyro-langevin nlb --dataset mc_maze_small --data-dir DIR --bin-ms 5 --phase val --out runs/x

``nlb`` trains LangevinFlow on an NLB'21 dataset, selects the best state on a validation split of
the training trials, exports posterior-mean rates, scores them and the smoothing baseline with
nlb_tools' metrics, writes ``metrics.json`` and ``submission.h5``, prints a metrics table and, as
its last line, the metrics JSON. Bad input (missing files, a file without held-out units, an
unknown dataset, a bin size other than 5 or 20) ends with a one-line ``error:`` message on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "nlb_main", "add_nlb_arguments"]

#: Exit status for bad input (as argparse uses).
EXIT_BAD_INPUT = 2


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), so every bad input reads the same."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def add_nlb_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dataset", required=True,
                   help="NLB'21 dataset: mc_maze, mc_rtt, area2_bump, dmfc_rsg, mc_maze_large, "
                        "mc_maze_medium, mc_maze_small")
    p.add_argument("--data-dir", required=True, type=Path,
                   help="folder with the DANDI NWB layout and/or preprocessed {dataset}-{bin}ms-{phase}/ folders")
    p.add_argument("--bin-ms", type=int, default=5, help="bin size, 5 or 20 ms (default 5)")
    p.add_argument("--phase", default="val", help="'val' (score locally) or 'test' (submission only); default val")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/nlb/{dataset}-{bin}ms-{phase})")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per-dataset config)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model and 3 epochs, for smoke checks")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on CPU: this model's many small sequential ops "
                        "run no faster on more threads, and far slower on a shared machine)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a configuration field (pyro_langevin.configs.NLBConfig), e.g. --set latent_dim=32")
    p.add_argument("--resume", action="store_true", help="continue from {out}/checkpoints/last.pt if present")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def _parse_overrides(items: Sequence[str]) -> dict:
    """``["latent_dim=32", "kl_final=0.1"]`` -> ``{"latent_dim": 32, "kl_final": 0.1}`` (JSON values, else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def nlb_main(argv: Optional[Sequence[str]] = None, prog: str = "pyro-langevin nlb") -> int:
    """Run the NLB pipeline from command-line arguments; return the exit status."""
    p = add_nlb_arguments(_ArgumentParser(prog=prog, description="Train, score and submit LangevinFlow on an NLB'21 dataset."))
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argument errors and --help: return the status, do not exit
        return int(exc.code or 0)
    # imports here: `--help` and argument errors stay fast
    from pyro_langevin.batch import BatchError
    from pyro_langevin.data.errors import NLBDataError
    from pyro_langevin.nlb_pipeline import format_table, run_nlb

    try:
        overrides = _parse_overrides(args.set)
    except ValueError as exc:
        p.error(str(exc))
    out = args.out or Path("runs/nlb") / f"{args.dataset}-{args.bin_ms:02d}ms-{args.phase}"
    try:
        metrics = run_nlb(args.dataset, args.data_dir, args.bin_ms, args.phase, out, epochs=args.epochs,
                          device=args.device, seed=args.seed, quick=args.quick, resume=args.resume,
                          progress=not args.no_progress, overrides=overrides, threads=args.threads)
    except (NLBDataError, BatchError, FileNotFoundError, OSError) as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(metrics))
    print(f"wrote {out / 'metrics.json'}, {metrics['submission']} and {metrics['submission_smoothing']}")
    print(json.dumps(metrics))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pyro-langevin``: dispatch to a subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"nlb": nlb_main}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pyro-langevin {nlb} ...\n\n  nlb    train, score and submit LangevinFlow on an "
              "NLB'21 dataset (pyro-langevin nlb --help)")
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] not in commands:
        print(f"pyro-langevin: error: unknown command {argv[0]!r} (expected one of {sorted(commands)})",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return commands[argv[0]](argv[1:], prog=f"pyro-langevin {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
