"""Sparse twins at run time: ``branch_1 …`` of a split layer as sparse products.

A ``clip``/``Auto`` twin is mostly zeros, yet run as a dense layer it costs a whole
second layer (the same multiply-adds and bytes as the original). Here a twin whose
density (non-zeros / size) is below ``sparse_below`` is held as a
``jax.experimental.sparse.BCOO`` array of its original shape (``sparsify``), and the
wrappers (``js.linen.apply(..., sparse_below=)``, ``js.nnx.apply(..., sparse_below=)``)
run it as:

* ``Dense`` / ``nnx.Linear``: ``x @ W2`` as a sparse matmul (``dense_product``);
* ``Conv`` / ``nnx.Conv`` (one feature group, ``SAME``/``VALID``/explicit padding): the
  input's patches (``lax.conv_general_dilated_patches``, i.e. im2col) times the twin
  reshaped to ``(C_in·kh·kw, C_out)`` as a sparse matmul (``conv_product``). An
  im2col-free sparse convolution is not attempted: the patches cost ``kh·kw`` times the
  input's memory, which the benchmark (``benchmarks/sparse_forward.py``) measures;
* modules the linen interceptor runs on summed weights (any module holding split
  weights that is not a supported layer): their twins are densified first;
* every other layer type (``DenseGeneral``, ``Einsum``, ``Embed``, ``ConvTranspose``,
  ``ConvLocal``, grouped or circular/causal convolutions): the twin runs dense (its
  ``todense()``), with a log line saying so. The result is the same either way.

``branch_0`` (which carries the bias and almost all values) always runs dense. The
sum is the dense-twin sum up to float rounding (a different summation order).

Under ``jit`` the density of a traced weight is unknown: call ``sparsify`` on the
concrete tree first and pass its result (``BCOO`` is a pytree with a static number of
stored values, so it traces); the wrappers run any ``BCOO`` twin they meet sparse.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import sparse

from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.tree import branch_name, find_layers, is_traced, like, rebuild, unwrap

__all__ = [
    "check_sparse_below",
    "is_sparse",
    "density",
    "to_sparse",
    "sparsify",
    "densify",
    "dense_product",
    "conv_product",
    "linen_product",
    "nnx_product",
    "SparseBranch",
]

logger = logging.getLogger("jaxsplit")

_PADDINGS = ("SAME", "VALID", "SAME_LOWER")


def check_sparse_below(owner: str, sparse_below: Any) -> float:
    """Validates ``sparse_below``: ``None``/``0`` (off) or a density in ``(0, 1]``.

    Raises:
      ConfigTypeError: not a number.
      ConfigError: outside ``[0, 1]`` or NaN.

    Example:
      >>> check_sparse_below("apply", None), check_sparse_below("apply", 0.1)
      (0.0, 0.1)
      >>> check_sparse_below("apply", 1.5)
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigError: apply.sparse_below must be None or a density in [0, 1] ...
    """
    msg = (
        f"{owner}.sparse_below must be None or a density in [0, 1] (twins with fewer "
        f"non-zeros per value run as sparse products; 0 or None: never), got {sparse_below!r}"
    )
    if sparse_below is None:
        return 0.0
    if isinstance(sparse_below, bool) or not isinstance(sparse_below, numbers.Real):
        raise ConfigTypeError(owner, "sparse_below", msg)
    if not 0.0 <= float(sparse_below) <= 1.0:
        raise ConfigError(owner, "sparse_below", msg)
    return float(sparse_below)


def is_sparse(x: Any) -> bool:
    """True for a ``BCOO`` weight (as ``sparsify`` makes).

    Example:
      >>> is_sparse(to_sparse(jnp.eye(2))), is_sparse(jnp.eye(2))
      (True, False)
    """
    return isinstance(unwrap(x), sparse.BCOO)


def density(w: Any) -> float:
    """``nnz(w) / w.size`` of a concrete array (``0.0`` for an empty one).

    Example:
      >>> density(jnp.array([0.0, 1.0, 0.0, 2.0]))
      0.5
    """
    w = np.asarray(unwrap(w))
    return float(np.count_nonzero(w)) / w.size if w.size else 0.0


def to_sparse(w: Any) -> sparse.BCOO:
    """``w`` as a ``BCOO`` of its own shape holding exactly its non-zeros (concrete ``w``).

    Raises:
      ConfigError: ``w`` is traced (inside ``jit``): its number of non-zeros is unknown.

    Example:
      >>> s = to_sparse(jnp.array([[0.0, 2.0], [0.0, 0.0]]))
      >>> s.nse, s.todense().tolist()
      (1, [[0.0, 2.0], [0.0, 0.0]])
    """
    w = unwrap(w)
    if is_traced(w):
        raise ConfigError(
            "sparsify",
            "tree",
            "a twin weight is traced (inside jit): its number of non-zeros is unknown. Call "
            "js.sparse_run.sparsify(variables2, sparse_below) on the concrete tree outside "
            "jit and pass the result (BCOO leaves trace with a static size)",
        )
    # on the host: ``BCOO.fromdense`` run eagerly compiles a handful of XLA programs for
    # every new shape and number of non-zeros; this is the same array (row-major
    # ``(nse, ndim)`` int32 indices, sorted and unique) without any compile
    m = np.asarray(w)
    mask = m != 0
    data, indices = jnp.asarray(m[mask]), jnp.asarray(np.argwhere(mask).astype(np.int32))
    return sparse.BCOO((data, indices), shape=m.shape, indices_sorted=True, unique_indices=True)


def sparsify(tree: Mapping, sparse_below: float) -> Mapping:
    """The tree with every twin (``branch_1 …``) of density ``< sparse_below`` as a ``BCOO``.

    ``branch_0`` and unsplit layers are untouched (the same objects); ``tree`` is not
    mutated. Twins already sparse stay as they are.

    Args:
      tree: a split tree (linen variables, params dict, ``nnx.State`` pure dict).
      sparse_below: density threshold in ``[0, 1]`` (``check_sparse_below``).

    Returns:
      A tree of the same containers; ``js.linen.apply`` runs its ``BCOO`` twins sparse.

    Raises:
      ConfigError: ``sparse_below`` is out of range, or a twin is traced.

    Example:
      >>> import numpy as np, jaxsplit as js
      >>> p = {"d": {"kernel": np.array([[0.5, 4.0], [0.1, 0.2]], np.float32)}}
      >>> p2 = js.split_params(p, js.SplitConfig(layers=["d"], threshold=1.0, method="clip"))
      >>> s = sparsify(p2, 0.5)
      >>> is_sparse(s["d"]["branch_1"]["kernel"]), s["d"]["branch_1"]["kernel"].nse
      (True, 1)
    """
    below = check_sparse_below("sparsify", sparse_below)
    replacements = {}
    for layer in find_layers(tree).values():
        items = {}
        for i in range(1, layer.branches):
            node = layer.node[branch_name(i)]
            w = node[layer.weight]
            if is_sparse(w) or not below:
                continue
            if is_traced(unwrap(w)) or density(w) < below:
                items[branch_name(i)] = like(node, {**dict(node), layer.weight: to_sparse(w)})
        if items:
            replacements[layer.keys] = like(layer.node, {**dict(layer.node), **items})
    return rebuild(tree, replacements) if replacements else tree


def densify(tree: Any) -> Any:
    """``tree`` with every ``BCOO`` leaf back as a dense array (the inverse of ``sparsify``).

    Example:
      >>> densify({"w": to_sparse(jnp.array([0.0, 2.0]))})["w"].tolist()
      [0.0, 2.0]
    """
    return jax.tree.map(
        lambda x: unwrap(x).todense() if is_sparse(x) else x, tree, is_leaf=is_sparse
    )


def dense_product(x: jax.Array, w: sparse.BCOO) -> jax.Array:
    """``x @ w`` over ``x``'s last axis, ``w`` a sparse ``(in, out)`` kernel.

    Example:
      >>> w = to_sparse(jnp.array([[0.0, 2.0], [1.0, 0.0]]))
      >>> dense_product(jnp.ones((1, 3, 2)), w).tolist()
      [[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]]
    """
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]) @ w
    return y.reshape(*lead, w.shape[-1])


def _padding(padding: Any, n: int):
    if isinstance(padding, str):
        return padding if padding in _PADDINGS else None
    if isinstance(padding, int):
        return [(padding, padding)] * n
    try:
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    except TypeError:
        return None
    return pads if len(pads) == n and all(len(p) == 2 for p in pads) else None


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    return (v,) * n if isinstance(v, int) else tuple(v)


def conv_product(
    x: jax.Array,
    w: sparse.BCOO,
    *,
    strides=None,
    padding: Any = "SAME",
    input_dilation=None,
    kernel_dilation=None,
) -> jax.Array:
    """A channels-last convolution of ``x`` with a sparse ``(*window, C_in, C_out)`` kernel.

    im2col (``lax.conv_general_dilated_patches``) then a sparse matmul with the kernel
    reshaped to ``(C_in·prod(window), C_out)`` (the patches' channel-major order).

    Args:
      x: ``(N, *spatial, C_in)``.
      w: the sparse kernel.
      strides, padding, input_dilation, kernel_dilation: as ``lax.conv_general_dilated``
        (``padding``: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"``, an int or pairs).

    Example:
      >>> k = jnp.zeros((3, 3, 1, 2)).at[1, 1, 0, 1].set(2.0)
      >>> y = conv_product(jnp.ones((1, 4, 4, 1)), to_sparse(k))
      >>> y.shape, float(y[0, 0, 0, 1])
      ((1, 4, 4, 2), 2.0)
    """
    *window, cin, cout = w.shape
    n = len(window)
    spatial = "HWD"[:n]
    spec = ("N" + spatial + "C", "OI" + spatial, "N" + spatial + "C")
    patches = lax.conv_general_dilated_patches(
        x,
        tuple(window),
        _tuple(strides, n),
        _padding(padding, n),
        lhs_dilation=_tuple(input_dilation, n),
        rhs_dilation=_tuple(kernel_dilation, n),
        dimension_numbers=spec,
    )
    order = (n, *range(n), n + 1)  # (C_in, *window, C_out): the patches' feature order
    wm = w.transpose(order).reshape(cin * int(np.prod(window)), cout)
    return dense_product(patches, wm)


def _conv_settings(module, n: int):
    """``(strides, padding, input_dilation, kernel_dilation)`` or ``None`` when unsupported."""
    if getattr(module, "feature_group_count", 1) != 1 or getattr(module, "mask", None) is not None:
        return None
    pad = _padding(module.padding, n)
    if pad is None:
        return None
    return module.strides, pad, module.input_dilation, module.kernel_dilation


def _conv(module, x, w):
    n = w.ndim - 2
    settings = _conv_settings(module, n)
    if settings is None:
        return None
    unbatched = x.ndim == n + 1
    xb = x[None] if unbatched else x
    lead = xb.shape[: xb.ndim - n - 1]
    xb = xb.reshape(-1, *xb.shape[-n - 1 :])
    strides, pad, idil, kdil = settings
    y = conv_product(xb, w, strides=strides, padding=pad, input_dilation=idil, kernel_dilation=kdil)
    y = y.reshape(*lead, *y.shape[1:])
    return y[0] if unbatched else y


def linen_product(module: nn.Module, w: sparse.BCOO, x: jax.Array):
    """The twin's output ``f(x; w)`` (no bias) as a sparse product, or ``None`` when the
    layer type or its settings have no sparse form here (the caller runs it dense).

    Example:
      >>> w = to_sparse(jnp.array([[0.0, 2.0]]))
      >>> linen_product(nn.Dense(2), w, jnp.ones((1, 1))).tolist()
      [[0.0, 2.0]]
    """
    if type(module) is nn.Dense:
        return dense_product(x, w)
    if type(module) is nn.Conv:
        return _conv(module, x, w)
    return None


def nnx_product(module: nnx.Module, w: sparse.BCOO, x: jax.Array):
    """As ``linen_product``, for ``nnx.Linear`` / ``nnx.Conv``.

    Example:
      >>> w = to_sparse(jnp.array([[0.0, 2.0]]))
      >>> nnx_product(nnx.Linear(1, 2, rngs=nnx.Rngs(0)), w, jnp.ones((1, 1))).tolist()
      [[0.0, 2.0]]
    """
    if type(module) is nnx.Linear:
        return dense_product(x, w)
    if type(module) is nnx.Conv:
        return _conv(module, x, w)
    return None


class SparseBranch(nnx.Module):
    """An NNX twin run as a sparse product: holds the layer (its settings) and the ``BCOO``.

    Made by ``jaxsplit.nnx.apply(..., sparse_below=)`` for ``nnx.Linear``/``nnx.Conv``
    twins (``supports`` says which); calling it computes ``f(x; w)`` without a bias.

    Example:
      >>> lin = nnx.Linear(1, 2, use_bias=False, rngs=nnx.Rngs(0))
      >>> b = SparseBranch(lin, to_sparse(jnp.array([[0.0, 2.0]])))
      >>> b(jnp.ones((1, 1))).tolist()
      [[0.0, 2.0]]
    """

    def __init__(self, layer: nnx.Module, w: sparse.BCOO):
        self.kind = type(layer)
        self.settings = {
            k: getattr(layer, k)
            for k in ("padding", "strides", "input_dilation", "kernel_dilation")
            if hasattr(layer, k)
        }
        self.feature_group_count = getattr(layer, "feature_group_count", 1)
        self.w = nnx.data(w)

    @staticmethod
    def supports(layer: nnx.Module, n_window: int) -> bool:
        """Whether ``layer`` (a twin) has a sparse form here."""
        if type(layer) is nnx.Linear:
            return True
        return type(layer) is nnx.Conv and _conv_settings(layer, n_window) is not None

    def __call__(self, x):
        if self.kind is nnx.Linear:
            return dense_product(x, self.w)
        return _conv(_Settings(self.settings, self.feature_group_count), x, self.w)


class _Settings:
    def __init__(self, settings: dict, groups: int):
        self.__dict__.update(settings)
        self.feature_group_count = groups
        self.mask = None
