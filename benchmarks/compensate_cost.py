"""What one ``compensate`` candidate costs against ``snap`` (issue 12), side by side.

One split-and-measure (``kernels.split`` then ``measure.measure`` with a matrix calibration)
of a 384×1536 kernel, compiled once, median of ``reps`` warm calls, both methods in one
process. Student-t weights and a correlated ``E[x xᵀ]`` stand in for MiniLM's
``layer_0/intermediate`` (same shape).

    PYTHONPATH=. python -m benchmarks.compensate_cost
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit as js
from jaxsplit import kernels, measure


def main(reps: int = 5) -> dict[str, float]:
    rng = np.random.default_rng(0)
    w = jnp.asarray((rng.standard_t(3, size=(384, 1536)) * 0.02).astype(np.float32))
    x = rng.normal(size=(2048, 384)) @ rng.normal(size=(384, 384)) * 0.05 + rng.normal(size=384)
    c = jnp.asarray((x.T @ x / len(x)).astype(np.float32))
    spec = js.QuantSpec(bits=4)
    t = float(np.quantile(np.abs(np.asarray(w)), 0.95))
    out = {}
    for name in ("snap", "compensate"):

        def run(w, t, c, name=name):
            ws = kernels.split(name, w, t, spec=spec, calibration=c)
            return measure.measure(w, ws, spec, calibration=c).output_error

        f = jax.jit(run)
        f(w, t, c).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(w, t, c).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
        print(f"{name}: {1e3 * out[name]:.0f} ms, output error {float(f(w, t, c)):.4g}")
    print(f"ratio compensate / snap: {out['compensate'] / out['snap']:.1f}")
    return out


if __name__ == "__main__":
    main()
