"""jaxsplit.io: formats, dtypes, atomic writes, refusal to overwrite, bad files."""

import os
import pathlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.core import FrozenDict

from jaxsplit import io

# A failed orbax read leaves a callback on orbax's closed event loop; a background thread
# reports it later, during whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
FILE_EXT = {"msgpack": "w.msgpack", "safetensors": "w.safetensors", "npz": "w.npz"}
NAMES = {"orbax": "ckpt", **FILE_EXT}


def _tree():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((4, 3)).astype(np.float32),
                "bias": np.zeros(3, np.float32),
            },
            "block": {"Conv_0": {"kernel": rng.standard_normal((3, 3, 2, 2)).astype("bfloat16")}},
            "Embed_0": {"embedding": rng.standard_normal((5, 2)).astype(np.float16)},
        },
        "batch_stats": {"bn": {"mean": np.arange(3, dtype=np.int32)}},
    }


def _assert_same(a, b, path=""):
    assert sorted(a) == sorted(b), path
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k], f"{path}/{k}")
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert x.dtype == y.dtype and x.shape == y.shape, (path, k, x.dtype, y.dtype)
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (path, k)


def _snapshot(d: pathlib.Path):
    return {
        str(f.relative_to(d)): (f.read_bytes() if f.is_file() else None, f.stat().st_mtime_ns)
        for f in sorted(d.rglob("*"))
    }


@pytest.mark.parametrize("fmt", io.FORMATS)
def test_round_trip_preserves_values_and_dtypes(tmp_path, fmt):
    tree = _tree()
    out = io.save(tree, tmp_path / NAMES[fmt])
    assert io.detect_format(out) == fmt
    back = io.load(out)
    _assert_same(back, tree)
    assert back["params"]["block"]["Conv_0"]["kernel"].dtype == ml_dtypes.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAMES[fmt]]  # no temp left over


@pytest.mark.parametrize("fmt", FILE_EXT)
def test_output_file_mode_follows_umask(tmp_path, fmt):
    old = os.umask(0o022)
    try:
        out = io.save({"a": np.ones(2)}, tmp_path / NAMES[fmt])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_format_override_and_scalars(tmp_path):
    tree = {"w": np.float32(1.5), "step": 7}
    out = io.save(tree, tmp_path / "weights.bin", fmt="safetensors")
    back = io.load(out, fmt="safetensors")
    assert back["w"].shape == () and back["w"].dtype == np.float32 and int(back["step"]) == 7


def test_accepts_jax_frozendict_and_nnx_state(tmp_path):
    from flax import nnx

    lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    state = nnx.state(lin)
    io.save(FrozenDict({"a": {"kernel": jnp.ones((2, 2), jnp.bfloat16)}}), tmp_path / "f.npz")
    io.save(state, tmp_path / "s.msgpack")
    back = io.load(tmp_path / "s.msgpack")
    assert np.array_equal(back["kernel"], np.asarray(state["kernel"].get_value()))
    assert io.load(tmp_path / "f.npz")["a"]["kernel"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize(
    ("path", "fmt", "expected"),
    [("m.msgpack", None, "msgpack"), ("x.npz", None, "npz"), ("newdir", None, "orbax"),
     ("x.txt", "npz", "npz")],
)  # fmt: skip
def test_detect_format(path, fmt, expected):
    assert io.detect_format(path, fmt) == expected


def test_detect_format_errors(tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell the checkpoint format of '.*w\.txt'"):
        io.detect_format(tmp_path / "w.txt")
    (tmp_path / "noext").write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot tell"):
        io.detect_format(tmp_path / "noext")
    with pytest.raises(ValueError, match=r"format must be one of \['orbax'.*got 'pickle'"):
        io.detect_format("w.npz", "pickle")


@pytest.mark.parametrize("fmt", io.FORMATS)
def test_refuses_to_overwrite(tmp_path, fmt):
    out = io.save({"a": np.ones(2)}, tmp_path / NAMES[fmt])
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        io.save({"a": np.zeros(2)}, out)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", io.FORMATS)
def test_overwrite_replaces(tmp_path, fmt):
    out = io.save({"a": np.ones(2)}, tmp_path / NAMES[fmt])
    io.save({"b": np.zeros(3)}, out, overwrite=True)
    assert list(io.load(out)) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == [NAMES[fmt]]


@pytest.mark.parametrize("fmt", io.FORMATS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_write_keeps_previous_output(tmp_path, monkeypatch, fmt, exc):
    out = io.save({"a": np.ones(2)}, tmp_path / NAMES[fmt])
    before = _snapshot(tmp_path)
    real = io._WRITERS[fmt]

    def half_then_fail(tree, p):
        real(tree, p)  # the new checkpoint is complete in the temp dir, then the crash
        raise exc("simulated crash")

    monkeypatch.setitem(io._WRITERS, fmt, half_then_fail)
    with pytest.raises(exc, match="simulated crash"):
        io.save({"a": np.zeros(2)}, out, overwrite=True)
    assert _snapshot(tmp_path) == before  # old output intact, temp removed
    assert np.array_equal(io.load(out)["a"], np.ones(2))


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(tree, p):
        p.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setitem(io._WRITERS, "npz", fail)
    with pytest.raises(KeyboardInterrupt):
        io.save({"a": np.ones(2)}, tmp_path / "w.npz")
    assert list(tmp_path.iterdir()) == []


def test_save_errors_before_touching_disk(tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory .*missing.* does not exist"):
        io.save({"a": np.ones(1)}, tmp_path / "missing" / "w.npz")
    with pytest.raises(ValueError, match=r"key 'a/b' cannot be stored in a flat checkpoint"):
        io.save({"a/b": np.ones(1)}, tmp_path / "w.safetensors")
    with pytest.raises(TypeError, match=r"checkpoint leaf 'x/name' is a str"):
        io.save({"x": {"name": "hello"}}, tmp_path / "w.msgpack")
    with pytest.raises(ValueError, match="empty tree"):
        io.save({}, tmp_path / "ckpt")
    (tmp_path / "file").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="is a file"):
        io.save({"a": np.ones(1)}, tmp_path / "file", fmt="orbax", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_bytes() == b"keep"


def test_flat_key_with_slash_is_fine_in_msgpack(tmp_path):
    out = io.save({"a/b": np.ones(1)}, tmp_path / "w.msgpack")
    assert list(io.load(out)) == ["a/b"]


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors", "npz"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_bad_files_raise_checkpoint_error(tmp_path, fmt, damage):
    out = io.save(_tree(), tmp_path / NAMES[fmt])
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(
        io.CheckpointError, match=rf"cannot read .* as {fmt} \(truncated or corrupt\?\)"
    ):
        io.load(out)


def test_bad_orbax_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.CheckpointError, match="not an orbax checkpoint directory"):
        io.load(tmp_path / "empty")
    out = io.save(_tree(), tmp_path / "ckpt")
    for f in (out / "d").iterdir():  # the array data
        f.write_bytes(b"")
    with pytest.raises(io.CheckpointError, match="cannot read .* as orbax"):
        io.load(out)


def test_orbax_item_subdirectory_is_found(tmp_path):
    (tmp_path / "step_1").mkdir()
    io.save({"a": np.ones(2)}, tmp_path / "step_1" / "default")  # CheckpointManager layout
    assert np.array_equal(io.load(tmp_path / "step_1")["a"], np.ones(2))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load(tmp_path / "nope.npz")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(io.CheckpointError, match="no _METADATA"):
        io.load(tmp_path / "d.npz")  # a directory is read as orbax
    with pytest.raises(io.CheckpointError, match="is a directory, not a npz file"):
        io.load(tmp_path / "d.npz", fmt="npz")
    np.savez(tmp_path / "mixed.npz", **{"a": np.ones(1), "a/b": np.ones(1)})
    with pytest.raises(io.CheckpointError, match="both an array and a subtree"):
        io.load(tmp_path / "mixed.npz")
