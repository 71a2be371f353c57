"""quant.py per_group granularity against an independent numpy reference (GPTQ/AWQ-style groups)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from quant_reference import ref_quantize_exact

from jaxsplit import kernels, quant
from jaxsplit.quant import QuantSpec


def G(group_size, **kw) -> QuantSpec:
    return QuantSpec(granularity="per_group", group_size=group_size, **kw)


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bit_identical(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(_bits(got), _bits(want)), int(np.sum(_bits(got) != _bits(want)))


def _weights(shape, seed=0):
    return (np.random.default_rng(seed).standard_t(3, shape) * 0.02).astype(np.float32)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, err, msg",
    [
        ({"granularity": "per_group"}, ValueError, r"QuantSpec.group_size is required.*got None"),
        (
            {"granularity": "per_group", "group_size": 0},
            ValueError,
            r"group_size must be an int >= 1.*got 0",
        ),
        ({"granularity": "per_group", "group_size": -4}, ValueError, "got -4"),
        (
            {"granularity": "per_group", "group_size": 32.0},
            TypeError,
            r"group_size must be an int >= 1.*got 32.0",
        ),
        ({"granularity": "per_group", "group_size": True}, TypeError, "group_size.*got True"),
        ({"granularity": "per_group", "group_size": "128"}, TypeError, "got '128'"),
        (
            {"group_size": 128},
            ValueError,
            r"group_size is only valid with granularity='per_group'.*128.*'per_tensor'",
        ),
        ({"granularity": "per_channel", "group_size": 64}, ValueError, "'per_channel'"),
    ],
)
def test_group_size_validation(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        QuantSpec(**kwargs)


def test_spec_to_dict_hashable_and_listed():
    spec = G(128, bits=4)
    assert spec.to_dict() == {
        "bits": 4,
        "symmetric": True,
        "granularity": "per_group",
        "axis": -1,
        "narrow_range": True,
        "group_size": 128,
    }
    assert QuantSpec(**spec.to_dict()) == spec and hash(spec) == hash(G(128, bits=4))
    assert "per_group" in quant.GRANULARITIES


def test_axis_errors():
    with pytest.raises(ValueError, match=r"QuantSpec.axis=2 is out of range"):
        quant.scale(jnp.ones((4, 4)), G(2, axis=2))
    with pytest.raises(ValueError, match="axis"):
        quant.quantize(jnp.ones(()), G(2))


# --- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, spec, want",
    [
        ((256, 64), G(128), (2, 64)),  # Dense (d_in, d_out)
        ((250, 64), G(128), (2, 64)),  # ragged last group of 122
        ((3, 3, 5, 8), G(16), (3, 8)),  # Conv (kh, kw, cin, cout): d_in = 45
        ((64, 100), G(32, axis=0), (4, 64)),  # torch-style (d_out, d_in)
        ((10, 4), G(1000), (1, 4)),  # one group: per channel
        ((7,), G(2), (1, 7)),  # a bias-like vector: d_in = 1
    ],
)
def test_qparams_shapes(shape, spec, want):
    x = _weights(shape)
    qp = quant.qparams(x, spec)
    assert qp.scale.shape == want and qp.zero_point.shape == want
    assert quant.scale(x, spec).shape == want
    assert quant.quantize(x, spec).shape == shape


# --- values against the independent loop reference ---------------------------------------


SPECS = [
    G(32, bits=4),
    G(32, bits=4, symmetric=False),
    G(7, bits=3, narrow_range=False),
    G(7, bits=4, symmetric=False, narrow_range=False),
    G(16, bits=8, axis=0),
    G(1, bits=2),
    G(64, bits=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("shape", [(96, 24), (100, 24), (3, 3, 5, 8)], ids=str)
def test_quantize_and_qparams_bit_identical_to_reference(spec, shape):
    x = _weights(shape, seed=len(shape))
    x[..., 1] = 0.0  # a zero output channel (all its groups have scale 0)
    want, s, zp = ref_quantize_exact(x, spec, with_params=True)
    assert_bit_identical(quant.quantize(x, spec), want)
    assert_bit_identical(jax.jit(quant.fake_quant, static_argnames="spec")(x, spec), want)
    qp = quant.qparams(x, spec)
    assert_bit_identical(qp.scale, s)
    assert_bit_identical(qp.zero_point, zp)


def test_conv_kernel_groups_run_over_kh_kw_cin_in_c_order():
    """(kh, kw, cin, cout) = (2, 2, 3, 1), G = 4: groups are flat inputs [0, 4), [4, 8), [8, 12)."""
    x = np.zeros((2, 2, 3, 1), np.float32)
    flat = x.reshape(12, 1)
    flat[:, 0] = [1, 0, 0, 0, 0, 0, 0, 0.5, 0, 0, 0, 0.25]
    x = flat.reshape(2, 2, 3, 1)
    s = np.asarray(quant.scale(x, G(4, bits=2)))  # qmax = 1: scale = group max
    assert s.tolist() == [[1.0], [0.5], [0.25]]


def test_ragged_last_group_has_its_own_scale_from_its_members():
    x = np.ones((10, 2), np.float32)
    x[8:, 0] = [0.5, -0.5]  # the last group (rows 8, 9) of G = 4
    s = np.asarray(quant.scale(x, G(4, bits=2)))
    assert s.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.5, 1.0]]
    assert_bit_identical(quant.quantize(x, G(4, bits=2)), x)  # every value is on its grid


def test_group_size_at_least_d_in_is_per_channel_and_one_is_elementwise():
    x = _weights((40, 6), seed=3)
    for spec in (G(40), G(41), G(4096)):
        assert_bit_identical(
            quant.quantize(x, spec), quant.quantize(x, QuantSpec(granularity="per_channel"))
        )
    assert_bit_identical(
        quant.quantize(x, G(1)), x
    )  # one value per group: exact (|x| = scale*qmax)


def test_params_roundtrip_and_bad_params_shape():
    x = _weights((100, 12), seed=4)
    for spec in (G(32, bits=4), G(32, bits=4, symmetric=False)):
        qp = quant.qparams(x, spec)
        assert_bit_identical(quant.quantize(x, spec, params=qp), quant.quantize(x, spec))
        assert_bit_identical(quant.fake_quant(x, spec, params=qp), quant.quantize(x, spec))
    bad = quant.QParams(jnp.ones((3, 5)), jnp.zeros((3, 5)))
    with pytest.raises(
        ValueError, match=r"params.scale must broadcast to \(n_groups, d_out\) = \(4, 12\)"
    ):
        quant.quantize(x, G(32), params=bad)


def test_fake_quant_gradient_per_group():
    x = _weights((50, 4), seed=5)
    spec = G(16, bits=3)
    g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, spec) * 2.0))(jnp.asarray(x))
    assert np.array_equal(g, np.full(x.shape, 2.0, np.float32))
    small = quant.QParams(jnp.full((4, 4), 0.01), jnp.zeros((4, 4)))  # range +-0.03: most clip
    g = jax.grad(lambda v: quant.fake_quant(v, spec, params=small).sum())(jnp.asarray(x))
    assert np.array_equal(
        np.asarray(g), (np.abs(np.rint(x / np.float32(0.01))) <= 3).astype(np.float32)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_kernel_per_group(dtype):
    x = jnp.asarray(_weights((3, 3, 4, 8), seed=6), dtype)
    spec = G(8, bits=4, symmetric=False)
    assert_bit_identical(quant.quantize(x, spec), ref_quantize_exact(np.asarray(x), spec))


def test_vmap_over_stacked_layers_matches_each_layer():
    w = _weights((3, 70, 16), seed=7)
    spec = G(32, bits=4)
    got = jax.jit(jax.vmap(lambda v: quant.quantize(v, spec)))(w)
    for i in range(3):
        assert_bit_identical(got[i], ref_quantize_exact(w[i], spec))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
        elements=st.floats(-1e6, 1e6, width=32, allow_nan=False),
    ),
    g=st.integers(1, 40),
    bits=st.integers(2, 16),
    symmetric=st.booleans(),
    axis=st.sampled_from([-1, 0]),
)
def test_per_group_property(x, g, bits, symmetric, axis):
    spec = G(g, bits=bits, symmetric=symmetric, axis=axis)
    want, s, _ = ref_quantize_exact(x, spec, with_params=True)
    tiny = np.finfo(np.float32).tiny  # XLA on CPU flushes subnormals: the exact domain is normal
    ax, asc = np.abs(x), np.abs(np.asarray(s, np.float32))
    assume(not (np.any((ax > 0) & (ax < tiny)) or np.any((asc > 0) & (asc < tiny))))
    assert_bit_identical(quant.quantize(x, spec), want)
    assert_bit_identical(quant.scale(x, spec), s)


# --- error figures ------------------------------------------------------------------------


def _ref_widrow(x, spec):
    """mean over groups of (group non-zero fraction x scale^2 / 12), weighted by group size."""
    _, s, _ = ref_quantize_exact(x, spec, with_params=True)
    s = s.astype(np.float64)
    ax = spec.axis % x.ndim
    flat = np.moveaxis(x, ax, -1).reshape(-1, x.shape[ax])
    d_in, gs = flat.shape[0], spec.group_size
    num, den = 0.0, 0
    for k in range(s.shape[0]):
        rows = flat[k * gs : (k + 1) * gs]
        size = rows.shape[0]
        for c in range(flat.shape[1]):
            frac = np.mean(rows[:, c] != 0)
            num += size * frac * s[k, c] ** 2 / 12
            den += size
    assert den == d_in * flat.shape[1]
    return num / den


@pytest.mark.parametrize("spec", SPECS[:5], ids=repr)
@pytest.mark.parametrize("shape", [(100, 24), (3, 3, 5, 8)], ids=str)
def test_mse_and_widrow_against_reference(spec, shape):
    x = _weights(shape, seed=8)
    x[np.abs(x) < 0.005] = 0.0  # exact zeros contribute nothing to Widrow
    want_mse = np.mean((ref_quantize_exact(x, spec).astype(np.float64) - x) ** 2)
    assert float(quant.mse(x, spec)) == pytest.approx(want_mse, rel=1e-5)
    assert float(quant.widrow_mse(x, spec)) == pytest.approx(_ref_widrow(x, spec), rel=1e-5)


def test_widrow_weights_a_ragged_group_by_its_size():
    x = np.zeros((5, 1), np.float32)
    x[:, 0] = [4.0, 4.0, 4.0, 4.0, 1.0]  # G = 4: a full group (scale 4) and a ragged one (1)
    spec = G(4, bits=2)  # qmax 1
    got = float(quant.widrow_mse(x, spec))
    assert got == pytest.approx((4 * 16 + 1 * 1) / 5 / 12, rel=1e-6)
    assert got != pytest.approx((16 + 1) / 2 / 12, rel=1e-3)  # not an unweighted mean over groups


def test_branches_mse_balance_split_per_group():
    w = jnp.asarray(_weights((256, 32), seed=9))
    spec = G(64, bits=4)
    t = 0.02
    w1, w2 = kernels.balance(w, t)
    r = quant.branches_mse((w1, w2), w, spec)
    want = np.mean(
        (
            ref_quantize_exact(np.asarray(w1), spec).astype(np.float64)
            + ref_quantize_exact(np.asarray(w2), spec)
            - np.asarray(w, np.float64)
        )
        ** 2
    )
    assert float(r.measured) == pytest.approx(want, rel=1e-5)
    naive = _ref_widrow(np.asarray(w1), spec) + _ref_widrow(np.asarray(w2), spec)
    assert float(r.predicted) == pytest.approx(naive, rel=1e-5)
    assert float(r.predicted_correlated) >= float(r.predicted)
    plain = quant.branches_mse((w,), w, spec)
    assert float(plain.measured) == float(quant.mse(w, spec))
    assert float(plain.predicted) == float(quant.widrow_mse(w, spec))


def test_per_element_expands_group_statistics():
    x = _weights((3, 3, 5, 8), seed=10)
    spec = G(16, bits=4)
    s = quant.per_element(quant.scale(x, spec), x.shape, spec)
    assert s.shape == x.shape
    flat = np.moveaxis(np.asarray(s), -1, 0).reshape(8, 45)
    ref_s = ref_quantize_exact(x, spec, with_params=True)[1]
    for k, rows in enumerate([slice(0, 16), slice(16, 32), slice(32, 45)]):
        assert np.all(flat[:, rows] == ref_s[k][:, None])
    pc = QuantSpec(granularity="per_channel")
    assert quant.per_element(quant.scale(x, pc), x.shape, pc).shape == (1, 1, 1, 8)


@pytest.mark.parametrize("shape", [(0, 4), (6, 0), (2, 0, 3)], ids=str)
def test_empty_arrays(shape):
    x = np.zeros(shape, np.float32)
    spec = G(4)
    assert quant.quantize(x, spec).shape == shape
    d_in = int(np.prod(shape[:-1]))
    assert quant.scale(x, spec).shape == (max(1, -(-d_in // 4)), shape[-1])
