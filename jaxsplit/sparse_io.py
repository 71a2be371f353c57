"""Compact storage of sparse twins: ``SparseArray`` records and the tree encoding.

A split layer's ``branch_1 … branch_{k-1}`` weights are mostly zeros (``clip`` puts only
the excess of the few large values there). On disk such a weight is stored as the flat
C-order positions of its non-zero *bit patterns* plus those values, so ``-0.0``,
subnormals and NaN payloads come back bit for bit.

In a tree, a sparse record replaces the weight leaf by a one-key mapping::

    "kernel": {"__jaxsplit_sparse__": {
        "indices": int32[nnz] (int64 when the weight has >= 2**31 values), ascending,
        "values":  <weight dtype>[nnz],
        "shape":   int64[ndim]}}

Every checkpoint format stores that mapping like any other subtree (flat formats as
``…/kernel/__jaxsplit_sparse__/indices`` etc.), so one encoding serves all of them.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "SPARSE_KEY",
    "DEFAULT_SPARSE_BELOW",
    "SparseArray",
    "SparseRecordError",
    "check_sparse_below",
    "is_twin",
    "encode_leaf",
    "sparse_fits",
    "index_dtype",
    "encode_tree",
    "decode_tree",
    "record_from_tree",
]

#: The reserved key of a sparse record (a tree holding it as a real key cannot be saved).
SPARSE_KEY = "__jaxsplit_sparse__"
#: ``save(sparse_below=...)`` default: twins with under 25% non-zeros are stored sparse.
DEFAULT_SPARSE_BELOW = 0.25
_BRANCH_RE = re.compile(r"branch_(\d+)")
_RECORD_KEYS = frozenset({"indices", "values", "shape"})


class SparseRecordError(ValueError):
    """A sparse record is malformed (wrong keys, dtypes, lengths or out-of-range indices)."""


def _uint(dtype: np.dtype) -> np.dtype:
    """The unsigned integer type of the same width (bit-pattern views)."""
    return np.dtype(f"u{np.dtype(dtype).itemsize}")


def _index_dtype(size: int) -> np.dtype:
    return np.dtype(np.int32 if size <= np.iinfo(np.int32).max else np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class SparseArray:
    """A dense array stored as its non-zero bit patterns (typed, read-only record).

    Attributes:
      shape: the dense shape.
      indices: flat C-order positions of the non-zero values, ascending, int32 or int64.
      values: the values at ``indices``, in the dense dtype (bit patterns kept).

    Example:
      >>> import numpy as np
      >>> s = SparseArray.from_dense(np.array([[0.0, -0.0], [0.0, 3.0]], np.float32))
      >>> s.indices.tolist(), s.values.tolist(), s.density
      ([1, 3], [-0.0, 3.0], 0.5)
      >>> np.array_equal(s.todense().view(np.uint32), np.array([[0, 2**31], [0, 1077936128]]))
      True
    """

    shape: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray

    @classmethod
    def from_dense(cls, array: Any) -> SparseArray:
        """The record of ``array``: every value whose bits are not all zero is kept."""
        a = np.asarray(array)
        if a.dtype.itemsize not in (1, 2, 4, 8):
            raise TypeError(
                f"array dtype {a.dtype} cannot be stored sparse; itemsize must be 1, 2, 4 "
                f"or 8 bytes"
            )
        flat = a.reshape(-1)
        bits = flat.view(_uint(a.dtype))
        idx = np.flatnonzero(bits).astype(_index_dtype(a.size), copy=False)
        return cls(tuple(int(d) for d in a.shape), idx, bits[idx].view(a.dtype))

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def density(self) -> float:
        """Stored non-zeros / dense size (``0.0`` for an empty array)."""
        return self.nnz / self.size if self.size else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (indices, values, shape)."""
        return int(self.indices.nbytes + self.values.nbytes + 8 * len(self.shape))

    def todense(self) -> np.ndarray:
        """The dense array, bit for bit."""
        out = np.zeros(self.size, self.dtype)
        out.view(_uint(self.dtype))[self.indices] = self.values.view(_uint(self.dtype))
        return out.reshape(self.shape)

    def to_tree(self) -> dict[str, dict[str, np.ndarray]]:
        """The on-disk mapping ``{SPARSE_KEY: {"indices", "values", "shape"}}``."""
        shape = np.asarray(self.shape, np.int64)
        return {SPARSE_KEY: {"indices": self.indices, "values": self.values, "shape": shape}}


def check_sparse_below(sparse_below: Any) -> float:
    """Validates ``sparse_below``: ``None`` or ``0`` (off) or a number in ``[0, 1]``.

    Raises:
      TypeError: not a number.
      ValueError: outside ``[0, 1]`` or NaN.

    Example:
      >>> check_sparse_below(None), check_sparse_below(0.25)
      (0.0, 0.25)
      >>> check_sparse_below(2)
      Traceback (most recent call last):
      ...
      ValueError: sparse_below must be None or a number in [0, 1] ... got 2
    """
    help_ = (
        "None or a number in [0, 1] (density below which branch twins are stored sparse; "
        "0 or None: never)"
    )
    if sparse_below is None:
        return 0.0
    if isinstance(sparse_below, bool) or not isinstance(sparse_below, numbers.Real):
        raise TypeError(
            f"sparse_below must be {help_}, got {sparse_below!r} ({type(sparse_below).__name__})"
        )
    if not 0.0 <= float(sparse_below) <= 1.0:
        raise ValueError(f"sparse_below must be {help_}, got {sparse_below!r}")
    return float(sparse_below)


def is_twin(tree: Mapping, keys: tuple) -> bool:
    """True if the leaf at ``keys`` lies under ``branch_i`` (``i >= 1``) of a split node.

    A split node is a mapping whose keys are all ``branch_<n>`` and include ``branch_0``.

    Example:
      >>> t = {"d": {"branch_0": {"kernel": 1}, "branch_1": {"kernel": 2}}}
      >>> is_twin(t, ("d", "branch_1", "kernel")), is_twin(t, ("d", "branch_0", "kernel"))
      (True, False)
    """
    node: Any = tree
    for k in keys:
        if not isinstance(node, Mapping):
            return False
        m = _BRANCH_RE.fullmatch(str(k))
        if (
            m
            and int(m.group(1)) >= 1
            and "branch_0" in node
            and all(_BRANCH_RE.fullmatch(str(c)) for c in node)
        ):
            return True
        node = node.get(k)
    return False


def encode_leaf(array: np.ndarray, sparse_below: float) -> np.ndarray | SparseArray:
    """``array`` as a ``SparseArray`` if its density is below ``sparse_below`` and the
    record is smaller than the dense bytes; else ``array`` itself.

    Example:
      >>> import numpy as np
      >>> w = np.zeros((4, 4), np.float32); w[0, 0] = 5.0
      >>> type(encode_leaf(w, 0.25)).__name__, type(encode_leaf(w, 0.0)).__name__
      ('SparseArray', 'ndarray')
    """
    if not sparse_fits(0, array.size, array.dtype, array.ndim, sparse_below):
        return array
    nnz = int(np.count_nonzero(array.reshape(-1).view(_uint(array.dtype))))
    if not sparse_fits(nnz, array.size, array.dtype, array.ndim, sparse_below):
        return array
    return SparseArray.from_dense(array)


def sparse_fits(nnz: int, size: int, dtype, ndim: int, sparse_below: float) -> bool:
    """Whether ``encode_leaf`` stores an array of ``nnz`` non-zero bit patterns sparse:
    density below ``sparse_below`` and a record smaller than the dense bytes. False for
    every larger ``nnz`` once false (so a writer may count block by block).

    Example:
      >>> sparse_fits(10, 1000, np.float32, 2, 0.25), sparse_fits(300, 1000, np.float32, 2, 0.25)
      (True, False)
    """
    dtype = np.dtype(dtype)
    if not sparse_below or ndim == 0 or size == 0:
        return False
    if dtype.itemsize not in (1, 2, 4, 8) or dtype.kind not in "fV":
        return False
    cost = nnz * (_index_dtype(size).itemsize + dtype.itemsize) + 8 * ndim
    return nnz / size < sparse_below and cost < size * dtype.itemsize


def index_dtype(size: int) -> np.dtype:
    """The dtype of a ``SparseArray``'s indices for ``size`` dense elements.

    Example:
      >>> index_dtype(10).name, index_dtype(2**31).name
      ('int32', 'int64')
    """
    return _index_dtype(size)


def encode_tree(tree: Mapping, sparse_below: float, _root: Mapping | None = None, _keys=()):
    """A copy of a numpy ``tree`` whose sparse-enough twins are ``SparseArray.to_tree()``.

    ``SparseArray`` leaves already in the tree are written as records whatever their
    density. Raises ``ValueError`` if the tree holds the reserved key ``SPARSE_KEY``.

    Example:
      >>> import numpy as np
      >>> w = np.zeros(8, np.float32); w[3] = 1.0
      >>> t = {"d": {"branch_0": {"kernel": w}, "branch_1": {"kernel": w}}}
      >>> e = encode_tree(t, 0.25)
      >>> type(e["d"]["branch_0"]["kernel"]).__name__, list(e["d"]["branch_1"]["kernel"])
      ('ndarray', ['__jaxsplit_sparse__'])
    """
    root = tree if _root is None else _root
    out = {}
    for k, v in tree.items():
        keys = (*_keys, k)
        if k == SPARSE_KEY:
            raise ValueError(
                f"key {'/'.join(map(str, keys))!r} uses the reserved name {SPARSE_KEY!r} "
                f"(sparse twin records); rename it"
            )
        if isinstance(v, SparseArray):
            out[k] = v.to_tree()
        elif isinstance(v, Mapping):
            out[k] = encode_tree(v, sparse_below, root, keys)
        elif sparse_below and is_twin(root, keys):
            e = encode_leaf(np.asarray(v), sparse_below)
            out[k] = e.to_tree() if isinstance(e, SparseArray) else v
        else:
            out[k] = v
    return out


def record_from_tree(node: Mapping, where: str = "") -> SparseArray:
    """The ``SparseArray`` of an on-disk record mapping (``{SPARSE_KEY: {...}}``).

    Raises:
      SparseRecordError: malformed record (the message names ``where``).

    Example:
      >>> import numpy as np
      >>> rec = {SPARSE_KEY: {"indices": np.array([1], np.int32), "values": np.ones(1),
      ...                     "shape": np.array([3])}}
      >>> record_from_tree(rec).todense().tolist()
      [0.0, 1.0, 0.0]
      >>> record_from_tree({SPARSE_KEY: {"indices": np.array([5], np.int32),
      ...                   "values": np.ones(1), "shape": np.array([3])}}, "a/kernel")
      Traceback (most recent call last):
      ...
      jaxsplit.sparse_io.SparseRecordError: sparse record 'a/kernel': indices must be ...)
    """
    rec = node[SPARSE_KEY]
    if not isinstance(rec, Mapping) or set(rec) != _RECORD_KEYS:
        got = sorted(rec) if isinstance(rec, Mapping) else type(rec).__name__
        raise SparseRecordError(
            f"sparse record {where!r} must hold exactly {sorted(_RECORD_KEYS)}, got {got}"
        )
    idx, val, shape = (np.asarray(rec[k]) for k in ("indices", "values", "shape"))
    if idx.dtype not in (np.int32, np.int64) or shape.dtype.kind not in "iu":
        raise SparseRecordError(
            f"sparse record {where!r}: indices must be int32/int64 and shape integer, got "
            f"{idx.dtype}/{shape.dtype}"
        )
    if idx.ndim != 1 or val.ndim != 1 or shape.ndim != 1 or idx.size != val.size:
        raise SparseRecordError(
            f"sparse record {where!r}: indices {idx.shape} and values {val.shape} must be "
            f"1-D of equal length, shape {shape.shape} 1-D"
        )
    dims = tuple(int(d) for d in shape)
    size = int(np.prod(dims, dtype=np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0)):
        raise SparseRecordError(
            f"sparse record {where!r}: indices must be ascending, unique and in [0, {size})"
        )
    return SparseArray(dims, idx, val)


def decode_tree(tree: Mapping, dense: bool = True, _keys=()) -> dict[str, Any]:
    """A copy of a loaded tree with each sparse record as an array (``dense``) or a
    ``SparseArray``.

    Example:
      >>> import numpy as np
      >>> rec = SparseArray.from_dense(np.array([0.0, 2.0])).to_tree()
      >>> decode_tree({"k": rec})["k"].tolist(), type(decode_tree({"k": rec}, False)["k"]).__name__
      ([0.0, 2.0], 'SparseArray')
    """
    out = {}
    for k, v in tree.items():
        keys = (*_keys, k)
        if isinstance(v, Mapping) and SPARSE_KEY in v:
            if len(v) != 1:
                raise SparseRecordError(
                    f"sparse record {'/'.join(map(str, keys))!r} has extra keys {sorted(v)}"
                )
            s = record_from_tree(v, "/".join(map(str, keys)))
            out[k] = s.todense() if dense else s
        elif isinstance(v, Mapping):
            out[k] = decode_tree(v, dense, keys)
        else:
            out[k] = v
    return out
