"""Issue 13: `kernels.in_blocks` and the blocked `compensate` match whole-array runs bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import kernels


def _bits(x):
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return x
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _same(a, b):
    return all(np.array_equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("n", [2 * kernels.BLOCK, 3 * kernels.BLOCK + 7, 65_792, 8191, 100])
def test_in_blocks_matches_the_whole_array_run(n):
    x = jnp.asarray(np.random.default_rng(n).standard_normal(n).astype("f4"))
    y = jnp.flip(x)

    def f(a, b):
        return jnp.round(a / 0.3) * b, a > b

    blocked = jax.jit(lambda a, b: kernels.in_blocks(f, (a, b)))(x, y)
    whole = jax.jit(lambda a, b: kernels.in_blocks(f, (a, b), blocked=False))(x, y)
    assert _same(blocked, whole)
    assert blocked[0].shape == (n,) and blocked[1].dtype == jnp.bool_


@pytest.mark.parametrize("n", [3 * kernels.BLOCK + 7, 65_792, 100])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_abs_in_blocks_is_the_exact_max(n, dtype):
    x = np.random.default_rng(n).standard_normal(n).astype("f4")
    x[n // 2] = -7.5  # the largest magnitude, negative
    x = jnp.asarray(x, dtype)
    got = kernels.max_abs_in_blocks(lambda a: (a * 2, a - a), (x,))
    assert [float(g.max()) for g in got] == [15.0, 0.0]
    assert got[0].dtype == dtype and (got[0].shape[0] > 1) == (n > 8191)
    y = x.at[0].set(-0.0).at[1].set(1e-40)  # zeros and subnormals do not disturb it
    whole = jnp.max(jnp.abs(y), initial=0)
    assert float(kernels.max_abs_in_blocks(lambda a: (a,), (y,))[0].max()) == float(whole)


def test_in_blocks_keeps_the_shape():
    x = jnp.ones((4, kernels.BLOCK // 2, 2))
    (out,) = kernels.in_blocks(lambda a: (a * 2,), (x,))
    assert out.shape == x.shape and bool(jnp.all(out == 2))


def _whole(monkeypatch):
    """``kernels.in_blocks`` forced to the whole-array run (the reference)."""
    for name in ("in_blocks", "max_abs_in_blocks"):
        run = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda f, a, blocked=True, run=run: run(f, a, False))


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
    n = 3 * kernels.BLOCK + 1000  # 4 blocks, the last one padded
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
