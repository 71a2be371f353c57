"""jaxsplit.nnx: module surgery, merge, op coverage, the quant hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from wrapper_models import nnx_np_init, randn

import jaxsplit as js
from jaxsplit.nnx import Split, apply, merge_model, split_model

OPS = {
    "linear": (lambda r: nnx.Linear(4, 5, rngs=r), (3, 4)),
    "linear_nobias": (lambda r: nnx.Linear(4, 5, use_bias=False, rngs=r), (3, 4)),
    "linear_general": (
        lambda r: nnx.LinearGeneral((4, 5), (2, 3), axis=(-2, -1), rngs=r),
        (2, 4, 5),
    ),
    "conv1d_stride_valid": (
        lambda r: nnx.Conv(3, 4, (3,), strides=2, padding="VALID", rngs=r),
        (2, 9, 3),
    ),
    "conv2d_dilation_same": (
        lambda r: nnx.Conv(3, 4, (3, 3), kernel_dilation=2, rngs=r),
        (2, 8, 8, 3),
    ),
    "conv2d_circular": (lambda r: nnx.Conv(2, 4, (3, 3), padding="CIRCULAR", rngs=r), (1, 6, 6, 2)),
    "conv2d_groups": (
        lambda r: nnx.Conv(3, 6, (3, 3), feature_group_count=3, rngs=r),
        (1, 6, 6, 3),
    ),
    "conv3d_strides": (
        lambda r: nnx.Conv(2, 2, (2, 2, 2), strides=(1, 2, 2), rngs=r),
        (1, 4, 4, 4, 2),
    ),
    "conv_transpose": (
        lambda r: nnx.ConvTranspose(2, 3, (3, 3), strides=(2, 2), rngs=r),
        (1, 4, 4, 2),
    ),
    "conv_transpose_circular": (
        lambda r: nnx.ConvTranspose(2, 3, (3,), padding="CIRCULAR", rngs=r),
        (1, 5, 2),
    ),
    "einsum": (lambda r: nnx.Einsum("abc,cde->abde", (3, 4, 5), (4, 5), rngs=r), (2, 4, 3)),
}
NAMES = sorted(OPS)


class AllOps(nnx.Module):
    def __init__(self, rngs):
        self.ops = nnx.Dict({name: OPS[name][0](rngs) for name in NAMES})
        self.embed = nnx.Embed(11, 6, rngs=rngs)
        self.proj = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, xs):
        out = {name: self.ops[name](xs[name]) for name in NAMES}
        out["embed_attend"] = self.embed.attend(self.proj(self.embed(xs["ids"])))
        return out


XS = {name: randn(*OPS[name][1]) for name in NAMES} | {"ids": np.array([[1, 2, 3]])}
CFG = js.SplitConfig(layers=["**"], threshold=js.Relative(0.3))


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _jit_call(model, *args):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


def _same_state(a, b):
    """Same paths, same Variable types, bit-equal values."""
    fa, fb = nnx.to_flat_state(a), nnx.to_flat_state(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (_, x), (_, y) in zip(fa, fb, strict=True):
        assert type(x) is type(y)
        assert x.get_value().dtype == y.get_value().dtype
        assert np.array_equal(x.get_value(), y.get_value())


@pytest.fixture(scope="module")
def ops():
    model = nnx_np_init(AllOps)
    before = nnx.state(model)
    model2 = split_model(model, CFG)
    return model, before, model2, _jit_call(model, XS), _jit_call(model2, XS)


@pytest.mark.parametrize("name", [*NAMES, "embed_attend"])
def test_op_split_model_matches_original(ops, name):
    *_, y, y2 = ops
    _close(y2[name], y[name])


def test_state_equals_split_params_and_input_untouched(ops):
    model, before, model2, *_ = ops
    _same_state(nnx.state(model2), js.split_params(before, CFG))
    _same_state(nnx.state(model), before)
    assert all(type(m) is not Split for _, m in nnx.iter_modules(model))
    assert isinstance(model2.ops["conv3d_strides"], Split)
    assert isinstance(model2.embed, Split)
    b1 = model2.ops["linear"].branch_1
    assert b1.bias is None and model.ops["linear"].bias is not None


def test_merge_model_round_trip_is_exact(ops):
    model, before, model2, *_ = ops
    merged = merge_model(model2)
    _same_state(nnx.state(merged), before)
    assert type(merged.ops["conv2d_groups"]) is nnx.Conv
    assert isinstance(model2.ops["conv2d_groups"], Split)  # model2 untouched


def test_grad_every_branch_kernel():
    model = nnx_np_init(
        lambda r: nnx.Sequential(nnx.Linear(4, 6, rngs=r), nnx.tanh, nnx.Linear(6, 2, rngs=r))
    )
    model2 = split_model(
        model, js.SplitConfig(layers=["layers/0", "layers/2"], threshold=js.Relative(0.3))
    )
    x = randn(3, 4)

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)

    g, g2 = grads(model), grads(model2)
    for i in (0, 2):
        for b in ("branch_0", "branch_1"):
            _close(g2["layers"][i][b]["kernel"].get_value(), g["layers"][i]["kernel"].get_value())
        _close(g2["layers"][i]["branch_0"]["bias"].get_value(), g["layers"][i]["bias"].get_value())


def test_split_module_fresh_equals_layer_and_four_branches():
    layer = nnx_np_init(lambda r: nnx.Conv(2, 3, (3,), rngs=r))
    x = randn(1, 5, 2)
    want = layer(x)
    split = Split(layer, branches=4)
    assert sorted(nnx.state(split)) == ["branch_0", "branch_1", "branch_2", "branch_3"]
    assert sorted(nnx.state(split)["branch_3"]) == ["kernel"]
    assert not np.any(split.branch_3.kernel.get_value())
    _close(split(x), want)


def test_split_module_errors():
    with pytest.raises(ValueError, match=r"Split.branches must be one of \[2, 4, 8\].*got 1"):
        Split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), branches=1)
    with pytest.raises(TypeError, match=r"\(LayerNorm\): Split wraps it.*Linear"):
        Split(nnx.LayerNorm(2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="no branch-wise 'attend'"):
        Split(nnx.Linear(2, 2, rngs=nnx.Rngs(0))).attend(jnp.ones(2))


class Squared(nnx.Module):
    """Owns a 'kernel' but is not linear in it."""

    def __init__(self):
        self.kernel = nnx.Param(jnp.array([1.0, 2.0, 3.0]))

    def __call__(self, x):
        return x * self.kernel[...] ** 2


class WithSquared(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 3, rngs=rngs)
        self.sq = Squared()

    def __call__(self, x):
        return self.sq(self.fc(x))


def test_unsupported_layer_names_path_and_type():
    model = WithSquared(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"'sq' \(Squared\): it was selected for splitting"):
        split_model(model, js.SplitConfig(layers=["sq"], threshold=1.5))
    # any module owning a weight runs with weight_fn(W) (here: x * (2W)**2)
    x, b = jnp.ones((1, 3)), model.fc.bias[...]
    got = apply(model, x, weight_fn=lambda w: 2 * w)
    np.testing.assert_allclose(got, 4 * model.sq(2 * (model.fc(x) - b) + b), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a flax.nnx.Module"):
        split_model({"a": 1}, CFG)
    with pytest.raises(TypeError, match="model2 must be a flax.nnx.Module"):
        merge_model(None)
    with pytest.raises(TypeError, match="weight_fn must be None or a callable"):
        apply(WithSquared(nnx.Rngs(0)), jnp.ones((1, 3)), weight_fn="int8")
    with pytest.raises(TypeError, match="SplitConfig"):
        split_model(WithSquared(nnx.Rngs(0)), {"layers": ["fc"]})


def _q(w):
    return jnp.round(w * 4) / 4


class BNNet(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(nnx.relu(self.fc(x))))


def _quantized_copy(model):
    """Every weight of a (merged) model quantized in place on a copy."""
    copy = nnx.clone(model)
    for _, m in nnx.iter_modules(copy):
        if isinstance(m, nnx.Linear):
            m.kernel.set_value(_q(m.kernel.get_value()))
    return copy


def test_quant_each_branch_and_unsplit_layers_and_batch_stats_written_back():
    model = nnx_np_init(BNNet)
    model2 = split_model(model, js.SplitConfig(layers=["fc"], threshold=js.Relative(0.3)))
    x = randn(5, 4)
    # reference (built first): quantize each branch, merge, quantize the plain layer
    q2 = nnx.clone(model2)
    for b in ("branch_0", "branch_1"):
        lay = getattr(q2.fc, b)
        lay.kernel.set_value(_q(lay.kernel.get_value()))
    qref = merge_model(q2)
    qref.out.kernel.set_value(_q(qref.out.kernel.get_value()))
    params_before = nnx.state(model2, nnx.Param)
    y2 = apply(model2, x, weight_fn=_q)  # train mode: batch statistics update
    _close(y2, qref(x))
    _same_state(nnx.state(model2, nnx.Param), params_before)  # weights not changed
    _close(model2.bn.mean.get_value(), qref.bn.mean.get_value())  # stats written back
    _close(model2.bn.var.get_value(), qref.bn.var.get_value())
    assert not np.allclose(model2.bn.mean.get_value(), model.bn.mean.get_value())
    # an unsplit model: every weight quantized
    model.eval()
    _close(apply(model, x, weight_fn=_q), _quantized_copy(model)(x))
    assert np.array_equal(apply(model, x), model(x))


def test_quant_embed_attend_and_grad():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(9, 4, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.embed(ids))

    model = nnx_np_init(Tied)
    ids = np.array([1, 5, 8])
    model2 = split_model(model, js.SplitConfig(layers=["embed"], threshold=js.Relative(0.3)))
    q2 = nnx.clone(model2)
    for b in ("branch_0", "branch_1"):
        e = getattr(q2.embed, b).embedding
        e.set_value(_q(e.get_value()))
    _close(apply(model2, ids, weight_fn=_q), merge_model(q2)(ids))
    ste = lambda w: w + jax.lax.stop_gradient(_q(w) - w)  # noqa: E731
    g = nnx.grad(lambda m: jnp.sum(apply(m, ids, weight_fn=ste) ** 2))(model2)
    assert np.any(g["embed"]["branch_1"]["embedding"].get_value())
