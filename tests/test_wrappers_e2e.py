"""Realistic models split at several layers: same outputs and gradients inside jit.

A small ResNet-style CNN with BatchNorm and a small transformer block (Embed, Einsum
projections, DenseGeneral output, tied ``attend``), in linen and in NNX.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from wrapper_models import nnx_np_init, np_init, randn

import jaxsplit as js

IMG = randn(2, 8, 8, 3)
IDS = np.array([[1, 4, 7, 2], [0, 3, 3, 9]])
THR = js.Relative(0.3)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _check_branch_grads(g2, g, paths):
    """Every branch kernel of a split layer gets the original layer's kernel gradient."""
    layers2, layers = js.find_layers(g2), js.find_layers(g)
    for path in paths:
        assert layers2[path].branches == 2, path
        for i in range(2):
            _close(layers2[path].node[f"branch_{i}"][layers[path].weight], layers[path].array)


# --- linen -----------------------------------------------------------------------------


class ResBlock(nn.Module):
    ch: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.ch, (3, 3))(x)))
        y = nn.BatchNorm(use_running_average=not train)(nn.Conv(self.ch, (3, 3))(y))
        return nn.relu(x + y)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = ResBlock(8)(x, train)
        x = ResBlock(8)(x, train)
        return nn.Dense(5)(x.mean((1, 2)))


class Block(nn.Module):
    dim: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(10, self.dim)
        x = emb(ids)
        h = nn.LayerNorm()(x)
        hd = self.dim // self.heads
        q, k, v = (nn.Einsum((self.dim, self.heads, hd), "btd,dhk->bthk", name=n)(h) for n in "qkv")
        w = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(hd), axis=-1)
        o = jnp.einsum("bhqs,bshk->bqhk", w, v)
        x = x + nn.DenseGeneral(self.dim, axis=(-2, -1), name="out")(o)
        x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(x))))
        return emb.attend(x)


def _linen_case(model, x, layers, train_kw):
    v = np_init(model, x, **{k: a for k, a in train_kw.items() if k != "mutable"})
    v2 = js.split_params(v, js.SplitConfig(layers=layers, threshold=THR))
    split = [p for p, lay in js.find_layers(v2).items() if lay.branches]

    @jax.jit
    def run(vs):
        def loss(params):
            out = js.linen.apply(model, {**vs, "params": params}, x, **train_kw)
            y = out[0] if isinstance(out, tuple) else out
            return jnp.sum(jnp.sin(y)), out

        return jax.value_and_grad(loss, has_aux=True)(vs["params"])

    ((_, out), g), ((_, out2), g2) = run(v), run(v2)
    jax.tree.map(_close, out2, out)
    _check_branch_grads(g2, g, split)
    return split


def test_linen_resnet_train_mode_batch_stats():
    kw = {"train": True, "mutable": ["batch_stats"]}
    split = _linen_case(ResNet(), IMG, ["Conv_0", "ResBlock_*/Conv_1", "Dense_0"], kw)
    assert set(split) == {"Conv_0", "ResBlock_0/Conv_1", "ResBlock_1/Conv_1", "Dense_0"}


def test_linen_transformer_block():
    split = _linen_case(Block(), IDS, ["Embed_0", "q", "v", "out", "Dense_*"], {})
    assert len(split) == 6


# --- NNX -------------------------------------------------------------------------------


class NResBlock(nnx.Module):
    def __init__(self, ch, rngs):
        self.conv0, self.conv1 = (nnx.Conv(ch, ch, (3, 3), rngs=rngs) for _ in range(2))
        self.bn0, self.bn1 = (nnx.BatchNorm(ch, rngs=rngs) for _ in range(2))

    def __call__(self, x):
        y = nnx.relu(self.bn0(self.conv0(x)))
        return nnx.relu(x + self.bn1(self.conv1(y)))


class NResNet(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.blocks = nnx.List([NResBlock(8, rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((1, 2)))


class NBlock(nnx.Module):
    def __init__(self, rngs, dim=8, heads=2):
        hd = dim // heads
        self.hd = hd
        self.embed = nnx.Embed(10, dim, rngs=rngs)
        self.ln0, self.ln1 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.q, self.k, self.v = (
            nnx.Einsum("btd,dhk->bthk", (dim, heads, hd), (heads, hd), rngs=rngs) for _ in "qkv"
        )
        self.out = nnx.LinearGeneral((heads, hd), dim, axis=(-2, -1), rngs=rngs)
        self.up, self.down = (
            nnx.Linear(dim, 2 * dim, rngs=rngs),
            nnx.Linear(2 * dim, dim, rngs=rngs),
        )

    def __call__(self, ids):
        x = self.embed(ids)
        h = self.ln0(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        w = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(self.hd), axis=-1)
        x = x + self.out(jnp.einsum("bhqs,bshk->bqhk", w, v))
        x = x + self.down(nnx.gelu(self.up(self.ln1(x))))
        return self.embed.attend(x)


def _nnx_case(ctor, x, layers):
    model = nnx_np_init(ctor)
    model2 = js.nnx.split_model(model, js.SplitConfig(layers=layers, threshold=THR))
    split = [p for p, lay in js.find_layers(nnx.state(model2)).items() if lay.branches]

    @nnx.jit
    def run(m):
        def loss(m):
            y = m(x)
            return jnp.sum(jnp.sin(y)), y

        (_, y), g = nnx.value_and_grad(loss, has_aux=True)(m)
        return y, g

    (y, g), (y2, g2) = run(model), run(model2)
    _close(y2, y)
    _check_branch_grads(g2, g, split)
    return model, model2, split


def test_nnx_resnet_train_mode_batch_stats():
    model, model2, split = _nnx_case(NResNet, IMG, ["stem", "blocks/*/conv1", "head"])
    assert set(split) == {"blocks/0/conv1", "blocks/1/conv1", "head", "stem"}
    for b, b2 in zip(model.blocks, model2.blocks, strict=True):  # train-mode statistics
        _close(b2.bn1.mean.get_value(), b.bn1.mean.get_value())
        assert np.any(b.bn1.mean.get_value())


def test_nnx_transformer_block():
    *_, split = _nnx_case(NBlock, IDS, ["embed", "q", "v", "out", "up", "down"])
    assert len(split) == 6
