"""Test-session settings shared by ``tests/`` and the doctests under ``jaxsplit/``.

Most of the suite's time is XLA compiling small programs (every new shape, dtype or static
config compiles anew, eager ops included). LLVM's optimisation passes dominate those
compiles and buy nothing on arrays this small, so the suite compiles with them off:
``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` (jax's ``jax_disable_most_optimizations``: LLVM
optimisation level 0 and no expensive passes, set per compile), about 5x faster compiles
on CPU. XLA CPU's newer fusion emitters (MLIR) cost about as much again on the search
programs (``jaxsplit.programs.auto_fused``: 2x less compile CPU with the classic elemental
emitter, ``--xla_cpu_use_fusion_emitters=false``), and one codegen thread per compile
(``--xla_cpu_parallel_codegen_split_count=1``) suits two workers on two cores. XLA's HLO
passes (fusion, algebraic simplification) still run, and the exactness tests hold under
both settings. Subprocess tests inherit the environment.

A test whose time is running large programs, not compiling them, is marked
``@pytest.mark.optimized``: it runs with the optimisations on (``jax.config``, restored
after it), e.g. the README's method table, 41 -> 26 s. ``JAXSPLIT_TEST_XLA_DEFAULT=1``
runs the whole suite with XLA's and jax's defaults instead.
"""

import os

import pytest

FAST_COMPILE_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
#: Environment variables the fast-compile session sets (unless the user set them).
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def _fast_compile_flags(env: dict) -> None:
    """Append the fast-compile flags to ``env["XLA_FLAGS"]`` and set ``FAST_COMPILE_ENV``
    unless the user set them or asked for XLA's defaults. Must run before jax is imported."""
    if env.get("JAXSPLIT_TEST_XLA_DEFAULT", "") not in ("", "0"):
        return
    flags = env.get("XLA_FLAGS", "").split()
    names = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in FAST_COMPILE_FLAGS if f.split("=", 1)[0] not in names]
    env["XLA_FLAGS"] = " ".join(flags)
    for name, value in FAST_COMPILE_ENV.items():
        env.setdefault(name, value)


_fast_compile_flags(os.environ)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "optimized: compile this test's programs with XLA's optimisations on"
    )


@pytest.fixture(autouse=True)
def _optimized(request):
    """Compile with jax's and XLA's optimisations for a test marked ``optimized``."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
