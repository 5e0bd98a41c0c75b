"""Recordings nobody tuned anything on: pyro-langevin's default ``fit`` (the recipe chosen on each
recording) against ``--recipe default`` and lfads-torch, on the synthetic family with known rates
(:data:`pyro_langevin.data.synthetic.FAMILY`) and the real DANDI:000140 test file.

    python benchmarks/recordings.py --out runs/recordings                          # every recording, seed 0
    python benchmarks/recordings.py --recordings lorenz-60x48,rotation-100x100 --seeds 0 1 2 \\
        --lfads-python lfads-venv/bin/python --lfads-dir lfads-torch               # with lfads-torch beside it
    python benchmarks/recordings.py --quick --out runs/recordings-quick            # smoke run (tiny, minutes)

Per recording, method and seed, one run folder under ``--out`` (a finished run is read back, not run
again, so the script can be stopped and restarted). Writes ``--out/table.csv`` (one row per run) and
``--out/table.md`` (mean +- s.d. over seeds): rate R^2 to the true rates (sklearn ``r2_score``, true
rates as ``y_true``, uniform over units, every trial's posterior-mean rates: what ``posterior.nc``
holds), the run's own cross-validated co-bps minus the smoothing baseline's on the same folds (mean +-
s.e. over folds), the recipe chosen, seconds in all and per searched candidate. lfads-torch
(``../shared/peers/lfads_torch/run_lfads.py``: its 20 ms NLB config, one model, its own early
stopping) gives rates for the same trials; it has no cross-validated score. Nothing here selects
anything on the truth: the rates are scored after every choice was made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from pyro_langevin.data.synthetic import FAMILY, make_recording
from pyro_langevin.metrics import rate_r2

ROOT = Path(__file__).resolve().parents[1]
DANDI = ROOT / "tests" / "data" / "000140" / "sub-Jenkins" / "sub-Jenkins_ses-small_desc-test_ecephys.nwb"
LFADS_SCRIPT = ROOT.parent / "shared" / "peers" / "lfads_torch" / "run_lfads.py"
QUICK = {"fit.epochs": 6, "fit.val_every": 2, "model.latent_dim": 4, "guide.hidden": 16, "model.d_model": 16,
         "model.n_heads": 2, "model.dim_feedforward": 16, "cv.folds": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/recordings"))
    p.add_argument("--recordings", default=",".join([*FAMILY, "dandi-000140"]),
                   help="comma-separated names of the family, and dandi-000140 for the real file (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", default="search,default",
                   help="comma-separated: search (the default fit), default (--recipe default), lfads")
    p.add_argument("--lfads-python", default=None, help="the lfads-torch venv's python (adds the lfads method)")
    p.add_argument("--lfads-dir", default=os.environ.get("LFADS_TORCH_DIR"), help="an lfads-torch checkout")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny models and few epochs: a smoke run of the script")
    p.add_argument("--refresh", action="store_true",
                   help="rerun finished runs with resume: folds, searches and finished fits are read back, the "
                        "posterior and metrics written again (after the outputs changed)")
    return p.parse_args(argv)


def _recording(name: str, out: Path):
    """``(Recording, true rates or None, npz path or None)``."""
    from pyro_langevin.recording.data import Recording
    from pyro_langevin.recording.nwb import read_nwb

    if name == "dandi-000140":
        return read_nwb(DANDI, bin_ms=20, align="move_onset_time", window_ms=(-250, 450)), None, None
    syn = make_recording(**FAMILY[name], seed=0)
    path = syn.save(out / f"{name}.npz")
    rec = Recording.from_arrays(syn.counts, syn.bin_ms, conditions=syn.conditions, source=str(path))
    return rec, syn.rates, path


def _run_ours(rec, truth, folder: Path, seed: int, recipe: str, quick: bool, workers: int,
              refresh: bool = False) -> Dict[str, Any]:
    import xarray as xr

    from pyro_langevin.recording.run import fit_recording

    metrics_file = folder / "metrics.json"
    if refresh or not metrics_file.is_file():
        fit_recording(rec, folder, seed=seed, recipe=recipe, overrides=QUICK if quick else None, workers=workers,
                      progress=False, resume=refresh and folder.is_dir(), log=lambda s: None)
    m = json.loads(metrics_file.read_text())
    row: Dict[str, Any] = {"seconds": m["seconds"]["total"], "recipe": (m.get("recipe") or {}).get("winner", "default")}
    if m.get("cv"):
        d = m["cv"]["summary"]["difference"]["co-bps"]
        row.update(cv_diff=d["mean"], cv_diff_se=d["se"], cv_co_bps=m["cv"]["summary"]["model"]["co-bps"]["mean"])
        searched = [c["seconds"] for f in m["cv"]["folds"] for c in f.get("search", {}).get("candidates", {}).values()]
        row["s_per_candidate"] = float(np.mean(searched)) if searched else None
    if truth is not None:
        with xr.open_dataset(folder / "posterior.nc", group="posterior", engine="h5netcdf") as post:
            row["r2"] = rate_r2(truth, post["rates_mean"].values)
    return row


def _run_lfads(path: Path, truth, folder: Path, seed: int, python: str, lfads_dir: str) -> Dict[str, Any]:
    rates_file = folder / "rates.npz"
    t0 = time.perf_counter()
    if not rates_file.is_file():
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([python, "-W", "ignore", str(LFADS_SCRIPT), str(path), "--key", "counts", "--out", str(folder),
                        "--seed", str(seed), "--lfads-dir", lfads_dir], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (folder / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
    rates = np.load(rates_file)["rates"]
    return {"r2": rate_r2(truth, rates), "seconds": float((folder / "seconds.txt").read_text()),
            "recipe": "lfads-torch nlb_mc_maze"}


def _summarize(rows: List[Dict[str, Any]]) -> str:
    """Markdown: one line per recording and method, mean +- s.d. over seeds."""
    import pandas as pd

    df = pd.DataFrame(rows)
    lines = ["| recording | size | method | rate R^2 (seeds) | CV co-bps - smoothing | recipe chosen | s / run | s / candidate |",
             "|---|---|---|---|---|---|---|---|"]
    for (rec, method), g in df.groupby(["recording", "method"], sort=False):
        r2 = g["r2"].dropna() if "r2" in g else []
        r2s = (f"{r2.mean():.3f} +- {r2.std(ddof=1):.3f} ({len(r2)})" if len(r2) > 1 else
               f"{r2.iloc[0]:.3f} (1)" if len(r2) else "n/a (no truth)")
        cv = g["cv_diff"].dropna() if "cv_diff" in g else []
        cvs = "; ".join(f"{a:+.3f} +- {b:.3f}" for a, b in zip(g["cv_diff"], g["cv_diff_se"])) if len(cv) else "-"
        cand = g["s_per_candidate"].dropna() if "s_per_candidate" in g else []
        lines.append(f"| {rec} | {g['size'].iloc[0]} | {method} | {r2s} | {cvs} | {', '.join(map(str, g['recipe']))} | "
                     f"{g['seconds'].mean():.0f} | {cand.mean():.0f} |" if len(cand) else
                     f"| {rec} | {g['size'].iloc[0]} | {method} | {r2s} | {cvs} | {', '.join(map(str, g['recipe']))} | "
                     f"{g['seconds'].mean():.0f} | - |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    if args.lfads_python and "lfads" not in methods:
        methods.append("lfads")
    rows: List[Dict[str, Any]] = []
    for name in [n for n in args.recordings.split(",") if n]:
        rec, truth, path = _recording(name, args.out)
        size = f"{rec.n_trials}x{rec.n_units}, {rec.n_bins} bins of {rec.bin_ms:g} ms"
        for method in methods:
            if method == "lfads" and (truth is None or not args.lfads_python):
                continue
            for seed in args.seeds:
                folder = args.out / name / f"{method}-s{seed}"
                print(f"{name} {method} seed {seed} ...", flush=True)
                if method == "lfads":
                    row = _run_lfads(path, truth, folder, seed, args.lfads_python, args.lfads_dir)
                else:
                    row = _run_ours(rec, truth, folder, seed, "search" if method == "search" else "default",
                                    args.quick, args.workers, args.refresh and method == "search")
                rows.append(dict(row, recording=name, size=size, method=method, seed=seed))
                print(f"  {json.dumps(rows[-1])}", flush=True)
                import pandas as pd

                pd.DataFrame(rows).to_csv(args.out / "table.csv", index=False)
                (args.out / "table.md").write_text(_summarize(rows) + "\n")
    print(_summarize(rows))


if __name__ == "__main__":
    sys.exit(main())
