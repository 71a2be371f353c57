"""Warm ``split_params`` against the fresh-output numpy floor, route by route, in one process.

``python -m benchmarks.split_floor [--trees 1x4096,16x2048,64x1024,conv16,small200]
[--reps 7] [--methods balance,clip] [--ppq] [--host-min-bytes N] [--json out.json]``

Per tree (float32, threshold 1.0, about half the values split), interleaved rep by rep,
medians (and the minor page faults of each call, which load does not change):

* ``floor``: numpy reads ``W`` and writes both branches into already-touched buffers;
  ``floor_fresh``: the same into new arrays (numpy's allocation, huge pages): what any
  function that returns new arrays pays. Ratios are taken against ``floor_fresh``.
* ``<method>``: ``split_params`` as shipped (the host path where it applies);
  ``<method> compiled``: the same with ``jaxsplit.host`` switched off (one compiled program
  per layer, XLA's 4 KiB-faulted outputs: the route before this change);
  ``<method> donate``: ``split_params(copy, donate=True)`` (compiled, ``branch_0`` reuses the
  kernel's buffer; the copy is made untimed).
* ``ppq`` (``--ppq``, needs PPQ 0.6.6, see ``../shared/bench/README.md``): PPQ's
  ``HorizontalLayerSplitPass.optimize`` (``balance``) on an ONNX graph of the same weights
  (Gemm layers, or Conv layers for ``conv16``).

``--host-min-bytes N`` moves ``jaxsplit.host.MIN_BYTES`` (the smallest kernel the host path
takes) for the run: ``0`` sends every kernel it supports there, a huge value none.

Run the compiled route under ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (a process-level
setting: glibc then asks for huge pages on its ``mmap`` blocks, XLA's outputs included) to
see what huge pages alone do for XLA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import resource
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxsplit import SplitConfig, host, split_params

TREES = ("1x4096", "16x2048", "64x1024", "conv16", "small200")
ROUTES = ("floor", "floor_fresh", "split", "compiled", "donate", "ppq")


def tree_shape(name: str) -> tuple[int, tuple[int, ...]]:
    """``(layers, kernel shape)`` of a tree name: ``LxN`` (L Dense N×N), ``convL`` (L Conv
    3×3×256×256), ``smallL`` (L Dense 64×64).

    Example:
      >>> tree_shape("16x2048"), tree_shape("conv4"), tree_shape("small200")
      ((16, (2048, 2048)), (4, (3, 3, 256, 256)), (200, (64, 64)))
    """
    if name.startswith("conv"):
        return int(name[4:]), (3, 3, 256, 256)
    if name.startswith("small"):
        return int(name[5:]), (64, 64)
    n, side = name.split("x")
    return int(n), (int(side), int(side))


def weights(name: str) -> list[np.ndarray]:
    """The tree's kernels (numpy, float32), as ``ppq_side_by_side`` draws them."""
    n, shape = tree_shape(name)
    rng = np.random.default_rng(1)
    return [(rng.standard_normal(shape) * 1.5).astype(np.float32) for _ in range(n)]


def jax_tree(ws: list[np.ndarray]) -> dict:
    return {
        f"L{i}": {"kernel": jax.numpy.asarray(w), "bias": jax.numpy.zeros(w.shape[-1])}
        for i, w in enumerate(ws)
    }


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@contextlib.contextmanager
def host_off():
    """``split_params`` without the host path (the compiled route), for this block only."""
    keep = host.supports
    host.supports = lambda *a, **k: False
    try:
        yield
    finally:
        host.supports = keep


def ppq_case(ws: list[np.ndarray], conv: bool):
    """An ONNX graph file of the kernels as Gemm (or Conv) layers, and PPQ's timed pass."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from ppq.api import load_onnx_graph
    from ppq.quantization.optim.morph import HorizontalLayerSplitPass

    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(ws):
        if conv:  # HWIO -> OIHW
            wo = np.ascontiguousarray(w.transpose(3, 2, 0, 1))
            node = helper.make_node("Conv", [prev, f"W{i}", f"B{i}"], [f"y{i}"], name=f"L{i}",
                                    pads=[1, 1, 1, 1])  # fmt: skip
        else:  # (in, out) -> Gemm's (out, in) with transB
            wo = np.ascontiguousarray(w.T)
            node = helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [f"y{i}"], name=f"L{i}",
                                    transB=1)  # fmt: skip
        nodes.append(node)
        inits += [numpy_helper.from_array(wo, f"W{i}"),
                  numpy_helper.from_array(np.zeros(wo.shape[0], np.float32), f"B{i}")]  # fmt: skip
        prev = f"y{i}"
    c = ws[0].shape[-1]
    shape = [1, c, 8, 8] if conv else [1, c]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = os.path.join(tempfile.mkdtemp(), "g.onnx")
    onnx.save(model, path)
    names = [f"L{i}" for i in range(len(ws))]

    def run():
        g = load_onnx_graph(path)  # a fresh graph each time: the pass mutates it
        p = HorizontalLayerSplitPass(
            interested_layers=names, value_threshold=1.0, method="balance", verbose=False
        )
        t = time.perf_counter()
        p.optimize(g, None, None)
        return time.perf_counter() - t

    return run


def candidates(ws, methods, routes, conv: bool) -> dict:
    """``{name: () -> seconds}``: every route of one tree, each timing only its own work."""
    tree = jax_tree(ws)
    jax.block_until_ready(tree)
    outs = [(np.zeros_like(w), np.zeros_like(w)) for w in ws]

    def timed(fn, setup=None):
        def run():
            arg = () if setup is None else (jax.block_until_ready(setup()),)
            t = time.perf_counter()
            jax.block_until_ready(fn(*arg))
            return time.perf_counter() - t

        return run

    def floor():
        for w, (a, b) in zip(ws, outs, strict=True):
            np.copyto(a, w)
            np.multiply(w, 0.5, out=b)

    def floor_fresh():
        r = []
        for w in ws:
            a, b = np.empty_like(w), np.empty_like(w)
            np.copyto(a, w)
            np.multiply(w, 0.5, out=b)
            r.append((a, b))
        return r

    c = {"floor": timed(floor), "floor_fresh": timed(floor_fresh)}
    for m in methods:
        cfg = SplitConfig(layers=["*"], threshold=1.0, method=m)

        def compiled(cfg=cfg):
            with host_off():
                return split_params(tree, cfg)

        c[m] = timed(lambda cfg=cfg: split_params(tree, cfg))
        c[f"{m} compiled"] = timed(compiled)
        c[f"{m} donate"] = timed(
            lambda t, cfg=cfg: split_params(t, cfg, donate=True),
            setup=lambda: jax.tree.map(lambda x: x.copy(), tree),
        )
    if "ppq" in routes:
        c["ppq"] = ppq_case(ws, conv)

    def route(name):
        *_, last = name.split(" ")
        return "split" if last in methods else last

    return {k: v for k, v in c.items() if route(k) in routes}


@contextlib.contextmanager
def host_min_bytes(n: int | None):
    """``jaxsplit.host.MIN_BYTES`` set to ``n`` (``None``: unchanged) for this block only."""
    keep = host.MIN_BYTES
    host.MIN_BYTES = keep if n is None else n
    try:
        yield
    finally:
        host.MIN_BYTES = keep


def measure(name: str, methods, reps: int, routes=ROUTES) -> dict:
    """One tree: every route's median and fastest time, page faults, ratios."""
    fns = candidates(weights(name), methods, routes, conv=name.startswith("conv"))
    times = {k: [] for k in fns}
    faults = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm: compiled programs, PPQ's imports
    for _ in range(reps):
        for k, fn in fns.items():
            f0 = _minflt()
            times[k].append(fn())
            faults[k].append(_minflt() - f0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "tree": name,
        "ms": med,
        "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
        "faults": {k: int(statistics.median(v)) for k, v in faults.items()},
        "vs_fresh": {k: v / med["floor_fresh"] for k, v in med.items()},
        "ppq_over": {k: med["ppq"] / v for k, v in med.items()} if "ppq" in med else {},
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", default=",".join(TREES))
    ap.add_argument("--methods", default="balance,clip")
    ap.add_argument("--routes", default=",".join(r for r in ROUTES if r != "ppq"))
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", 7)))
    ap.add_argument("--ppq", action="store_true", help="add the ppq route")
    ap.add_argument(
        "--host-min-bytes", type=int, default=None, metavar="N",
        help="jaxsplit.host.MIN_BYTES for this run (default: the library's)",
    )  # fmt: skip
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.host_min_bytes is not None and args.host_min_bytes < 0:
        ap.error(f"--host-min-bytes must be >= 0, got {args.host_min_bytes}")
    methods = args.methods.split(",")
    routes = {"floor_fresh", *args.routes.split(","), *(["ppq"] if args.ppq else [])}
    rows = []
    with host_min_bytes(args.host_min_bytes):
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        print(
            f"load {os.getloadavg()[0]:.2f}; GLIBC_TUNABLES={tunables}; "
            f"malloc huge pages {host.malloc_huge_pages()}; host.MIN_BYTES {host.MIN_BYTES}"
        )
        for name in args.trees.split(","):
            rows.append(_report(measure(name, methods, args.reps, routes)))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def _report(r: dict) -> dict:
    cells = ", ".join(
        f"{k} {v:.1f} ms ({r['vs_fresh'][k]:.2f}x, {r['faults'][k]} flt)"
        for k, v in r["ms"].items()
    )
    print(f"{r['tree']}: {cells} | load {os.getloadavg()[0]:.2f}", flush=True)
    return r


if __name__ == "__main__":
    main()
