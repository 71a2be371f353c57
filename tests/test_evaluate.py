"""evaluate.py / evaluate_format.py: quant_error against an independent numpy implementation."""

import contextlib
import copy
import io
import json
import math
import os
import pathlib
import re

import flax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from quant_reference import ref_layer
from rich.console import Console

import jaxsplit as js
from jaxsplit.evaluate import Report, quant_error, sqnr_db
from jaxsplit.quant import QuantSpec


def _params():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "Conv_0": {
                "kernel": (rng.standard_t(3, (3, 3, 4, 8)) * 0.1).astype(np.float32),
                "bias": np.zeros(8, np.float32),
            },
            "block": {"Dense_0": {"kernel": rng.normal(0, 0.05, (64, 32)).astype(np.float32)}},
            "Dense_1": {"kernel": rng.normal(0, 0.05, (32, 10)).astype(np.float32)},
        },
        "batch_stats": {"mean": np.zeros(3, np.float32)},
    }


def _branches(node):
    if "branch_0" not in node:
        return [node["kernel"]]
    return [node[f"branch_{i}"]["kernel"] for i in range(len(node))]


def _numpy_random_split(p, k=3):
    """A k-way random-share split built in numpy (branches sum to W up to float rounding)."""
    rng = np.random.default_rng(7)
    out = copy.deepcopy(p)
    for path in ("Conv_0", "Dense_1"):
        node = out["params"][path]
        w = node["kernel"]
        mask = np.abs(w) > 2 * w.std()
        shares = rng.dirichlet(np.ones(k), w.shape).astype(np.float32)
        ws = [np.where(mask, w * shares[..., i], 0).astype(np.float32) for i in range(k - 1)]
        ws = [np.where(mask, w - sum(ws), w).astype(np.float32), *ws]
        branches = {"branch_0": {**node, "kernel": ws[0]}}
        branches.update({f"branch_{i}": {"kernel": ws[i]} for i in range(1, k)})
        out["params"][path] = branches
    return out


CFGS = [js.SplitConfig(layers=["Conv_0", "block/*"], threshold=js.Relative(0.5))]
SPECS = [QuantSpec(), QuantSpec(bits=4, granularity="per_channel")]


@pytest.mark.parametrize("case", ["balance", "random-3way-per-channel"])
def test_rows_match_independent_numpy(case):
    p = _params()
    if case == "balance":
        p2, spec = js.split_params(p, CFGS[0]), SPECS[0]
    else:
        p2, spec = _numpy_random_split(p), SPECS[1]
    report = quant_error(p, p2, spec)
    found = js.find_layers(p2)
    assert [r.path for r in report.layers] == ["Conv_0", "block/Dense_0", "Dense_1"]
    for row in report.layers:
        lay = found[row.path]
        bs = _branches(lay.node)
        want = ref_layer(js.find_layers(p)[row.path].array, bs, spec)
        got = row.to_dict()
        assert row.branches == len(bs)
        for key in ("n_split", "extra_nonzero"):
            assert got[key] == want[key], (row.path, key)
        for key in ("maxabs", "scale", "signal"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (row.path, key)
        for key in ("maxabs_branches", "scale_branches"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (row.path, key)
        for key in ("mse_before", "mse_after", "pred_before", "pred_after"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (row.path, key)


def test_unsplit_layer_row_compares_with_itself():
    p = _params()
    p2 = js.split_params(p, CFGS[0])
    row = quant_error(p, p2, QuantSpec()).layers[2]
    assert (row.path, row.branches, row.n_split, row.extra_nonzero) == ("Dense_1", 1, 0, 0)
    assert row.mse_after == row.mse_before and row.reduction == 0.0
    assert row.pred_after == row.pred_after_corr == row.pred_before


def test_balance_at_half_max_figures():
    """Hand-checkable: both branch scales are s/2, split values keep their full error."""
    w = np.array([[0.25, -1.0], [4.0, 0.5]], np.float32)
    p = {"d": {"kernel": w}}
    p2 = js.split_params(p, js.SplitConfig(layers=["d"], threshold=2.0))
    r = quant_error(p, p2, QuantSpec(bits=3)).layers[0]
    s = 4.0 / 3
    assert r.scale == pytest.approx(s) and r.scale_branches == pytest.approx((s / 2, s / 2))
    assert r.maxabs_branches == (2.0, 2.0)
    assert r.mse_before == pytest.approx((1 / 16 + 1 / 9 + 1 / 4) / 4, rel=1e-6)
    assert r.mse_after == pytest.approx((1 / 16 + 1 / 9 + 1 / 36) / 4, rel=1e-6)
    # naive: 4 + 1 non-zeros at (s/2)²/12; corrected: the split value counts 4x (2²)
    assert r.pred_after == pytest.approx(5 / 4 * (s / 2) ** 2 / 12, rel=1e-6)
    assert r.pred_after_corr == pytest.approx((3 + 4) / 4 * (s / 2) ** 2 / 12, rel=1e-6)
    assert r.sqnr_before == pytest.approx(10 * math.log10(np.mean(w**2) / r.mse_before))
    assert r.reduction == pytest.approx(1 - r.mse_after / r.mse_before)


@pytest.mark.parametrize("wrap", ["dict", "frozen", "params_only", "nnx_state"])
def test_tree_kinds(wrap):
    if wrap == "nnx_state":
        model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)))
        p = nnx.state(model, nnx.Param)
        cfg = js.SplitConfig(layers=["**"], threshold=js.Relative(0.5))
    else:
        p = _params()
        cfg = CFGS[0]
        if wrap == "frozen":
            p = flax.core.freeze(p)
        elif wrap == "params_only":
            p = p["params"]
    p2 = js.split_params(p, cfg)
    report = quant_error(p, p2, QuantSpec())
    assert report.layers and all(r.mse_after <= r.mse_before for r in report.layers)
    assert any(r.branches == 2 for r in report.layers)


def test_totals_are_element_weighted():
    p = _params()
    report = quant_error(p, js.split_params(p, CFGS[0]), QuantSpec())
    t = report.total()
    rows = report.layers
    n = sum(r.n_total for r in rows)
    assert t["n_total"] == n == 3 * 3 * 4 * 8 + 64 * 32 + 32 * 10
    assert t["layers"] == 3 and t["layers_split"] == 2
    assert t["extra_nonzero"] == sum(r.extra_nonzero for r in rows) == t["n_split"]
    before = sum(r.mse_before * r.n_total for r in rows) / n
    after = sum(r.mse_after * r.n_total for r in rows) / n
    assert t["mse_before"] == pytest.approx(before) and t["mse_after"] == pytest.approx(after)
    assert t["reduction"] == pytest.approx(1 - after / before)
    signal = sum(r.signal * r.n_total for r in rows) / n
    assert t["sqnr_after"] == pytest.approx(10 * math.log10(signal / after))


def test_to_dict_is_plain_python_and_json():
    p = _params()
    d = quant_error(p, js.split_params(p, CFGS[0]), QuantSpec()).to_dict()
    text = json.dumps(d)
    assert json.loads(text)["spec"]["bits"] == 8
    row = d["layers"][0]
    assert type(row["mse_after"]) is float and type(row["n_split"]) is int
    assert type(row["scale_branches"]) is list and type(row["shape"]) is list
    assert set(d["total"]) >= {"mse_before", "mse_after", "extra_nonzero", "reduction"}


def test_markdown_and_rich_table():
    p = _params()
    report = quant_error(p, js.split_params(p, CFGS[0]), QuantSpec())
    md = js.render.markdown(report)
    lines = md.splitlines()
    assert lines[0].startswith("*int8 symmetric per_tensor")
    assert lines[2].startswith("| layer | shape | split | +nnz |")
    assert len(lines) == 4 + 3 + 1 + 2 and lines[-3].startswith("| **total (2/3 split)**")
    assert lines[-1].startswith("*cost: +") and "sparse +" in lines[-1]  # twin_cost, both forms
    assert f"{100 * report.layers[0].reduction:.1f}%" in lines[4]
    table = js.render.rich_table(report)
    assert table.row_count == 4
    out = io.StringIO()
    Console(file=out, width=250, record=True).print(table)
    assert "block/Dense_0" in out.getvalue() and "error removed" in out.getvalue()


def test_inputs_not_mutated():
    p = _params()
    p2 = js.split_params(p, CFGS[0])
    before, before2 = copy.deepcopy(p), copy.deepcopy(p2)
    quant_error(p, p2, QuantSpec())
    for a, b in ((p, before), (p2, before2)):
        flat_a = flax.traverse_util.flatten_dict(a)
        flat_b = flax.traverse_util.flatten_dict(b)
        assert flat_a.keys() == flat_b.keys()
        assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


def test_errors():
    p = _params()
    p2 = js.split_params(p, CFGS[0])
    with pytest.raises(TypeError, match="spec must be a jaxsplit.QuantSpec, got 8"):
        quant_error(p, p2, 8)
    with pytest.raises(ValueError, match=r"only in params: \['Dense_1'\]"):
        quant_error(
            p, {"params": {k: v for k, v in p2["params"].items() if k != "Dense_1"}}, QuantSpec()
        )
    with pytest.raises(ValueError, match="params must be the original"):
        quant_error(p2, p2, QuantSpec())
    other = copy.deepcopy(p)
    other["params"]["Dense_1"]["kernel"] = other["params"]["Dense_1"]["kernel"] * 2
    with pytest.raises(ValueError, match="'Dense_1'.*do not sum"):
        quant_error(p, other, QuantSpec())
    bad = copy.deepcopy(p)
    bad["params"]["Dense_1"]["kernel"] = np.ones((10, 32), np.float32)
    with pytest.raises(ValueError, match=r"'Dense_1': params has shape \(32, 10\)"):
        quant_error(p, bad, QuantSpec())
    ints = {"e": {"embedding": np.ones((3, 2), np.int32)}}
    with pytest.raises(TypeError, match="'e'.*int32"):
        quant_error(ints, ints, QuantSpec())


def test_bfloat16_and_zero_kernels():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(32, 16)), jnp.bfloat16)
    p = {"d": {"kernel": w}, "z": {"kernel": jnp.zeros((4, 4), jnp.bfloat16)}}
    p2 = js.split_params(p, js.SplitConfig(layers=["d"], threshold=js.Relative(0.5)))
    rows = quant_error(p, p2, QuantSpec()).layers
    assert rows[0].dtype == "bfloat16" and rows[0].reduction > 0
    z = rows[1]
    assert (z.mse_before, z.mse_after, z.pred_before, z.reduction) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(z.sqnr_before) and z.ratio_before == 1.0


def test_sqnr_db():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert isinstance(quant_error({}, {}, QuantSpec()), Report)


# --- the README's evaluator section is produced by real code -------------------------------

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"```python\n(.*?)```\s*<!-- output -->\n(.*?)<!-- /output -->", re.S)


def _evaluator_section(text: str) -> str:
    start = text.index("## Measuring what a split buys")
    return text[start : text.index("\n## ", start + 1)]


def _run_block(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    return out.getvalue()


def test_readme_tables_are_printed_by_the_code_above_them():
    """Set JAXSPLIT_UPDATE_README=1 to rewrite the outputs after a deliberate change."""
    text = README.read_text()
    section = _evaluator_section(text)
    blocks = _BLOCK.findall(section)
    assert len(blocks) == 2
    new = section
    for code, shown in blocks:
        printed = _run_block(code)
        if os.environ.get("JAXSPLIT_UPDATE_README"):
            new = new.replace(
                f"<!-- output -->\n{shown}<!-- /output -->",
                f"<!-- output -->\n{printed}<!-- /output -->",
                1,
            )
        else:
            assert printed == shown
    if new != section:
        README.write_text(text.replace(section, new))
