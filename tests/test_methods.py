"""Methods beyond PPQ (clip, grid, residual, k-way balance) and per-channel thresholds.

The contract under test: every method's branches sum back to ``W`` bit for bit (in the
left-to-right order ``merge_params`` uses), values at or below the threshold stay whole
on ``branch_0``, and each method delivers the error reduction it promises.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxsplit as js
from jaxsplit import kernels
from jaxsplit.config import Auto
from jaxsplit.quant import QuantSpec, quantize
from jaxsplit.thresholds import as_threshold

SPEC4 = QuantSpec(bits=4)
CASES = [
    ("balance", 2),
    ("balance", 4),
    ("balance", 8),
    ("clip", 2),
    ("grid", 2),
    ("residual", 2),
    ("snap", 2),
    ("compensate", 2),
]


@functools.partial(jax.jit, static_argnames=("method", "branches", "spec"))
def _split(method, w, thr, branches=2, spec=SPEC4):
    return kernels.split(method, jnp.asarray(w), thr, branches=branches, spec=spec)


def _np_sum(branches):
    """numpy's left-to-right sum (IEEE, no flushing): the exactness oracle."""
    total = np.asarray(branches[0]).copy()
    for b in branches[1:]:
        total = total + np.asarray(b)
    return total


# one shape, so each method compiles once; magnitudes spread over 12 decades
finite_f32 = hnp.arrays(
    np.float32, (4, 6), elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)
)


@pytest.mark.parametrize("method, branches", CASES)
@settings(max_examples=40, deadline=None)
@given(w=finite_f32, frac=st.floats(0.0, 1.0))
def test_branches_sum_to_w_bit_exactly(method, branches, w, frac):
    thr = frac * float(np.max(np.abs(w)))
    bs = _split(method, w, thr, branches)
    assert len(bs) == branches and all(b.dtype == w.dtype for b in bs)
    assert np.array_equal(kernels.branch_sum(bs), w)
    assert np.array_equal(_np_sum(bs), w)
    # values at or below the threshold stay whole on branch_0
    keep = ~np.asarray(kernels.split_mask(jnp.asarray(w), thr))
    assert np.array_equal(np.asarray(bs[0])[keep], w[keep])
    for b in bs[1:]:
        assert not np.any(np.asarray(b)[keep])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method, branches", CASES)
def test_exact_in_every_float_dtype(method, branches, dtype):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_t(3, size=(37, 11)), dtype)
    bs = _split(method, w, 0.1, branches)
    assert all(b.dtype == dtype for b in bs)
    assert np.array_equal(np.asarray(js.kernels.branch_sum(bs)), np.asarray(w))


def test_exact_for_tiny_and_huge_values():
    # subnormals (flushed to zero by XLA on CPU) and values near the float32 maximum
    w = jnp.array([1e-40, -3e-39, 1.2e-38, 3.0e38, -3.4e38, 7.0, 0.0, -0.0], jnp.float32)
    for method, branches in CASES:
        bs = _split(method, w, 0.0, branches)
        assert np.array_equal(kernels.branch_sum(bs), w), method
        assert np.all(np.isfinite(np.asarray(bs))), method


def test_nonfinite_values_stay_on_branch_0():
    w = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 5.0])
    for method, branches in CASES:
        bs = _split(method, w, 1.0, branches)
        assert np.array_equal(np.asarray(bs[0])[:3], np.asarray(w)[:3], equal_nan=True)
        assert all(np.array_equal(np.asarray(b)[:3], [0, 0, 0]) for b in bs[1:])


def test_clip_moves_only_the_excess():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_t(3, size=(64, 64)), jnp.float32)
    t = 0.7
    w1, w2 = kernels.clip(w, t)
    ulp = np.spacing(np.abs(np.asarray(w)))
    assert np.all(np.abs(np.asarray(w1)) <= np.float32(t) + ulp)
    big = np.abs(np.asarray(w)) > np.float32(t)
    assert np.array_equal(np.asarray(w2) != 0, big)
    assert np.allclose(np.asarray(w2)[big], np.asarray(w)[big] - np.sign(w)[big] * t, atol=1e-6)


def test_kway_shares_are_equal_to_an_ulp():
    w = jnp.array([3.0, -1.0000001, 7.5e-3, 2.5e-4], jnp.float32)
    for k in (4, 8):
        bs = np.asarray(kernels.balance(w, 1e-3, branches=k))
        share = np.asarray(w) / k
        for i in (0, 1, 2):  # split values: every branch within (k-1) ulps of w / k
            assert np.all(np.abs(bs[:, i] - share[i]) <= (k - 1) * np.spacing(abs(w[i])))
        assert np.array_equal(bs[:, 3], np.float32([2.5e-4] + [0.0] * (k - 1)))


def test_grid_twin_is_on_its_grid_and_beats_balance():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)
    spec = QuantSpec(bits=4)
    w1, w2 = kernels.grid(w, 0.0, spec)
    assert np.allclose(quantize(w2, spec), w2, rtol=0, atol=1e-6)  # branch_1 rounds exactly

    def mse(bs):
        return float(jnp.mean((sum(quantize(b, spec) for b in bs) - w) ** 2))

    base = float(jnp.mean((quantize(w, spec) - w) ** 2))
    assert mse((w1, w2)) < 0.3 * base  # ~75% cut at every threshold <= max/2
    assert mse((w1, w2)) < 0.5 * mse(kernels.balance(w, 0.0))


def test_residual_branch_0_is_q_w():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(128, 32)), jnp.float32)
    spec = QuantSpec(bits=4, granularity="per_channel")
    w1, w2 = kernels.residual(w, 0.0, spec)
    assert np.array_equal(w1, quantize(w, spec))
    recon = quantize(w1, spec) + quantize(w2, spec)
    base = float(jnp.mean((quantize(w, spec) - w) ** 2))
    assert float(jnp.mean((recon - w) ** 2)) < 0.01 * base


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda w: kernels.split("halves", w, 0.0), ["method", "'halves'", "clip"]),
        (lambda w: kernels.split("balance", w, 0.0, branches=3), ["branches", "3", "[2, 4, 8]"]),
        (lambda w: kernels.split("clip", w, 0.0, branches=4), ["branches=4", "'balance'"]),
        (lambda w: kernels.split("grid", w, 0.0), ["'grid'", "QuantSpec"]),
        (lambda w: kernels.split("random", w, 0.0), ["'random'", "key"]),
        (
            lambda w: kernels.grid(w, 0.0, QuantSpec(bits=4, symmetric=False)),
            ["'grid'", "symmetric"],
        ),
    ],
)
def test_kernel_errors_name_the_argument(call, words):
    with pytest.raises(ValueError) as e:
        call(jnp.ones(3))
    assert all(word in str(e.value) for word in words), str(e.value)


# --- per-channel thresholds --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, ref",
    [
        (js.Relative(0.5, per_channel=True), lambda a: 0.5 * np.abs(a).max(0)),
        (js.Sigma(2, per_channel=True), lambda a: 2 * a.std(0)),
        (js.Percentile(90, per_channel=True), lambda a: np.percentile(np.abs(a), 90, axis=0)),
    ],
)
def test_per_channel_thresholds_follow_each_output_channel(spec, ref):
    rng = np.random.default_rng(5)
    w = rng.normal(size=(50, 6)).astype(np.float32) * np.array([1, 2, 4, 8, 0.1, 0.01], np.float32)
    thr = np.asarray(as_threshold(spec).resolve(jnp.asarray(w)))
    assert thr.shape == (1, 6)
    np.testing.assert_allclose(thr[0], ref(w), rtol=1e-5)


def test_per_channel_split_reports_and_roundtrips():
    rng = np.random.default_rng(6)
    k = rng.normal(size=(40, 5)).astype(np.float32) * np.array([1, 10, 100, 0.1, 1], np.float32)
    p = {"d": {"kernel": k, "bias": np.zeros(5, np.float32)}}
    cfg = js.SplitConfig(layers=["d"], threshold=js.Relative(0.5, per_channel=True), method="clip")
    p2, rep = js.split_with_report(p, cfg)
    assert np.array_equal(js.merge_params(p2)["d"]["kernel"], k)
    thr = rep.layers[0].threshold
    assert isinstance(thr, tuple) and len(thr) == 5
    np.testing.assert_allclose(thr, 0.5 * np.abs(k).max(0), rtol=1e-6)
    w2 = np.asarray(p2["d"]["branch_1"]["kernel"])
    assert np.all((w2 != 0).sum(0) >= 1)  # every channel, however small, gets split
    assert rep.layers[0].n_split == int((np.abs(k) > 0.5 * np.abs(k).max(0)).sum())


# --- through split_params -----------------------------------------------------------------


@pytest.mark.parametrize("method, branches", CASES)
def test_split_params_roundtrip_and_structure(method, branches):
    rng = np.random.default_rng(7)
    p = {
        "params": {
            "a": {"kernel": rng.standard_t(3, size=(16, 8)).astype(np.float32), "bias": np.ones(8)},
            "b": {"embedding": rng.normal(size=(10, 4)).astype(np.float32)},
        }
    }
    cfg = js.SplitConfig(
        layers=["*"], threshold=js.Relative(0.25), method=method, branches=branches, spec=SPEC4
    )
    p2 = js.split_params(p, cfg)
    a = p2["params"]["a"]
    assert sorted(a) == [f"branch_{i}" for i in range(branches)]
    assert sorted(a["branch_0"]) == ["bias", "kernel"]
    assert all(list(a[f"branch_{i}"]) == ["kernel"] for i in range(1, branches))
    m = js.merge_params(p2)["params"]
    assert np.array_equal(m["a"]["kernel"], p["params"]["a"]["kernel"])
    assert np.array_equal(m["b"]["embedding"], p["params"]["b"]["embedding"])


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(branches=3), ValueError, ["SplitConfig.branches", "3", "[2, 4, 8]"]),
        (dict(branches=True), ValueError, ["SplitConfig.branches", "True"]),
        (dict(branches=4, method="clip"), ValueError, ["branches=4", "'balance'", "'clip'"]),
        (dict(method="grid"), ValueError, ["'grid'", "spec=QuantSpec"]),
        (dict(method="residual"), ValueError, ["'residual'", "spec=QuantSpec"]),
        (
            dict(method="grid", spec=QuantSpec(bits=8, symmetric=False)),
            ValueError,
            ["'grid'", "symmetric"],
        ),
        (dict(spec=8), TypeError, ["SplitConfig.spec", "8"]),
        (dict(method="auto"), ValueError, ["method='auto'", "Auto(spec)"]),
        (
            dict(threshold=Auto(QuantSpec(bits=8)), spec=QuantSpec(bits=4)),
            ValueError,
            ["SplitConfig.spec", "Auto"],
        ),
    ],
)
def test_config_errors_name_field_and_value(kwargs, exc, words):
    with pytest.raises(exc) as e:
        js.SplitConfig(layers=["a"], **kwargs)
    assert all(word in str(e.value) for word in words), str(e.value)


@pytest.mark.parametrize("cls", [js.Relative, js.Sigma, js.Percentile])
def test_per_channel_flag_must_be_bool(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__}.per_channel must be a bool, got 1"):
        cls(0.5, per_channel=1)


def test_config_spec_property_and_hashable():
    auto = Auto(QuantSpec(bits=6))
    cfg = js.SplitConfig(layers=["a"], threshold=auto, method="auto")
    assert cfg.spec == QuantSpec(bits=6) and hash(cfg) == hash(
        js.SplitConfig(layers=["a"], threshold=auto, method="auto")
    )
    assert js.SplitConfig(layers=["a"], method="grid", spec=SPEC4).spec == SPEC4
    assert js.SplitConfig(layers=["a"]).spec is None


@pytest.mark.parametrize("method", ["clip", "grid", "residual"])
def test_no_fallback_inside_compiled_loops(method):
    # XLA may fuse ``w - n * s`` into one FMA inside loops; the kernels must not rely on
    # a rounding that the compiler can skip (the guard would hide it by not splitting)
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.standard_t(3, size=(64, 32)) * 0.02, jnp.float32)
    spec = QuantSpec(bits=8)

    def n_moved(t):
        bs = kernels.split(method, w, t, spec=spec)
        return jnp.sum(bs[1] != 0), jnp.sum(kernels.branch_sum(bs) != w)

    moved, wrong = jax.lax.map(n_moved, jnp.array([0.0, 0.01]))
    eager = [int(jnp.sum(_split(method, w, t, spec=spec)[1] != 0)) for t in (0.0, 0.01)]
    assert moved.tolist() == eager and wrong.tolist() == [0, 0]


# --- README -------------------------------------------------------------------------------


def _readme_section():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text, text.split("## Methods beyond PPQ", 1)[1].split("\n## ", 1)[0]


def test_readme_methods_example_runs_and_prints_what_it_says(capsys):
    _, section = _readme_section()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README methods example", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out.strip()
    assert f"# {printed}" in code, printed


@pytest.mark.optimized
def test_readme_methods_table_is_what_the_code_produces():
    from experiments import methods_table

    text, _ = _readme_section()
    assert methods_table.readme_table(text) == methods_table.markdown()


def test_random_near_smallest_normal_stays_exact():
    # ``w - w*u`` is subnormal here and XLA on CPU flushes it: the guard keeps w whole
    import ml_dtypes

    w = np.full(64, 1.34998e-38, ml_dtypes.bfloat16)
    w1, w2 = (np.asarray(b) for b in jax.jit(kernels.random)(w, 0.0, jax.random.key(0)))
    assert np.array_equal((w1 + w2).view(np.uint16), w.view(np.uint16))
