"""Issue 12 (int6 frontier): ``js.sensitivity`` and ``Auto(scope="tree")`` weighted by it."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import calibration, split

INT4 = js.QuantSpec(bits=4)


def _linear(n=6, d=5, h=4, o=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(d, h)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(h, o)), jnp.float32)
    v = {"params": {"a": {"kernel": a}, "b": {"kernel": b}}}

    def apply_fn(v, x):
        return x @ v["params"]["a"]["kernel"] @ v["params"]["b"]["kernel"]

    return apply_fn, v, x, a, b


def test_mse_sensitivity_is_the_gauss_newton_trace_per_value():
    apply_fn, v, x, a, b = _linear()
    n, o = x.shape[0], b.shape[1]
    s = js.sensitivity(apply_fn, v, [x], metric="mse", probes=256, seed=1)
    # E_Z ||x Z B||² = ||x||² ||B||², E_Z ||u Z||² = ||u||² · o; mean over the n·o outputs
    want_a = float(jnp.sum(x**2) * jnp.sum(b**2)) / (n * o) / a.size
    want_b = float(jnp.sum((x @ a) ** 2) * o) / (n * o) / b.size
    assert s["a"] == pytest.approx(want_a, rel=0.05)
    assert s["b"] == pytest.approx(want_b, rel=0.05)


def test_mse_sensitivity_exact_where_the_probe_norm_is_fixed():
    # one-hot rows: every output tangent is a ±1 probe entry, so each probe is exact
    v = {"params": {"d": {"kernel": jnp.ones((3, 2))}}}
    x = jnp.eye(3)
    s = js.sensitivity(lambda v, x: 2 * x @ v["params"]["d"]["kernel"], v, [x, x], metric="mse")
    assert s == {"d": pytest.approx(4.0 / 6)}


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6)(jnp.tanh(nn.Dense(8)(x)))


def test_cosine_sensitivity_predicts_the_output_cost_of_small_weight_noise():
    m = _Net()
    x = jax.random.normal(jax.random.key(0), (32, 5))
    v = m.init(jax.random.key(1), x)
    s = js.sensitivity(m.apply, v, [x], probes=32)
    assert set(s) == {"Dense_0", "Dense_1"}
    y = m.apply(v, x)
    rng = np.random.default_rng(0)
    for path, sigma in (("Dense_0", 1e-3), ("Dense_1", 1e-3)):
        k = v["params"][path]["kernel"]
        costs = []
        for _ in range(32):
            dw = jnp.asarray(rng.normal(size=k.shape) * sigma, jnp.float32)
            v2 = {"params": {**v["params"], path: {**v["params"][path], "kernel": k + dw}}}
            y2 = m.apply(v2, x)
            cos = jnp.sum(y * y2, 1) / (jnp.linalg.norm(y, axis=1) * jnp.linalg.norm(y2, axis=1))
            costs.append(float(jnp.mean(1 - cos)) / float(jnp.sum(dw**2)))
        assert s[path] == pytest.approx(np.mean(costs), rel=0.25)


def test_output_metric_cosine_ignores_changes_along_the_output():
    y = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    assert float(calibration.output_metric(y, 0.5 * y, "cosine")) == 0.0
    t = jnp.array([[-4.0, 3.0], [1.0, 1.0]])  # orthogonal to row 0; row 1 (y = 0) counts 0
    assert float(calibration.output_metric(y, t, "cosine")) == pytest.approx(0.25)


def test_sensitivity_errors():
    apply_fn, v, x, *_ = _linear()
    with pytest.raises(js.ConfigError, match=r"metric must be one of \['cosine', 'mse'\]"):
        js.sensitivity(apply_fn, v, [x], metric="kl")
    for bad in (0, 1.5, True):
        with pytest.raises(js.ConfigError, match="probes must be an int >= 1"):
            js.sensitivity(apply_fn, v, [x], probes=bad)
    with pytest.raises(js.ConfigError, match="at least one batch"):
        js.sensitivity(apply_fn, v, [])
    with pytest.raises(js.errors.UnmatchedPatternError, match="nope"):
        js.sensitivity(apply_fn, v, [x], layers=["nope"])
    p2 = js.split_params(v, js.SplitConfig(layers=["a"], threshold=js.Relative(0.5)))
    with pytest.raises(js.errors.AlreadySplitError, match="merge_params first"):
        js.sensitivity(apply_fn, p2, [x])


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(64, 48)) * 0.02).astype("f4")
    return {"a": {"kernel": w}, "b": {"kernel": w.copy()}}


def _tree_cfg(budget=0.02):
    return js.SplitConfig(layers=["*"], threshold=js.Auto(INT4, max_extra=budget, scope="tree"))


def _extra(rep):
    return {lay.path: lay.auto.extra_nonzero for lay in rep.layers}


def test_tree_budget_follows_the_sensitivity():
    p, cfg = _tree(), _tree_cfg()
    n = sum(v["kernel"].size for v in p.values())
    for heavy, light in (("a", "b"), ("b", "a")):
        p2, rep = js.split_with_report(p, cfg, sensitivity={heavy: 1000.0, light: 1.0})
        merged = js.merge_params(p2)
        for k in p:
            assert np.array_equal(np.asarray(merged[k]["kernel"]), p[k]["kernel"])
        ex = _extra(rep)
        assert sum(ex.values()) <= 0.02 * n
        assert ex[heavy] > ex[light]  # twin layers: the weighted one gets the budget


def test_uniform_sensitivity_changes_nothing_and_zero_leaves_a_layer_whole():
    p, cfg = _tree(1), _tree_cfg()
    p2, rep = js.split_with_report(p, cfg)
    p3, rep3 = js.split_with_report(p, cfg, sensitivity={"a": 7.5, "b": 7.5})
    assert _extra(rep) == _extra(rep3)
    for k in p:
        for i in (0, 1):
            b2, b3 = p2[k][f"branch_{i}"]["kernel"], p3[k][f"branch_{i}"]["kernel"]
            assert np.array_equal(np.asarray(b2), np.asarray(b3))
    _, rep0 = js.split_with_report(p, cfg, sensitivity={"a": 0.0, "b": 1.0})
    by = {lay.path: lay for lay in rep0.layers}
    assert by["a"].action == "skip" and by["b"].auto.extra_nonzero > 0


def test_weighted_allocation_minimises_the_weighted_total():
    p, cfg = _tree(2), _tree_cfg(0.03)
    lays = list(js.find_layers(p).values())
    curves = split.tree_curves(lays, cfg)
    w = [50.0, 1.0]
    picks = split.tree_picks(curves, cfg, sensitivity=w)
    plain = split.tree_picks(curves, cfg)

    def total(ch):
        return sum(
            wi * (c.score0 if i < 0 else c.score.reshape(-1)[i])
            for wi, c, i in zip(w, curves, ch, strict=True)
        )

    assert picks != plain and total(picks) < total(plain)
    budget = 0.03 * sum(c.size for c in curves)
    used = sum(
        0 if i < 0 else int(np.asarray(c.m.extra_nonzero).reshape(-1)[i])
        for c, i in zip(curves, picks, strict=True)
    )
    assert used <= budget
    with pytest.raises(js.ConfigError, match=r"one weight per curve \(2\), got 1"):
        split.tree_picks(curves, cfg, sensitivity=[1.0])


def test_sensitivity_validation(caplog):
    p, cfg = _tree(), _tree_cfg()
    with pytest.raises(js.errors.CalibrationError, match=r"no entry for \['b'\]"):
        js.split_params(p, cfg, sensitivity={"a": 1.0})
    with pytest.raises(js.errors.CalibrationError, match="'c' is not a layer path"):
        js.split_params(p, cfg, sensitivity={"a": 1.0, "b": 1.0, "c": 1.0})
    for bad in (-1.0, float("nan"), float("inf"), "1", None, True):
        with pytest.raises(js.errors.CalibrationError, match="must be a finite number >= 0"):
            js.split_params(p, cfg, sensitivity={"a": bad, "b": 1.0})
    with pytest.raises(js.errors.ConfigTypeError, match="sensitivity must be a mapping"):
        js.split_params(p, cfg, sensitivity=[1.0, 2.0])
    layer = js.SplitConfig(layers=["*"], threshold=js.Auto(INT4, max_extra=0.02))
    with caplog.at_level(logging.WARNING, logger="jaxsplit"):
        p2 = js.split_params(p, layer, sensitivity={"a": 1000.0})
    assert "only changes Auto(scope='tree')" in caplog.text
    p3 = js.split_params(p, layer)
    for k in p:
        assert np.array_equal(np.asarray(p2[k]["branch_1"]["kernel"]),
                              np.asarray(p3[k]["branch_1"]["kernel"]))  # fmt: skip
    rep = js.match_layers(p, cfg, sensitivity={"a": 1000.0, "b": 1.0})
    assert [q.action for q in rep.layers] == ["split", "split"]


def test_plan_tree_needs_every_curve_weighted():
    p, cfg = _tree(), _tree_cfg()
    lays = list(js.find_layers(p).values())
    curves = dict(zip(["a", "b"], split.tree_curves(lays, cfg), strict=True))
    with pytest.raises(js.errors.CalibrationError, match=r"no entry for \['b'\]"):
        split.plan_tree(curves, cfg, sensitivity={"a": 1.0})
    plan = split.plan_tree(curves, cfg, sensitivity={"a": 1.0, "b": 1.0})
    assert plan.picks == split.plan_tree(curves, cfg).picks
