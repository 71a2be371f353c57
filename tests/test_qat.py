"""Quantization-aware fine-tuning of split twins on a small regression model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsplit as js
from jaxsplit import qat
from jaxsplit.quant import QuantSpec

SPEC = QuantSpec(bits=4)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(32)(x)))


def _setup():
    rng = np.random.default_rng(0)
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    # heavy-tailed weights (a few outliers), like trained layers
    params = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_t(3, size=p.shape) * 0.3, jnp.float32), params
    )
    x = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)
    y = model.apply({"params": params}, x)  # the float model is the teacher

    def loss(p, batch):
        xb, yb = batch
        return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2)

    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    return params, loss, batches, (x, y)


def test_qat_lowers_the_quantized_loss_and_keeps_the_split():
    params, loss, batches, full = _setup()
    cfg = js.SplitConfig(
        layers=["*"], threshold=js.Auto(SPEC, candidates=16, max_extra=0.05), method="clip"
    )
    p2 = js.split_params(params, cfg)
    ptq = float(qat.quantized_loss(loss, p2, full, SPEC))
    unsplit = float(qat.quantized_loss(loss, params, full, SPEC))
    assert ptq < unsplit  # the split alone helps

    res = qat.finetune(loss, p2, [full], SPEC, steps=100, optimizer=optax.adam(1e-3))
    after = float(qat.quantized_loss(loss, res.params, full, SPEC))
    assert res.losses[0] == pytest.approx(ptq, rel=1e-5) and res.losses[-1] == after
    assert after < 0.7 * ptq, (ptq, after)
    assert max(res.losses[50:]) < ptq  # goes down and stays below the post-training loss
    assert len(res.losses) == 101 and res.to_dict()["losses"][0] == res.losses[0]

    # the split structure and the twins' sparsity are kept
    assert jax.tree.structure(res.params) == jax.tree.structure(p2)
    for name in ("Dense_0", "Dense_1"):
        before = np.asarray(p2[name]["branch_1"]["kernel"])
        now = np.asarray(res.params[name]["branch_1"]["kernel"])
        assert np.array_equal(now == 0, before == 0) or np.all((now != 0) <= (before != 0))
        assert not np.any(now[before == 0])


def test_quantized_loss_gradients_reach_every_branch():
    params, loss, batches, _ = _setup()
    cfg = js.SplitConfig(layers=["Dense_0"], threshold=js.Relative(0.5), method="balance")
    p2 = js.split_params(params, cfg)
    g = jax.grad(qat.quantized_loss, argnums=1)(loss, p2, batches[0], SPEC)
    g0 = np.asarray(g["Dense_0"]["branch_0"]["kernel"])
    g1 = np.asarray(g["Dense_0"]["branch_1"]["kernel"])
    # straight-through: the sum's gradient, except at the twin's zeros (merge skips zero
    # addends, so a sparse twin gets no gradient there)
    nz = np.asarray(p2["Dense_0"]["branch_1"]["kernel"]) != 0
    assert np.any(g0[nz]) and np.array_equal(g1, np.where(nz, g0, 0))
    assert np.any(np.asarray(g["Dense_1"]["kernel"]))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(steps=0), ValueError, ["steps", "0"]),
        (dict(steps=True), ValueError, ["steps", "True"]),
        (dict(steps=2, spec=8), TypeError, ["spec", "8"]),
        (dict(steps=2, data=[]), ValueError, ["data", "empty"]),
    ],
)
def test_finetune_errors(kwargs, exc, words):
    p = {"d": {"kernel": jnp.ones(2)}}
    args = dict(data=[jnp.ones(2)], spec=SPEC) | kwargs
    with pytest.raises(exc) as e:
        qat.finetune(lambda q, b: jnp.sum(q["d"]["kernel"] * b), p, **args)
    assert all(w in str(e.value) for w in words), str(e.value)
