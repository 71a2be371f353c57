"""The error/cost trade-off on real weights: a Pareto view of MiniLM-L3's 18 Dense kernels.

``js.sweep`` over thresholds x methods x bit widths (per tensor), aggregated over the
layers by ``js.plot.pareto_points`` (extra non-zeros as a fraction of all the layers'
values; error removed from the element-weighted weight MSE, as ``quant_error``'s total),
drawn by ``js.plot.pareto`` with the frontier.

    python -m experiments.pareto   # -> experiments/results/minilm_pareto.{md,png}
"""

from __future__ import annotations

import logging
import os
import sys
import time

import jaxsplit as js
from experiments import report
from jaxsplit.demo import minilm

THRESHOLDS = [js.Relative(f) for f in (0.15, 0.25, 0.35, 0.5, 0.7)] + [
    js.Percentile(p) for p in (99.0, 99.9)
]
METHODS = ["balance", "clip", "grid"]
BITS = (8, 4)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    model, variables = minilm.load_params()
    cfg = js.SplitConfig(layers=minilm.dense_paths(model))
    res = js.sweep(
        variables,
        cfg,
        thresholds=THRESHOLDS,
        methods=METHODS,
        specs=[js.QuantSpec(bits=b) for b in BITS],
    )
    points = js.plot.pareto_points(res)
    png = js.plot.pareto(
        points,
        os.path.join(report.RESULTS, "minilm_pareto.png"),
        title="MiniLM-L3 Dense kernels",
    )
    front = {
        (p.spec, p.method, p.threshold)
        for spec in dict.fromkeys(q.spec for q in points)
        for p in js.plot.frontier([q for q in points if q.spec == spec])
    }
    rows = [
        [p.spec, p.method, p.threshold, f"{p.extra_fraction:.2%}", f"{p.reduction:.1%}",
         f"{p.sqnr_db:.2f}", "yes" if (p.spec, p.method, p.threshold) in front else ""]
        for p in points
    ]  # fmt: skip
    table = js.render.markdown_table(
        ["spec", "method", "threshold", "extra nnz", "error removed", "SQNR dB", "frontier"],
        rows,
        left=3,
    )
    took = time.perf_counter() - t0
    sys.stdout.write(table + "\n")
    lines = report.header(
        "MiniLM-L3 Dense kernels: error removed vs extra non-zeros (Pareto)",
        report.command("experiments.pareto"),
    )
    lines += [
        "paraphrase-MiniLM-L3-v2's 18 encoder Dense kernels (`jaxsplit.demo.minilm`), "
        "per-tensor symmetric weights, each branch its own scale. One point per method and "
        "threshold over all 18 kernels; the frontier holds the points no other beats on "
        f"both cost and error removed. Wall time {took:.0f} s.",
        "",
        table,
        "",
        f"![Pareto view]({os.path.basename(png)})",
    ]
    report.write("minilm_pareto.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
