"""Peak RSS of one ``Auto`` search, in a fresh process: ``python -m benchmarks.search_peak``.

Builds one heavy-tailed float32 layer (Student-t, df=3, ``× 0.02``, ``--size``² values), reads
``VmHWM``, runs ``search.search`` once (compilation included) and reads it again. Prints one
JSON line: the layer's bytes, the peak before and after, and the increase over the layer.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from benchmarks.peak import status_bytes
from jaxsplit import Auto, QuantSpec, search


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--method", default="auto")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    w = jax.device_put((rng.standard_t(3, (args.size, args.size)) * 0.02).astype(np.float32))
    jax.block_until_ready(w)
    before = status_bytes("VmHWM")
    auto = Auto(QuantSpec(bits=args.bits), max_extra=args.budget)
    jax.block_until_ready(search.search(w, None, auto=auto, method=args.method))
    peak = status_bytes("VmHWM")
    res = {
        "layer_bytes": int(w.nbytes),
        "method": args.method,
        "peak_before": before,
        "peak_after": peak,
        "increase_over_layer": (peak - before) / w.nbytes,
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
