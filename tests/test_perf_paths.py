"""The optimised paths (jaxsplit.programs, donation, batched host sync) give exactly what the
simple reference kernels give."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsplit import SplitConfig, kernels, merge_params, split_params
from jaxsplit import programs as dispatch
from jaxsplit.split import match_layers, split_with_report
from jaxsplit.thresholds import Percentile, Relative, Sigma, as_threshold

SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3e38, np.inf, -np.inf, np.nan], np.float32)


def _weights(shape, seed=0, special=True):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 1.5).astype(np.float32)
    if special:
        flat = w.reshape(-1)
        flat[: len(SPECIAL)] = SPECIAL[: flat.size]
    return w


_balance_fused = jax.jit(dispatch.balance_fused)
_count_codes = jax.jit(dispatch.count_codes)
_ref_split = jax.jit(kernels.split, static_argnums=0)


def _ref_counts(w, thr, twin=None):
    """``count_codes``'s figures from the reference kernels: the values whose twin is
    non-zero (``twin``; ``split_mask`` when not given), and the non-finite values."""
    m = np.asarray(kernels.split_mask(jnp.asarray(w), thr)) if twin is None else twin != 0
    return [int(m.sum()), int((~np.isfinite(w)).sum())]


@pytest.mark.parametrize("shape", [(7,), (64, 96), (2, 3, 4, 33), (5, 1)])
def test_balance_fused_is_bit_identical_to_reference(shape):
    w = jnp.asarray(_weights(shape))
    for thr in (0.0, 1.0, 2.5):
        ref = kernels.balance(w, thr)
        got = _balance_fused(w, thr)
        for a, b in zip(ref, got, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
            assert a.dtype == b.dtype


@pytest.mark.parametrize("shape", [(), (64, 96), (2, 3, 4, 33), (1, 31), (4, 0)])
def test_count_codes_match_a_plain_mask_sum(shape):
    w = _weights(shape) if np.prod(shape) else np.zeros(shape, np.float32)
    for thr in (0.0, 1.0, 1e30):
        got = _count_codes(jnp.asarray(w), thr).tolist()
        assert got == _ref_counts(w, thr)


@settings(max_examples=25, deadline=None)
# the smallest normal float32: ``split_mask`` selects it, but its half is subnormal and XLA
# on CPU flushes it to 0, so the kernel keeps it whole and it is not counted as split
@example(np.full(6, np.finfo(np.float32).tiny), 0.0)
@given(
    hnp.arrays(
        np.float32,
        st.sampled_from([(6,), (4, 9)]),  # few shapes: one compile each
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    st.floats(0, 10),
)
def test_fused_program_equals_reference_for_any_values(w, thr):
    (w1, w2), counts, t = dispatch.fused(
        jnp.asarray(w), thr, None, kind="absolute", method="balance"
    )
    r1, r2 = kernels.balance(jnp.asarray(w), np.float32(thr))
    assert np.array_equal(np.asarray(w1), np.asarray(r1), equal_nan=True)
    assert np.array_equal(np.asarray(w2), np.asarray(r2), equal_nan=True)
    assert counts.tolist() == _ref_counts(w, float(t), np.asarray(r2))
    # every counted value is one split_mask selects (the count never exceeds the mask's)
    assert counts.tolist()[0] <= _ref_counts(w, float(t))[0]


@pytest.mark.parametrize("spec", [1.0, Relative(0.5), Sigma(1.0), Percentile(90.0)])
def test_stats_thresholds_match_resolve_threshold(spec):

    w = jnp.asarray(_weights((33, 17), special=False))
    kind, value = as_threshold(spec).kind, as_threshold(spec).value
    counts, thr = dispatch.stats(w, value, kind=kind)
    assert float(thr) == float(as_threshold(spec).resolve(w))
    assert counts.tolist() == _ref_counts(np.asarray(w), float(thr))


@pytest.mark.parametrize("method", ["balance", "random"])
def test_apply_and_fused_equal_kernels_split(method):
    w = jnp.asarray(_weights((40, 24)))
    key = kernels.stochastic_key(3, "a/b")
    ref = _ref_split(method, w, 1.0, key)
    thr = jnp.float32(1.0)
    for got in (
        dispatch.apply(w, thr, key, method=method),
        dispatch.fused(w, 1.0, key, kind="absolute", method=method)[0],
    ):
        for a, b in zip(ref, got, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def _tree():
    return {
        "a": {"kernel": jnp.asarray(_weights((32, 16), 1, special=False)), "bias": jnp.zeros(16)},
        "b": {"kernel": jnp.asarray(_weights((16, 8), 2, special=False) * 0.01)},  # skipped
        "c": {"kernel": jnp.asarray(_weights((3, 3, 4, 8), 3, special=False))},
    }


@pytest.mark.parametrize("method", ["balance", "random"])
def test_split_params_equals_per_layer_reference(method):
    p = _tree()
    cfg = SplitConfig(layers=["*"], threshold=1.0, method=method, seed=5)
    p2, rep = split_with_report(p, cfg)
    assert [q.action for q in rep.layers] == ["split", "skip", "split"]
    for name in ("a", "c"):
        key = kernels.stochastic_key(5, name)
        r1, r2 = _ref_split(method, p[name]["kernel"], 1.0, key)
        assert np.array_equal(p2[name]["branch_0"]["kernel"], r1)
        assert np.array_equal(p2[name]["branch_1"]["kernel"], r2)
    assert p2["b"] is p["b"]


@pytest.mark.parametrize("method", ["balance", "random"])
def test_donated_split_equals_plain_split_and_consumes_split_kernels(method):
    cfg = SplitConfig(layers=["*"], threshold=1.0, method=method)
    plain, rep = split_with_report(_tree(), cfg)
    p = _tree()
    skipped = p["b"]["kernel"]
    donated, rep_d = split_with_report(p, cfg, donate=True)
    assert rep_d == rep
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(donated), strict=True):
        assert np.array_equal(a, b)
    assert p["a"]["kernel"].is_deleted() and p["c"]["kernel"].is_deleted()
    assert not skipped.is_deleted() and donated["b"]["kernel"] is skipped
    assert not p["a"]["bias"].is_deleted()


def test_donate_error_happens_before_anything_is_consumed():
    p = _tree()
    p["z"] = {"kernel": jnp.array([1.0, jnp.nan, 5.0])}
    with pytest.raises(ValueError, match="'z'.*non-finite"):
        split_params(p, SplitConfig(layers=["*"], threshold=1.0), donate=True)
    assert not any(x.is_deleted() for x in jax.tree.leaves(p))


def test_donate_keeps_shared_and_numpy_kernels_alive():
    shared = jnp.asarray(_weights((8, 8), 4, special=False))
    host = _weights((8, 8), 5, special=False)
    p = {"x": {"kernel": shared}, "y": {"kernel": shared}, "h": {"kernel": host}}
    before = host.copy()
    p2 = split_params(p, SplitConfig(layers=["*"], threshold=1.0), donate=True)
    assert not shared.is_deleted()
    assert np.array_equal(host, before)
    m = merge_params(p2)
    assert np.array_equal(m["x"]["kernel"], shared) and np.array_equal(m["h"]["kernel"], host)


def test_donate_must_be_a_bool():
    with pytest.raises(TypeError, match="donate must be a bool, got 'yes'"):
        split_params(_tree(), SplitConfig(layers=["a"]), donate="yes")


def test_match_layers_agrees_with_split_report():
    p, cfg = _tree(), SplitConfig(layers=["*"], threshold=Relative(0.5))
    assert match_layers(p, cfg).layers == split_with_report(p, cfg)[1].layers


def test_split_inside_jit_matches_eager():
    p, cfg = _tree(), SplitConfig(layers=["a", "c"], threshold=1.0)
    eager = split_params(p, cfg)
    traced = jax.jit(lambda t: split_params(t, cfg))(p)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        assert np.array_equal(a, b)


def test_one_host_sync_per_call(monkeypatch):
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
    split_params(_tree(), SplitConfig(layers=["*"], threshold=1.0))
    split_params(_tree(), SplitConfig(layers=["*"], threshold=1.0), donate=True)
    assert len(calls) == 2


def test_readme_performance_example_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Performance", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README performance example", "exec"), {})  # noqa: S102


def test_fused_balance_keeps_values_whose_half_flushes_to_zero():
    # regression (hypothesis found it): w - w/2 may compile to w * 0.5, flushed on CPU
    w = jnp.full((6,), np.finfo(np.float32).smallest_normal, jnp.float32)
    (w1, w2), _, _ = dispatch.fused(w, 0.0, None, kind="absolute", method="balance")
    assert np.array_equal(np.asarray(w1) + np.asarray(w2), np.asarray(w))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_count_codes_agree_with_the_balance_kernel_near_the_smallest_normal(dtype):
    """A value whose half flushes to zero stays whole on branch_0 and is not counted."""
    tiny = float(jnp.finfo(dtype).tiny)
    grid = np.array([0.5, 0.99, 1.0, 1.01, 1.5, 1.99, 2.0, 2.01, 3.0, 8.0]) * tiny
    w = jnp.asarray(np.concatenate([grid, -grid]).astype(dtype))
    for thr in (0.0, tiny):
        _, w2 = jax.jit(dispatch.balance_fused)(w, thr)
        counts = jax.jit(dispatch.count_codes)(w, thr).tolist()
        assert counts == [int(np.count_nonzero(np.asarray(w2))), 0]
        stats_n, _ = dispatch.stats(w, thr, kind="absolute")
        fused_n = dispatch.fused(w, thr, None, kind="absolute", method="balance")[1]
        assert stats_n.tolist() == fused_n.tolist() == counts


@pytest.mark.parametrize("method", ["balance", "clip"])
def test_dry_run_counts_equal_the_split(method):
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_t(3, (40, 24)).astype(np.float32))
    cfg = SplitConfig(layers=["d"], threshold=1.0, method=method)
    dry = js_match(cfg, w)
    _, rep = js_split(cfg, w)
    assert dry == rep.layers[0].n_split
    p2 = split_params({"d": {"kernel": w}}, cfg)
    assert dry == int(np.count_nonzero(np.asarray(p2["d"]["branch_1"]["kernel"])))


def js_match(cfg, w):
    from jaxsplit import match_layers

    return match_layers({"d": {"kernel": w}}, cfg).layers[0].n_split


def js_split(cfg, w):
    from jaxsplit import split_with_report

    return split_with_report({"d": {"kernel": w}}, cfg)


@pytest.mark.parametrize(
    ("method", "threshold"),
    [("balance", 1.0), ("clip", Relative(0.5, per_channel=True)), ("balance", Sigma(2.0))],
)
def test_grouped_small_kernels_match_one_program_per_kernel(method, threshold, monkeypatch):
    from jaxsplit import split as split_mod

    n = split_mod.GROUP + 3  # one full group and a group of the three left
    ws = [_weights((6, 8), seed=i) for i in range(n)]
    tree = {f"L{i}": {"kernel": jnp.asarray(w)} for i, w in enumerate(ws)}
    cfg = SplitConfig(layers=["*"], threshold=threshold, method=method, allow_nonfinite=True)
    sizes, real = [], dispatch.fused_group
    monkeypatch.setattr(
        dispatch, "fused_group", lambda ws, *a, **k: sizes.append(len(ws)) or real(ws, *a, **k)
    )
    out, rep = split_with_report(tree, cfg)
    assert sizes == [split_mod.GROUP, 3]
    kind, value, axis = split_mod._rule(cfg, ws[0])
    for i, w in enumerate(ws):
        branches, counts, thr = dispatch.fused(
            jnp.asarray(w), value, None, kind=kind, axis=axis, method=method
        )
        plan = rep.layers[i]
        assert plan.n_split == int(counts[0])
        if plan.action == "skip":  # nothing above the threshold: the layer is untouched
            assert out[f"L{i}"] is tree[f"L{i}"]
            continue
        for b, ref in zip(("branch_0", "branch_1"), branches, strict=True):
            assert np.array_equal(
                np.asarray(out[f"L{i}"][b]["kernel"]).view(np.uint32),
                np.asarray(ref).view(np.uint32),
            )
        assert plan.threshold == split_mod._host_threshold(np.asarray(thr))
