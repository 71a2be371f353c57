"""Array-level split kernels: exactness properties (hypothesis) and PPQ parity."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsplit import kernels

N = 64  # one shape per dtype, so each property compiles once
DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def weights(dtype):
    """Arrays with normal, subnormal, huge, zero and signed-zero values (finite)."""
    base = np.float32 if dtype is ml_dtypes.bfloat16 else dtype
    width = {np.float16: 16, np.float32: 32, np.float64: 64}[base]
    elems = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True, width=width)
    return hnp.arrays(base, N, elements=elems).map(lambda a: a.astype(dtype))


thresholds = st.one_of(
    st.just(0.0), st.floats(0, 10, allow_nan=False), st.floats(0, 1e30, allow_nan=False)
)

_balance = jax.jit(kernels.balance)
_random = jax.jit(kernels.random)


def bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def exact_sum(w1, w2, w):
    """``w1 + w2 == w`` bit for bit in the kernel dtype (numpy: no flush-to-zero), or both NaN."""
    s = np.asarray(w1) + np.asarray(w2)
    w = np.asarray(w)
    same = bits(s) == bits(w)
    # -0.0 + 0.0 = +0.0 is fine only if w is +-0; equal values with different zero signs
    zeros = (w.astype(np.float64) == 0) & (s.astype(np.float64) == 0)
    return bool(
        np.all(same | zeros | (np.isnan(s.astype(np.float64)) & np.isnan(w.astype(np.float64))))
    )


def mask_of(w, t):
    w64 = np.asarray(w).astype(np.float64)
    with np.errstate(over="ignore"):
        t_cast = float(np.asarray(t, dtype=np.asarray(w).dtype).astype(np.float64))
    return (np.abs(w64) > t_cast) & np.isfinite(w64)


@pytest.mark.parametrize("name", DTYPES)
def test_balance_properties(name):
    dtype = DTYPES[name]

    @settings(max_examples=200, deadline=None)
    @given(w=weights(dtype), t=thresholds)
    def prop(w, t):
        w1, w2 = (np.asarray(x) for x in _balance(w, t))
        assert w1.dtype == w.dtype and w2.dtype == w.dtype
        assert exact_sum(w1, w2, w)
        m = mask_of(w, t)
        # untouched values stay bit for bit; their twin is zero
        assert np.array_equal(bits(w1)[~m], bits(w)[~m])
        assert np.all(w2[~m].astype(np.float64) == 0)
        # max-abs shrinks: <= max(largest |w| not above t, max|w| / 2). Halves below the
        # smallest normal number are flushed to zero by XLA on CPU (the value then stays whole
        # on branch_0, still exact), so allow that much on top
        a = np.abs(w.astype(np.float64))
        tiny = float(ml_dtypes.finfo(w.dtype).smallest_normal)
        bound = max(a[~m].max(initial=0.0), a.max(initial=0.0) / 2 + tiny)
        for b in (w1, w2):
            assert np.abs(b.astype(np.float64)).max(initial=0.0) <= bound

    prop()


@pytest.mark.parametrize("name", DTYPES)
def test_random_properties(name):
    dtype = DTYPES[name]

    @settings(max_examples=200, deadline=None)
    @given(w=weights(dtype), t=thresholds, seed=st.integers(0, 2**31 - 1))
    def prop(w, t, seed):
        key = jax.random.key(seed)
        w1, w2 = (np.asarray(x) for x in _random(w, t, key))
        assert exact_sum(w1, w2, w)
        m = mask_of(w, t)
        assert np.array_equal(bits(w1)[~m], bits(w)[~m])
        assert np.all(w2[~m].astype(np.float64) == 0)
        # each share lies between 0 and w (same sign, no larger magnitude)
        w64 = w.astype(np.float64)
        for b in (w1.astype(np.float64), w2.astype(np.float64)):
            assert np.all(b * np.sign(w64) >= 0)
            assert np.all(np.abs(b) <= np.abs(w64))
        # same key, same bits
        v1, v2 = _random(w, t, key)
        assert np.array_equal(bits(v1), bits(w1)) and np.array_equal(bits(v2), bits(w2))

    prop()


def test_random_shares_are_spread():
    w = jnp.full((10_000,), 3.0, jnp.float32)
    w1, w2 = kernels.random(w, 1.0, jax.random.key(0))
    share = np.asarray(w1) / 3.0
    assert 0.45 < share.mean() < 0.55  # fair coin over [0.5, 1) and (0, 0.5]
    assert share.min() < 0.05 and share.max() > 0.95
    assert not np.array_equal(np.asarray(w1), np.asarray(w2))


class TestPPQParity:
    def test_threshold_is_cast_to_kernel_dtype_and_strict(self):
        w = jnp.array([np.float32(0.1), np.float32(0.1000001), -np.float32(0.1)], jnp.float32)
        w1, w2 = kernels.balance(w, 0.1)
        assert np.asarray(w2).tolist() == [0.0, float(np.float32(0.1000001) / 2), 0.0]

    def test_balance_masked_values_get_exact_halves(self):
        w = np.array([3.0, -5.0, 0.5, 7.25], np.float32)
        w1, w2 = (np.asarray(x) for x in kernels.balance(w, 1.0))
        assert np.array_equal(w1, [1.5, -2.5, 0.5, 3.625])
        assert np.array_equal(w2, [1.5, -2.5, 0.0, 3.625])

    def test_nan_and_inf_never_split(self):
        w = np.array([np.nan, np.inf, -np.inf, 4.0], np.float32)
        for w1, w2 in (kernels.balance(w, 1.0), kernels.random(w, 1.0, jax.random.key(1))):
            w1, w2 = np.asarray(w1), np.asarray(w2)
            assert np.isnan(w1[0]) and w1[1] == np.inf and w1[2] == -np.inf
            assert np.array_equal(w2[:3], [0.0, 0.0, 0.0])
            assert w1[3] + w2[3] == 4.0 and w2[3] != 0

    def test_low_precision_threshold_rounding(self):
        # bfloat16(0.1) == 0.10009765625; a bf16 weight equal to it is not above bf16(0.1)
        w = jnp.array([0.1, 0.2], jnp.bfloat16)
        _, w2 = kernels.balance(w, 0.1)
        assert np.asarray(w2.astype(jnp.float32)).tolist() == [0.0, float(jnp.bfloat16(0.1))]

    def test_per_layer_keys_depend_only_on_seed_and_path(self):
        k = jax.random.key_data
        assert np.array_equal(
            k(kernels.stochastic_key(3, "a/b")), k(kernels.stochastic_key(3, "a/b"))
        )
        assert not np.array_equal(
            k(kernels.stochastic_key(3, "a/b")), k(kernels.stochastic_key(4, "a/b"))
        )
        assert not np.array_equal(
            k(kernels.stochastic_key(3, "a/b")), k(kernels.stochastic_key(3, "a/c"))
        )


def test_split_dispatch_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        kernels.split("nope", jnp.ones(2), 0.0)
    with pytest.raises(ValueError, match="needs a key"):
        kernels.split("random", jnp.ones(2), 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_near_smallest_normal_stays_exact(dtype):
    # the small share w - w*u is subnormal here; XLA on CPU flushes it to zero, so the
    # kernel must then keep the value whole (a regression hypothesis found)
    w = np.full(256, 4 * np.finfo(dtype).smallest_normal, dtype)
    w1, w2 = (np.asarray(x) for x in _random(w, 0.0, jax.random.key(0)))
    assert exact_sum(w1, w2, w)


def _spacing_snap(x, w):
    """``snap_to_ulp`` as it was: through ``jnp.spacing`` and a division."""
    u = jnp.spacing(jnp.abs(w))
    return jnp.round(x / u) * u


def _any_bits(dtype, n, seed):
    """Random bit patterns of ``dtype`` (every binade, subnormals, NaNs, infs), plus the
    extremes, and small exponents oversampled."""
    uint = np.dtype(f"u{np.dtype(dtype).itemsize}")
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, np.iinfo(uint).max, n, dtype=uint, endpoint=True)
    w = bits.view(dtype).copy()
    fi = np.finfo(dtype)
    sp = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, fi.max, -fi.max, fi.tiny, -fi.tiny,
                   fi.smallest_subnormal, fi.tiny * 2.0**fi.nmant, 1.0, -3.0], dtype)  # fmt: skip
    w[: sp.size] = sp
    mant = fi.nmant
    small = rng.integers(0, 2 * mant + 4, n // 4).astype(uint) << uint.type(mant)
    keep = uint.type(np.iinfo(uint).max) ^ uint.type(
        ((1 << (8 * uint.itemsize - 1 - mant)) - 1) << mant
    )
    w[-(n // 4) :] = ((bits[-(n // 4) :] & keep) | small).view(dtype)
    return w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("method", "kw"),
    [("clip", {}), ("balance", {"branches": 4}), ("grid", {"spec": "q4"}),
     ("snap", {"spec": "q4"}), ("residual", {"spec": "q4"}), ("compensate", {"spec": "q4"})],
)  # fmt: skip
def test_bit_built_ulps_give_the_spacing_results(monkeypatch, method, kw, dtype):
    # snap_to_ulp builds ulp(w) from the bits on the CPU (no division, no jnp.spacing);
    # every method that snaps gives the same branches, bit for bit, as through jnp.spacing
    from jaxsplit import quant
    from jaxsplit.tree import x64

    kw = {k: quant.QuantSpec(bits=4) if v == "q4" else v for k, v in kw.items()}
    w = _any_bits(dtype, 1 << 14, seed=7)
    uint = np.dtype(f"u{np.dtype(dtype).itemsize}")
    with x64(dtype):
        wj = jnp.asarray(w)
        for t in (0.0, 1e-30, 0.7):
            assert kernels._bit_ulp(wj, wj)
            new = jax.jit(lambda w, t: kernels.split(method, w, t, **kw))(wj, t)
            with monkeypatch.context() as m:
                m.setattr(kernels, "snap_to_ulp", _spacing_snap)
                old = jax.jit(lambda w, t: kernels.split(method, w, t, **kw))(wj, t)
            for a, b in zip(new, old, strict=True):
                a, b = np.asarray(a), np.asarray(b)
                nan = np.isnan(a) & np.isnan(b)
                assert np.array_equal(a.view(uint)[~nan], b.view(uint)[~nan]), (method, t)
                assert np.array_equal(np.isnan(a), np.isnan(b))
