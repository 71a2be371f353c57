"""jaxsplit.sweep: rows equal the direct evaluator, one compilation per kernel shape/dtype."""

import csv
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import (
    Percentile,
    Relative,
    Sigma,
    SplitConfig,
    quant_error,
    split_params,
    split_with_report,
)
from jaxsplit.quant import QuantSpec
from jaxsplit.render import sweep_csv, sweep_markdown
from jaxsplit.sweeps import SweepResult, _sweep_kernel, spec_label, sweep
from jaxsplit.thresholds import as_threshold

SPECS = (QuantSpec(bits=8), QuantSpec(bits=4, granularity="per_channel"))
ALL = SplitConfig(layers="**")
THRESHOLDS = (0.5, Relative(0.5), Percentile(99.0))


def _params():
    rng = np.random.default_rng(0)
    t = lambda *s: rng.standard_t(3, s).astype(np.float32)  # noqa: E731
    return {
        "params": {
            "Dense_0": {"kernel": t(32, 16), "bias": np.zeros(16, np.float32)},
            "block": {"Conv_0": {"kernel": t(3, 3, 2, 8)}},
        },
        "batch_stats": {"mean": np.zeros(3, np.float32)},
    }


@pytest.fixture(scope="module")
def result():
    return sweep(
        _params(),
        SplitConfig(layers=["**"], seed=3),
        thresholds=THRESHOLDS,
        methods=("balance", "random"),
        specs=SPECS,
    )


def test_one_row_per_layer_and_grid_point(result):
    assert len(result.rows) == 2 * len(THRESHOLDS) * 2 * len(SPECS)
    keys = {(r.layer, r.threshold, r.method, r.spec) for r in result.rows}
    assert len(keys) == len(result.rows)
    assert [r.layer for r in result.rows[:: len(result.rows) // 2]] == ["Dense_0", "block/Conv_0"]


def test_rows_equal_the_direct_evaluator(result):
    """Each row equals split_params + quant_error (the evaluator) at the same grid point."""
    params = _params()
    rows = {(r.layer, r.threshold, r.method, r.spec): r for r in result.rows}
    checked = 0
    for t in THRESHOLDS:
        for method in ("balance", "random"):
            cfg = SplitConfig(layers=["**"], threshold=t, method=method, seed=3)
            p2, rep = split_with_report(params, cfg)
            plans = {p.path: p for p in rep.layers}
            for spec in SPECS:
                for e in quant_error(params, p2, spec).layers:
                    r = rows[e.path, as_threshold(t).label, method, spec_label(spec)]
                    plan = plans[e.path]
                    assert r.n_split == (plan.n_split or 0) == e.n_split
                    assert r.threshold_abs == pytest.approx(plan.threshold, rel=1e-6)
                    assert r.frac_split == e.split_fraction
                    assert r.extra_fraction == e.extra_nonzero / e.n_total
                    assert r.mse == pytest.approx(e.mse_after, rel=1e-5)
                    assert r.mse_before == pytest.approx(e.mse_before, rel=1e-5)
                    assert r.predicted_mse == pytest.approx(e.pred_after, rel=1e-5)
                    assert r.predicted_mse_correlated == pytest.approx(e.pred_after_corr, rel=1e-5)
                    assert r.reduction == pytest.approx(e.reduction, rel=1e-4)
                    assert r.sqnr_db == pytest.approx(e.sqnr_after, rel=1e-5)
                    assert r.sqnr_before_db == pytest.approx(e.sqnr_before, rel=1e-5)
                    checked += 1
    assert checked == len(result.rows)


def test_one_compilation_per_kernel_shape_and_dtype():
    rng = np.random.default_rng(1)
    p = {
        "a": {"kernel": rng.normal(size=(24, 8)).astype(np.float32)},
        "b": {"kernel": rng.normal(size=(24, 8)).astype(np.float32)},  # same shape as a
        "c": {"kernel": rng.normal(size=(5, 8)).astype(np.float32)},
        "d": {"kernel": rng.normal(size=(5, 8)).astype(jnp.bfloat16)},  # same shape, new dtype
    }
    grid = dict(methods=("balance",), specs=(QuantSpec(bits=3),))
    before = _sweep_kernel._cache_size()
    sweep(p, ALL, thresholds=[0.1, Relative(0.3)], **grid)
    assert _sweep_kernel._cache_size() - before == 3  # (24, 8) f32, (5, 8) f32, (5, 8) bf16
    sweep(p, ALL, thresholds=[0.7, Relative(0.9)], **grid)  # new values: no recompilation
    assert _sweep_kernel._cache_size() - before == 3


def test_relative_thresholds_resolve_per_layer():
    w = np.array([[1.0, -8.0], [2.0, 4.0]], np.float32)
    res = sweep(
        {"d": {"kernel": w}}, SplitConfig(layers="d"), thresholds=[Relative(0.25), 3.0, Sigma(1.0)]
    )
    assert [r.threshold for r in res.rows] == ["rel:0.25", "3", "sigma:1"]
    assert [r.threshold_abs for r in res.rows[:2]] == [2.0, 3.0]
    assert res.rows[2].threshold_abs == pytest.approx(float(np.std(w)), rel=1e-6)
    assert [r.n_split for r in res.rows] == [2, 2, 1]
    assert [r.frac_split for r in res.rows] == [0.5, 0.5, 0.25]


def test_csv_and_markdown(result):
    text = sweep_csv(result)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(result.rows)
    first, row = parsed[0], result.rows[0]
    assert first["shape"] == "32x16" and float(first["mse"]) == row.mse
    assert int(first["n_split"]) == row.n_split
    md = sweep_markdown(result).splitlines()
    assert len(md) == len(result.rows) + 2 and md[0].startswith("| layer | threshold")
    assert result.to_rows()[0]["shape"] == [32, 16]
    assert SweepResult(result.rows[:1]).to_dict() == {"rows": [result.rows[0].to_dict()]}


def test_csv_written_to_path(tmp_path, result):
    path = tmp_path / "s.csv"
    assert sweep_csv(result, str(path)) == path.read_text()


def test_nothing_is_mutated():
    p = _params()
    before = [np.array(x) for x in jax.tree.leaves(p)]
    sweep(
        p,
        SplitConfig(layers="**", seed=3),
        thresholds=THRESHOLDS,
        methods=("balance", "random"),
        specs=SPECS,
    )
    after = jax.tree.leaves(p)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(thresholds=[]), ValueError, "thresholds must be a non-empty sequence"),
        (dict(thresholds=[-1.0]), ValueError, "threshold must be a finite number"),
        (dict(thresholds=[0.1], methods=["nope"]), ValueError, "method must be one of"),
        (dict(thresholds=[0.1], methods="balance"), ValueError, "methods must be"),
        (dict(thresholds=[0.1], specs=[8]), TypeError, "specs must hold jaxsplit.QuantSpec"),
        (dict(thresholds=[0.1], methods=["balance"] * 2), ValueError, "must not repeat"),
        (dict(thresholds=[0.1], layers=["nope"]), ValueError, "available layer paths"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cfg = SplitConfig(layers=kwargs.pop("layers", "**"))
        sweep(_params(), cfg, **kwargs)


def test_nonfinite_kernel_is_an_error_naming_the_layer():
    w = np.array([1.0, np.nan], np.float32)
    with pytest.raises(ValueError, match="'d'.*NaN"):
        sweep({"d": {"kernel": w}}, ALL, thresholds=[0.5])


def test_readme_sweep_example_runs(tmp_path, monkeypatch, capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Sweeps") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\S+ (balance|random|clip|grid) int\S+ \d+\.\d%", out[0]), out[0]
    assert out[1].startswith("| layer | threshold") and len(out) == 1 + 2 + 4 * 4 * 2


def test_quantization_aware_methods_and_per_channel_thresholds_match_quant_error():
    """clip/grid/residual (grid and residual split on each spec's own grid) and per-channel
    thresholds give the evaluator's numbers too."""
    rng = np.random.default_rng(4)
    params = {"d": {"kernel": rng.standard_t(3, (24, 6)).astype(np.float32)}}
    thresholds = (Relative(0.5), Relative(0.5, per_channel=True))
    specs = (QuantSpec(bits=4), QuantSpec(bits=4, granularity="per_channel"))
    methods = ("clip", "grid", "residual")
    res = sweep(params, ALL, thresholds=thresholds, methods=methods, specs=specs)
    assert len(res.rows) == 2 * 3 * 2
    rows = {(r.threshold, r.method, r.spec): r for r in res.rows}
    w = params["d"]["kernel"]
    chan_max = np.abs(w).max(axis=0)
    for t in thresholds:
        for m in methods:
            for spec in specs:
                cfg = SplitConfig(layers=["d"], threshold=t, method=m, spec=spec)
                e = quant_error(params, split_params(params, cfg), spec).layers[0]
                r = rows[as_threshold(t).label, m, spec_label(spec)]
                assert r.mse == pytest.approx(e.mse_after, rel=1e-5), (t, m, spec)
                assert r.extra_fraction == e.extra_nonzero / e.n_total
                assert r.n_split >= e.n_split  # residual leaves on-grid values whole
                expect = 0.5 * (chan_max.mean() if t.per_channel else chan_max.max())
                assert r.threshold_abs == pytest.approx(float(expect), rel=1e-6)


def test_auto_thresholds_are_not_swept():
    from jaxsplit.config import Auto

    with pytest.raises(TypeError, match="Auto searches thresholds itself"):
        sweep(_params(), ALL, thresholds=[Auto(QuantSpec(bits=4))])


def test_grid_needs_a_symmetric_spec():
    with pytest.raises(ValueError, match="grid.*symmetric"):
        sweep(
            _params(), ALL, thresholds=[0.5], methods=["grid"], specs=[QuantSpec(symmetric=False)]
        )
