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
