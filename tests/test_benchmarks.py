"""Smoke test: ``python -m benchmarks.run --quick`` runs end to end (no timing assertions)."""

from __future__ import annotations

import json
import math

from benchmarks import run


def test_quick_benchmark_runs_and_reports_every_case(tmp_path, capsys):
    out = tmp_path / "results.json"
    res = run.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["quick"] is True
    cases = [r["case"] for r in res["timed"]]
    assert [c.split()[0] for c in cases] == ["kernel", "tree", "sweep"]
    for r in res["timed"]:
        for name in ("floor", "jaxsplit"):
            assert math.isfinite(r[name]["median_ms"]) and r[name]["min_ms"] > 0
        assert r["case"] in printed
    assert res["cold"]["layers"] == 6 and res["cold"]["cold_s"] > 0
    assert [r["donate"] for r in res["rss"]] == [False, True]
    assert all(r["peak_rss"] >= r["rss_before"] > 0 for r in res["rss"])
    assert "donate=True" in printed and "cold:" in printed


def test_sparse_forward_quick_runs_and_sparse_equals_dense():
    from benchmarks import sparse_forward

    rows = sparse_forward.run(quick=True, reps=1, percentiles=(99.0,))
    assert [r["case"].split()[0] for r in rows] == ["dense", "conv"]
    assert all(float(r["max abs sparse-dense"]) < 1e-4 and r["sparse/orig"] > 0 for r in rows)


def test_split_floor_runs_every_route_on_tiny_trees(tmp_path):
    from benchmarks import split_floor, split_scaling

    out = tmp_path / "floor.json"
    rows = split_floor.main(
        ["--trees", "2x64,small3,conv1", "--reps", "1", "--host-min-bytes", "0", "--json", str(out)]
    )
    assert [r["tree"] for r in rows] == ["2x64", "small3", "conv1"]
    for r in rows:
        routes = {f"{m}{x}" for m in ("balance", "clip") for x in ("", " compiled", " donate")}
        assert set(r["ms"]) == {"floor", "floor_fresh", *routes}
        assert all(v > 0 for v in r["ms"].values()) and r["vs_fresh"]["floor_fresh"] == 1.0
    res = {"load": 1.0, "size": [{"values": 4096, "layers": 1, "ms": {"balance": 2.0}}],
           "count": [{"values": 4096, "layers": 1, "ms": {"balance": 2.0}}]}  # fmt: skip
    split_scaling.plot(res, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 0


def test_search_peak_reports_a_peak_at_least_the_start():
    from benchmarks import search_peak

    res = search_peak.main(["--size", "64", "--method", "clip"])
    assert res["peak_after"] >= res["peak_before"] > 0 and res["layer_bytes"] == 64 * 64 * 4


def test_eager_calls_reports_every_function():
    from benchmarks import eager_calls

    table = eager_calls.rows(sizes=(8,), reps=1)
    assert [r["function"].split("(")[0] for r in table] == [
        "kernels.compensate",
        "measure.measure",
        "measure.measure_candidate",
    ]
    assert all(r["first_ms"] > 0 and r["repeat_ms"] > 0 for r in table)
    assert "| kernels.compensate | 8x8 |" in eager_calls.markdown(table)
