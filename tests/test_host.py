"""The host split (jaxsplit.host) gives the compiled program's bits, and runs only where it may."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsplit import SplitConfig, host, merge_params, programs, split, split_params
from jaxsplit.split import split_with_report
from jaxsplit.tree import x64

DTYPES = {
    "balance": [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
    "clip": [np.float32, np.float64],
}
CASES = [(m, d) for m, ds in DTYPES.items() for d in ds]


def _bits(a):
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _specials(dtype) -> np.ndarray:
    """NaNs (negative, with payloads), infinities, the extremes, subnormals, signed zeros."""
    fi = ml_dtypes.finfo(dtype)
    big, tiny = float(fi.max), float(fi.tiny)
    vals = [0.0, -0.0, np.inf, -np.inf, big, -big, tiny, -tiny, 3 * tiny,
            float(fi.smallest_subnormal), 1.0, -1.0, 2.0]  # fmt: skip
    out = np.array(vals, np.float64).astype(dtype)
    uint = np.dtype(f"u{out.dtype.itemsize}")
    mant = {2: 0x3FF, 4: 0x7FFFFF, 8: 0xFFFFFFFFFFFFF}[out.dtype.itemsize]
    if dtype == ml_dtypes.bfloat16:
        mant = 0x7F
    inf = int(np.array(np.inf, dtype).view(uint))
    sign = 1 << (8 * out.dtype.itemsize - 1)
    nans = np.array([inf | 1, inf | mant, sign | inf | 1, inf | (mant + 1) // 2], uint)
    return np.concatenate([out, nans.view(out.dtype)])


def _kernel(dtype, size, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(2, size=size) * scale).astype(dtype)
    sp = _specials(dtype)
    w[rng.choice(size, sp.size, replace=False)] = sp
    return w


def _compiled(w, t, method):
    with x64(w.dtype):
        return programs.fused(jnp.asarray(w), t, None, kind="absolute", method=method)


def _host(w, t, method):
    [out] = host.split([w], [t], method)
    return out


def _assert_same(w, t, method):
    """Same bits as the compiled program, except NaN payloads: XLA on CPU computes bfloat16
    in float32 and returns the canonical NaN; the host path keeps the kernel's NaN bits."""
    (c1, c2), cn, ct = _compiled(w, t, method)
    (h1, h2), hn, ht = _host(w, t, method)
    nan = np.isnan(w)
    assert np.array_equal(_bits(h1)[~nan], _bits(c1)[~nan])
    assert np.array_equal(_bits(h1)[nan], _bits(w)[nan]) and np.isnan(np.asarray(c1)[nan]).all()
    assert np.array_equal(_bits(h2), _bits(c2))
    assert hn.tolist() == np.asarray(cn).tolist()
    assert float(ht) == float(ct)
    assert h1.dtype == c1.dtype and h1.shape == w.shape and isinstance(h1, jax.Array)


@pytest.mark.parametrize(("method", "dtype"), CASES)
def test_host_split_is_bit_identical_to_the_compiled_program(method, dtype):
    # 2.3 blocks (a partial last block); heavy tails, so values split at every threshold
    w = _kernel(dtype, 2 * host.BLOCK + 4099)
    for t in (1.0, 0.37, 2.5, 1e-3):
        assert host.supports(w, t, kind="absolute", axis=None, method=method, branches=2)
        _assert_same(w, t, method)
        _assert_same(w.reshape(-1)[:12288].reshape(3, 4, 1024), t, method)


@pytest.mark.parametrize(("method", "dtype"), CASES)
def test_fast_and_slow_blocks_agree_on_any_thread_count(method, dtype):
    # specials only in block 1 of 3.1: blocks 0 and 2 take the integer fast path, block 1
    # the NaN/inf path; every thread count gives the compiled program's bits and counts
    rng = np.random.default_rng(3)
    w = (rng.standard_t(2, size=3 * host.BLOCK + 777) * 0.8).astype(dtype)
    sp = _specials(dtype)
    w[host.BLOCK + rng.choice(host.BLOCK, sp.size, replace=False)] = sp
    assert (
        not (~np.isfinite(w[: host.BLOCK])).any() and not (~np.isfinite(w[2 * host.BLOCK :])).any()
    )
    _assert_same(w, 0.9, method)
    runs = [host.split([w, w[::-1].copy()], [0.9, 1.7], method, workers=k) for k in (1, 2, 5)]
    for run in runs[1:]:
        for ((a1, a2), an, _), ((b1, b2), bn, _) in zip(runs[0], run, strict=True):
            assert np.array_equal(_bits(a1), _bits(b1)) and np.array_equal(_bits(a2), _bits(b2))
            assert an.tolist() == bn.tolist()


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_host_split_rejects_bad_worker_counts(workers):
    w = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"workers must be a positive int or None.*got"):
        host.split([w], [1.0], "balance", workers=workers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_clip_matches_at_every_scale(dtype):
    # thresholds from the smallest the host path takes to the huge: excesses of every size
    for scale, t in ((1e-20, 3e-21), (1.0, 1e-7), (1e30, 2e29), (1e30, 1.0)):
        _assert_same(_kernel(dtype, 5000, seed=1, scale=scale), t, "clip")


@settings(max_examples=40, deadline=None)
@given(
    w=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(width=32)),
    t=st.floats(float(np.float32(1e-30)), float(np.float32(1e30)), width=32),
    method=st.sampled_from(["balance", "clip"]),
)
def test_host_split_matches_on_any_float32(w, t, method):
    if host.supports(w, t, kind="absolute", axis=None, method=method, branches=2):
        _assert_same(w, t, method)


def test_supports_only_what_the_host_arithmetic_covers():
    w = np.ones((8, 8), np.float32)

    def ok(x=w, value=1.0, kind="absolute", axis=None, method="balance", branches=2):
        return host.supports(x, value, kind=kind, axis=axis, method=method, branches=branches)

    assert ok() and ok(method="clip") and ok(jnp.asarray(w))
    assert not ok(kind="relative")  # needs a statistic first
    assert not ok(axis=1)  # per-channel thresholds
    assert not ok(value=np.ones(8))
    assert not ok(method="random") and not ok(method="grid")
    assert not ok(branches=4)
    assert not ok(w.astype(ml_dtypes.bfloat16), method="clip")  # clip: float32/64 only
    assert not ok(np.ones((0, 3), np.float32))
    # thresholds where XLA on CPU flushes subnormal intermediates: the compiled path
    assert not ok(value=0.0) and not ok(value=1e-38) and not ok(value=np.inf)
    assert ok(value=3e-38) and not ok(value=3e-38, method="clip") and ok(value=1e-30, method="clip")
    deleted = jnp.asarray(w)
    deleted.delete()
    assert not ok(deleted)

    seen = []
    jax.jit(lambda x: seen.append(ok(x)) or x)(w)
    assert seen == [False]  # a tracer: always the compiled program


@pytest.mark.parametrize("method", ["balance", "clip"])
def test_split_params_takes_the_host_path_with_the_same_result(method):
    w = _kernel(np.float32, 5000).reshape(50, 100)
    w64 = _kernel(np.float64, 600, seed=3).reshape(20, 30)
    tree = {"a": {"kernel": w, "bias": np.zeros(100, np.float32)}, "b": {"kernel": jnp.asarray(w)},
            "c": {"kernel": w64}}  # fmt: skip
    cfg = SplitConfig(layers=["*"], threshold=1.0, method=method, allow_nonfinite=True)
    out, rep = split_with_report(tree, cfg)
    for name, src in (("a", w), ("b", w), ("c", w64)):
        (c1, c2), cn, _ = _compiled(src, 1.0, method)
        got = out[name]
        assert np.array_equal(_bits(got["branch_0"]["kernel"]), _bits(c1))
        assert np.array_equal(_bits(got["branch_1"]["kernel"]), _bits(c2))
        assert got["branch_0"]["kernel"].dtype == src.dtype
        assert {p.path: p.n_split for p in rep.layers}[name] == int(cn[0])
    assert out["a"]["branch_0"]["bias"] is tree["a"]["bias"]
    assert out["b"]["branch_0"]["kernel"].sharding == tree["b"]["kernel"].sharding
    back = merge_params(out)
    for name in ("a", "b", "c"):
        assert np.array_equal(_bits(back[name]["kernel"]), _bits(tree[name]["kernel"]))
    assert np.array_equal(_bits(tree["a"]["kernel"]), _bits(w))  # nothing mutated


@pytest.mark.parametrize("method", ["balance", "clip"])
def test_split_params_routes_only_host_methods_to_the_host(monkeypatch, method):
    calls = []
    real = host.split
    monkeypatch.setattr(host, "MIN_BYTES", 0)  # every concrete kernel qualifies by size
    monkeypatch.setattr(host, "split", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    w = _kernel(np.float32, 5000).reshape(50, 100)
    cfg = SplitConfig(layers=["*"], threshold=1.0, method=method, allow_nonfinite=True)
    out = split_params({"a": {"kernel": w}}, cfg)
    assert calls == ([method] if method in split.HOST_METHODS else [])
    (c1, c2), _, _ = _compiled(w, 1.0, method)
    assert np.array_equal(_bits(out["a"]["branch_0"]["kernel"]), _bits(c1))
    assert np.array_equal(_bits(out["a"]["branch_1"]["kernel"]), _bits(c2))


@pytest.mark.parametrize("dtype", DTYPES["balance"])
def test_relative_thresholds_take_the_host_path_with_the_compiled_bits(monkeypatch, dtype):
    from jaxsplit import Relative

    calls = []
    real = host.split
    monkeypatch.setattr(host, "MIN_BYTES", 0)
    monkeypatch.setattr(host, "split", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    w = _kernel(dtype, 6000, seed=2).reshape(60, 100)  # NaN/inf included: stats skip them
    cfg = SplitConfig(layers=["*"], threshold=Relative(0.3), method="balance", allow_nonfinite=True)
    with x64(w.dtype):
        tree = {"a": {"kernel": w}, "b": {"kernel": jnp.asarray(w)}}  # numpy, and on device
    out, rep = split_with_report(tree, cfg)
    with np.errstate(over="ignore", invalid="ignore"):  # the statistic is in float32 (max: inf)
        a = np.abs(w.astype(np.float32))
    t = np.float32(0.3) * a[np.isfinite(a)].max()
    assert calls == [[float(t), float(t)]]  # both kernels, at the resolved float32 threshold
    with x64(w.dtype):
        (c1, c2), cn, ct = programs.fused(jnp.asarray(w), 0.3, None, kind="relative",
                                          method="balance")  # fmt: skip
    nan = np.isnan(w)
    for name in ("a", "b"):
        b0, b1 = (out[name][f"branch_{i}"]["kernel"] for i in (0, 1))
        assert np.array_equal(_bits(b0)[~nan], _bits(c1)[~nan])
        assert np.array_equal(_bits(b1), _bits(c2))
    assert [lay.n_split for lay in rep.layers] == [int(cn[0])] * 2
    assert [lay.threshold for lay in rep.layers] == [float(ct)] * 2


def test_per_channel_and_other_rules_stay_compiled(monkeypatch):
    from jaxsplit import Relative, Sigma

    calls = []
    monkeypatch.setattr(host, "MIN_BYTES", 0)
    monkeypatch.setattr(host, "split", lambda *a, **k: calls.append(a[1]))
    w = _kernel(np.float32, 6000, seed=2).reshape(60, 100)
    for thr in (Relative(0.3, per_channel=True), Sigma(2.0)):
        cfg = SplitConfig(layers=["*"], threshold=thr, method="balance", allow_nonfinite=True)
        split_params({"a": {"kernel": w}}, cfg)
    assert calls == []


def test_huge_page_malloc_sends_split_params_to_the_compiled_program(monkeypatch):
    calls = []
    real = host.split
    monkeypatch.setattr(host, "MIN_BYTES", 0)
    monkeypatch.setattr(host, "split", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    w = _kernel(np.float32, 5000).reshape(50, 100)
    cfg = SplitConfig(layers=["*"], threshold=1.0, method="balance", allow_nonfinite=True)
    outs = []
    for huge in (False, True):
        monkeypatch.setattr(host, "malloc_huge_pages", lambda huge=huge: huge)
        outs.append(split_params({"a": {"kernel": w}}, cfg))
    assert calls == ["balance"]  # only the process without huge-page malloc took the host
    a, b = (jax.tree.leaves(o) for o in outs)
    assert all(np.array_equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


def test_hugetlb_tunable_reads_only_glibc_malloc_hugetlb_1():
    env = b"PATH=/bin\0GLIBC_TUNABLES=%s\0LANG=C\0"
    assert host.hugetlb_tunable(env % b"glibc.malloc.hugetlb=1")
    assert host.hugetlb_tunable(env % b"glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert not host.hugetlb_tunable(env % b"glibc.malloc.hugetlb=0")
    assert not host.hugetlb_tunable(env % b"glibc.malloc.hugetlb=2")  # hugetlbfs: reserved only
    assert not host.hugetlb_tunable(env % b"glibc.malloc.arena_max=2")
    assert not host.hugetlb_tunable(b"PATH=/bin\0HUGETLB=glibc.malloc.hugetlb=1\0")
    assert not host.hugetlb_tunable(b"")


def test_split_params_under_jit_uses_the_compiled_program_and_agrees():
    w = _kernel(np.float32, 4000).reshape(40, 100)
    w = np.where(np.isfinite(w), w, 0).astype(np.float32)
    tree = {"d": {"kernel": w}}
    cfg = SplitConfig(layers=["d"], threshold=1.0, method="clip")
    eager = split_params(tree, cfg)
    traced = jax.jit(lambda p: split_params(p, cfg))(tree)
    for b in ("branch_0", "branch_1"):
        assert np.array_equal(_bits(eager["d"][b]["kernel"]), _bits(traced["d"][b]["kernel"]))


def test_nonfinite_kernels_still_raise_on_the_host_path():
    w = np.array([[0.5, np.nan, 3.0]], np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        split_params({"d": {"kernel": w}}, SplitConfig(layers=["d"], threshold=1.0))


@pytest.mark.parametrize("method", ["clip", "balance"])
def test_numpy_kernels_read_in_place_are_never_written_or_kept(method):
    # a 64-byte aligned numpy kernel is read by the compiled program without a copy
    # (device_put may_alias); the split must neither write it nor keep a view of it
    raw = np.empty(4000 * 4 + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    w = raw[off : off + 16000].view(np.float32).reshape(40, 100)
    w[...] = _kernel(np.float32, 4000, seed=5).reshape(40, 100)
    w[~np.isfinite(w)] = 0.0
    keep = w.copy()
    cfg = SplitConfig(layers=["*"], threshold=0.8, method=method)
    out = split_params({"a": {"kernel": w}}, cfg)
    assert np.array_equal(_bits(w), _bits(keep))
    b0, b1 = (np.asarray(out["a"][f"branch_{i}"]["kernel"]).copy() for i in (0, 1))
    w[...] = 7.0  # the caller reuses its buffer: the branches must not change
    assert np.array_equal(_bits(out["a"]["branch_0"]["kernel"]), _bits(b0))
    assert np.array_equal(_bits(out["a"]["branch_1"]["kernel"]), _bits(b1))
    assert np.array_equal(_bits(merge_params(out)["a"]["kernel"]), _bits(keep))


@pytest.mark.parametrize("method", ["balance", "clip"])
def test_host_split_of_a_huge_page_sized_kernel_matches(method):
    w = _kernel(np.float32, 1100 * 1024, seed=5).reshape(1100, 1024)  # 4.3 MiB: numpy madvises it
    _assert_same(w, 1.0, method)
    [((w1, w2), _, _)] = host.split([w], [1.0], method)
    assert w1.unsafe_buffer_pointer() % 64 == 0 and w2.unsafe_buffer_pointer() % 64 == 0
