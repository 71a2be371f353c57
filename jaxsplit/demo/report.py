"""Renders a ``DemoResult``: markdown tables and the accuracy / weight-SQNR plot."""

from __future__ import annotations

import os

import jaxsplit as js
from jaxsplit.demo.job import DemoConfig, DemoResult, DemoRow, MiniLMRow

__all__ = ["markdown", "minilm_markdown", "overhead", "pivot", "plot"]


def pivot(result: DemoResult, field: str) -> tuple[list[str], list[int], dict]:
    """``(variants, bits, {(variant, bits): row.field})`` in table order.

    Example:
      >>> pivot(_example(), "accuracy")
      (['no split', 'balance rel:0.5'], [4], {('no split', 4): 0.9, ('balance rel:0.5', 4): 0.95})
    """
    variants = list(dict.fromkeys(r.variant for r in result.rows))
    bits = list(dict.fromkeys(r.bits for r in result.rows))
    return variants, bits, {(r.variant, r.bits): getattr(r, field) for r in result.rows}


def overhead(result: DemoResult, variant: str) -> str:
    """A variant's extra non-zero parameters (% of the model), a range if bits change it.

    Example:
      >>> overhead(_example(), "balance rel:0.5")
      '1.00%'
    """
    fr = sorted(
        {f"{r.extra_params_frac:.2%}" for r in result.rows if r.variant == variant},
        key=lambda x: float(x[:-1]),
    )
    return fr[0] if len(fr) == 1 else f"{fr[0]}-{fr[-1]}"


def markdown(result: DemoResult) -> str:
    """Two GitHub tables (test accuracy %, weight SQNR dB; variants × bits) and notes.

    Example:
      >>> for line in markdown(_example()).splitlines()[2:6]:
      ...     print(line)
      | variant | int4 | extra params |
      |---|---:|---:|
      | no split | 90.00% | 0.00% |
      | balance rel:0.5 | 95.00% | 1.00% |
    """
    variants, bits, acc = pivot(result, "accuracy")
    _, _, sqnr = pivot(result, "weight_sqnr_db")
    head = "| variant | " + " | ".join(f"int{b}" for b in bits) + " | extra params |"
    rule = "|---|" + "---:|" * (len(bits) + 1)
    lines = [
        f"fp32 test accuracy: **{result.fp32_accuracy:.2%}** ({result.n_test} test images, "
        f"{result.n_params} parameters, {result.config.epochs} epochs, seed {result.config.seed})",
        "",
        head,
        rule,
    ]
    for v in variants:
        cells = [f"{acc[v, b]:.2%}" for b in bits]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {overhead(result, v)} |")
    lines += [
        "",
        "Weight SQNR (dB) over all kernels:",
        "",
        head.replace(" extra params |", ""),
        rule[:-5],
    ]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(f"{sqnr[v, b]:.2f}" for b in bits) + " |")
    if result.minilm_rows or result.minilm_note:
        lines += ["", minilm_markdown(result)]
    return "\n".join(lines)


def _minilm_extra(rows, variant: str) -> str:
    fr = [r.extra_params_frac for r in rows if r.variant == variant]
    lo, hi = f"{min(fr):.2%}", f"{max(fr):.2%}"
    return lo if lo == hi else f"{lo}-{hi}"


def minilm_markdown(result: DemoResult) -> str:
    """The MiniLM table: mean embedding cosine per variant and bit width, extra non-zeros.

    Example:
      >>> print(minilm_markdown(_example()).splitlines()[-1])
      | balance rel:0.5 (PPQ) | 0.7421 | 0.17% |
    """
    rows = result.minilm_rows
    if not rows:
        return f"MiniLM: {result.minilm_note}"
    variants = list(dict.fromkeys(r.variant for r in rows))
    bits = list(dict.fromkeys(r.bits for r in rows))
    cos = {(r.variant, r.bits): r.cosine for r in rows}
    lines = [
        "paraphrase-MiniLM-L3-v2 (pretrained), mean cosine of float vs quantized sentence "
        f"embeddings ({result.minilm_note}):",
        "",
        "| variant | " + " | ".join(f"int{b} cosine" for b in bits) + " | extra nnz |",
        "|---|" + "---:|" * (len(bits) + 1),
    ]
    for v in variants:
        cells = [f"{cos[v, b]:.4f}" for b in bits]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {_minilm_extra(rows, v)} |")
    return "\n".join(lines)


def plot(result: DemoResult, path: str) -> str:
    """Accuracy and weight SQNR vs bits (digits CNN), MiniLM cosine vs bits; a PNG.

    One distinct colour per variant (``js.plot.colors``); the MiniLM legend gives each
    variant's extra non-zeros.

    Raises:
      ImportError: matplotlib is missing (install the ``demo`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the demo plot needs matplotlib: pip install -e ".[demo]"') from e
    variants, bits, acc = pivot(result, "accuracy")
    _, _, sqnr = pivot(result, "weight_sqnr_db")
    panels = 3 if result.minilm_rows else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.4))
    ax1, ax2 = axes[0], axes[1]
    color = dict(zip(variants, js.plot.colors(len(variants)), strict=True))
    for v in variants:
        style = "--" if v == "no split" else "-o"
        kw = dict(color=color[v], label=v, ms=4)
        ax1.plot(bits, [100 * acc[v, b] for b in bits], style, **kw)
        ax2.plot(bits, [sqnr[v, b] for b in bits], style, **kw)
    ax1.axhline(100 * result.fp32_accuracy, color="black", lw=0.8, ls=":", label="fp32")
    ax1.set(xlabel="weight bits (per tensor)", ylabel="test accuracy (%)", title="digits CNN")
    ax2.set(xlabel="weight bits (per tensor)", ylabel="weight SQNR (dB)", title="all kernels")
    for ax in axes:
        ax.grid(alpha=0.3)
    if result.minilm_rows:
        ax3 = axes[2]
        rows = result.minilm_rows
        mvars = list(dict.fromkeys(r.variant for r in rows))
        mbits = list(dict.fromkeys(r.bits for r in rows))
        mcolor = dict(zip(mvars, js.plot.colors(len(mvars)), strict=True))
        for v in mvars:
            ys = [next(r.cosine for r in rows if r.variant == v and r.bits == b) for b in mbits]
            label = f"{v} (+{_minilm_extra(rows, v)} nnz)"
            ax3.plot(mbits, ys, "--" if v == "no split" else "-o", color=mcolor[v], label=label)
        ax3.set(
            xlabel="weight bits (per tensor)",
            ylabel="mean cosine to float embeddings",
            title="MiniLM-L3 (pretrained), 18 Dense kernels",
        )
        ax3.set_xticks(mbits)
        ax3.invert_xaxis()
        ax3.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.set_xticks(bits)
        ax.invert_xaxis()
    ax1.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _example() -> DemoResult:
    """A two-row result for the doctests."""
    rows = (
        DemoRow("no split", 4, 0.9, 13.0, 0, 0, 0.0),
        DemoRow("balance rel:0.5", 4, 0.95, 19.0, 4, 10, 0.01),
    )
    mrows = (
        MiniLMRow("no split", 4, 0.5064, 0, 0.0, 0.0),
        MiniLMRow("balance rel:0.5 (PPQ)", 4, 0.7421, 9, 0.0017, 1.0),
    )
    return DemoResult(
        DemoConfig.quick(bits=(4,)), 0.98, 1000, 450, rows, 1.0, 2.0, mrows, "a note", 3.0
    )
