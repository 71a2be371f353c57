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
