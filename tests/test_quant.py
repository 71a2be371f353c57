"""quant.py: QuantSpec validation, quantize against a numpy reference, STE, Widrow theory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from quant_reference import ref_quantize, ref_quantize_exact

from jaxsplit import kernels, quant
from jaxsplit.quant import QuantSpec

F32_EPS = np.finfo(np.float32).eps


SPECS = [
    QuantSpec(),
    QuantSpec(bits=4),
    QuantSpec(bits=2, narrow_range=False),
    QuantSpec(bits=8, granularity="per_channel"),
    QuantSpec(bits=6, granularity="per_channel", axis=0),
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=5, symmetric=False, narrow_range=False, granularity="per_channel"),
    QuantSpec(bits=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_quantize_matches_reference_within_two_ulps_of_maxabs(spec):
    x = np.random.default_rng(0).standard_t(3, (64, 48)).astype(np.float32)
    x[:, 3] = 0.0  # a zero channel (per_channel, axis=-1)
    got = np.asarray(jax.jit(quant.quantize, static_argnames="spec")(x, spec))
    want = ref_quantize(x, spec)
    tol = 2 * F32_EPS * np.max(np.abs(x))
    assert np.max(np.abs(got - want)) <= tol
    assert np.all(np.isfinite(got)) and got.dtype == np.float32


def test_symmetric_grid_and_round_half_even():
    spec = QuantSpec(bits=3)  # qmax 3, scale 1 for max|x| = 3
    x = jnp.array([3.0, 0.5, 1.5, 2.5, -0.5, -2.5, -3.0, 1.2])
    assert np.array_equal(quant.quantize(x, spec), [3.0, 0.0, 2.0, 2.0, -0.0, -2.0, -3.0, 1.0])
    assert float(quant.scale(x, spec)) == 1.0


def test_qmin_qmax():
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (-127, 127)
    assert QuantSpec(bits=8, narrow_range=False).qmin == -128
    asym = QuantSpec(bits=8, symmetric=False)
    assert (asym.qmin, asym.qmax) == (1, 255)
    assert QuantSpec(bits=8, symmetric=False, narrow_range=False).qmin == 0


def test_asymmetric_keeps_zero_exact_and_uses_full_range():
    spec = QuantSpec(bits=8, symmetric=False, narrow_range=False)
    x = jnp.array([0.0, 0.1, 0.2, 5.1])  # all non-negative: zero point at qmin
    qp = quant.qparams(x, spec)
    assert float(qp.zero_point) == 0.0
    q = quant.quantize(x, spec)
    assert float(q[0]) == 0.0 and abs(float(q[3]) - 5.1) < 1e-6


def test_zero_tensor_and_zero_channel_quantize_to_zero():
    for spec in (QuantSpec(), QuantSpec(symmetric=False), QuantSpec(granularity="per_channel")):
        z = jnp.zeros((3, 4))
        assert float(quant.scale(z, spec).max()) == 0.0
        assert np.array_equal(quant.quantize(z, spec), np.zeros((3, 4)))
        assert np.array_equal(quant.fake_quant(z, spec), np.zeros((3, 4)))
        assert float(quant.widrow_mse(z, spec)) == 0.0
        g = jax.grad(lambda x, spec=spec: quant.fake_quant(x, spec).sum())(z)
        assert np.all(np.isfinite(g))
    x = jnp.array([[1.0, 0.0], [-2.0, 0.0]])
    q = quant.quantize(x, QuantSpec(granularity="per_channel"))
    assert np.array_equal(q[:, 1], [0.0, 0.0]) and np.all(np.isfinite(q))


def test_per_channel_scale_shape_and_axis():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert quant.scale(x, QuantSpec(granularity="per_channel")).shape == (1, 1, 4)
    s1 = quant.scale(x, QuantSpec(granularity="per_channel", axis=1))
    assert s1.shape == (1, 3, 1)
    assert np.allclose(s1.ravel() * 127, [15.0, 19.0, 23.0])
    assert quant.scale(x, QuantSpec()).shape == ()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_float_dtypes_keep_dtype_and_compute_in_float32(dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)), dtype)
    spec = QuantSpec(bits=4)
    q = quant.quantize(x, spec)
    assert q.dtype == dtype
    want = quant.quantize(x.astype(jnp.float32), spec).astype(dtype)
    assert np.array_equal(np.asarray(q, np.float32), np.asarray(want, np.float32))
    assert quant.fake_quant(x, spec).dtype == dtype
    assert quant.widrow_mse(x, spec).dtype == jnp.float32


def test_float64_under_x64():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(2).normal(size=(32,)), jnp.float64)
        q = quant.quantize(x, QuantSpec(bits=8))
        assert q.dtype == jnp.float64
        assert np.max(np.abs(np.asarray(q) - ref_quantize(x, QuantSpec(bits=8)))) < 1e-12


def test_fake_quant_forward_equals_quantize_and_straight_through_gradient():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(10, 5)), jnp.float32)
    spec = QuantSpec(bits=4, granularity="per_channel")
    f = jax.jit(quant.fake_quant, static_argnames="spec")
    assert np.array_equal(f(x, spec), quant.quantize(x, spec))
    g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, spec) * 3.0))(x)
    assert np.array_equal(g, np.full(x.shape, 3.0, np.float32))


def test_fake_quant_gradient_zero_outside_calibrated_range():
    spec = QuantSpec(bits=8)
    params = quant.qparams(jnp.array([1.0]), spec)  # range [-1, 1]
    x = jnp.array([0.5, 2.0, -3.0, -0.25])
    q = quant.fake_quant(x, spec, params=params)
    assert np.array_equal(q, quant.quantize(x, spec, params=params))
    assert np.array_equal(q[1:3], [1.0, -1.0])
    g = jax.grad(lambda v: quant.fake_quant(v, spec, params=params).sum())(x)
    assert np.array_equal(g, [1.0, 0.0, 0.0, 1.0])


def test_widrow_mse_per_tensor_and_per_channel_exact():
    x = jnp.array([[0.0, 2.0], [1.0, 0.0], [-4.0, 0.0]])
    s = 4.0 / 127
    assert float(quant.widrow_mse(x, QuantSpec())) == pytest.approx(3 / 6 * s**2 / 12, rel=1e-6)
    s0, s1 = 4.0 / 127, 2.0 / 127
    want = (2 / 3 * s0**2 + 1 / 3 * s1**2) / 2 / 12  # mean over channels
    got = float(quant.widrow_mse(x, QuantSpec(granularity="per_channel")))
    assert got == pytest.approx(want, rel=1e-6)


def test_mse_measured_matches_numpy():
    x = np.random.default_rng(4).normal(size=(300, 7)).astype(np.float32)
    for spec in SPECS[:6]:
        want = np.mean((ref_quantize(x, spec) - x.astype(np.float64)) ** 2)
        assert float(quant.mse(x, spec)) == pytest.approx(want, rel=1e-4)


def test_balance_halves_round_like_the_original():
    """Q_{s/2}(w/2) + Q_{s/2}(w/2) == Q_s(w) exactly on split values (correlated rounding)."""
    w = jnp.asarray(np.random.default_rng(5).standard_t(3, (256, 64)), jnp.float32)
    spec = QuantSpec()
    t = jnp.max(jnp.abs(w)) / 2
    w1, w2 = kernels.balance(w, t)
    assert float(quant.scale(w1, spec)) == float(quant.scale(w, spec)) / 2
    assert float(quant.scale(w2, spec)) == float(quant.scale(w, spec)) / 2
    mask = np.asarray(kernels.split_mask(w, t))
    summed = np.asarray(quant.quantize(w1, spec) + quant.quantize(w2, spec))
    assert np.array_equal(summed[mask], np.asarray(quant.quantize(w, spec))[mask])


def test_branches_mse_errors():
    w = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="at least one"):
        quant.branches_mse((), w, QuantSpec())
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        quant.branches_mse((w, jnp.ones((3, 2))), w, QuantSpec())


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        quant.quantize(jnp.arange(3), QuantSpec())
    with pytest.raises(ValueError, match=r"QuantSpec.axis=2 is out of range"):
        quant.scale(jnp.ones((2, 2)), QuantSpec(granularity="per_channel", axis=2))
    with pytest.raises(ValueError, match="axis"):
        quant.scale(jnp.ones(()), QuantSpec(granularity="per_channel"))


@pytest.mark.parametrize(
    "kwargs, err, msg",
    [
        ({"bits": 1}, ValueError, r"bits must be an int in \[2, 16\], got 1"),
        ({"bits": 17}, ValueError, "got 17"),
        ({"bits": 8.0}, TypeError, "got 8.0"),
        ({"bits": True}, TypeError, "bits"),
        ({"granularity": "per_row"}, ValueError, "'per_row'"),
        ({"symmetric": 1}, TypeError, "symmetric must be a bool"),
        ({"narrow_range": "yes"}, TypeError, "narrow_range"),
        ({"axis": 1.5}, TypeError, "axis"),
    ],
)
def test_quantspec_validation(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        QuantSpec(**kwargs)


def test_quantspec_frozen_keyword_only_hashable():
    spec = QuantSpec(bits=4)
    with pytest.raises(AttributeError):
        spec.bits = 5
    with pytest.raises(TypeError):
        QuantSpec(4)
    assert {spec: 1}[QuantSpec(bits=4)] == 1
    assert spec.to_dict()["bits"] == 4


# --- validation against theory (issue 7, item 6) --------------------------------------------


@functools.cache
def _weights(kind: str) -> jax.Array:
    rng = np.random.default_rng(42)
    if kind == "gaussian":
        w = rng.normal(0.0, 0.02, (1024, 1024))
    else:
        w = rng.standard_t(3, (1024, 1024)) * 0.02
    return jnp.asarray(w, jnp.float32)


@functools.partial(jax.jit, static_argnames="spec")
def _theory(w, spec):
    plain = quant.branches_mse((w,), w, spec)
    t = jnp.max(jnp.abs(w)) / 2
    split = quant.branches_mse(kernels.balance(w, t), w, spec)
    p = jnp.mean(kernels.split_mask(w, t).astype(jnp.float32))
    return plain, split, p


@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
def test_widrow_theory_1024x1024(kind):
    w = _weights(kind)
    spec = QuantSpec(bits=8)
    plain, split, p = _theory(w, spec)
    s = float(quant.scale(w, spec))
    assert float(plain.measured) == pytest.approx(s**2 / 12, rel=0.05)
    assert float(plain.predicted) == pytest.approx(s**2 / 12, rel=1e-6)  # no zeros in w
    # after a balance split at max/2: within 5% of the correlated (non-zero corrected) prediction
    assert float(split.measured) == pytest.approx(float(split.predicted_correlated), rel=0.05)
    # the naive independent-noise prediction under-estimates by (1 + 3p) / (1 + p)
    p = float(p)
    ratio = float(split.predicted_correlated) / float(split.predicted)
    assert ratio == pytest.approx((1 + 3 * p) / (1 + p), rel=1e-5)
    if kind == "student_t":
        reduction = 1 - float(split.measured) / float(plain.measured)
        assert 0.70 <= reduction <= 0.75 + 0.01


def test_correlated_prediction_holds_when_many_values_split():
    """Threshold well below max/2: both branch scales are still max/2/qmax, p is large, and the
    naive independent-noise prediction is far off while the corrected one holds."""
    w = _weights("gaussian")
    spec = QuantSpec(bits=8)
    t = 0.02  # one sigma: about 32% of the values split
    split = jax.jit(quant.branches_mse, static_argnames="spec")(kernels.balance(w, t), w, spec)
    p = float(jnp.mean(kernels.split_mask(w, t)))
    assert 0.3 < p < 0.34
    assert float(split.measured) == pytest.approx(float(split.predicted_correlated), rel=0.05)
    assert float(split.measured) / float(split.predicted) > 1.3


# --- exactness: bit-identical to the float32 (float64) reference ------------------------------


_jit_quantize = jax.jit(quant.quantize, static_argnames="spec")


def _bits(a) -> np.ndarray:
    """The raw bit patterns (so ``-0.0 != 0.0`` and NaN payloads count)."""
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bit_identical(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    bad = np.flatnonzero(_bits(got) != _bits(want))
    assert bad.size == 0, (
        f"{bad.size} elements differ, e.g. {got.flat[bad[0]]!r} != {want.flat[bad[0]]!r}"
    )


@st.composite
def specs(draw, granularities=quant.GRANULARITIES, max_group=9):
    gran = draw(st.sampled_from(granularities))
    return QuantSpec(
        bits=draw(st.integers(2, 16)),
        symmetric=draw(st.booleans()),
        narrow_range=draw(st.booleans()),
        granularity=gran,
        axis=draw(st.sampled_from([-1, 0])),
        group_size=draw(st.integers(1, max_group)) if gran == "per_group" else None,
    )


# magnitudes whose scale is a normal float32 (XLA on CPU flushes subnormals) and whose range
# fits float32; subnormal elements are allowed (they quantize to 0 either way)
_values = st.floats(-(2.0**40), 2.0**40, width=32, allow_nan=False, allow_subnormal=True)
_arrays = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7), elements=_values
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=_arrays, spec=specs(), exp=st.integers(-60, 60))
def test_quantize_bit_identical_to_float32_reference_property(x, spec, exp):
    x = (x * np.float32(2.0**exp)).astype(np.float32)
    x = np.where(np.isfinite(x), x, np.float32(0))
    if np.max(np.abs(x)) < 1e-30:
        x = x.copy()
        x.flat[0] = np.float32(1.0)
    assume(_normal_domain(x, ref_quantize_exact(x, spec, with_params=True)[1]))
    assert_bit_identical(_jit_quantize(x, spec), ref_quantize_exact(x, spec))
    assert_bit_identical(quant.fake_quant(x, spec), ref_quantize_exact(x, spec))


def _normal_domain(x, s) -> bool:
    """The documented exactness domain: XLA on CPU flushes subnormals, so inputs and scales
    must be normal floats (or zero)."""
    tiny = np.finfo(np.float32).tiny
    x, s = np.abs(np.asarray(x, np.float32)), np.abs(np.asarray(s, np.float32))
    return not (np.any((x > 0) & (x < tiny)) or np.any((s > 0) & (s < tiny)))


@pytest.mark.parametrize(
    "spec", SPECS + [QuantSpec(bits=4, granularity="per_group", group_size=7)], ids=repr
)
def test_quantize_bit_identical_on_heavy_tailed_layers(spec):
    """Student-t(2) weights at LLM scale: the max sits on an arbitrary float, the scale is
    awkward and thousands of values land near rounding boundaries."""
    rng = np.random.default_rng(11)
    for _ in range(3):
        w = (rng.standard_t(2, (384, 256)) * 0.02).astype(np.float32)
        assert_bit_identical(_jit_quantize(w, spec), ref_quantize_exact(w, spec))


def _boundary_values(spec: QuantSpec, amax: np.float32) -> np.ndarray:
    """``max|x|`` plus, for every level ``k``, the float32 nearest ``(k + 0.5) * s`` and its
    two neighbours: the values that a reciprocal multiply rounds to the wrong level."""
    s = amax / np.float32(spec.qmax)
    k = np.arange(spec.qmin, spec.qmax, dtype=np.float32)
    mid = ((k + np.float32(0.5)) * s).astype(np.float32)
    vals = np.concatenate(
        [mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))]
    )
    vals = vals[np.abs(vals) < amax]
    return np.concatenate([[amax], vals]).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12])
def test_quantize_bit_identical_at_half_step_boundaries(bits):
    spec = QuantSpec(bits=bits)
    rng = np.random.default_rng(bits)
    amaxes = rng.uniform(0.01, 10.0, 40).astype(np.float32)
    amaxes = np.concatenate([amaxes, np.float32([0.1, 1 / 3, 0.7, np.pi, 1e-20, 3e30])])
    n_reciprocal_differs = 0
    for amax in amaxes:
        x = _boundary_values(spec, amax)
        assert_bit_identical(_jit_quantize(x, spec), ref_quantize_exact(x, spec))
        s = amax / np.float32(spec.qmax)
        n_reciprocal_differs += int(np.sum(np.rint(x / s) != np.rint(x * (np.float32(1) / s))))
    assert n_reciprocal_differs > 0  # the cases do hit x * (1/s) rounding to another level


def test_scale_is_correctly_rounded_quotient_not_reciprocal_product():
    """``max|x| / qmax`` must not become ``max|x| * (1/qmax)`` (XLA folds constant divisors)."""
    rng = np.random.default_rng(3)
    amaxes = rng.uniform(0.5, 2.0, 5000).astype(np.float32)
    spec = QuantSpec(bits=8)
    want = amaxes / np.float32(127)
    assert np.any(want != amaxes * (np.float32(1) / np.float32(127)))  # the trap exists
    got = jax.jit(jax.vmap(lambda a: quant.scale(a, spec)))(amaxes)
    assert_bit_identical(got, want)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(granularity="per_channel"),
        QuantSpec(granularity="per_group", group_size=32),
        QuantSpec(symmetric=False),
    ],
    ids=repr,
)
@pytest.mark.parametrize("vmapped", [False, True])
def test_compiled_hlo_keeps_a_true_divide(spec, vmapped):
    """XLA rewrites ``x / broadcast(s)`` as ``x * broadcast(1/s)``: the element-shaped
    division must survive compilation (plain and under ``vmap``)."""
    f = functools.partial(quant.quantize, spec=spec)
    x = jnp.ones((3, 64, 96) if vmapped else (64, 96), jnp.float32)
    hlo = jax.jit(jax.vmap(f) if vmapped else f).lower(x).compile().as_text()
    n = 64 * 96 * (3 if vmapped else 1)
    divides = [
        line
        for line in hlo.splitlines()
        if " divide(" in line
        and (shape := line.split("=", 1)[1].split("{")[0].strip())
        and shape.startswith("f32[")
        and np.prod(eval(shape[3:])) == n  # noqa: S307
    ]
    assert divides, "no element-shaped f32 divide left in the compiled HLO"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4),
        QuantSpec(bits=8, granularity="per_channel"),
        QuantSpec(bits=3, symmetric=False),
    ],
    ids=repr,
)
def test_low_precision_inputs_match_float32_reference_rounded_once(dtype, spec):
    """Reference for bfloat16/float16: the float32 reference on the (exactly) widened input,
    rounded to the input dtype once at the end (round to nearest even)."""
    x = jnp.asarray(np.random.default_rng(8).standard_t(3, (64, 32)), dtype)
    got = quant.quantize(x, spec)
    want = ref_quantize_exact(np.asarray(x), spec)
    assert want.dtype == np.asarray(x).dtype
    assert_bit_identical(got, want)
    assert_bit_identical(quant.fake_quant(x, spec), want)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8),
        QuantSpec(bits=16, granularity="per_channel"),
        QuantSpec(bits=5, symmetric=False),
    ],
    ids=repr,
)
def test_float64_bit_identical_to_float64_reference(spec):
    with jax.enable_x64(True):
        x = np.random.default_rng(9).standard_t(2, (96, 40))
        got = quant.quantize(jnp.asarray(x, jnp.float64), spec)
        assert got.dtype == jnp.float64
        assert_bit_identical(got, ref_quantize_exact(x, spec))


def test_symmetric_keeps_negative_zero():
    q = np.asarray(quant.quantize(jnp.array([-0.1, 1.0, 0.1], jnp.float32), QuantSpec(bits=2)))
    assert np.signbit(q[0]) and not np.signbit(q[2]) and q[0] == 0.0


def test_quantspec_to_dict_has_group_size():
    assert QuantSpec().to_dict() == {
        "bits": 8,
        "symmetric": True,
        "granularity": "per_tensor",
        "axis": -1,
        "narrow_range": True,
        "group_size": None,
    }
