"""Time one SVI step of LangevinFlow (Pyro) against a plain-PyTorch step of the same network and loss.

    python benchmarks/svi_step.py                 # CPU (or CUDA when available), 1 and 2 threads
    python benchmarks/svi_step.py --threads 1     # one thread count only
    python benchmarks/svi_step.py --device cuda --repeats 20

MC_Maze-like size: batch 64, 140 observed + 40 forward bins, 137 held-in + 45 held-out neurons,
latent 64. One step = ELBO forward + backward + Adam update. The plain-PyTorch version uses the
very same modules and computes the same loss by hand (reparameterised samples, analytic per-step
Normal KL, masked Poisson log-likelihood), so the ratio is the cost of writing it in Pyro. Both
run with distribution argument validation off, as ``fit()`` does by default.
Prints a table: step times and their ratio (target <= 1.3) at each ``--threads`` count (CPU; one
row set on CUDA), peak memory, and the step time at batch 256.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Normal, Poisson, kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_args, build, make_data, setup_machine, sync  # noqa: E402

from pyro_langevin.elbo import make_elbo  # noqa: E402
from pyro_langevin.guides import GRUGuide  # noqa: E402
from pyro_langevin.models import LangevinFlow  # noqa: E402


def plain_loss(model: LangevinFlow, guide: GRUGuide, batch) -> torch.Tensor:
    """The negative ELBO of model + guide written without Pyro (what TraceMeanField_ELBO computes)."""
    h, h_ic = guide.encode(batch)
    q_z0, q_v0 = (q.base_dist for q in guide.initial_head(h_ic))  # the same Normal heads as the guide
    force, log_scale = guide.force_head(h)
    prior0 = Normal(torch.zeros_like(q_z0.loc), 1.0)
    kl = kl_divergence(q_z0, prior0).sum() + kl_divergence(q_v0, prior0).sum()
    z, v = q_z0.rsample(), q_v0.rsample()
    zs, vs = [z], [v]
    transition = model.transition_fn()
    for t in range(1, batch.n_bins):
        step = transition(z, v)
        z = step.z_next
        loc, scale = step.v_loc, step.v_scale
        if t < batch.n_observed_bins:
            q = Normal(loc + force[:, t], scale * torch.exp(log_scale[:, t]))
            kl = kl + kl_divergence(q, Normal(loc, scale)).sum()
        else:
            q = Normal(loc, scale)
            kl = kl + kl_divergence(q, Normal(loc, scale)).sum()  # zero, kept for the same work
        v = q.rsample()
        zs.append(z)
        vs.append(v)
    rates = torch.exp(model.decoder(torch.stack(zs, 1), torch.stack(vs, 1)))
    ll = (Poisson(rates).log_prob(batch.target) * batch.mask).sum()
    return kl - ll


def time_steps(loss_fn, params, repeats: int, device) -> list[float]:
    opt = torch.optim.Adam(params, lr=1e-3)
    times = []
    for i in range(repeats + 1):  # first step warms up
        sync(device)
        t0 = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 200.0)
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ratio_rows(elbo, model, guide, params, batch, repeats: int, device) -> list[tuple[str, str]]:
    """Median Pyro and plain step times at batch ``len(batch)``, interleaved so load hits both alike."""
    pyro_t, plain_t = [], []
    for _ in range(2):
        pyro_t += time_steps(lambda: elbo.differentiable_loss(model, guide, batch), params, repeats, device)
        plain_t += time_steps(lambda: plain_loss(model, guide, batch), params, repeats, device)
    tag = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    n = len(batch)
    return [
        (f"pyro step, batch {n}, {tag} (s)", f"{statistics.median(pyro_t):.4f}"),
        (f"plain step, batch {n}, {tag} (s)", f"{statistics.median(plain_t):.4f}"),
        (f"ratio pyro / plain, {tag}", f"{statistics.median(pyro_t) / statistics.median(plain_t):.3f}"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-256", action="store_true", help="skip the batch-256 timing")
    add_machine_args(p, threads=[1, 2])
    args = p.parse_args()
    device = setup_machine(args)  # also turns argument validation off, as fit() does
    thread_counts = args.threads if device.type == "cpu" else [None]
    elbo = make_elbo("meanfield")  # what fit() uses
    batch = make_data(64).to(device)
    model, guide, params = build(device)
    rows = [("device", str(device) if device.type == "cpu" else torch.cuda.get_device_name(device))]
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        rows += ratio_rows(elbo, model, guide, params, batch, args.repeats, device)
    with torch.no_grad():
        torch.manual_seed(1)
        a = elbo.differentiable_loss(model.eval(), guide.eval(), batch)
        torch.manual_seed(1)
        b = plain_loss(model, guide, batch)
    model.train(), guide.train()
    rows += [
        ("same loss (same seed)", f"{float(a):.2f} vs {float(b):.2f}"),
        ("peak memory after batch 64 (MiB)", f"{peak_memory_mb(device):.0f}"),
    ]
    if not args.skip_256:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        big = make_data(256).to(device)
        t256 = time_steps(lambda: elbo.differentiable_loss(model, guide, big), params, max(2, args.repeats // 2), device)
        rows += [
            (f"pyro step, batch 256, {torch.get_num_threads()} threads (s)" if device.type == "cpu"
             else "pyro step, batch 256 (s)", f"{statistics.median(t256):.4f}"),
            ("peak memory after batch 256 (MiB)", f"{peak_memory_mb(device):.0f}"),
        ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}} | value")
    print("-" * width + "-|------")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


if __name__ == "__main__":
    main()
