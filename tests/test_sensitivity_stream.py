"""``sensitivity=`` through the streamed split (``stream.split_checkpoint``, ``plan_checkpoint``,
``iter_split``) and the command line (``--sensitivity FILE``): the same choice as in memory."""

import csv as csvlib
import json

import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import io, stream
from tests.cli_helpers import assert_cli_error, run_cli

INT4 = js.QuantSpec(bits=4)
BUDGET = 0.02


def _tree():
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, size=(64, 48)) * 0.02).astype("f4")
    return {"a": {"kernel": w}, "b": {"kernel": w.copy()}}


def _cfg():
    return js.SplitConfig(layers=["*"], threshold=js.Auto(INT4, max_extra=BUDGET, scope="tree"))


def _extra(report):
    return {lay.path: lay.auto.extra_nonzero for lay in report.layers}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(io.save(_tree(), tmp_path_factory.mktemp("sens") / "in.safetensors"))


@pytest.mark.parametrize("heavy", ["a", "b"])
def test_streamed_split_follows_the_sensitivity_as_in_memory(ckpt, tmp_path, heavy):
    sens = {"a": 1.0, "b": 1.0, heavy: 1000.0}
    want, rep = js.split_with_report(_tree(), _cfg(), sensitivity=sens)
    assert _extra(rep)[heavy] > _extra(rep)[{"a": "b", "b": "a"}[heavy]]  # it mattered
    out = tmp_path / "out.safetensors"
    got = stream.split_checkpoint(ckpt, out, _cfg(), sensitivity=sens).report
    assert _extra(got) == _extra(rep)
    loaded = io.load(out)
    for k in ("a", "b"):
        for b in ("branch_0", "branch_1"):
            assert np.array_equal(
                np.asarray(loaded[k][b]["kernel"]).view(np.uint32),
                np.asarray(want[k][b]["kernel"]).view(np.uint32),
            )
    planned = stream.plan_checkpoint(ckpt, _cfg(), sensitivity=sens)
    assert _extra(planned) == _extra(rep)
    with stream.open_layers(ckpt) as src:
        it = stream.iter_split(src, _cfg(), sensitivity=sens)
        rows = {p: q.auto.extra_nonzero for p, _, _, q in it}
    assert rows == _extra(rep)


def test_streamed_sensitivity_errors_before_any_write(ckpt, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    with pytest.raises(js.CalibrationError, match=r"'c'"):
        stream.split_checkpoint(ckpt, out, _cfg(), sensitivity={"a": 1.0, "b": 1.0, "c": 2.0},
                                overwrite=True)  # fmt: skip
    with pytest.raises(js.CalibrationError, match=r"sensitivity of layer 'a'.*-1"):
        stream.split_checkpoint(ckpt, out, _cfg(), sensitivity={"a": -1.0, "b": 1.0},
                                overwrite=True)  # fmt: skip
    assert out.read_bytes() == b"previous"  # nothing replaced


def _write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def test_cli_sensitivity_file_equals_the_python_api(ckpt, tmp_path, capsys):
    sens = {"a": 1000.0, "b": 1.0}
    _, rep = js.split_with_report(_tree(), _cfg(), sensitivity=sens)
    f = _write(tmp_path / "s.json", sens)
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_cli(capsys, "split", ckpt, out, "--layers", "*", "--threshold",
                                "auto", "--bits", "4", "--budget", BUDGET, "--sensitivity", f,
                                "--json")  # fmt: skip
    assert code == 0, err
    rows = {r["path"]: r["auto"]["extra_nonzero"] for r in json.loads(stdout)["layers"]}
    assert rows == _extra(rep)


@pytest.mark.parametrize(
    "content, pattern",
    [
        (None, r"--sensitivity: no such file"),
        ("{not json", r"--sensitivity: .* is not JSON"),
        ([1, 2], r"--sensitivity: .* must hold a non-empty JSON object"),
        ({"a": "high"}, r"--sensitivity: .* must hold a non-empty JSON object"),
    ],
)
def test_cli_sensitivity_file_errors(ckpt, tmp_path, capsys, content, pattern):
    f = str(tmp_path / "missing.json") if content is None else _write(tmp_path / "s.json", content)
    out = tmp_path / "out.safetensors"
    result = run_cli(capsys, "split", ckpt, out, "--layers", "*", "--threshold", "auto",
                     "--bits", "4", "--budget", BUDGET, "--sensitivity", f)  # fmt: skip
    assert_cli_error(result, 2, pattern)
    assert not out.exists()


def test_cli_sensitivity_needs_the_tree_budget(ckpt, tmp_path, capsys):
    f = _write(tmp_path / "s.json", {"a": 1.0, "b": 1.0})
    out = tmp_path / "out.safetensors"
    base = ("split", ckpt, out, "--layers", "*")
    assert_cli_error(
        run_cli(capsys, *base, "--threshold", "auto", "--bits", "4", "--layer-budget", "0.02",
                "--sensitivity", f),  # fmt: skip
        2, r"--sensitivity weights the tree-wide budget: it needs --budget",
    )  # fmt: skip
    assert_cli_error(
        run_cli(capsys, *base, "--threshold", "1.0", "--sensitivity", f),
        2, r"--sensitivity needs --threshold auto",
    )  # fmt: skip
    assert not out.exists()


def test_cli_sweep_auto_rows_follow_the_sensitivity(ckpt, tmp_path, capsys):
    sens = {"a": 1.0, "b": 1000.0}
    _, rep = js.split_with_report(_tree(), _cfg(), sensitivity=sens)
    f = _write(tmp_path / "s.json", sens)
    csv = tmp_path / "rows.csv"
    code, _, err = run_cli(capsys, "sweep", ckpt, "--layers", "*", "--thresholds", "auto",
                           "--methods", "auto", "--bits", "4", "--budget", BUDGET,
                           "--sensitivity", f, "--csv", csv)  # fmt: skip
    assert code == 0, err
    with open(csv) as fh:
        rows = {r["layer"]: int(r["extra_nonzero"]) for r in csvlib.DictReader(fh)}
    assert rows == _extra(rep) and rows["b"] > rows["a"]
    assert_cli_error(
        run_cli(capsys, "sweep", ckpt, "--layers", "*", "--thresholds", "auto", "--methods",
                "auto", "--bits", "4", "--layer-budget", BUDGET, "--sensitivity", f),  # fmt: skip
        2, r"--sensitivity weights the tree-wide budget",
    )  # fmt: skip
