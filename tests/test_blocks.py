"""Issue 13: `jaxsplit.blocks`, the blocked `compensate`, `kernels.elementwise` and the blocked
`measure` match whole-array runs (bit for bit, or up to the order of float sums)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import blocks, kernels, quant
from jaxsplit.measure import measure, measure_candidate, measure_split


def _bits(x):
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return x
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _same(a, b):
    return all(np.array_equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


#: A kernel of more than ``16 * BLOCK`` values runs in ``ceil(n / BLOCK)`` blocks; under that
#: size in 16. The tests reach the first case at a small size with ``BLOCK`` set smaller.
MANY = "25 blocks"


@pytest.fixture
def many(monkeypatch):
    """``blocks.BLOCK = 4096``: 100_000 values run in 25 blocks. The jit caches are cleared
    around it (they may hold programs traced under the other ``BLOCK``)."""
    jax.clear_caches()
    monkeypatch.setattr(blocks, "BLOCK", 4096)
    assert blocks._count(100_000) == 25
    yield 100_000
    jax.clear_caches()


def _size(n, request):
    return request.getfixturevalue("many") if n == MANY else n


@pytest.mark.parametrize("n", [2 * blocks.BLOCK, 3 * blocks.BLOCK + 7, 65_792, 8191, 100, MANY])
def test_in_blocks_matches_the_whole_array_run(n, request):
    n = _size(n, request)
    x = jnp.asarray(np.random.default_rng(n).standard_normal(n).astype("f4"))
    y = jnp.flip(x)

    def f(a, b):
        return jnp.round(a / 0.3) * b, a > b

    blocked = jax.jit(lambda a, b: blocks.in_blocks(f, (a, b)))(x, y)
    whole = jax.jit(lambda a, b: blocks.in_blocks(f, (a, b), blocked=False))(x, y)
    assert _same(blocked, whole)
    assert blocked[0].shape == (n,) and blocked[1].dtype == jnp.bool_


@pytest.mark.parametrize("n", [3 * blocks.BLOCK + 7, 65_792, 100])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extremes_in_blocks_are_the_exact_min_and_max(n, dtype):
    x = np.random.default_rng(n).uniform(-1, 1, n).astype("f4")
    x[n // 2] = -7.5  # the largest magnitude, negative
    x[n // 3] = 3.25
    x = jnp.asarray(x, dtype)
    got = blocks.extremes_in_blocks(lambda a: (a * 2, a - a, jnp.abs(a) + 1), (x,))
    assert [(float(g.min()), float(g.max())) for g in got] == [(-15.0, 6.5), (0.0, 0.0), (0.0, 8.5)]
    assert got[0].dtype == dtype and (got[0].shape[0] > 2) == (n > 8191)
    y = x.at[0].set(-0.0).at[1].set(1e-40)  # zeros and subnormals do not disturb it
    (e,) = blocks.extremes_in_blocks(lambda a: (a,), (y,))
    assert float(jnp.max(jnp.abs(e))) == float(jnp.max(jnp.abs(y), initial=0))
    for spec in (quant.QuantSpec(bits=4), quant.QuantSpec(bits=8, symmetric=False)):
        assert _same(quant.qparams(e, spec), quant.qparams(y, spec))  # the kernel's own


@pytest.mark.parametrize("n", [3 * blocks.BLOCK + 7, 65_792, 100])
def test_sum_in_blocks_counts_exactly_and_sums_closely(n):
    x = jnp.asarray(np.random.default_rng(n).standard_normal(n).astype("f4"))

    def f(a):
        return {"sq": jnp.sum(a * a), "pos": jnp.count_nonzero(a > 0), "n": jnp.count_nonzero(a)}

    got = jax.jit(lambda a: blocks.sum_in_blocks(f, (a,)))(x)
    whole = blocks.sum_in_blocks(f, (x,), blocked=False)
    assert int(got["pos"]) == int(whole["pos"]) == int(np.sum(np.asarray(x) > 0))
    assert int(got["n"]) == n  # the padding's zeros count nothing
    np.testing.assert_allclose(float(got["sq"]), float(whole["sq"]), rtol=1e-5)


def test_blocked_is_static_and_follows_the_rule():
    assert not blocks.blocked((64, 64))  # fewer than 8192 values: whole
    assert blocks.blocked((4096, 4096)) == (
        jax.default_backend() == "cpu" and jax.device_count() == 1
    )


def test_in_blocks_keeps_the_shape():
    x = jnp.ones((4, blocks.BLOCK // 2, 2))
    (out,) = blocks.in_blocks(lambda a: (a * 2,), (x,))
    assert out.shape == x.shape and bool(jnp.all(out == 2))


def _whole(monkeypatch):
    """``jaxsplit.blocks`` forced to the whole-array runs (the reference)."""
    for name in ("in_blocks", "extremes_in_blocks", "sum_in_blocks"):
        run = getattr(blocks, name)
        monkeypatch.setattr(blocks, name, lambda f, a, blocked=True, run=run: run(f, a, False))


@pytest.mark.parametrize(
    "bits, dtype, narrow",
    [
        (3, jnp.float32, True),
        (4, jnp.float32, True),
        (4, jnp.bfloat16, True),
        (4, jnp.float32, False),
        (6, jnp.bfloat16, False),
        (8, jnp.float32, True),
    ],
)
def test_blocked_compensate_is_bit_identical_to_the_whole_array_one(
    bits, dtype, narrow, monkeypatch
):
    rng = np.random.default_rng(bits)
    n = 16 * 4096 + 1000  # 16 blocks, the last one padded
    w = (rng.standard_t(3, size=n) * 0.02).astype("f4")
    w[:6] = [0.0, -0.0, 1e-40, -1e-39, 0.5, -0.7]  # zeros, subnormals, the maxima
    t = float(np.quantile(np.abs(w), 0.9))
    w[6:8] = [t, -t]  # exactly at the threshold: not split
    w = jnp.asarray(w, dtype)
    spec = js.QuantSpec(bits=bits, narrow_range=narrow)
    cal = jnp.asarray(rng.uniform(0.1, 2.0, size=n).astype("f4"))  # diagonal: decoupled
    got = [jax.jit(lambda w, c=c: kernels.compensate(w, t, spec, c))(w) for c in (None, cal)]
    _whole(monkeypatch)
    want = [jax.jit(lambda w, c=c: kernels.compensate(w, t, spec, c))(w) for c in (None, cal)]
    for g, r in zip(got, want, strict=True):
        assert _same(g, r)
        assert np.array_equal(np.asarray(kernels.branch_sum(g)), np.asarray(w))
        assert int(jnp.count_nonzero(g[1])) > 0


@pytest.mark.parametrize("shape", [(512, 512), (3, 3, 64, 128), (257, 63)])
def test_blocked_compensate_keeps_the_kernel_shape(shape, monkeypatch):
    rng = np.random.default_rng(1)
    w = jnp.asarray((rng.standard_t(3, size=shape) * 0.02).astype("f4"))
    t = float(np.quantile(np.abs(np.asarray(w)), 0.95))
    spec = js.QuantSpec(bits=4)
    got = kernels.compensate(w, t, spec)
    assert got[0].shape == got[1].shape == w.shape
    _whole(monkeypatch)
    assert _same(got, kernels.compensate(w, t, spec))


_SPECS = [
    quant.QuantSpec(bits=4),
    quant.QuantSpec(bits=8, narrow_range=False),
    quant.QuantSpec(bits=4, symmetric=False),
]
_GRID_ONLY = ("grid", "snap", "compensate")


def _cases():
    for spec in _SPECS:
        for method in kernels.METHODS:
            if method == "random" or (method in _GRID_ONLY and not spec.symmetric):
                continue
            for branches in (2, 4) if method == "balance" else (2,):
                yield spec, method, branches


def _kernel(n, dtype, seed=0, subnormal=True):
    w = (np.random.default_rng(seed).standard_t(3, size=n) * 0.02).astype("f4")
    # zeros, a subnormal, the extremes (a measurement may count a subnormal as zero: XLA's
    # CPU flushes computed subnormals to zero, so the measure tests leave it out)
    w[:5] = [0.0, -0.0, 1e-40 if subnormal else 1e-3, 0.9, -0.8]
    return jnp.asarray(w, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n", [MANY, 65_792, 300])
def test_elementwise_split_in_blocks_is_split_bit_for_bit(n, dtype, request):
    n = _size(n, request)
    w = _kernel(n, dtype)
    t = jnp.float32(0.03)
    for spec, method, branches in _cases():
        args = dict(branches=branches, spec=spec)
        want = jax.jit(lambda w, m=method, a=args: kernels.split(m, w, t, **a))(w)
        got = jax.jit(
            lambda w, m=method, a=args: blocks.in_blocks(kernels.elementwise(m, w, t, **a), (w,))
        )(w)
        assert _same(got, want), (method, branches, spec)


def test_elementwise_is_none_where_the_split_is_not_elementwise():
    w = _kernel(1000, jnp.float32)
    spec = quant.QuantSpec(bits=4)
    key = jax.random.key(0)
    assert kernels.elementwise("random", w, 0.1) is None  # shares hash the position
    assert kernels.elementwise("clip", w, jnp.full((1000,), 0.1)) is None  # not a scalar
    per_channel = quant.QuantSpec(bits=4, granularity="per_channel", axis=0)
    w2 = w.reshape(100, 10)
    assert kernels.elementwise("grid", w2, 0.1, spec=per_channel) is None
    assert kernels.elementwise("compensate", w2, 0.1, spec=spec, calibration=jnp.eye(100)) is None
    assert kernels.elementwise("compensate", w2, 0.1, spec=spec, calibration=jnp.ones(100))
    with pytest.raises(ValueError, match="needs spec"):
        kernels.elementwise("grid", w, 0.1)
    with pytest.raises(ValueError, match="branches=4 needs method 'balance'"):
        kernels.elementwise("clip", w, 0.1, branches=4)
    assert kernels.split("random", w, 0.1, key)[0].shape == w.shape


def _reference(w, bs, spec, twin_spec=None):
    """The figures in numpy (float64 sums): ``(mse, naive Widrow, correlated Widrow, extra,
    twin non-zeros)``."""
    specs = (spec,) + (twin_spec or spec,) * (len(bs) - 1)
    wf = np.asarray(w.astype(jnp.float32), np.float64)
    vals = [np.asarray(b.astype(jnp.float32)) for b in bs]
    rec = sum(np.asarray(quant.quantize(b.astype(jnp.float32), s), np.float64)
              for b, s in zip(bs, specs, strict=True))  # fmt: skip
    scales = [float(quant.scale(b.astype(jnp.float32), s)) for b, s in zip(bs, specs, strict=True)]
    nz = [v != 0 for v in vals]
    naive = sum(np.sum(z) * s * s for z, s in zip(nz, scales, strict=True)) / w.size / 12
    same = [
        sum((vals[j] == vals[i]) & (scales[j] == scales[i]) for j in range(len(bs)))
        for i in range(len(bs))
    ]
    corr = (
        sum(np.sum(z * c) * s * s for z, c, s in zip(nz, same, scales, strict=True)) / w.size / 12
    )
    if twin_spec is not None:
        corr = naive
    nnz = [int(np.sum(z)) for z in nz]
    w_nnz = int(np.count_nonzero(np.asarray(w.astype(jnp.float32))))
    return float(np.mean((rec - wf) ** 2)), naive, corr, sum(nnz) - w_nnz, sum(nnz[1:])


def _check(m, want):
    mse, naive, corr, extra, twins = want
    np.testing.assert_allclose(float(m.mse), mse, rtol=2e-5)
    np.testing.assert_allclose(float(m.mse_widrow), naive, rtol=2e-5)
    np.testing.assert_allclose(float(m.mse_widrow_correlated), corr, rtol=2e-5)
    assert (int(m.extra_nonzero), int(m.twin_nonzero)) == (extra, twins)
    assert np.isnan(float(m.output_error))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n", [65_792 + 1000, 300])
def test_blocked_measure_matches_the_whole_array_figures(n, dtype):
    w = _kernel(n, dtype, seed=2, subnormal=False)
    t = jnp.float32(0.03)
    for spec, method, branches in _cases():
        bs = kernels.split(method, w, t, branches=branches, spec=spec)
        want = _reference(w, bs, spec)
        f = kernels.elementwise(method, w, t, branches=branches, spec=spec)
        _check(measure_split(w, f, spec), want)
        if spec == _SPECS[0]:  # the stored-branch and dispatching routes, once per method
            _check(measure(w, bs, spec), want)
            _check(measure_candidate(method, w, t, branches=branches, spec=spec)[0], want)


def test_blocked_measure_of_a_mixed_precision_split():
    w = _kernel(3 * blocks.BLOCK + 1000, jnp.float32, seed=3, subnormal=False)
    spec, twin = quant.QuantSpec(bits=4), quant.QuantSpec(bits=8)
    bs = kernels.split("snap", w, 0.05, spec=spec, twin_spec=twin)
    m = measure(w, bs, spec, twin_spec=twin)
    _check(m, _reference(w, bs, spec, twin))
    assert float(m.mse_widrow) == float(m.mse_widrow_correlated)  # independent roundings
    with pytest.raises(ValueError, match="per-tensor specs"):
        measure_split(w, lambda x: (x,), quant.QuantSpec(bits=4, granularity="per_channel"))


def test_measure_candidate_stores_the_branches_only_where_it_must():
    w = _kernel(3 * blocks.BLOCK + 1000, jnp.float32, seed=4)
    spec = quant.QuantSpec(bits=4)
    fused = blocks.blocked(w.shape)
    for method in kernels.RECOMPUTED:
        _, bs = measure_candidate(method, w, 0.05, spec=spec)
        assert (bs is None) == fused, method
    m, bs = measure_candidate("compensate", w, 0.05, spec=spec)  # its scan: stored
    assert _same(bs, kernels.split("compensate", w, 0.05, spec=spec))
    small = w[:300]
    assert measure_candidate("clip", small, 0.05, spec=spec)[1] is not None  # not in blocks
    cal = jnp.ones(1)  # a calibration needs the stored branches
    assert measure_candidate("clip", w, 0.05, spec=spec, calibration=cal)[1] is not None


def test_eager_calls_compile_once_per_shape(caplog):
    # their loops' bodies are new closures at every call: unjitted, each eager call compiled
    # them anew (0.5-1 s a call on 512²); jitted, a repeat call with another threshold
    # compiles nothing
    w = _kernel(65_792, jnp.float32, seed=6)
    spec = quant.QuantSpec(bits=4)
    calls = (
        lambda t: kernels.compensate(w, t, spec),
        lambda t: measure(w, kernels.clip(w, t), spec),
        lambda t: measure_candidate("clip", w, t, spec=spec),
    )
    for call in calls:
        jax.block_until_ready(call(0.03))
        caplog.clear()
        with jax.log_compiles(), caplog.at_level("WARNING", logger="jax"):
            jax.block_until_ready(call(0.04))
        assert not [r for r in caplog.records if "Compiling" in r.getMessage()], call
