"""Forward time of the original model, the split model with dense twins and with sparse twins.

Two CPU workloads, every layer split with ``clip`` at a percentile threshold (so each twin
holds the top ``100 - p`` % of its kernel's values by magnitude: density ``1 - p/100``):

* **dense stack**: 4 ``nn.Dense(1024)`` on 256 tokens;
* **conv net**: 3 ``nn.Conv(64, 3×3)`` on 8 images of 32×32 (sparse twins run as im2col
  patches times a sparse matrix, ``jaxsplit.sparse_run.conv_product``).

The three forms are compiled once (``jax.jit``), warmed up, then run interleaved rep by rep
(``benchmarks.common.timed``); ratios are of medians against the original in the same run.
The sparse-twin tree is made outside ``jit`` by ``jaxsplit.sparse_run.sparsify``.

    python -m benchmarks.sparse_forward [--quick] [--reps N]
"""

from __future__ import annotations

import os
import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxsplit as js
from benchmarks.common import timed


class DenseStack(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return x


class ConvNet(nn.Module):
    channels: int
    depth: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        return x


def cases(quick: bool):
    if quick:
        return [
            ("dense stack 2×256, 32 tokens", DenseStack(256, 2), (32, 256)),
            ("conv net 2×16ch 3×3, 2×16×16", ConvNet(16, 2), (2, 16, 16, 16)),
        ]
    return [
        ("dense stack 4×1024, 256 tokens", DenseStack(1024, 4), (256, 1024)),
        ("conv net 3×64ch 3×3, 8×32×32", ConvNet(64, 3), (8, 32, 32, 64)),
    ]


def run(quick: bool = False, reps: int = 15, percentiles=(99.0, 90.0)) -> list[dict]:
    """One row per (case, twin density): median ms of the three forms and their ratios."""
    out = []
    for name, model, shape in cases(quick):
        x = jax.random.normal(jax.random.key(0), shape)
        v = model.init(jax.random.key(1), x)
        original = jax.jit(model.apply)
        split_fn = jax.jit(lambda v, x, m=model: js.linen.apply(m, v, x))
        for pct in percentiles:
            cfg = js.SplitConfig(layers=["**"], threshold=js.Percentile(pct), method="clip")
            v2 = js.split_params(v, cfg)
            vs = js.sparse_run.sparsify(v2, 1.0)
            err = float(jnp.max(jnp.abs(split_fn(vs, x) - split_fn(v2, x))))
            t = timed(
                {
                    "original": lambda f=original, v=v, x=x: f(v, x),
                    "dense twins": lambda f=split_fn, v=v2, x=x: f(v, x),
                    "sparse twins": lambda f=split_fn, v=vs, x=x: f(v, x),
                },
                reps,
            )
            base = t["original"]["median_ms"]
            out.append(
                {
                    "case": name,
                    "twin density": f"{100 - pct:g}%",
                    **{f"{k} ms": round(r["median_ms"], 2) for k, r in t.items()},
                    "dense/orig": round(t["dense twins"]["median_ms"] / base, 2),
                    "sparse/orig": round(t["sparse twins"]["median_ms"] / base, 2),
                    "max abs sparse-dense": f"{err:.1e}",
                }
            )
    return out


def markdown(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else (3 if quick else 15)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = run(quick, reps)
    sys.stdout.write(
        f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"{jax.default_backend()}, load average {load:.1f} at start, {reps} reps\n\n"
        + markdown(rows)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
