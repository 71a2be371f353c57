"""Eager calls of the functions with loops inside: ``python -m benchmarks.eager_calls``.

``kernels.compensate`` (its code scan, its cache-sized blocks), ``measure.measure`` and
``measure.measure_candidate`` (blocked passes) run ``lax`` loops. Called outside ``jit``
(a notebook, ``quant_error``, a per-layer loop), a loop whose body is a new closure at
every call compiles anew at every call; jitted, the function compiles once per shape and
configuration. Prints a markdown table: the first call (compilation included) and the
median of the repeat calls, each a different threshold, per function and kernel size.
Run it at two commits to compare them (the numbers are per process).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxsplit import kernels, quant
from jaxsplit.measure import measure, measure_candidate


def _ms(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - t) * 1e3


def rows(sizes=(24, 512), reps: int = 4) -> list[dict]:
    """One dict per (function, size): first-call and median repeat-call ms."""
    spec = quant.QuantSpec(bits=4)
    out = []
    for n in sizes:
        w = jax.device_put((np.random.default_rng(0).standard_t(3, (n, n)) * 0.02).astype("f4"))
        calls = {
            "kernels.compensate": lambda t, w=w: kernels.compensate(w, t, spec),
            "measure.measure": lambda t, w=w: measure(w, kernels.clip(w, t), spec),
            "measure.measure_candidate(clip)": (
                lambda t, w=w: measure_candidate("clip", w, t, spec=spec)
            ),
        }
        for name, call in calls.items():
            times = [_ms(lambda i=i, c=call: c(0.03 + 1e-3 * i)) for i in range(reps + 1)]
            out.append(
                {
                    "function": name,
                    "kernel": f"{n}x{n}",
                    "first_ms": times[0],
                    "repeat_ms": float(np.median(times[1:])),
                }
            )
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| function | kernel | first call ms | repeat call ms |", "|---|---|---:|---:|"]
    for r in table:
        lines.append(
            f"| {r['function']} | {r['kernel']} | {r['first_ms']:.0f} | {r['repeat_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="24,512")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args(argv)
    md = markdown(rows(tuple(int(s) for s in args.sizes.split(",")), args.reps))
    print(md)
    return md


if __name__ == "__main__":
    main()
