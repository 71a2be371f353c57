"""jaxsplit.io sparse twins: bit-exact round trips per format, stored forms, sizes, errors."""

import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import io, sparse_io
from jaxsplit.sparse_io import SparseArray

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
NAMES = {"orbax": "ckpt", "msgpack": "w.msgpack", "safetensors": "w.safetensors", "npz": "w.npz"}
DTYPES = ["float32", "bfloat16", "float16", "float64"]


def _bits(a):
    a = np.asarray(a)
    return a.reshape(-1).view(np.uint8)


def _twin(dtype, n=400, seed=0):
    """A mostly-zero twin holding -0.0, a subnormal, NaN payloads and infinities."""
    dt = (
        np.dtype(getattr(__import__("ml_dtypes"), dtype))
        if dtype == "bfloat16"
        else np.dtype(dtype)
    )
    w = np.zeros(n, dt)
    u = w.view(f"u{dt.itemsize}")
    rng = np.random.default_rng(seed)
    pos = rng.choice(np.arange(4, n), 9, replace=False)
    w[pos] = rng.standard_normal(9).astype(np.float32).astype(dt)
    sign, top = 1 << (8 * dt.itemsize - 1), (1 << (8 * dt.itemsize)) - 1
    u[0] = sign  # -0.0
    u[1] = 1  # the smallest subnormal
    u[2] = top  # a negative NaN with a full payload
    u[3] = top ^ sign ^ 1  # a positive NaN with another payload
    return w.reshape(20, n // 20)


def _split_tree(dtype):
    dense = np.arange(400, dtype=np.float32).reshape(20, 20).astype(_twin(dtype).dtype)
    return {
        "params": {
            "Dense_0": {
                "branch_0": {"kernel": dense, "bias": np.zeros(20, np.float32)},
                "branch_1": {"kernel": _twin(dtype)},
            },
            "Dense_1": {"kernel": _twin(dtype, seed=1)},  # not a twin: stays dense
        }
    }


def _assert_bits(a, b):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _assert_bits(a[k], b[k])
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("fmt", io.FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_twins_round_trip_bit_for_bit(tmp_path, fmt, dtype):
    tree = _split_tree(dtype)
    out = io.save(tree, tmp_path / NAMES[fmt])
    _assert_bits(io.load(out), tree)
    info = {t.path: t for t in io.stored_info(out)}
    twin = info["params/Dense_0/branch_1/kernel"]
    assert twin.form == "sparse" and twin.nnz == 13 and twin.density == 13 / 400
    assert twin.shape == (20, 20) and twin.dtype == tree["params"]["Dense_1"]["kernel"].dtype.name
    itemsize = tree["params"]["Dense_1"]["kernel"].dtype.itemsize
    assert twin.nbytes == 13 * 4 + 13 * itemsize + 16  # int32 indices, values, int64 shape
    assert info["params/Dense_1/kernel"].form == "dense"
    assert info["params/Dense_0/branch_0/kernel"].form == "dense"
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAMES[fmt]]


@pytest.mark.parametrize("fmt", io.FORMATS)
def test_load_sparse_records_and_save_them_again(tmp_path, fmt):
    tree = _split_tree("bfloat16")
    out = io.save(tree, tmp_path / NAMES[fmt])
    back = io.load(out, dense=False)
    rec = back["params"]["Dense_0"]["branch_1"]["kernel"]
    assert isinstance(rec, SparseArray) and rec.indices.dtype == np.int32
    assert rec.shape == (20, 20) and rec.nnz == 13
    _assert_bits(rec.todense(), tree["params"]["Dense_0"]["branch_1"]["kernel"])
    again = io.save(back, tmp_path / f"again_{NAMES[fmt]}", sparse_below=None)
    assert {t.form for t in io.stored_info(again) if t.path.endswith("branch_1/kernel")} == {
        "sparse"
    }  # SparseArray leaves are stored sparse whatever sparse_below
    _assert_bits(io.load(again), tree)


@pytest.mark.parametrize("sparse_below", [None, 0, 0.01])
def test_sparse_below_off_or_too_low_keeps_dense(tmp_path, sparse_below):
    tree = _split_tree("float32")
    out = io.save(tree, tmp_path / "w.npz", sparse_below=sparse_below)
    assert {t.form for t in io.stored_info(out)} == {"dense"}
    _assert_bits(io.load(out), tree)


def test_sparse_only_when_smaller():
    import ml_dtypes

    w = np.zeros(10, ml_dtypes.bfloat16)
    w[:4] = 1.0  # 40% < 50% but 4 * (4 + 2) + 8 = 32 bytes >= 20 dense: stays dense
    assert sparse_io.encode_leaf(w, 0.5) is w
    w8 = np.zeros(10, np.float64)
    w8[:4] = 1.0  # 4 * (4 + 8) + 8 = 56 bytes < 80 dense: sparse
    assert isinstance(sparse_io.encode_leaf(w8, 0.5), SparseArray)


def test_k_way_twins_all_sparse(tmp_path):
    p = {"d": {"kernel": np.linspace(-8, 8, 4096, dtype=np.float32).reshape(64, 64)}}
    cfg = js.SplitConfig(layers=["d"], threshold=7.5, branches=4)
    out = io.save(js.split_params(p, cfg), tmp_path / "w.safetensors")
    forms = {t.path: t.form for t in io.stored_info(out, count=False)}
    assert forms == {
        "d/branch_0/kernel": "dense",
        **{f"d/branch_{i}/kernel": "sparse" for i in (1, 2, 3)},
    }
    _assert_bits(js.merge_params(io.load(out)), p)


def test_clip_split_checkpoint_is_small(tmp_path):
    """clip at <= 2% extra non-zeros: the checkpoint is <= 1.15x the input's bytes."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    tree = {
        f"layer_{i}": {
            "kernel": rng.standard_normal((256, 256), np.float32).astype(ml_dtypes.bfloat16)
        }
        for i in range(4)
    }
    src = io.save(tree, tmp_path / "in.safetensors")
    cfg = js.SplitConfig(layers=["*"], threshold=js.Percentile(98.0), method="clip")
    p2, rep = js.split_with_report(tree, cfg)
    assert sum(lay.n_split for lay in rep.layers) <= 0.02 * sum(lay.n_total for lay in rep.layers)
    out = io.save(p2, tmp_path / "out.safetensors")
    ratio = out.stat().st_size / src.stat().st_size
    assert ratio <= 1.15, ratio
    dense = io.save(p2, tmp_path / "dense.safetensors", sparse_below=None)
    assert dense.stat().st_size / src.stat().st_size > 1.9


@pytest.mark.parametrize("bad", ["0.2", True, [0.1]])
def test_sparse_below_type_errors(tmp_path, bad):
    with pytest.raises(TypeError, match=r"sparse_below must be None or a number in \[0, 1\]"):
        io.save({"a": np.ones(2)}, tmp_path / "w.npz", sparse_below=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_sparse_below_value_errors(tmp_path, bad):
    with pytest.raises(ValueError, match=r"sparse_below must be None or a number in \[0, 1\].*got"):
        io.save({"a": np.ones(2)}, tmp_path / "w.npz", sparse_below=bad)


def test_reserved_key_and_bad_dense_flag(tmp_path):
    with pytest.raises(ValueError, match="reserved name '__jaxsplit_sparse__'"):
        io.save({"a": {"__jaxsplit_sparse__": np.ones(1)}}, tmp_path / "w.msgpack")
    out = io.save({"a": np.ones(2)}, tmp_path / "w.npz")
    with pytest.raises(TypeError, match="dense must be a bool, got 'yes'"):
        io.load(out, dense="yes")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(io.CheckpointError, ValueError)
    assert issubclass(sparse_io.SparseRecordError, ValueError)


@pytest.mark.parametrize(
    ("indices", "message"),
    [([0, 9], r"ascending, unique and in \[0, 4\)"), ([2, 1], "ascending"), ([1, 1], "unique")],
)
def test_malformed_records_raise_checkpoint_error(tmp_path, indices, message):
    from safetensors.numpy import save_file

    p = tmp_path / "bad.safetensors"
    rec = "a/kernel/__jaxsplit_sparse__/"
    save_file(
        {rec + "indices": np.array(indices, np.int32), rec + "values": np.ones(2, np.float32),
         rec + "shape": np.array([2, 2], np.int64)}, p,
    )  # fmt: skip
    with pytest.raises(io.CheckpointError, match=message):
        io.load(p)
    with pytest.raises(io.CheckpointError, match=message):
        io.open_checkpoint(p).read(("a", "kernel"))


def test_record_with_missing_part(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "bad.safetensors"
    save_file({"a/__jaxsplit_sparse__/indices": np.array([0], np.int32)}, p)
    with pytest.raises(
        io.CheckpointError, match=r"must hold exactly \['indices', 'shape', 'values'\]"
    ):
        io.load(p)
    with pytest.raises(io.CheckpointError, match="lacks one of indices/values/shape"):
        io.stored_info(p)


@pytest.mark.parametrize("fmt", io.FORMATS)
def test_failing_write_keeps_previous_output(tmp_path, monkeypatch, fmt):
    out = io.save(_split_tree("float32"), tmp_path / NAMES[fmt])
    before = {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()}
    real = io._WRITERS[fmt]

    def write_then_fail(tree, p):
        real(tree, p)
        raise OSError("disk full")

    monkeypatch.setitem(io._WRITERS, fmt, write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save(_split_tree("bfloat16"), out, overwrite=True)
    assert {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()} == before
    _assert_bits(io.load(out), _split_tree("float32"))


def test_stored_info_without_counting(tmp_path):
    out = io.save(_split_tree("float16"), tmp_path / "ckpt")
    info = {t.path: t for t in io.stored_info(out, count=False)}
    assert (
        info["params/Dense_1/kernel"].nnz is None and info["params/Dense_1/kernel"].density is None
    )
    assert info["params/Dense_0/branch_1/kernel"].nnz == 13
    assert info["params/Dense_0/branch_0/bias"].to_dict()["nbytes"] == 80


def test_sparse_array_record():
    a = np.zeros((3, 4), np.float16)
    a[1, 2], a[2, 3] = 5.0, -0.0
    s = SparseArray.from_dense(a)
    assert s.indices.tolist() == [6, 11] and s.dtype == np.float16 and s.size == 12
    assert s.nbytes == 2 * 4 + 2 * 2 + 16
    _assert_bits(s.todense(), a)
    assert a[2, 3] == 0 and _bits(s.todense())[-1] == 0x80  # -0.0 kept
    with pytest.raises(TypeError, match="cannot be stored sparse"):
        SparseArray.from_dense(np.zeros(2, np.complex128))
