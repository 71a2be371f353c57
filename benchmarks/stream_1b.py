"""Streamed split of a Llama-3.2-1B-shaped bf16 safetensors checkpoint: wall, peak RSS, sizes.

16 blocks x (q 2048x2048, k 2048x512, v 2048x512, o 2048x2048, gate/up 2048x8192, down
8192x2048) = 973M weights, 1.95 GB in bfloat16 (Student-t weights, like trained ones). The split
runs as the command a user types (`jaxsplit split ... --layers '**' ...`) in a subprocess under
`/usr/bin/time -v`; then `merge_params(load(out)) == load(ckpt)` is checked tensor by tensor.
The runtime (the same command on a checkpoint of one 64 x 64 layer) is measured first, and
the peak over it is set against the bound of 2 x the largest tensor (64 MiB).

    python -m benchmarks.stream_1b [--blocks 16] [--dir D] [--reuse] [SPLIT ARGS ...]
    python -m benchmarks.stream_1b --scaling 2 4 8 16 --plot stream_scaling.png [SPLIT ARGS]
    python -m benchmarks.stream_1b --replot a.json b.json --plot stream_scaling.png

SPLIT ARGS default to `--threshold rel:0.5 --method clip`; e.g. `-- --threshold auto --bits 4
--budget 0.05`. `--scaling` runs each block count in turn (fresh checkpoints, deleted after
each run unless `--reuse`) and draws wall time and peak RSS against weights, log-log.
"""

from __future__ import annotations

import argparse
import json
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
LARGEST = max(int(np.prod(s)) for s in SHAPES.values()) * 2  # bytes (bf16)


def write_checkpoint(path: str, blocks: int) -> int:
    """Writes the checkpoint (safetensors, bf16); returns its bytes."""
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


def merged_equal(src: str, dst: str) -> bool:
    """``merge_params(load(dst)) == load(src)``, bit for bit, one layer at a time."""
    import jaxsplit as js
    from jaxsplit import io, stream

    with io.open_checkpoint(src) as r:
        orig = {"/".join(k[1:-1]): k for k in r.tensors}
        for path, node in stream.iter_layers(dst):
            w = js.merge_params({"x": node})["x"]["kernel"]
            ref = r.read(orig.pop(path))
            if not np.array_equal(w.view(np.uint16), ref.view(np.uint16)):
                return False
    return not orig


def _timed_split(src: str, dst: str, split_args: list[str]) -> tuple[float, float, int]:
    """``jaxsplit split`` in a subprocess under ``/usr/bin/time -v``: wall, CPU, peak RSS."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "jaxsplit", "split", src, dst,
           "--layers", "**", "--overwrite", *split_args]  # fmt: skip
    print("command:", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    err = proc.stderr
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", err).group(1))
              for k in ("User", "System"))  # fmt: skip
    return wall, cpu, rss


def runtime_rss(split_args: list[str], d: str) -> int:
    """Peak RSS of the same command on a checkpoint of one 64 x 64 bf16 layer: the runtime
    (Python, jax, jaxsplit, the compiled programs) that the memory bound excludes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    src, dst = os.path.join(d, "tiny.safetensors"), os.path.join(d, "tiny_out.safetensors")
    w = np.random.default_rng(0).standard_t(4, (64, 64)).astype(np.float32) * 0.02
    save_file({"params/layers_0/tiny/kernel": w.astype(ml_dtypes.bfloat16)}, src)
    rss = _timed_split(src, dst, split_args)[2]
    os.remove(dst)
    return rss


def run(
    blocks: int, split_args: list[str], d: str, reuse: bool = False, runtime: int | None = None
) -> dict:
    """One streamed split in a subprocess: wall, peak RSS (``/usr/bin/time -v``), sizes;
    with ``runtime`` (``runtime_rss``), the peak over it against 2x the largest tensor."""
    src = os.path.join(d, f"ckpt_{blocks}.safetensors")
    dst = os.path.join(d, f"out_{blocks}.safetensors")
    t0 = time.perf_counter()
    if not (reuse and os.path.exists(src)):
        write_checkpoint(src, blocks)
    size = os.path.getsize(src)
    print(f"checkpoint: {blocks} blocks, {size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)")
    load0 = os.getloadavg()[0]
    wall, cpu, rss = _timed_split(src, dst, split_args)
    out = os.path.getsize(dst)
    same = merged_equal(src, dst)
    res = {
        "blocks": blocks,
        "weights": blocks * sum(int(np.prod(s)) for s in SHAPES.values()),
        "in_bytes": size,
        "out_bytes": out,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_bytes": rss,
        "largest_tensor_bytes": LARGEST,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
        "merge_bit_exact": same,
    }
    if runtime is not None:
        res["runtime_rss_bytes"] = runtime
        res["bound_met"] = rss - runtime <= 2 * LARGEST
    print(f"wall {wall:.1f} s (cpu {cpu:.0f} s), peak RSS {rss / 2**30:.2f} GiB, output "
          f"{out / 1e9:.2f} GB ({out / size:.3f}x), largest tensor {LARGEST / 2**20:.0f} MiB, "
          f"load {load0:.1f} -> {res['load_after']:.1f}")  # fmt: skip
    if runtime is not None:
        print(f"runtime {runtime / 2**30:.2f} GiB: peak - runtime = {(rss - runtime) / 2**20:.0f} "
              f"MiB, bound 2 x largest = {2 * LARGEST / 2**20:.0f} MiB: "
              f"{'met' if res['bound_met'] else 'NOT met'}")  # fmt: skip
    print(f"merge_params(load(out)) == load(ckpt) bit for bit: {same}", flush=True)
    os.remove(dst)
    if not reuse:
        os.remove(src)
    return res


def plot(runs: dict[str, list[dict]], path: str) -> None:
    """Wall time and peak RSS against weights, log-log, one line per run (label: split args)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, results in runs.items():
        x = [r["weights"] for r in results]
        (line,) = ax.loglog(x, [r["wall_s"] for r in results], "o-", label=f"{label}: wall")
        ax.loglog(x, [r["cpu_s"] for r in results], "x--", color=line.get_color(),
                  label=f"{label}: CPU")  # fmt: skip
        ax2.loglog(x, [r["peak_rss_bytes"] / 2**30 for r in results], "s-", label=label)
    ax.set(xlabel="weights", ylabel="seconds", title="wall and CPU time (2 cores, shared)")
    ax2.set(xlabel="weights", ylabel="peak RSS (GiB)", title="peak RSS (/usr/bin/time -v)")
    ax2.set_ylim(0.1, 4)
    ax2.axhline(1.5, color="grey", ls=":", lw=1)
    ax.axhline(120, color="grey", ls=":", lw=1)
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--scaling", type=int, nargs="+", metavar="BLOCKS", help="block counts")
    ap.add_argument("--plot", metavar="PNG", help="with --scaling: the log-log figure")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="keep/reuse the scratch checkpoints")
    ap.add_argument(
        "--replot", nargs="+", metavar="JSON", help="only draw --plot from --json files"
    )
    ap.add_argument("split_args", nargs="*", default=["--threshold", "rel:0.5", "--method", "clip"])
    args = ap.parse_args(argv)
    if args.replot:
        runs = {}
        for f in args.replot:
            with open(f) as fh:
                d = json.load(fh)
            runs[" ".join(d["split_args"])] = sorted(d["results"], key=lambda r: r["weights"])
        plot(runs, args.plot)
        return 0
    d = args.dir or tempfile.mkdtemp(prefix="jaxsplit_1b_")
    base = runtime_rss(args.split_args, d)
    print(f"runtime (one 64 x 64 layer, same command): peak RSS {base / 2**30:.2f} GiB")
    results = [
        run(b, args.split_args, d, args.reuse, base) for b in (args.scaling or [args.blocks])
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"split_args": args.split_args, "results": results}, f, indent=1)
    if args.plot:
        plot({" ".join(args.split_args): results}, args.plot)
    return 0 if all(r["merge_bit_exact"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
