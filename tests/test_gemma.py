"""Real model code: Gemma's module patterns (``tests/gemma_like.py``) split and run.

Weights named per call site (``w``, ``gating_einsum``, ``linear``, ``input_embedding``),
a module holding two weights (split in place at ``node/leaf``), ``nn.share_scope``, a
table read in ``setup`` and used by ``encode``/``decode``; linen and NNX, eager, inside
``jit`` and under ``grad``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gemma_like import (
    GEMMA_WEIGHTS,
    Einsum,
    NnxBlock,
    Transformer,
    heavy_tailed,
)

import jaxsplit as js
from jaxsplit.errors import ConfigTypeError

TOKENS = (jnp.arange(12).reshape(2, 6) * 7) % 32
SPEC = js.QuantSpec(bits=4)
CFG = js.SplitConfig(layers=["**"], threshold=js.Relative(0.5), weights=GEMMA_WEIGHTS)
PATHS = [
    "embedder",
    *(
        f"layer_{i}/{p}"
        for i in range(2)
        for p in ("attn/attn_vec_einsum", "attn/kv_einsum", "attn/q_einsum",
                  "mlp/gating_einsum", "mlp/linear")
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def gemma():
    model = Transformer()
    v = heavy_tailed(model.init(jax.random.key(0), TOKENS))
    return model, v, js.split_params(v, CFG)


def test_layers_and_tree_contract(gemma):
    model, v, v2 = gemma
    assert js.find_layers(v) == {}  # the default weights know no Gemma leaf: unchanged
    assert list(js.find_layers(v, GEMMA_WEIGHTS)) == PATHS
    assert list(js.find_layers(v2)) == PATHS  # split layers are self-describing
    p, p2 = v["params"]["layer_0"], v2["params"]["layer_0"]
    # a node holding one weight: branch_i sub-nodes; several: each leaf split in place
    assert set(p2["attn"]["q_einsum"]) == {"branch_0", "branch_1"}
    assert set(p2["attn"]["q_einsum"]["branch_1"]) == {"w"}
    assert set(p2["mlp"]) == {"gating_einsum", "linear"}
    assert set(p2["mlp"]["gating_einsum"]) == {"branch_0", "branch_1"}
    g = p2["mlp"]["gating_einsum"]
    assert g["branch_0"].shape == p["mlp"]["gating_einsum"].shape == (2, 16, 32)
    assert p2["pre_attention_norm"] is p["pre_attention_norm"]  # untouched, same object
    merged = js.merge_params(v2)
    assert jax.tree.structure(merged) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(merged), strict=True):
        assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_selection_by_pattern_predicate_and_dry_run(gemma):
    _, v, _ = gemma
    cfg = js.SplitConfig(layers=["*/mlp/*"], threshold=js.Relative(0.5), weights=GEMMA_WEIGHTS)
    rep = js.match_layers(v, cfg)
    assert rep.patterns["*/mlp/*"] == tuple(p for p in PATHS if "/mlp/" in p)
    only_mlp = js.SplitConfig(
        layers=["**"], threshold=js.Relative(0.5), weights=lambda path, w: "/mlp/" in path
    )
    assert [q.path for q in js.match_layers(v, only_mlp).layers] == [
        p for p in PATHS if "/mlp/" in p
    ]
    # one weight split of a two-weight node: the other keeps its leaf path
    v2 = js.split_params(v, js.SplitConfig(layers=["layer_0/mlp/linear"], weights=GEMMA_WEIGHTS,
                                           threshold=js.Relative(0.5)))  # fmt: skip
    found = js.find_layers(v2, GEMMA_WEIGHTS)
    assert found["layer_0/mlp/linear"].branches == 2
    assert found["layer_0/mlp/gating_einsum"].branches == 0
    with pytest.raises(js.errors.AlreadySplitError, match="layer_0/mlp/linear"):
        js.split_params(v2, cfg)


@pytest.mark.parametrize("weights", [[], [""], 3, ("w", 1)])
def test_bad_weights(weights):
    with pytest.raises(ConfigTypeError, match=r"SplitConfig\.weights must be"):
        js.SplitConfig(layers=["**"], weights=weights)


def test_linen_outputs_jit_and_grad(gemma):
    model, v, v2 = gemma
    want = model.apply(v, TOKENS)
    np.testing.assert_allclose(js.linen.apply(model, v2, TOKENS), want, rtol=1e-6, atol=1e-6)
    jitted = jax.jit(lambda v, t: js.linen.apply(model, v, t))(v2, TOKENS)
    np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-5)
    g2 = jax.grad(lambda v: js.linen.apply(model, v, TOKENS).sum())(v2)
    g = jax.grad(lambda v: model.apply(v, TOKENS).sum())(v)
    for path in js.find_layers(v2):
        want_g = js.find_layers(g, GEMMA_WEIGHTS)[path].array
        for gi in js.tree.branch_weights(js.find_layers(g2)[path]):
            np.testing.assert_allclose(gi, want_g, rtol=1e-5, atol=1e-6, err_msg=path)


def test_linen_weight_fn_applies_to_each_branch(gemma):
    model, v, v2 = gemma
    q = lambda w: js.fake_quant(w, SPEC)  # noqa: E731
    got = js.linen.apply(model, v2, TOKENS, weight_fn=q)
    want = model.apply(js.quantized_weights(v2, SPEC), TOKENS)  # sum_i Q(W_i), merged
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    unsplit_q = model.apply(js.quantized_weights(v, SPEC, weights=GEMMA_WEIGHTS), TOKENS)
    np.testing.assert_allclose(
        js.linen.apply(model, v, TOKENS, weight_fn=q, weights=GEMMA_WEIGHTS), unsplit_q,
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    assert not np.allclose(got, unsplit_q, atol=1e-3)  # the split changed the quantized model


def test_share_scope_einsum_and_scan():
    """``nn.share_scope`` children and a layer inside ``nn.scan`` (stacked weights, each
    step sees its slice)."""

    class Wrapper(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(
                lambda m, c, _: (jnp.tanh(m(c)), None),
                variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
            )(_Step(), x, None)[0]  # fmt: skip

    class _Step(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Einsum((4, 4), name="proj")("bd,de->be", x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    model = Wrapper()
    v = heavy_tailed(model.init(jax.random.key(0), x))
    v2 = js.split_params(
        v, js.SplitConfig(layers=["**"], threshold=js.Relative(0.5), weights=("w",))
    )
    assert next(iter(js.find_layers(v2).values())).branches == 2
    np.testing.assert_allclose(js.linen.apply(model, v2, x), model.apply(v, x), rtol=1e-6)


def test_nnx_apply_with_a_split_state():
    model = NnxBlock(rngs=nnx.Rngs(0))
    nnx.update(model, heavy_tailed(nnx.state(model, nnx.Param)))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    state2 = js.split_params(nnx.state(model), CFG)
    pure = state2.to_pure_dict()
    assert set(pure["mlp"]["gating_einsum"]) == {"branch_0", "branch_1"}
    assert set(pure["q_einsum"]) == {"branch_0", "branch_1"}
    want = model(x)
    np.testing.assert_allclose(js.nnx.apply(model, x, params=state2), want, rtol=1e-6)
    np.testing.assert_allclose(js.nnx.apply(model, x, params=pure), want, rtol=1e-6)
    jitted = jax.jit(lambda s, x: js.nnx.apply(model, x, params=s))(state2, x)
    np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-6)
    g2 = jax.grad(lambda s: js.nnx.apply(model, x, params=s).sum())(state2)
    g = jax.grad(lambda s: nnx.merge(nnx.graphdef(model), s)(x).sum())(nnx.state(model))
    for path, layer in js.find_layers(g2).items():
        want_g = js.find_layers(g, GEMMA_WEIGHTS)[path].array
        for gi in js.tree.branch_weights(layer):
            np.testing.assert_allclose(gi, want_g, rtol=1e-5, atol=1e-6, err_msg=path)
    q = lambda w: js.fake_quant(w, SPEC)  # noqa: E731
    qstate = js.quantized_weights(state2, SPEC)
    np.testing.assert_allclose(
        js.nnx.apply(model, x, params=state2, weight_fn=q),
        nnx.merge(nnx.graphdef(model), qstate)(x), rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"'mlp/gating_einsum'.*js\.nnx\.apply\(model, x, params="):
        js.nnx.split_model(model, CFG)


def test_quant_error_and_stats_follow_weights(gemma):
    _, v, v2 = gemma
    rep = js.quant_error(v, v2, SPEC, weights=GEMMA_WEIGHTS)
    assert [r.path for r in rep.layers] == PATHS
    assert all(r.reduction > 0 for r in rep.layers)
    from jaxsplit.stats import layer_stats

    rows = layer_stats(v, GEMMA_WEIGHTS)
    assert [r.path for r in rows] == PATHS and rows[1].kind == "w-3d"


def test_readme_real_model_code_examples(tmp_path, monkeypatch):
    """The README's "Real model code" examples run and print what their comments say."""
    import contextlib
    import io as _io
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Real model code", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, code in enumerate(blocks):
            exec(compile(code, f"README real model code {i}", "exec"), ns)  # noqa: S102
    printed = out.getvalue().splitlines()
    expected = [m for m in re.findall(r"print\(.*\)  # (.*)", section)]
    assert printed == expected
    assert not np.allclose(ns["yq"], ns["y2"], atol=1e-3)  # weight_fn did something
    g = ns["grads"]
    assert np.array_equal(g["gating_einsum"]["branch_0"][...], g["gating_einsum"]["branch_1"][...])
    assert (tmp_path / "gemma.npz").exists()


def test_summed_weight_rerun_keeps_rngs_and_mutable_collections():
    """A custom module re-run on summed weights still draws its RNG stream and updates its
    mutable collections, as ``model.apply`` would."""

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(), (x.shape[-1], 4))
            count = self.variable("stats", "count", lambda: jnp.zeros((), jnp.int32))
            count.value += 1
            return x @ w + jax.random.normal(self.make_rng("noise"), (4,))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Noisy(name="noisy")(x)

    x = jnp.arange(6.0).reshape(2, 3)
    model = Net()
    v = heavy_tailed(model.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x))
    v = {**v, "stats": {"noisy": {"count": jnp.zeros((), jnp.int32)}}}
    v2 = js.split_params(v, js.SplitConfig(layers=["noisy"], threshold=0.1, weights=("w",)))
    rngs = {"noise": jax.random.key(2)}
    want, st = model.apply(v, x, rngs=rngs, mutable=["stats"])
    got, st2 = js.linen.apply(model, v2, x, rngs=rngs, mutable=["stats"])
    assert int(st2["stats"]["noisy"]["count"]) == int(st["stats"]["noisy"]["count"]) == 1
    assert got.shape == want.shape
    again, _ = js.linen.apply(model, v2, x, rngs=rngs, mutable=["stats"])
    np.testing.assert_array_equal(got, again)  # deterministic given the stream
    # the re-run draws from a key derived from the module's stream, not the very same key
    np.testing.assert_allclose(got - got.mean(0), want - want.mean(0), rtol=1e-5, atol=1e-5)
