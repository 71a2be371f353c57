"""How a warm split scales with layer size and layer count: jaxsplit, the floor, PPQ.

``python -m benchmarks.split_scaling measure --json scaling.json [--ppq] [--reps 3]``
(in the PPQ venv for ``--ppq``, see ``../shared/bench/README.md``) times ``split_params``
(``balance``, threshold 1.0, float32), the fresh-output numpy floor and PPQ on

* one layer of ``N × N`` for ``N`` in 256 ... 4096 (size), and
* ``L`` layers of ``256 × 256`` for ``L`` in 1 ... 256 (count),

each interleaved rep by rep as ``benchmarks.split_floor`` does. ``python -m
benchmarks.split_scaling plot scaling.json out.png`` (needs matplotlib) draws both on
log-log axes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from benchmarks import split_floor

SIZES = (256, 512, 1024, 2048, 4096)
COUNTS = (1, 4, 16, 64, 256)
SERIES = {"balance": "jaxsplit split_params", "floor_fresh": "numpy floor (fresh)", "ppq": "PPQ"}


def measure(reps: int, ppq: bool) -> dict:
    routes = {"split", "floor_fresh", *(["ppq"] if ppq else [])}
    out = {"load": os.getloadavg()[0], "size": [], "count": []}
    for axis, trees in (
        ("size", [f"1x{n}" for n in SIZES]),
        ("count", [f"{c}x256" for c in COUNTS]),
    ):
        for name in trees:
            r = split_floor.measure(name, ["balance"], reps, routes)
            n, shape = split_floor.tree_shape(name)
            out[axis].append({"tree": name, "layers": n, "values": n * shape[0] * shape[1],
                              "ms": r["ms"]})  # fmt: skip
            print(name, {k: round(v, 2) for k, v in r["ms"].items()}, flush=True)
    out["load_after"] = os.getloadavg()[0]
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, xlabel in (
        (axes[0], "size", "weights in the one layer (N²)"),
        (axes[1], "count", "layers of 256² (count)"),
    ):
        rows = res[axis]
        x = [r["values"] if axis == "size" else r["layers"] for r in rows]
        for key, label in SERIES.items():
            if key in rows[0]["ms"]:
                ax.loglog(x, [r["ms"][key] for r in rows], "o-", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("warm time, ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_title("vs layer size (1 layer)")
    axes[1].set_title("vs layer count (256² each)")
    fig.suptitle(f"split time, float32 balance (load {res['load']:.1f} on 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--json", required=True)
    m.add_argument("--reps", type=int, default=3)
    m.add_argument("--ppq", action="store_true")
    p = sub.add_parser("plot")
    p.add_argument("json")
    p.add_argument("png")
    args = ap.parse_args(argv)
    if args.cmd == "measure":
        res = measure(args.reps, args.ppq)
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
        return res
    plot(json.loads(pathlib.Path(args.json).read_text()), args.png)
    return None


if __name__ == "__main__":
    main()
