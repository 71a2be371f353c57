"""Shared measurement code of the ablations: split configs, simulated weights, output error.

The network is evaluated with *simulated* weights: every branch kernel quantized
separately (``jaxsplit.quant.quantize`` with its own scale) and the branches summed.
For weight-only quantization this is exactly what running the twin branches and
summing their outputs computes (convolution and matmul are linear in the kernel), up
to float summation order — and it lets one compiled forward pass serve every
configuration. Likewise every layer is measured as two branches (``(W, 0)`` when not
split), so one compiled ``measure`` per network and ``QuantSpec`` serves every split
configuration: on a shared 2-core machine, compilation, not arithmetic, is the cost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit as js
from jaxsplit import quant
from jaxsplit.measure import measure as measure_split
from jaxsplit.measure import sqnr_db as _sqnr_db
from jaxsplit.tree import find_layers

__all__ = [
    "Variant",
    "default_variants",
    "available_methods",
    "twin_branches",
    "measure",
    "with_kernels",
    "forward_with_intermediates",
    "layer_macs",
    "sqnr_db",
    "cosine",
    "spec_label",
    "make_spec",
    "jnp_tree",
]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One split configuration of an ablation.

    Attributes:
      label: the name printed in tables (``"balance rel0.5"``).
      method: the split method (``"none"`` for no split).
      threshold: a threshold spec, or a callable ``QuantSpec -> threshold spec`` for
        thresholds that depend on the quantizer (``Auto``).
      needs_spec: the method itself takes the ``QuantSpec`` (``grid``, ``residual``).
    """

    label: str
    method: str
    threshold: object = None
    needs_spec: bool = False

    def config(self, layers, spec: quant.QuantSpec, seed: int = 0) -> js.SplitConfig | None:
        """The ``SplitConfig`` for ``spec`` (``None`` for no split)."""
        if self.method == "none":
            return None
        thr = self.threshold(spec) if callable(self.threshold) else self.threshold
        kw = {"spec": spec} if self.needs_spec else {}
        return js.SplitConfig(layers=layers, threshold=thr, method=self.method, seed=seed, **kw)


def available_methods() -> tuple[str, ...]:
    """The split methods the installed jaxsplit offers (``kernels.METHODS``)."""
    return tuple(js.kernels.METHODS)


def _per_channel_thresholds() -> bool:
    """Whether ``Relative`` accepts ``per_channel=True`` in this jaxsplit."""
    try:
        js.Relative(0.5, per_channel=True)
    except TypeError:
        return False
    return True


def default_variants(relative=(0.25, 0.5, 0.75)) -> tuple[list[Variant], list[str]]:
    """The ablation's configurations that this jaxsplit supports, and what is missing.

    Returns:
      ``(variants, missing)``: ``missing`` names methods of the brief that have not
      landed in the library (they are left out, never faked).
    """
    have = set(available_methods())
    quant_methods = set(getattr(js.kernels, "QUANT_METHODS", ()))
    out = [Variant("none", "none")]
    out += [Variant(f"balance rel{f:g}", "balance", js.Relative(f)) for f in relative]
    out.append(Variant("balance sigma3", "balance", js.Sigma(3)))
    missing = []
    if _per_channel_thresholds():
        out.append(Variant("balance rel0.5/ch", "balance", js.Relative(0.5, per_channel=True)))
    else:
        missing.append("per-channel thresholds")
    out.append(Variant("random rel0.5", "random", js.Relative(0.5)))
    for name in ("clip", "grid", "residual"):
        if name in have:
            out.append(
                Variant(f"{name} rel0.5", name, js.Relative(0.5), needs_spec=name in quant_methods)
            )
        else:
            missing.append(name)
    auto = getattr(js, "Auto", None)
    if auto is not None:
        out.append(Variant("auto (best method)", "auto", lambda spec: auto(spec)))
        out.append(Variant("auto (<=2% nnz)", "auto", lambda spec: auto(spec, max_extra=0.02)))
    else:
        missing.append("Auto")
    return out, missing


def spec_label(spec: quant.QuantSpec) -> str:
    """``"int8 per_tensor"``."""
    return f"int{spec.bits} {spec.granularity}"


def _set(tree: dict, keys: Sequence, value) -> dict:
    """A copy of nested dict ``tree`` with ``tree[keys...] = value`` (siblings shared)."""
    if not keys:
        return value
    return {**tree, keys[0]: _set(tree[keys[0]], keys[1:], value)}


def twin_branches(params: Mapping, params2: Mapping | None) -> dict[str, tuple]:
    """``{path: (branch_0, branch_1)}`` of every layer; an unsplit layer is ``(W, 0)``.

    Giving every layer the same two-branch structure lets one compiled ``measure``
    serve every split configuration (a zero branch quantizes to zero and adds nothing
    to the error or to Widrow's prediction).
    """
    out = {}
    for path, layer in find_layers(params if params2 is None else params2).items():
        if layer.branches > 2:
            raise ValueError(f"layer {path!r} has {layer.branches} branches; 2 expected")
        if layer.branches:
            out[path] = tuple(layer.node[f"branch_{i}"][layer.weight] for i in range(2))
        else:
            w = jnp.asarray(layer.array)
            out[path] = (w, jnp.zeros_like(w))
    return out


@functools.partial(jax.jit, static_argnames="spec")
def measure(ws: dict, branches: dict, spec: quant.QuantSpec) -> dict:
    """Per layer: simulated kernel ``Q(W1) + Q(W2)`` and its weight-level error statistics.

    Args:
      ws: ``{path: W}`` original kernels.
      branches: ``{path: (W1, W2)}`` from ``twin_branches``.
      spec: the ``QuantSpec`` (each branch gets its own scale).

    Returns:
      ``{path: {'sim', 'mse_before', 'mse_after', 'pred_before', 'pred_after',
      'pred_after_corr', 'n_split', 'extra_nonzero', 'signal'}}`` (``jaxsplit.measure``,
      the figures ``jaxsplit.quant_error`` reports).
    """
    out = {}
    for path, w in ws.items():
        b = branches[path]
        before = measure_split(w, (w,), spec)
        after = measure_split(w, b, spec)
        nz = [x != 0 for x in b]
        out[path] = {
            "sim": quant.quantize(b[0], spec) + quant.quantize(b[1], spec),
            "mse_before": before.mse,
            "mse_after": after.mse,
            "pred_before": before.mse_widrow,
            "pred_after": after.mse_widrow,
            "pred_after_corr": after.mse_widrow_correlated,
            "n_split": jnp.sum(nz[0] & nz[1]),
            "extra_nonzero": after.extra_nonzero,
            "signal": jnp.mean(jnp.square(w)),
        }
    return out


def with_kernels(params: Mapping, kernels_by_path: Mapping) -> dict:
    """A copy of plain-dict ``params`` whose layers' kernels are replaced by path."""
    tree = params
    for path, layer in find_layers(params).items():
        if path in kernels_by_path:
            tree = _set(tree, (*layer.keys, layer.weight), kernels_by_path[path])
    return tree


def _is_layer(mdl: nn.Module, _name: str) -> bool:
    return isinstance(mdl, nn.Conv | nn.Dense)


def forward_with_intermediates(model: nn.Module) -> Callable:
    """A jitted ``(variables, x) -> (outputs, {layer path: layer output})``."""

    @jax.jit
    def run(variables, x):
        out, state = model.apply(
            variables, x, capture_intermediates=_is_layer, mutable=["intermediates"]
        )
        inter = {
            "/".join(path[:-1]): v
            for path, v in _flatten(state["intermediates"])
            if path[-1] == "__call__"
        }
        return out, {k: v[0] if isinstance(v, tuple) else v for k, v in inter.items()}

    return run


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def layer_macs(params: Mapping, outputs: Mapping[str, jax.Array]) -> dict[str, int]:
    """Multiply-accumulates per sample of each Conv/Dense layer (kernel size × output positions)."""
    layers = find_layers(params)
    out = {}
    for path, y in outputs.items():
        k = layers[path].array
        positions = math.prod(y.shape[1:-1]) if y.ndim > 2 else 1
        out[path] = int(positions * k.size)
    return out


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """``10·log10(mean(ref²) / mean((test - ref)²))`` in dB (``inf`` when equal)."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = float(np.mean((test - ref) ** 2))
    return _sqnr_db(float(np.mean(ref**2)), noise)


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays."""
    a, b = np.ravel(ref).astype(np.float64), np.ravel(test).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def make_spec(bits: int, granularity: str) -> quant.QuantSpec:
    """A symmetric narrow-range ``QuantSpec`` (DESIGN.md defaults)."""
    return quant.QuantSpec(bits=bits, granularity=granularity)


def jnp_tree(tree):
    """``tree`` with every leaf as a jax array (so jitted calls see one structure)."""
    return jax.tree_util.tree_map(jnp.asarray, tree)
