"""Cold start in a fresh process: ``python -m benchmarks.cold --layers 100 --shapes 20``.

Times the first ``split_params`` call (every program compiled on the way) on a tree of
``layers`` Dense/Conv layers drawing from ``shapes`` distinct kernel shapes, then a second
(warm) call. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from benchmarks.common import kernel
from jaxsplit import SplitConfig, split_params


def shapes(k: int) -> list[tuple[int, ...]]:
    """``k`` distinct, realistic kernel shapes (Dense and 3×3 Conv)."""
    out = []
    for i in range(k):
        c = 16 * (1 + i // 2)
        out.append((c, 2 * c) if i % 2 == 0 else (3, 3, c, c))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--shapes", type=int, default=20)
    args = ap.parse_args(argv)
    kinds = shapes(args.shapes)
    tree = {
        f"layer_{i}": {"kernel": kernel(kinds[i % len(kinds)], i), "bias": jax.numpy.zeros(1)}
        for i in range(args.layers)
    }
    jax.block_until_ready(tree)
    cfg = SplitConfig(layers=["*"], threshold=1.0)
    t = time.perf_counter()
    jax.block_until_ready(split_params(tree, cfg))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(split_params(tree, cfg))
    warm = time.perf_counter() - t
    res = {"layers": args.layers, "shapes": args.shapes, "cold_s": cold, "warm_s": warm}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
