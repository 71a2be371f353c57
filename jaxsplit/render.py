"""Every rendering of jaxsplit's results: markdown, CSV and ``rich`` tables.

The core returns result objects (``evaluate.Report``, ``outputs.OutputReport``,
``sweeps.SweepResult``, ``split.SplitReport``); this module turns them into text. Markdown
and rich tables of one result use the same cells, so the README and the terminal agree,
and each error figure sits beside its cost (the extra non-zero parameters the split adds).
``markdown(result)``, ``rich_table(result)`` and ``to_csv(result)`` dispatch on the type.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from jaxsplit.evaluate import Report
from jaxsplit.outputs import OutputReport
from jaxsplit.sweeps import SweepResult, SweepRow

__all__ = [
    "COLUMNS",
    "markdown",
    "rich_table",
    "to_csv",
    "markdown_table",
    "report_cells",
    "cost_line",
    "report_markdown",
    "report_rich_table",
    "outputs_markdown",
    "outputs_rich_table",
    "sweep_markdown",
    "sweep_csv",
]

#: Column headers, in order.
COLUMNS = (
    "layer",
    "shape",
    "split",
    "+nnz",
    "scale W → W_i",
    "MSE Q(W)",
    "MSE ΣQ(W_i)",
    "Widrow ΣQ naive / corr.",
    "meas/pred",
    "SQNR dB",
    "error removed",
)


def _g(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.3g}"


def _db(x: float) -> str:
    return "∞" if math.isinf(x) and x > 0 else f"{x:.1f}"


def _layer_cells(r) -> list[str]:
    scales = " / ".join(_g(s) for s in r.scale_branches)
    split = "–" if r.branches == 1 else f"{r.n_split} ({100 * r.split_fraction:.2g}%)"
    return [
        r.path,
        "×".join(str(d) for d in r.shape),
        split,
        f"{r.extra_nonzero}",
        _g(r.scale) if r.branches == 1 else f"{_g(r.scale)} → {scales}",
        f"{_g(r.mse_before)} ({r.ratio_before:.2f}× pred)",
        _g(r.mse_after),
        f"{_g(r.pred_after)} / {_g(r.pred_after_corr)}",
        f"{r.ratio_after_naive:.2f} / {r.ratio_after:.2f}",
        f"{_db(r.sqnr_before)} → {_db(r.sqnr_after)}",
        f"{100 * r.reduction:.1f}%",
    ]


def _total_cells(t: dict) -> list[str]:
    pct = 100 * t["n_split"] / t["n_total"] if t["n_total"] else 0.0
    naive = t["mse_after"] / t["pred_after"] if t["pred_after"] else math.nan
    corr = t["mse_after"] / t["pred_after_corr"] if t["pred_after_corr"] else math.nan
    before = t["mse_before"] / t["pred_before"] if t["pred_before"] else math.nan
    return [
        f"total ({t['layers_split']}/{t['layers']} split)",
        str(t["n_total"]),
        f"{t['n_split']} ({pct:.2g}%)",
        str(t["extra_nonzero"]),
        "",
        f"{_g(t['mse_before'])} ({before:.2f}× pred)",
        _g(t["mse_after"]),
        f"{_g(t['pred_after'])} / {_g(t['pred_after_corr'])}",
        f"{naive:.2f} / {corr:.2f}",
        f"{_db(t['sqnr_before'])} → {_db(t['sqnr_after'])}",
        f"{100 * t['reduction']:.1f}%",
    ]


def report_cells(report) -> list[list[str]]:
    """One list of cell strings per layer, then the totals row.

    Example:
      >>> import numpy as np
      >>> from jaxsplit.evaluate import quant_error
      >>> from jaxsplit.quant import QuantSpec
      >>> w = {"d": {"kernel": np.array([[0.5, 2.0]], np.float32)}}
      >>> report_cells(quant_error(w, w, QuantSpec()))[0][:4]
      ['d', '1×2', '–', '0']
    """
    return [_layer_cells(r) for r in report.layers] + [_total_cells(report.total())]


def _spec_line(report) -> str:
    s = report.spec
    kind = "symmetric" if s.symmetric else "asymmetric"
    gran = s.granularity + (f" (axis {s.axis})" if s.granularity == "per_channel" else "")
    if s.granularity == "per_group":
        gran += f" (groups of {s.group_size}, axis {s.axis})"
    rng = "narrow" if s.narrow_range else "full"
    return f"int{s.bits} {kind} {gran}, {rng} range; MSE per element, branches quantized separately"


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def cost_line(totals: dict) -> str:
    """One line: the extra non-zeros, and the twins' extra MACs and bytes dense vs sparse.

    ``totals`` holds ``extra_nonzero``, ``macs``, ``weight_bytes`` and the
    ``jaxsplit.measure.TwinCost`` fields (``Report.total()``, ``OutputReport.to_dict()``).

    Example:
      >>> t = dict(extra_nonzero=20, macs=1000, weight_bytes=4000, extra_macs_dense=1000,
      ...          extra_macs_sparse=20, extra_bytes_dense=4000, extra_bytes_sparse=160)
      >>> for part in cost_line(t).split("; "):
      ...     print(part)
      cost: +20 non-zeros
      twins run dense +1e+03 MACs (+100%), +4 kB (+100%)
      sparse +20 MACs (+2%), +160 B (+4%)
    """

    def pct(x, of):
        return f"+{100 * x / of:.3g}%" if of else "–"

    m, b = totals["macs"], totals["weight_bytes"]
    return (
        f"cost: +{totals['extra_nonzero']} non-zeros; twins run dense "
        f"+{totals['extra_macs_dense']:.3g} MACs ({pct(totals['extra_macs_dense'], m)}), "
        f"+{_bytes(totals['extra_bytes_dense'])} ({pct(totals['extra_bytes_dense'], b)}); "
        f"sparse +{totals['extra_macs_sparse']:.3g} MACs ({pct(totals['extra_macs_sparse'], m)}), "
        f"+{_bytes(totals['extra_bytes_sparse'])} ({pct(totals['extra_bytes_sparse'], b)})"
    )


def report_markdown(report) -> str:
    """GitHub markdown: a caption line, the header, one row per layer, a bold totals row.

    Example:
      >>> import numpy as np
      >>> from jaxsplit.evaluate import quant_error
      >>> from jaxsplit.quant import QuantSpec
      >>> w = {"d": {"kernel": np.array([[0.5, 2.0]], np.float32)}}
      >>> print(report_markdown(quant_error(w, w, QuantSpec())).splitlines()[2][:40])
      | layer | shape | split | +nnz | scale W
    """
    cells = report_cells(report)
    lines = [
        f"*{_spec_line(report)}*",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "--:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells[:-1]]
    lines.append("| " + " | ".join(f"**{c}**" if c else "" for c in cells[-1]) + " |")
    lines += ["", f"*{cost_line(report.total())} (MACs per application of every kernel)*"]
    return "\n".join(lines)


def report_rich_table(report):
    """A ``rich.table.Table`` of the report (totals in bold under a section line).

    Example:
      >>> import numpy as np
      >>> from jaxsplit.evaluate import quant_error
      >>> from jaxsplit.quant import QuantSpec
      >>> w = {"d": {"kernel": np.array([[0.5, 2.0]], np.float32)}}
      >>> t = report_rich_table(quant_error(w, w, QuantSpec()))
      >>> t.row_count, len(t.columns)
      (2, 11)
    """
    from rich.table import Table

    table = Table(title="jaxsplit: quantization error by layer", caption=_spec_line(report))
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=i == 0)
    cells = report_cells(report)
    for row in cells[:-1]:
        table.add_row(*row)
    table.add_section()
    table.add_row(*cells[-1], style="bold")
    return table


# --- output-level report ------------------------------------------------------------------

_OUT_COLUMNS = ("model", "+nnz", "output MSE", "SQNR dB", "cosine", "top-1 agreement")


def _outputs_cells(report) -> list[list[str]]:
    def row(name, nnz, e):
        agree = "–" if e.agreement is None else f"{100 * e.agreement:.1f}%"
        return [name, nnz, _g(e.mse), _db(e.sqnr), f"{e.cosine:.5f}", agree]

    return [
        row("original, quantized", "0", report.before),
        row("split, quantized", str(report.extra_nonzero), report.after),
    ]


def _outputs_caption(report) -> str:
    acts = "float activations" if report.act_bits is None else f"int{report.act_bits} activations"
    s = report.spec
    return f"weights int{s.bits} {s.granularity}, {acts}; against the float model's outputs"


def outputs_markdown(report) -> str:
    """Markdown for an ``OutputReport``: model-level rows, then per-layer output SQNR.

    Example:
      >>> from jaxsplit.outputs import OutputError, OutputReport, LayerOutput
      >>> from jaxsplit.quant import QuantSpec
      >>> e = OutputError(0.01, 20.0, 0.99, 1.0)
      >>> r = OutputReport(QuantSpec(), None, e, e, (LayerOutput("d", 30.0, 36.0),), 5)
      >>> print(outputs_markdown(r).splitlines()[-1])
      | d | 30.0 | 36.0 | +6.0 |
    """
    lines = [f"*{_outputs_caption(report)}*", ""]
    lines += ["| " + " | ".join(_OUT_COLUMNS) + " |", "|---|" + "--:|" * (len(_OUT_COLUMNS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in _outputs_cells(report)]
    if report.macs or report.weight_bytes:
        lines += ["", f"*{cost_line(report.to_dict())} (MACs over the given inputs)*"]
    if report.layers:
        lines += [
            "",
            "| layer output | SQNR dB original | SQNR dB split | gain dB |",
            "|---|--:|--:|--:|",
        ]
        for lay in report.layers:
            gain = lay.sqnr_after - lay.sqnr_before
            lines.append(
                f"| {lay.path} | {_db(lay.sqnr_before)} | {_db(lay.sqnr_after)} | {gain:+.1f} |"
            )
    return "\n".join(lines)


def outputs_rich_table(report):
    """A ``rich.table.Table`` for an ``OutputReport`` (model rows, then one row per layer).

    Example:
      >>> from jaxsplit.outputs import OutputError, OutputReport, LayerOutput
      >>> from jaxsplit.quant import QuantSpec
      >>> e = OutputError(0.01, 20.0, 0.99, None)
      >>> r = OutputReport(QuantSpec(), 8, e, e, (LayerOutput("d", 30.0, 36.0),), 5)
      >>> outputs_rich_table(r).row_count
      3
    """
    from rich.table import Table

    table = Table(
        title="jaxsplit: model outputs under quantization", caption=_outputs_caption(report)
    )
    for i, name in enumerate(_OUT_COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in _outputs_cells(report):
        table.add_row(*row)
    if report.layers:
        table.add_section()
        for lay in report.layers:
            gain = lay.sqnr_after - lay.sqnr_before
            table.add_row(
                f"layer {lay.path}",
                "",
                "",
                f"{_db(lay.sqnr_before)} → {_db(lay.sqnr_after)}",
                f"{gain:+.1f} dB",
                "",
            )
    return table


# --- sweeps --------------------------------------------------------------------------------

_SWEEP_COLUMNS = (
    ("layer", "layer", "{}"),
    ("threshold", "threshold", "{}"),
    ("method", "method", "{}"),
    ("spec", "spec", "{}"),
    ("frac_split", "split %", "{:.2%}"),
    ("extra_fraction", "extra nz %", "{:.2%}"),
    ("mse_before", "MSE before", "{:.3e}"),
    ("mse", "MSE", "{:.3e}"),
    ("predicted_mse", "Widrow", "{:.3e}"),
    ("predicted_mse_correlated", "Widrow corr.", "{:.3e}"),
    ("reduction", "reduction", "{:.1%}"),
    ("sqnr_db", "SQNR dB", "{:.2f}"),
)


def _fmt(value, fmt: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    """A GitHub markdown table; the first ``left`` columns left-aligned, the rest right.

    Cells are ``str()``-ed and ``|`` is escaped.

    Example:
      >>> print(markdown_table(["a", "b"], [["x", 1]]))
      | a | b |
      |---|---:|
      | x | 1 |
    """
    rule = "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"
    lines = ["| " + " | ".join(headers) + " |", rule]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def sweep_markdown(result: SweepResult) -> str:
    """A GitHub markdown table of a sweep's main columns.

    Example:
      >>> import numpy as np, jaxsplit as js
      >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8) ** 3
      >>> res = js.sweep({"d": {"kernel": w}}, js.SplitConfig(layers=["d"]), thresholds=[0.5])
      >>> sweep_markdown(res).splitlines()[0][:35]
      '| layer | threshold | method | spec'
    """
    rows = [[_fmt(getattr(r, name), f) for name, _, f in _SWEEP_COLUMNS] for r in result.rows]
    return markdown_table([title for _, title, _ in _SWEEP_COLUMNS], rows, left=4)


def sweep_csv(result: SweepResult, path: str | None = None) -> str:
    """CSV text of every sweep row with a header (``shape`` as ``4x4``); also written to
    ``path`` if given.

    Example:
      >>> import numpy as np, jaxsplit as js
      >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8) ** 3
      >>> res = js.sweep({"d": {"kernel": w}}, js.SplitConfig(layers=["d"]), thresholds=[0.5])
      >>> sweep_csv(res).splitlines()[0].split(",")[:4]
      ['layer', 'shape', 'threshold', 'threshold_abs']
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SweepRow._fields)
    for r in result.rows:
        writer.writerow(
            "x".join(map(str, v)) if k == "shape" else (repr(v) if isinstance(v, float) else v)
            for k, v in zip(SweepRow._fields, r, strict=True)
        )
    text = buf.getvalue()
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text


# --- dispatch ------------------------------------------------------------------------------


def _unknown(what: str, result) -> TypeError:
    return TypeError(
        f"{what}: result must be a Report, OutputReport or SweepResult, got {type(result).__name__}"
    )


def markdown(result) -> str:
    """Markdown for any jaxsplit result (``Report``, ``OutputReport``, ``SweepResult``).

    Example:
      >>> import numpy as np, jaxsplit as js
      >>> w = {"d": {"kernel": np.array([[0.5, 2.0]], np.float32)}}
      >>> markdown(js.quant_error(w, w, js.QuantSpec())).startswith("*int8")
      True
    """
    if isinstance(result, Report):
        return report_markdown(result)
    if isinstance(result, OutputReport):
        return outputs_markdown(result)
    if isinstance(result, SweepResult):
        return sweep_markdown(result)
    raise _unknown("markdown", result)


def rich_table(result):
    """A ``rich.table.Table`` for a ``Report`` or ``OutputReport``.

    Example:
      >>> import numpy as np, jaxsplit as js
      >>> w = {"d": {"kernel": np.array([[0.5, 2.0]], np.float32)}}
      >>> rich_table(js.quant_error(w, w, js.QuantSpec())).row_count
      2
    """
    if isinstance(result, Report):
        return report_rich_table(result)
    if isinstance(result, OutputReport):
        return outputs_rich_table(result)
    raise _unknown("rich_table", result)


def to_csv(result, path: str | None = None) -> str:
    """CSV text for a ``SweepResult`` (also written to ``path`` if given).

    Example:
      >>> to_csv(SweepResult(()))[:5]
      'layer'
    """
    if isinstance(result, SweepResult):
        return sweep_csv(result, path)
    raise _unknown("to_csv", result)
