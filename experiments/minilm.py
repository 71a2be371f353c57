"""paraphrase-MiniLM-L3-v2 in Flax: the model lives in ``jaxsplit.demo.minilm`` (the demo runs
it); this module re-exports it and adds ``verify``, the check against the ONNX graph itself.

    python -m experiments.minilm [--write]
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.demo.minilm import (  # noqa: F401  (re-exported for the experiments)
    DISTRIBUTION,
    ONNX_NAME,
    PACKAGE_DIR,
    PIP_COMMAND,
    Embeddings,
    Layer,
    MiniLM,
    SelfAttention,
    dense_paths,
    embed,
    embedding_paths,
    load_params,
    locate_onnx,
    onnx_to_flax_names,
    read_onnx,
)


def verify(n: int = 8, length: int = 64, seed: int = 0) -> dict[str, float]:
    """Max abs differences of ``embed`` (and token states) to the ONNX graph itself.

    References: ``experiments.onnx_numpy`` (our numpy interpreter of the graph) and, when
    installed, ``onnxruntime``. Inputs: ``n`` random sequences (ids in ``[0, vocab)``),
    random lengths, masked.

    Example:
      >>> max(verify(n=2, length=8).values()) < 1e-4  # doctest: +SKIP
      True
    """
    from experiments import onnx_numpy

    model, variables = load_params()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.vocab, size=(n, length)).astype(np.int64)
    lens = rng.integers(1, length + 1, size=n)
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int64)
    states, pooled = jax.jit(model.apply)(variables, jnp.asarray(ids), jnp.asarray(mask))
    feeds = {"input_ids": ids, "attention_mask": mask}
    refs = {"numpy": onnx_numpy.run(locate_onnx(), feeds)}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(locate_onnx()), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        refs["onnxruntime"] = dict(zip(names, sess.run(None, feeds), strict=True))
    valid = mask.astype(bool)
    out = {"max abs pooled value (scale)": float(np.abs(pooled).max())}
    for name, ref in refs.items():
        out[f"pooled vs {name}"] = float(np.abs(np.asarray(pooled) - ref["461"]).max())
        diff = np.abs(np.asarray(states) - ref["onnx::Shape_422"])[valid]
        out[f"token states vs {name} (unmasked)"] = float(diff.max())
    return out


def main(argv: list[str]) -> int:
    """``python -m experiments.minilm [--write]``: the check, saved to results/minilm_verify.md."""
    from experiments import report

    logging.basicConfig(level=logging.WARNING)
    res = verify()
    lines = [f"| {k} | {v:.3g} |" for k, v in res.items()]
    lines = ["| quantity | value |", "|---|---:|", *lines]
    sys.stdout.write("\n".join(lines) + "\n")
    if "--write" in argv:
        head = report.header(
            "MiniLM-L3 in Flax vs the ONNX graph", report.command("experiments.minilm")
        )
        text = (
            "8 random sequences of length 64 (seed 0, token ids uniform over the vocabulary, "
            "random lengths, masked); Flax `MiniLM` from `load_params()` against the graph run "
            "by `experiments/onnx_numpy.py` (numpy, float64 LayerNorm) and by onnxruntime "
            "(CPU). Max absolute differences, float32."
        )
        report.write("minilm_verify.md", [*head, text, "", *lines])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
