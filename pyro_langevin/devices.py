"""Which torch device a fit runs on: the one check every entry point and :func:`~pyro_langevin.training.fit` share."""

from __future__ import annotations

from typing import Union

import torch

from pyro_langevin.errors import InputError

__all__ = ["DeviceError", "check_device", "default_device"]


class DeviceError(InputError):
    """A device that is not ``cpu``/``cuda[:N]``, or CUDA asked for where no usable GPU is present."""


def default_device() -> torch.device:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: Union[str, torch.device, None]) -> torch.device:
    """The torch device for ``device`` (None: :func:`default_device`).

    Raises
    ------
    DeviceError
        For a device other than ``cpu``/``cuda[:N]``, or CUDA without a usable GPU.
    """
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {str(device)!r} is not a device; choose cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {str(device)!r} is not supported; choose cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} asked for, but no CUDA GPU is available "
                              "(torch.cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev
