"""Timing, the memory-traffic floor, synthetic trees and peak-RSS subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ROWS_PER_BLOCK_BYTES = 256 * 1024  # a floor block fits in L2, so W is read from DRAM once


def timed(
    fns: dict[str, Callable[[], object]],
    reps: int,
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, dict[str, float]]:
    """Runs the callables interleaved ``reps`` times (after one warm-up call each).

    Interleaving makes the floor and the candidates share whatever else the machine is
    doing. ``setups[name]``, if given, runs untimed before each call of ``fns[name]`` and
    its result is passed to it (e.g. a fresh copy to donate). Returns
    ``{name: {"median_ms", "min_ms"}}``.
    """
    setups = setups or {}

    def call(name):
        args = (jax.block_until_ready(setups[name]()),) if name in setups else ()
        t = time.perf_counter()
        out = fns[name](*args)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    for name in fns:
        call(name)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name in fns:
            times[name].append(call(name))
    return {
        k: {"median_ms": float(np.median(v)) * 1e3, "min_ms": float(np.min(v)) * 1e3}
        for k, v in times.items()
    }


def floor_buffers(ws: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two already-touched float32 output buffers per kernel."""
    out = []
    for w in ws:
        a, b = np.empty(w.shape, w.dtype), np.empty(w.shape, w.dtype)
        a.fill(0)
        b.fill(0)
        out.append((a, b))
    return out


def floor_split(ws: list, bufs: list) -> None:
    """The memory-traffic floor: read each kernel once, write two outputs (numpy, blocked).

    Reads the jax arrays through zero-copy numpy views, in row blocks that fit in cache,
    so each byte of ``W`` comes from DRAM once and each output byte is written once, into
    buffers that are already touched (no page faults).
    """
    for w, (o1, o2) in zip(ws, bufs, strict=True):
        x = np.asarray(w).reshape(-1, w.shape[-1])
        a, b = o1.reshape(x.shape), o2.reshape(x.shape)
        step = max(1, ROWS_PER_BLOCK_BYTES // (x.shape[1] * x.itemsize))
        for i in range(0, x.shape[0], step):
            blk = x[i : i + step]
            np.multiply(blk, 0.5, out=b[i : i + step])
            np.subtract(blk, b[i : i + step], out=a[i : i + step])


@jax.jit
def naive_split(w, t):
    """The issue's naive two-line jit balance split (for comparison)."""
    w2 = jnp.where(jnp.abs(w) > t, w / 2, 0)
    return w - w2, w2


def kernel(shape, seed: int, scale: float = 1.48) -> jax.Array:
    """A float32 kernel whose values exceed 1.0 in magnitude about half the time."""
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_normal(shape, np.float32) * scale).astype(np.float32))


def big_tree(n_big: int, side: int, n_small: int = 0) -> dict:
    """``n_big`` Dense kernels ``side × side`` with biases, plus a realistic mix of small
    layers (convs, projections, embeddings) with biases."""
    tree = {}
    for i in range(n_big):
        tree[f"block_{i}"] = {
            "Dense_0": {"kernel": kernel((side, side), i), "bias": jnp.zeros(side)},
        }
    small = [(3, 3, 64, 64), (1, 1, 64, 128), (256, 64), (64,), (3, 3, 3, 32), (512, 10)]
    for j in range(n_small):
        shape = small[j % len(small)]
        node = {"kernel": kernel(shape, 1000 + j)} if len(shape) > 1 else {}
        node["bias"] = jnp.zeros(shape[-1])
        tree[f"small_{j}"] = node
    return tree


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def kernels_of(tree) -> list:
    return [x for path, x in jax.tree_util.tree_leaves_with_path(tree) if "kernel" in str(path)]


def run_child(module: str, args: list[str], env: dict | None = None, timeout: int = 600) -> dict:
    """Runs ``python -m module args`` and returns the JSON it prints on its last line."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
