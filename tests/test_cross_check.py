"""The evaluator's shortcut (original model on the sum_i Q(W_i) tree) equals running the twin
branches through the wrapper with each branch fake-quantized: the two independent paths agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit as js
from jaxsplit.outputs import quantized_weights


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        return nn.Dense(4)(nn.relu(x))


def test_wrapper_and_evaluator_paths_agree():
    model = Net()
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))
    variables = model.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a * 2.0, variables)  # wider ranges, more to split
    cfg = js.SplitConfig(layers=["**"], threshold=js.Relative(0.3))
    variables2 = js.split_params(variables, cfg)
    spec = js.QuantSpec(bits=4)

    def q(w):
        return js.quant.quantize(w, spec)

    via_wrapper = js.linen.apply(model, variables2, x, weight_fn=q)
    via_evaluator = model.apply(quantized_weights(variables2, spec), x)
    float_out = model.apply(variables, x)
    np.testing.assert_allclose(via_wrapper, via_evaluator, rtol=1e-5, atol=1e-5)
    # and the quantization is really applied (not an identity on both paths)
    assert float(jnp.max(jnp.abs(via_wrapper - float_out))) > 1e-3
