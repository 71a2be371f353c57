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
from jaxsplit import kernels, measure, search
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
