"""Auto thresholds: the compiled per-layer search, its guarantees and its report."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import kernels
from jaxsplit import search as auto
from jaxsplit.quant import QuantSpec, quantize

INT8 = QuantSpec(bits=8)


def _student_t(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)


def _mse(w, branches, spec):
    recon = sum(quantize(b, spec) for b in branches)
    return float(jnp.mean((recon - w) ** 2))


def test_clip_auto_cuts_int8_mse_by_95_percent_on_student_t_1024():
    w = jnp.asarray(_student_t((1024, 1024)))
    ws, info = auto.search(w, None, auto=js.Auto(INT8), method="clip")
    c = auto.choice(info, ("clip",), 64)
    assert c.split and c.method == "clip"
    assert c.reduction >= 0.95, c
    # the reported MSE is the measured one, and the branches are exact
    assert c.mse == pytest.approx(_mse(w, ws, INT8), rel=1e-5)
    assert c.mse_unsplit == pytest.approx(_mse(w, (w,), INT8), rel=1e-5)
    assert np.array_equal(kernels.branch_sum(ws), w)
    assert c.extra_fraction == pytest.approx(float(jnp.count_nonzero(ws[1])) / w.size)


@pytest.mark.parametrize("method", ["balance", "auto"])
def test_auto_never_worse_than_best_fixed_balance(method):
    w = jnp.asarray(_student_t((96, 64), seed=1))
    spec = QuantSpec(bits=6)
    fixed = [
        _mse(w, kernels.balance(w, f * float(jnp.max(jnp.abs(w)))), spec)
        for f in np.arange(16) / 16
    ]
    _, info = auto.search(w, None, auto=js.Auto(spec), method=method)
    assert float(info["mse"]) <= min(fixed) * (1 + 1e-6)
    assert float(info["mse"]) < float(info["mse_unsplit"])


def test_untouched_when_nothing_helps():
    # every value is on the unsplit grid already: no split can lower the error
    w = jnp.asarray(np.tile(np.float32([7.0, -7.0, 3.0, 0.0]), (8, 4)))
    p = {"d": {"kernel": w}}
    cfg = js.SplitConfig(layers=["d"], threshold=js.Auto(QuantSpec(bits=4)), method="auto")
    p2, rep = js.split_with_report(p, cfg)
    assert p2["d"] is p["d"]
    plan = rep.layers[0]
    assert plan.action == "skip" and plan.reason == "no candidate beats not splitting"
    assert plan.auto is not None and not plan.auto.split and plan.auto.extra_fraction == 0.0


def test_budget_on_extra_nonzeros_is_respected():
    w = jnp.asarray(_student_t((128, 64), seed=2))
    results = []
    for budget in (None, 0.05, 0.01, 0.002):
        ws, info = auto.search(w, None, auto=js.Auto(INT8, max_extra=budget), method="auto")
        c = auto.choice(info, auto.search_methods("auto", INT8), 64)
        extra = (sum(int(jnp.count_nonzero(b)) for b in ws) - int(jnp.count_nonzero(w))) / w.size
        assert c.extra_fraction == pytest.approx(extra)
        if budget is not None:
            assert extra <= budget
        results.append(c)
    mses = [c.mse for c in results]
    assert mses == sorted(mses)  # a tighter budget never helps
    assert results[0].method == "residual"  # no budget: the dense error-compensating twin
    assert (
        results[2].method in ("clip", "grid", "snap", "compensate") and results[2].reduction > 0.9
    )


def test_per_channel_spec_gives_per_channel_thresholds():
    k = _student_t((64, 6), seed=3) * np.float32([1, 10, 100, 0.1, 1, 3])
    spec = QuantSpec(bits=4, granularity="per_channel")
    p = {"d": {"kernel": k}}
    cfg = js.SplitConfig(layers=["d"], threshold=js.Auto(spec, candidates=16), method="clip")
    p2, rep = js.split_with_report(p, cfg)
    plan = rep.layers[0]
    assert plan.action == "split" and len(plan.threshold) == 6
    assert plan.auto.threshold == plan.threshold
    thr = np.asarray(plan.threshold, np.float32)
    assert np.all(thr <= np.abs(k).max(0))
    assert np.array_equal(js.merge_params(p2)["d"]["kernel"], k)
    assert plan.n_split == int((np.abs(k) > thr).sum())


def test_report_dry_run_and_log(caplog):
    p = {"a": {"kernel": _student_t((32, 16), seed=4)}, "b": {"kernel": _student_t((16, 8), 5)}}
    cfg = js.SplitConfig(
        layers=["*"], threshold=js.Auto(INT8, candidates=8, max_extra=0.1), method="auto"
    )
    dry = js.match_layers(p, cfg)
    with caplog.at_level("INFO", logger="jaxsplit"):
        p2, rep = js.split_with_report(p, dataclasses.replace(cfg, verbose=True))
    assert [q.to_dict() for q in dry.layers] == [q.to_dict() for q in rep.layers]
    a = rep.layers[0]
    d = a.to_dict()["auto"]
    assert d["method"] in auto.AUTO_METHODS and d["candidates"] == len(auto.AUTO_METHODS) * 8
    assert d["mse"] < d["mse_unsplit"] and 0 < d["extra_fraction"] <= 0.1
    assert "auto: " in caplog.text and "mse" in caplog.text
    m = js.merge_params(p2)
    assert all(np.array_equal(m[k]["kernel"], p[k]["kernel"]) for k in p)


def test_traced_split_matches_eager():
    p = {"a": {"kernel": _student_t((32, 16), seed=6)}}
    cfg = js.SplitConfig(layers=["a"], threshold=js.Auto(INT8, candidates=8), method="clip")
    eager = js.split_params(p, cfg)
    traced = jax.jit(lambda q: js.split_params(q, cfg))(p)
    for i in (0, 1):
        b = f"branch_{i}"
        assert np.array_equal(eager["a"][b]["kernel"], traced["a"][b]["kernel"])


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(spec=8), TypeError, ["Auto.spec", "8", "QuantSpec"]),
        (dict(spec=INT8, candidates=1), ValueError, ["Auto.candidates", "1", "[2, 1024]"]),
        (dict(spec=INT8, candidates=2.5), TypeError, ["Auto.candidates", "2.5"]),
        (dict(spec=INT8, max_extra=-0.1), ValueError, ["Auto.max_extra", "-0.1"]),
        (dict(spec=INT8, max_extra="1%"), TypeError, ["Auto.max_extra", "'1%'"]),
    ],
)
def test_auto_errors_name_field_and_value(kwargs, exc, words):
    with pytest.raises(exc) as e:
        js.Auto(**kwargs)
    assert all(word in str(e.value) for word in words), str(e.value)


def test_candidate_thresholds_include_relative_half_and_top_values():
    w = jnp.asarray(_student_t((100, 10), seed=7))
    thr = np.asarray(auto.candidate_thresholds(w, INT8, 64))
    m = float(jnp.max(jnp.abs(w)))
    assert thr.shape == (64,)
    assert np.isclose(thr, 0.5 * m, rtol=1e-6).any() and thr[0] == 0.0
    counts = [(np.abs(np.asarray(w)) > t).sum() for t in thr[32:]]
    assert counts[0] == 1 and max(counts) <= w.size // 2
