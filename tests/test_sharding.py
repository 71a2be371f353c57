"""Sharded trees on 8 virtual CPU devices: shardings kept, no data moved between devices.

The device count is fixed when jax starts, so the checks run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and report back as JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r"""
    import json
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxsplit import Relative, SplitConfig, kernels, merge_params, split_params
    from jaxsplit import programs as dispatch
    from jaxsplit.thresholds import as_threshold

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    specs = {"rows": P(("x", "y"), None), "cols": P(None, ("x", "y")),
             "both": P("x", "y"), "conv": P(None, None, "x", "y"), "repl": P()}
    rng = np.random.default_rng(0)

    def host(shape):
        return (rng.standard_normal(shape) * 1.5).astype(np.float32)

    shapes = {"rows": (64, 24), "cols": (16, 64), "both": (32, 64), "conv": (3, 3, 8, 16),
              "repl": (8, 8)}
    ref = {k: host(s) for k, s in shapes.items()}

    def tree():
        return {k: {"kernel": jax.device_put(ref[k], NamedSharding(mesh, specs[k])),
                    "bias": jnp.zeros(shapes[k][-1])} for k in shapes}

    COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|all-reduce|collective-permute|"
                            r"reduce-scatter)(-start)?\(")

    def collectives(fn, *args, **kw):
        return sorted(set(m.group(1) for m in COLLECTIVE.finditer(
            fn.lower(*args, **kw).compile().as_text())))

    out = {"same_sharding": {}, "values_exact": {}, "merged_exact": {}, "hlo": {}}
    for donate in (False, True):
        p = tree()
        shardings = {k: p[k]["kernel"].sharding for k in p}
        p2 = split_params(p, SplitConfig(layers=["*"], threshold=1.0), donate=donate)
        for k in shapes:
            b0, b1 = p2[k]["branch_0"]["kernel"], p2[k]["branch_1"]["kernel"]
            r0, r1 = kernels.balance(jnp.asarray(ref[k]), 1.0)
            tag = f"{k}/donate={donate}"
            out["same_sharding"][tag] = (b0.sharding == shardings[k] and
                                         b1.sharding == shardings[k])
            out["values_exact"][tag] = bool(np.array_equal(b0, r0) and np.array_equal(b1, r1))
            m = merge_params(p2)[k]["kernel"]
            out["merged_exact"][tag] = bool(np.array_equal(m, ref[k])) and (
                m.sharding == shardings[k])

    for k in ("rows", "cols", "both", "conv"):
        w = jax.device_put(ref[k], NamedSharding(mesh, specs[k]))
        thr = jnp.float32(1.0)
        out["hlo"][f"apply/{k}"] = collectives(dispatch.apply, w, thr, None, method="balance")
        for spec in (1.0, Relative(0.5)):
            kind, value = as_threshold(spec).kind, as_threshold(spec).value
            out["hlo"][f"fused/{kind}/{k}"] = collectives(
                dispatch.fused, w, value, None, kind=kind, method="balance")
    # compensate on kernels large enough for kernels.in_blocks: shardings kept, same bits
    from jaxsplit.quant import QuantSpec
    out["compensate"] = {}
    for k, shape in (("rows", (256, 64)), ("cols", (64, 256))):
        big = (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)
        sh = NamedSharding(mesh, specs[k])
        got = dispatch.apply(jax.device_put(big, sh), jnp.float32(0.05), None,
                             method="compensate", spec=QuantSpec(bits=4))
        want = kernels.compensate(jnp.asarray(big), 0.05, QuantSpec(bits=4))
        out["compensate"][k] = {
            "same_sharding": all(g.sharding == sh for g in got),
            "exact": all(bool(np.array_equal(g, r)) for g, r in zip(got, want)),
            "ops": collectives(dispatch.apply, jax.device_put(big, sh), jnp.float32(0.05), None,
                               method="compensate", spec=QuantSpec(bits=4)),
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def child() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_every_output_keeps_its_input_sharding(child):
    assert child["same_sharding"] and all(child["same_sharding"].values()), child["same_sharding"]


def test_sharded_split_values_are_exact(child):
    assert all(child["values_exact"].values()), child["values_exact"]
    assert all(child["merged_exact"].values()), child["merged_exact"]


def test_absolute_threshold_split_moves_no_data(child):
    for name, ops in child["hlo"].items():
        if name.startswith("apply/"):
            assert ops == [], (name, ops)


def test_counts_and_relative_thresholds_only_reduce(child):
    # the fused program's counts (and a Relative max) need one cross-device reduction;
    # nothing is gathered or exchanged
    for name, ops in child["hlo"].items():
        assert set(ops) <= {"all-reduce"}, (name, ops)
    assert any(child["hlo"][f"fused/relative/{k}"] for k in ("rows", "cols", "both", "conv"))


def test_compensate_keeps_shardings_and_only_reduces(child):
    # large enough for the CPU block loop, which would flatten across shards: not taken
    for k, r in child["compensate"].items():
        assert r["same_sharding"] and r["exact"], (k, r)
        assert set(r["ops"]) <= {"all-reduce"}, (k, r["ops"])
