"""Renders a ``DemoResult``: markdown tables and the accuracy / weight-SQNR plot."""

from __future__ import annotations

import os

from jaxsplit.demo.job import DemoConfig, DemoResult, DemoRow

__all__ = ["markdown", "overhead", "pivot", "plot"]


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
    return "\n".join(lines)


def plot(result: DemoResult, path: str) -> str:
    """Accuracy and weight SQNR vs bits, one line per variant, saved as a PNG.

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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in variants:
        style = "k--" if v == "no split" else "-o"
        ax1.plot(bits, [100 * acc[v, b] for b in bits], style, label=v, ms=4)
        ax2.plot(bits, [sqnr[v, b] for b in bits], style, label=v, ms=4)
    ax1.axhline(100 * result.fp32_accuracy, color="grey", lw=0.8, label="fp32")
    ax1.set(xlabel="weight bits (per tensor)", ylabel="test accuracy (%)", title="digits CNN")
    ax2.set(xlabel="weight bits (per tensor)", ylabel="weight SQNR (dB)", title="all kernels")
    for ax in (ax1, ax2):
        ax.set_xticks(bits)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
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
    return DemoResult(DemoConfig.quick(bits=(4,)), 0.98, 1000, 450, rows, 1.0, 2.0)
