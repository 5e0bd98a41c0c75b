"""The batch contract: valid arrays always build a Batch whose slices round-trip; invalid ones raise
BatchError naming the offending field (property-based, with hypothesis)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_langevin import Batch, BatchError, make_batch

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("heldin", "heldout", "heldin_forward", "heldout_forward")
DTYPES = (np.float32, np.float64, np.int64, np.int32, np.uint8)


@st.composite
def arrays(draw):
    """Consistent nlb-style arrays: (n, t, n_in), (n, t, n_out), (n, f, n_in), (n, f, n_out)."""
    n = draw(st.integers(1, 5))
    t = draw(st.integers(1, 6))
    f = draw(st.integers(0, 3))
    n_in = draw(st.integers(1, 4))
    n_out = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n, t + f, n_in + n_out)).astype(dtype)
    return {
        "heldin": counts[:, :t, :n_in],
        "heldout": counts[:, :t, n_in:],
        "heldin_forward": counts[:, t:, :n_in],
        "heldout_forward": counts[:, t:, n_in:],
    }


def build(a, with_heldout=True, with_forward=True):
    kw = {}
    if not with_heldout:
        kw["n_heldout"] = a["heldout"].shape[2]
    if not with_forward:
        kw["n_forward"] = a["heldin_forward"].shape[1]
    return make_batch(
        a["heldin"],
        a["heldout"] if with_heldout else None,
        a["heldin_forward"] if with_forward else None,
        a["heldout_forward"] if with_forward and with_heldout else None,
        **kw,
    )


def f32(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


@SETTINGS
@given(arrays(), st.booleans(), st.booleans(), st.data())
def test_valid_arrays_build_a_batch_whose_slices_round_trip(a, with_heldout, with_forward, data):
    b = build(a, with_heldout, with_forward)
    n, t, n_in = a["heldin"].shape
    n_out, f = a["heldout"].shape[2], a["heldin_forward"].shape[1]
    assert (b.n_trials, b.n_observed_bins, b.n_heldin) == (n, t, n_in)
    assert (b.n_heldout, b.n_forward_bins, b.n_bins, b.n_neurons) == (n_out, f, t + f, n_in + n_out)
    assert b.target.dtype == torch.float32 and b.mask.dtype == torch.bool
    assert torch.equal(b.input, f32(a["heldin"]))
    assert torch.equal(b.target[:, :t, :n_in], f32(a["heldin"]))
    assert b.mask[:, :t, :n_in].all()
    assert bool(b.mask[:, :t, n_in:].all()) == (with_heldout or n_out == 0)
    if with_heldout:
        assert torch.equal(b.target[:, :t, n_in:], f32(a["heldout"]))
    if with_forward:
        assert torch.equal(b.target[:, t:, :n_in], f32(a["heldin_forward"]))
        assert b.mask[:, t:, :n_in].all()
    else:
        assert not b.mask[:, t:].any()
    # trial selection round-trips: slices, ints (negative too), index tensors, boolean masks
    i = data.draw(st.integers(0, n), label="i")
    j = data.draw(st.integers(i, n), label="j")
    for sub, rows in ((b[i:j], slice(i, j)), (b[torch.arange(i, j)], slice(i, j))):
        assert torch.equal(sub.input, f32(a["heldin"][rows]))
        assert torch.equal(sub.target, b.target[rows]) and torch.equal(sub.mask, b.mask[rows])
        assert torch.equal(sub.index, torch.arange(n)[rows])
    k = data.draw(st.integers(-n, n - 1), label="k")
    one = b[k]
    assert len(one) == 1 and torch.equal(one.input[0], f32(a["heldin"][k])) and int(one.index) == k % n
    assert torch.equal(b[np.int64(k)].target, one.target)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="keep"))
    assert torch.equal(b[keep].input, f32(a["heldin"])[keep])
    # a selection is itself a valid batch (except an empty one), and concatenating the two parts restores
    if 0 < i < n:
        parts = [b[:i], b[i:]]
        for p in parts:
            p.validate()
        assert torch.equal(torch.cat([p.target for p in parts]), b.target)


BAD_VALUES = {"nan": np.nan, "inf": np.inf, "negative": -1.0, "fraction": 0.5}
BAD_WORDS = {"nan": "NaN or infinite", "inf": "NaN or infinite", "negative": "negative", "fraction": "whole"}


@SETTINGS
@given(arrays(), st.sampled_from(FIELDS), st.sampled_from(sorted(BAD_VALUES)), st.data())
def test_invalid_values_raise_naming_the_field(a, name, kind, data):
    arr = a[name].astype(np.float64)
    if arr.size == 0:  # nothing to corrupt in an empty held-out/forward part
        return
    idx = tuple(data.draw(st.integers(0, s - 1)) for s in arr.shape)
    arr[idx] = BAD_VALUES[kind]
    a = dict(a, **{name: arr})
    with pytest.raises(BatchError) as err:
        build(a)
    msg = str(err.value)
    assert msg.startswith(f"{name}:"), msg
    assert BAD_WORDS[kind] in msg and str(list(idx)) in msg, msg


@SETTINGS
@given(arrays(), st.sampled_from(FIELDS), st.sampled_from(["drop_dim", "add_dim", "trials", "bins", "neurons"]))
def test_disagreeing_shapes_raise_naming_the_field(a, name, how):
    arr = a[name]
    if how == "drop_dim":
        arr = arr.reshape(arr.shape[0], -1)
    elif how == "add_dim":
        arr = arr[..., None]
    elif how == "trials":  # heldin sets the trial count: then heldout is the one that disagrees
        arr = np.concatenate([arr, arr[:1]])
    elif how == "bins":
        if name == "heldin":  # heldin sets T; change the others' bins instead
            return
        arr = np.concatenate([arr, arr[:, :1]], axis=1) if arr.shape[1] else np.zeros(arr.shape[:1] + (1,) + arr.shape[2:])
        if name == "heldin_forward":  # heldin_forward sets F: make heldout_forward disagree
            if a["heldout_forward"].shape[2] == 0:
                return
            name = "heldout_forward"
            arr = a["heldout_forward"]
            a = dict(a, heldin_forward=np.concatenate([a["heldin_forward"], a["heldin"][:, :1]], axis=1))
    elif how == "neurons":
        if name in ("heldin", "heldout"):  # they set N_in / N_out; a neuron more is still consistent
            name = "heldin_forward" if name == "heldin" else "heldout_forward"
            arr = a[name]
        if arr.shape[1] == 0:
            return
        arr = np.concatenate([arr, arr[..., :1] if arr.shape[2] else np.zeros(arr.shape[:2] + (1,))], axis=2)
    expect = "heldout" if (name, how) == ("heldin", "trials") else name
    with pytest.raises(BatchError) as err:
        build(dict(a, **{name: arr}))
    assert str(err.value).startswith(f"{expect}:"), (how, str(err.value))


@pytest.mark.parametrize("shape, words", [((0, 4, 3), "no trials"), ((2, 0, 3), "empty trials"), ((2, 4, 0), "zero neurons")])
def test_empty_heldin_is_rejected(shape, words):
    with pytest.raises(BatchError, match=f"^heldin: empty array .*{words}"):
        make_batch(np.zeros(shape))


def test_float64_values_are_checked_before_the_cast_to_float32():
    x = np.ones((2, 3, 2))
    x[1, 2, 0] = 3.00000001  # rounds to 3.0 in float32
    with pytest.raises(BatchError, match=r"heldin: spike counts must be whole.*\[1, 2, 0\]"):
        make_batch(x)
    x[1, 2, 0] = 1e40  # finite in float64, inf in float32
    with pytest.raises(BatchError, match="heldin: count 1e\\+40"):
        make_batch(x)


@pytest.mark.parametrize("kw, field", [
    (dict(n_heldout=2, heldout=np.ones((2, 3, 1))), "heldout"),
    (dict(n_heldout=-1), "n_heldout"),
    (dict(n_forward=1.5), "n_forward"),
    (dict(n_forward=2, heldin_forward=np.ones((2, 3, 2))), "heldin_forward"),
    (dict(index=[0]), "index"),
    (dict(index=[0.5, 1]), "index"),
    (dict(behavior=np.ones((2, 2, 1))), "behavior"),
    (dict(heldout=np.array(["a"] * 6).reshape(2, 3, 1)), "heldout"),
])
def test_make_batch_options_are_checked(kw, field):
    kw = dict(kw)
    heldout = kw.pop("heldout", None)
    hif = kw.pop("heldin_forward", None)
    with pytest.raises(BatchError, match=f"^{field}:"):
        make_batch(np.ones((2, 3, 2)), heldout, hif, **kw)


def test_validate_names_the_field_of_a_hand_built_batch():
    b = make_batch(np.ones((2, 3, 2)), np.ones((2, 3, 1)))
    cases = {
        "input": dict(input=-b.input),
        "target": dict(target=b.target[:1]),
        "mask": dict(mask=b.mask.float()),
        "index": dict(index=b.index[:1]),
    }
    for name, change in cases.items():
        kw = dict(input=b.input, target=b.target, mask=b.mask, index=b.index, **{})
        kw.update(change)
        with pytest.raises(BatchError, match=f"^{name}:"):
            Batch(**kw).validate()
    # values outside the mask may be anything (NaN marks missing data), inside they are checked
    target = b.target.clone()
    target[0, 0, 2] = float("nan")
    mask = b.mask.clone()
    mask[0, 0, 2] = False
    Batch(b.input, target, mask, b.index).validate()
    with pytest.raises(BatchError, match="^target: NaN"):
        Batch(b.input, target, b.mask, b.index).validate()
    with pytest.raises(IndexError, match="trial 2 out of range"):
        b[2]
