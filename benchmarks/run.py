"""``python -m benchmarks.run [--quick] [--json PATH] [--rss-mib N]``: the benchmark table.

Cases (ratios are against the memory-traffic floor measured in the same run, interleaved):

* ``kernel``: ``split_params`` on one ``side²`` float32 kernel (threshold 1.0, about half
  the values split), plain and ``donate=True``, against the floor (numpy reading ``W`` once
  and writing two outputs into already-touched buffers) and the naive two-line jit split.
* ``tree``: the same on a tree of ``n × side²`` kernels plus a mix of small layers.
* ``sweep``: weight-quantization MSE of N thresholds (see ``benchmarks.sweep``) against N
  reads of the kernel.
* ``cold``: first call on a 100-layer tree with 20 distinct shapes, in a fresh process.
* ``rss``: peak RSS of a split over the tree's bytes, plain and donated, in fresh processes.

``--quick`` uses tiny sizes (< 60 s): a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import jax
import jax.numpy as jnp

from benchmarks import sweep
from benchmarks.common import (
    big_tree,
    floor_buffers,
    floor_split,
    kernel,
    kernels_of,
    naive_split,
    run_child,
    timed,
    tree_bytes,
)
from jaxsplit import SplitConfig, split_params

FULL = {"side": 4096, "tree": (64, 2048, 64), "sweep": (1024, 64), "cold": (100, 20), "reps": 7}
QUICK = {"side": 256, "tree": (4, 128, 6), "sweep": (128, 8), "cold": (6, 3), "reps": 2}


def _split_case(name: str, tree: dict, layers, reps: int) -> dict:
    """Floor, naive jit, split_params and split_params(donate=True) on one tree."""
    ks = kernels_of(tree)
    bufs = floor_buffers(ks)
    cfg = SplitConfig(layers=layers, threshold=1.0)
    t = jnp.float32(1.0)

    res = timed(
        {
            "floor": lambda: floor_split(ks, bufs),
            "naive": lambda: [naive_split(k, t) for k in ks],
            "jaxsplit": lambda: split_params(tree, cfg),
            "donate": lambda fresh: split_params(fresh, cfg, donate=True),
        },
        reps,
        setups={"donate": lambda: jax.tree.map(lambda x: x + 0, tree)},  # a copy to consume
    )
    return {"case": name, "bytes": tree_bytes(tree), **res}


def _sweep_case(side: int, n: int, reps: int) -> dict:
    w = kernel((side, side), 7)
    ts = jnp.linspace(0.5, 4.0, n, dtype=jnp.float32)
    x = jax.device_get(w)

    def floor():
        for _ in range(n):
            x.max()

    res = timed(
        {
            "floor": floor,
            "loop": lambda: sweep.loop(w, ts),
            "vmap": lambda: sweep.vmapped(w, ts),
            "jaxsplit": lambda: sweep.fused(w, ts),
        },
        max(1, reps // 2),
    )
    return {"case": f"sweep {n} thr {side}²", "bytes": int(w.nbytes), **res}


def _row(r: dict, key: str = "jaxsplit") -> str:
    f = r["floor"]["median_ms"]
    j = r[key]["median_ms"]
    naive = r.get("naive", r.get("loop"))["median_ms"]
    return (
        f"| {r['case']} | {f:.1f} | {j:.1f} | {j / f:.2f} | "
        f"{r[key]['min_ms'] / r['floor']['min_ms']:.2f} | {naive:.1f} | {naive / f:.2f} |"
    )


def table(results: dict) -> str:
    lines = [
        "| case | floor ms | jaxsplit ms | ratio (median) | ratio (min) | naive ms | naive ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["timed"]:
        lines.append(_row(r))
        if "donate" in r:
            lines.append(_row({**r, "case": r["case"] + " donate=True"}, "donate"))
        if "vmap" in r:
            lines.append(_row({**r, "case": r["case"] + " (vmap)"}, "vmap"))
    c = results["cold"]
    lines += [
        "",
        f"cold: {c['layers']} layers, {c['shapes']} shapes: first call "
        f"{c['cold_s']:.2f} s, second {c['warm_s'] * 1e3:.1f} ms",
        "",
    ]
    lines += [
        "| peak RSS case | tree MiB | peak RSS MiB | (peak - before) / tree |",
        "|---|---|---|---|",
    ]
    for r in results["rss"]:
        lines.append(
            f"| donate={r['donate']} | {r['tree_bytes'] / 2**20:.0f} | "
            f"{r['peak_rss'] / 2**20:.0f} | {r['peak_over_tree']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (< 60 s)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--rss-mib", type=int, default=None, help="tree size of the RSS case")
    ap.add_argument(
        "--skip", default="", help="comma-separated cases to skip: kernel,tree,sweep,cold,rss"
    )
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    skip = set(filter(None, args.skip.split(",")))
    # fresh processes first, while this one is still small
    layers, shapes = p["cold"]
    cold = {"layers": 0, "shapes": 0, "cold_s": float("nan"), "warm_s": float("nan")}
    if "cold" not in skip:
        cold = run_child("benchmarks.cold", ["--layers", str(layers), "--shapes", str(shapes)])
    rss = []
    if "rss" not in skip:
        mib = args.rss_mib or (16 if args.quick else 1024)
        side = 256 if args.quick else 2048
        for donate in (False, True):
            extra = ["--donate"] if donate else []
            rss.append(
                run_child("benchmarks.peak", ["--mib", str(mib), "--side", str(side), *extra])
            )
    timed_rows = []
    if "kernel" not in skip:
        side = p["side"]
        tree = {"Dense_0": {"kernel": kernel((side, side), 0), "bias": jnp.zeros(side)}}
        timed_rows.append(_split_case(f"kernel {side}²", tree, ["Dense_0"], p["reps"]))
        del tree
    if "tree" not in skip:
        n, side, small = p["tree"]
        tree = big_tree(n, side, small)
        name = f"tree {n}×{side}² + {small} small ({tree_bytes(tree) / 2**20:.0f} MiB)"
        timed_rows.append(
            _split_case(name, tree, ["**/Dense_0", "small_*"], max(3, p["reps"] // 2))
        )
        del tree
    if "sweep" not in skip:
        timed_rows.append(_sweep_case(*p["sweep"], p["reps"]))
    results = {
        "timed": timed_rows,
        "cold": cold,
        "rss": rss,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
    }
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
