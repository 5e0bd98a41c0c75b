"""Write small NWB files with the structure of the NLB'21 DANDI files, spikes from a known latent system.

The files follow what ``nlb_tools.nwb_interface.NWBDataset`` reads: a units table with
``spike_times``, ``obs_intervals`` and a boolean ``heldout`` column; a trials table with
``start_time``, ``stop_time``, ``split`` and each dataset's alignment/condition fields; behaviour as
1 kHz TimeSeries in a ``behavior`` processing module. Layout as ``dandi download`` writes it:
``{root}/{dandiset}/sub-Synth/sub-Synth_desc-train_behavior+ecephys.nwb`` and ``..._desc-test_ecephys.nwb``.

Latent system: a 2-D rotation (4 Hz) switched on around movement onset (maze-like tasks; phase set by
the condition) or a ramp between set and go whose speed scales with 1/tp (dmfc_rsg-like); log firing
rates are a fixed linear readout of it; hand velocity is another linear readout.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import numpy as np
from pynwb import NWBHDF5IO, NWBFile, TimeSeries

DANDISETS = {"mc_maze": "000128", "mc_rtt": "000129", "area2_bump": "000127", "dmfc_rsg": "000130",
             "mc_maze_large": "000138", "mc_maze_medium": "000139", "mc_maze_small": "000140"}
BEHAVIOR = {"mc_rtt": "finger_vel", "dmfc_rsg": None}  # others: hand_vel


def _maze_trials(splits: List[str], rng) -> List[Dict]:
    trials, t0 = [], 0.5
    for i, split in enumerate(splits):
        cond = i % 4
        trials.append(dict(start_time=t0, stop_time=t0 + 1.0, move_onset_time=t0 + 0.4, split=split,
                           trial_type=cond, trial_version=cond % 2, cond_dir=float(90 * cond),
                           ctr_hold_bump=bool(cond % 2), cond=cond))
        t0 += 1.0 + rng.uniform(0.0, 0.05)
    return trials


def _dmfc_trials(splits: List[str], rng) -> List[Dict]:
    trials, t0 = [], 1.0
    for i, split in enumerate(splits):
        cond = i % 4  # (theta, is_short) combinations, round robin so each has several trials
        is_short = cond % 2
        ts = float([[800.0, 1000.0], [500.0, 640.0]][is_short][(i // 4) % 2])
        tp = float(np.round(ts * rng.uniform(0.9, 1.2)))
        ready = t0 + 0.5
        set_t = ready + ts / 1000
        go = set_t + tp / 1000
        trials.append(dict(start_time=t0, stop_time=go + 0.8, ready_time=ready, set_time=set_t,
                           go_time=go, split=split, is_eye=1.0, theta=float(180 * (cond // 2)),
                           is_short=float(is_short), ts=ts, tp=tp, is_outlier=0.0, cond=cond))
        t0 = go + 0.8 + rng.uniform(0.0, 0.05)
    return trials


def _latent(kind: str, trials: List[Dict], n_ms: int) -> np.ndarray:
    t = np.arange(n_ms) / 1000.0
    z = np.zeros((n_ms, 2))
    for tr in trials:
        sl = slice(int(tr["start_time"] * 1000), int(tr["stop_time"] * 1000))
        tt = t[sl]
        if kind == "dmfc_rsg":
            prog = np.clip((tt - tr["set_time"]) / (tr["tp"] / 1000), 0, 1.2)
            sign = 1.0 if tr["theta"] == 0 else -1.0
            z[sl, 0] = 2 * prog - 1
            z[sl, 1] = sign * np.sin(np.pi * prog)
        else:
            rel = tt - tr["move_onset_time"]
            env = 1 / (1 + np.exp(-(rel + 0.1) / 0.03))
            phase = 2 * np.pi * 4.0 * rel + tr["cond"] * np.pi / 2
            z[sl, 0] = env * np.cos(phase)
            z[sl, 1] = env * np.sin(phase)
    return z


def write_nlb_nwb(path: Path, kind: str, splits: List[str], n_heldin: int, n_heldout: int,
                  seed: int = 0, with_behavior: bool = True, trials_seed: int = 0) -> Dict:
    """Write one NWB file; returns the ground truth (latent, rates in Hz at 1 ms, trials)."""
    rng = np.random.default_rng(seed)
    trials = (_dmfc_trials if kind == "dmfc_rsg" else _maze_trials)(
        splits, np.random.default_rng(trials_seed))
    end = float(np.ceil(trials[-1]["stop_time"] + 0.6))  # whole seconds: exact even in float32
    n_ms = int(end) * 1000
    z = _latent(kind, trials, n_ms)
    n_units = n_heldin + n_heldout
    readout = np.random.default_rng(1234).normal(0, 0.9, (2, n_heldin + max(n_heldout, 1)))[:, :n_units]
    bias = np.log(np.random.default_rng(99).uniform(10, 40, n_units + 1)[:n_units])
    rates = np.exp(bias + z @ readout)  # Hz
    spikes = rng.random((n_ms, n_units)) < rates / 1000.0

    nwb = NWBFile(session_description=f"synthetic {kind}-like NLB file", identifier=str(uuid.uuid4()),
                  session_start_time=datetime(2021, 1, 1, tzinfo=timezone.utc))
    fields = [k for k in trials[0] if k not in ("start_time", "stop_time", "cond")]
    for name in fields:
        nwb.add_trial_column(name=name, description=f"synthetic {name}")
    for tr in trials:
        nwb.add_trial(**{k: v for k, v in tr.items() if k != "cond"})
    nwb.add_unit_column(name="heldout", description="held-out unit (NLB)")
    for u in range(n_units):
        times = (np.nonzero(spikes[:, u])[0] + 0.5) / 1000.0
        nwb.add_unit(spike_times=times, obs_intervals=[[0.0, end]], heldout=u >= n_heldin)
    beh_name = BEHAVIOR.get(kind, "hand_vel")
    if with_behavior and beh_name is not None:
        lag = 100
        vel = np.zeros((n_ms, 2))
        vel[lag:] = 150.0 * z[:-lag] @ np.array([[1.0, 0.3], [-0.2, 1.0]])
        module = nwb.create_processing_module(name="behavior", description="behaviour")
        module.add(TimeSeries(name=beh_name, data=vel, unit="mm/s", rate=1000.0, starting_time=0.0,
                              description="velocity"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return {"latent": z, "rates_hz": rates, "trials": trials}


def make_dandi_dataset(root: Path, kind: str, dataset: str = None, n_train: int = 32, n_val: int = 12,
                       n_test: int = 8, n_heldin: int = 14, n_heldout: int = 5, seed: int = 0) -> Path:
    """Write the train and test NWB files of a synthetic ``dataset`` under ``root`` (DANDI layout).

    ``kind`` picks the trial structure ('mc_maze', 'area2_bump', 'mc_rtt' or 'dmfc_rsg');
    ``dataset`` (default ``kind``) picks the dandiset folder. Returns ``root``.
    """
    dataset = dataset or kind
    sub = Path(root) / DANDISETS[dataset] / "sub-Synth"
    splits = ["train"] * n_train + ["val"] * n_val
    order = np.random.default_rng(seed + 7).permutation(len(splits))
    splits = [splits[i] for i in order]
    write_nlb_nwb(sub / "sub-Synth_desc-train_behavior+ecephys.nwb", kind, splits, n_heldin,
                  n_heldout, seed=seed)
    write_nlb_nwb(sub / "sub-Synth_desc-test_ecephys.nwb", kind, ["test"] * n_test, n_heldin, 0,
                  seed=seed + 1, with_behavior=False, trials_seed=5)
    return Path(root)


# ----- a lab recording (not NLB): unequal trials, an event, conditions, unit quality -----
def write_recording_nwb(path: Path, n_trials: int = 60, n_units: int = 24, n_mua: int = 4, seed: int = 0, *,
                        with_trials: bool = True, with_spike_times: bool = True, spike_outside: bool = False,
                        one_condition: bool = False, with_behavior: bool = True) -> Dict:
    """Write a small lab-style NWB file with known rates; return the truth.

    Trials last 0.6-0.9 s (unequal), with ``go_cue_time`` 0.2-0.3 s after their start and a
    ``reach_dir`` condition (0, 90, 180, 270; all 0 with ``one_condition``). After the cue a 2-D
    latent rotates at 3 Hz with a phase set by the direction; log rates of ``n_units`` units are a
    fixed linear readout of it (5-30 Hz). The last ``n_mua`` units have ``quality`` 'mua' (the others
    'good') and fire at a flat 2 Hz. ``hand_vel`` (1 kHz, 2 channels) is another readout, in a
    ``behavior`` processing module. Variants for bad input: no trials table, a units table without
    ``spike_times``, one spike time outside the units' ``obs_intervals``.

    Returns ``{"rates_hz": (ms, unit), "trials": [dict], "end_s": float}``.
    """
    rng = np.random.default_rng(seed)
    trials, t0 = [], 0.5
    for i in range(n_trials):
        length = 0.6 + 0.3 * rng.random()
        cond = 0 if one_condition else int(90 * (i % 4))
        trials.append(dict(start_time=round(t0, 3), stop_time=round(t0 + length, 3),
                           go_cue_time=round(t0 + 0.2 + 0.1 * rng.random(), 3), reach_dir=cond))
        t0 += length + 0.2
    end = float(np.ceil(t0 + 0.5))
    n_ms = int(end * 1000)
    t = np.arange(n_ms) / 1000.0
    z = np.zeros((n_ms, 2))
    for tr in trials:
        sl = slice(int(round(tr["start_time"] * 1000)), int(round(tr["stop_time"] * 1000)))
        rel = t[sl] - tr["go_cue_time"]
        env = 1 / (1 + np.exp(-rel / 0.03))
        phase = 2 * np.pi * 3.0 * rel + np.deg2rad(tr["reach_dir"])
        z[sl, 0], z[sl, 1] = env * np.cos(phase), env * np.sin(phase)
    good = n_units - n_mua
    readout = np.random.default_rng(4321).normal(0, 0.8, (2, good))
    bias = np.log(np.random.default_rng(77).uniform(5, 15, good))
    rates = np.concatenate([np.exp(bias + z @ readout), np.full((n_ms, n_mua), 2.0)], axis=1)  # Hz
    spikes = rng.random((n_ms, n_units)) < rates / 1000.0

    nwb = NWBFile(session_description="synthetic lab recording", identifier=str(uuid.uuid4()),
                  session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc))
    if with_trials:
        nwb.add_trial_column(name="go_cue_time", description="go cue (s)")
        nwb.add_trial_column(name="reach_dir", description="reach direction (deg)")
        for tr in trials:
            nwb.add_trial(**tr)
    nwb.add_unit_column(name="quality", description="sorting quality")
    for u in range(n_units):
        quality = "good" if u < good else "mua"
        if not with_spike_times:
            nwb.add_unit(quality=quality)
            continue
        times = (np.nonzero(spikes[:, u])[0] + 0.5) / 1000.0
        if spike_outside and u == 1:
            times = np.append(times, end + 3.0)
        nwb.add_unit(spike_times=times, obs_intervals=[[0.0, end]], quality=quality)
    if with_behavior:
        vel = np.zeros((n_ms, 2))
        vel[80:] = 100.0 * z[:-80] @ np.array([[1.0, 0.4], [-0.3, 1.0]])
        module = nwb.create_processing_module(name="behavior", description="behaviour")
        module.add(TimeSeries(name="hand_vel", data=vel, unit="mm/s", rate=1000.0, starting_time=0.0,
                              description="hand velocity"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return {"rates_hz": rates, "trials": trials, "end_s": end}
