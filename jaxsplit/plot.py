"""Plots researchers want: the error/cost Pareto view, and legible colours for every plot.

matplotlib is an optional dependency (the ``demo`` extra); it is imported inside the
functions that draw, and a missing install raises an ``ImportError`` naming the extra.

* ``colors(n)``: ``n`` distinct colours (tab10 up to 10, Kelly's 21 colours of maximum
  contrast up to 21): no plot repeats a colour.
* ``pareto_points(result)``: a sweep aggregated over its layers, one point per
  (spec, method, threshold): extra non-zeros (fraction of all the layers' values) and the
  fraction of the error removed (``jaxsplit.measure.reduction`` of the element-weighted
  MSEs, as ``Report.total()``), and the SQNR.
* ``pareto(points, path)``: one marker per method and threshold, one panel per spec, the
  frontier (no point has less cost and more error removed) drawn as a step line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from jaxsplit.errors import ConfigError
from jaxsplit.measure import reduction, sqnr_db
from jaxsplit.sweeps import SweepResult

__all__ = ["TAB10", "KELLY", "colors", "ParetoPoint", "pareto_points", "frontier", "pareto"]

TAB10 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
KELLY = (
    "#222222", "#f3c300", "#875692", "#f38400", "#a1caf1", "#be0032", "#c2b280",
    "#848482", "#008856", "#e68fac", "#0067a5", "#f99379", "#604e97", "#f6a600",
    "#b3446c", "#dcd300", "#882d17", "#8db600", "#654522", "#e25822", "#2b3d26",
)  # fmt: skip


def colors(n: int) -> list[str]:
    """``n`` distinct colours (hex strings): tab10 for up to 10, Kelly's 21 beyond.

    Raises:
      ConfigError: ``n`` is above 21 (split the plot, or use markers as well).

    Example:
      >>> colors(2), len(set(colors(21)))
      (['#1f77b4', '#ff7f0e'], 21)
    """
    if n <= len(TAB10):
        return list(TAB10[:n])
    if n <= len(KELLY):
        return list(KELLY[:n])
    raise ConfigError(
        "colors", "n", f"colors(n) has {len(KELLY)} distinct colours at most, got n={n}"
    )


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plots need matplotlib, from the "demo" extra: pip install "jaxsplit[demo]"'
        ) from e
    return plt


class ParetoPoint(NamedTuple):
    """One (spec, method, threshold) of a sweep, over all its layers."""

    spec: str
    method: str
    threshold: str
    extra_fraction: float
    reduction: float
    sqnr_db: float


def pareto_points(result: SweepResult) -> list[ParetoPoint]:
    """A sweep's rows aggregated over layers, one point per (spec, method, threshold).

    Example:
      >>> import numpy as np, jaxsplit as js
      >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8) ** 3
      >>> res = js.sweep({"d": {"kernel": w}}, js.SplitConfig(layers=["d"]), thresholds=[0.5])
      >>> p = pareto_points(res)[0]
      >>> p.method, p.threshold, p.extra_fraction == res.rows[0].extra_fraction
      ('balance', '0.5', True)
    """
    groups: dict[tuple, list] = {}
    for r in result.rows:
        groups.setdefault((r.spec, r.method, r.threshold), []).append(r)
    out = []
    for (spec, method, thr), rows in groups.items():
        sizes = [_size(r) for r in rows]
        n = sum(sizes)
        before = sum(r.mse_before * s for r, s in zip(rows, sizes, strict=True)) / n
        after = sum(r.mse * s for r, s in zip(rows, sizes, strict=True)) / n
        signal = (
            sum(
                r.mse_before * 10 ** (r.sqnr_before_db / 10) * s
                for r, s in zip(rows, sizes, strict=True)
                if r.mse_before > 0
            )
            / n
        )
        out.append(
            ParetoPoint(
                spec,
                method,
                thr,
                sum(r.extra_nonzero for r in rows) / n,
                reduction(before, after),
                sqnr_db(signal, after),
            )
        )
    return out


def _size(row) -> int:
    n = 1
    for d in row.shape:
        n *= int(d)
    return n


def frontier(points: Sequence[ParetoPoint], metric: str = "reduction") -> list[ParetoPoint]:
    """The points no other point beats on both cost (less) and ``metric`` (more), by cost.

    Example:
      >>> P = lambda x, y: ParetoPoint("s", "m", "t", x, y, 0.0)
      >>> [(p.extra_fraction, p.reduction) for p in frontier([P(0, 0), P(1, 0.5), P(2, 0.4)])]
      [(0, 0), (1, 0.5)]
    """
    best, out = float("-inf"), []
    for p in sorted(points, key=lambda p: (p.extra_fraction, -getattr(p, metric))):
        if getattr(p, metric) > best:
            out.append(p)
            best = getattr(p, metric)
    return out


def pareto(
    points: Sequence[ParetoPoint], path: str, *, metric: str = "reduction", title: str = ""
) -> str:
    """Error removed (or ``metric="sqnr_db"``) against extra non-zeros, saved as a PNG.

    One panel per spec; one colour per method (``colors``), one marker per
    (method, threshold) labelled with the threshold; the frontier as a black step line.

    Raises:
      ImportError: matplotlib is missing (the ``demo`` extra).
      ConfigError: ``metric`` is not ``"reduction"`` or ``"sqnr_db"``.
    """
    if metric not in ("reduction", "sqnr_db"):
        raise ConfigError(
            "pareto", "metric", f"metric must be 'reduction' or 'sqnr_db', got {metric!r}"
        )
    plt = _pyplot()
    specs = list(dict.fromkeys(p.spec for p in points))
    methods = list(dict.fromkeys(p.method for p in points))
    color = dict(zip(methods, colors(len(methods)), strict=True))
    scale = 100.0 if metric == "reduction" else 1.0
    fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.2), squeeze=False)
    for ax, spec in zip(axes[0], specs, strict=True):
        sub = [p for p in points if p.spec == spec]
        for m in methods:
            ms = [p for p in sub if p.method == m]
            ax.scatter(
                [100 * p.extra_fraction for p in ms],
                [scale * getattr(p, metric) for p in ms],
                color=color[m],
                label=m,
                s=28,
                zorder=3,
            )
            for p in ms:
                ax.annotate(
                    p.threshold,
                    (100 * p.extra_fraction, scale * getattr(p, metric)),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        front = frontier(sub, metric)
        ax.step(
            [100 * p.extra_fraction for p in front],
            [scale * getattr(p, metric) for p in front],
            "k--",
            where="post",
            lw=1,
            label="frontier",
        )
        ax.set(
            xlabel="extra non-zeros (% of the layers' values)",
            ylabel="error removed (%)" if metric == "reduction" else "weight SQNR (dB)",
            title=f"{title} {spec}".strip(),
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
