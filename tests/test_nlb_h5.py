"""h5 reading/writing with validation: clear errors naming file and field."""

import h5py
import numpy as np
import pytest

from pyro_langevin.data.errors import NLBDataError
from pyro_langevin.data.h5 import as_ragged, read_h5, write_h5


def test_roundtrip_nested_and_ragged(tmp_path):
    data = {
        "train_spikes_heldin": np.arange(24, dtype=np.float64).reshape(2, 3, 4),
        "grp": {"psth": np.ones((2, 3, 4)), "eval_cond_idx": np.array([[0, 2], [1, 3]], dtype=object),
                "mask": np.array([True, False])},
    }
    path = write_h5(tmp_path / "a.h5", data)
    back = read_h5(path)
    assert back["train_spikes_heldin"].dtype == np.float32
    np.testing.assert_array_equal(back["train_spikes_heldin"], data["train_spikes_heldin"])
    idx = back["grp"]["eval_cond_idx"]
    assert idx.shape == (2,) and list(idx[1]) == [1, 3]
    assert back["grp"]["mask"].dtype == bool


def test_as_ragged_fixes_nlb_tools_2d_object_array():
    # nlb_tools' np.array(list, dtype=object) is 2-D when all conditions have equal trial counts
    two_d = np.array([np.array([3, 6]), np.array([0, 4])], dtype=object)
    assert two_d.shape == (2, 2)
    out = as_ragged(two_d)
    assert out.shape == (2,) and list(out[0]) == [3, 6]


def test_missing_file(tmp_path):
    with pytest.raises(NLBDataError, match="file not found"):
        read_h5(tmp_path / "nope.h5")


def test_truncated_file_names_file(tmp_path):
    path = write_h5(tmp_path / "train_input.h5", {"train_spikes_heldin": np.ones((5, 50, 30))})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(NLBDataError, match="train_input.h5"):
        read_h5(path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "eval_input.h5"
    path.write_text("this is not hdf5")
    with pytest.raises(NLBDataError, match=r"eval_input\.h5.*not a readable HDF5"):
        read_h5(path)


def test_corrupt_dataset_names_field(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        data = np.random.default_rng(0).poisson(3.0, (4, 200, 50)).astype(np.float32)
        f.create_dataset("train_spikes_heldin", data=data, chunks=(1, 200, 50), compression="gzip")
    # overwrite the middle of the file (the compressed chunks) with garbage
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(raw))
    with pytest.raises(NLBDataError, match="train_spikes_heldin"):
        read_h5(path)


def test_missing_required_field(tmp_path):
    path = write_h5(tmp_path / "t.h5", {"train_spikes_heldin": np.ones((2, 3, 4))})
    with pytest.raises(NLBDataError, match="train_spikes_heldout"):
        read_h5(path, required=["train_spikes_heldin", "train_spikes_heldout"])


@pytest.mark.parametrize("bad,msg", [(0.5, "whole numbers"), (-1.0, "negative"), (np.inf, "infinite")])
def test_bad_counts_name_field(tmp_path, bad, msg):
    arr = np.ones((2, 3, 4))
    arr[1, 2, 3] = bad
    path = write_h5(tmp_path / "t.h5", {"train_spikes_heldout": arr})
    with pytest.raises(NLBDataError, match=f"train_spikes_heldout.*{msg}"):
        read_h5(path)


def test_nan_counts_allowed(tmp_path):
    arr = np.ones((2, 3, 4))
    arr[0, 0, 0] = np.nan  # nlb_tools marks "no data" with NaN (dmfc_rsg eval targets)
    path = write_h5(tmp_path / "t.h5", {"eval_spikes_heldout": arr})
    assert np.isnan(read_h5(path)["eval_spikes_heldout"][0, 0, 0])


def test_wrong_ndim(tmp_path):
    path = write_h5(tmp_path / "t.h5", {"train_spikes_heldin": np.ones((2, 3))})
    with pytest.raises(NLBDataError, match="3 dimensions"):
        read_h5(path)
