"""The suite compiles with LLVM's optimisation passes off (root ``conftest.py``); users get
XLA's defaults. This re-checks the core exactness properties in a subprocess with XLA's
default flags: the quantizer bit-identical to the independent reference (per tensor, per
channel, per group, bits 2-16, heavy-tailed weights) and every method's split merging back
bit for bit (float32 and bfloat16, with zeros, ties and huge values), and ``compensate``
choosing the same split eagerly, jitted and op by op (its products rounded on their own)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import conftest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np, ml_dtypes
    import jax, jax.numpy as jnp
    import jaxsplit as js
    from jaxsplit import kernels, quant
    sys.path.insert(0, sys.argv[1])
    from quant_reference import ref_quantize_exact

    def bits(a):  # the raw bits, to compare floats exactly
        a = np.asarray(a)
        return a.view(f"u{a.dtype.itemsize}")

    flags = os.environ.get("XLA_FLAGS", "")
    for name in sys.argv[2:]:
        assert name not in flags and name not in os.environ, (name, flags)
    assert not jax.config.read("jax_disable_most_optimizations")
    rng = np.random.default_rng(5)
    w = (rng.standard_t(2, size=(96, 40)) * 0.02).astype(np.float32)
    specs = [quant.QuantSpec(bits=b) for b in (2, 3, 4, 6, 8, 12, 16)]
    specs += [quant.QuantSpec(bits=4, granularity="per_channel"),
              quant.QuantSpec(bits=4, granularity="per_group", group_size=32),
              quant.QuantSpec(bits=8, symmetric=False)]
    for spec in specs:
        for x in (w, w * np.float32(3.7e-3)):
            got, ref = np.asarray(quant.fake_quant(x, spec)), ref_quantize_exact(x, spec)
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), spec
    special = w.copy()
    special.flat[:6] = [0.0, -0.0, 1e30, -1e30, 0.5, -0.5]
    for dtype in (np.float32, ml_dtypes.bfloat16):
        x = special.astype(dtype)
        t = float(np.quantile(np.abs(x.astype(np.float32)), 0.9))
        for method in kernels.METHODS:
            spec = quant.QuantSpec(bits=4) if method in kernels.QUANT_METHODS else None
            kw = {"method": method, "threshold": t}
            if spec is not None:
                kw["spec"] = spec
            p2 = js.split_params({"d": {"kernel": x}}, js.SplitConfig(layers=["d"], **kw))
            back = js.merge_params(p2)["d"]["kernel"]
            assert np.array_equal(bits(back), bits(x)), (method, dtype)
    # compensate picks the same codes however XLA compiles it (kernels._rounded): op by op
    # (blocked), one jitted program, and its elementwise function op by op on the whole kernel
    for dtype in (np.float32, ml_dtypes.bfloat16):
        x = jnp.asarray((np.random.default_rng(1).standard_t(3, (257, 63)) * 0.02).astype(dtype))
        t = float(np.quantile(np.abs(np.asarray(x, np.float32)), 0.95))
        for spec in (quant.QuantSpec(bits=4), quant.QuantSpec(bits=8)):
            with jax.disable_jit():  # op by op (compensate is jitted)
                eager = kernels.compensate(x, t, spec)
            jitted = jax.jit(lambda v: kernels.compensate(v, t, spec))(x)
            whole = kernels.elementwise("compensate", x, t, spec=spec)(x)
            for other in (jitted, whole):
                for a, b in zip(eager, other, strict=True):
                    assert np.array_equal(bits(a), bits(b)), (dtype, spec)
    print("ok", len(specs), len(kernels.METHODS))
    """
)


def test_exactness_under_xla_default_flags():
    env = dict(os.environ, JAXSPLIT_TEST_XLA_DEFAULT="1")
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if f.split("=", 1)[0] not in {g.split("=", 1)[0] for g in conftest.FAST_COMPILE_FLAGS}
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    for name in conftest.FAST_COMPILE_ENV:
        env.pop(name, None)
    tests = Path(__file__).resolve().parent
    names = [f.split("=", 1)[0] for f in conftest.FAST_COMPILE_FLAGS] + list(
        conftest.FAST_COMPILE_ENV
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tests), *names],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def _optimizations_off() -> bool:
    import jax

    return jax.config.read("jax_disable_most_optimizations")


def test_session_compiles_fast_unless_asked_for_defaults():
    assert _optimizations_off() == (os.environ.get("JAXSPLIT_TEST_XLA_DEFAULT", "") in ("", "0"))


@pytest.mark.optimized
def test_an_optimized_test_compiles_with_the_optimizations():
    assert not _optimizations_off()
