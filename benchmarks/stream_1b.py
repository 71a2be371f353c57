"""Streamed split of a Llama-3.2-1B-shaped bf16 safetensors checkpoint: wall, peak RSS, sizes.

16 blocks x (q 2048x2048, k 2048x512, v 2048x512, o 2048x2048, gate/up 2048x8192, down
8192x2048) = 973M weights, 1.95 GB in bfloat16 (Student-t weights, like trained ones). The split
runs as the command a user types (`jaxsplit split ... --layers '**' ...`) in a subprocess under
`/usr/bin/time -v`; then `merge_params(load(out)) == load(ckpt)` is checked tensor by tensor.

    python -m benchmarks.stream_1b [--blocks 16] [--threshold auto --bits 4 --budget 0.05]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = {
    "q_proj": (2048, 2048),
    "k_proj": (2048, 512),
    "v_proj": (2048, 512),
    "o_proj": (2048, 2048),
    "gate_proj": (2048, 8192),
    "up_proj": (2048, 8192),
    "down_proj": (8192, 2048),
}


def write_checkpoint(path: str, blocks: int) -> int:
    """Writes the checkpoint one tensor at a time (safetensors, bf16); returns its bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for b in range(blocks):
        for name, shape in SHAPES.items():
            w = (rng.standard_t(4, shape).astype(np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            tensors[f"params/layers_{b}/{name}/kernel"] = w
    save_file(tensors, path)
    return os.path.getsize(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("split_args", nargs="*", default=["--threshold", "rel:0.5", "--method", "clip"])
    args = ap.parse_args(argv)
    d = args.dir or tempfile.mkdtemp(prefix="jaxsplit_1b_")
    src, dst = os.path.join(d, "ckpt.safetensors"), os.path.join(d, "out.safetensors")
    t0 = time.perf_counter()
    size = write_checkpoint(src, args.blocks)
    print(f"checkpoint: {size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s to write)")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "jaxsplit", "split", src, dst,
           "--layers", "**", "--overwrite", *args.split_args]  # fmt: skip
    print("command:", " ".join(cmd[2:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        return proc.returncode
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    out = os.path.getsize(dst)
    largest = max(np.prod(s) for s in SHAPES.values()) * 2
    print(f"wall {wall:.1f} s, peak RSS {rss / 2**20:.2f} GiB, output {out / 1e9:.2f} GB "
          f"({out / size:.3f}x), largest tensor {largest / 2**20:.0f} MiB")  # fmt: skip
    import jaxsplit as js
    from jaxsplit import io

    merged = js.merge_params(io.load(dst))
    orig = io.load(src)
    same = all(
        np.array_equal(
            js.tree.find_layers(merged)[p].array.view(np.uint16),
            lay.array.view(np.uint16),
        )
        for p, lay in js.tree.find_layers(orig).items()
    )
    print(f"merge_params(load(out)) == load(ckpt) bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
