"""Smoke tests of the experiment scripts (fast: tiny inputs, a few grid points)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mtcnn_detect, mtcnn_nets, report

needs_mtcnn = pytest.mark.skipif(
    mtcnn_nets.weights_dir() is None,
    reason="the mtcnn package's weight files are not installed (pip install -e '.[dev]')",
)


@needs_mtcnn
def test_stored_layout_matches_the_flax_nets():
    for name, (_, names) in mtcnn_nets.NETS.items():
        raw = mtcnn_nets.load_raw(name)
        assert len(raw) == len(names)
        _, v = mtcnn_nets.load_variables(name)
        for key, arr in zip(names, raw, strict=True):
            layer, leaf = key.split("/")
            assert np.array_equal(v["params"][layer][leaf], arr), key
    raw = mtcnn_nets.load_raw("onet")
    assert raw[0].shape == (3, 3, 3, 32)  # conv kernels (kh, kw, in, out)
    assert raw[2].shape == (1, 1, 32)  # conv PReLU: one slope per channel
    assert raw[12].shape == (1152, 256) and raw[14].shape == (256,)  # dense + its PReLU


@needs_mtcnn
def test_pnet_runs_on_one_crop_and_finds_the_hopper_face():
    model, v = mtcnn_nets.load_variables("pnet")
    bbox, prob = model.apply(v, jnp.zeros((1, 12, 12, 3)))
    assert bbox.shape == (1, 1, 1, 4) and prob.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(np.asarray(prob.sum(-1)), 1.0, rtol=1e-6)
    # the O-Net-sized face crop of the Hopper portrait, seen by P-Net at 12x12
    img = mtcnn_detect.sample_images()["hopper"]
    face = mtcnn_detect.crops(img, np.array([[173.0, 111.0, 352.0, 333.0]]), 12)
    sky = mtcnn_detect.crops(img, np.array([[400.0, 0.0, 500.0, 100.0]]), 12)
    p_face = float(model.apply(v, face)[1][0, 0, 0, 1])
    p_sky = float(model.apply(v, sky)[1][0, 0, 0, 1])
    assert p_face > 0.9 > 0.1 > p_sky


@needs_mtcnn
def test_onet_landmarks_on_the_hopper_face_are_in_anatomical_order():
    from experiments.mtcnn_verify import landmark_checks

    img = mtcnn_detect.sample_images()["hopper"]
    box = np.array([[173.0, 111.0, 352.0, 333.0]])
    model, v = mtcnn_nets.load_variables("onet")
    _, lm, prob = model.apply(v, mtcnn_detect.crops(img, box, 48))
    assert float(prob[0, 1]) > 0.99
    side = box[0, 2] - box[0, 0]
    pts = np.stack([box[0, 0] + lm[0, :5] * side, box[0, 1] + lm[0, 5:] * side], -1)
    assert all(landmark_checks(np.r_[box[0], 1.0], np.asarray(pts)).values())


def test_load_variables_rejects_unknown_names():
    with pytest.raises(ValueError, match="name must be one of"):
        mtcnn_nets.load_variables("xnet")


def test_nms_and_square():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 40]], float)
    keep = mtcnn_detect.nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]
    assert mtcnn_detect.square(boxes[2:]).tolist() == [[15.0, 20.0, 35.0, 40.0]]


def test_report_table_and_header():
    lines = report.table([{"a": 1.23456, "b": "x"}], ["a", "b"])
    assert lines == ["| a | b |", "|---|---|", "| 1.235 | x |"]
    head = report.header("T", "python -m x")
    assert head[0] == "# T" and "command: `python -m x`" in head[2]
    assert jax.devices()[0].platform in report.machine()


def _tiny_variants():
    from experiments import quantsim

    return [
        quantsim.Variant("none", "none"),
        quantsim.Variant("balance rel0.5", "balance", __import__("jaxsplit").Relative(0.5)),
    ]


def test_measure_matches_quant_error_and_quantizes_branches_separately():
    import jaxsplit as js
    from experiments import quantsim
    from jaxsplit import quant

    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (16, 8)).astype(np.float32)
    params = {
        "Dense_0": {"kernel": w, "bias": np.ones(8, np.float32)},
        "Dense_1": {"kernel": w[:8] * 0.1},
    }
    spec = quant.QuantSpec(bits=4)
    p2 = js.split_params(params, js.SplitConfig(layers=["Dense_0"], threshold=js.Relative(0.5)))
    ws = {p: jnp.asarray(lay.array) for p, lay in js.find_layers(params).items()}
    st = quantsim.measure(ws, quantsim.twin_branches(params, p2), spec)
    b0, b1 = p2["Dense_0"]["branch_0"]["kernel"], p2["Dense_0"]["branch_1"]["kernel"]
    want = np.asarray(quant.quantize(b0, spec)) + np.asarray(quant.quantize(b1, spec))
    assert np.array_equal(np.asarray(st["Dense_0"]["sim"]), want)
    assert np.array_equal(np.asarray(st["Dense_1"]["sim"]), quant.quantize(w[:8] * 0.1, spec))
    rep = js.quant_error(params, p2, spec)
    for row in rep.layers:
        s = st[row.path]
        np.testing.assert_allclose(float(s["mse_after"]), row.mse_after, rtol=1e-6)
        np.testing.assert_allclose(float(s["pred_after_corr"]), row.pred_after_corr, rtol=1e-6)
        assert int(s["extra_nonzero"]) == row.extra_nonzero
    sim = quantsim.with_kernels(params, {"Dense_0": want})
    assert sim["Dense_0"]["kernel"] is want and sim["Dense_1"] is params["Dense_1"]
    assert sim["Dense_0"]["bias"] is params["Dense_0"]["bias"]


@needs_mtcnn
def test_mtcnn_convnets_tiny_grid():
    from experiments import mtcnn_convnets, quantsim

    x = mtcnn_nets.normalize(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)))
    spec = quantsim.make_spec(8, "per_tensor")
    net, layers = mtcnn_convnets.evaluate_net("pnet", x, [spec], _tiny_variants())
    assert [r["variant"] for r in net] == ["none", "balance rel0.5"]
    none, bal = net
    # (W,) and (W, 0) are measured by different compiled programs: float noise only
    assert abs(none["weight MSE reduction %"]) <= 1e-3 and none["extra nonzeros %"] == 0.0
    assert 50.0 < bal["weight MSE reduction %"] < 76.0  # balance's ceiling is 75%
    assert bal["extra nonzeros %"] > 0 and bal["layers split"] == "5/5"
    assert none["output SQNR dB"] > 20.0  # int8 P-Net stays close to float
    assert len(layers) == 2 * 5 and {r["layer"] for r in layers} == set(
        mtcnn_nets.load_variables("pnet")[1]["params"]
    ) - {"prelu1", "prelu2", "prelu3"}


def test_threshold_sweep_curve_matches_theory_on_student_t():
    from experiments import quantsim, threshold_sweep

    w = np.random.default_rng(1).standard_t(3, (128, 128)).astype(np.float32)
    fr = np.array([0.25, 0.5, 1.0], np.float32)
    c = threshold_sweep.sweep_layer(w, quantsim.make_spec(8, "per_tensor"), fr, "balance")
    assert c["measured"][-1] == 1.0 and c["split_frac"][-1] == 0.0  # nothing above max
    assert 0.24 < c["measured"][1] < 0.3  # 75% ceiling, nearly reached on heavy tails
    np.testing.assert_allclose(c["measured"][:2], c["widrow_corr"][:2], rtol=0.1)
    assert np.all(c["widrow"][:2] < c["widrow_corr"][:2])  # naive under-estimates
    rows = threshold_sweep.summary_rows({("t", "int8 per_tensor", "balance"): c})
    assert rows[0]["best f"] in (0.25, 0.5)


def test_digits_aggregate_mean_and_std():
    from types import SimpleNamespace as NS

    from experiments import digits_cnn

    def res(acc, fp):
        row = NS(variant="no split", bits=8, accuracy=acc, weight_sqnr_db=30.0,
                 extra_params_frac=0.0)  # fmt: skip
        return NS(rows=(row,), fp32_accuracy=fp)

    fp32, rows = digits_cnn.aggregate([res(0.9, 0.95), res(0.8, 0.95)])
    assert fp32["mean"] == 0.95 and fp32["std"] == 0.0
    assert rows[0]["accuracy %"] == "85.00 ± 7.07"
    assert rows[0]["drop vs fp32 (pp)"] == "10.00 ± 7.07"


def test_every_readme_experiment_command_names_a_runnable_script():
    import importlib
    import importlib.util
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text() + (root / "experiments" / "README.md").read_text()
    names = set(re.findall(r"python -m experiments\.(\w+)", text))
    ours = {"mtcnn_verify", "mtcnn_convnets", "threshold_sweep", "digits_cnn"}
    assert ours <= names
    for name in names:
        assert importlib.util.find_spec(f"experiments.{name}") is not None, name
    for name in ours:
        assert callable(importlib.import_module(f"experiments.{name}").main), name
