"""Progress bars that suit where the output goes.

On a terminal (or in a notebook) :func:`progress_bar` is tqdm's usual bar. Off a terminal (a log
file, CI, ``nohup``, a cluster job) a redrawn bar would write a carriage-return update for every
step; there it writes a plain line (no ``\\r``) at most every :data:`LOG_INTERVAL_S` seconds,
plus the first and the last state.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as auto_tqdm

__all__ = ["progress_bar", "LOG_INTERVAL_S", "is_interactive"]

#: Seconds between progress lines when the output is not a terminal.
LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def is_interactive(stream: Optional[TextIO] = None) -> bool:
    """True for a terminal or a Jupyter kernel (where tqdm draws a widget)."""
    stream = sys.stderr if stream is None else stream
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(*, file: Optional[TextIO] = None, interval: Optional[float] = None, **kwargs: Any):
    """A tqdm bar (same keyword arguments) that prints plain lines when ``file`` is not a terminal.

    Parameters
    ----------
    file : text stream, optional
        Where the bar goes (default ``sys.stderr``).
    interval : float, optional
        Seconds between lines off a terminal (default :data:`LOG_INTERVAL_S`).
    **kwargs
        Passed to ``tqdm`` (``total``, ``desc``, ``unit``, ``disable``, ``initial`` ...).
    """
    stream = sys.stderr if file is None else file
    if is_interactive(stream):
        return auto_tqdm(file=file, **kwargs)
    every = LOG_INTERVAL_S if interval is None else interval
    return plain_tqdm(file=_Lines(stream), mininterval=every, maxinterval=max(every, 10.0), ascii=True,
                      ncols=100, **kwargs)
