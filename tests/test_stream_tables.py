"""Tree budgets (Auto(scope="tree")) stream 16-bit kernels in blocks in both passes: the
curve from block-wise bit-pattern counts and strided samples, the split gathered from the
value table block by block; the same bits and reports as the in-memory split."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_stream_blocks import WEIGHTS, _assert_same_files, _bits

import jaxsplit as js
from jaxsplit import io, stream
from jaxsplit.tree import x64


def _tabled_tree(seed=0, bad=False):
    """16-bit kernels of table.MIN_SIZE values and more (their tree-budget curves come
    from value tables), a node layer with a bias and Gemma-style leaf layers."""
    rng = np.random.default_rng(seed)
    bf = ml_dtypes.bfloat16
    a = (rng.standard_t(3, (512, 512)) * 0.02).astype(bf)
    if bad:
        a[3, 4], a[100, 7] = np.inf, np.nan
    return {
        "a": {"kernel": a, "bias": np.ones(512, bf)},
        "m": {
            "gating": (rng.standard_t(4, (2, 512, 256)) * 0.05).astype(np.float16),
            "linear": (rng.standard_t(5, (16, 32)) * 0.01).astype(bf),  # small: read whole
        },
    }


@pytest.mark.parametrize("method", ["residual", "clip"])  # gathered / elementwise
def test_tree_budget_reads_value_table_kernels_only_in_blocks(tmp_path, monkeypatch, method):
    src = io.save(_tabled_tree(), tmp_path / "src.safetensors")
    auto = js.Auto(js.QuantSpec(bits=4), max_extra=0.05, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=auto, method=method, weights=WEIGHTS)
    whole = stream.split_checkpoint(src, tmp_path / "whole.safetensors", cfg, block_bytes=None)
    read = []
    real = io.CheckpointReader.read_many
    monkeypatch.setattr(
        io.CheckpointReader,
        "read_many",
        lambda self, many, dense=True: read.extend(map(tuple, many)) or real(self, many, dense),
    )
    blocked = stream.split_checkpoint(
        src, tmp_path / "blocked.safetensors", cfg, block_bytes=64 << 10
    )
    _assert_same_files(tmp_path / "whole.safetensors", tmp_path / "blocked.safetensors")
    _, want = js.split_with_report(io.load(src), cfg)
    assert blocked.report == whole.report == want
    assert {p.action for p in want.layers} == {"split"}
    assert {p.auto.method for p in want.layers} == {method}
    kernels = {("a", "kernel"), ("m", "gating")}
    assert kernels.isdisjoint(read)  # both passes: counts, samples and gathers by blocks
    assert ("a", "bias") in read


def test_tree_budget_nonfinite_value_table_kernel_raises_in_pass_one(tmp_path):
    src = io.save(_tabled_tree(bad=True), tmp_path / "src.safetensors")
    out = io.save({"old": np.ones(2)}, tmp_path / "o.safetensors")
    before = out.read_bytes()
    auto = js.Auto(js.QuantSpec(bits=4), max_extra=0.05, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=auto, method="clip", weights=WEIGHTS)
    msgs = []
    for bb in (None, 64 << 10):
        with pytest.raises(js.NonFiniteError, match="layer 'a': kernel holds 2 non-finite") as e:
            stream.split_checkpoint(src, out, cfg, overwrite=True, block_bytes=bb)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and out.read_bytes() == before


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=lambda d: np.dtype(d).name)
def test_table_thresholds_equal_the_kernels_candidates(dtype):
    from jaxsplit import screen, search, table

    rng = np.random.default_rng(7)
    q = js.QuantSpec(bits=4)
    for size, scale, extra in [(2**18, 0.02, None), (2**18 + 7, 50.0, "specials"),
                               (300_000, 1.0, "coarse"), (2**18, 1.0, "zeros")]:  # fmt: skip
        w = rng.standard_t(3, size).astype(np.float32) * scale
        if extra == "specials":
            w[rng.choice(size, 40)] = [np.inf, -np.inf, np.nan, -0.0] * 10
        elif extra == "coarse":
            w = np.round(w * 4) / 4  # few distinct values: the tail holds repeats
        elif extra == "zeros":
            w[:] = 0.0
        w = w.astype(dtype)
        counts = sum(table.pattern_counts(w[i : i + 5000]) for i in range(0, size, 5000))
        tab = table.from_counts(counts, dtype, size)
        ref = table.value_table(w)
        assert all(
            np.array_equal(_bits(x), _bits(y)) for x, y in zip(tab[:3], ref[:3], strict=True)
        )
        for candidates in (4, 16, 64):
            got = search.table_thresholds(
                tab, w[:: screen.sample_stride(size)], spec=q, candidates=candidates
            )
            with x64(w.dtype):
                want = search.finite_thresholds(jnp.asarray(w), spec=q, candidates=candidates)
            assert np.array_equal(_bits(got), _bits(want)), (size, extra, candidates)
    with pytest.raises(ValueError, match="table_thresholds needs a per-tensor kernel of at least"):
        search.table_thresholds(table.value_table(w[:100]), w[:100], spec=q, candidates=4)
