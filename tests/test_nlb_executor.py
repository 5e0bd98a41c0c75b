"""Members and folds as Ray tasks (issue 25): a two-node cluster simulated on this machine
(``ray.cluster_utils.Cluster``, one CPU per node), quick models on the real MC_Maze_Small tensors.

Ray tasks must land on both nodes and give the rates and scores of the local executor for the same
seeds; a cluster run stopped after one member resumes without training that member again. The
done-file rules need no Ray. The scoring is made cheap here (the velocity decoder's ridge penalty
fixed instead of grid-searched, the smoothing baseline's GLM penalty fixed instead of
cross-validated: 45 s -> a few s per run), since these tests are about where models train; the
model's scores compared are still nlb_tools' metrics of the rates (scoring has its own tests).
"""

import functools
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from pyro_langevin.checkpoints import save_checkpoint  # noqa: E402
from pyro_langevin import baseline as core_baseline, scoring as core_scoring  # noqa: E402
from pyro_langevin.nlb import baseline as nlb_baseline  # noqa: E402
from pyro_langevin.nlb.cli import nlb_main  # noqa: E402
from pyro_langevin.nlb.config import default_config  # noqa: E402
from pyro_langevin.nlb.cv import cross_validate  # noqa: E402
from pyro_langevin.nlb.data import load_nlb  # noqa: E402
from pyro_langevin.members import DONE_FILE, MemberResult, MemberSpec, finished_member, write_done  # noqa: E402
from pyro_langevin.nlb.pipeline import run_nlb  # noqa: E402
from pyro_langevin.nlb.request import NLBRequest  # noqa: E402
from pyro_langevin.nlb.scoring import Rates, score_local  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
QUICK = ["--dataset", "mc_maze_small", "--data-dir", str(DATA), "--bin-ms", "5", "--phase", "val", "--quick", "--no-progress"]
quiet = lambda s: None  # noqa: E731


@pytest.fixture(scope="module", autouse=True)
def fast_scoring():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core_scoring, "score_local", functools.partial(score_local, grid_search=False))
        mp.setattr(core_baseline, "choose_glm_alpha", lambda *args, **kwargs: 0.1)
        mp.setattr(nlb_baseline, "choose_glm_alpha", lambda *args, **kwargs: 0.1)
        yield


@pytest.fixture(scope="module")
def data():
    return load_nlb("mc_maze_small", DATA, bin_ms=5, phase="val")


@pytest.fixture(scope="module")
def cluster(two_node_cluster):
    return two_node_cluster


def ensemble(out, **kw):
    return NLBRequest("mc_maze_small", DATA, 5, "val", out, quick=True, progress=False,
                      overrides={"eval.n_models": 2}, **kw)


@pytest.fixture(scope="module")
def local_ensemble(data, tmp_path_factory):
    """The two-member quick ensemble trained by the default executor (in this process)."""
    return run_nlb(ensemble(tmp_path_factory.mktemp("local") / "run"), data=data, log=quiet)


def eval_rates(metrics):
    with h5py.File(metrics["submission"]) as f:
        return {k: np.asarray(f["mc_maze_small"][k]) for k in ("eval_rates_heldout", "train_rates_heldin")}


def assert_same_run(a, b):
    for key, x in eval_rates(a).items():
        np.testing.assert_allclose(eval_rates(b)[key], x, rtol=1e-5, atol=1e-7, err_msg=key)
    for k, v in a["local"]["model"].items():  # (no "eval": the evaluation targets are not in tests/data)
        assert b["local"]["model"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for x, y in zip(a["members"], b["members"]):
        assert y["best_valid_co_bps"] == pytest.approx(x["best_valid_co_bps"], rel=1e-4, abs=1e-5)


def test_a_done_file_counts_only_for_the_same_recipe(tmp_path):
    """A member is finished when its done-file records this recipe (every setting, the export seed);
    a truncated file, another recipe or a missing best.pt means: train it."""
    spec = MemberSpec(0, None, None, [], 0, tmp_path / "checkpoints")
    rates = Rates(np.ones((3, 5, 4)), np.ones((2, 5, 4)), 2, 4)
    result = MemberResult(0, rates, 3, 0.1, 4, False, 1.0, [[0, 0.1]], {"backend": "ray", "node_id": "n1"})
    meta = {"spec": default_config("mc_maze_small", 20).to_dict(), "member": 0}
    write_done(spec, result, meta, export_seed=0, run_id="a")
    assert finished_member(spec, meta, 0) is None  # no best.pt
    (spec.checkpoint_dir / "best.pt").write_bytes(b"")
    back = finished_member(spec, meta, 0)
    assert back.executor == result.executor and np.array_equal(back.rates.eval, rates.eval)
    assert finished_member(spec, meta, 0, run_id="a") is not None and finished_member(spec, meta, 0, run_id="b") is None
    longer = {"spec": default_config("mc_maze_small", 20, epochs=999).to_dict(), "member": 0}
    assert finished_member(spec, longer, 0) is None and finished_member(spec, meta, 1) is None
    save_checkpoint(spec.checkpoint_dir / DONE_FILE, {"format": 0})
    assert finished_member(spec, meta, 0) is None
    (spec.checkpoint_dir / DONE_FILE).write_bytes(b"truncated")
    assert finished_member(spec, meta, 0) is None


def test_executor_options_bad_input_one_line_exit_2(tmp_path, capsys):
    cases = [(["--cpus-per-member", "2"], "--cpus-per-member is a Ray resource: give --address"),
             (["--address", "auto", "--workers", "2"], "--workers sizes the local pool"),
             (["--storage", "s3://bucket/x"], "not a URL"),
             (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: no Ray head node reachable"),
             (["--address", "auto", "--cpus-per-member", "0"], "--cpus-per-member must be > 0")]
    for extra, words in cases:
        assert nlb_main([*QUICK, "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_members_run_as_ray_tasks_on_both_nodes_with_the_local_scores(cluster, data, local_ensemble, tmp_path):
    out, shared = tmp_path / "out", tmp_path / "shared"
    m = run_nlb(ensemble(out, address="auto", storage=shared), data=data, log=quiet)
    placed = [x["executor"] for x in m["members"]]
    assert {p["backend"] for p in placed} == {"ray"} and {p["node_id"] for p in placed} == cluster
    assert all(p["seconds"] > 0 for p in placed) and m["executor"]["backend"] == "ray"
    assert {x["executor"]["backend"] for x in local_ensemble["members"]} == {"serial"}
    # checkpoints and done-files on the storage, the run's outputs in --out
    for i in (0, 1):
        assert (shared / f"member{i}" / "checkpoints" / "best.pt").is_file()
        assert (shared / f"member{i}" / "checkpoints" / DONE_FILE).is_file()
    assert not (out / "member0").exists() and (out / "metrics.json").is_file()
    assert_same_run(local_ensemble, m)


def test_cv_folds_run_as_ray_tasks_from_the_command_line(cluster, data, tmp_path, capsys):
    out, shared = tmp_path / "cv", tmp_path / "shared"
    code = nlb_main([*QUICK, "--cv", "2", "--address", "auto", "--cpus-per-member", "1", "--storage", str(shared),
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    on_ray = json.loads((out / "cv.json").read_text())
    placed = [e for fold in on_ray["folds"] for e in fold["executor"]]
    assert {p["node_id"] for p in placed} == cluster and len(placed) == 2
    assert sorted(p.name for p in shared.glob("fold*")) == ["fold0", "fold1"]
    local = cross_validate(NLBRequest("mc_maze_small", DATA, 5, "val", tmp_path / "local", quick=True, progress=False),
                           k=2, data=data, log=quiet)
    for a, b in zip(local["folds"], on_ray["folds"]):
        assert a["scored_trials"] == b["scored_trials"]
        for k, v in a["model"].items():
            assert b["model"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["fold"], k)


def test_a_cluster_run_stopped_after_one_member_resumes_without_retraining_it(cluster, data, local_ensemble, tmp_path):
    @ray.remote(num_cpus=1)
    class Busy:  # holds one of the two CPUs, so the members run one after the other
        def ready(self):
            return True

    busy = Busy.remote()
    ray.get(busy.ready.remote())
    shared = tmp_path / "shared"

    def stop_after_first_member(line):
        if line.startswith("member ") and " epochs in " in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_nlb(ensemble(tmp_path / "out", address="auto", storage=shared), data=data, log=stop_after_first_member)
    ray.kill(busy)
    done = sorted(shared.glob(f"member*/checkpoints/{DONE_FILE}"))
    assert len(done) == 1  # the other member was cancelled while it trained
    finished = done[0].parent
    stamps = {p.name: os.stat(p).st_mtime_ns for p in finished.iterdir()}

    lines = []
    m = run_nlb(ensemble(tmp_path / "out", address="auto", storage=shared, resume=True), data=data, log=lines.append)
    assert {p.name: os.stat(p).st_mtime_ns for p in finished.iterdir()} == stamps  # not trained, nor exported again
    reused = [x for x in m["members"] if x["executor"].get("reused")]
    assert [x["checkpoint"] for x in reused] == [str(finished / "best.pt")]
    assert sum("finished earlier" in line for line in lines) == 1
    assert len(list(shared.glob(f"member*/checkpoints/{DONE_FILE}"))) == 2
    assert_same_run(local_ensemble, m)  # and the result is the uninterrupted run's


def test_more_gpus_per_member_than_the_cluster_has(cluster, tmp_path, capsys):
    assert nlb_main([*QUICK, "--out", str(tmp_path / "o"), "--address", "auto", "--gpus-per-member", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpus-per-member 0.5: the Ray cluster has 0 GPUs" in err


def test_a_failing_task_raises_its_own_error(cluster):
    """A model's own error (bad input is one line at the command line) comes back as itself, not
    wrapped in Ray's task error; the map also keeps the items' order and says where each ran."""
    from pyro_langevin.executor import Executor

    on_ray = Executor(address="auto")
    with pytest.raises(ValueError, match="invalid literal") as err:
        on_ray.map(int, ["7", "x"])
    assert type(err.value) is ValueError
    done = on_ray.map(int, ["3", "1", "2"])
    assert [r for r, _ in done] == [3, 1, 2] and {p.backend for _, p in done} == {"ray"}


def test_a_recordings_folds_run_as_ray_tasks_with_the_local_scores(cluster, tmp_path):
    """The recording wing's cross-validation trains its folds on the same executor."""
    from pyro_langevin.executor import Executor
    from pyro_langevin.recording.data import Recording
    from pyro_langevin.recording.run import cross_validate_recording, recording_config

    g = np.random.default_rng(0)
    t = np.arange(20)[None, :, None]
    counts = g.poisson(np.exp(0.8 * np.sin(2 * np.pi * t / 20 + g.uniform(0, 6, (40, 1, 12))) - 0.5))
    rec = Recording.from_arrays(counts.astype(np.float32), 20)
    cfg = recording_config(rec, {"cv.folds": 2}, quick=True, epochs=3)
    local = cross_validate_recording(rec, cfg, tmp_path / "local", 0, "cpu", executor=Executor(), progress=False,
                                     log=quiet)
    on_ray = cross_validate_recording(rec, cfg, tmp_path / "ray", 0, "cpu", executor=Executor(address="auto"),
                                      progress=False, log=quiet)
    placed = [e for fold in on_ray["folds"] for e in fold["executor"]]
    assert {p["backend"] for p in placed} == {"ray"} and {p["node_id"] for p in placed} == cluster
    for a, b in zip(local["folds"], on_ray["folds"]):
        assert a["heldout_units"] == b["heldout_units"] and a["scored_trials"] == b["scored_trials"]
        assert b["model"]["co-bps"] == pytest.approx(a["model"]["co-bps"], rel=1e-4, abs=1e-5)
