"""Cost of the held-out evidence (``pyro_langevin.evidence.log_evidence``) at MC_Maze_Small size:
seconds and peak memory growth of the IWAE for K = 100 and K = 1000 draws per trial, and seconds per
trial of annealed importance sampling (``method="ais"``) and of bidirectional Monte Carlo
(``pyro_langevin.bdmc.bdmc``: forward AIS with its pilot run, then reverse AIS).

Data: 100 trials of Poisson counts shaped like MC_Maze_Small (107 held-in + 35 held-out neurons;
140 + 40 bins at 5 ms, or 35 + 10 at 20 ms). Model and guide: the NLB default member of that bin
width (``default_config("mc_maze_small", BIN)``: latent 32, bidirectional GRU 128, Transformer
width 64), untrained (the cost does not depend on the fitted values). Both IWAE quantities can be
timed: ``joint`` (one guide and one model pass per draw) and ``heldout`` (one more model pass).

AIS and BDMC cost ``(chains + pilot chains) x (S - 1) x (L + 1)`` gradient evaluations of model and
guide per trial (BDMC: twice the chains' share, plus the pilot), so their seconds per trial scale
linearly in the steps S and leapfrog steps L; in chains and trials only until a pass fills the
machine. They are timed on ``--ais-trials`` trials (all chains of all trials in one pass).

Usage::

    python benchmarks/evidence_cost.py                       # 20 ms and 5 ms: IWAE K 100 and 1000, AIS, BDMC
    python benchmarks/evidence_cost.py --bins 20 --methods iwae --particles 100 1000 --quantity joint heldout
    python benchmarks/evidence_cost.py --methods ais bdmc --ais-trials 4 --ais-chains 8 --ais-steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_args, make_data, reset_peak_rss, setup_machine, status_kib  # noqa: E402

from pyro_langevin.bdmc import bdmc  # noqa: E402
from pyro_langevin.evidence import log_evidence  # noqa: E402
from pyro_langevin.nlb.config import default_config  # noqa: E402
from pyro_langevin.spec import build  # noqa: E402

#: Observed and forward bins of MC_Maze_Small at each NLB bin width.
BINS = {5: (140, 40), 20: (35, 10)}


def time_iwae(model, guide, batch, args) -> list[dict]:
    """Seconds and peak memory growth of the IWAE for each quantity and K."""
    rows = []
    for quantity in args.quantity:
        for k in args.particles:
            before = status_kib("VmRSS")
            reset = reset_peak_rss()
            t0 = time.perf_counter()
            ev = log_evidence(model, guide, batch, k, quantity=quantity, max_tiled=args.max_tiled, warn=False)
            secs = time.perf_counter() - t0
            peak = (status_kib("VmHWM") - before) / 1024 if reset else float("nan")
            rows.append({"method": "iwae", "quantity": quantity, "K": k, "trials": batch.n_trials, "seconds": round(secs, 1),
                         "seconds_per_trial": round(secs / batch.n_trials, 3), "peak_growth_mib": round(peak, 1),
                         "finite": bool((ev.log_evidence == ev.log_evidence).all())})
            print(f"  iwae {quantity} K={k}: {secs:.1f} s", file=sys.stderr, flush=True)
    return rows


def time_ais(model, guide, batch, args) -> list[dict]:
    """Seconds per trial of AIS (joint quantity, pilot run included) and of BDMC (forward + reverse)."""
    rows, options = [], {"num_leapfrog": args.num_leapfrog, "adapt_chains": args.adapt_chains}
    common = {"quantity": "joint", "K": args.ais_chains, "steps": args.ais_steps, "leapfrog": args.num_leapfrog,
              "trials": batch.n_trials}
    for method in (m for m in args.methods if m != "iwae"):
        before = status_kib("VmRSS")
        reset = reset_peak_rss()
        t0 = time.perf_counter()
        if method == "ais":
            ev = log_evidence(model, guide, batch, args.ais_chains, method="ais", num_steps=args.ais_steps,
                              max_tiled=batch.n_trials * args.ais_chains, ais_options=options, warn=False)
            finite = bool((ev.log_evidence == ev.log_evidence).all())
        else:
            res = bdmc(model, guide, batch, args.ais_chains, args.ais_steps, iwae_particles=(), ais_options=options)
            finite = bool((res.gap == res.gap).all())
        secs = time.perf_counter() - t0
        peak = (status_kib("VmHWM") - before) / 1024 if reset else float("nan")
        rows.append({"method": method, **common, "seconds": round(secs, 1),
                     "seconds_per_trial": round(secs / batch.n_trials, 2), "peak_growth_mib": round(peak, 1),
                     "finite": finite})
        print(f"  {method} C={args.ais_chains} S={args.ais_steps} L={args.num_leapfrog}: {secs:.1f} s", file=sys.stderr,
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bins", type=int, nargs="+", default=[20, 5], choices=sorted(BINS), help="bin widths in ms")
    p.add_argument("--methods", nargs="+", default=["iwae", "ais", "bdmc"], choices=["iwae", "ais", "bdmc"])
    p.add_argument("--particles", type=int, nargs="+", default=[100, 1000], help="IWAE K values")
    p.add_argument("--quantity", nargs="+", default=["joint"], choices=["joint", "heldout", "heldout_neurons"],
                   help="IWAE quantities")
    p.add_argument("--trials", type=int, default=100, help="trials of the IWAE timing")
    p.add_argument("--max-tiled", type=int, default=512, help="log_evidence's max_tiled (IWAE)")
    p.add_argument("--ais-trials", type=int, default=8, help="trials of the AIS and BDMC timing")
    p.add_argument("--ais-chains", type=int, default=16, help="AIS chains per trial")
    p.add_argument("--ais-steps", type=int, default=100, help="AIS temperatures S")
    p.add_argument("--num-leapfrog", type=int, default=5, help="leapfrog steps per HMC transition")
    p.add_argument("--adapt-chains", type=int, default=4, help="chains of the step-size pilot run")
    add_machine_args(p)
    args = p.parse_args()
    device = setup_machine(args)
    rows = []
    for bin_ms in args.bins:
        t_obs, t_fwd = BINS[bin_ms]
        batch = make_data(max(args.trials, args.ais_trials), t_obs, t_fwd, 107, 35).to(device)
        model, guide = build(default_config("mc_maze_small", bin_ms), batch.n_neurons, batch.n_heldin)
        model.to(device), guide.to(device)
        log_evidence(model, guide, batch[:2], 2, warn=False)  # warm up
        found = []
        if "iwae" in args.methods:
            found += time_iwae(model, guide, batch[:args.trials], args)
        found += time_ais(model, guide, batch[:args.ais_trials], args)
        rows += [{"bin_ms": bin_ms, "bins": t_obs + t_fwd, **r} for r in found]
    print(f"log_evidence and bdmc on trials x 142 neurons, device {args.device}, {args.threads} thread(s), "
          f"max_tiled {args.max_tiled} (IWAE)")
    print("| bin | bins | method | quantity | K (draws or chains) | S | L | trials | seconds | s / trial | peak growth (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bin_ms']} ms | {r['bins']} | {r['method']} | {r['quantity']} | {r['K']} | {r.get('steps', '')} "
              f"| {r.get('leapfrog', '')} | {r['trials']} | {r['seconds']} | {r['seconds_per_trial']} | {r['peak_growth_mib']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
