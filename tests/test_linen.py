"""jaxsplit.linen.apply: transforms, collections, wrong trees, the quant hook."""

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from wrapper_models import np_init, randn

import jaxsplit as js
from jaxsplit.linen import Split

X = randn(3, 4)
CFG = js.SplitConfig(layers=["Dense_0", "Dense_1"], threshold=js.Relative(0.3))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(8)(x))
        self.sow("intermediates", "hidden", x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x)


class Squared(nn.Module):
    """Not linear in its weight: splitting it would be wrong."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("kernel", nn.initializers.ones, (x.shape[-1],)) ** 2


class WithSquared(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Squared()(nn.Dense(4)(x))


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    v = np_init(model, X)
    return model, v, js.split_params(v, CFG)


def test_unsplit_tree_is_a_no_op(mlp):
    model, v, _ = mlp
    assert np.array_equal(js.linen.apply(model, v, X), model.apply(v, X))


def test_original_model_on_split_tree_fails_loudly(mlp):
    model, _, v2 = mlp
    with pytest.raises(flax.errors.ScopeParamNotFoundError, match="kernel"):
        model.apply(v2, X)


def test_jit_grad_every_branch_kernel(mlp):
    model, v, v2 = mlp

    def loss(params, vs, fn):
        return jnp.sum(fn({**vs, "params": params}, X) ** 2)

    g = jax.jit(jax.grad(loss, argnums=0), static_argnums=2)(v["params"], v, model.apply)
    app = lambda vs, x: js.linen.apply(model, vs, x)  # noqa: E731
    g2 = jax.jit(jax.grad(loss, argnums=0), static_argnums=2)(v2["params"], v2, app)
    for name in ("Dense_0", "Dense_1"):
        for b in ("branch_0", "branch_1"):
            _close(g2[name][b]["kernel"], g[name]["kernel"])
        _close(g2[name]["branch_0"]["bias"], g[name]["bias"])
    _close(g2["BatchNorm_0"]["scale"], g["BatchNorm_0"]["scale"])


def test_vmap(mlp):
    model, v, v2 = mlp
    xs = randn(5, 3, 4)
    y2 = jax.vmap(lambda x: js.linen.apply(model, v2, x))(xs)
    _close(y2, jax.vmap(lambda x: model.apply(v, x))(xs))


def test_batchnorm_mutable_and_other_collections(mlp):
    model, v, v2 = mlp
    kw = {"train": True, "mutable": ["batch_stats", "intermediates"]}
    y, upd = model.apply(v, X, **kw)
    y2, upd2 = jax.jit(lambda vs: js.linen.apply(model, vs, X, **kw))(v2)
    _close(y2, y)
    jax.tree.map(_close, upd2, upd)
    assert set(upd2) == {"batch_stats", "intermediates"}


def test_shape_mismatch_names_the_path(mlp):
    model, _, v2 = mlp
    p = v2["params"]
    bad = {**p, "Dense_1": {**p["Dense_1"], "branch_1": {"kernel": jnp.zeros((8, 5))}}}
    with pytest.raises(ValueError, match=r"'Dense_1': branch kernel shapes differ"):
        js.linen.apply(model, {**v2, "params": bad}, X)
    both = {
        "branch_0": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(5)},
        "branch_1": {"kernel": jnp.zeros((8, 5))},
    }
    with pytest.raises(ValueError, match=r"'Dense_1': branch_0 params do not fit.*Dense"):
        js.linen.apply(model, {**v2, "params": {**p, "Dense_1": both}}, X)


def test_bias_on_second_branch_is_an_error(mlp):
    model, _, v2 = mlp
    p = v2["params"]
    b1 = {"kernel": p["Dense_0"]["branch_1"]["kernel"], "bias": jnp.ones(8)}
    bad = {**p, "Dense_0": {**p["Dense_0"], "branch_1": b1}}
    with pytest.raises(ValueError, match=r"'Dense_0': branch_1 holds \['bias'\]"):
        js.linen.apply(model, {**v2, "params": bad}, X)


def test_other_modules_run_on_the_summed_weight():
    """A module that is not linear in its weight (``x * W**2``) sees ``sum_i W_i`` (and with
    ``weight_fn``, ``sum_i weight_fn(W_i)``): the unsplit model's output, not a sum of branches."""
    model = WithSquared()
    v = np_init(model, X)
    v2 = js.split_params(v, js.SplitConfig(layers=["Squared_0"], threshold=0.1))
    assert js.find_layers(v2)["Squared_0"].branches == 2
    np.testing.assert_allclose(js.linen.apply(model, v2, X), model.apply(v, X), rtol=1e-6)
    doubled = jax.tree_util.tree_map_with_path(
        lambda path, w: 2 * w if path[-1].key == "kernel" else w, v
    )
    got = js.linen.apply(model, v, X, weight_fn=lambda w: 2 * w)
    np.testing.assert_allclose(got, model.apply(doubled, X), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(TypeError, match="weight_fn must be None or a callable"):
        js.linen.apply(MLP(), {}, X, weight_fn=8)
    with pytest.raises(TypeError, match="model must be a flax.linen.Module"):
        js.linen.apply(lambda x: x, {}, X)


def _q(w):
    """A stand-in weight quantizer (coarse grid), deterministic and not the identity."""
    return jnp.round(w * 4) / 4


def _quantized(tree):
    """Every weight leaf quantized on its own (each branch separately), biases kept."""

    def go(node):
        if isinstance(node, dict):
            return {k: (_q(v) if k in ("kernel", "embedding") else go(v)) for k, v in node.items()}
        return node

    return {**tree, "params": go(tree["params"])}


def test_quant_applies_to_each_branch_and_unsplit_layers(mlp):
    model, v, v2 = mlp
    v1 = js.split_params(v, js.SplitConfig(layers=["Dense_0"], threshold=js.Relative(0.3)))
    want = model.apply(js.merge_params(_quantized(v1)), X)
    got = jax.jit(lambda vs: js.linen.apply(model, vs, X, weight_fn=_q))(v1)
    _close(got, want)
    assert not np.allclose(got, model.apply(v, X), atol=1e-3)  # the hook did something
    _close(js.linen.apply(model, v, X, weight_fn=_q), model.apply(_quantized(v), X))


def test_quant_embed_lookup_and_attend():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(9, 4)
            return emb.attend(emb(ids))

    model, ids = Tied(), np.array([1, 5, 8])
    v = np_init(model, ids)
    v2 = js.split_params(v, js.SplitConfig(layers=["Embed_0"], threshold=js.Relative(0.3)))
    _close(
        js.linen.apply(model, v2, ids, weight_fn=_q),
        model.apply(js.merge_params(_quantized(v2)), ids),
    )
    _close(js.linen.apply(model, v, ids, weight_fn=_q), model.apply(_quantized(v), ids))


def test_split_module_in_a_model_with_quant():
    class Net(nn.Module):
        def setup(self):
            self.fc = Split(nn.Dense(5))
            self.out = nn.Dense(2)

        def __call__(self, x):
            return self.out(nn.tanh(self.fc(x)))

    class Plain(nn.Module):
        def setup(self):
            self.fc = nn.Dense(5)
            self.out = nn.Dense(2)

        def __call__(self, x):
            return self.out(nn.tanh(self.fc(x)))

    net = Net()
    v = np_init(net, X)
    merged = js.merge_params(v)
    _close(js.linen.apply(net, v, X), Plain().apply(merged, X))
    _close(net.apply(v, X), Plain().apply(merged, X))
    # quant reaches Split's branches one by one, and the plain layer
    _close(
        js.linen.apply(net, v, X, weight_fn=_q), Plain().apply(js.merge_params(_quantized(v)), X)
    )
    # a checkpoint of the plain model loads into the Split model through split_params
    pv = np_init(Plain(), X, seed=4)
    pv2 = js.split_params(pv, js.SplitConfig(layers=["fc"], threshold=js.Relative(0.2)))
    _close(net.apply(pv2, X), Plain().apply(pv, X))


def test_scanned_layers_see_their_slice():
    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.tanh(nn.Dense(4)(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan()(x, None)[0]

    model = Stack()
    v = np_init(model, X)
    (path,) = js.find_layers(v)
    v2 = js.split_params(v, js.SplitConfig(layers=[path], threshold=js.Relative(0.3)))
    _close(js.linen.apply(model, v2, X), model.apply(v, X))
    # per-layer quantization: each scanned layer's slice is quantized on its own
    seen = []

    def spy(w):
        seen.append(w.shape)
        return w

    js.linen.apply(model, v2, X, weight_fn=spy)
    assert seen and all(s == (4, 4) for s in seen)


def test_three_branches_sum():
    model = nn.Sequential([nn.Dense(2)])
    k, b = randn(4, 2), randn(2)
    parts = [randn(4, 2, seed=s) for s in (2, 3)]
    tree = {
        "branch_0": {"kernel": k - parts[0] - parts[1], "bias": b},
        "branch_1": {"kernel": parts[0]},
        "branch_2": {"kernel": parts[1]},
    }
    merged = js.merge_params({"params": {"layers_0": tree}})
    _close(js.linen.apply(model, {"params": {"layers_0": tree}}, X), model.apply(merged, X))
