"""Read what a fitted LangevinFlow learned: modes in Hz, energy and forces, flow field, rotations,
alignment and interventions (``pyro_langevin.dynamics``), from the folder of an earlier run.

    python examples/lorenz.py && python examples/dynamics.py --data lorenz --run runs/lorenz
    python examples/nlb.py --dataset mc_maze_small --data-dir DIR --bin-ms 5 --phase val --out runs/mms
    python examples/dynamics.py --data nlb --run runs/mms --data-dir DIR          # member 0 of the ensemble
    python examples/dynamics.py --data lorenz --run runs/lorenz-quick --quick      # smoke run

The data are rebuilt from the run's own checkpoint: Lorenz from the seed and settings that
``examples/lorenz.py`` stored, NLB from ``--data-dir`` at the bins the model fitted. On MC_Maze the
conditions are reach directions derived from each training trial's hand velocity (the NLB tensors
carry no condition ids; see ``--help`` of ``--directions``), and time is given from movement onset.

Writes ``OUT/dynamics.json`` and the figures ``OUT/*.png`` (default ``runs/dynamics-{data}``, quick
runs ``runs/dynamics-{data}-quick``; an ``--out`` holding an earlier run needs ``--overwrite``) and
prints the JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch

from pyro_langevin import __version__
from pyro_langevin import dynamics as dyn
from pyro_langevin import dynamics_plots as dplots
from pyro_langevin.console import Session, run_command
from pyro_langevin.options import ArgumentParser, OptionError, check_run_options, non_negative_int, positive_int
from pyro_langevin.smoothing import smooth_spikes
from pyro_langevin.spec import SpecError, load_run

#: MC_Maze trials (nlb_tools' alignment) run from 250 ms before movement onset to 450 ms after.
MOVE_ONSET_MS = 250
#: Window of the rotation fit around movement onset, ms: the jPCA codepack's example window
#: (Churchland et al. 2012, ``tstart=-50, tend=150``), fixed before any fit was looked at.
JPCA_WINDOW_MS = (-50, 150)
#: Reach direction: angle of the mean hand velocity over this window after movement onset, ms.
DIRECTION_WINDOW_MS = (0, 300)
#: Directions with fewer trials are left out of condition averages (spectra, rotations).
MIN_TRIALS_PER_CONDITION = 3
#: Gaussian s.d. of the spike smoothing before the data's own rotation fit, ms.
PSTH_SMOOTHING_MS = 20


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="examples/dynamics.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("lorenz", "nlb"), required=True, help="which kind of run --run is")
    p.add_argument("--run", type=Path, required=True,
                   help="folder of a run of examples/lorenz.py or examples/nlb.py (its checkpoints hold the spec)")
    p.add_argument("--data-dir", type=Path, default=None, help="NLB data folder (as given to examples/nlb.py)")
    p.add_argument("--member", type=non_negative_int, default=0, help="ensemble member of an NLB run (default 0)")
    p.add_argument("--directions", type=positive_int, default=8,
                   help="MC_Maze: reach-direction sectors (angle of the mean hand velocity 0-300 ms after "
                        "movement onset); default 8")
    p.add_argument("--draws", type=positive_int, default=None,
                   help="prior draws per start in the interventions (default 20, quick 4)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/dynamics-{data})")
    p.add_argument("--quick", action="store_true", help="fewer draws and a coarser grid (default --out ...-quick)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier readout in --out")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the prior draws (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--version", action="version", version=f"%(prog)s (pyro-langevin {__version__})")
    args = p.parse_args(argv)
    args.resume = False  # nothing to resume: a readout is rewritten whole
    return args


def _load(args: argparse.Namespace, folder: Path):
    try:
        return load_run(folder, map_location=args.device)
    except (FileNotFoundError, SpecError, KeyError) as exc:
        raise OptionError(f"--run {args.run}: {exc}") from None


class _Timer:
    """Seconds per step of the readout, printed as it goes."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        print(f"  {name}: {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)
        return out


def _features(paths: dyn.LatentPaths, stop: int) -> np.ndarray:
    return np.concatenate([paths.z[:, :stop], paths.v[:, :stop]], axis=-1)


def _common(model, guide, batch, paths_fn, conditions, args, timer: _Timer, n_draws: int) -> Dict[str, Any]:
    """The readout steps every dataset shares: paths, modes, energy, flow field, interventions."""
    paths = timer("posterior-mean paths", paths_fn)
    # exact stiffness at the origin for the oscillators; the Hessian averaged over posterior states otherwise
    states = None if hasattr(model.potential, "stiffness_matrix") else \
        torch.as_tensor(paths.z.reshape(-1, paths.z.shape[-1])[::7], device=next(model.parameters()).device)
    modes = timer("normal modes", lambda: dyn.normal_modes(model, states))
    energy = timer("energy and forces", lambda: dyn.energy_and_forces(model, paths))
    flow = timer("flow field", lambda: dyn.flow_field(model, paths, grid_size=13 if args.quick else 21))
    ref = next(model.parameters())
    suite = timer("interventions", lambda: dyn.intervention_suite(
        model, modes, torch.as_tensor(paths.z[:, 0], device=ref.device), torch.as_tensor(paths.v[:, 0], device=ref.device),
        paths.z.shape[1], paths.z, conditions, n_draws=n_draws, seed=args.seed))
    return {"paths": paths, "modes": modes, "energy": energy, "flow": flow, "suite": suite}


def _modes_json(modes: dyn.NormalModes) -> Dict[str, Any]:
    return modes.summary()


def _interventions_json(suite: Dict[str, Any]) -> Dict[str, Any]:
    return {"mode_index": suite["mode_index"], "mode_frequency_hz": suite["mode_frequency_hz"], "site": suite["site"],
            "n_draws": suite["baseline"].n_draws,
            **{k: v.summary() for k, v in suite["interventions"].items()}}


def run_lorenz(args: argparse.Namespace, timer: _Timer) -> Dict[str, Any]:
    """The readout of a run of ``examples/lorenz.py``."""
    from pyro_langevin.data.lorenz import make_lorenz

    model, guide, spec, ckpt = _load(args, args.run)
    meta = ckpt.get("meta") or {}
    if meta.get("script") != "lorenz" or "data" not in meta:
        raise OptionError(f"--run {args.run} is not a run of examples/lorenz.py that stored its data settings "
                          "(meta 'script' and 'data'); rerun examples/lorenz.py")
    data_cfg, seed = meta["data"], int(meta["seed"])
    data = make_lorenz(seed=seed, **data_cfg)
    tpc = int(data_cfg["trials_per_condition"])
    conditions = data.valid.index.numpy() // tpc
    bin_s = dyn.bin_seconds(model)
    t0 = time.perf_counter()
    n_draws = args.draws or (4 if args.quick else 20)
    res = _common(model, guide, data.valid, lambda: dyn.latent_paths(model, guide, data.valid), conditions, args,
                  timer, n_draws)
    paths, modes = res["paths"], res["modes"]
    train_paths = timer("posterior-mean paths (training trials, for the ridge maps)",
                        lambda: dyn.latent_paths(model, guide, data.train))
    n = data.valid.n_observed_bins
    align_zv = timer("alignment", lambda: dyn.ridge_decode(_features(train_paths, n), data.train_latents,
                                                           _features(paths, n), data.valid_latents))
    align_z = dyn.ridge_decode(train_paths.z, data.train_latents, paths.z, data.valid_latents)
    align_cv = dyn.cross_validated_decode(_features(paths, n), data.valid_latents, n_folds=5, groups=conditions)
    # The Lorenz system's own frequency, in the model's time units: long paths with the run's step and bin.
    long_run = make_lorenz(n_conditions=8, trials_per_condition=1, n_bins=4096 if not args.quick else 1024,
                           n_neurons=2, seed=seed)
    states = np.concatenate([long_run.train_latents, long_run.valid_latents])
    lorenz_spec = dyn.power_spectrum(states, bin_s, segment_bins=256)
    per_coord = {c: dyn.power_spectrum(states[..., [i]], bin_s, segment_bins=256).peak_hz for i, c in enumerate("xyz")}
    trial_spec = dyn.power_spectrum(data.valid_latents, bin_s)
    psth_spec = dyn.psth_power_spectrum(data.valid.target.numpy()[:, :n], bin_s, conditions)
    rots = timer("rotation fits", lambda: {
        "latent_z": dyn.rotation_fit(dyn.condition_average(paths.z, conditions), bin_s),
        "latent_state_zv": dyn.rotation_fit(dyn.condition_average(dyn.phase_space(paths.z, paths.v), conditions), bin_s),
        "true_lorenz_state": dyn.rotation_fit(dyn.condition_average(data.valid_latents, conditions), bin_s)})
    readout_s = time.perf_counter() - t0

    figures = {
        "modes": dplots.plot_modes(modes, psth_spec, reference_hz=lorenz_spec.peak_hz,
                                   reference_label="Lorenz states' spectral peak",
                                   spectrum_label="spikes' PSTH power (validation trials)"),
        "energy": dplots.plot_energy(res["energy"], n_observed_bins=n),
        "flow": dplots.plot_flow_field(res["flow"], conditions, title="Lorenz: learned potential on the top-2 PC "
                                       "plane,\nvalidation trials coloured by initial condition"),
        "rotation": dplots.plot_rotation(rots, title="Lorenz: condition-averaged paths of the validation trials in "
                                               "each fit's top rotational plane"),
        "alignment": dplots.plot_state_alignment(
            data.valid_latents, align_zv.predicted, paths.time_ms[:n], trials=(0, data.valid.n_trials // 3,
                                                                                 2 * data.valid.n_trials // 3),
            r2_per_output=align_zv.r2_per_output,
            title=f"Lorenz state from latents [z, v]: ridge fitted on {align_zv.n_fit_trials} training trials, "
                  f"shown on held-out validation trials (R^2 {align_zv.r2:.3f})"),
        "interventions": dplots.plot_interventions(res["suite"]["interventions"], res["suite"]["baseline_psth_hz"],
                                                   paths.time_ms),
    }
    return {
        "data": "lorenz", "run": str(args.run), "epoch": int(ckpt["epoch"]), "lorenz_seed": seed, "data_settings": data_cfg,
        "n_valid_trials": data.valid.n_trials, "n_train_trials": data.train.n_trials, "bin_ms": 1000 * bin_s,
        "time_unit_note": "Lorenz data have no physical time: Hz are in the model's units (one bin = dt x 100 ms)",
        "modes": _modes_json(modes),
        "lorenz_frequency": {"peak_hz_mean_over_xyz": lorenz_spec.peak_hz, "peak_hz_per_coordinate": per_coord,
                             "resolution_hz": lorenz_spec.resolution_hz,
                             "peak_hz_from_the_trials": trial_spec.peak_hz, "trial_resolution_hz": trial_spec.resolution_hz},
        "psth_spectrum": psth_spec.summary(),
        "energy": res["energy"].summary(), "force_share_per_time": res["energy"].force_share_per_time[:n],
        "flow": res["flow"].summary(),
        "rotation": {k: v.summary() for k, v in rots.items()},
        "alignment": {"ridge_train_to_valid_zv": align_zv.summary(), "ridge_train_to_valid_z": align_z.summary(),
                      "grouped_cv_over_valid_conditions_zv": align_cv.summary()},
        "interventions": _interventions_json(res["suite"]),
        "readout_seconds": round(readout_s, 1),
    }, figures


def _nlb_folder(args: argparse.Namespace) -> Path:
    member = args.run / f"member{args.member}"
    if member.is_dir():
        return member
    if args.member:
        raise OptionError(f"--member {args.member}: {args.run} has no folder member{args.member}")
    return args.run


def _soft_normalise(rates_hz: np.ndarray) -> np.ndarray:
    """Each neuron of (condition, time, neuron) rates in Hz divided by (its range + 5 Hz), as jPCA does."""
    span = rates_hz.max(axis=(0, 1)) - rates_hz.min(axis=(0, 1))
    return rates_hz / (span + 5.0)


def run_nlb_readout(args: argparse.Namespace, timer: _Timer) -> Dict[str, Any]:
    """The readout of member ``--member`` of a run of ``examples/nlb.py`` on an MC_Maze dataset."""
    from pyro_langevin.nlb.coarse import coarsen_data
    from pyro_langevin.nlb.data import load_nlb

    if args.data_dir is None:
        raise OptionError("--data-dir: give the NLB data folder the run was trained from")
    folder = _nlb_folder(args)
    model, guide, spec, ckpt = _load(args, folder)
    meta = ckpt.get("meta") or {}
    if "dataset" not in meta:
        raise OptionError(f"--run {folder} is not a run of examples/nlb.py (its checkpoint names no dataset)")
    dataset, bin_ms, phase = meta["dataset"], int(meta["bin_ms"]), meta["phase"]
    fit_bin = int(meta.get("fit_bin_ms", bin_ms))
    if not dataset.startswith("mc_maze"):
        raise OptionError(f"--run {folder}: dataset {dataset!r}; the readout knows the MC_Maze task (movement onset, "
                          "reach directions) only")
    data = load_nlb(dataset, args.data_dir, bin_ms=bin_ms, phase=phase)
    fit = coarsen_data(data, fit_bin)
    batch = fit.train.to(args.device)
    if abs(model.dynamics.dt * 100 - fit_bin) > 1e-6 or batch.n_neurons != model.n_neurons:
        raise OptionError(f"--run {folder}: the model (dt {model.dynamics.dt}, {model.n_neurons} neurons) does not fit "
                          f"the {fit_bin} ms data ({batch.n_neurons} neurons)")
    onset_fine = MOVE_ONSET_MS // bin_ms
    conditions = dyn.reach_direction(data.train.behavior.numpy(), onset_fine + DIRECTION_WINDOW_MS[0] // bin_ms,
                                     onset_fine + DIRECTION_WINDOW_MS[1] // bin_ms, args.directions)
    names = {k: f"{round(k * 360 / args.directions)} deg" for k in range(args.directions)}
    bin_s = dyn.bin_seconds(model)
    n = batch.n_observed_bins
    t0 = time.perf_counter()
    n_draws = args.draws or (4 if args.quick else 20)
    res = _common(model, guide, batch, lambda: dyn.latent_paths(model, guide, batch), conditions, args, timer, n_draws)
    paths, modes = res["paths"], res["modes"]
    time_ms = paths.time_ms - MOVE_ONSET_MS  # bin starts, from movement onset

    # Condition averages (spectra, rotations) use the directions with enough trials to average.
    kept = [c for c in np.unique(conditions) if (conditions == c).sum() >= MIN_TRIALS_PER_CONDITION]
    avg = np.isin(conditions, kept)
    fine_counts = data.train.target.numpy()[:, :data.train.n_observed_bins]
    psth_spec = timer("PSTH spectrum", lambda: dyn.psth_power_spectrum(fine_counts[avg], bin_ms / 1000, conditions[avg]))
    velocity = batch.behavior.cpu().numpy()[:, :n]

    def decoders() -> Dict[str, dyn.Decoding]:
        return {"latent_state_zv": dyn.cross_validated_decode(_features(paths, n), velocity, 5, args.seed),
                "latent_z": dyn.cross_validated_decode(paths.z[:, :n], velocity, 5, args.seed),
                "model_log_rates": dyn.cross_validated_decode(np.log(paths.rates[:, :n]), velocity, 5, args.seed)}

    decs = timer("velocity decoding", decoders)
    fine_t = np.arange(fine_counts.shape[1]) * bin_ms - MOVE_ONSET_MS
    sources = {  # name -> (condition-averaged series (condition, time, dims), bin starts from onset in ms, bin in s)
        "latent_z": (dyn.condition_average(paths.z[avg, :n], conditions[avg]), time_ms[:n], bin_s),
        "latent_state_zv": (dyn.condition_average(dyn.phase_space(paths.z, paths.v)[avg, :n], conditions[avg]),
                            time_ms[:n], bin_s),
        "model_rates": (_soft_normalise(dyn.condition_average(paths.rates[avg, :n], conditions[avg]) / bin_s),
                        time_ms[:n], bin_s),
        "data_psth": (_soft_normalise(dyn.condition_average(
            smooth_spikes(fine_counts[avg], PSTH_SMOOTHING_MS / bin_ms), conditions[avg]) / (bin_ms / 1000)),
            fine_t, bin_ms / 1000),
    }

    def rotations() -> Dict[str, dyn.RotationFit]:
        out = {}
        for name, (x, t, b) in sources.items():
            window = (t >= JPCA_WINDOW_MS[0]) & (t <= JPCA_WINDOW_MS[1])
            out[f"{name}_movement_window"] = dyn.rotation_fit(x[:, window], b)
            out[f"{name}_whole_trial"] = dyn.rotation_fit(x, b)
        return out

    rots = timer("rotation fits", rotations)
    readout_s = time.perf_counter() - t0
    z_avg = sources["latent_z"][0]
    mean, comps, _ = dyn.principal_components(z_avg.reshape(-1, z_avg.shape[-1]), 2)
    avg_2d = (z_avg - mean) @ comps.T
    labels = [names[int(c)] for c in kept]
    counts = {names[int(c)]: int((conditions == c).sum()) for c in np.unique(conditions)}
    shown = {k: rots[f"{k}_movement_window"] for k in ("latent_z", "latent_state_zv", "model_rates", "data_psth")}
    palette = dplots.direction_palette(args.directions)
    figures = {
        "modes": dplots.plot_modes(modes, psth_spec, spectrum_label="PSTH power (5 ms spikes, per direction)",
                                   reference_hz=rots["latent_state_zv_movement_window"].frequency_hz,
                                   reference_label="top jPCA plane of the latent state [z, v]"),
        "energy": dplots.plot_energy(res["energy"], time_ms, event_ms=0.0, n_observed_bins=n),
        "flow": dplots.plot_flow_field(res["flow"], conditions, names, cyclic=True, palette=palette,
                                       title=f"{dataset}: learned potential on the top-2 PC plane,\ntraining trials "
                                             "coloured by reach direction"),
        "rotation": dplots.plot_rotation(shown, kept, names, cyclic=True, palette=palette,
                                         title=f"{dataset}: condition-averaged paths ({len(kept)} reach directions), "
                                               f"{JPCA_WINDOW_MS[0]} to {JPCA_WINDOW_MS[1]} ms from movement onset, "
                                               "in each fit's top rotational plane"),
        "decoding": dplots.plot_velocity_decoding(decs["latent_state_zv"], velocity, time_ms[:n], conditions, names,
                                                  avg_2d, event_ms=0.0, avg_conditions=kept, palette=palette),
        "interventions": dplots.plot_interventions(res["suite"]["interventions"], res["suite"]["baseline_psth_hz"],
                                                   time_ms, event_ms=0.0),
    }
    share_t = res["energy"].force_share_per_time
    return {
        "data": "nlb", "run": str(folder), "dataset": dataset, "phase": phase, "bin_ms": bin_ms, "fit_bin_ms": fit_bin,
        "epoch": int(ckpt["epoch"]), "member": meta.get("member"), "n_trials": batch.n_trials,
        "conditions": {"how": f"angle of the mean hand velocity {DIRECTION_WINDOW_MS[0]}..{DIRECTION_WINDOW_MS[1]} ms "
                              f"after movement onset, {args.directions} sectors", "trials_per_direction": counts},
        "modes": _modes_json(modes), "psth_spectrum": psth_spec.summary(),
        "energy": res["energy"].summary(),
        "time_ms_from_movement_onset": time_ms[:n], "force_share_per_time": share_t[:n],
        "force_share_windows": {
            "before_onset_-250_0_ms": float(np.nanmean(share_t[:n][time_ms[:n] < 0])),
            "after_onset_0_450_ms": float(np.nanmean(share_t[:n][time_ms[:n] >= 0])),
        },
        "flow": res["flow"].summary(),
        "rotation": {k: v.summary() for k, v in rots.items()} | {
            "window_ms": JPCA_WINDOW_MS, "directions_averaged": labels,
            "data_psth": f"spikes smoothed with a {PSTH_SMOOTHING_MS} ms s.d. Gaussian; every series soft-normalised "
                         "(divided by its range + 5 Hz) as in jPCA, except the latents"},
        "velocity_decoding": {k: d.summary() | {"r2_per_time": d.r2_per_time} for k, d in decs.items()},
        "interventions": _interventions_json(res["suite"]),
        "readout_seconds": round(readout_s, 1),
    }, figures


def run(args: argparse.Namespace, session: Session) -> Dict[str, Any]:
    """Check the options, load the run, read out its dynamics, write the JSON and figures."""
    if not args.run.exists():
        raise OptionError(f"--run {args.run}: no such folder")
    opts = session.options = check_run_options(args, f"dynamics-{args.data}")
    timer = _Timer()
    print(f"reading the dynamics of {args.run} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    summary, figures = (run_lorenz if args.data == "lorenz" else run_nlb_readout)(args, timer)
    summary["figures"] = sorted(str(dplots.save(fig, opts.out / f"{name}.png")) for name, fig in figures.items())
    summary["step_seconds"] = timer.seconds
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)  # loading, readout and figures
    summary["torch_threads"] = torch.get_num_threads()
    text = json.dumps(dyn.jsonable(summary))
    (opts.out / "dynamics.json").write_text(json.dumps(dyn.jsonable(summary), indent=2))
    print(f"wrote {opts.out / 'dynamics.json'} and {len(figures)} figures; readout {summary['readout_seconds']} s, "
          f"with loading and figures {summary['total_seconds']} s")
    print(text)
    return summary


def main(argv=None) -> int:
    """Run as a command: exit status 0, or 2 for bad input."""
    return run_command(lambda session: run(parse_args(argv), session), "examples/dynamics.py")


if __name__ == "__main__":
    sys.exit(main())
