"""Time of posterior draws for export: S = 50 over S = 1, per-draw loop, tiled trials and the draws plate.

MC_Maze_Small size: 100 trials, 140 observed + 40 forward bins, 107 held-in + 35 held-out = 142
neurons, latent 32, GRU guide hidden 128 (untrained weights: the cost does not depend on them).
Variants of ``posterior_means``:

* "per-draw loop": ``draws_per_pass=1, share_encoder=False``, one guide + model pass per draw (the
  behaviour up to issue 12);
* "tiled": ``draws_plate=False``, several draws a pass as tiled copies of the trials, the encoder
  once per chunk (issue 12 to issue 25);
* "plate" (the default since issue 25): ``draws_plate=True``, several draws a pass inside
  ``pyro.plate("draws", k)`` with the trials not copied;

each at most ``--max-tiled`` draws x trials a pass (one line per value). Each S = 1 time is the
median of ``--repeats`` calls, each S = 50 time one call. The last lines hold the word ``ratio``.

Usage::

    python benchmarks/posterior_speed.py                       # CPU, 1 thread
    python benchmarks/posterior_speed.py --max-tiled 256 1000 5000 --device cuda
    python benchmarks/posterior_speed.py --batch-size 10 --max-tiled 100   # where per-pass overhead dominates
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_args, build, make_data, seconds, setup_machine  # noqa: E402

from pyro_langevin.posterior import posterior_means  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--samples", type=int, default=50, help="S of the long run (the short one is S = 1)")
    p.add_argument("--batch-size", type=int, default=256, help="trials per chunk (posterior_means' batch_size)")
    p.add_argument("--max-tiled", type=int, nargs="+", default=[256],
                   help="tiled-trial budgets of the 'after' runs (default: the default batch_size, 256)")
    p.add_argument("--repeats", type=int, default=3, help="calls of S = 1 (median)")
    add_machine_args(p)
    args = p.parse_args()
    device = setup_machine(args)
    batch = make_data(args.trials, 140, 40, 107, 35).to(device)
    model, guide, _ = build(device, n_neurons=142, n_heldin=107, latent=32, hidden=128)

    def run(s: int, **kw) -> None:
        posterior_means(model, guide, batch, n_samples=s, **kw)

    run(1, batch_size=2)  # warm up
    variants = [("per-draw loop", dict(draws_per_pass=1, batch_size=args.batch_size, share_encoder=False))]
    for m in args.max_tiled:
        variants += [(f"{how}: max_tiled={m}", dict(max_tiled=m, batch_size=min(m, args.batch_size), draws_plate=plate))
                     for how, plate in (("tiled", False), ("plate", True))]
    print(f"posterior_means on {device} ({args.threads} threads): {args.trials} trials x 180 bins (140+40) x "
          f"142 neurons (107 held-in), latent 32, GRU hidden 128, chunks of {args.batch_size} trials")
    rows = []
    for name, kw in variants:
        t1 = statistics.median(seconds(lambda: run(1, **kw), device) for _ in range(args.repeats))
        ts = seconds(lambda: run(args.samples, **kw), device)
        rows.append((name, t1, ts))
        print(f"  {name:<24} S=1 {t1:7.3f} s   S={args.samples} {ts:7.2f} s   ({ts / args.samples:.3f} s/draw)",
              flush=True)
    for name, t1, ts in rows:
        print(f"ratio S={args.samples}/S=1 {name}: {ts / t1:.1f}")
    for (tiled, _, t_tiled), (plate, _, t_plate) in zip(rows[1::2], rows[2::2]):
        print(f"ratio S={args.samples} tiled/plate ({plate.split(': ')[1]}): {t_tiled / t_plate:.2f}")


if __name__ == "__main__":
    main()
