"""jaxsplit.demo: the quick demo runs end to end and its numbers are the real ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import Relative, SplitConfig, match_layers, quant, quant_error, split_params
from jaxsplit.demo import (
    DemoConfig,
    DemoResult,
    markdown,
    plot,
    run_demo,
    simulated_weights,
    variants,
)
from jaxsplit.demo.model import DigitsCNN, load_digits_split
from jaxsplit.quant import QuantSpec

QUICK = DemoConfig.quick(epochs=1)


@pytest.fixture(scope="module")
def result():
    seen = []
    res = run_demo(QUICK, progress=lambda stage, done, total: seen.append((stage, done, total)))
    return res, seen


def test_quick_demo_returns_the_table(result):
    res, _ = result
    assert isinstance(res, DemoResult)
    vs = variants(QUICK)
    assert [(r.variant, r.bits) for r in res.rows] == [(v.name, b) for v in vs for b in (8, 4)]
    assert res.n_test == 450 and res.n_params == 38282
    assert 0.5 < res.fp32_accuracy <= 1.0  # one epoch already learns digits
    assert all(0.0 <= r.accuracy <= 1.0 for r in res.rows)
    md = markdown(res)
    assert f"{res.fp32_accuracy:.2%}" in md and "| no split |" in md
    assert "| balance rel:0.5 |" in md and "| grid rel:0.5 |" in md


def test_default_variants():
    from jaxsplit.config import Auto

    vs = variants(DemoConfig())
    assert [v.name for v in vs] == [
        "no split",
        "balance rel:0.25",
        "balance rel:0.5",
        "balance rel:0.75",
        "auto (any method, <= 2% extra)",
        "clip rel:0.5",
        "grid rel:0.5",
        "residual 0",
    ]
    spec = QuantSpec(bits=4)
    auto = vs[4].make(spec)
    assert auto.method == "auto" and auto.threshold == Auto(spec, candidates=16, max_extra=0.02)
    assert vs[6].make(spec).spec == spec and vs[6].uses_spec and not vs[5].uses_spec
    assert vs[0].make(spec) is None


def test_progress_reports_training_and_evaluation(result):
    res, seen = result
    assert ("train", 1, 1) in seen
    n = len(res.rows)
    assert [s for s in seen if s[0] == "evaluate"] == [("evaluate", i, n) for i in range(1, n + 1)]


def test_no_split_rows_add_nothing_and_balance_rows_add_the_split_values(result):
    res, _ = result
    nosplit = [r for r in res.rows if r.variant == "no split"]
    assert all(r.extra_params == 0 and r.split_layers == 0 for r in nosplit)
    balance = [r for r in res.rows if r.variant == "balance rel:0.5"]
    assert all(r.split_layers == 4 for r in balance)
    assert balance[0].extra_params == balance[1].extra_params > 0
    assert balance[0].extra_params_frac == balance[0].extra_params / res.n_params


def test_splitting_improves_weight_sqnr_at_every_bit_width(result):
    res, _ = result
    sqnr = {(r.variant, r.bits): r.weight_sqnr_db for r in res.rows}
    for bits in (8, 4):
        assert sqnr["balance rel:0.5", bits] > sqnr["no split", bits] + 3.0


def test_weight_sqnr_and_extra_params_agree_with_quant_error():
    """The demo's single-pass figures equal the evaluator's totals for the same split."""
    from jaxsplit.demo.job import _kernels, _sqnr_db

    rng = np.random.default_rng(1)
    p = {
        "a": {"kernel": rng.standard_t(3, (16, 8)).astype(np.float32)},
        "b": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
    }
    p2 = split_params(p, SplitConfig(layers=["a"], threshold=Relative(0.3)))
    spec = QuantSpec(bits=3)
    simulated, extra = simulated_weights(p2, spec)
    ws = {k: jnp.asarray(v["kernel"]) for k, v in p.items()}
    total = quant_error(p, p2, spec).total()
    assert float(_sqnr_db(ws, _kernels(simulated))) == pytest.approx(total["sqnr_after"], rel=1e-5)
    assert extra == total["extra_nonzero"]


def test_effective_kernels_quantize_each_branch_separately():
    rng = np.random.default_rng(0)
    p = {
        "a": {"kernel": rng.standard_t(3, (16, 8)).astype(np.float32)},
        "b": {"kernel": rng.normal(size=(4,)).astype(np.float32)},
    }
    p2 = split_params(p, SplitConfig(layers=["a"], threshold=Relative(0.5)))
    spec = QuantSpec(bits=4)
    simulated, extra = simulated_weights(p2, spec)
    eff = {k: v["kernel"] for k, v in simulated.items()}
    b0, b1 = p2["a"]["branch_0"]["kernel"], p2["a"]["branch_1"]["kernel"]
    assert np.array_equal(eff["a"], quant.quantize(b0, spec) + quant.quantize(b1, spec))
    assert np.array_equal(eff["b"], quant.quantize(jnp.asarray(p["b"]["kernel"]), spec))
    n = match_layers(p, SplitConfig(layers=["a"], threshold=Relative(0.5))).layers[0].n_split
    assert extra == n


def test_plot_writes_a_png(tmp_path, result):
    res, _ = result
    path = plot(res, str(tmp_path / "sub" / "demo.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_to_dict_is_plain(result):
    import json

    res, _ = result
    d = json.loads(json.dumps(res.to_dict()))
    assert d["fp32_accuracy"] == res.fp32_accuracy and len(d["rows"]) == len(res.rows)


def test_data_split_is_reproducible_and_stratified():
    a, b = load_digits_split(0), load_digits_split(0)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert np.bincount(a.y_test).min() >= 43  # 25% of each class (the smallest has 174)
    assert float(a.x_train.max()) == 1.0 and a.x_train.dtype == np.float32


def test_model_shapes():
    v = jax.eval_shape(DigitsCNN().init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    shapes = {k: layer["kernel"].shape for k, layer in v["params"].items()}
    assert shapes == {
        "Conv_0": (3, 3, 1, 16),
        "Conv_1": (3, 3, 16, 32),
        "Dense_0": (512, 64),
        "Dense_1": (64, 10),
    }


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(bits=()), ValueError, r"DemoConfig.bits must be a non-empty tuple"),
        (dict(bits=(8, 17)), ValueError, r"DemoConfig.bits .* got \(8, 17\)"),
        (dict(epochs=0), ValueError, "DemoConfig.epochs must be an int >= 1, got 0"),
        (dict(seed=-1), ValueError, "DemoConfig.seed must be an int >= 0"),
        (dict(thresholds=(-0.5,)), ValueError, "SplitConfig.threshold must be a finite"),
        (dict(methods=(("grid",),)), ValueError, r"\(method, threshold\) pairs"),
        (dict(methods=(("nope", 0.5),)), ValueError, r"SplitConfig.method must be one of"),
        (dict(auto_max_extra=-1.0), ValueError, r"Auto.max_extra must be a finite number"),
    ],
)
def test_bad_config_names_the_field(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DemoConfig(**kwargs)


def test_run_demo_rejects_other_configs():
    with pytest.raises(TypeError, match="DemoConfig"):
        run_demo({"epochs": 1})


# --- the MiniLM part, the plot colours, the README table ---------------------------------


def test_minilm_part_runs_on_the_real_weights():
    from jaxsplit.demo import minilm_variants, run_minilm

    pytest.importorskip("onnx")
    cfg = DemoConfig(minilm_bits=(8, 4), minilm_auto=False, minilm_sequences=4, minilm_length=16)
    rows, note = run_minilm(cfg)
    assert [(r.variant, r.bits) for r in rows] == [
        (v, b) for v, _ in minilm_variants(cfg) for b in (8, 4)
    ]
    cos = {(r.variant, r.bits): r.cosine for r in rows}
    assert cos["balance rel:0.5 (PPQ)", 4] > cos["no split", 4]
    assert all(r.extra_params == 0 for r in rows if r.variant == "no split")
    assert "4 random" in note and "18 encoder Dense kernels" in note


def test_default_config_runs_minilm_with_a_restricted_auto():
    from jaxsplit.demo import minilm_variants

    c = DemoConfig()
    assert c.minilm and c.minilm_bits == (8, 6, 4) and not DemoConfig.quick().minilm
    auto = minilm_variants(c)[2][1](QuantSpec(bits=4), ["a"])
    assert auto.method == "auto" and auto.threshold.max_extra == 0.02
    assert auto.threshold.candidates == 16


def test_plot_colours_never_repeat():
    import jaxsplit as js

    for n in (1, 8, 10, 11, 21):
        assert len(set(js.plot.colors(n))) == n
    with pytest.raises(ValueError, match="21 distinct"):
        js.plot.colors(22)


def test_result_round_trips_through_json(result):
    import json

    res, _ = result
    back = DemoResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.rows == res.rows and markdown(back) == markdown(res)


def test_readme_demo_table_is_what_the_code_prints():
    """The README's table is ``markdown()`` of the committed full run
    (``experiments/results/demo.json``, from ``jaxsplit demo --json``)."""
    import json
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    res = DemoResult.from_dict(json.loads((root / "experiments/results/demo.json").read_text()))
    text = (root / "README.md").read_text()
    table = text.split("<!-- demo-table -->\n", 1)[1].split("\n<!-- /demo-table -->", 1)[0]
    assert table == markdown(res)
