"""Test-session settings shared by ``tests/`` and the doctests under ``jaxsplit/``.

Most of the suite's time is XLA compiling small programs (every new shape, dtype or static
config compiles anew, eager ops included). LLVM's optimisation passes dominate those
compiles and buy nothing on arrays this small, so the suite compiles with them off
(``--xla_backend_optimization_level=0``, ``--xla_llvm_disable_expensive_passes``): about
5x faster compiles on CPU. XLA CPU's newer fusion emitters (MLIR) cost about as much again
on the search programs (``jaxsplit.programs.auto_fused``: 2x less compile CPU with the
classic elemental emitter, ``--xla_cpu_use_fusion_emitters=false``), and one codegen
thread per compile (``--xla_cpu_parallel_codegen_split_count=1``) suits two workers on two
cores. XLA's HLO passes (fusion, algebraic simplification) still run, and the exactness
tests hold under both settings. ``JAXSPLIT_TEST_XLA_DEFAULT=1`` runs the
suite with XLA's default flags instead (subprocess tests inherit either choice).
"""

import os

FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def _fast_compile_flags(env: dict) -> None:
    """Append the fast-compile flags to ``env["XLA_FLAGS"]`` unless the user set them or
    asked for XLA's defaults. Must run before jax creates its CPU backend."""
    if env.get("JAXSPLIT_TEST_XLA_DEFAULT", "") not in ("", "0"):
        return
    flags = env.get("XLA_FLAGS", "").split()
    names = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in FAST_COMPILE_FLAGS if f.split("=", 1)[0] not in names]
    env["XLA_FLAGS"] = " ".join(flags)


_fast_compile_flags(os.environ)
