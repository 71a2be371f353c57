"""jaxsplit.table: 16-bit kernels measured and split from their value table, exactly."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import io, kernels, programs, split, stream, table
from jaxsplit import search as auto
from jaxsplit.quant import QuantSpec
from jaxsplit.tree import find_layers

SHAPE = (512, 512)  # table.MIN_SIZE values
SPECS = [QuantSpec(bits=4), QuantSpec(bits=8), QuantSpec(bits=4, symmetric=False)]


def _student_t(shape, seed=0, dtype=ml_dtypes.bfloat16, df=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(df, size=shape) * 0.02).astype(dtype)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_value_table_counts_every_value_once_and_indexes_its_pattern(dtype):
    w = _student_t((300, 1000), 1, dtype)
    w.reshape(-1)[:4] = [0.0, -0.0, np.inf, np.nan]
    t = table.value_table(w)
    bits = w.reshape(-1).view(np.uint16)
    assert t.size == w.size and int(t.counts.sum()) == w.size
    assert t.values.dtype == w.dtype and len(t.values) >= table.MIN_ENTRIES
    assert len(t.values) & (len(t.values) - 1) == 0  # a power of two
    present = t.counts > 0
    assert len(np.unique(t.values[present].view(np.uint16))) == int(present.sum())
    np.testing.assert_array_equal(t.values[t.index[bits]].view(np.uint16), bits)
    np.testing.assert_array_equal(np.bincount(t.index[bits], minlength=len(t.values)), t.counts)


def test_value_table_rejects_other_dtypes():
    with pytest.raises(TypeError, match="16-bit floating"):
        table.value_table(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="16-bit floating"):
        table.value_table(np.zeros(4, np.int16))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_split_table_equals_the_kernel_split_bit_for_bit(spec, dtype):
    w = jnp.asarray(_student_t(SHAPE, 2, dtype))
    t = table.value_table(w)
    methods = auto.search_methods("auto", spec)
    thr = auto.candidate_thresholds(w, spec, 16)
    for m in methods:
        for ti in (0, 3, 9, 12, 15):
            a = programs.apply(w, thr[ti], None, method=m, spec=spec)
            b = table.split_table(w, t.values, t.index, thr[ti], None, method=m, spec=spec)
            for x, y in zip(a, b, strict=True):
                assert np.array_equal(np.asarray(x).view(np.uint16), np.asarray(y).view(np.uint16))
            assert np.array_equal(kernels.branch_sum(b), w)


def test_split_table_with_four_branches_and_a_twin_spec():
    w = jnp.asarray(_student_t(SHAPE, 3))
    t = table.value_table(w)
    spec, twin = QuantSpec(bits=4), QuantSpec(bits=8)
    a = programs.apply(w, 0.05, None, method="balance", branches=4, spec=spec)
    b = table.split_table(w, t.values, t.index, 0.05, None, method="balance", branches=4, spec=spec)
    assert len(b) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for m in ("snap", "compensate", "grid"):
        a = programs.apply(w, 0.05, None, method=m, spec=spec, twin_spec=twin)
        b = table.split_table(w, t.values, t.index, 0.05, None, method=m, spec=spec, twin_spec=twin)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "spec",
    [pytest.param(s, marks=pytest.mark.optimized) if s.bits == 8 else s for s in SPECS],
    ids=str,
)
def test_table_curve_equals_the_exhaustive_curve(spec):
    w = jnp.asarray(_student_t(SHAPE, 4))
    t = table.value_table(w)
    thr = auto.finite_thresholds(w, spec=spec, candidates=16)
    c = jax.device_get(auto.table_curve(t.values, t.counts, t.size, thr, spec=spec, method="auto"))
    e = jax.device_get(auto.curve(w, None, spec=spec, candidates=16, method="auto"))
    np.testing.assert_array_equal(c["thresholds"], e["thresholds"])
    for f in ("extra_nonzero", "twin_nonzero", "effective_bits", "extra_fraction"):
        np.testing.assert_array_equal(getattr(c["m"], f), getattr(e["m"], f))
    np.testing.assert_allclose(c["score"], e["score"], rtol=1e-5)
    np.testing.assert_allclose(c["score0"], e["score0"], rtol=1e-5)
    assert np.isnan(c["m"].mse_widrow).all() and np.isnan(c["m"].output_error).all()


def test_table_curve_with_a_twin_spec_equals_the_exhaustive_curve():
    w = jnp.asarray(_student_t(SHAPE, 5))
    spec, twin = QuantSpec(bits=4), QuantSpec(bits=8)
    t = table.value_table(w)
    thr = auto.finite_thresholds(w, spec=spec, candidates=8)
    c = auto.table_curve(t.values, t.counts, t.size, thr, spec=spec, method="auto", twin_spec=twin)
    e = auto.curve(w, None, spec=spec, candidates=8, method="auto", twin_spec=twin)
    np.testing.assert_array_equal(c["m"].extra_nonzero, e["m"].extra_nonzero)
    np.testing.assert_allclose(c["score"], e["score"], rtol=1e-5)


def test_applies_only_where_the_split_is_a_function_of_each_value():
    q = QuantSpec(bits=4)
    bf = jnp.bfloat16
    assert table.applies(bf, SHAPE, q, ("clip", "compensate")) and table.applies(
        np.float16, SHAPE, q, ("grid",)
    )
    assert not table.applies(np.float32, SHAPE, q, ("clip",))
    assert not table.applies(bf, (8, 8), q, ("clip",))
    assert not table.applies(bf, SHAPE, q, ("clip", "random"))
    assert not table.applies(bf, SHAPE, QuantSpec(bits=4, granularity="per_channel"), ("clip",))
    assert not table.applies(bf, SHAPE, q, ("clip",), calibrated=True)
    per_channel = QuantSpec(bits=8, granularity="per_channel")
    assert not table.applies(bf, SHAPE, q, ("clip",), twin_spec=per_channel)


def _bf16_tree():
    # two layers of one shape (one compile of each program), one twice the size
    sizes = {"a": (512, 512), "b": (512, 512), "c": (256, 2048), "small": (64, 32)}
    return {
        "params": {
            k: {"kernel": _student_t(s, 10 + i, df=3 + 2 * i)}
            for i, (k, s) in enumerate(sizes.items())
        }
    }


def test_tree_scope_on_bf16_layers_uses_the_table_and_is_exhaustive():
    """Every candidate of a tabled layer is measured (the curve is the exhaustive one), so
    the allocation equals the one over exhaustive curves; the reported figures are the
    output's measured ones, and the split merges back bit for bit."""
    tree = _bf16_tree()
    a = js.Auto(QuantSpec(bits=4), candidates=16, max_extra=0.01, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=a, method="auto")
    lays = list(find_layers(tree).values())
    methods = auto.search_methods("auto", a.spec)
    tabled = [table.applies(lay.array.dtype, lay.array.shape, a.spec, methods) for lay in lays]
    assert tabled == [True, True, True, False]
    curves = split.tree_curves(lays, cfg)
    assert all(np.isfinite(c.score).all() for c, t in zip(curves, tabled, strict=True) if t)
    exh = []
    for lay in lays:
        c = jax.device_get(auto.curve(lay.array, None, spec=a.spec, candidates=16, method="auto"))
        thr, score = np.asarray(c["thresholds"]), np.asarray(c["score"])
        exh.append(
            split.LayerCurve(thr, c["m"], c["base"], score, float(c["score0"]), lay.array.size)
        )
    assert split.tree_picks(curves, cfg) == split.tree_picks(exh, cfg)
    p2, rep = js.split_with_report(tree, cfg)
    assert len(rep.split_paths) >= 2
    merged = js.merge_params(p2)
    for lay, plan in zip(lays, rep.layers, strict=True):
        k = tree["params"][lay.path.split("/")[-1]]["kernel"]
        assert np.array_equal(merged["params"][lay.path.split("/")[-1]]["kernel"], k)
        if plan.action == "split":
            node = p2["params"][lay.path.split("/")[-1]]
            ws = [node[f"branch_{i}"]["kernel"] for i in range(2)]
            m = js.measure.measure(jnp.asarray(k), [jnp.asarray(x) for x in ws], a.spec)
            assert float(m.mse) == pytest.approx(plan.auto.mse, rel=1e-5)
            assert int(m.extra_nonzero) == plan.auto.extra_nonzero
    assert sum(p.auto.extra_nonzero for p in rep.layers) <= a.max_extra * sum(
        lay.array.size for lay in lays
    )


def test_tree_scope_builds_each_value_table_once(monkeypatch):
    """The in-memory tree split measures and splits a tabled kernel from one table."""
    tree = _bf16_tree()
    a = js.Auto(QuantSpec(bits=4), candidates=16, max_extra=0.01, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=a, method="auto")
    ref_tree, ref = js.split_with_report(tree, cfg)
    built = []
    real = table.value_table
    monkeypatch.setattr(
        table, "value_table", lambda w, *a, **k: built.append(1) or real(w, *a, **k)
    )
    got_tree, got = js.split_with_report(tree, cfg)
    assert len(built) == 3  # the three tabled layers, once each (curve and split)
    assert got.to_dict() == ref.to_dict()
    flat = lambda t: {"/".join(k): np.asarray(v) for k, v in js.tree.leaf_items(t, ())}  # noqa: E731
    want = flat(ref_tree)
    for k, v in flat(got_tree).items():
        assert np.array_equal(v.view(np.uint8), want[k].view(np.uint8)), k


def test_tree_scope_bf16_stream_equals_in_memory(tmp_path):
    tree = _bf16_tree()
    src = io.save(tree, tmp_path / "src.safetensors")
    a = js.Auto(QuantSpec(bits=4), candidates=16, max_extra=0.02, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=a, method="auto")
    rep = stream.split_checkpoint(src, tmp_path / "out.safetensors", cfg)
    ref_tree, ref = js.split_with_report(io.load(src), cfg)
    out, want = (
        io.load(tmp_path / "out.safetensors"),
        io.load(io.save(ref_tree, tmp_path / "r.npz")),
    )
    flat = lambda t: {"/".join(k): np.asarray(v) for k, v in js.tree.leaf_items(t, ())}  # noqa: E731
    got, ref_leaves = flat(out), flat(want)
    assert sorted(got) == sorted(ref_leaves)
    for k, v in ref_leaves.items():
        assert got[k].dtype == v.dtype and np.array_equal(
            got[k].view(np.uint8), v.view(np.uint8)
        ), k
    assert rep.report.to_dict() == ref.to_dict()
    merged = js.merge_params(out)
    for k, v in tree["params"].items():
        assert np.array_equal(
            merged["params"][k]["kernel"].view(np.uint16), v["kernel"].view(np.uint16)
        )


def test_split_table_keeps_non_finite_values_as_the_kernel_split_does():
    w = _student_t(SHAPE, 6)
    w.reshape(-1)[[5, 77, 901]] = [np.inf, -np.inf, np.nan]
    w = jnp.asarray(w)
    t = table.value_table(w)
    for m in ("clip", "snap", "compensate", "balance"):
        a = programs.apply(w, 0.04, None, method=m, spec=QuantSpec(bits=4))
        b = table.split_table(w, t.values, t.index, 0.04, None, method=m, spec=QuantSpec(bits=4))
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(np.asarray(x).view(np.uint16), np.asarray(y).view(np.uint16)), m
