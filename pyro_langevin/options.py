"""Command-line options of ``pyro-langevin`` and ``examples/*.py``, validated in one place.

Every entry point parses its own arguments (its argparse lives in its own file) and then calls
:func:`check_run_options`, which checks the options every run shares before any data is loaded
or any model is trained:

* ``--epochs``, ``--seed``, ``--threads``: integers in range (argparse types :func:`positive_int`,
  :func:`non_negative_int`);
* ``--device``: ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where a GPU is present
  (:func:`~pyro_langevin.devices.check_device`, the check :func:`~pyro_langevin.training.fit` makes too);
* ``--out``: a folder that can be created and that holds no earlier run unless ``--resume`` or
  ``--overwrite`` says what to do with it (:func:`check_out`); ``--quick`` runs default to their
  own folder (:func:`default_out`);
* ``--resume``: a readable ``last.pt`` written by the same kind of run (:func:`check_resume`; the
  rule of what may differ is :func:`~pyro_langevin.checkpoints.resume_conflicts`);
* ``--set KEY=VALUE`` and ``--spec FILE``: settings of a run spec by dotted key
  (:func:`add_spec_arguments`, :func:`spec_overrides`).

Bad input raises :class:`OptionError` (an :class:`~pyro_langevin.errors.InputError`), whose message
is the one line the user sees (the console layer, :mod:`pyro_langevin.console`, prints it and exits
with status 2). The options of one benchmark live with it (:mod:`pyro_langevin.nlb.cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from pyro_langevin import __version__
from pyro_langevin.checkpoints import load_checkpoint, resume_conflicts
from pyro_langevin.devices import DeviceError, check_device
from pyro_langevin.errors import InputError

__all__ = [
    "EXIT_BAD_INPUT", "OptionError", "ArgumentParser", "positive_int", "non_negative_int",
    "add_run_arguments", "check_run_options", "RunOptions", "check_out", "default_out",
    "check_resume", "parse_overrides", "add_spec_arguments", "spec_overrides", "add_executor_arguments",
    "executor_options", "one_line",
]

#: Exit status for bad input (as argparse uses).
EXIT_BAD_INPUT = 2


class OptionError(InputError):
    """An invalid command-line option or setting; the message is one line naming the option."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), so every bad input reads the same."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else '>= 0'}, got {value}")
    return value


def add_run_arguments(p: argparse.ArgumentParser, name: str, epochs_help: str,
                      quick_help: str = "a short smoke run") -> argparse.ArgumentParser:
    """Add the options every run shares: ``--out --quick --epochs --seed --device --threads
    --resume --overwrite --no-progress --version``.

    ``name`` is the default output folder's name (``runs/{name}``, quick runs ``runs/{name}-quick``).
    """
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default runs/{name}, with --quick runs/{name}-quick)")
    p.add_argument("--quick", action="store_true", help=f"{quick_help} (default --out runs/{name}-quick)")
    p.add_argument("--epochs", type=positive_int, default=None, help=epochs_help)
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: this model's many small sequential steps run no "
                        "faster on more threads, and far slower on a shared machine)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds an earlier run (its files are replaced)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--version", action="version", version=f"%(prog)s (pyro-langevin {__version__})")
    return p


@dataclasses.dataclass
class RunOptions:
    """The checked shared options: ``out`` (created), ``device``, ``resume_from`` (a last.pt or None)."""

    out: Path
    device: torch.device
    resume_from: Optional[Path]

    @property
    def checkpoint_dir(self) -> Path:
        """Where the run's ``fit`` writes ``last.pt`` and ``best.pt``: ``{out}/checkpoints``."""
        return self.out / "checkpoints"


def check_run_options(args: argparse.Namespace, name: str, meta: Optional[Mapping[str, Any]] = None) -> RunOptions:
    """Check the shared options of :func:`add_run_arguments`, set the torch threads, create ``--out``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments; ``args.out`` is filled in with the default folder when not given.
    name : str
        The run kind, for the default folder (see :func:`default_out`).
    meta : mapping, optional
        What must match in a resumed checkpoint's ``meta`` (see :func:`check_resume`).

    Raises
    ------
    OptionError
        With a one-line message naming the option.
    """
    try:
        device = check_device(args.device)
    except DeviceError as exc:
        raise OptionError(f"--device: {exc}") from None
    if args.out is None:
        args.out = default_out(name, args.quick)
    out = check_out(args.out, resume=args.resume, overwrite=args.overwrite)
    resume_from = check_resume(RunOptions(out, device, None).checkpoint_dir / "last.pt", meta) if args.resume else None
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    return RunOptions(out, device, resume_from)


def default_out(name: str, quick: bool = False) -> Path:
    """``runs/{name}``, or ``runs/{name}-quick`` for smoke runs, so that these never replace a real run."""
    return Path("runs") / (f"{name}-quick" if quick else name)


def check_out(out: Union[str, Path], resume: bool = False, overwrite: bool = False) -> Path:
    """Check that ``out`` can hold this run without losing an earlier one; return it as a Path.

    A folder that already holds files is refused unless ``resume`` (continue that run) or
    ``overwrite`` (start afresh; its files are replaced as the new run writes them). Nothing is
    created or changed here.
    """
    out = Path(out)
    if resume and overwrite:
        raise OptionError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        held = sorted(p.name for p in out.iterdir())
        if held and not (resume or overwrite):
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise OptionError(f"--out {out} holds an earlier run ({shown}); pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OptionError(f"--out {out}: folder is not writable")
        return out
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"--out {out} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"--out {out} cannot be created: {parent} is not writable")
    return out


def check_resume(last: Path, meta: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
    """``last`` if it exists and is a readable checkpoint of the same kind of run, else None.

    Parameters
    ----------
    last : Path
        The ``last.pt`` a resumed run would continue from. A missing file means starting afresh.
    meta : mapping, optional
        Items the checkpoint's ``meta`` must hold with the same values
        (:func:`~pyro_langevin.checkpoints.resume_conflicts`: nested dicts, such as a run spec,
        compare key by key; what a resumed run may change is skipped).

    Raises
    ------
    OptionError
        The file is unreadable, or it was written by a run with other settings.
    """
    if not last.is_file():
        return None
    try:
        ckpt = load_checkpoint(last)
    except (ValueError, FileNotFoundError) as exc:
        raise OptionError(f"--resume: {one_line(exc)}; rerun with --overwrite to start afresh") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise OptionError(f"--resume: {last} is not a checkpoint written by fit; rerun with --overwrite")
    saved = ckpt.get("meta") or {}
    diffs = resume_conflicts(saved, dict(meta or {}))
    if diffs:
        raise OptionError(f"--resume: {last} was written by a different run ({'; '.join(diffs[:4])}); "
                          "use the same options, or --overwrite to start afresh")
    return last


def parse_overrides(items: Sequence[str], spec: Any) -> dict[str, Any]:
    """``["model.latent_dim=32", "fit.kl_final=0.1"]`` -> ``{"model.latent_dim": 32, "fit.kl_final": 0.1}``.

    Keys are the dotted keys of the run spec ``spec`` (:class:`~pyro_langevin.spec.RunSpec`).
    Values are read as JSON (else as strings) and must match the type of the current value
    (:meth:`~pyro_langevin.spec.RunSpec.typed`): integers for int fields, finite numbers for float
    fields, ``true``/``false`` for bool fields, objects for dict fields.
    """
    from pyro_langevin.spec import SpecError

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"--set expects KEY=VALUE (e.g. fit.lr=1e-3), got {item!r}")
        try:
            current = spec.get(key)
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            if isinstance(current, str):
                value = text  # a string field takes the text as written (no JSON reading of "1e-3")
            out[key] = spec.typed(key, value)
        except SpecError as exc:
            raise OptionError(f"--set {one_line(exc)}") from None
    return out


def add_spec_arguments(p: argparse.ArgumentParser, spec_name: str) -> argparse.ArgumentParser:
    """Add ``--spec FILE`` and ``--set KEY=VALUE`` (repeatable): settings of the run spec ``spec_name``."""
    p.add_argument("--spec", type=Path, default=None, metavar="FILE",
                   help=f"settings of the run spec ({spec_name}) from a JSON or YAML file, nested by section "
                        "({\"model\": {\"latent_dim\": 32}}) or by dotted key; --set wins over it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting of the run spec ({spec_name}) by its dotted key, e.g. "
                        "--set model.latent_dim=32 --set fit.lr=1e-3")
    return p


def spec_overrides(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    """The dotted-key settings of ``--spec FILE`` and then ``--set`` (which win), checked against ``spec``."""
    from pyro_langevin.spec import SpecError, read_spec_file

    changes: dict[str, Any] = {}
    if getattr(args, "spec", None) is not None:
        try:
            changes.update(read_spec_file(args.spec, spec))
        except SpecError as exc:
            raise OptionError(f"--spec {one_line(exc)}") from None
    changes.update(parse_overrides(getattr(args, "set", []) or [], spec))
    return changes


# ----- where the models train: local worker processes or Ray tasks -----
def add_executor_arguments(p: argparse.ArgumentParser, storage: bool = True) -> argparse.ArgumentParser:
    """``--address --cpus-per-member --gpus-per-member`` (and ``--storage``): the models as Ray tasks
    on a cluster, and where their checkpoints go (:class:`~pyro_langevin.executor.Executor`); the
    command has ``--workers`` for the local pool."""
    p.add_argument("--address", default=None,
                   help="train the models (ensemble members, folds) as Ray tasks on an existing cluster: 'auto' or "
                        "HOST:PORT (default: local worker processes, --workers)")
    p.add_argument("--cpus-per-member", type=float, default=None,
                   help="with --address: CPUs per model, fractions allowed (default 1; its torch threads: the whole CPUs)")
    p.add_argument("--gpus-per-member", type=float, default=None,
                   help="with --address: GPUs per model, fractions allowed (default 0; a model holding a GPU trains on cuda)")
    if not storage:
        return p
    p.add_argument("--storage", default=None,  # a str: Path("s3://b") would read as the folder s3:/b
                   help="folder of the models' checkpoints (default --out); on a cluster a folder every node and "
                        "this machine mount at the same path, so --resume and Ray's retries find them")
    return p


def executor_options(args: argparse.Namespace) -> dict:
    """The executor fields (``address``, ``cpus_per_member``, ``gpus_per_member``, ``storage``) from
    ``--address --cpus-per-member --gpus-per-member [--storage]`` and ``--workers``, checked."""
    ray_only = [flag for flag, value in (("--cpus-per-member", args.cpus_per_member),
                                         ("--gpus-per-member", args.gpus_per_member)) if value is not None]
    if args.address is None and ray_only:
        raise OptionError(f"{ray_only[0]} is a Ray resource: give --address too (without it the models train in "
                          "local worker processes, --workers)")
    if args.address is not None and args.workers is not None:
        raise OptionError("--workers sizes the local pool; on Ray (--address) --cpus-per-member sets how many "
                          "models run at once")
    storage = getattr(args, "storage", None)
    if storage is not None and "://" in str(storage):
        raise OptionError(f"--storage {storage}: give a folder every node mounts (NFS ...), not a URL")
    cpus, gpus = args.cpus_per_member, args.gpus_per_member
    for flag, value, low in (("--cpus-per-member", cpus, "> 0"), ("--gpus-per-member", gpus, ">= 0")):
        if value is not None and not (value > 0 if low == "> 0" else value >= 0):
            raise OptionError(f"{flag} must be {low}, got {value:g}")
    storage = None if storage is None else Path(storage)
    return {"address": args.address, "cpus_per_member": 1.0 if cpus is None else cpus,
            "gpus_per_member": 0.0 if gpus is None else gpus, "storage": storage}


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
