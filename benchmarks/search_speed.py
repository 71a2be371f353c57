"""Warm ``Auto`` search speed vs one numpy fake-quant pass: ``python -m benchmarks.search_speed``.

One heavy-tailed float32 layer (Student-t, df=3, ``× 0.02``), ``Auto(QuantSpec(bits),
max_extra=budget)``. In one process, interleaved rep by rep with the floor (medians):

* **floor**: one numpy fake-quant pass over the layer (``s = max|W| / qmax``;
  ``clip(rint(W / s), -qmax, qmax) · s``).
* **screened**: ``search.search`` as ``Auto`` runs it (``jaxsplit.screen``: sampled
  scores, the ``top`` best measured exactly).
* **exhaustive**: ``search.search(..., exhaustive=True)``: every candidate measured on the
  whole layer (same candidate thresholds), ``--exhaustive-reps`` times (it is slow).

Prints a markdown table: times, ratios to the floor and the MSE gap of the screened choice
to the exhaustive one (``mse_screened / mse_exhaustive - 1``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from jaxsplit import Auto, QuantSpec, search


def floor_fake_quant(w: np.ndarray, qmax: int) -> np.ndarray:
    """One numpy fake-quant pass (per tensor, symmetric)."""
    s = np.float32(np.abs(w).max()) / np.float32(qmax)
    return np.clip(np.rint(w / s), -qmax, qmax) * s


def _vs_floor(run, floor, reps: int) -> tuple[float, float]:
    """Median ms of ``floor`` and ``run``, interleaved ``reps`` times after a warm-up."""
    run()
    tf, ts = [], []
    for _ in range(reps):
        tf.append(_time(floor))
        ts.append(_time(run))
    return float(np.median(tf)) * 1e3, float(np.median(ts)) * 1e3


def _time(fn) -> float:
    return _timed(fn)[0]


def _timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t, out


def gaps(size: int, budget: float) -> list[dict]:
    """Screened vs exhaustive measured MSE on ``size``² layers: seeds × tails × bits × methods."""
    out = []
    for seed, df in ((0, 3), (1, 3), (2, 5), (3, 2)):
        w = jax.device_put(
            (np.random.default_rng(seed).standard_t(df, (size, size)) * 0.02).astype(np.float32)
        )
        for bits in (4, 8):
            auto = Auto(QuantSpec(bits=bits), max_extra=budget)
            for method in ("clip", "auto"):
                f = search.search(w, None, auto=auto, method=method)[1]
                e = search.search(w, None, auto=auto, method=method, exhaustive=True)[1]
                mf, me = float(f["mse"]), float(e["mse"])
                out.append(
                    {
                        "seed": seed,
                        "df": df,
                        "bits": bits,
                        "method": method,
                        "gap": mf / me - 1,
                        "same": bool(np.array_equal(f["threshold"], e["threshold"]))
                        and int(f["method"]) == int(e["method"]),
                    }
                )
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--methods", default="clip,auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--exhaustive-reps", type=int, default=1)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--gap-size", type=int, default=1024, help="0: skip the gap study")
    ap.add_argument("--sweep", action="store_true", help="also time a 64-threshold clip sweep")
    args = ap.parse_args(argv)
    wn = (np.random.default_rng(0).standard_t(3, (args.size, args.size)) * 0.02).astype(np.float32)
    w = jax.device_put(wn)
    spec = QuantSpec(bits=args.bits)
    auto = Auto(spec, max_extra=args.budget)
    rows = []
    print(
        f"load average {os.getloadavg()}, layer {args.size}², int{args.bits}, budget {args.budget}"
    )
    print()
    print(
        "| method | floor ms | screened ms | × floor | exhaustive ms | × floor | speed-up |"
        " MSE screened | MSE exhaustive | gap |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        fast = lambda m=method: search.search(w, None, auto=auto, method=m, top=args.top)  # noqa: E731
        slow = lambda m=method: search.search(w, None, auto=auto, method=m, exhaustive=True)  # noqa: E731
        floor = lambda: floor_fake_quant(wn, spec.qmax)  # noqa: E731
        _time(floor)
        mf = float(fast()[1]["mse"])  # compile / warm up
        ms = float(slow()[1]["mse"])
        t = {"floor": [], "fast": [], "slow": []}
        for r in range(args.reps):
            t["floor"].append(_time(floor))
            t["fast"].append(_time(fast))
            if r < args.exhaustive_reps:
                t["floor"].append(_time(floor))
                t["slow"].append(_time(slow))
        med = {k: float(np.median(v)) * 1e3 for k, v in t.items()}
        row = {
            "method": method,
            **med,
            "mse_fast": mf,
            "mse_exhaustive": ms,
            "gap": mf / ms - 1 if ms else 0.0,
        }
        rows.append(row)
        print(
            f"| {method} | {med['floor']:.0f} | {med['fast']:.0f} |"
            f" {med['fast'] / med['floor']:.1f} | {med['slow']:.0f} |"
            f" {med['slow'] / med['floor']:.0f} | {med['slow'] / med['fast']:.0f}× |"
            f" {mf:.4g} | {ms:.4g} | {row['gap']:+.2%} |"
        )
    if args.sweep:
        from jaxsplit import Relative, SplitConfig, sweep

        params = {"d": {"kernel": w}}
        cfg = SplitConfig(layers=["d"])
        thr = [Relative(j / 64) for j in range(64)]
        run = lambda: sweep(params, cfg, thresholds=thr, methods=["clip"], specs=[spec])  # noqa: E731
        f_ms, s_ms = _vs_floor(run, lambda: floor_fake_quant(wn, spec.qmax), 2)
        print(
            f"\nsweep, 64 Relative thresholds, clip, int{args.bits}: {s_ms:.0f} ms = "
            f"{s_ms / f_ms:.0f}× the floor ({f_ms:.0f} ms)"
        )
        from jaxsplit.sweeps import auto_sweep

        for scope in ("layer", "tree"):
            a = Auto(spec, max_extra=args.budget, scope=scope)
            for m in args.methods.split(","):
                run = lambda a=a, m=m: auto_sweep(params, cfg, autos=[a], methods=[m])  # noqa: E731
                f_ms, s_ms = _vs_floor(run, lambda: floor_fake_quant(wn, spec.qmax), args.reps)
                print(
                    f"sweep --thresholds auto ({scope} scope, screened), {m}, int{args.bits}: "
                    f"{s_ms:.0f} ms = {s_ms / f_ms:.1f}× the floor ({f_ms:.0f} ms; includes "
                    f"the split and quant_error's report of the choice)"
                )
    if args.gap_size:
        g = gaps(args.gap_size, args.budget)
        print(f"\nMSE gap, screened vs exhaustive, {args.gap_size}² layers, budget {args.budget}:")
        print("| seed | df | bits | method | gap | same choice |")
        print("|---|---|---|---|---|---|")
        for r in g:
            print(
                f"| {r['seed']} | {r['df']} | {r['bits']} | {r['method']} | {r['gap']:+.3%} |"
                f" {r['same']} |"
            )
        print(f"worst gap {max(r['gap'] for r in g):+.3%}")
    print(f"\nload average after: {os.getloadavg()}")
    return rows


if __name__ == "__main__":
    main()
