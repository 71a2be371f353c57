"""Peak RSS of one split, in a fresh process: ``python -m benchmarks.peak --mib 1024 [--donate]``.

Prints one JSON line: tree bytes, RSS before the tree was built, peak RSS (``VmHWM``)
and ``(peak - before) / tree bytes``. The tree is ``n`` Dense kernels of ``side²`` float32
(about half the values above the threshold) with biases.
"""

from __future__ import annotations

import argparse
import json

import jax

from benchmarks.common import big_tree, tree_bytes
from jaxsplit import SplitConfig, split_params


def status_bytes(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, from ``/proc/self/status``.

    ``VmHWM`` belongs to this process's address space; ``getrusage``'s ``ru_maxrss`` would
    not do, as Linux carries it over from the parent across ``exec``.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="tree size in MiB (multiple of side²×4)")
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--donate", action="store_true")
    args = ap.parse_args(argv)
    n = max(1, args.mib * 2**20 // (args.side * args.side * 4))
    before = status_bytes("VmRSS")
    tree = big_tree(n, args.side)
    b = tree_bytes(tree)
    cfg = SplitConfig(layers=["**/Dense_0"], threshold=1.0)
    out = split_params(tree, cfg, donate=args.donate)
    jax.block_until_ready(out)
    peak = status_bytes("VmHWM")
    res = {
        "tree_bytes": b,
        "kernels": n,
        "donate": args.donate,
        "rss_before": before,
        "peak_rss": peak,
        "peak_over_tree": (peak - before) / b,
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
