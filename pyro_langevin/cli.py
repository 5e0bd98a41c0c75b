"""The ``pyro-langevin`` console script: a dispatcher to each command's own module.

    pyro-langevin nlb --dataset mc_maze_small --data-dir DIR --bin-ms 5 --phase val --out runs/x
    pyro-langevin tune --dataset mc_maze_small --data-dir DIR --bin-ms 5 --out runs/search
    pyro-langevin fit --nwb rec.nwb --align move_onset_time --window -250,450 --out runs/rec

The commands live with what they run (``nlb`` and ``tune`` in :mod:`pyro_langevin.nlb.cli`, ``fit`` in
:mod:`pyro_langevin.recording.cli`) and are imported only when called.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

from pyro_langevin import __version__
from pyro_langevin.options import EXIT_BAD_INPUT

__all__ = ["main", "COMMANDS"]

#: Command -> (module, function, one-line description).
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "nlb": ("pyro_langevin.nlb.cli", "nlb_main", "train, score and submit LangevinFlow on an NLB'21 dataset"),
    "tune": ("pyro_langevin.nlb.cli", "tune_main", "search its NLB configuration on Ray Tune"),
    "fit": ("pyro_langevin.recording.cli", "fit_main",
            "fit your own recording (NWB or arrays): rates, latents, figures and a cross-validated score"),
}


def _command(name: str) -> Callable[..., int]:
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pyro-langevin``: dispatch to a subcommand; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"pyro-langevin {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<6} {text} (pyro-langevin {name} --help)" for name, (_, _, text) in COMMANDS.items()]
        print(f"usage: pyro-langevin {{{','.join(COMMANDS)}}} ... | --version\n\n" + "\n".join(lines))
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] not in COMMANDS:
        print(f"pyro-langevin: error: unknown command {argv[0]!r} (expected one of {sorted(COMMANDS)})", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _command(argv[0])(argv[1:], prog=f"pyro-langevin {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
