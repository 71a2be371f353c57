"""``jaxsplit sweep`` and ``jaxsplit demo`` through the command line."""

import csv
import json

import numpy as np
import pytest
from cli_helpers import assert_cli_error, readme_commands, run_cli

from jaxsplit import io


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_t(3, (32, 16)).astype(np.float32),
                "bias": np.zeros(16, np.float32),
            },
            "Dense_1": {"kernel": rng.standard_t(3, (16, 4)).astype(np.float32)},
        }
    }
    return io.save(params, tmp_path / "w.npz")


def test_sweep_table_csv_and_json(ckpt, capsys, tmp_path):
    argv = ["sweep", ckpt, "--thresholds", "rel:0.5", "0.5", "--bits", "8", "4"]
    code, out, err = run_cli(capsys, *argv, "--csv", tmp_path / "s.csv")
    assert code == 0, err
    assert "Dense_0" in out and "rel:0.5" in out and "int4" in out
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))  # noqa: SIM115
    assert len(rows) == 2 * 2 * 2
    code, out, _ = run_cli(capsys, *argv, "--json")
    data = json.loads(out)
    assert code == 0 and len(data["rows"]) == 8
    assert {r["layer"] for r in data["rows"]} == {"Dense_0", "Dense_1"}
    assert [float(r["mse"]) for r in rows] == [r["mse"] for r in data["rows"]]


def test_sweep_selects_layers(ckpt, capsys):
    code, out, _ = run_cli(capsys, "sweep", ckpt, "--layers", "Dense_1", "--json")
    assert code == 0 and {r["layer"] for r in json.loads(out)["rows"]} == {"Dense_1"}


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--thresholds", "foo:1"], r"unknown kind 'foo'"),
        (["--thresholds", "-1"], r"threshold"),
        (["--bits", "1"], r"--bits: QuantSpec.bits must be an int in \[2, 16\], got 1"),
        (["--layers", "nope"], r"matched no layer; available layer paths.*Dense_0"),
        (["--methods", "nope"], r"method must be one of"),
    ],
)
def test_sweep_bad_arguments_exit_2(ckpt, capsys, extra, pattern):
    assert_cli_error(run_cli(capsys, "sweep", ckpt, *extra), 2, pattern)


def test_sweep_missing_checkpoint(capsys, tmp_path):
    assert_cli_error(run_cli(capsys, "sweep", tmp_path / "nope.npz"), 2, r"does not exist")


def test_demo_quick_writes_table_and_plot(capsys, tmp_path):
    """The README's ``jaxsplit demo`` (the one demo run of the suite: test_cli's README test
    leaves it to this one), as ``--quick --epochs 1``."""
    (demo,) = [argv for argv in readme_commands() if argv[1] == "demo"]
    out_dir = tmp_path / "out"
    argv = [*demo[1:], "--quick", "--epochs", "1", "--out", out_dir, "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    data = json.loads(out)
    assert data["rows"] and 0 < data["fp32_accuracy"] <= 1
    md = (out_dir / "demo.md").read_text()
    assert "| no split |" in md and "fp32 test accuracy" in md
    assert (out_dir / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_bad_arguments(capsys, tmp_path):
    assert_cli_error(
        run_cli(capsys, "demo", "--epochs", "0"), 2, r"--epochs must be an int >= 1, got 0"
    )
    (tmp_path / "f").write_text("x")
    assert_cli_error(run_cli(capsys, "demo", "--out", tmp_path / "f"), 2, r"is not a directory")


def test_sweep_plot_writes_a_pareto_png(ckpt, capsys, tmp_path):
    png = tmp_path / "p.png"
    argv = ["sweep", ckpt, "--thresholds", "rel:0.25", "rel:0.5", "--methods", "balance", "clip"]
    code, out, err = run_cli(capsys, *argv, "--bits", "4", "--plot", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out + err


def test_pareto_points_aggregate_layers_and_the_frontier():
    import jaxsplit as js

    rng = np.random.default_rng(0)
    p = {
        "a": {"kernel": rng.standard_t(3, (32, 16)).astype(np.float32)},
        "b": {"kernel": rng.standard_t(3, (16, 4)).astype(np.float32)},
    }
    res = js.sweep(
        p,
        js.SplitConfig(layers=["**"]),
        thresholds=[js.Relative(0.5)],
        methods=["balance", "clip"],
        specs=[js.QuantSpec(bits=4)],
    )
    pts = js.plot.pareto_points(res)
    assert [(q.method, q.threshold) for q in pts] == [("balance", "rel:0.5"), ("clip", "rel:0.5")]
    rows = [r for r in res.rows if r.method == "balance"]
    assert pts[0].extra_fraction == sum(r.extra_nonzero for r in rows) / (32 * 16 + 16 * 4)
    p2 = js.split_params(p, js.SplitConfig(layers=["**"], threshold=js.Relative(0.5)))
    total = js.quant_error(p, p2, js.QuantSpec(bits=4)).total()
    assert pts[0].reduction == pytest.approx(total["reduction"], rel=1e-5)
    assert pts[0].sqnr_db == pytest.approx(total["sqnr_after"], rel=1e-4)
    front = js.plot.frontier(pts)
    assert all(q in pts for q in front) and front == sorted(front, key=lambda q: q.extra_fraction)
