"""Issue 12: tree-wide budget, calibration-aware search, the snap method, mixed-precision twins."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsplit as js
from jaxsplit import kernels, measure, screen, search
from jaxsplit.calibration import input_rows

INT4 = js.QuantSpec(bits=4)


def _tree(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": {"kernel": (rng.standard_t(3 + i, size=(32 * (i + 1), 48)) * 0.02).astype("f4")}
        for i in range(n)
    }


def _total_sq(p, p2, spec=INT4):
    return sum(r.mse_after * r.n_total for r in js.quant_error(p, p2, spec).layers)


def test_tree_scope_respects_budget_and_beats_layer_scope():
    p = _tree()
    n = sum(v["kernel"].size for v in p.values())
    out = {}
    for scope in ("layer", "tree"):
        cfg = js.SplitConfig(layers=["*"], threshold=js.Auto(INT4, max_extra=0.03, scope=scope))
        p2, rep = js.split_with_report(p, cfg)
        merged = js.merge_params(p2)
        for k in p:
            assert np.array_equal(np.asarray(merged[k]["kernel"]), p[k]["kernel"])
        extra = sum(lay.auto.extra_nonzero for lay in rep.layers)
        assert extra <= 0.03 * n
        out[scope] = (_total_sq(p, p2), rep)
    assert out["tree"][0] <= out["layer"][0] * (1 + 1e-6)
    shares = [lay.auto.budget_share for lay in out["tree"][1].layers]
    assert all(s is not None and 0 <= s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9
    assert all(lay.auto.budget_share is None for lay in out["layer"][1].layers)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.floats(0, 40))
def test_allocate_never_exceeds_budget_nor_loses_to_layer_scope(seed, budget):
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(1, 5))
    extras = [rng.integers(0, 20, size=8) for _ in range(layers)]
    base = [float(rng.uniform(1, 10)) for _ in range(layers)]
    scores = [rng.uniform(0, 12, size=8) for _ in range(layers)]
    share = [budget / layers] * layers
    picks = search.allocate(extras, scores, base, budget, layer_budgets=share)
    used = sum(e[i] for i, e in zip(picks, extras, strict=True) if i >= 0)
    assert used <= budget + 1e-9

    def total(ch):
        return sum(b if i < 0 else s[i] for i, s, b in zip(ch, scores, base, strict=True))

    alt = [
        search.layer_choice(e, s, b, lb)
        for e, s, b, lb in zip(extras, scores, base, share, strict=True)
    ]
    assert total(picks) <= total(alt) + 1e-9
    assert total(picks) <= sum(base) + 1e-9


def test_scope_is_validated():
    with pytest.raises(
        js.ConfigError, match=r"Auto.scope must be one of \['layer', 'tree'\], got 'x'"
    ):
        js.Auto(INT4, scope="x")
    with pytest.raises(js.ConfigError) as e:
        js.Auto(INT4, scope="tree")
    assert e.value.field == "max_extra"


def test_calibrated_choice_has_no_larger_output_error():
    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, size=(64, 32)) * 0.02).astype("f4")
    p = {"d": {"kernel": w}}
    c = (rng.uniform(0, 1, 64) ** 4 * 10).astype("f4")  # a few hot input features
    for cal in (c, np.diag(c) + 0.01):
        cfg = js.SplitConfig(layers=["d"], threshold=js.Auto(INT4, max_extra=0.02))
        plain = js.split_params(p, cfg)
        p_cal, rep = js.split_with_report(p, cfg, calibration={"d": cal})

        def out_err(tree, cal=cal):
            lay = js.find_layers(tree)["d"]
            ws = [b["kernel"] for k, b in sorted(lay.node.items())] if lay.branches else [w]
            return float(measure.measure(jnp.asarray(w), ws, INT4, calibration=cal).output_error)

        assert out_err(p_cal) <= out_err(plain) * (1 + 1e-5)
        assert rep.layers[0].auto.output_error == pytest.approx(out_err(p_cal), rel=1e-4)
        assert out_err(p_cal) <= rep.layers[0].auto.output_error_unsplit


def test_calibration_errors_name_the_path_and_shapes():
    p = {"d": {"kernel": np.ones((4, 2), "f4")}}
    cfg = js.SplitConfig(layers=["d"], threshold=js.Auto(INT4))
    with pytest.raises(
        js.CalibrationError, match=r"calibration\['d'\] has shape \(3,\).*\(4,\) or \(4, 4\)"
    ):
        js.split_params(p, cfg, calibration={"d": np.ones(3)})
    with pytest.raises(js.CalibrationError, match="'e' is not a layer path; available: \\['d'\\]"):
        js.match_layers(p, cfg, calibration={"e": np.ones(4)})


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=2, padding="SAME")(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_calibrate_linen_conv_rows_reproduce_the_layer():
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 3))
    m = _Net()
    v = m.init(jax.random.key(0), x)
    c = js.calibrate(m, v, [x, x * 2])
    k = v["params"]["Conv_0"]["kernel"]
    assert c["Conv_0"].shape == (27, 27) and c["Dense_0"].shape == (64, 64)
    rows = input_rows(nn.Conv(4, (3, 3), strides=2), x)
    y = nn.Conv(4, (3, 3), strides=2, use_bias=False).apply({"params": {"kernel": k}}, x)
    np.testing.assert_allclose(rows @ k.reshape(-1, 4), y.reshape(-1, 4), rtol=1e-4, atol=1e-5)
    want = (rows.T @ rows) * 2.5 / rows.shape[0]  # mean of x² and (2x)² moments
    np.testing.assert_allclose(c["Conv_0"], want, rtol=1e-4, atol=1e-5)
    diag = js.calibrate(m, v, [x], kind="diagonal")
    np.testing.assert_allclose(
        diag["Dense_0"], np.diag(js.calibrate(m, v, [x])["Dense_0"]), rtol=1e-5
    )


def test_calibrate_nnx():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    x = jnp.arange(6.0).reshape(2, 3)
    c = js.calibrate(model, None, [x], kind="diagonal")
    assert sorted(c) == ["layers/0", "layers/1"]
    np.testing.assert_allclose(c["layers/0"], np.mean(np.asarray(x) ** 2, axis=0), rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, width=32, allow_subnormal=True), min_size=1, max_size=40),
    st.floats(0, 50, width=32),
    st.integers(2, 8),
    st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
)
def test_snap_is_exact(vals, t, bits, dtype):
    w = jnp.asarray(np.asarray(vals, np.float32)).astype(dtype)
    ws = kernels.split("snap", w, t, spec=js.QuantSpec(bits=bits))
    assert np.array_equal(np.asarray(kernels.branch_sum(ws)), np.asarray(w))
    assert not np.any(np.asarray(ws[1])[np.abs(np.asarray(w, np.float32)) <= np.float32(dtype(t))])


def test_snap_twin_lands_on_its_grid_and_beats_clip_at_int4():
    w = jnp.asarray(_tree()["l0"]["kernel"])
    thr = jnp.float32(np.quantile(np.abs(np.asarray(w)), 0.97))
    w1, w2 = kernels.snap(w, thr, INT4)
    np.testing.assert_allclose(js.quant.quantize(w2, INT4), w2, atol=1e-6)
    snap_mse = measure.measure(w, (w1, w2), INT4).mse
    clip_mse = measure.measure(w, kernels.clip(w, thr), INT4).mse
    assert snap_mse < clip_mse


def test_auto_never_worse_than_unsplit_or_any_candidate():
    w = jnp.asarray(_tree(5)["l1"]["kernel"])
    a = js.Auto(INT4, max_extra=0.05, candidates=16)
    _, info = search.search(w, None, auto=a, method="auto")
    c = search.curve(w, None, spec=INT4, candidates=16, method="auto")
    ok = np.asarray(c["m"].extra_nonzero) <= 0.05 * w.size
    assert float(info["mse"]) <= float(np.min(np.asarray(c["m"].mse)[ok])) * (1 + 1e-6)
    assert float(info["mse"]) <= float(info["mse_unsplit"])


def test_mixed_precision_twin_and_effective_bits():
    p = _tree(1, n=1)
    int8 = js.QuantSpec(bits=8)
    cfg = js.SplitConfig(layers=["*"], threshold=js.Auto(INT4, max_extra=0.02, twin_spec=int8))
    p2, rep = js.split_with_report(p, cfg)
    row = js.quant_error(p, p2, INT4, twin_spec=int8).layers[0]
    ch = rep.layers[0].auto
    assert ch.mse == pytest.approx(row.mse_after, rel=1e-5)
    nnz = int(np.count_nonzero(np.asarray(p2["l0"]["branch_1"]["kernel"])))
    assert row.effective_bits == pytest.approx(measure.effective_bits(row.n_total, nnz, 4, 8))
    assert ch.effective_bits == pytest.approx(row.effective_bits)
    # with a twin spec the budget counts the twins' non-zeros (what is stored), so an empty
    # branch_0 beside a dense int8 twin cannot pass for "no extra non-zeros"
    assert cfg.threshold.cost == "twin" and nnz <= 0.02 * row.n_total
    assert row.effective_bits <= 4 + 0.02 * (8 + measure.INDEX_BITS) + 1e-6


def _ckpt(tmp_path):
    path = str(tmp_path / "w.npz")
    js.io.save({"params": _tree(2)}, path)
    return path


def test_cli_split_auto_tree_budget_and_calibration(tmp_path, capsys):
    import json

    from cli_helpers import assert_cli_error, run_cli

    ck = _ckpt(tmp_path)
    cal = str(tmp_path / "c.npz")
    np.savez(cal, **{"l0": np.ones(32, "f4"), "l1": np.ones((64, 64), "f4")})
    out = str(tmp_path / "o.npz")
    r = run_cli(capsys, "split", ck, out, "--layers", "*", "--threshold", "auto", "--bits", "4",
                "--budget", "0.03", "--calibration", cal, "--json")  # fmt: skip
    assert r[0] == 0, r
    d = json.loads(r[1])
    extra = sum(lay["auto"]["extra_nonzero"] for lay in d["layers"])
    assert extra <= 0.03 * sum(lay["n_total"] for lay in d["layers"])
    assert all(lay["auto"]["budget_share"] is not None for lay in d["layers"])
    merged = js.merge_params(js.io.load(out))
    assert np.array_equal(merged["params"]["l2"]["kernel"], _tree(2)["l2"]["kernel"])
    bad = run_cli(capsys, "split", ck, out, "--layers", "*", "--threshold", "rel:0.5",
                  "--budget", "0.03")  # fmt: skip
    assert_cli_error(bad, 2, "--budget needs --threshold auto")
    r = run_cli(capsys, "sweep", ck, "--thresholds", "auto", "rel:0.5", "--methods", "auto",
                "clip", "--bits", "4", "--budget", "0.03", "--json")  # fmt: skip
    assert r[0] == 0, r
    rows = json.loads(r[1])["rows"]
    assert {row["threshold"] for row in rows} == {"rel:0.5", "auto:tree"}


def test_readme_frontier_example_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### The int4 frontier", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README frontier example", "exec"), ns)  # noqa: S102
    rep = ns["report"]
    assert [p.path for p in rep.layers] == ["layers_0", "layers_2"]
    assert sum(p.auto.extra_nonzero for p in rep.layers) <= 0.05 * (16 * 64 + 64 * 8)


def test_frontier_table_small_and_readme_matches_results():
    import pathlib

    from experiments import frontier

    text = frontier.table(small=True, candidates=8)
    for bits, budget in frontier.TARGETS:
        assert f"### int{bits}, budget {budget:.0%} extra non-zeros" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 * (1 + len(frontier.configs(small=True)))
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] != "method":
            assert float(cells[5]) <= 5.0 + 1e-9  # extra % within the largest budget
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split(frontier.START, 1)[1].split(frontier.END, 1)[0].strip()
    results = frontier.RESULTS.read_text()
    assert table and table in results


def _moments(rng, d, hot=0.1):
    """``E[x xᵀ]`` of correlated inputs with a few hot features (what transformers feed)."""
    x = rng.normal(size=(256, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    x = x * (1 + 4 * (rng.uniform(size=d) < hot))
    return (x.T @ x / len(x)).astype("f4")


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10**6),
    st.floats(0.5, 0.999),
    st.sampled_from([3, 4, 6]),
    st.sampled_from([jnp.float32, jnp.bfloat16]),
    st.booleans(),
)
def test_compensate_is_exact_and_keeps_snaps_support(seed, q, bits, dtype, calibrated):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_t(3, size=(24, 8)) * 0.02, dtype)
    t = float(np.quantile(np.abs(np.asarray(w, np.float32)), q))
    cal = jnp.asarray(_moments(rng, 24)) if calibrated else None
    spec = js.QuantSpec(bits=bits)
    ws = kernels.split("compensate", w, t, spec=spec, calibration=cal)
    assert np.array_equal(np.asarray(kernels.branch_sum(ws)), np.asarray(w))
    snap_twin = np.asarray(kernels.snap(w, t, spec)[1]) != 0
    assert not np.any(np.asarray(ws[1])[~snap_twin])  # no value outside snap's support


@pytest.mark.parametrize("bits", [4, 6])
def test_compensate_never_worse_than_snap_in_output_error(bits):
    rng = np.random.default_rng(bits)
    spec = js.QuantSpec(bits=bits)
    w = jnp.asarray((rng.standard_t(3, size=(48, 32)) * 0.02).astype("f4"))
    c = jnp.asarray(_moments(rng, 48))
    wins = 0
    for q in (0.8, 0.9, 0.95):
        t = float(np.quantile(np.abs(np.asarray(w)), q))
        snap = measure.measure(w, kernels.snap(w, t, spec), spec, calibration=c)
        comp = measure.measure(w, kernels.compensate(w, t, spec, c), spec, calibration=c)
        plain = measure.measure(w, kernels.compensate(w, t, spec), spec)
        assert float(comp.output_error) <= float(snap.output_error) * (1 + 1e-5)
        assert float(plain.mse) <= float(snap.mse) * (1 + 1e-5)  # uncalibrated: nearest w
        assert int(comp.extra_nonzero) <= int(snap.extra_nonzero)
        wins += float(comp.output_error) < 0.95 * float(snap.output_error)
    assert wins >= 2  # correlated inputs: the compensation removes > 5% of the error


def test_auto_compensate_calibrated_beats_uncalibrated_choice_tree_and_layer():
    rng = np.random.default_rng(7)
    p = {f"l{i}": {"kernel": (rng.standard_t(3, size=(48, 16)) * 0.02).astype("f4")}
         for i in range(3)}  # fmt: skip
    cal = {k: _moments(rng, 48) for k in p}
    n = sum(v["kernel"].size for v in p.values())
    for scope in ("layer", "tree"):
        auto = js.Auto(INT4, candidates=8, max_extra=0.05, scope=scope)
        cfg = js.SplitConfig(layers=["*"], threshold=auto, method="compensate")
        plain = js.split_params(p, cfg)
        p_cal, rep = js.split_with_report(p, cfg, calibration=cal)
        merged = js.merge_params(p_cal)
        assert all(np.array_equal(merged[k]["kernel"], p[k]["kernel"]) for k in p)
        assert sum(lay.auto.extra_nonzero for lay in rep.layers) <= 0.05 * n

        def out_err(tree, k):
            lay = js.find_layers(tree)[k]
            ws = [lay.node[f"branch_{i}"]["kernel"] for i in range(lay.branches)]
            ws = ws or [lay.array]
            m = measure.measure(jnp.asarray(p[k]["kernel"]), ws, INT4, calibration=cal[k])
            return float(m.output_error)

        cal_total = sum(out_err(p_cal, k) for k in p)
        assert cal_total <= sum(out_err(plain, k) for k in p) * (1 + 1e-5)
        for lay in rep.layers:
            assert lay.auto.output_error == pytest.approx(out_err(p_cal, lay.path), rel=1e-4)


def test_grid_puts_the_twin_on_the_twin_specs_grid():
    w = jnp.asarray(_tree()["l0"]["kernel"])
    int8 = js.QuantSpec(bits=8)
    t = float(np.quantile(np.abs(np.asarray(w)), 0.95))
    w1, w2 = kernels.split("grid", w, t, spec=INT4, twin_spec=int8)
    assert np.array_equal(np.asarray(kernels.branch_sum((w1, w2))), np.asarray(w))
    np.testing.assert_allclose(js.quant.quantize(w2, int8), w2, atol=1e-7)
    cfg = js.SplitConfig(
        layers=["*"], threshold=js.Auto(INT4, max_extra=0.03, twin_spec=int8), method="grid"
    )
    p2, rep = js.split_with_report(_tree(), cfg)
    for lay in rep.layers:
        if lay.auto.split:
            b2 = np.asarray(p2[lay.path]["branch_1"]["kernel"])
            np.testing.assert_allclose(np.asarray(js.quant.quantize(b2, int8)), b2, atol=1e-7)


def test_snap_and_compensate_need_a_symmetric_spec():
    asym = js.QuantSpec(bits=4, symmetric=False)
    for m in ("snap", "compensate"):
        with pytest.raises(js.ConfigError, match=f"method='{m}' needs a symmetric QuantSpec"):
            js.SplitConfig(layers=["*"], threshold=0.1, method=m, spec=asym)


def test_calibrate_einsum_linen_gemma_and_nnx():
    import gemma_like as gl

    from jaxsplit.calibration import einsum_rows

    tokens = jnp.array([[1, 5, 7, 2], [3, 3, 9, 0]])
    m = gl.Transformer()
    v = m.init(jax.random.key(0), tokens)
    c = js.calibrate(m, v, [tokens])
    paths = set(js.find_layers(v, weights=gl.GEMMA_WEIGHTS))
    want = {f"layer_{i}/{k}" for i in range(2) for k in (
        "attn/q_einsum", "attn/kv_einsum", "attn/attn_vec_einsum", "mlp/gating_einsum",
        "mlp/linear")}  # fmt: skip
    assert want <= set(c) and set(c) <= paths
    for path in want:  # the moments fit the kernel: calibration is accepted and used
        k = js.find_layers(v, weights=gl.GEMMA_WEIGHTS)[path].array
        measure.calibration_check(path, tuple(k.shape), c[path])
    # rows reproduce the einsum: rows @ W == output with W's last axis last
    x = jax.random.normal(jax.random.key(2), (2, 3, 16))
    w = jax.random.normal(jax.random.key(3), (4, 16, 8))
    rows = einsum_rows("BTD,NDH->BTNH", x, w.shape)
    np.testing.assert_allclose(
        rows @ w.reshape(-1, 8), jnp.einsum("BTD,NDH->BTNH", x, w).reshape(-1, 8), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip
    # linen nn.Einsum and nnx.Einsum
    lin = nn.Einsum((3, 5), "bi,ij->bj", use_bias=False)
    xs = jax.random.normal(jax.random.key(4), (6, 3))
    cl = js.calibrate(lin, lin.init(jax.random.key(0), xs), [xs])
    np.testing.assert_allclose(cl[""], np.asarray(xs.T @ xs) / 6, rtol=1e-5)
    nx = nnx.Einsum("bi,ij->bj", (3, 5), rngs=nnx.Rngs(0))
    cn = js.calibrate(nnx.Sequential(nx), None, [xs])
    np.testing.assert_allclose(cn["layers/0"], np.asarray(xs.T @ xs) / 6, rtol=1e-5)
    # and a calibrated split of the Gemma tree stays exact
    cfg = js.SplitConfig(layers=["**/mlp/*", "**/attn/*"], weights=gl.GEMMA_WEIGHTS,
                         threshold=js.Auto(INT4, candidates=4, max_extra=0.05),
                         method="compensate")  # fmt: skip
    hv = gl.heavy_tailed(v)
    cal = {p: c[p] for p in want}
    v2 = js.split_params(hv, cfg, calibration=cal)
    merged = js.merge_params(v2)
    for path in want:
        a = js.find_layers(merged, weights=gl.GEMMA_WEIGHTS)[path].array
        b = js.find_layers(hv, weights=gl.GEMMA_WEIGHTS)[path].array
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_screened_compensate_uses_the_calibration_in_both_scopes():
    """On kernels the screen handles (>= 2**18 values) the measured candidates and the final
    split get the calibration too: the reported output error is the split's own."""
    rng = np.random.default_rng(11)
    w = (rng.standard_t(3, size=(512, 512)) * 0.02).astype("f4")
    assert screen.applies(w.shape, INT4, ("compensate",))
    p, cal = {"big": {"kernel": w}}, {"big": _moments(rng, 512)}
    for scope in ("layer", "tree"):
        auto = js.Auto(INT4, candidates=16, max_extra=0.02, scope=scope)
        cfg = js.SplitConfig(layers=["big"], threshold=auto, method="compensate")
        p2, rep = js.split_with_report(p, cfg, calibration=cal)
        lay = js.find_layers(p2)["big"]
        ws = [lay.node[f"branch_{i}"]["kernel"] for i in range(lay.branches)]
        got = measure.measure(jnp.asarray(w), ws, INT4, calibration=cal["big"])
        assert rep.layers[0].auto.extra_nonzero > 1000  # enough twin values to compensate
        assert rep.layers[0].auto.output_error == pytest.approx(float(got.output_error), rel=1e-5)
        uncal = kernels.compensate(jnp.asarray(w), rep.layers[0].threshold, INT4)
        plain = measure.measure(jnp.asarray(w), uncal, INT4, calibration=cal["big"])
        assert float(got.output_error) < float(plain.output_error)
