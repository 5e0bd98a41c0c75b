"""Setup shared by the benchmark scripts: synthetic Poisson trials, model and guide, timing.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported as ``common``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import pyro
import torch

from pyro_langevin import Batch, make_batch
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow

__all__ = ["add_machine_args", "setup_machine", "make_data", "build", "sync", "seconds", "status_kib", "reset_peak_rss"]


def add_machine_args(p: argparse.ArgumentParser, threads: int | list[int] | None = 1) -> None:
    """``--device`` (default cuda when available) and ``--threads`` (torch CPU intra-op threads).

    A list for ``threads`` makes ``--threads`` take several counts (a script that compares them).
    """
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    several = isinstance(threads, list)
    p.add_argument("--threads", type=int, nargs="+" if several else None, default=threads,
                   help=f"torch CPU thread count{'s to compare' if several else ''} (default: {threads or 'torch default'})")


def setup_machine(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` (the first, if several), turn distribution argument validation off (as
    ``fit()`` does), return the device."""
    threads = args.threads[0] if isinstance(args.threads, list) else args.threads
    if threads:
        torch.set_num_threads(threads)
    pyro.enable_validation(False)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return device


def make_data(n_trials: int, t_obs: int = 140, t_fwd: int = 40, n_in: int = 137, n_out: int = 45,
              seed: int = 0) -> Batch:
    """Poisson counts with uniform(0, 0.3) rates per bin, every entry observed (train-like trials)."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.rand(n_trials, t_obs + t_fwd, n_in + n_out, generator=g) * 0.3
    c = torch.poisson(rates, generator=g)
    return make_batch(c[:, :t_obs, :n_in], c[:, :t_obs, n_in:], c[:, t_obs:, :n_in], c[:, t_obs:, n_in:])


def build(device: torch.device, n_neurons: int = 182, n_heldin: int = 137, latent: int = 64, hidden: int = 64,
          seed: int = 0) -> tuple[LangevinFlow, GRUGuide, list[torch.nn.Parameter]]:
    """LangevinFlow (dt 0.05, default decoder) and its GRU guide on ``device``, and their parameters."""
    torch.manual_seed(seed)
    model = LangevinFlow(n_neurons, latent_dim=latent, dt=0.05).to(device)
    guide = GRUGuide(model, n_heldin, hidden=hidden).to(device)
    return model, guide, list(model.parameters()) + list(guide.parameters())


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU), so wall times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn``."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` size in KiB (``VmRSS``: resident now, ``VmHWM``: its high-water mark)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
