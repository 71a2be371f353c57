"""Kernels split in flat blocks (jaxsplit.chunked, split_checkpoint(block_bytes=)) give the
whole kernel's bits, reports and stored forms, and never read a kernel whole."""

import itertools
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxsplit as js
from jaxsplit import chunked, io, programs, stream
from jaxsplit.tree import leaf_items, x64

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.float64]
WEIGHTS = ("kernel", "gating", "linear")


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _w(rng, shape, dtype, specials=True):
    a = rng.standard_t(2, shape).astype(np.float32)
    if specials:
        a.reshape(-1)[:4] = [-0.0, 1e-40, 0.0, -3.0]
    return a.astype(dtype)


def _tree(dtype, seed=0):
    """Node layers with biases, Gemma-style leaf layers (two weights in one node), a
    kernel smaller than any block, and a non-layer leaf."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "a": {"kernel": _w(rng, (37, 53), dtype), "bias": np.ones(53, dtype)},
            "mlp": {"gating": _w(rng, (3, 41, 29), dtype), "linear": _w(rng, (29, 41), dtype)},
            "small": {"kernel": _w(rng, (4, 4), dtype, specials=False)},
            "scale": np.float32(2.0),
        }
    }


def _leaves(p):
    return dict(leaf_items(io.load(p)))


def _assert_same_files(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        assert np.array_equal(_bits(la[k]), _bits(lb[k])), k
    forms = [sorted((t.path, t.form, t.nnz) for t in io.stored_info(p)) for p in (a, b)]
    assert forms[0] == forms[1]


def _both(tmp_path, src, cfg, **kw):
    whole = stream.split_checkpoint(
        src, tmp_path / "whole.safetensors", cfg, overwrite=True, block_bytes=None, **kw
    )
    blocked = stream.split_checkpoint(
        src, tmp_path / "blocked.safetensors", cfg, overwrite=True, block_bytes=100, **kw
    )
    return whole, blocked


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("method", ["balance", "clip"])
def test_blocked_split_equals_the_whole_kernel_split(tmp_path, dtype, method):
    src = io.save(_tree(dtype), tmp_path / "src.safetensors")
    for thr, below in itertools.product((1.0, js.Relative(0.5), 1e4), (0.25, 0.0)):
        cfg = js.SplitConfig(layers=["**"], threshold=thr, method=method, weights=WEIGHTS)
        whole, blocked = _both(tmp_path, src, cfg, sparse_below=below)
        _assert_same_files(tmp_path / "whole.safetensors", tmp_path / "blocked.safetensors")
        assert blocked.report == whole.report and blocked.n_tensors == whole.n_tensors
        merged = js.merge_params(io.load(tmp_path / "blocked.safetensors"))
        src_leaves, merged_leaves = dict(leaf_items(io.load(src))), dict(leaf_items(merged))
        assert all(
            np.array_equal(_bits(src_leaves[k]), _bits(merged_leaves[k])) for k in src_leaves
        )
        load_file(str(tmp_path / "blocked.safetensors"))  # the safetensors library reads it
    assert {p.action for p in blocked.report.layers} == {"skip"}  # 1e4: nothing splits


def test_twin_switches_to_dense_mid_kernel_and_keeps_the_bits(tmp_path):
    w = np.full((64, 32), 0.5, np.float32)
    w[40:] = 3.0  # the first blocks' twins are sparse, then it cannot stay sparse
    src = io.save({"d": {"kernel": w}}, tmp_path / "src.safetensors")
    cfg = js.SplitConfig(layers=["d"], threshold=1.0, method="balance")
    whole, blocked = _both(tmp_path, src, cfg, sparse_below=0.25)
    _assert_same_files(tmp_path / "whole.safetensors", tmp_path / "blocked.safetensors")
    assert [t.form for t in io.stored_info(tmp_path / "blocked.safetensors")] == ["dense"] * 2
    w[...], w[50, 3] = 0.5, 3.0  # one value splits: the twin stays a sparse record
    src = io.save({"d": {"kernel": w}}, tmp_path / "src.safetensors", overwrite=True)
    _both(tmp_path, src, cfg, sparse_below=0.25)
    _assert_same_files(tmp_path / "whole.safetensors", tmp_path / "blocked.safetensors")
    assert "sparse" in {t.form for t in io.stored_info(tmp_path / "blocked.safetensors")}


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_nonfinite_kernels_raise_the_same_error_or_split_alike(tmp_path, dtype):
    w = _w(np.random.default_rng(1), (30, 30), dtype)
    w.reshape(-1)[[5, 600]] = [np.inf, np.nan]
    src = io.save({"d": {"kernel": w, "bias": np.zeros(30, dtype)}}, tmp_path / "src.safetensors")
    out = io.save({"old": np.ones(2)}, tmp_path / "blocked.safetensors")
    before = out.read_bytes()
    cfg = js.SplitConfig(layers=["d"], threshold=js.Relative(0.5), method="clip")
    msgs = []
    for bb in (None, 100):
        with pytest.raises(js.NonFiniteError, match="holds 2 non-finite") as e:
            stream.split_checkpoint(src, out, cfg, overwrite=True, block_bytes=bb)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and out.read_bytes() == before  # the old output intact
    cfg = js.SplitConfig(
        layers=["d"], threshold=js.Relative(0.5), method="clip", allow_nonfinite=True
    )
    whole, blocked = _both(tmp_path, src, cfg)
    assert blocked.report == whole.report
    la, lb = _leaves(tmp_path / "whole.safetensors"), _leaves(tmp_path / "blocked.safetensors")
    for k in la:
        nan = np.isnan(la[k].astype(np.float32))  # NaN payloads: either may canonicalise
        assert np.array_equal(nan, np.isnan(lb[k].astype(np.float32)))
        assert np.array_equal(_bits(la[k])[~nan], _bits(lb[k])[~nan])


def test_blocked_kernels_are_only_ever_read_in_blocks(tmp_path, monkeypatch):
    w = _w(np.random.default_rng(2), (50, 40), np.float32)
    src = io.save(
        {"d": {"kernel": w, "bias": np.ones(40, np.float32)}}, tmp_path / "src.safetensors"
    )
    reads, whole_reads = [], []
    real_flat, real_many = io.CheckpointReader.read_flat, io.CheckpointReader.read_many

    def read_flat(self, keys, start, stop):
        reads.append(stop - start)
        return real_flat(self, keys, start, stop)

    def read_many(self, many, dense=True):
        whole_reads.extend(tuple(k) for k in many)
        return real_many(self, many, dense)

    monkeypatch.setattr(io.CheckpointReader, "read_flat", read_flat)
    monkeypatch.setattr(io.CheckpointReader, "read_many", read_many)
    cfg = js.SplitConfig(layers=["d"], threshold=js.Relative(0.5), method="clip")
    stream.split_checkpoint(src, tmp_path / "out.safetensors", cfg, block_bytes=400)
    assert ("d", "kernel") not in whole_reads and ("d", "bias") in whole_reads
    assert max(reads) == 100 and sum(reads) == 2 * w.size  # the max pass, then the split


def test_non_elementwise_or_other_formats_take_the_whole_path(tmp_path, monkeypatch):
    src = io.save(_tree(np.float32), tmp_path / "src.safetensors")
    monkeypatch.setattr(io.CheckpointReader, "read_flat", lambda *a: pytest.fail("read in blocks"))
    for cfg, dst in [
        (
            js.SplitConfig(layers=["a"], threshold=js.Relative(0.5, per_channel=True)),
            "o.safetensors",
        ),
        (js.SplitConfig(layers=["a"], threshold=0.5, method="random"), "o.safetensors"),
        (
            js.SplitConfig(layers=["a"], threshold=0.5, method="balance", branches=4),
            "o.safetensors",
        ),
        (js.SplitConfig(layers=["a"], threshold=0.5), "o.npz"),
        (
            js.SplitConfig(layers=["a"], threshold=js.Auto(js.QuantSpec(bits=4)), method="clip"),
            "o.safetensors",
        ),
    ]:
        stream.split_checkpoint(src, tmp_path / dst, cfg, overwrite=True, block_bytes=100)
    npz = io.save(_tree(np.float32), tmp_path / "src.npz")
    stream.split_checkpoint(
        npz,
        tmp_path / "n.safetensors",
        js.SplitConfig(layers=["a"], threshold=0.5),
        block_bytes=100,
    )


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "4M"])
def test_block_bytes_must_be_a_positive_int_or_none(tmp_path, bad):
    src = io.save(_tree(np.float32), tmp_path / "src.safetensors")
    cfg = js.SplitConfig(layers=["a"], threshold=0.5)
    with pytest.raises(ValueError, match=r"block_bytes must be a positive int .* got"):
        stream.split_checkpoint(src, tmp_path / "o.safetensors", cfg, block_bytes=bad)
    assert not (tmp_path / "o.safetensors").exists()


def test_read_flat_reads_ranges_of_dense_safetensors_only(tmp_path):
    w = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    with io.CheckpointReader(io.save({"w": w}, tmp_path / "c.safetensors")) as r:
        assert r.read_flat(("w",), 5, 9).tolist() == [5.0, 6.0, 7.0, 8.0]
        assert r.read_flat(("w",), 3, 3).size == 0
        for bad in [(-1, 2), (4, 3), (0, 13)]:
            with pytest.raises(ValueError, match=r"range \[.*\) is not within the 12 elements"):
                r.read_flat(("w",), *bad)
    with io.CheckpointReader(io.save({"w": w}, tmp_path / "c.npz")) as r:
        assert not r.flat_readable(("w",))
        with pytest.raises(ValueError, match="read_flat reads dense safetensors tensors"):
            r.read_flat(("w",), 0, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("method", ["balance", "clip"])
def test_chunked_blocks_match_the_fused_program(dtype, method):
    w = _w(np.random.default_rng(3), (7, 131), dtype).reshape(-1)
    w[[9, 99]] = [np.inf, np.nan]
    thr = chunked.threshold(lambda a, b: w[a:b], w.size, 50, "relative", 0.3)
    with x64(w.dtype):
        want_thr = programs.threshold(jnp.asarray(w), 0.3, kind="relative")
        (c1, c2), counts, _ = programs.fused(
            jnp.asarray(w), thr, None, kind="absolute", method=method
        )
    assert np.float32(thr) == np.float32(want_thr)
    got = list(chunked.split_blocks(lambda a, b: w[a:b], w.size, 50, thr, method))
    assert [g[0] for g in got] == list(range(0, w.size, 50))
    w1 = np.concatenate([g[1] for g in got])
    w2 = np.concatenate([g[2] for g in got])
    nan = np.isnan(w.astype(np.float32))
    assert (
        np.array_equal(_bits(w1)[~nan], _bits(c1)[~nan])
        and np.isnan(w1[nan].astype(np.float32)).all()
    )
    assert np.array_equal(_bits(w2), _bits(c2))
    assert [sum(g[3] for g in got), sum(g[4] for g in got)] == np.asarray(counts).tolist()


def test_chunked_rejects_what_it_cannot_split():
    w = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="block must be a positive number of elements, got 0"):
        list(chunked.blocks(4, 0))
    with pytest.raises(ValueError, match=r"kind must be one of \('absolute', 'relative'\)"):
        chunked.threshold(lambda a, b: w[a:b], 4, 2, "sigma", 1.0)
    with pytest.raises(ValueError, match=r"method must be one of \('balance', 'clip'\)"):
        list(chunked.split_blocks(lambda a, b: w[a:b], 4, 2, 1.0, "random"))
    assert not chunked.supports("relative", True, "clip", 2)
    assert not chunked.supports("absolute", False, "balance", 4)


def test_streamed_whole_path_keeps_float64_kernels(tmp_path):
    w = np.random.default_rng(4).standard_normal((8, 8)) * 3  # float64
    src = io.save({"d": {"kernel": w}}, tmp_path / "src.safetensors")
    rep = stream.split_checkpoint(
        src,
        tmp_path / "o.safetensors",
        js.SplitConfig(layers=["d"], threshold=1.0),
        block_bytes=None,
    )
    out = io.load(tmp_path / "o.safetensors")
    assert (
        out["d"]["branch_0"]["kernel"].dtype == np.float64
        and rep.report.layers[0].dtype == "float64"
    )
    assert np.array_equal(js.merge_params(out)["d"]["kernel"], w)


def test_cli_block_mb_chooses_blocks_or_whole_layers(tmp_path, capsys, monkeypatch):
    from cli_helpers import assert_cli_error, run_cli

    w = _w(np.random.default_rng(5), (600, 1000), np.float32)  # 2.3 MiB: past --block-mb 1
    src = io.save({"d": {"kernel": w}}, tmp_path / "src.safetensors")
    seen = []
    real = stream.split_checkpoint
    monkeypatch.setattr(
        stream, "split_checkpoint", lambda *a, **k: seen.append(k["block_bytes"]) or real(*a, **k)
    )
    args = ["split", src, None, "--layers", "d", "--threshold", "rel:0.5", "--method", "clip"]
    for mb, want in [("1", 1 << 20), ("0", None)]:
        args[2] = tmp_path / f"o{mb}.safetensors"
        assert run_cli(capsys, *args, "--block-mb", mb)[0] == 0
        assert seen[-1] == want
    _assert_same_files(tmp_path / "o1.safetensors", tmp_path / "o0.safetensors")
    assert run_cli(capsys, *args[:2], tmp_path / "o4.safetensors", *args[3:])[0] == 0
    assert seen[-1] == stream.DEFAULT_BLOCK_BYTES
    for bad in ["-1", "2.5", "x"]:
        result = run_cli(
            capsys, *args[:2], tmp_path / "bad.safetensors", *args[3:], "--block-mb", bad
        )
        assert_cli_error(
            result, 2, rf"--block-mb: must be a whole number of MiB >= 0, got '{re.escape(bad)}'"
        )
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("method", ["clip"])
def test_tree_budget_pass_two_splits_picked_layers_in_blocks(tmp_path, monkeypatch, dtype, method):
    src = io.save(_tree(dtype), tmp_path / "src.safetensors")
    auto = js.Auto(js.QuantSpec(bits=4), max_extra=0.05, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=auto, method=method, weights=WEIGHTS)
    blocks = []
    real = io.CheckpointReader.read_flat
    monkeypatch.setattr(
        io.CheckpointReader,
        "read_flat",
        lambda self, keys, a, b: blocks.append(keys) or real(self, keys, a, b),
    )
    whole, blocked = _both(tmp_path, src, cfg)
    _assert_same_files(tmp_path / "whole.safetensors", tmp_path / "blocked.safetensors")
    assert blocked.report == whole.report
    _, want = js.split_with_report(io.load(src), cfg)
    assert blocked.report == want
    picked = {p.path for p in want.layers if p.auto and p.auto.method in chunked.METHODS}
    assert {"/".join(k[1:-1]) if k[-1] == "kernel" else "/".join(k[1:]) for k in blocks} == {
        p for p in picked if p != "small"
    }
