"""Faithful reproductions of Gemma's (``gemma.gm.nn``, v3.3) linen module patterns, and NNX twins.

Copied in shape from ``gemma/gm/nn/_layers.py`` and ``_modules.py`` without importing the
``gemma`` package (it pulls tensorflow): an ``Einsum`` whose weight is
``self.param(self.weight_name, ...)``, attention with ``q_einsum``/``kv_einsum``/
``attn_vec_einsum``, a gated ``FeedForward`` whose two ``Einsum`` weights
(``gating_einsum`` of shape ``(2, d, h)`` and ``linear``) live in the feed-forward's own
scope through ``nn.share_scope``, an ``Embedder`` whose table is read in ``setup`` and
used by ``encode``/``decode``, ``RMSNorm``, and a ``Transformer`` tying them together.

Params: ``embedder/input_embedding``, ``layer_i/attn/{q_einsum,kv_einsum,attn_vec_einsum}/w``,
``layer_i/mlp/{gating_einsum,linear}``, ``layer_i/pre_attention_norm/scale``, ...
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

#: the weights of a Gemma tree (``SplitConfig(weights=GEMMA_WEIGHTS)``)
GEMMA_WEIGHTS = ("w", "gating_einsum", "linear", "input_embedding")


class Einsum(nn.Module):
    """``gm.nn._layers.Einsum``: a parameterized einsum, weight named per call site."""

    shape: tuple[int, ...]
    weight_name: str = "w"
    initializer: nn.initializers.Initializer = nn.initializers.normal()

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.param(self.weight_name, self.initializer, self.shape)
        return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


class Embedder(nn.Module):
    """``gm.nn.Embedder``: the table is read in ``setup``; ``encode`` looks up, ``decode``
    multiplies by its transpose (tied output logits)."""

    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding_table = self.param(
            "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
        )

    def encode(self, x):
        x = self.input_embedding_table[(x,)]
        return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding_table.T)


class Attention(nn.Module):
    """``gm.nn.Attention`` (no rope, no mask: the weight patterns are what matter)."""

    num_heads: int
    num_kv_heads: int
    features: int
    head_dim: int

    def setup(self):
        self.attn_vec_einsum = Einsum(shape=(self.num_heads, self.head_dim, self.features))
        self.q_einsum = Einsum(shape=(self.num_heads, self.features, self.head_dim))
        self.kv_einsum = Einsum(shape=(2, self.num_kv_heads, self.features, self.head_dim))

    def __call__(self, x):
        q = self.q_einsum("BTD,NDH->BTNH", x)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        g = self.num_heads // self.num_kv_heads
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        logits = jnp.einsum("BTNH,BSNH->BTNS", q * self.head_dim**-0.5, k)
        probs = jax.nn.softmax(logits, axis=-1)
        enc = jnp.einsum("BTNS,BSNH->BTNH", probs, v)
        return self.attn_vec_einsum("BTNH,NHD->BTD", enc)


class FeedForward(nn.Module):
    """``gm.nn.FeedForward``: ``gelu(x @ Wg[0]) * (x @ Wg[1]) @ W_linear``, both Einsums
    sharing this module's scope (so its params are ``{gating_einsum, linear}``)."""

    features: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        gating = Einsum(shape=(2, self.features, self.hidden_dim), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NFH->...NH", x)
        act = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        linear = Einsum(shape=(self.hidden_dim, self.features), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", act)


class Block(nn.Module):
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    head_dim: int
    hidden_dim: int

    def setup(self):
        self.pre_attention_norm = RMSNorm()
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim)
        self.pre_ffw_norm = RMSNorm()
        self.mlp = FeedForward(self.embed_dim, self.hidden_dim)

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.mlp(self.pre_ffw_norm(x))


class Transformer(nn.Module):
    """Tokens -> logits, with tied embeddings (``embedder.encode`` in, ``decode`` out)."""

    vocab_size: int = 32
    embed_dim: int = 16
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    hidden_dim: int = 32

    def setup(self):
        self.embedder = Embedder(self.vocab_size, self.embed_dim)
        self.blocks = [
            Block(self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim,
                  self.hidden_dim, name=f"layer_{i}")
            for i in range(self.num_layers)
        ]  # fmt: skip
        self.final_norm = RMSNorm()

    def __call__(self, tokens):
        x = self.embedder.encode(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embedder.decode(self.final_norm(x))


def heavy_tailed(variables, seed=0, scale=0.2):
    """The same tree with Student-t (df=3) values, like trained weights."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda w: (rng.standard_t(3, w.shape) * scale).astype(np.float32), variables
    )


# --- NNX twins -------------------------------------------------------------------------------


class NnxFeedForward(nnx.Module):
    """The gated feed-forward in NNX: both weights are ``nnx.Param`` of this module."""

    def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal()
        self.gating_einsum = nnx.Param(init(rngs.params(), (2, features, hidden)))
        self.linear = nnx.Param(init(rngs.params(), (hidden, features)))

    def __call__(self, x):
        gate = jnp.einsum("...F,NFH->...NH", x, self.gating_einsum[...])
        act = nnx.gelu(gate[..., 0, :]) * gate[..., 1, :]
        return jnp.einsum("...H,HF->...F", act, self.linear[...])


class NnxEinsum(nnx.Module):
    def __init__(self, shape, *, rngs: nnx.Rngs):
        self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), shape))

    def __call__(self, eqn, x):
        return jnp.einsum(eqn, x, self.w[...])


class NnxBlock(nnx.Module):
    def __init__(self, d=8, h=16, *, rngs: nnx.Rngs):
        self.q_einsum = NnxEinsum((2, d, 4), rngs=rngs)
        self.out_einsum = NnxEinsum((2, 4, d), rngs=rngs)
        self.mlp = NnxFeedForward(d, h, rngs=rngs)

    def __call__(self, x):
        y = self.out_einsum("BNH,NHD->BD", jnp.tanh(self.q_einsum("BD,NDH->BNH", x)))
        return x + self.mlp(x + y)
