"""The base class of every error that bad input raises: data, a setting, a file, an option.

Each layer names its own kind (:class:`~pyro_langevin.batch.BatchError` for data that breaks the
batch contract, :class:`~pyro_langevin.spec.SpecError` for a run spec,
:class:`~pyro_langevin.devices.DeviceError`, :class:`~pyro_langevin.checkpoints.CheckpointMismatchError`,
the NLB data errors, the command line's ``OptionError`` ...); all derive from :class:`InputError`,
so a command line treats them alike (one ``error:`` line, exit status 2) without knowing each one.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input from the user; the message is one line that names the offending field, file or option.

    Subclasses :class:`ValueError`, so code that already catches bad values keeps working.
    """
