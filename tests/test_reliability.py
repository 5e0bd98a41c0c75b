"""Issue 4: a long fit never dies silently, never returns NaN rates, never loses work.

Tiny models (latent 4, 8 training trials, 12 bins) so the whole module runs in well under a minute.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pyro
import pytest
import torch

from pyro_langevin import Batch, BatchError
from pyro_langevin.checkpoints import CheckpointMismatchError, load_checkpoint, restore_checkpoint, save_checkpoint
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.posterior import posterior_means
from pyro_langevin.training import FitConfig, TrainingDivergedError, fit

DECODER = dict(d_model=8, n_heads=2, dim_feedforward=16)


@pytest.fixture(scope="module")
def data():
    return make_lorenz(n_conditions=2, trials_per_condition=5, n_bins=12, n_neurons=6, n_heldout=2, valid_fraction=0.2)


def build(n_neurons=6, latent=4, n_heldin=4, seed=0):
    torch.manual_seed(seed)
    model = LangevinFlow(n_neurons, latent, potential="quadratic", decoder_kwargs=DECODER)
    return model, GRUGuide(model, n_heldin, hidden=8)


def config(epochs, **kw):
    kw.setdefault("batch_size", 4)
    return FitConfig(epochs=epochs, cd_keep=0.7, kl_ramp=4 / epochs, weight_decay_ramp=4 / epochs, **kw)  # 4-epoch ramps


def states_equal(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# ----- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_valid, val_every", [(False, 1), (True, 2)])
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(data, tmp_path, with_valid, val_every):
    valid = data.valid if with_valid else None
    m1, g1 = build()
    straight = fit(m1, g1, data.train, valid, config(6, val_every=val_every), progress=False,
                   checkpoint_dir=tmp_path / "a")
    m2, g2 = build()
    fit(m2, g2, data.train, valid, config(3, val_every=val_every), progress=False, checkpoint_dir=tmp_path / "b")
    m3, g3 = build(seed=123)  # other initial values: everything must come from the checkpoint
    resumed = fit(m3, g3, data.train, valid, config(6, val_every=val_every), progress=False,
                  checkpoint_dir=tmp_path / "b", resume=tmp_path / "b" / "last.pt")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["epoch"] == b["epoch"] == 5
    # the training trajectory is bit-identical: parameters, Adam moments, RNG streams
    assert states_equal(a["model"], b["model"]) and states_equal(a["guide"], b["guide"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert states_equal(sa, sb)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    if not with_valid:  # without validation the returned state is the last one
        assert states_equal(m1.state_dict(), m3.state_dict()) and states_equal(g1.state_dict(), g3.state_dict())
    else:  # the 3-epoch run validated epoch 2 as its last: selection only, no effect on training
        assert "val_loss" in resumed.history[2] and "val_loss" not in straight.history[2]
        assert [r.get("val_loss") for r in straight.history[3:]] == [r.get("val_loss") for r in resumed.history[3:]]


def test_checkpoint_holds_everything_to_rebuild(data, tmp_path):
    model, guide = build()
    meta = {"model": {"n_neurons": 6, "latent_dim": 4}, "dataset": "lorenz"}
    fit(model, guide, data.train, None, config(2, checkpoint_every=5), progress=False, checkpoint_dir=tmp_path, meta=meta)
    ckpt = load_checkpoint(tmp_path / "last.pt")  # written after the last epoch although every=5
    assert ckpt["epoch"] == 1 and ckpt["meta"] == meta and ckpt["config"]["epochs"] == 2
    assert ckpt["sizes"]["model"] == {"n_neurons": 6, "latent_dim": 4}
    assert ckpt["sizes"]["guide"] == {"n_heldin": 4, "hidden": 8}
    for key in ("model", "guide", "optimizer", "scheduler", "rng", "shuffle_rng", "history"):
        assert key in ckpt
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_callback_sees_every_epoch_and_a_run_it_stops_resumes_exactly(data, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_epoch_2(epoch, record):
        seen.append((epoch, record))
        if epoch == 2:
            raise Stop

    seen = []
    m1, g1 = build()
    straight = fit(m1, g1, data.train, data.valid, config(5, val_every=2), progress=False,
                   callback=lambda epoch, record: seen.append((epoch, record)))
    assert seen == list(enumerate(straight.history))
    seen = []
    m2, g2 = build()
    with pytest.raises(Stop):
        fit(m2, g2, data.train, data.valid, config(5, val_every=2), progress=False, checkpoint_dir=tmp_path,
            callback=stop_after_epoch_2)
    assert [e for e, _ in seen] == [0, 1, 2] and "val_loss" in seen[1][1]
    m3, g3 = build(seed=7)
    resumed = fit(m3, g3, data.train, data.valid, config(5, val_every=2), progress=False,
                  resume=tmp_path / "last.pt")
    assert resumed.history == straight.history and states_equal(m1.state_dict(), m3.state_dict())


def test_a_run_that_stopped_early_resumes_to_the_same_end_unless_its_patience_grows(data, tmp_path):
    def worse_each_time(model, guide, valid):  # the first validation stays the best
        calls.append(1)
        return {"co_bps": -float(len(calls))}

    def run(patience, resume=None, seed=0):
        m, g = build(seed=seed)
        cfg = config(20, val_every=1, patience=patience, select_on="co_bps", select_mode="max")
        return fit(m, g, data.train, data.valid, cfg, metric_fn=worse_each_time, progress=False,
                   checkpoint_dir=tmp_path, resume=resume), m

    calls = []
    first, _ = run(patience=2)
    assert first.stopped_early and len(first.history) == 3 and first.best_epoch == 0
    saved = load_checkpoint(tmp_path / "last.pt")
    again, m = run(patience=2, resume=tmp_path / "last.pt", seed=5)
    assert again.stopped_early and again.history == first.history and again.best_epoch == 0
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == saved["epoch"] == 2  # nothing trained or rewritten
    assert states_equal(m.state_dict(), load_checkpoint(tmp_path / "best.pt")["model"])  # the best state, not seed 5's
    longer, _ = run(patience=4, resume=tmp_path / "last.pt", seed=5)
    assert longer.stopped_early and len(longer.history) == 5 and longer.history[:3] == first.history


def test_ramps_are_fractions_of_the_epochs_and_old_checkpoints_compare_in_epochs(data, tmp_path):
    assert FitConfig().kl_weight(48) < 1 == FitConfig().kl_weight(49)  # default: 50 of 300 epochs
    for epochs in (1, 3, 4, 15, 101):  # a quarter: the NLB and example schedules, max(1, epochs // 4)
        cfg = FitConfig(epochs=epochs, kl_ramp=0.25, weight_decay_ramp=0.25)
        n = max(1, epochs // 4)
        assert [cfg.kl_weight(e) for e in range(epochs)] == [min(1.0, (e + 1) / n) for e in range(epochs)]
    with pytest.raises(ValueError, match="kl_ramp"):
        FitConfig(kl_ramp=-0.1)
    model, guide = build()
    fit(model, guide, data.train, None, config(2), progress=False, checkpoint_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    for key in ("kl_ramp", "weight_decay_ramp"):  # as written before the ramps were fractions
        del ckpt["config"][key]
    ckpt["config"].update(kl_ramp_epochs=7, weight_decay_ramp_epochs=4)
    save_checkpoint(tmp_path / "old.pt", ckpt)
    with pytest.warns(UserWarning, match=r"resuming with a different config: kl_ramp_epochs: 7 -> 4$"):
        fit(model, guide, data.train, None, config(3), progress=False, resume=tmp_path / "old.pt")


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint survives intact
    assert os.listdir(tmp_path) == ["last.pt"]  # and no temp file is left behind


@pytest.mark.parametrize("n_neurons, latent, words", [
    (7, 4, "n_neurons=6 in the checkpoint vs n_neurons=7 here"),
    (6, 5, "latent_dim=4 in the checkpoint vs latent_dim=5 here"),
])
def test_incompatible_checkpoint_names_both_sizes(data, tmp_path, n_neurons, latent, words):
    model, guide = build()
    fit(model, guide, data.train, None, config(1), progress=False, checkpoint_dir=tmp_path)
    other, other_guide = build(n_neurons=n_neurons, latent=latent)
    with pytest.raises(CheckpointMismatchError, match=words) as err:
        restore_checkpoint(tmp_path / "last.pt", other, other_guide)
    assert "has shape" in str(err.value) and "in the checkpoint but" in str(err.value)
    if n_neurons == 6:  # same data: fit(resume=...) itself refuses before touching anything
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(CheckpointMismatchError, match=words):
            fit(other, other_guide, data.train, None, config(2), progress=False, resume=tmp_path / "last.pt")
        assert states_equal(before, other.state_dict())


# ----- numerical faults -----------------------------------------------------------------------------
class FaultyModel(torch.nn.Module):
    """Delegates to a LangevinFlow; on chosen training calls its log joint becomes NaN (or +inf)."""

    def __init__(self, inner, bad_call, value=float("nan")):
        super().__init__()
        self.inner = inner
        self.n_neurons = inner.n_neurons
        self.bad_call = bad_call  # a predicate on the 1-based training call number
        self.value = value
        self.calls = 0

    def forward(self, batch):
        out = self.inner(batch)
        if self.training:
            self.calls += 1
            if self.bad_call(self.calls):
                with pyro.validation_enabled(False):  # else Unit(log_factor=nan) raises at once
                    pyro.factor("fault", batch.target.new_tensor(self.value))
        return out


def test_nan_loss_is_recovered_from(data):
    inner, guide = build()
    model = FaultyModel(inner, lambda c: c == 3)  # 2 steps per epoch: epoch 1, step 0
    with pytest.warns(RuntimeWarning, match=r"non-finite value in the loss \(nan\) at epoch 1, step 0.*0.003 -> 0.0015"):
        result = fit(model, guide, data.train, data.valid, config(3, val_every=1), progress=False)
    assert [(f["epoch"], f["step"], f["lr_after"]) for f in result.faults] == [(1, 0, 0.0015)]
    assert [r["epoch"] for r in result.history] == [0, 1, 2]  # the epoch was redone, not skipped
    assert [r["lr"] for r in result.history] == [0.003, 0.0015, 0.0015]
    assert all(torch.isfinite(p).all() for p in [*inner.parameters(), *guide.parameters()])
    rates = posterior_means(inner, guide, data.valid, n_samples=2)["rates"]
    assert torch.isfinite(rates).all()


def test_nan_gradient_is_recovered_from_and_named(data):
    model, guide = build()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    guide.force_head.net.bias.register_hook(poison)
    with pytest.warns(RuntimeWarning, match="the gradient .*first non-finite in guide.force_head.net.bias.*epoch 0, step 1"):
        result = fit(model, guide, data.train, None, config(2), progress=False)
    assert len(result.faults) == 1 and "gradient" in result.faults[0]["what"]
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *guide.parameters()])


def test_persistent_faults_stop_with_a_clear_error_and_keep_the_last_good_state(data, tmp_path):
    inner, guide = build()
    # 2 steps per epoch: calls 1-4 are epochs 0-1; from epoch 2 on, every step 1 fails (step 0
    # updates the parameters and Adam moments first, so a restore must not reuse them)
    model = FaultyModel(inner, lambda c: c >= 6 and c % 2 == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(TrainingDivergedError) as err:
            fit(model, guide, data.train, None, config(6, max_retries=2), progress=False, checkpoint_dir=tmp_path / "a")
    e = err.value
    msg = str(e)
    assert "non-finite value in the loss (nan) at epoch 2, step 1, after 2 recoveries" in msg, msg
    assert "from the state at the start of epoch 2" in msg
    assert "learning rate now 0.00075, started at 0.003" in msg and "last.pt" in msg
    assert (e.epoch, e.step, len(e.faults)) == (2, 1, 3)
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    assert ckpt["epoch"] == 1 and states_equal(ckpt["model"], model.state_dict())  # left in the modules too
    assert states_equal(ckpt["guide"], guide.state_dict())
    # the saved state is exactly that of a clean 2-epoch run: no work lost, nothing corrupted
    clean_inner, clean_guide = build()
    fit(FaultyModel(clean_inner, lambda c: False), clean_guide, data.train, None, config(2), progress=False,
        checkpoint_dir=tmp_path / "b")
    clean = load_checkpoint(tmp_path / "b" / "last.pt")
    assert states_equal(ckpt["model"], clean["model"]) and states_equal(ckpt["guide"], clean["guide"])
    for sa, sb in zip(ckpt["optimizer"]["state"].values(), clean["optimizer"]["state"].values()):
        assert states_equal(sa, sb)


def test_nan_parameter_after_the_last_step_of_an_epoch_is_caught(data, monkeypatch):
    model, guide = build()
    real_step, calls = torch.optim.Adam.step, {"n": 0}

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # the last step of epoch 0 (2 steps per epoch) leaves a NaN weight
            with torch.no_grad():
                guide.force_head.net.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.warns(RuntimeWarning, match="parameter guide.force_head.net.weight after the optimizer step at epoch 0, end-of-epoch"):
        result = fit(model, guide, data.train, None, config(2), progress=False)
    assert [(f["epoch"], f["step"]) for f in result.faults] == [(0, -1)]
    assert torch.isfinite(guide.force_head.net.weight).all()


def test_max_retries_zero_raises_at_the_first_fault(data):
    inner, guide = build()
    model = FaultyModel(inner, lambda c: c == 1)
    with pytest.raises(TrainingDivergedError, match="at epoch 0, step 0, after 0 recoveries"):
        fit(model, guide, data.train, None, config(2, max_retries=0), progress=False)


@pytest.mark.parametrize("validate_args, message", [
    (False, r"non-finite value in the loss \(nan\) at epoch 0, step 0"),
    (True, r"a distribution parameter \(Expected parameter loc"),  # Pyro's checks raise ValueError
])
def test_nan_parameters_surface_as_a_fault_not_as_nan_rates(data, validate_args, message):
    """NaN weights are caught as a fault (as a NaN loss, or as Pyro's argument-validation error),
    and posterior_means refuses to return NaN rates."""
    model, guide = build()
    with torch.no_grad():
        guide.initial_head.net.weight.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match=message):
        fit(model, guide, data.train, None, config(1, max_retries=1, validate_args=validate_args), progress=False)
    with pytest.raises(FloatingPointError, match="posterior draw 0 of site 'rates' has NaN"):
        with pyro.validation_enabled(False):
            posterior_means(model, guide, data.valid, n_samples=2)


# ----- signals --------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import signal, sys, torch
    # a shell's background job starts with SIGINT ignored; a user's terminal delivers it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_reliability import build, config
    from pyro_langevin.data.lorenz import make_lorenz
    from pyro_langevin.training import fit
    d = make_lorenz(n_conditions=2, trials_per_condition=5, n_bins=12, n_neurons=6, n_heldout=2, valid_fraction=0.2)
    m, g = build()
    fit(m, g, d.train, None, config(10000, batch_size=1), progress=False, checkpoint_dir=sys.argv[1])
""")


# an uncaught KeyboardInterrupt ends Python by SIGINT itself (rc -2); SystemExit(128 + 15) for SIGTERM
@pytest.mark.parametrize("sig, rc, raised", [(signal.SIGINT, -2, "KeyboardInterrupt"), (signal.SIGTERM, 128 + 15, None)])
def test_signal_during_fit_writes_a_checkpoint_then_exits(data, tmp_path, sig, rc, raised):
    code = CHILD.format(tests=os.path.dirname(__file__))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "last.pt").exists():  # wait until it is training (epoch 0 done)
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    assert f"fit interrupted by {sig.name} at epoch" in err and "resume=" in err, err
    if raised:
        assert raised in err
    assert "_Interrupted" not in err  # no internal exception in the user's traceback
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["interrupted"] is True and 0 <= ckpt["epoch"] < 9999
    assert len(ckpt["history"]) == ckpt["epoch"] + 1
    # and it resumes
    model, guide = build(seed=5)
    result = fit(model, guide, data.train, None, config(ckpt["epoch"] + 2, batch_size=1), progress=False,
                 resume=tmp_path / "last.pt")
    assert len(result.history) == ckpt["epoch"] + 2


class SignalAt(FaultyModel):
    """Sends this process a signal on one training call (mid-epoch), like a user's Ctrl-C."""

    def forward(self, batch):
        out = self.inner(batch)
        if self.training:
            self.calls += 1
            if self.bad_call(self.calls):
                os.kill(os.getpid(), signal.SIGINT)
        return out


def test_mid_epoch_ctrl_c_resumes_exactly(data, tmp_path):
    # as in a terminal (a background job, e.g. under CI, may start with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    inner, guide = build()
    fit(SignalAt(inner, lambda c: False), guide, data.train, None, config(4), progress=False, checkpoint_dir=tmp_path / "a")
    inner, guide = build()
    with pytest.raises(KeyboardInterrupt, match="fit interrupted by SIGINT at epoch 2 step 1; state at the start of epoch 2"):
        fit(SignalAt(inner, lambda c: c == 5), guide, data.train, None, config(4), progress=False, checkpoint_dir=tmp_path / "b")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["interrupted"] and ckpt["epoch"] == 1
    inner, guide = build(seed=9)
    fit(SignalAt(inner, lambda c: False), guide, data.train, None, config(4), progress=False,
        checkpoint_dir=tmp_path / "b", resume=tmp_path / "b" / "last.pt")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert states_equal(a["model"], b["model"]) and states_equal(a["guide"], b["guide"])


# ----- input validation at fit and posterior_means ---------------------------------------------------
def test_fit_rejects_disagreeing_data_and_model(data):
    model, guide = build()
    other = make_lorenz(n_conditions=2, trials_per_condition=2, n_bins=12, n_neurons=7, n_heldout=3)
    cfg = config(1)
    with pytest.raises(BatchError, match=r"^valid: 7 neurons \(held-in \+ held-out\) but train has 6"):
        fit(model, guide, data.train, other.valid, cfg, progress=False)
    heldin5 = make_lorenz(n_conditions=2, trials_per_condition=2, n_bins=12, n_neurons=6, n_heldout=1)
    with pytest.raises(BatchError, match="^valid: 5 held-in neurons but train has 4"):
        fit(model, guide, data.train, heldin5.valid, cfg, progress=False)
    with pytest.raises(BatchError, match="^train: 7 neurons .* but the model was built for n_neurons=6"):
        fit(model, guide, other.train, None, cfg, progress=False)
    with pytest.raises(BatchError, match="^train: 5 held-in neurons but the guide reads n_heldin=4"):
        fit(model, guide, heldin5.train, None, cfg, progress=False)
    t = data.train
    bad = Batch(t.input.clone(), t.target, t.mask, t.index)
    bad.input[0, 0, 0] = -2
    with pytest.raises(BatchError, match=r"^train.input: contains negative counts \(first -2.0 at index \[0, 0, 0\]\)"):
        fit(model, guide, bad, None, cfg, progress=False)
    with pytest.raises(BatchError, match="^valid.mask: no entry is scored"):
        fit(model, guide, t, Batch(t.input, t.target, torch.zeros_like(t.mask), t.index), cfg, progress=False)
    with pytest.raises(TypeError, match="^train: expected a Batch"):
        fit(model, guide, t.input, None, cfg, progress=False)
    with pytest.raises(ValueError, match="FitConfig: invalid value for max_retries"):
        FitConfig(max_retries=-1)


def test_posterior_means_checks_its_inputs(data):
    model, guide = build()
    other = make_lorenz(n_conditions=2, trials_per_condition=2, n_bins=12, n_neurons=7, n_heldout=3)
    with pytest.raises(BatchError, match="^batch: 7 neurons .* model was built for n_neurons=6"):
        posterior_means(model, guide, other.valid)
    with pytest.raises(ValueError, match="n_samples must be an int >= 1, got 0"):
        posterior_means(model, guide, data.valid, n_samples=0)
    with pytest.raises(KeyError, match="site 'rate' is not in the model"):
        posterior_means(model, guide, data.valid, sites=("rate",), n_samples=1)


def test_posterior_means_and_std_stream_exactly(data):
    """Streamed (running mean, Welford std, trial chunks) equals stacking every draw."""
    from pyro import poutine

    model, guide = build()
    batch = data.train
    torch.manual_seed(3)
    out = posterior_means(model, guide, batch, sites=("rates", "z"), n_samples=5, batch_size=3, return_std=True)
    torch.manual_seed(3)
    draws = {"rates": [], "z": []}
    model.eval(), guide.eval()
    with torch.no_grad():
        for start in range(0, len(batch), 3):
            chunk = batch[start : start + 3]
            per = {"rates": [], "z": []}
            for _ in range(5):
                tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(chunk))).get_trace(chunk)
                for s in per:
                    per[s].append(tr.nodes[s]["value"])
            for s in per:
                draws[s].append(torch.stack(per[s]))
    for s in ("rates", "z"):
        stacked = torch.cat(draws[s], dim=1)  # (S, trial, time, ...)
        assert torch.allclose(out[s], stacked.mean(0), atol=1e-5, rtol=1e-5)
        assert torch.allclose(out[f"{s}_std"], stacked.std(0, unbiased=False), atol=1e-5, rtol=1e-4)
    assert out["rates"].shape == (len(batch), 12, 6)
