"""How the cost of training grows: epoch time and peak memory against trials, bins, neurons, latent size.

Each point is one real epoch of ``pyro_langevin.training.fit`` (batch 64, GRU guide, no validation)
after a one-step warm-up fit of the same model: on the ``trials`` axis the epoch covers that many
trials, on the other axes 256 trials (4 steps). One axis varies at a time around the base point
(256 trials, 70 bins = 56 observed + 14 forward, 100 neurons = 75 held-in + 25 held-out, latent 16,
GRU hidden 64). Peak memory is the growth during the epoch, data set included: on CPU the resident
set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``
returned freed memory), on CUDA ``torch.cuda.max_memory_allocated``. The slope of log(time) and
log(memory) against log(size) is fitted per axis (goal: about 1 in trials and bins). Also the
thread scaling (epoch time at 1 and 2 CPU threads, at the base point and at MC_Maze size) and, on
CUDA or with ``--axes batch``, the batch size at which a step stops getting cheaper per trial.

Usage::

    python benchmarks/scaling.py                      # CPU, 1 thread, figure docs/performance.png
    python benchmarks/scaling.py --quick              # three points per axis
    python benchmarks/scaling.py --device cuda --out docs/performance_cuda.png
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_args, build, make_data, reset_peak_rss, setup_machine, status_kib, sync  # noqa: E402

from pyro_langevin.training import FitConfig, fit  # noqa: E402

BASE = {"trials": 256, "bins": 70, "neurons": 100, "latent": 16, "batch": 64}
AXES = {
    "trials": [50, 125, 250, 500, 1000, 2000],
    "bins": [35, 70, 140, 180],
    "neurons": [50, 100, 200, 400],
    "latent": [8, 16, 32, 64, 128],
    "batch": [16, 32, 64, 128, 256, 512, 1024],
}
QUICK = {"trials": [50, 200, 800], "bins": [35, 70, 180], "neurons": [50, 100, 400], "latent": [8, 32, 128],
         "batch": [16, 64, 256]}
#: MC_Maze size (the issue's reference step): 140 + 40 bins, 137 + 45 neurons, latent 64.
MC_MAZE = {"trials": 256, "bins": 180, "neurons": 182, "latent": 64, "batch": 64}


class PeakMemory:
    """Growth of memory over a block: CUDA allocator peak, or the CPU resident set's high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = math.nan

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        try:  # give freed heap memory back, so the baseline is not padded by the last point
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.before = status_kib("VmRSS")
        self.reset = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20
        elif self.reset:
            self.mib = (status_kib("VmHWM") - self.before) / 1024


def epoch(size: dict[str, int], device: torch.device, repeats: int = 1) -> dict[str, float]:
    """Least seconds and largest peak memory growth (MiB) of ``repeats`` one-epoch fits at ``size``.

    A one-step fit at the same shape warms up first. Every fit starts from the same parameters and
    seed (``build`` and ``FitConfig.seed``), so the repeats do the same work.
    """
    bins, neurons = size["bins"], size["neurons"]
    t_obs, n_in = round(0.8 * bins), round(0.75 * neurons)
    model, guide, _ = build(device, n_neurons=neurons, n_heldin=n_in, latent=size["latent"], hidden=64)
    config = FitConfig(epochs=1, batch_size=size["batch"], val_every=1)

    def run(n_trials: int) -> float:
        data = make_data(n_trials, t_obs, bins - t_obs, n_in, neurons - n_in)
        return fit(model, guide, data, None, config, device=device, progress=False, handle_signals=False).seconds

    run(size["batch"])  # warm-up: one step at this shape
    seconds, peak = [], []
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            seconds.append(run(size["trials"]))
        peak.append(mem.mib)
    # the least time: other jobs on a shared machine only ever add to it
    return {"seconds": min(seconds), "peak_mib": max(peak)}


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def sweep(axes: dict[str, list[int]], device: torch.device, repeats: int) -> dict[str, list[dict]]:
    out = {}
    for axis, values in axes.items():
        out[axis] = []
        for v in values:
            size = dict(BASE, **{axis: v})
            if axis == "batch":
                size["trials"] = 4 * v  # 4 steps at every batch size
            r = dict(epoch(size, device, repeats), value=v)
            out[axis].append(r)
            print(f"  {axis:>8} {v:>5}: {r['seconds']:7.2f} s   peak {r['peak_mib']:7.1f} MiB", file=sys.stderr, flush=True)
    return out


def thread_scaling(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for name, size in (("base", BASE), ("MC_Maze size", MC_MAZE)):
        times = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times[threads] = epoch(size, device, repeats)["seconds"]
        rows.append({"point": name, "1 thread (s)": times[1], "2 threads (s)": times[2],
                     "speed-up": times[1] / times[2]})
        print(f"  threads {name}: {times[1]:.2f} s vs {times[2]:.2f} s", file=sys.stderr, flush=True)
    return rows


def figure(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, rows in results.items():
        x = [r["value"] for r in rows]
        for ax, key, unit in ((axes[0], "seconds", "s"), (axes[1], "peak_mib", "MiB")):
            y = [r[key] for r in rows]
            if all(v > 0 and math.isfinite(v) for v in y):
                ax.loglog(x, y, "o-", label=f"{axis} (slope {slope(x, y):.2f})")
    axes[0].set(xlabel="size along the axis (trials, bins, neurons, latent dims, batch)", ylabel="epoch time (s)",
                title="epoch time")
    axes[1].set(xlabel="size along the axis", ylabel="peak memory growth (MiB)", title="peak memory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="three points per axis")
    p.add_argument("--axes", nargs="+", choices=list(AXES), default=None,
                   help="axes to sweep (default: trials bins neurons latent, plus batch on CUDA)")
    p.add_argument("--repeats", type=int, default=2, help="epochs per point; the least time is kept")
    p.add_argument("--no-threads", action="store_true", help="skip the 1 vs 2 thread comparison")
    p.add_argument("--out", type=Path, default=Path("docs/performance.png"), help="figure path")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    add_machine_args(p)
    args = p.parse_args()
    device = setup_machine(args)
    names = args.axes or ["trials", "bins", "neurons", "latent"] + (["batch"] if device.type == "cuda" else [])
    grid = QUICK if args.quick else AXES
    results = sweep({a: grid[a] for a in names}, device, args.repeats)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    threads = [] if args.no_threads or device.type == "cuda" else thread_scaling(device, args.repeats)

    print(f"scaling on {where}; base point {BASE}")
    print("| axis | values | epoch time (s) | slope | peak memory growth (MiB) | slope |")
    print("|---|---|---|---|---|---|")
    for axis, rows in results.items():
        x = [r["value"] for r in rows]
        t = [r["seconds"] for r in rows]
        m = [r["peak_mib"] for r in rows]
        m_slope = f"{slope(x, m):.2f}" if all(v > 0 for v in m) else "n/a"
        print(f"| {axis} | {' '.join(map(str, x))} | {' '.join(f'{v:.2f}' for v in t)} | {slope(x, t):.2f} "
              f"| {' '.join(f'{v:.0f}' for v in m)} | {m_slope} |")
    if "batch" in results:
        rows = results["batch"]
        per_trial = [r["seconds"] / (4 * r["value"]) * 1e3 for r in rows]
        print("per-trial time by batch size (ms): " + ", ".join(f"{r['value']}: {v:.2f}" for r, v in zip(rows, per_trial)))
    for r in threads:
        print(f"threads, {r['point']}: 1 thread {r['1 thread (s)']:.2f} s, 2 threads {r['2 threads (s)']:.2f} s, "
              f"speed-up {r['speed-up']:.2f}")
    figure(results, args.out, f"LangevinFlow + GRU guide, one fit epoch (batch 64) on {where}; base {BASE}")
    print(f"figure: {args.out}")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "base": BASE, "axes": results, "threads": threads}, indent=1))


if __name__ == "__main__":
    main()
