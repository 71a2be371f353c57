"""The README's method comparison table, computed by the library itself.

Every row splits the same seeded synthetic weights with ``split_with_report`` and measures
the result with the evaluator (``quant_error``: ``mean((sum_i Q(W_i) - W)²)`` against
``mean((Q(W) - W)²)``, per tensor), so the numbers are what a user would get.

    python -m experiments.methods_table           # print the table
    python -m experiments.methods_table --write   # refresh it in README.md

``tests/test_methods.py`` checks that README.md holds exactly what this prints.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

import jaxsplit as js
from jaxsplit.evaluate import quant_error

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
SHAPE = (256, 256)
SPECS = {"int8": js.QuantSpec(bits=8), "int4": js.QuantSpec(bits=4)}


def weights() -> np.ndarray:
    """Seeded heavy-tailed weights: Student-t with 3 degrees of freedom, scale 0.02."""
    return (np.random.default_rng(0).standard_t(3, size=SHAPE) * 0.02).astype(np.float32)


def configs(spec: js.QuantSpec) -> list[tuple[str, str, dict]]:
    """``(method label, threshold label, SplitConfig kwargs)`` per row."""
    return [
        ("balance (PPQ)", "Relative(0.5)", dict(threshold=js.Relative(0.5))),
        ("balance, 4 branches", "Relative(0.25)", dict(threshold=js.Relative(0.25), branches=4)),
        ("grid", "Relative(0.25)", dict(threshold=js.Relative(0.25), method="grid", spec=spec)),
        ("clip", "Relative(0.25)", dict(threshold=js.Relative(0.25), method="clip")),
        ("residual", "0 (dense twin)", dict(threshold=0.0, method="residual", spec=spec)),
        (
            "clip",
            "Auto(max_extra=1%)",
            dict(threshold=js.Auto(spec, max_extra=0.01), method="clip"),
        ),
        ("clip", "Auto", dict(threshold=js.Auto(spec), method="clip")),
        (
            "auto",
            "Auto(max_extra=2%)",
            dict(threshold=js.Auto(spec, max_extra=0.02), method="auto"),
        ),
        ("auto", "Auto", dict(threshold=js.Auto(spec), method="auto")),
    ]


def rows() -> list[dict]:
    """One dict per (row, spec): labels, MSE reduction (%), extra non-zeros (%), choice."""
    w = weights()
    params = {"layer": {"kernel": w}}
    out = []
    for name, spec in SPECS.items():
        for method, thr, kwargs in configs(spec):
            cfg = js.SplitConfig(layers=["layer"], **kwargs)
            p2, rep = js.split_with_report(params, cfg)
            err = quant_error(params, p2, spec).layers[0]
            plan = rep.layers[0]
            out.append(
                {
                    "spec": name,
                    "method": method,
                    "threshold": thr,
                    "reduction": 100 * err.reduction,
                    "extra": 100.0 * err.extra_nonzero / err.n_total,
                    "chosen": plan.auto.method if plan.auto is not None else None,
                }
            )
    return out


def markdown() -> str:
    """The table as Markdown (one line per method row, one column pair per spec)."""
    table = rows()
    labels = list(SPECS)
    head = "| method | threshold | " + " | ".join(
        f"{s} MSE cut | {s} extra non-zeros" for s in labels
    )
    lines = [head + " |", "|---|---|" + "---:|---:|" * len(labels)]
    per_spec = {s: [r for r in table if r["spec"] == s] for s in labels}
    for i, (method, thr, _) in enumerate(configs(SPECS[labels[0]])):
        cells = []
        for s in labels:
            r = per_spec[s][i]
            chosen = f" ({r['chosen']})" if r["method"] == "auto" and r["chosen"] else ""
            cells += [f"{r['reduction']:.1f}%{chosen}", f"{r['extra']:.2f}%"]
        lines.append(f"| {method} | {thr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The table currently between the markers in README text."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str]) -> int:
    md = markdown()
    if "--write" in argv:
        text = README.read_text()
        head, rest = text.split(START, 1)
        README.write_text(f"{head}{START}\n{md}\n{END}{rest.split(END, 1)[1]}")
    else:
        sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
