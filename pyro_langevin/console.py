"""Running a command-line entry point: one-line errors, interrupts, exit statuses.

:func:`run_command` wraps the body of ``pyro-langevin nlb`` and of every ``examples/*.py``:

* bad input (any :class:`~pyro_langevin.errors.InputError`: an option, data, a setting, a
  checkpoint that does not fit, or an unreadable file) ends with
  one line ``PROG: error: ...`` on stderr and exit status 2; a training run that diverges, with
  one line and status 1;
* Ctrl-C ends with one line ``PROG: interrupted at epoch N; checkpoint saved in DIR; rerun with
  --resume`` and status 130; SIGTERM (a cluster's time limit, ``kill``) the same with status 143.
  :func:`~pyro_langevin.training.fit` has already saved ``last.pt`` at the last epoch boundary.

No traceback in those cases; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

from pyro_langevin.errors import InputError
from pyro_langevin.options import EXIT_BAD_INPUT, RunOptions, one_line

__all__ = ["Session", "Terminated", "run_command", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

EXIT_FAILED = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run ends like a Ctrl-C (checkpoint first)."""


class Session:
    """What a running command tells :func:`run_command`, for the line it prints if interrupted.

    Attributes
    ----------
    options : RunOptions or None
        The checked options (set them before training): where ``fit`` writes ``last.pt``, and
        whether the run continues an earlier one (whose ``last.pt`` may then be resumed again).
    interrupt_note : callable or None
        Returns the interrupt line's text instead of the checkpoint's (for runs without one).
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.options: Optional[RunOptions] = None
        self.interrupt_note: Optional[Callable[[], str]] = None
        self.started = time.time()

    def interrupted_line(self) -> str:
        """``interrupted at epoch N; checkpoint saved in DIR; rerun with --resume`` (or what is true)."""
        if self.interrupt_note is not None:
            return self.interrupt_note()
        opts = self.options
        last = opts.checkpoint_dir / "last.pt" if opts is not None else None
        # a last.pt older than this run is an earlier run's (e.g. under --overwrite): not ours to name
        ours = last is not None and last.is_file() and (
            opts.resume_from is not None or last.stat().st_mtime >= self.started - 1)
        if not ours:
            return "interrupted before the first epoch ended; no checkpoint was written"
        from pyro_langevin.checkpoints import load_checkpoint

        try:
            ckpt = load_checkpoint(last)
            done, total = int(ckpt["epoch"]) + 1, int(ckpt["config"]["epochs"])
        except (ValueError, KeyError, TypeError):
            return f"interrupted; checkpoint in {opts.checkpoint_dir} unreadable"
        where = f"after training ({done} epochs)" if done >= total else f"at epoch {done}"
        return f"interrupted {where}; checkpoint saved in {opts.checkpoint_dir}; rerun with --resume"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def run_command(body: Callable[[Session], Any], prog: str) -> int:
    """Run ``body(session)`` as a command; return its exit status (0 when it returns).

    ``SystemExit`` raised by argparse (``--help``, ``--version``, argument errors) gives its code.
    """
    from pyro_langevin.training import TrainingDivergedError

    session = Session(prog)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    quiet = _quiet_logs()
    try:
        body(session)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILED)
    except KeyboardInterrupt:
        return _say(prog, session.interrupted_line(), EXIT_INTERRUPTED)
    except Terminated:
        return _say(prog, session.interrupted_line().replace("interrupted", "terminated", 1), EXIT_TERMINATED)
    except (InputError, OSError) as exc:
        return _say(prog, f"error: {one_line(exc)}", EXIT_BAD_INPUT)
    except TrainingDivergedError as exc:
        return _say(prog, f"error: {one_line(exc)}", EXIT_FAILED)
    finally:
        quiet()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _say(prog: str, text: str, status: int) -> int:
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    return status


def _quiet_logs() -> Callable[[], None]:
    """Silence fit's own interrupt message (the command prints its own line); return the undo."""
    log = logging.getLogger("pyro_langevin.training")
    level = log.level
    log.setLevel(logging.ERROR)
    return lambda: log.setLevel(level)
