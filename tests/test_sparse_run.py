"""Sparse twins at run time (jaxsplit.sparse_run): the same outputs as dense twins, and the cost."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import sparse

import jaxsplit as js
from jaxsplit import sparse_run
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.measure import index_bytes, twin_cost

CLIP = js.SplitConfig(layers=["**"], threshold=js.Relative(0.4), method="clip")


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, padding="VALID", kernel_dilation=1)(x))
        x = nn.relu(nn.Conv(8, (2, 2), padding=1, input_dilation=1)(x))
        x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2)(x))  # grouped: runs dense
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.DenseGeneral(10)(x)  # no sparse form: runs dense


MODELS = {
    "dense": (
        nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(64), nn.relu, nn.Dense(8)]),
        (5, 3, 16),
    ),
    "conv": (ConvNet(), (3, 9, 9, 3)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def split_model(request):
    model, shape = MODELS[request.param]
    x = jax.random.normal(jax.random.key(0), shape)
    v = model.init(jax.random.key(1), x)
    return model, js.split_params(v, CLIP), x


def test_sparse_twins_equal_dense_twins(split_model):
    model, v2, x = split_model
    dense = js.linen.apply(model, v2, x)
    sparse = js.linen.apply(model, v2, x, sparse_below=0.5)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)


def test_sparse_twins_under_jit(split_model):
    model, v2, x = split_model
    vs = sparse_run.sparsify(v2, 0.5)
    twins = [
        lay.node["branch_1"][lay.weight] for lay in js.find_layers(v2).values() if lay.branches
    ]
    assert all(sparse_run.density(w) < 0.5 for w in twins)
    n_sparse = sum(
        sparse_run.is_sparse(lay.node["branch_1"][lay.weight])
        for lay in js.find_layers(vs).values()
        if lay.branches
    )
    assert n_sparse == len(twins)
    f = jax.jit(lambda v, x: js.linen.apply(model, v, x))
    np.testing.assert_allclose(f(vs, x), js.linen.apply(model, v2, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_to_sparse_is_bcoo_fromdense(dtype):
    """The host-side conversion is ``BCOO.fromdense`` exactly: data, indices, flags."""
    w = np.zeros((3, 2, 4, 5), np.float32)
    w[0, 1, 2, 3], w[2, 0, 0, 0], w[1, 1, 3, 4], w[0, 0, 0, 1] = 1.5, -2.0, np.nan, -0.0
    w = jnp.asarray(w, dtype)
    for a in (w, w[0, 0], w.reshape(-1), jnp.zeros((2, 3), dtype)):
        got, want = sparse_run.to_sparse(a), sparse.BCOO.fromdense(a, nse=int(jnp.count_nonzero(a)))
        assert got.shape == want.shape and got.nse == want.nse
        assert got.data.dtype == want.data.dtype and got.indices.dtype == want.indices.dtype
        np.testing.assert_array_equal(got.indices, want.indices)
        assert np.asarray(got.data).tobytes() == np.asarray(want.data).tobytes()
        assert (got.indices_sorted, got.unique_indices) == (True, True)


def test_sparsify_leaves_dense_branches_and_inputs_alone():
    p = {
        "d": {"kernel": np.array([[0.5, 4.0], [0.1, 0.2]], np.float32)},
        "e": {"kernel": np.ones((2, 2))},
    }
    p2 = js.split_params(p, js.SplitConfig(layers=["d"], threshold=1.0, method="clip"))
    s = sparse_run.sparsify(p2, 0.5)
    assert s["e"] is p2["e"] and s["d"]["branch_0"] is p2["d"]["branch_0"]
    assert not sparse_run.is_sparse(p2["d"]["branch_1"]["kernel"])
    assert s["d"]["branch_1"]["kernel"].todense().tolist() == p2["d"]["branch_1"]["kernel"].tolist()
    assert sparse_run.sparsify(p2, 0.25) is p2  # density 0.25 is not below 0.25


def test_traced_twin_under_apply_sparse_below_says_sparsify_first(split_model):
    model, v2, x = split_model
    with pytest.raises(ConfigError, match="sparsify"):
        jax.jit(lambda v, x: js.linen.apply(model, v, x, sparse_below=0.5))(v2, x)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_sparse_below(bad, split_model):
    model, v2, x = split_model
    with pytest.raises(
        ConfigError, match=r"apply.sparse_below must be None or a density in \[0, 1\]"
    ):
        js.linen.apply(model, v2, x, sparse_below=bad)


def test_sparse_below_type_and_weight_fn(split_model):
    model, v2, x = split_model
    with pytest.raises(ConfigTypeError, match="sparse_below"):
        js.linen.apply(model, v2, x, sparse_below="0.5")
    with pytest.raises(ConfigError, match="weight_fn"):
        js.linen.apply(model, v2, x, sparse_below=0.5, weight_fn=jnp.round)


def test_nnx_sparse_twins_equal_dense_twins_and_jit():
    class Net(nnx.Module):
        def __init__(self, r):
            self.c = nnx.Conv(3, 8, (3, 3), strides=2, rngs=r)
            self.d = nnx.Linear(4 * 4 * 8, 10, rngs=r)

        def __call__(self, x):
            x = nnx.relu(self.c(x))
            return self.d(x.reshape(x.shape[0], -1))

    m = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    m2 = js.nnx.split_model(m, CLIP)
    ms = js.nnx.sparsify_model(m2, 1.0)
    assert type(ms.c.branch_1).__name__ == type(ms.d.branch_1).__name__ == "SparseBranch"
    assert type(m2.c.branch_1) is nnx.Conv  # the input model is unchanged
    dense = m2(x)
    np.testing.assert_allclose(js.nnx.apply(m2, x, sparse_below=1.0), dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(ms, x), dense, rtol=1e-5, atol=1e-6)


def test_conv_product_matches_lax_conv():
    k = jax.random.normal(jax.random.key(2), (3, 2, 4, 5)) * (
        jax.random.uniform(jax.random.key(3), (3, 2, 4, 5)) < 0.1
    )
    x = jax.random.normal(jax.random.key(4), (2, 7, 6, 4))
    for kw in (
        dict(strides=(2, 1), padding="SAME"),
        dict(padding=[(1, 0), (0, 2)], kernel_dilation=(2, 1)),
    ):
        got = sparse_run.conv_product(x, sparse_run.to_sparse(k), **kw)
        want = jax.lax.conv_general_dilated(
            x,
            k,
            kw.get("strides", (1, 1)),
            kw["padding"],
            rhs_dilation=kw.get("kernel_dilation"),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- the cost, dense vs sparse twins ---------------------------------------------------


def test_twin_cost_definition():
    assert index_bytes(10) == 4 and index_bytes(2**31) == 8
    c = twin_cost(100, 2, [3, 5])
    assert c == (200, 8, 400, 8 * (2 + 4))
    assert twin_cost(100, 4, []) == (0, 0, 0, 0)


def test_quant_error_reports_macs_and_bytes_for_both_forms():
    rng = np.random.default_rng(0)
    p = {
        "a": {"kernel": rng.standard_t(3, (64, 32)).astype(np.float32)},
        "b": {"kernel": rng.normal(size=(8,)).astype(np.float32)},
    }
    p2 = js.split_params(p, js.SplitConfig(layers=["a"], threshold=js.Relative(0.3), method="clip"))
    r = js.quant_error(p, p2, js.QuantSpec(bits=4))
    a, b = r.layers
    nnz = int(np.count_nonzero(p2["a"]["branch_1"]["kernel"]))
    assert a.twin_nonzero == (nnz,) and b.twin_nonzero == ()
    assert (a.extra_macs_dense, a.extra_macs_sparse) == (64 * 32, nnz)
    assert (a.extra_bytes_dense, a.extra_bytes_sparse) == (64 * 32 * 4, nnz * 8)
    t = r.total()
    assert t["macs"] == 64 * 32 + 8 and t["weight_bytes"] == 4 * (64 * 32 + 8)
    assert t["extra_macs_sparse"] == nnz and t["extra_bytes_dense"] == 64 * 32 * 4
    d = a.to_dict()
    assert d["extra_bytes_sparse"] == nnz * 8
    assert "cost: +" in js.render.markdown(r)


def test_evaluate_outputs_reports_macs_over_the_inputs():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (6, 3, 8))  # 18 applications per layer
    v = model.init(jax.random.key(1), x)
    v2 = js.split_params(
        v, js.SplitConfig(layers=["layers_0"], threshold=js.Relative(0.5), method="clip")
    )
    r = js.evaluate_outputs(model, v, v2, x, js.QuantSpec(bits=4))
    nnz = int(np.count_nonzero(v2["params"]["layers_0"]["branch_1"]["kernel"]))
    assert r.macs == 18 * (8 * 16 + 16 * 4)
    assert (r.extra_macs_dense, r.extra_macs_sparse) == (18 * 8 * 16, 18 * nnz)
    assert r.weight_bytes == 4 * (8 * 16 + 16 * 4)
    assert (r.extra_bytes_dense, r.extra_bytes_sparse) == (4 * 8 * 16, 8 * nnz)
    assert r.to_dict()["extra_macs_sparse"] == 18 * nnz
    assert "MACs over the given inputs" in js.render.markdown(r)
