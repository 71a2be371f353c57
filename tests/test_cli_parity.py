"""The command line at parity with the library: per-channel thresholds, ``--branches``, every
``QuantSpec`` flag in ``report`` and ``sweep``, ``--weights``, ``inspect --bits``, ``--json``."""

import json

import numpy as np
import pytest
from cli_helpers import assert_cli_error, run_cli

import jaxsplit as js
from jaxsplit import io

W = "w,gating_einsum,linear"


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    t = lambda *s: rng.standard_t(3, s).astype(np.float32)  # noqa: E731
    params = {
        "params": {
            "Dense_0": {"kernel": t(16, 8), "bias": np.zeros(8, np.float32)},
            "layer_0": {
                "attn": {"q_einsum": {"w": t(2, 8, 4)}},
                "mlp": {"gating_einsum": t(2, 8, 16), "linear": t(16, 8)},
                "norm": {"scale": np.ones(8, np.float32)},
            },
        }
    }
    return io.save(params, tmp_path / "w.npz")


def _json(capsys, *argv):
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_per_channel_threshold_in_every_command(ckpt, capsys):
    tree = io.load(ckpt)
    cfg = js.SplitConfig(
        layers=["**"], threshold=js.Relative(0.5, per_channel=True), weights=W.split(",")
    )
    want = {p.path: p for p in js.match_layers(tree, cfg).layers}
    base = ["--weights", W, "--layers", "**", "--threshold", "rel:0.5/ch"]
    data = _json(capsys, "split", ckpt, "out.npz", *base)
    assert data["config"]["threshold"] == "rel:0.5/ch"
    for plan in data["layers"]:
        assert plan["threshold"] == pytest.approx(list(want[plan["path"]].threshold))
        assert plan["n_split"] == want[plan["path"]].n_split
    split = io.load("out.npz")
    np.testing.assert_array_equal(
        js.merge_params(split)["params"]["layer_0"]["mlp"]["gating_einsum"],
        tree["params"]["layer_0"]["mlp"]["gating_einsum"],
    )
    rep = _json(capsys, "report", ckpt, *base, "--bits", "4")
    lib = js.quant_error(
        tree, js.split_params(tree, cfg), js.QuantSpec(bits=4), weights=cfg.weights
    )
    assert [r["mse_after"] for r in rep["layers"]] == pytest.approx(
        [r.mse_after for r in lib.layers]
    )
    rows = _json(capsys, "sweep", ckpt, "--weights", W, "--thresholds", "rel:0.5/ch", "rel:0.5")[
        "rows"
    ]
    assert {r["layer"] for r in rows} == set(want) and len(rows) == 2 * len(want)
    assert len({r["threshold"] for r in rows}) == 2


def test_branches_end_to_end(ckpt, capsys):
    data = _json(capsys, "split", ckpt, "k4.npz", "--weights", W, "--layers", "**",
                 "--threshold", "rel:0.25", "--branches", "4")  # fmt: skip
    assert data["config"]["branches"] == 4
    split = io.load("k4.npz")
    assert set(split["params"]["layer_0"]["mlp"]["linear"]) == {f"branch_{i}" for i in range(4)}
    assert set(split["params"]["layer_0"]["attn"]["q_einsum"]) == {f"branch_{i}" for i in range(4)}
    merged, tree = js.merge_params(split), io.load(ckpt)
    for a, b in zip(
        js.find_layers(tree, W.split(",")).values(),
        js.find_layers(merged, W.split(",")).values(),
        strict=True,
    ):
        assert np.array_equal(a.array.view(np.uint32), b.array.view(np.uint32)), a.path
    rep = _json(capsys, "report", ckpt, "k4.npz", "--weights", W, "--bits", "4")
    assert {r["branches"] for r in rep["layers"]} == {4}
    bad = ["split", ckpt, "o.npz", "--layers", "**", "--threshold", "1", "--branches"]
    assert_cli_error(run_cli(capsys, *bad, "3"), 2, r"--branches: .*must be one of \[2, 4, 8\]")
    assert_cli_error(
        run_cli(capsys, *bad, "4", "--method", "clip"), 2, r"--branches: .*needs method='balance'"
    )


@pytest.mark.parametrize(
    "flags, spec",
    [
        (["--bits", "6"], js.QuantSpec(bits=6)),
        (["--bits", "4", "--per-channel"], js.QuantSpec(bits=4, granularity="per_channel")),
        (["--bits", "4", "--per-channel", "--axis", "0"],
         js.QuantSpec(bits=4, granularity="per_channel", axis=0)),
        (["--bits", "5", "--asymmetric"], js.QuantSpec(bits=5, symmetric=False)),
        (["--bits", "3", "--full-range"], js.QuantSpec(bits=3, narrow_range=False)),
    ],
)  # fmt: skip
def test_every_quant_option_in_report_and_sweep(ckpt, capsys, flags, spec):
    tree = io.load(ckpt)
    cfg = js.SplitConfig(layers=["Dense_0"], threshold=js.Relative(0.5))
    rep = _json(capsys, "report", ckpt, "--layers", "Dense_0", "--threshold", "rel:0.5", *flags)
    lib = js.quant_error(tree, js.split_params(tree, cfg), spec)
    assert rep["spec"] == spec.to_dict()
    assert rep["layers"][0]["mse_after"] == pytest.approx(lib.layers[0].mse_after)
    rows = _json(capsys, "sweep", ckpt, "--layers", "Dense_0", "--thresholds", "rel:0.5", *flags)
    res = js.sweep(tree, cfg, thresholds=[js.Relative(0.5)], methods=["balance"], specs=[spec])
    assert rows["rows"][0]["mse"] == pytest.approx(res.rows[0].mse)
    assert rows["rows"][0]["spec"] == res.rows[0].spec


def test_weights_flag_and_errors(ckpt, capsys, tmp_path):
    data = _json(capsys, "inspect", ckpt)
    assert [r["path"] for r in data["layers"]] == ["Dense_0"]  # default weights
    data = _json(capsys, "inspect", ckpt, "--weights", f"kernel,{W}")
    assert [r["path"] for r in data["layers"]] == [
        "Dense_0", "layer_0/attn/q_einsum", "layer_0/mlp/gating_einsum", "layer_0/mlp/linear",
    ]  # fmt: skip
    assert_cli_error(run_cli(capsys, "inspect", ckpt, "--weights", "w,,x"), 2, r"--weights must be")
    assert_cli_error(
        run_cli(capsys, "inspect", ckpt, "--weights", "nope"), 1, r"name its weights with --weights"
    )
    argv = ["split", ckpt, "o.npz", "--weights", W, "--layers", "Dense_0", "--threshold", "1"]
    assert_cli_error(run_cli(capsys, *argv), 2, r"available: \['layer_0/attn/q_einsum'")


def test_inspect_recommends_with_the_search(ckpt, capsys):
    tree = io.load(ckpt)
    data = _json(capsys, "inspect", ckpt, "--weights", f"kernel,{W}", "--bits", "4",
                 "--budget", "0.05", "--top", "2")  # fmt: skip
    auto = js.Auto(js.QuantSpec(bits=4), max_extra=0.05)
    cfg = js.SplitConfig(layers=["**"], threshold=auto, weights=("kernel", *W.split(",")))
    plans = {p.path: p.auto for p in js.match_layers(tree, cfg).layers}
    recs = data["recommendations"]
    assert {r["path"] for r in recs} == set(plans)
    for r in recs:
        a = plans[r["path"]]
        assert (r["method"], r["mse_before"], r["mse_after"]) == (a.method, a.mse_unsplit, a.mse)
        assert r["extra_nonzero"] == a.extra_nonzero and r["extra_fraction"] <= 0.05
        n = js.find_layers(tree, cfg.weights)[r["path"]].array.size
        assert r["gain_per_param"] == pytest.approx(
            (a.mse_unsplit - a.mse) * n / max(a.extra_nonzero, 1)
        )
    gains = [r["gain_per_param"] for r in recs if r["split"]]
    assert gains == sorted(gains, reverse=True)
    assert data["split_candidates"] == [r["path"] for r in recs if r["split"]][:2]
    assert "would split" in data["auto"]
    code, out, err = run_cli(capsys, "inspect", ckpt, "--weights", W, "--bits", "4")
    assert code == 0 and "Recommended splits" in out and "--threshold auto" in err
    assert_cli_error(
        run_cli(capsys, "inspect", ckpt, "--budget", "0.1"), 2, "--budget needs --bits"
    )
    assert_cli_error(
        run_cli(capsys, "inspect", ckpt, "--bits", "4", "--budget", "-1"), 2, "--budget"
    )
