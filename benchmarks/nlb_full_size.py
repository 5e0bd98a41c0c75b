"""The NLB datasets at their real sizes: time per epoch, peak memory, export time, projected default run.

Writes synthetic data with each NLB'21 dataset's real size (trials, held-in and held-out neurons,
observed and forward bins: :data:`SIZES`) as preprocessed tensor folders
(``{dataset}-05ms-val/train_input.h5, eval_input.h5``; no ``eval_target.h5``, so the evaluation
trials are not scored), then runs ``examples/nlb.py`` on each, one process at a time, with the
dataset's default configuration except for a few epochs (``--epochs``), one model
(``eval.n_models=1``) and fewer exported draws (``--export-draws``), at each fitting bin width
(``--fit-bins``: 20 ms is the default of 5 ms data, 5 ms is ``--fit-bin-ms 5``). Measured per run:

* ``epoch_s``: the time between the ends of the first and the next-to-last epoch over the epochs
  between them (``fit`` writes ``last.pt`` after every epoch; the file's modification times, watched
  while the run goes, are the epochs' ends): plain epochs, after the first one's warm-up;
* ``val_s``: the last epoch's time minus ``epoch_s``: ``fit`` validates after the last epoch (the
  validation co-bps of ``eval.select_draws`` posterior draws and the validation loss);
* ``export_s``: the member's time after its fit (reload ``best.pt``, posterior draws for every
  training and evaluation trial), scaled to the default ``eval.export_draws`` linearly (``x 50 /
  --export-draws``: every draw is one more pass; the shared encoder makes this an upper bound);
* ``other_s``: the rest of the run (data loading, fitting-bin sums, smoothing baseline, scoring,
  submission files);
* ``peak_GiB``: the run's peak resident memory (``wait4``'s ``ru_maxrss`` of the process).

Projection of the default run (``examples/nlb.py --dataset D --data-dir DIR``, i.e. 5 ms data fit
at 20 ms, or the ``--fit-bin-ms 5`` run) on 2 CPU cores, one torch thread per model:
``member = E x epoch_s + ceil(E / val_every) x val_s + export_s`` with the default epoch count E,
no early stopping (an upper bound: early stopping ends most fits sooner); an ensemble of M members
trains two at a time (``--workers 2``), so ``run = ceil(M / 2) x member + other_s``. Times depend on
the load of the machine; run it alone.

Usage::

    python benchmarks/nlb_full_size.py --data /tmp/nlb-full --out runs/full-size
    python benchmarks/nlb_full_size.py --data /tmp/nlb-full --datasets mc_maze --fit-bins 20 --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: Real sizes: training and validation trials (the 'val' phase trains on the first and evaluates
#: the second; the 'test' phase trains on both), test trials, held-in and held-out neurons, the
#: observed window in ms (5 ms bins: ms / 5) and whether hand/finger velocity is decoded. Checked:
#: neurons against lfads-torch's NLB configs (encod/recon_data_dim), windows against nlb_tools'
#: make_tensors PARAMS (align_range, fp_len 200 ms for all), MC_Maze 1721/574 against a published
#: build log of the nlb_tools tensors, the MC_Maze scaling datasets' 100/250/500 train+val trials
#: (MC_Maze_Small 75/25 and 100 test trials: this project's own files). Not checked here (from the
#: issue or recalled, marked ~ in the table): MC_RTT 1351 train+val (split 3:1 here) and 271 test,
#: Area2_Bump 364 train+val and 100 test, DMFC_RSG 1006 train+val and 283 test. Cost per epoch
#: and export grow linearly with the trial count, so the projection scales with any correction.
SIZES: Dict[str, dict] = {
    "mc_maze": dict(train=1721, val=574, test=574, heldin=137, heldout=45, ms=700, behavior=True, checked=True),
    "mc_rtt": dict(train=1013, val=338, test=271, heldin=98, heldout=32, ms=600, behavior=True, checked=False),
    "area2_bump": dict(train=273, val=91, test=100, heldin=49, heldout=16, ms=600, behavior=True, checked=False),
    "dmfc_rsg": dict(train=754, val=252, test=283, heldin=40, heldout=14, ms=1500, behavior=False, checked=False),
    "mc_maze_large": dict(train=375, val=125, test=100, heldin=122, heldout=40, ms=700, behavior=True, checked=True),
    "mc_maze_medium": dict(train=188, val=62, test=100, heldin=114, heldout=38, ms=700, behavior=True, checked=True),
    "mc_maze_small": dict(train=75, val=25, test=100, heldin=107, heldout=35, ms=700, behavior=True, checked=True),
}
FORWARD_MS = 200
CORES = 2


def write_dataset(root: Path, name: str, seed: int = 0) -> Path:
    """Write ``{root}/{name}-05ms-val/`` with synthetic spikes of the dataset's real size.

    Spikes: Poisson counts per 5 ms bin from log-rates that are a fixed random readout of a 2-D
    rotation (4 Hz, its phase set by one of 8 conditions) plus a per-neuron baseline of 5-40 Hz;
    hand velocity a linear readout of the same rotation. Only sizes matter for the timing.
    """
    s = SIZES[name]
    folder = root / f"{name}-05ms-val"
    if (folder / "train_input.h5").is_file():
        return folder
    from pyro_langevin.data.h5 import write_h5

    g = np.random.default_rng(seed)
    t_obs, t_fwd = s["ms"] // 5, FORWARD_MS // 5
    n_in, n_out = s["heldin"], s["heldout"]
    n = s["train"] + s["val"]
    t = (np.arange(t_obs + t_fwd) * 0.005)[None, :, None]
    phase = (g.integers(0, 8, n) * np.pi / 4)[:, None, None]
    z = np.concatenate([np.cos(2 * np.pi * 4 * t + phase), np.sin(2 * np.pi * 4 * t + phase)], axis=-1)
    readout = g.normal(0, 0.6, (2, n_in + n_out))
    base = np.log(g.uniform(5, 40, n_in + n_out) * 0.005)
    counts = g.poisson(np.exp(base + z @ readout)).astype(np.float32)  # (trial, bins, neurons)
    tr, ev = counts[: s["train"]], counts[s["train"]:]
    train = {"train_spikes_heldin": tr[:, :t_obs, :n_in], "train_spikes_heldout": tr[:, :t_obs, n_in:],
             "train_spikes_heldin_forward": tr[:, t_obs:, :n_in], "train_spikes_heldout_forward": tr[:, t_obs:, n_in:]}
    if s["behavior"]:
        train["train_behavior"] = (150 * z[: s["train"], :t_obs] @ np.array([[1.0, 0.3], [-0.2, 1.0]])).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    write_h5(folder / "eval_input.h5", {"eval_spikes_heldin": ev[:, :t_obs, :n_in]})
    write_h5(folder / "train_input.h5", train)  # last: a folder holding it is complete
    return folder


@dataclass
class Row:
    dataset: str
    fit_bin_ms: int
    trials: int
    bins: int
    neurons: int
    epochs: int
    fit_s: float
    val_s: float
    epoch_s: float
    export_s: float
    other_s: float
    peak_gib: float
    default_epochs: int
    val_every: int
    n_models: int
    member_h: float
    run_h: float
    wall_s: float


def run_example(dataset: str, data: Path, out: Path, fit_bin: int, epochs: int, export_draws: int,
                device: str = "cpu") -> tuple:
    """``examples/nlb.py`` in its own process; returns (metrics, wall seconds, peak RSS in GiB)."""
    cmd = [sys.executable, str(REPO / "examples" / "nlb.py"), "--dataset", dataset, "--data-dir", str(data),
           "--bin-ms", "5", "--fit-bin-ms", str(fit_bin), "--epochs", str(epochs), "--set", "eval.n_models=1",
           "--set", f"eval.export_draws={export_draws}", "--out", str(out), "--overwrite", "--no-progress",
           "--device", device]
    t0 = time.perf_counter()
    started_ns = time.time_ns()
    log = (out.parent / f"{out.name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ends, status, usage = _watch(out / "checkpoints" / "last.pt", proc.pid, started_ns)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {out.parent / (out.name + '.log')}")
    return json.loads((out / "metrics.json").read_text()), wall, usage.ru_maxrss / 2**20, ends  # KiB -> GiB


def _watch(last: Path, pid: int, after_ns: int, every_s: float = 0.02) -> tuple:
    """Until process ``pid`` ends: the times (s) at which ``fit`` wrote ``last.pt`` (after every epoch,
    atomically: each write is a new file whose mtime is the write's time); then the process's exit
    status and resource usage (``wait4``: its own peak resident memory)."""
    seen: List[int] = []
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        try:
            mtime = last.stat().st_mtime_ns
            if mtime > after_ns and (not seen or mtime != seen[-1]):
                seen.append(mtime)
        except FileNotFoundError:
            pass
        if done:
            return [m / 1e9 for m in seen], status, usage
        time.sleep(every_s)


def measure(dataset: str, data: Path, out_root: Path, fit_bin: int, epochs: int, export_draws: int,
            device: str = "cpu") -> Row:
    from pyro_langevin.nlb.config import default_config

    out = out_root / f"{dataset}-fit{fit_bin:02d}ms"
    metrics, wall, peak, ends = run_example(dataset, data, out, fit_bin, epochs, export_draws, device)
    member = metrics["members"][0]
    fit_s = float(member["fit_seconds"])
    member_s = float(member["executor"]["seconds"])
    if len(ends) != epochs:
        raise SystemExit(f"{out}: saw {len(ends)} writes of last.pt for {epochs} epochs (polling too slow?)")
    # epochs 2 .. E-1 are plain epochs (the first also warms up); the last one also validates
    epoch_s = (ends[-2] - ends[0]) / (epochs - 2)
    val_s = max(ends[-1] - ends[-2] - epoch_s, 0.0)
    default = default_config(dataset, fit_bin)
    export_s = (member_s - fit_s) * default.eval.export_draws / export_draws
    other_s = float(metrics["total_seconds"]) - member_s
    e, m = default.fit.epochs, default.eval.n_models
    member_total = e * epoch_s + math.ceil(e / default.fit.val_every) * val_s + export_s
    run = math.ceil(m / CORES) * member_total + other_s
    s = SIZES[dataset]
    return Row(dataset, fit_bin, s["train"] + s["val"], (s["ms"] + FORWARD_MS) // fit_bin, s["heldin"] + s["heldout"],
               epochs, round(fit_s, 1), round(val_s, 1), round(epoch_s, 2), round(export_s, 1), round(other_s, 1),
               round(peak, 2), e, default.fit.val_every, m, round(member_total / 3600, 2), round(run / 3600, 2),
               round(wall, 1))


def table(rows: List[Row], markdown: bool = False) -> str:
    head = ["dataset", "fit bins", "trials", "bins", "neurons", "s/epoch", "s/validation", "export s (50 draws)",
            "other s", "peak GiB", "default epochs x models", "member h", "default run h (2 cores)"]
    lines = []
    for r in rows:
        mark = "" if SIZES[r.dataset]["checked"] else "~"
        lines.append([r.dataset, f"{r.fit_bin_ms} ms", f"{mark}{r.trials}", str(r.bins), str(r.neurons), f"{r.epoch_s:.2f}",
                      f"{r.val_s:.1f}", f"{r.export_s:.0f}", f"{r.other_s:.0f}", f"{r.peak_gib:.2f}",
                      f"{r.default_epochs} x {r.n_models}", f"{r.member_h:.2f}",
                      f"{r.run_h:.1f}" + (" (> 8 h)" if r.run_h > 8 else "")])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(x) + " |" for x in lines])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*x) for x in lines])


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder for the synthetic datasets (written once)")
    p.add_argument("--out", type=Path, default=Path("runs/full-size"), help="runs' output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier benchmark in --out")
    p.add_argument("--datasets", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--fit-bins", nargs="+", type=int, default=[20, 5], choices=[5, 20])
    p.add_argument("--epochs", type=int, default=3, help="epochs per measured run, >= 3 (default 3)")
    p.add_argument("--export-draws", type=int, default=10, help="posterior draws exported per run (scaled to 50)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the runs train (the projection "
                   "assumes 2 models at once, as on 2 CPU cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown")
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be >= 3 (a warm-up epoch, plain epochs, and the last one, which validates)")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        p.error(f"--out {args.out} holds an earlier benchmark's runs; give --overwrite to replace them")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: List[Row] = []
    for name in args.datasets:
        t0 = time.perf_counter()
        write_dataset(args.data, name)
        print(f"{name}: data at {args.data} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for fit_bin in args.fit_bins:
            try:
                row = measure(name, args.data, args.out, fit_bin, args.epochs, args.export_draws, args.device)
            except SystemExit as exc:  # one failed run: say so, measure the others
                print(f"  fit at {fit_bin} ms: FAILED: {exc}", flush=True)
                continue
            rows.append(row)
            print(f"  fit at {fit_bin} ms: {row.epoch_s:.2f} s/epoch, validation {row.val_s:.1f} s, export "
                  f"{row.export_s:.0f} s (50 draws), peak {row.peak_gib:.2f} GiB; default run {row.run_h:.1f} h "
                  f"(run measured in {row.wall_s:.0f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(table(rows))
    if args.markdown:
        args.markdown.write_text(table(rows, markdown=True) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
