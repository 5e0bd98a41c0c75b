"""Issue 11, a user's first hour: no lost results, one-line errors, interrupts, quiet logs, figures."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_langevin.cli import main as cli_main
from pyro_langevin.nlb.cli import nlb_main
from pyro_langevin.nlb.config import default_config
from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.h5 import read_h5
from pyro_langevin.checkpoints import save_checkpoint
from pyro_langevin.data.lorenz import make_lorenz
from pyro_langevin.nlb.data import nlbdata_from_dicts
from pyro_langevin.guides import GRUGuide
from pyro_langevin.models import LangevinFlow
from pyro_langevin.options import OptionError, check_out, check_resume, parse_overrides
from pyro_langevin.progress import progress_bar
from pyro_langevin.training import FitConfig, fit

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# a shell's background job (e.g. CI) starts with SIGINT ignored; a user's terminal delivers it
AS_IN_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_script(script: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def assert_one_line(proc_or_code, err: str | None = None, *, status: int = 2, words: str = "") -> str:
    code = proc_or_code.returncode if err is None else proc_or_code
    err = proc_or_code.stderr if err is None else err
    lines = err.strip().splitlines()
    assert code == status, err[-2000:]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert words in lines[0], lines[0]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def earlier_run(folder: Path) -> dict[str, str]:
    """A folder that looks like a finished run (checkpoint, metrics, submission)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    (folder / "metrics.json").write_text('{"co-bps": 0.25}')
    (folder / "submission.h5").write_bytes(os.urandom(64))
    return digest(folder)


# ----- results never lost -------------------------------------------------------------------------
def test_an_out_holding_a_run_is_refused_and_left_byte_identical(tmp_path):
    before = earlier_run(tmp_path / "run")
    proc = run_script("lorenz.py", "--quick", "--out", tmp_path / "run")
    line = assert_one_line(proc, words="holds an earlier run")
    assert "--resume" in line and "--overwrite" in line
    assert digest(tmp_path / "run") == before


@pytest.mark.parametrize("script", ["nlb", "ppc.py", "ablate_guides.py"])
def test_every_entry_point_refuses_an_earlier_run(tmp_path, capsys, script):
    before = earlier_run(tmp_path / "run")
    if script == "nlb":
        code = nlb_main(["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--quick", "--out", str(tmp_path / "run")])
        captured = capsys.readouterr()
        assert_one_line(code, captured.err, words="holds an earlier run")
    else:
        assert_one_line(run_script(script, "--quick", "--out", tmp_path / "run"), words="holds an earlier run")
    assert digest(tmp_path / "run") == before


def test_check_out_rules(tmp_path):
    assert check_out(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    earlier_run(tmp_path / "run")
    for flag in ("resume", "overwrite"):
        assert check_out(tmp_path / "run", **{flag: True}) == tmp_path / "run"
    with pytest.raises(OptionError, match="exclude each other"):
        check_out(tmp_path / "x", resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OptionError, match="cannot be created"):
        check_out(tmp_path / "file" / "out")
    with pytest.raises(OptionError, match="is a file"):
        check_out(tmp_path / "file")


def test_quick_runs_default_to_their_own_folder(tmp_path):
    # lorenz --quick --out omitted: runs/lorenz-quick under the working directory
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "lorenz.py"), "--quick", "--epochs", "1",
                           "--no-progress"], capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "lorenz-quick" / "metrics.json").is_file()
    assert not (tmp_path / "runs" / "lorenz").exists()


# ----- one-line errors, exit status 2 --------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--set", "model.latent_dim=abc"], "expected an integer"),
    (["--set", "fit.epochs=0"], "epochs"),
    (["--set", "eval.export_draws=0"], "eval.export_draws=0"),
    (["--set", "model.dt=NaN"], "finite number"),
    (["--set", "model.d_model=15"], "invalid model setting"),
    (["--set", "nope=1"], "unknown NLBConfig key"),
    (["--set", "latent_dim=8"], "did you mean 'model.latent_dim'"),
    (["--device", "tpu"], "'tpu'"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "-2"], "--threads"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_nlb_bad_options_are_one_line_before_any_data(tmp_path, capsys, args, words):
    out = tmp_path / "out"
    code = nlb_main(["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--quick", "--out", str(out), *args])
    captured = capsys.readouterr()
    assert_one_line(code, captured.err, words=words)
    assert captured.out == "" and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_a_value_error_in_fit(tmp_path):
    assert_one_line(run_script("lorenz.py", "--quick", "--device", "cuda", "--out", tmp_path / "o"),
                    words="no CUDA GPU")
    data = make_lorenz(n_conditions=2, trials_per_condition=3, n_bins=8, n_neurons=5, n_heldout=1)
    model = LangevinFlow(data.train.n_neurons, latent_dim=4, dt=0.1)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        fit(model, GRUGuide(model, data.train.n_heldin, hidden=4), data.train, None, FitConfig(epochs=1),
            device="cuda", progress=False)


@pytest.mark.parametrize("script, args, words", [
    ("lorenz.py", ["--epochs", "0"], "--epochs"),
    ("lorenz.py", ["--epochs", "-1"], "--epochs"),
    ("ppc.py", ["--samples", "0"], "--samples"),
    ("ablate_guides.py", ["--only", "gru,nope"], "--only"),
])
def test_examples_refuse_values_they_used_to_replace(tmp_path, script, args, words):
    assert_one_line(run_script(script, "--quick", "--out", tmp_path / "o", *args), words=words)
    assert not (tmp_path / "o").exists()


def test_overrides_are_typed_by_the_config():
    cfg = default_config("mc_maze_small", 5, quick=True)
    got = parse_overrides(["model.latent_dim=8", "fit.kl_final=1", "model.learn_gamma=true", "guide.name=bigru",
                           'model.potential_kwargs={"quartic": 0.1}'], cfg)
    assert got == {"model.latent_dim": 8, "fit.kl_final": 1.0, "model.learn_gamma": True, "guide.name": "bigru",
                   "model.potential_kwargs": {"quartic": 0.1}}
    assert cfg.override(got).model.potential_kwargs == {"quartic": 0.1}
    for bad in ("model.latent_dim=3.5", "model.latent_dim=true", "fit.lr=abc", "model.learn_gamma=1",
                "model.potential_kwargs=3", "noequals", "latent_dim=8"):
        with pytest.raises(OptionError):
            parse_overrides([bad], cfg)


def test_resume_checks_the_checkpoint_before_training(tmp_path, capsys):
    last = tmp_path / "last.pt"
    assert check_resume(last) is None  # nothing to resume: start afresh
    last.write_bytes(b"garbage")
    with pytest.raises(OptionError, match="unreadable"):
        check_resume(last)
    save_checkpoint(last, {"model": {}, "epoch": 3, "meta": {"seed": 0, "config": {"latent_dim": 32, "epochs": 5}}})
    assert check_resume(last, {"seed": 0, "config": {"latent_dim": 32, "epochs": 9}}) == last  # more epochs: fine
    with pytest.raises(OptionError, match="latent_dim=32 there, 4 here"):
        check_resume(last, {"seed": 0, "config": {"latent_dim": 4}})
    # through the command line: a corrupt last.pt in --out
    out = tmp_path / "run"
    earlier_run(out)
    code = nlb_main(["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--quick", "--out", str(out), "--resume"])
    assert_one_line(code, capsys.readouterr().err, words="--resume")


def test_missing_nlb_tools_is_found_at_start_with_the_install_line(tmp_path):
    code = ("import sys; sys.modules['nlb_tools'] = None; from pyro_langevin.cli import main; "
            f"sys.exit(main(['nlb', '--dataset', 'mc_maze_small', '--data-dir', {str(DATA)!r}, '--quick', "
            f"'--out', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert_one_line(proc, words="pip install")
    assert "nlb-tools" in proc.stderr and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def small_tensors():
    train = read_h5(DATA / "mc_maze_small-05ms-val" / "train_input.h5", required=["train_spikes_heldin"])
    evaluation = read_h5(DATA / "mc_maze_small-05ms-val" / "eval_input.h5", required=["eval_spikes_heldin"])
    return train, evaluation


@pytest.mark.parametrize("which, field", [("train", "train_behavior"), ("train", "train_spikes_heldin"),
                                          ("eval", "eval_spikes_heldin")])
def test_all_nan_data_is_refused(small_tensors, which, field):
    train, evaluation = (dict(d) for d in small_tensors)
    d = train if which == "train" else evaluation
    d[field] = np.full_like(d[field], np.nan)
    with pytest.raises(NLBDataError, match=f"'{field}' is all NaN"):
        nlbdata_from_dicts("mc_maze_small", 5, "val", train, evaluation)


def test_select_on_an_unknown_metric_fails_before_training(tmp_path):
    data = make_lorenz(n_conditions=2, trials_per_condition=3, n_bins=8, n_neurons=5, n_heldout=1)
    model = LangevinFlow(data.train.n_neurons, latent_dim=4, dt=0.1)
    guide = GRUGuide(model, data.train.n_heldin, hidden=4)
    cfg = FitConfig(epochs=2, select_on="nope")
    with pytest.raises(ValueError, match="only validation metric is 'val_loss'"):
        fit(model, guide, data.train, data.valid, cfg, progress=False, checkpoint_dir=tmp_path)
    calls = []

    def metric(m, g, valid):
        calls.append(1)
        return {"co_bps": 0.1}

    with pytest.raises(ValueError, match=r"not among the validation metrics \['co_bps', 'val_loss'\]"):
        fit(model, guide, data.train, data.valid, cfg, metric_fn=metric, progress=False, checkpoint_dir=tmp_path)
    assert calls == [1] and not any(tmp_path.iterdir())  # asked once, nothing trained or written
    # a known metric name trains, and asking first leaves the run unchanged
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = LangevinFlow(data.train.n_neurons, latent_dim=4, dt=0.1)
        g = GRUGuide(m, data.train.n_heldin, hidden=4)
        select = "co_bps" if runs else "val_loss"
        runs.append(fit(m, g, data.train, data.valid, FitConfig(epochs=2, val_every=1, select_on=select,
                                                                select_mode="max"),
                        metric_fn=metric, progress=False).history)
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]


# ----- interrupts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_is_one_line_with_the_checkpoint_and_resumes(tmp_path, sig, status):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", AS_IN_A_TERMINAL, str(REPO / "examples" / "lorenz.py"),
                             "--quick", "--epochs", "100000", "--no-progress", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    word = "interrupted" if sig == signal.SIGINT else "terminated"
    line = assert_one_line(proc.returncode, err, status=status, words=f"{word} at epoch ")
    assert f"checkpoint saved in {out / 'checkpoints'}; rerun with --resume" in line
    epoch = int(line.split(" at epoch ")[1].split(";")[0])
    assert epoch >= 1
    if sig == signal.SIGTERM:
        return
    before = digest(out)
    refused = run_script("lorenz.py", "--quick", "--epochs", "100000", "--out", out)
    assert_one_line(refused, words="holds an earlier run")
    assert digest(out) == before
    resumed = run_script("lorenz.py", "--quick", "--epochs", str(epoch + 1), "--no-progress", "--resume", "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["epochs"] == epoch + 1


# ----- logs -----------------------------------------------------------------------------------------
def test_progress_off_a_terminal_is_plain_and_throttled():
    sink = io.StringIO()
    with progress_bar(total=200, desc="fit", unit="epoch", file=sink, interval=3600) as bar:
        for _ in range(200):
            bar.set_postfix({"loss": "1.0"}, refresh=False)
            bar.update(1)
    text = sink.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "200/200" in lines[-1], lines


def test_writing_a_submission_twice_logs_nothing(tmp_path, caplog):
    from pyro_langevin.nlb.scoring import Rates, write_submission

    rates = Rates(np.ones((2, 6, 3), np.float32), np.ones((2, 6, 3), np.float32), n_heldin=2, n_observed_bins=4)
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            write_submission(tmp_path / "s.h5", "mc_maze", 20, rates)
    assert not [r for r in caplog.records if "Overwriting" in r.getMessage()]


# ----- small things ---------------------------------------------------------------------------------
def test_version_and_choices_in_help(capsys):
    from pyro_langevin import __version__

    assert cli_main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert nlb_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "{area2_bump,dmfc_rsg,mc_maze," in text and "{val,test}" in text and "--overwrite" in text


def test_ablation_table_shows_sub_second_fit_times():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from ablate_guides import format_table
    finally:
        sys.path.remove(str(REPO / "examples"))
    from pyro_langevin.evidence import Evidence

    two = np.ones(2)
    evidence = Evidence(np.arange(2), -10 * two, -12 * two, 0.5 * two, 50 * two, 0.1 * two, 20 * two, -15 * two,
                        num_particles=100, quantity="joint").to_dict()
    row = {"variant": "gru", "guide": "gru", "prior": {"potential": "oscillators"}, "valid_elbo_per_bin": -1.0,
           "rate_r2": 0.5, "heldout_bps": 0.1, "fit_seconds": 0.34, "evidence": evidence}
    last = format_table([row], n_bins=5).splitlines()[-1]
    assert last.endswith("| 0.3 |") and "| -2.00 |" in last and "| 0.40 |" in last  # evidence, gap per bin: -20, 4 over 10


# ----- figures --------------------------------------------------------------------------------------
def test_one_p_value_convention_with_arviz():
    import arviz as az

    from pyro_langevin.checks import ppc_pvalues

    rng = np.random.default_rng(0)
    observed = rng.poisson(2.0, size=(4, 6, 3)).astype(float)
    draws = rng.poisson(1.0, size=(1, 30, 4, 6, 3)).astype(float)  # predicts fewer spikes than observed
    dims = {"spikes": ["trial", "time", "neuron"]}
    idata = az.from_dict(posterior_predictive={"spikes": draws}, observed_data={"spikes": observed}, dims=dims)
    t_rep = draws.reshape(30, -1).mean(axis=1)
    arviz_bpv = float(np.mean(t_rep <= observed.mean()))  # what az.plot_bpv(t_stat="mean") reports
    table = ppc_pvalues(idata)
    assert table.loc["mean", "p_pooled"] == pytest.approx(arviz_bpv) == 1.0


def test_figures_name_their_panels(tmp_path):
    from pyro_langevin.plots import plot_rates_and_latents
    from pyro_langevin.plots import plot_credible_intervals
    from pyro_langevin.predictive import CredibleSummary

    x = np.abs(np.random.default_rng(0).normal(size=(3, 10, 5)))
    summary = CredibleSummary(mean=x, lower=x * 0.5, upper=x * 1.5, prob=0.9)
    for unit in ("neuron", "latent"):
        fig = plot_credible_intervals(summary, unit_name=unit)
        assert [ax.get_title() for ax in fig.axes] == [f"{unit} {k}" for k in range(4)]
        assert all(ax.get_xlabel() == "time bin" for ax in fig.axes)
    path = plot_rates_and_latents(tmp_path / "f.png", x, x, x, x, true_latents=x[..., :3],
                                  r2={"LangevinFlow": 0.9, "smoothing": 0.6})
    assert path.read_bytes()[:4] == b"\x89PNG"
