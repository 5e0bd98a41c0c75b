"""Peak memory of posterior sampling for export: S = 1 vs S = 50 draws at MC_Maze-like size.

``posterior_means`` streams over passes of draws (at most ``max_tiled`` tiled trials each, default
``batch_size``; running means) and trial chunks, so its peak memory should not grow with S. Each S runs in a fresh subprocess; on CPU the peak is the growth of
the resident set (VmHWM after ``clear_refs``, else ``ru_maxrss``) over the resident size just before
the call, on GPU ``torch.cuda.max_memory_allocated``. For contrast the table also gives what keeping
every draw of the rates (as a stacked ``Predictive`` would) costs: ``S * trials * bins * neurons * 4``
bytes, and with ``--naive`` measures such a stacking implementation.

Usage::

    python benchmarks/posterior_memory.py            # trials 100, bins 140+40, neurons 137+45, latent 64
    python benchmarks/posterior_memory.py --samples 1 10 50 --naive
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import reset_peak_rss, status_kib

    from pyro_langevin import make_batch
    from pyro_langevin.guides import GRUGuide
    from pyro_langevin.models import LangevinFlow
    from pyro_langevin.posterior import posterior_means

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    n, t, f, n_in, n_out = args.trials, args.observed_bins, args.forward_bins, args.heldin, args.heldout
    counts = torch.poisson(torch.full((n, t + f, n_in + n_out), 0.3))
    batch = make_batch(counts[:, :t, :n_in], counts[:, :t, n_in:], counts[:, t:, :n_in], counts[:, t:, n_in:]).to(device)
    model = LangevinFlow(n_in + n_out, args.latent).to(device)
    guide = GRUGuide(model, n_in, hidden=args.hidden).to(device)

    def naive(s: int) -> torch.Tensor:  # keep every draw, then average (what streaming avoids)
        from pyro import poutine

        draws = []
        with torch.no_grad():
            model.eval(), guide.eval()
            for _ in range(s):
                tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(batch))).get_trace(batch)
                draws.append(tr.nodes["rates"]["value"])
            return torch.stack(draws).mean(0).cpu()

    run = (lambda s: naive(s)) if args.mode == "naive" else (
        lambda s: posterior_means(model, guide, batch, n_samples=s, batch_size=args.batch_size)["rates"])
    run(1) if device.type == "cuda" else posterior_means(model, guide, batch[:2], n_samples=1)  # warm up kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    before_rss = status_kib("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    rates = run(args.s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"S": args.s, "mode": args.mode, "seconds": seconds, "finite": bool(torch.isfinite(rates).all()),
           "shape": list(rates.shape)}
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        out["how"] = "torch.cuda.max_memory_allocated - allocated before"
    elif reset:
        out["peak_mib"] = (status_kib("VmHWM") - before_rss) / 1024
        out["how"] = "VmHWM (reset via clear_refs) - VmRSS before"
    else:
        out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) / 1024
        out["how"] = "ru_maxrss - VmRSS before (upper bound of the growth)"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[1, 50])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--observed-bins", type=int, default=140)
    p.add_argument("--forward-bins", type=int, default=40)
    p.add_argument("--heldin", type=int, default=137)
    p.add_argument("--heldout", type=int, default=45)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256, help="trials per chunk in posterior_means")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1 is fastest on a shared box)")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--naive", action="store_true", help="also measure keeping every draw (largest S only)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--s", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    base = [a for a in sys.argv[1:] if a != "--naive"]
    jobs = [(s, "stream") for s in args.samples]
    if args.naive:
        jobs.append((max(args.samples), "naive"))
    rows = []
    for s, mode in jobs:
        cmd = [sys.executable, __file__, *base, "--device", args.device, "--child", "--s", str(s), "--mode", mode]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.exit(f"S={s} {mode} failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  done S={s} ({mode}) in {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)

    n_bins = args.observed_bins + args.forward_bins
    n_neurons = args.heldin + args.heldout
    print(f"posterior_means peak memory, device {args.device}: {args.trials} trials x {n_bins} bins "
          f"({args.observed_bins}+{args.forward_bins}) x {n_neurons} neurons ({args.heldin} held-in), "
          f"latent {args.latent}, GRU hidden {args.hidden}, chunk {args.batch_size} trials, {args.threads} threads")
    print(f"measured as: {rows[0]['how']}")
    print()
    print(f"| {'S':>3} | {'method':<12} | {'peak growth (MiB)':>17} | {'all draws of rates (MiB)':>24} | {'seconds':>7} | finite |")
    print(f"|{'-' * 5}|{'-' * 14}|{'-' * 19}|{'-' * 26}|{'-' * 9}|--------|")
    for r in rows:
        stacked = r["S"] * args.trials * n_bins * n_neurons * 4 / 2**20
        method = "streamed" if r["mode"] == "stream" else "keep draws"
        print(f"| {r['S']:>3} | {method:<12} | {r['peak_mib']:>17.1f} | {stacked:>24.1f} | {r['seconds']:>7.1f} | {str(r['finite']):>6} |")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if __name__ == "__main__":
    main()
