"""Cost of the importance-sampled held-out evidence (``pyro_langevin.evidence.log_evidence``) at
MC_Maze_Small size: seconds and peak memory growth for K = 100 and K = 1000 draws per trial.

Data: 100 trials of Poisson counts shaped like MC_Maze_Small (107 held-in + 35 held-out neurons;
140 + 40 bins at 5 ms, or 35 + 10 at 20 ms). Model and guide: the NLB default member of that bin
width (``default_config("mc_maze_small", BIN)``: latent 32, bidirectional GRU 128, Transformer
width 64), untrained (the cost does not depend on the fitted values). Both quantities are timed:
``joint`` (one guide and one model pass per draw) and ``heldout`` (one more model pass).

Usage::

    python benchmarks/evidence_cost.py                       # 20 ms and 5 ms, K 100 and 1000, joint
    python benchmarks/evidence_cost.py --bins 20 --particles 100 1000 --quantity joint heldout
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_args, make_data, reset_peak_rss, setup_machine, status_kib  # noqa: E402

from pyro_langevin.evidence import log_evidence  # noqa: E402
from pyro_langevin.nlb.config import default_config  # noqa: E402
from pyro_langevin.spec import build  # noqa: E402

#: Observed and forward bins of MC_Maze_Small at each NLB bin width.
BINS = {5: (140, 40), 20: (35, 10)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bins", type=int, nargs="+", default=[20, 5], choices=sorted(BINS), help="bin widths in ms")
    p.add_argument("--particles", type=int, nargs="+", default=[100, 1000], help="K values")
    p.add_argument("--quantity", nargs="+", default=["joint"], choices=["joint", "heldout"])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--max-tiled", type=int, default=512, help="log_evidence's max_tiled")
    add_machine_args(p)
    args = p.parse_args()
    device = setup_machine(args)
    rows = []
    for bin_ms in args.bins:
        t_obs, t_fwd = BINS[bin_ms]
        batch = make_data(args.trials, t_obs, t_fwd, 107, 35).to(device)
        model, guide = build(default_config("mc_maze_small", bin_ms), batch.n_neurons, batch.n_heldin)
        model.to(device), guide.to(device)
        log_evidence(model, guide, batch[:2], 2, warn=False)  # warm up
        for quantity in args.quantity:
            for k in args.particles:
                before = status_kib("VmRSS")
                reset = reset_peak_rss()
                t0 = time.perf_counter()
                ev = log_evidence(model, guide, batch, k, quantity=quantity, max_tiled=args.max_tiled, warn=False)
                seconds = time.perf_counter() - t0
                peak = (status_kib("VmHWM") - before) / 1024 if reset else float("nan")
                rows.append({"bin_ms": bin_ms, "bins": t_obs + t_fwd, "quantity": quantity, "K": k,
                             "trials": args.trials, "seconds": round(seconds, 1), "peak_growth_mib": round(peak, 1),
                             "finite": bool((ev.log_evidence == ev.log_evidence).all())})
                print(f"  {bin_ms} ms {quantity} K={k}: {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"log_evidence on {args.trials} trials x 142 neurons, device {args.device}, {args.threads} thread(s), "
          f"max_tiled {args.max_tiled}")
    print("| bin | bins | quantity | K | seconds | peak growth (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bin_ms']} ms | {r['bins']} | {r['quantity']} | {r['K']} | {r['seconds']} | {r['peak_growth_mib']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
