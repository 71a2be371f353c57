"""evaluate_model.py: output-level evaluation (linen, NNX) against hand-built forward passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsplit as js
from jaxsplit import quant
from jaxsplit.outputs import _output_error, evaluate_outputs, quantized_weights
from jaxsplit.quant import QuantSpec

CFG = js.SplitConfig(layers=["**"], threshold=js.Relative(0.5))
W4 = QuantSpec(bits=4)


def _heavy(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_t(3, shape) * 0.1, jnp.float32)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(24, name="fc1")(x))
        return nn.Dense(5, name="fc2")(x)


def _linen_setup():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 12)), jnp.float32)
    v = MLP().init(jax.random.key(0), x)
    v = {
        "params": {
            "fc1": {**v["params"]["fc1"], "kernel": _heavy((12, 24), 1)},
            "fc2": {**v["params"]["fc2"], "kernel": _heavy((24, 5), 2)},
        }
    }
    return x, v, js.split_params(v, CFG)


def _branch_forward(v2, x, act=None):
    """y = relu(sum_i A(x) @ Q(W1_i) + b1) ... computed branch by branch."""

    def layer(node, h):
        if act is not None:
            qp = quant.QParams(jnp.max(jnp.abs(h)) / act.qmax, jnp.zeros(()))
            h = quant.quantize(h, act, params=qp)
        out = sum(h @ quant.quantize(node[f"branch_{i}"]["kernel"], W4) for i in range(2))
        return out + node["branch_0"]["bias"]

    p = v2["params"]
    return layer(p["fc2"], nn.relu(layer(p["fc1"], x)))


def test_linen_weight_only_matches_branch_by_branch_forward():
    x, v, v2 = _linen_setup()
    r = evaluate_outputs(MLP(), v, v2, x, W4)
    y = MLP().apply(v, x)
    ya = _branch_forward(v2, x)
    mse = float(jnp.mean((ya - y) ** 2))
    assert r.after.mse == pytest.approx(mse, rel=1e-4)
    yb = MLP().apply(quantized_weights(v, W4), x)
    assert r.before.mse == pytest.approx(float(jnp.mean((yb - y) ** 2)), rel=1e-6)
    assert r.after.sqnr > r.before.sqnr + 3  # heavy tails, int4: the split must pay off
    assert r.extra_nonzero == sum(
        int(jnp.count_nonzero(lay.node["branch_1"]["kernel"]))
        for lay in js.find_layers(v2).values()
    )
    assert [lay.path for lay in r.layers] == ["fc1", "fc2"]
    # the model output is fc2's output: same SQNR
    assert r.layers[1].sqnr_before == pytest.approx(r.before.sqnr, rel=1e-5)
    assert r.layers[1].sqnr_after == pytest.approx(r.after.sqnr, rel=1e-5)


def test_linen_activation_quant_calibrated_by_maxabs():
    x, v, v2 = _linen_setup()
    r = evaluate_outputs(MLP(), v, v2, x, W4, act_bits=3)
    y = MLP().apply(v, x)
    # calibration over the inputs in the float model: fc1 sees x, fc2 sees relu(fc1(x))
    h_float = nn.relu(x @ v["params"]["fc1"]["kernel"] + v["params"]["fc1"]["bias"])
    a = QuantSpec(bits=3)
    s1, s2 = jnp.max(jnp.abs(x)) / 3, jnp.max(jnp.abs(h_float)) / 3

    def forward(p2):
        def layer(node, h, s):
            h = quant.quantize(h, a, params=quant.QParams(s, jnp.zeros(())))
            ks = [node[k]["kernel"] for k in sorted(node) if k.startswith("branch_")]
            return sum(h @ quant.quantize(k, W4) for k in ks) + node["branch_0"]["bias"]

        return layer(p2["fc2"], nn.relu(layer(p2["fc1"], x, s1)), s2)

    ya = forward(v2["params"])
    assert r.after.mse == pytest.approx(float(jnp.mean((ya - y) ** 2)), rel=1e-4)
    r_w = evaluate_outputs(MLP(), v, v2, x, W4)
    assert r.after.mse > r_w.after.mse  # 3-bit activations add error


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(12, 24, rngs=rngs), nnx.Linear(24, 5, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](nnx.relu(self.layers[0](x)))


def test_nnx_matches_linen_numbers_and_leaves_model_alone():
    x, v, v2 = _linen_setup()
    model = NNXMLP(nnx.Rngs(0))
    model.layers[0].kernel[...] = v["params"]["fc1"]["kernel"]
    model.layers[0].bias[...] = v["params"]["fc1"]["bias"]
    model.layers[1].kernel[...] = v["params"]["fc2"]["kernel"]
    model.layers[1].bias[...] = v["params"]["fc2"]["bias"]
    state = nnx.state(model, nnx.Param)
    state2 = js.split_params(state, CFG)
    kernel_before = np.asarray(model.layers[0].kernel[...])
    r = evaluate_outputs(model, None, state2, x, W4, act_bits=8)
    rl = evaluate_outputs(MLP(), v, v2, x, W4, act_bits=8)
    assert [lay.path for lay in r.layers] == ["layers/0", "layers/1"]
    assert r.after.mse == pytest.approx(rl.after.mse, rel=1e-5)
    assert r.before.mse == pytest.approx(rl.before.mse, rel=1e-5)
    assert r.extra_nonzero == rl.extra_nonzero
    assert type(model.layers[0]) is nnx.Linear
    assert np.array_equal(model.layers[0].kernel[...], kernel_before)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def test_conv_model_with_batch_stats_and_apply_kwargs():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 5, 5, 2)), jnp.float32)
    v = CNN().init(jax.random.key(0), x, train=False)
    v["params"]["Conv_0"]["kernel"] = _heavy((3, 3, 2, 4), 4)
    v2 = js.split_params(v, CFG)
    r = evaluate_outputs(CNN(), v, v2, (x,), QuantSpec(bits=6), apply_kwargs={"train": False})
    assert [lay.path for lay in r.layers] == ["Conv_0", "Dense_0"]
    assert r.layers[0].sqnr_after > r.layers[0].sqnr_before  # Conv_0 sees the exact input
    assert 0.9 < r.after.cosine <= 1.0 + 1e-6
    d = r.to_dict()
    assert d["before"]["agreement"] is not None and type(d["layers"][0]["sqnr_after"]) is float
    md = js.render.markdown(r)
    assert "| split, quantized |" in md and "| Conv_0 |" in md
    assert js.render.rich_table(r).row_count == 4


def test_output_error_metrics_exact():
    y = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    yq = jnp.array([[1.0, 1.0], [0.0, 2.0]])
    e = _output_error(y, yq)
    assert e.mse == 0.25
    assert e.sqnr == pytest.approx(10 * np.log10(1.25 / 0.25))
    assert e.cosine == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)
    assert e.agreement == 1.0
    z = _output_error(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    assert z.cosine == 1.0 and z.mse == 0.0


def test_quantized_weights_is_sum_of_quantized_branches():
    _, v, v2 = _linen_setup()
    q = quantized_weights(v2, W4)["params"]["fc1"]
    b = v2["params"]["fc1"]
    want = quant.quantize(b["branch_0"]["kernel"], W4) + quant.quantize(b["branch_1"]["kernel"], W4)
    assert np.array_equal(q["kernel"], want)
    assert q["bias"] is b["branch_0"]["bias"]
    assert np.array_equal(
        quantized_weights(v, W4)["params"]["fc2"]["kernel"],
        quant.quantize(v["params"]["fc2"]["kernel"], W4),
    )


def test_errors():
    x, v, v2 = _linen_setup()
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module, got function"):
        evaluate_outputs(lambda x: x, v, v2, x, W4)
    with pytest.raises(TypeError, match="spec must be a jaxsplit.QuantSpec"):
        evaluate_outputs(MLP(), v, v2, x, 4)
    with pytest.raises(ValueError, match=r"act_bits must be None or an int in \[2, 16\], got 1"):
        evaluate_outputs(MLP(), v, v2, x, W4, act_bits=1)
