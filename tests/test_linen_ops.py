"""Op coverage of jaxsplit.linen: every supported layer, split, gives the original output."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from wrapper_models import np_init, randn

import jaxsplit as js
from jaxsplit.linen import Split

KEY = jax.random.key(0)


class Attend(nn.Module):
    """Embed lookup, a Dense, then Embed.attend (tied weights)."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 6)
        return emb.attend(nn.Dense(6)(emb(ids)))


def _x(shape):
    return randn(*shape)


OPS = {
    "dense": (nn.Dense(5), _x((3, 4))),
    "dense_nobias": (nn.Dense(5, use_bias=False), _x((3, 4))),
    "dense_general_multi_axis": (
        nn.DenseGeneral(features=(2, 3), axis=(-2, -1)),
        _x((2, 4, 5)),
    ),
    "conv1d_stride_valid": (nn.Conv(4, (3,), strides=2, padding="VALID"), _x((2, 9, 3))),
    "conv2d_dilation_same": (
        nn.Conv(4, (3, 3), kernel_dilation=2, padding="SAME"),
        _x((2, 8, 8, 3)),
    ),
    "conv2d_circular": (nn.Conv(4, (3, 3), padding="CIRCULAR"), _x((1, 6, 6, 2))),
    "conv2d_groups": (nn.Conv(6, (3, 3), feature_group_count=3), _x((1, 6, 6, 3))),
    "conv3d_strides": (nn.Conv(2, (2, 2, 2), strides=(1, 2, 2)), _x((1, 4, 4, 4, 2))),
    "conv_local": (nn.ConvLocal(3, (3,), padding="VALID"), _x((2, 6, 2))),
    "conv_transpose": (nn.ConvTranspose(3, (3, 3), strides=(2, 2)), _x((1, 4, 4, 2))),
    "conv_transpose_circular": (
        nn.ConvTranspose(3, (3,), padding="CIRCULAR"),
        _x((1, 5, 2)),
    ),
    "einsum": (nn.Einsum((3, 4, 5), "abc,cde->abde"), _x((2, 4, 3))),
    "embed_lookup": (nn.Embed(10, 4), np.array([[0, 3, 9], [1, 1, 2]])),
}


NAMES = sorted(OPS)
CFG = js.SplitConfig(layers=["**"], threshold=js.Relative(0.3))


class AllOps(nn.Module):
    """Every op side by side (one compile for the whole table); ``split`` wraps each in Split."""

    split: bool = False

    @nn.compact
    def __call__(self, xs):
        out = {}
        for name in NAMES:
            layer = OPS[name][0]
            mod = Split(layer, name=name) if self.split else layer.copy(name=name)
            out[name] = mod(xs[name])
        emb = Split(nn.Embed(11, 6), name="tied") if self.split else nn.Embed(11, 6, name="tied")
        out["embed_attend"] = emb.attend(nn.Dense(6)(emb(xs["ids"])))
        return out


XS = {name: OPS[name][1] for name in NAMES} | {"ids": np.array([[1, 2, 3]])}


@pytest.fixture(scope="module")
def table():
    """Original outputs, outputs on balance/random split trees, and the Split-module outputs."""
    model, smodel = AllOps(), AllOps(split=True)

    @jax.jit
    def run(v):
        outs = {"orig": model.apply(v, XS)}
        outs["balance"] = js.linen.apply(model, js.split_params(v, CFG), XS)
        outs["module"] = js.linen.apply(smodel, js.split_params(v, CFG), XS)
        return outs

    v = np_init(model, XS)
    return v, run(v)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [*NAMES, "embed_attend"])
def test_op_split_matches_original(table, name):
    _, outs = table
    for kind in ("balance", "module"):
        _close(outs[kind][name], outs["orig"][name])


def test_every_op_layer_is_split_and_merges_exactly(table):
    v, _ = table
    for method in ("balance", "random"):
        v2 = js.split_params(
            v, js.SplitConfig(layers=["**"], threshold=js.Relative(0.3), method=method)
        )
        split = {p for p, lay in js.find_layers(v2).items() if lay.branches}
        assert split == {*NAMES, "tied", "Dense_0"}
        assert jax.tree.all(jax.tree.map(np.array_equal, js.merge_params(v2), v))


def test_split_module_tree_is_the_split_tree(table):
    v, _ = table
    sv = jax.eval_shape(AllOps(split=True).init, KEY, XS)
    v2 = js.split_params(v, js.SplitConfig(layers=[*NAMES, "tied"], threshold=js.Relative(0.3)))
    assert jax.tree.structure(sv) == jax.tree.structure(v2)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, sv, v2))


def test_split_module_from_params_and_attend():
    emb, ids = nn.Embed(7, 3), jnp.array([2, 5])
    v = np_init(emb, ids)
    p2 = Split.from_params(v["params"], threshold=js.Relative(0.5), method="random", seed=3)
    assert np.array_equal(
        p2["branch_0"]["embedding"] + p2["branch_1"]["embedding"], v["params"]["embedding"]
    )
    q = _x((2, 3))
    _close(Split(emb).apply({"params": p2}, q, method="attend"), emb.apply(v, q, method="attend"))
    _close(Split(emb).apply({"params": p2}, ids), emb.apply(v, ids))


def test_split_module_from_params_nothing_above_threshold_gives_zero_branch():
    p = {"kernel": jnp.array([[0.1, -0.2]]), "bias": jnp.ones(2)}
    p2 = Split.from_params(p, threshold=1.0)
    assert np.array_equal(p2["branch_0"]["kernel"], p["kernel"])
    assert p2["branch_0"]["bias"] is p["bias"]
    assert np.array_equal(p2["branch_1"]["kernel"], np.zeros((1, 2)))
    assert set(p2["branch_1"]) == {"kernel"}


def test_split_module_from_params_bad_input():
    with pytest.raises(TypeError, match="no 'layers'"):
        Split.from_params({"kernel": jnp.ones(2)}, layers=["x"])
    with pytest.raises(ValueError, match="'kernel' or 'embedding'"):
        Split.from_params({"scale": jnp.ones(2)})
    with pytest.raises(ValueError, match="threshold"):
        Split.from_params({"kernel": jnp.ones(2)}, threshold=-1.0)


@pytest.mark.parametrize("branches", [2, 4])
def test_split_module_init_equals_unsplit_layer(branches):
    layer, x = nn.Conv(4, (3, 3), feature_group_count=2), _x((1, 5, 5, 2))
    split = Split(layer, branches=branches)
    v = split.init(KEY, x)
    p = v["params"]
    assert set(p) == {f"branch_{i}" for i in range(branches)}
    assert set(p["branch_0"]) == {"kernel", "bias"}
    for i in range(1, branches):
        assert set(p[f"branch_{i}"]) == {"kernel"}
        assert not np.any(np.asarray(p[f"branch_{i}"]["kernel"]))
    merged = js.merge_params({"c": p})["c"]
    assert np.array_equal(merged["kernel"], p["branch_0"]["kernel"])
    _close(split.apply(v, x), layer.apply({"params": merged}, x))


@pytest.mark.parametrize("branches", [1, 0, 3, 2.0, True])
def test_split_module_bad_branches(branches):
    """Wrapper branch counts are split_params' (kernels.BRANCHES)."""
    err = TypeError if not isinstance(branches, int) or isinstance(branches, bool) else ValueError
    with pytest.raises(err, match=r"Split.branches must be one of \[2, 4, 8\] \(as split_params\)"):
        Split(nn.Dense(2), branches=branches).init(KEY, jnp.ones((1, 2)))


def test_split_module_unsupported_layer():
    with pytest.raises(TypeError, match=r"\(LayerNorm\): Split wraps it.*Dense"):
        Split(nn.LayerNorm()).init(KEY, jnp.ones((1, 2)))
    with pytest.raises(TypeError, match=r"Split\(Dense\) at .* no branch-wise 'attend'"):
        Split(nn.Dense(2)).init(KEY, jnp.ones((1, 2)), method="attend")
