"""Streamed split and merge of checkpoints bigger than memory, one layer at a time.

``split_checkpoint`` reads the input's header, matches ``SplitConfig.layers`` against the
full list of layer paths (an unmatched pattern, an already-split or non-float selected
layer raises before anything is written), then per layer reads that layer's leaves,
splits the one-layer subtree with ``jaxsplit.split_with_report`` (same config, same
paths, so the same result as splitting the whole tree) and appends the branches to the
output. Peak memory is about twice the largest tensor read whole plus the runtime; kernels
past ``block_bytes`` split elementwise between safetensors files are never read whole
(``_BlockedLayer``, ``jaxsplit.chunked``): the runtime plus a few blocks. So are the 16-bit
kernels of a tree budget, in both passes (``_tabled_in_blocks``, ``chunked.table_blocks``).

Reading is streamed for safetensors, npz and orbax (one partial restore per layer);
msgpack is read whole (logged warning). Writing is streamed for safetensors (the header
space is reserved from the input's header, an upper bound, and written last, padded
with spaces as the format allows) and npz (one zip member per tensor); orbax and msgpack
outputs are collected in memory and saved at the end (logged warning).

The output is atomic like ``io.save``: written in a temporary sibling directory, fsynced
and renamed; an error or interrupt (e.g. raised from ``progress``) leaves a previous
output intact and no temporary files.

``Auto(scope="tree")`` (one budget shared by the tree) and calibrated searches stream
too: the tree-wide search runs in two passes over the input (pass 1: each layer's
candidate curve, ``split.tree_curves``, then the allocation, ``split.plan_tree``; pass 2:
each layer split at its pick, ``split.split_planned``), which gives the in-memory result
bit for bit. Other tree-wide schemes plug in with ``iter_layers`` (pass 1) and
``split_checkpoint(plan=...)`` (pass 2: a per-layer ``SplitConfig``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import pathlib
import re
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxsplit import chunked, io, screen, search, sparse_io, table
from jaxsplit.config import Auto, SplitConfig
from jaxsplit.errors import ConfigError, NonFiniteError
from jaxsplit.sparse_io import DEFAULT_SPARSE_BELOW, SparseArray
from jaxsplit.split import (
    LayerPlan,
    SplitReport,
    TreePlan,
    check_calibration,
    check_layer,
    check_sensitivity,
    match_layers,
    merge_params,
    plan_tree,
    resolve_selection,
    split_planned,
    split_with_report,
    tabled,
    tabled_curve,
    tree_choice,
    tree_curves,
)
from jaxsplit.tree import WEIGHT_NAMES, Weights, find_layers, leaf_items, set_in, x64

__all__ = [
    "LayerSource",
    "open_layers",
    "release",
    "one_layer",
    "iter_split",
    "plan_checkpoint",
    "StreamReport",
    "iter_layers",
    "merge_checkpoint",
    "split_checkpoint",
]

logger = logging.getLogger("jaxsplit")

#: ``plan``: per-layer configs by path, or ``(path, {leaf: array}) -> SplitConfig | None``.
Plan = Mapping[str, "SplitConfig"] | Callable[[str, Mapping[str, np.ndarray]], Any]
Progress = Callable[[int, int, str], Any]
#: ``split_checkpoint``'s default ``block_bytes``: kernels past 1 MiB split in 1 MiB blocks (the
#: 1B-shaped bf16 ``clip`` split: 12.8 s and 32 MiB over the runtime, vs 18.6 s and 72 MiB in
#: 4 MiB blocks and 22.1 s and 186 MiB whole; ``benchmarks/RESULTS.md``).
DEFAULT_BLOCK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """What a streamed split or merge did.

    Attributes:
      path: the output.
      fmt: the output format.
      report: the ``SplitReport`` (as ``split_with_report`` would give for the whole
        tree); ``None`` for a merge.
      merged: layer paths merged (merge only; empty for a split).
      n_tensors: logical tensors written.
      in_bytes, out_bytes: input and output size on disk.
      largest_tensor_bytes: the input's largest tensor (the peak-memory unit).
      streamed_read, streamed_write: whether input / output were streamed (msgpack
        input, orbax and msgpack output are not).
      seconds: wall time.
    """

    path: pathlib.Path
    fmt: str
    report: SplitReport | None
    merged: tuple[str, ...]
    n_tensors: int
    in_bytes: int
    out_bytes: int
    largest_tensor_bytes: int
    streamed_read: bool
    streamed_write: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["report"] = None if self.report is None else self.report.to_dict()
        d["merged"] = list(self.merged)
        return d


# --- the input: skeleton, layers, units -------------------------------------------------


def _only(calib: Mapping, path: str) -> dict | None:
    """``{path: calib[path]}``, or ``None`` where ``path`` has no calibration."""
    return {path: calib[path]} if path in calib else None


def _placeholder(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A zero-stride array of the right shape and dtype (no memory)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


class LayerSource:
    """An open checkpoint seen as layers (``open_layers``): read one layer at a time.

    Attributes:
      reader: the ``io.CheckpointReader``.
      skel: the tree with zero-stride placeholder leaves (right shapes and dtypes, no
        memory): match patterns and check layers against it.
      layers: ``{path: Layer}`` of ``skel``.
      units: ``(layer path or None, keys, leaf keys)`` in stored order: each layer, and
        each leaf outside a layer.
    """

    def __init__(self, reader: io.CheckpointReader, weights: Weights = WEIGHT_NAMES):
        self.reader = reader
        self.skel: dict = {}
        for keys, t in reader.tensors.items():
            node = self.skel
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = _placeholder(t.shape, np.dtype(_dtype(t.dtype)))
        self.layers = find_layers(self.skel, weights)
        ids = {}
        self._walk_ids(self.skel, (), ids)
        # a leaf layer (one of several weights of a node) is a unit of its own: the leaf
        self.layer_keys = {
            path: ids[id(lay.node)] + ((lay.weight,) if lay.leaf else ())
            for path, lay in self.layers.items()
        }
        by_keys = {v: k for k, v in self.layer_keys.items()}
        self.units: list[tuple[str | None, tuple, list[tuple]]] = []  # (layer, keys, leaves)
        self._units(self.skel, (), by_keys)

    def _walk_ids(self, node: Mapping, keys: tuple, ids: dict) -> None:
        ids[id(node)] = keys
        for k, v in node.items():
            if isinstance(v, Mapping):
                self._walk_ids(v, (*keys, k), ids)

    def _units(self, node: Mapping, keys: tuple, by_keys: dict) -> None:
        for k, v in node.items():
            ck = (*keys, k)
            if ck in by_keys:
                leaves = (
                    [ck + rest for rest, _ in leaf_items(v)] if isinstance(v, Mapping) else [ck]
                )
                self.units.append((by_keys[ck], ck, leaves))
            elif isinstance(v, Mapping):
                self._units(v, ck, by_keys)
            else:
                self.units.append((None, ck, [ck]))

    def subtree(self, path: str) -> dict:
        """The layer at ``path`` alone, at its full keys (``find_layers`` finds it at
        ``path``), numpy leaves (sparse twins dense)."""
        keys = self.layer_keys[path]
        leaves = [k for k in self.reader.tensors if k[: len(keys)] == keys]
        return self.read_subtree(leaves, path)

    def read_subtree(self, leaves: list[tuple], path: str | None = None) -> dict:
        """The tensors at ``leaves`` as a nested dict (``path``: the layer they form)."""
        arrays = self.reader.read_many(leaves)
        sub: dict = {}
        for keys in leaves:
            set_in(sub, keys, arrays.pop(keys))
        layer = self.layers.get(path) if path is not None else None
        if layer is not None and layer.leaf:
            # the leaf's sibling weights as placeholders (never written), so the node
            # still holds several weights and the leaf keeps its path ``node/leaf``;
            # split siblings (leaf layers holding branches) too, so that a split and an
            # unsplit checkpoint give subtrees of the same layers
            pkeys = self.layer_keys[path][:-1]
            parent = _get(sub, pkeys)
            base = path.rpartition("/")[0]
            for k, v in _get(self.skel, pkeys).items():
                sib = self.layers.get(f"{base}/{k}" if base else k)
                if k not in parent and (not isinstance(v, Mapping) or (sib and sib.leaf)):
                    parent[k] = v
        return sub


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def _get(tree: Mapping, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def iter_layers(
    src: str | os.PathLike, *, fmt: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``(layer path, layer node)`` one layer at a time, numpy leaves, tree order.

    Pass 1 of a tree-wide search: gather per-layer statistics without holding the
    checkpoint, then pass a ``plan`` to ``split_checkpoint``. Sparse twins come dense.

    Raises:
      FileNotFoundError, PermissionError, ValueError, CheckpointError: as ``io.load``.

    Example:
      >>> import tempfile, numpy as np
      >>> out = io.save({"params": {"d": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}}},
      ...               f"{tempfile.mkdtemp()}/w.safetensors")
      >>> [(p, sorted(node)) for p, node in iter_layers(out)]
      [('d', ['bias', 'kernel'])]
    """
    with io.open_checkpoint(src, fmt=fmt) as reader:
        source = LayerSource(reader)
        for path, keys, leaves in source.units:
            if path is not None:
                yield path, _get(source.read_subtree(leaves), keys)
                release()


@contextlib.contextmanager
def open_layers(
    src: str | os.PathLike, *, fmt: str | None = None, weights: Weights = WEIGHT_NAMES
) -> Iterator[LayerSource]:
    """Opens a checkpoint as a ``LayerSource`` (only the header is read).

    Raises:
      FileNotFoundError, PermissionError, ValueError, CheckpointError: as ``io.load``.

    Example:
      >>> import tempfile, numpy as np
      >>> out = io.save({"a": {"kernel": np.ones((2, 2))}, "b": {"kernel": np.zeros(3)}},
      ...               f"{tempfile.mkdtemp()}/w.npz")
      >>> with open_layers(out) as s:
      ...     sorted(s.layers), s.subtree("b")["b"]["kernel"].tolist()
      (['a', 'b'], [0.0, 0.0, 0.0])
    """
    with io.open_checkpoint(src, fmt=fmt) as reader:
        yield LayerSource(reader, weights)


def one_layer(cfg: SplitConfig, path: str) -> SplitConfig:
    """``cfg`` selecting exactly the layer at ``path`` (strict).

    Example:
      >>> cfg = one_layer(SplitConfig(layers=["*"], strict=False), "a.b")
      >>> cfg.layers[0].startswith("re:"), cfg.strict
      (True, True)
    """
    return dataclasses.replace(cfg, layers=_exact(path), strict=True)


def iter_split(
    source: LayerSource,
    cfg: SplitConfig,
    *,
    calibration: Mapping | None = None,
    sensitivity: Mapping | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[str, dict, Mapping, Any]]:
    """Yields ``(path, subtree, split subtree, LayerPlan | None)`` for every layer of
    ``source`` in stored order, the split computed as ``split_with_report`` of the whole
    tree would (``Auto(scope="tree")``: pass 1 runs first, before the first yield).
    Unselected layers come back as they are (``subtree`` twice, plan ``None``).
    Nothing is donated: the caller compares both.

    Raises:
      As ``split_checkpoint``, before the first yield for every check but non-finite
      values of layer-scope thresholds (raised at that layer).

    Example:
      >>> import tempfile, numpy as np, jaxsplit as js
      >>> out = io.save({"a": {"kernel": np.array([0.5, 4.0])}, "b": {"kernel": np.ones(2)}},
      ...               f"{tempfile.mkdtemp()}/w.npz")
      >>> with open_layers(out) as s:
      ...     rows = [(p, sorted(s2[p]), q and q.action)
      ...             for p, _, s2, q in iter_split(s, js.SplitConfig(layers=["a"], threshold=1.0))]
      >>> rows
      [('a', ['branch_0', 'branch_1'], 'split'), ('b', ['kernel'], None)]
    """
    _check_streamable(cfg)
    _check_progress(progress)
    _, paths, calib, tree = _searched(source, cfg, calibration, progress, sensitivity)
    chosen = set(paths)
    for path, _keys, leaves in source.units:
        if path is None:
            continue
        sub = source.read_subtree(leaves, path)
        if path not in chosen:
            yield path, sub, sub, None
            del sub
            release()
            continue
        one = one_layer(cfg, path)
        if tree is not None:
            sub2, rep = split_planned(sub, one, tree, calibration=_only(calib, path))
        else:
            c = _only(calib, path)
            sub2, rep = split_with_report(sub, one, calibration=c)
        yield path, sub, sub2, rep.layers[0]
        del sub, sub2, rep
        release()


# --- outputs -------------------------------------------------------------------------------


class _SafetensorsStream:
    """Writes tensors into a safetensors file's data section at known offsets (appended,
    or into extents reserved first and filled block by block), the header last into
    reserved space (padded with spaces, which the format allows)."""

    def __init__(self, path: pathlib.Path, budget: int):
        self.budget = budget + (-(8 + budget)) % 8  # data starts 8-byte aligned
        self.f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.f.write(b"\0" * (8 + self.budget))
        self.f.flush()
        self.entries: dict[str, dict] = {}
        self.end = 0  # bytes of the data section reserved so far

    def reserve(self, n: int) -> int:
        """``n`` bytes at the end of the data section; returns their offset."""
        start, self.end = self.end, self.end + n
        return start

    def cut(self, end: int) -> None:
        """Drops what was reserved from ``end`` on (``finish`` truncates the file there)."""
        self.end = end

    def write_at(self, offset: int, a: np.ndarray) -> None:
        """Writes ``a``'s bytes at ``offset`` of the data section."""
        mv = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        at, fd = 8 + self.budget + offset, self.f.fileno()
        while mv:  # pwrite may write less than asked (2 GiB at most a call on Linux)
            n = os.pwrite(fd, mv, at)
            mv, at = mv[n:], at + n

    def label(self, key: str, dtype: np.dtype, shape: tuple, start: int) -> None:
        """Names the tensor whose bytes start at ``start`` in the header."""
        name = io.SAFETENSORS_DTYPE_NAMES.get(np.dtype(dtype))
        if name is None:
            raise ValueError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.entries[key] = {
            "dtype": name,
            "shape": list(shape),
            "data_offsets": [start, start + n],
        }

    def add(self, keys: tuple, a: np.ndarray) -> None:
        key = "/".join(keys)
        a = np.require(a, requirements="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        self.label(key, a.dtype, a.shape, self.end)  # checks the dtype before any write
        self.write_at(self.reserve(a.nbytes), a)

    def finish(self) -> None:
        head = json.dumps(self.entries, separators=(",", ":")).encode()
        if len(head) > self.budget:  # the bound is computed from the input: cannot happen
            raise RuntimeError(f"safetensors header of {len(head)} bytes exceeds {self.budget}")
        self.f.seek(0)
        self.f.write(self.budget.to_bytes(8, "little") + head + b" " * (self.budget - len(head)))
        self.f.truncate(8 + self.budget + self.end)
        self.close()

    def close(self) -> None:
        self.f.close()


class _NpzStream:
    """Appends tensors to an ``.npz`` (one zip member each, as ``np.savez`` writes)."""

    def __init__(self, path: pathlib.Path):
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.custom: dict[str, str] = {}

    def add(self, keys: tuple, a: np.ndarray) -> None:
        key = "/".join(keys)
        if a.dtype.kind == "V":
            self.custom[key] = a.dtype.name
        self._member(key, a)

    def _member(self, key: str, a: np.ndarray) -> None:
        with self.zf.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)

    def finish(self) -> None:
        if self.custom:
            self._member(io.NPZ_DTYPES_KEY, np.array(json.dumps(self.custom)))
        self.close()

    def close(self) -> None:
        self.zf.close()


class _TreeSink:
    """orbax / msgpack outputs: the tree is collected and saved whole at the end."""

    def __init__(self, path: pathlib.Path, fmt: str, sparse_below: float):
        self.path, self.fmt, self.sparse_below, self.tree = path, fmt, sparse_below, {}

    def add(self, keys: tuple, a: Any) -> None:
        set_in(self.tree, keys, a)


def _header_bound(source: LayerSource, branches: dict[str, int]) -> int:
    """An upper bound on the output's safetensors header (keys, shapes, offsets)."""

    def entry(key: str, ndim_digits: int) -> int:
        return len(json.dumps(key)) + 90 + ndim_digits

    total = 64
    for path, _keys, leaves in source.units:
        k = branches.get(path, 1) if path is not None else 1
        for leaf in leaves:
            t = source.reader.tensors[leaf]
            key = "/".join(leaf) + "/branch_00/" + sparse_io.SPARSE_KEY + "/indices"
            digits = sum(len(str(d)) + 1 for d in t.shape) + 21
            total += k * 4 * entry(key, digits)
    return total


def _check_flat_keys(source: LayerSource, out_fmt: str) -> None:
    if out_fmt not in ("safetensors", "npz"):
        return
    for keys in source.reader.tensors:
        for k in keys:
            if "/" in k or not k:
                raise ValueError(
                    f"key {'/'.join(keys)!r} cannot be stored in a flat {out_fmt} checkpoint "
                    f"(keys are joined with '/', so they must be non-empty and hold no '/'); "
                    f"use orbax or msgpack"
                )


# --- the engine -----------------------------------------------------------------------------


def _size_on_disk(p: pathlib.Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(
            f"progress must be None or a callable (done, total, path), got {progress!r}"
        )


def _run(
    src,
    dst,
    *,
    fmt,
    out_fmt,
    overwrite: bool,
    sparse_below: float,
    progress: Progress | None,
    prepare: Callable[[LayerSource], dict[str, Callable[[dict], dict]]],
    branches: Callable[[LayerSource], dict[str, int]],
    weights: Weights = WEIGHT_NAMES,
    blocked: Callable[[LayerSource, str], dict[str, Callable]] | None = None,
) -> tuple[pathlib.Path, str, int, int, bool, bool, float]:
    t0 = time.perf_counter()
    out = pathlib.Path(dst)
    out_fmt = io.detect_format(out, out_fmt)
    with io.open_checkpoint(src, fmt=fmt) as reader:
        if out.exists() and out.resolve() == reader.path.resolve():
            raise ValueError(f"output {str(dst)!r} is the input; write to another path")
        source = LayerSource(reader, weights)
        _check_flat_keys(source, out_fmt)
        work = prepare(source)  # checks: raises before anything touches the disk
        by_block = blocked(source, out_fmt) if blocked is not None else {}
        streamed_write = out_fmt in ("safetensors", "npz")
        if not streamed_write:
            logger.info(
                "%s: %s outputs cannot be written one tensor at a time; the output tree is "
                "collected in memory and saved at the end",
                dst,
                out_fmt,
            )
        largest = max((t.nbytes for t in reader.tensors.values()), default=0)
        total, n_out = len(source.units), 0
        with io.staged_output(out, fmt=out_fmt, overwrite=overwrite) as staged:
            if out_fmt == "safetensors":
                sink: Any = _SafetensorsStream(staged, _header_bound(source, branches(source)))
            elif out_fmt == "npz":
                sink = _NpzStream(staged)
            else:
                sink = _TreeSink(staged, out_fmt, sparse_below)
            out_skel = _structure(source.skel)  # the output's keys, for the twin rule
            try:
                for done, (path, keys, leaves) in enumerate(source.units, 1):
                    if path in by_block:  # read, split and written block by block
                        n, node_structure = by_block[path](sink, leaves)
                        if node_structure is not None:
                            set_in(out_skel, keys, node_structure)
                        n_out += n
                        release()
                        if progress is not None:
                            progress(done, total, path)
                        continue
                    sub = source.read_subtree(leaves, path)
                    if path in work:
                        sub = work[path](sub)
                    node = _get(sub, keys)
                    if isinstance(node, Mapping):
                        set_in(out_skel, keys, _structure(node))
                    del sub
                    items = (
                        list(leaf_items(node, keys))
                        if isinstance(node, Mapping)
                        else [(keys, node)]
                    )
                    del node
                    for lkeys, a in items:
                        a = np.asarray(a)
                        if sparse_below and sparse_io.is_twin(out_skel, lkeys):
                            a = sparse_io.encode_leaf(a, sparse_below)
                        if isinstance(a, SparseArray) and streamed_write:
                            for name, part in a.to_tree()[sparse_io.SPARSE_KEY].items():
                                sink.add((*lkeys, sparse_io.SPARSE_KEY, name), part)
                        else:
                            sink.add(lkeys, a)
                        n_out += 1
                    del items, a
                    if path in work:
                        release()
                    if progress is not None:
                        progress(done, total, path or "/".join(keys))
                if streamed_write:
                    sink.finish()
                else:
                    io.save(sink.tree, staged, fmt=out_fmt, sparse_below=sparse_below)
            except BaseException:
                if streamed_write:
                    sink.close()
                raise
    seconds = time.perf_counter() - t0
    return (out, out_fmt, n_out, largest, reader.streamed, streamed_write, seconds)


def release() -> None:
    """Frees what one layer's work left behind, before the next layer is read (the
    streamed engine calls it after each layer; per-layer loops over ``LayerSource``
    should too).

    The young generations of the cycle collector are collected (a reference cycle made
    during the layer's work would hold its arrays until the GC's leisure; the one that did,
    ``tree.find_layers``' recursive closure, is broken at its source; a full collection
    walks every object of the runtime: ~0.13 s a call, 28 s of a 16-block Llama-shaped
    split), and glibc keeps freed heap memory
    (XLA's temporaries, the compiler's working memory) mapped: ``malloc_trim`` hands it
    back, so that the peak RSS is one layer's work over the runtime, not the sum of
    every shape's high-water mark (measured: 885 -> 534 MiB after the first 2048x8192
    bf16 ``Auto`` curve). A no-op where libc has no ``malloc_trim``.

    Example:
      >>> release()
    """
    gc.collect(1)
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


def _structure(tree: Mapping) -> dict:
    return {k: _structure(v) if isinstance(v, Mapping) else None for k, v in tree.items()}


def _exact(path: str) -> tuple[str]:
    return ("re:" + re.escape(path),)


def split_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cfg: SplitConfig,
    *,
    fmt: str | None = None,
    out_fmt: str | None = None,
    overwrite: bool = False,
    sparse_below: float | None = DEFAULT_SPARSE_BELOW,
    plan: Plan | None = None,
    progress: Progress | None = None,
    calibration: Mapping | None = None,
    sensitivity: Mapping | None = None,
    block_bytes: int | None = DEFAULT_BLOCK_BYTES,
) -> StreamReport:
    """Splits a checkpoint file to file, one layer in memory at a time.

    The output equals ``io.save(split_params(io.load(src), cfg), dst,
    sparse_below=sparse_below)`` tensor for tensor, bit for bit.

    Args:
      src: input checkpoint (any of ``io.FORMATS``).
      dst: output path (must differ from ``src``).
      cfg: the ``SplitConfig``; its patterns are matched against every layer path of
        ``src`` before anything is written. Thresholds are per layer (``Auto``
        included), so streaming gives the same result as splitting the whole tree.
        ``Auto(scope="tree")`` runs in two passes: pass 1 reads each selected layer
        once for its candidate curve (``split.tree_curves``, kept on the host, a few
        KiB a layer) and allocates the shared budget (``split.plan_tree``); pass 2
        splits each layer at its pick (``split.split_planned``), before anything is
        written only if pass 1 raised nothing. A callable ``layers`` predicate is
        called with placeholder nodes (right shapes and dtypes, zero values): select
        by path or shape, not by values.
      fmt: input format override; ``out_fmt``: output format (default: from ``dst``).
      overwrite: replace an existing ``dst`` (atomically).
      sparse_below: as for ``io.save``.
      plan: per-layer configs (pass 2 of a tree-wide search): a mapping
        ``{path: SplitConfig}`` (paths must be selected by ``cfg``) or a callable
        ``(path, {leaf: array}) -> SplitConfig | None``; the per-layer config's
        ``layers`` is ignored, ``None``/missing paths use ``cfg``.
      progress: called as ``progress(done, total, path)`` after each layer / tensor is
        written (and, under ``Auto(scope="tree")``, after each layer of pass 1, with
        ``path`` prefixed ``"search "``); an exception raised from it aborts the run
        (nothing is written).
      calibration: ``{layer path: second moment of its inputs}``, as for
        ``split_params`` (validated against the checkpoint's layers before any read).
      sensitivity: ``{layer path: weight}`` (``js.sensitivity``), as for
        ``split_params``: weights ``Auto(scope="tree")``'s allocation.
      block_bytes: kernels of more bytes than this, from a safetensors input to a
        safetensors output (no ``plan``, no calibration), split elementwise (``balance``
        or ``clip`` at an absolute or a per-tensor ``Relative`` threshold) or under
        ``Auto(scope="tree")`` with a value table (16-bit kernels, ``split.tabled``; also
        a pass-2 pick of ``balance``/``clip`` at a scalar threshold), are read, split and
        written in flat blocks of this many bytes (``jaxsplit.chunked``): the same bits,
        and a peak memory that no longer grows with the kernel (a sparse twin is held as
        its record until written: at most ``sparse_below`` of the values). ``None``:
        every layer whole.

    Returns:
      A ``StreamReport`` (``.report`` is the ``SplitReport``).

    Raises:
      ValueError: unmatched pattern (``cfg.strict``), selected layer already split,
        ``block_bytes`` not a positive int or ``None``,
        non-finite values (unless ``allow_nonfinite``), keys a flat format cannot store,
        ``dst`` is ``src``, ``plan`` names paths ``cfg`` does not select, ``plan`` with
        ``Auto(scope="tree")``, bad ``sparse_below``, bad ``calibration`` or
        ``sensitivity`` entries.
      TypeError: ``cfg``/``plan``/``progress`` of the wrong type, non-float kernel.
      FileExistsError, FileNotFoundError, PermissionError, CheckpointError: as
        ``io.load`` / ``io.save``.

    Example:
      >>> import tempfile, numpy as np, jaxsplit as js
      >>> d = tempfile.mkdtemp()
      >>> w = np.array([[0.5, 4.0], [-6.0, 0.1]], np.float32)
      >>> _ = io.save({"params": {"Dense_0": {"kernel": w, "bias": np.zeros(2)}}}, f"{d}/in.npz")
      >>> cfg = js.SplitConfig(layers=["Dense_*"], threshold=1.0, method="clip")
      >>> rep = split_checkpoint(f"{d}/in.npz", f"{d}/out.safetensors", cfg)
      >>> rep.report.split_paths, rep.n_tensors
      (('Dense_0',), 3)
      >>> out = io.load(f"{d}/out.safetensors")["params"]["Dense_0"]
      >>> np.array_equal(out["branch_0"]["kernel"] + out["branch_1"]["kernel"], w)
      True
    """
    _check_streamable(cfg)
    below = sparse_io.check_sparse_below(sparse_below)
    _check_progress(progress)
    if block_bytes is not None and (
        isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1
    ):
        raise ValueError(
            f"block_bytes must be a positive int (bytes) or None (every layer whole), "
            f"got {block_bytes!r}"
        )
    if plan is not None and not (isinstance(plan, Mapping) or callable(plan)):
        raise TypeError(
            f"plan must be None, a mapping {{path: SplitConfig}} or a callable "
            f"(path, layer) -> SplitConfig | None, got {type(plan).__name__}"
        )
    if plan is not None and _tree_scope(cfg):
        raise ConfigError(
            "split_checkpoint",
            "plan",
            "plan (per-layer configs) cannot be combined with Auto(scope='tree'), which "
            "plans every layer itself; pass plan=None",
        )
    state: dict[str, Any] = {}

    def prepare(source: LayerSource) -> dict[str, Callable[[dict], dict]]:
        # checks raise before any write
        (matches, available), paths, calib, tree = _searched(
            source, cfg, calibration, progress, sensitivity, plan=plan, block_bytes=block_bytes
        )
        state.update(
            matches=matches, available=available, paths=paths, plans={}, calib=calib, tree=tree
        )

        def split_one(path: str) -> Callable[[dict], dict]:
            def run(sub: dict) -> dict:
                keys = source.layer_keys[path]
                node = _get(sub, keys)
                layer_cfg = plan(path, node) if callable(plan) else (plan or {}).get(path)
                if layer_cfg is None:
                    layer_cfg = cfg
                elif not isinstance(layer_cfg, SplitConfig):
                    raise TypeError(
                        f"plan({path!r}, ...) must return a jaxsplit.SplitConfig or None, got "
                        f"{type(layer_cfg).__name__}"
                    )
                elif _tree_scope(layer_cfg):
                    raise ConfigError(
                        "split_checkpoint",
                        "plan",
                        f"plan's config for {path!r} has Auto(scope='tree'); a per-layer "
                        f"config needs scope='layer'",
                    )
                one = dataclasses.replace(layer_cfg, layers=_exact(path), strict=True)
                sub = _with_device_weight(sub, _weight_keys(source, path))
                if tree is not None:
                    out, rep = split_planned(
                        sub, one, tree, donate=True, calibration=_only(calib, path)
                    )
                else:
                    c = _only(calib, path)
                    out, rep = split_with_report(sub, one, donate=True, calibration=c)
                state["plans"][path] = rep.layers[0]
                return out

            return run

        return {p: split_one(p) for p in paths}

    def branches(source: LayerSource) -> dict[str, int]:
        return {p: 8 for p in state["paths"]}  # an upper bound for any plan

    def blocked(source: LayerSource, out_fmt: str) -> dict[str, Callable]:
        if block_bytes is None or out_fmt != "safetensors" or plan is not None:
            return {}
        out = {}
        for path in state["paths"]:
            kernel = _in_blocks(source, path, state["calib"], block_bytes)
            how = kernel and _elementwise(cfg, state["tree"], path, *kernel[1:])
            if how:
                out[path] = _BlockedLayer(
                    source, path, cfg, block_bytes, below, state["plans"], *how
                )
        return out

    out, out_fmt, n, largest, sr, sw, secs = _run(
        src, dst, fmt=fmt, out_fmt=out_fmt, overwrite=overwrite, sparse_below=below,
        progress=progress, prepare=prepare, branches=branches, weights=cfg.weights,
        blocked=blocked,
    )  # fmt: skip
    report = SplitReport(
        state["matches"], tuple(state["plans"][p] for p in state["paths"]), state["available"]
    )
    return StreamReport(
        out, out_fmt, report, (), n, _size_on_disk(pathlib.Path(src)), _size_on_disk(out),
        largest, sr, sw, secs,
    )  # fmt: skip


def _weight_keys(source: LayerSource, path: str) -> tuple:
    """The stored keys of layer ``path``'s weight (a leaf layer's keys are the leaf's)."""
    lay, keys = source.layers[path], source.layer_keys[path]
    return keys if lay.leaf else (*keys, lay.weight)


def _in_blocks(source: LayerSource, path: str, calib, block_bytes) -> tuple | None:
    """``(weight keys, dtype, shape)`` of a layer whose weight may be read in blocks of
    ``block_bytes`` (bigger than one, a dense safetensors tensor, not calibrated), else
    ``None``."""
    wkeys = _weight_keys(source, path)
    t = source.reader.tensors[wkeys]
    if block_bytes is None or t.nbytes <= block_bytes or path in calib:
        return None
    if not source.reader.flat_readable(wkeys):
        return None
    return wkeys, np.dtype(_dtype(t.dtype)), tuple(t.shape)


def _elementwise(cfg: SplitConfig, tree: TreePlan | None, path: str, dtype, shape):
    """``(split_blocks, resolve, choice)`` for a layer that can be split in blocks under
    ``cfg``, else ``None``. ``split_blocks(read, size, block, thr)`` yields ``chunked``'s
    blocks, ``resolve(read, size, block)`` gives the absolute threshold first. Elementwise
    rules (``balance``/``clip`` at an absolute or per-tensor ``Relative`` threshold), and
    under ``Auto(scope="tree")`` each pick (pass 2: known before the layer is read again):
    gathered from the value table where ``split.tabled`` holds (as the whole kernel's split
    is), else an elementwise method at a scalar threshold."""
    rule = cfg.rule
    if not isinstance(rule, Auto):
        if not chunked.supports(rule.kind, rule.per_channel, cfg.method, cfg.branches):
            return None

        def resolve(read, size, block):
            return chunked.threshold(read, size, block, rule.kind, rule.value)

        def blocks(read, size, block, thr):
            return chunked.split_blocks(read, size, block, thr, cfg.method)

        return blocks, resolve, None
    if tree is None or tree.picks.get(path, -1) < 0 or cfg.branches != 2:
        return None  # per-layer searches measure the whole kernel; unsplit layers: as stored
    curve, pick = tree.curves[path], tree.picks[path]
    mi, ti = divmod(pick, rule.candidates)
    method = search.search_methods(cfg.method, rule.spec)[mi]
    thr = curve.thresholds[ti]
    choice = tree_choice(curve, pick, cfg, tree.budget)

    def picked(*_):  # the pick's threshold: nothing to read
        return float(np.asarray(thr))

    if tabled(dtype, shape, cfg):

        def gathered(read, size, block, _):
            return chunked.table_blocks(
                read, size, block, dtype, thr, method=method, spec=rule.spec,
                twin_spec=rule.twin_spec,
            )  # fmt: skip

        return gathered, picked, choice
    if method not in chunked.METHODS or np.ndim(thr) != 0:
        return None

    def elementwise(read, size, block, t):
        return chunked.split_blocks(read, size, block, t, method)

    return elementwise, picked, choice


class _BlockedLayer:
    """One selected layer whose kernel is split block by block (``chunked``) straight
    into a ``_SafetensorsStream``: ``branch_0`` into an extent reserved first, the twin
    as a sparse record held per block (or, once it cannot be sparse, into a dense
    extent), the other leaves after. Called as ``(sink, leaves) -> (tensors written,
    the node's output structure or None)``; its ``LayerPlan`` goes into ``plans``."""

    def __init__(
        self, source, path, cfg, block_bytes: int, below: float, plans: dict, split_blocks,
        resolve, choice=None,
    ):  # fmt: skip
        self.source, self.path, self.cfg, self.below, self.plans = source, path, cfg, below, plans
        self.split_blocks, self.resolve, self.choice = split_blocks, resolve, choice
        self.lay = source.layers[path]
        self.keys = source.layer_keys[path]
        self.wkeys = _weight_keys(source, path)
        t = source.reader.tensors[self.wkeys]
        self.shape, self.dtype = tuple(t.shape), np.dtype(_dtype(t.dtype))
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.block = max(1, block_bytes // self.dtype.itemsize)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.source.reader.read_flat(self.wkeys, start, stop)

    def _fits(self, nnz: int) -> bool:
        return sparse_io.sparse_fits(nnz, self.size, self.dtype, len(self.shape), self.below)

    def __call__(self, sink: _SafetensorsStream, leaves: list[tuple]) -> tuple[int, Any]:
        cfg, item, nbytes = self.cfg, self.dtype.itemsize, self.size * self.dtype.itemsize
        uint = np.dtype(f"u{item}")
        thr = self.resolve(self.read, self.size, self.block)
        b0 = sink.reserve(nbytes)
        dense = None if self._fits(0) else sink.reserve(nbytes)
        parts: list[tuple[int, np.ndarray, np.ndarray]] = []  # (start, indices, value bits)
        nnz = n_split = n_bad = 0
        for start, w1, w2, ns, nb in self.split_blocks(self.read, self.size, self.block, thr):
            n_split, n_bad = n_split + ns, n_bad + nb
            sink.write_at(b0 + start * item, w1)
            if dense is not None:
                sink.write_at(dense + start * item, w2)
                continue
            bits = w2.view(uint)
            idx = np.flatnonzero(bits)
            parts.append((start, idx, bits[idx]))
            nnz += idx.size
            if not self._fits(nnz):  # it never fits again: the twin is stored dense
                dense = sink.reserve(nbytes)
                for s, i, v in parts:  # the blocks so far, densified one at a time
                    d = np.zeros(min(self.block, self.size - s), uint)
                    d[i] = v
                    sink.write_at(dense + s * item, d)
                parts = []
        if n_bad and not cfg.allow_nonfinite:
            raise NonFiniteError.count(self.path, self.lay.weight, n_bad)
        others = [k for k in leaves if k != self.wkeys]
        if n_split == 0:  # skipped, as split_params skips it: the layer as stored
            sink.cut(b0)
            self._plan("skip", "no value above threshold", 0, thr)
            at = sink.reserve(nbytes)  # the stored bits (branch_0 may hold other NaNs)
            sink.label("/".join(self.wkeys), self.dtype, self.shape, at)
            for start, stop in chunked.blocks(self.size, self.block):
                sink.write_at(at + start * item, self.read(start, stop))
            for k in others:
                sink.add(k, self.source.reader.read(k))
            return len(leaves), None
        self._plan("split", None, n_split, thr)
        n0 = "branch_0"
        if self.lay.leaf:
            k0, k1 = (*self.wkeys, n0), (*self.wkeys, "branch_1")
        else:
            k0 = (*self.keys, n0, self.lay.weight)
            k1 = (*self.keys, "branch_1", self.lay.weight)
        sink.label("/".join(k0), self.dtype, self.shape, b0)
        if dense is not None:
            sink.label("/".join(k1), self.dtype, self.shape, dense)
        else:
            self._write_record(sink, k1, parts, nnz)
        for k in others:
            sink.add((*self.keys, n0, *k[len(self.keys) :]), self.source.reader.read(k))
        if self.lay.leaf:
            return len(leaves) + 1, {n0: None, "branch_1": None}
        node = _structure(_get(self.source.skel, self.keys))
        return len(leaves) + 1, {n0: node, "branch_1": {self.lay.weight: None}}

    def _write_record(self, sink, k1: tuple, parts: list, nnz: int) -> None:
        """The twin's sparse record (``SparseArray.to_tree``), its parts block by block."""
        kd = sparse_io.index_dtype(self.size)
        base = "/".join((*k1, sparse_io.SPARSE_KEY))
        at = sink.reserve(nnz * kd.itemsize)
        sink.label(f"{base}/indices", kd, (nnz,), at)
        for s, i, _ in parts:
            sink.write_at(at, (i + s).astype(kd))
            at += i.size * kd.itemsize
        at = sink.reserve(nnz * self.dtype.itemsize)
        sink.label(f"{base}/values", self.dtype, (nnz,), at)
        for _, _, v in parts:
            sink.write_at(at, v)
            at += v.nbytes
        sink.add((*k1, sparse_io.SPARSE_KEY, "shape"), np.asarray(self.shape, np.int64))

    def _plan(self, action: str, reason: str | None, n_split: int, thr: float) -> None:
        self.plans[self.path] = LayerPlan(
            self.path, action, reason, n_split, self.size, thr, self.shape, str(self.dtype),
            self.choice,
        )  # fmt: skip


def _check_streamable(cfg) -> None:
    if not isinstance(cfg, SplitConfig):
        raise TypeError(f"cfg must be a jaxsplit.SplitConfig, got {type(cfg).__name__}")


def _tree_scope(cfg: SplitConfig) -> bool:
    return isinstance(cfg.threshold, Auto) and cfg.threshold.scope == "tree"


def _tabled_in_blocks(source: LayerSource, cfg: SplitConfig, path: str, calib, block_bytes):
    """The pass-1 curve of a layer that ``split.tabled`` holds for, read in blocks of
    ``block_bytes`` (its bit-pattern counts and its strided sample: ``split.tabled_curve``),
    or ``None`` where it must be read whole (small, not a dense safetensors tensor, ...)."""
    kernel = _in_blocks(source, path, calib, block_bytes)
    if kernel is None or not tabled(kernel[1], kernel[2], cfg):
        return None
    wkeys, dtype, shape = kernel
    size = int(np.prod(shape, dtype=np.int64))
    stride = screen.sample_stride(size)
    counts, rest = np.zeros(1 << 16, np.int64), []
    for start, stop in chunked.blocks(size, max(1, block_bytes // dtype.itemsize)):
        x = source.reader.read_flat(wkeys, start, stop)
        counts += table.pattern_counts(x)
        rest.append(x[(-start) % stride :: stride])
    tab = table.from_counts(counts, dtype, size)
    bad = ~np.isfinite(tab.values.astype(np.float32))
    n_bad = int(tab.counts[bad].sum())
    if n_bad and not cfg.allow_nonfinite:
        raise NonFiniteError.count(path, source.layers[path].weight, n_bad)
    return tabled_curve(tab, np.concatenate(rest), cfg)


def _search_tree(
    source: LayerSource,
    cfg: SplitConfig,
    paths: list[str],
    calib: Mapping,
    progress,
    sensitivity: Mapping | None = None,
    block_bytes: int | None = None,
) -> TreePlan:
    """Pass 1 of ``Auto(scope="tree")``: each selected layer read once for its curve
    (``split.tree_curves``: non-finite kernels raise here, before anything is written;
    value-table kernels past ``block_bytes`` in blocks, ``_tabled_in_blocks``), then the
    shared budget allocated (``split.plan_tree``, weighted by ``sensitivity``)."""
    chosen = set(paths)
    units = [(p, k, lv) for p, k, lv in source.units if p in chosen]
    curves = {}
    for done, (path, _keys, leaves) in enumerate(units, 1):
        blocked = _tabled_in_blocks(source, cfg, path, calib, block_bytes)
        if blocked is not None:
            curves[path] = blocked
        else:
            layer = find_layers(source.read_subtree(leaves, path), cfg.weights)[path]
            if check_layer(layer) is None:  # empty kernels are skipped, as in memory
                c = _only(calib, path)
                curves[path] = tree_curves([layer], cfg, calibration=c)[0]
            del layer
        release()
        if progress is not None:
            progress(done, len(units), f"search {path}")
    return plan_tree(curves, cfg, sensitivity=sensitivity)


def _searched(
    source: LayerSource, cfg: SplitConfig, calibration, progress, sensitivity=None, plan=None,
    block_bytes: int | None = DEFAULT_BLOCK_BYTES,
):  # fmt: skip
    """Selection, checks, calibration and (``Auto(scope="tree")``) pass 1:
    ``((matches, available), selected paths, calibration by path, TreePlan | None)``.
    A mapping ``plan`` (``split_checkpoint``'s) is checked against the selected paths
    first."""
    selected, matches, available = resolve_selection(source.skel, cfg)
    if isinstance(plan, Mapping):
        _check_plan(plan, [lay.path for lay in selected])
    for lay in selected:
        check_layer(lay)  # already split / not floating: raise before any read
    calib = check_calibration(calibration, selected, available)
    sens = check_sensitivity(sensitivity, selected, available, cfg)
    paths = [lay.path for lay in selected]
    tree = (
        _search_tree(source, cfg, paths, calib, progress, sens, block_bytes)
        if _tree_scope(cfg)
        else None
    )
    return (matches, available), paths, calib, tree


def _check_plan(plan: Mapping, paths: list[str]) -> None:
    """Raises unless every entry of ``plan`` is a ``SplitConfig`` for a selected path."""
    for p, c in plan.items():
        if not isinstance(c, SplitConfig):
            raise TypeError(f"plan[{p!r}] must be a jaxsplit.SplitConfig, got {type(c).__name__}")
    extra = sorted(set(plan) - set(paths))
    if extra:
        raise ValueError(
            f"plan names path(s) {extra} that cfg.layers does not select; selected: {paths}"
        )


def plan_checkpoint(
    src: str | os.PathLike,
    cfg: SplitConfig,
    *,
    fmt: str | None = None,
    calibration: Mapping | None = None,
    sensitivity: Mapping | None = None,
    progress: Progress | None = None,
):
    """The dry run of ``split_checkpoint``: the ``SplitReport`` that ``match_layers`` gives
    for the whole checkpoint, reading one selected layer at a time and writing nothing.

    ``Auto(scope="tree")`` reads each selected layer twice (its curve, then its chosen
    split's counts), as ``split_checkpoint`` does. ``calibration``, ``sensitivity`` and
    ``progress``: as
    for ``split_checkpoint``.

    Raises:
      As ``split_checkpoint`` (unmatched patterns, split or non-float layers, non-finite
      values, calibration entries) and ``io.load``.

    Example:
      >>> import tempfile, numpy as np, jaxsplit as js
      >>> d = tempfile.mkdtemp()
      >>> w = np.array([[0.5, 4.0]], np.float32)
      >>> _ = io.save({"Dense_0": {"kernel": w}, "Dense_1": {"kernel": w / 8}}, f"{d}/in.npz")
      >>> rep = plan_checkpoint(f"{d}/in.npz", js.SplitConfig(layers=["*"], threshold=1.0))
      >>> [(q.path, q.action, q.n_split) for q in rep.layers]
      [('Dense_0', 'split', 1), ('Dense_1', 'skip', 0)]
    """
    _check_streamable(cfg)
    _check_progress(progress)
    with io.open_checkpoint(src, fmt=fmt) as reader:
        source = LayerSource(reader, cfg.weights)
        (matches, available), paths, calib, tree = _searched(
            source, cfg, calibration, progress, sensitivity
        )
        chosen = set(paths)
        plans = []
        for path, _, leaves in source.units:
            if path not in chosen:
                continue
            one = dataclasses.replace(cfg, layers=_exact(path), strict=True)
            sub = source.read_subtree(leaves, path)
            if tree is not None:
                c = _only(calib, path)
                plans.append(split_planned(sub, one, tree, calibration=c)[1].layers[0])
            else:
                c = _only(calib, path)
                plans.append(match_layers(sub, one, calibration=c).layers[0])
            del sub
            release()
            if progress is not None:
                progress(len(plans), len(paths), path)
    return SplitReport(matches, tuple(plans), available)


def _with_device_weight(sub: dict, keys: tuple) -> dict:
    """``sub`` with the weight at ``keys`` copied into a jax-owned buffer, so the split
    can donate it (``branch_0`` reuses it); the numpy array is dropped from the
    (private) subtree. (A numpy input costs ~2 more tensors at the split's peak.)"""
    node = _get(sub, keys[:-1])
    a = node[keys[-1]]
    with x64(a.dtype):  # else jax would store a float64 kernel as float32
        node[keys[-1]] = jnp.array(a, copy=True)
    return sub


def merge_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fmt: str | None = None,
    out_fmt: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StreamReport:
    """Merges every split layer of a checkpoint, file to file, one layer at a time.

    The output equals ``io.save(merge_params(io.load(src)), dst)`` bit for bit.

    Args:
      src: a (split) checkpoint; sparse twins are read dense.
      dst: output path (must differ from ``src``).
      fmt, out_fmt, overwrite, progress: as for ``split_checkpoint``.

    Returns:
      A ``StreamReport`` (``.merged`` lists the merged layer paths).

    Raises:
      As ``split_checkpoint`` (file and format errors).

    Example:
      >>> import tempfile, numpy as np
      >>> d = tempfile.mkdtemp()
      >>> t = {"l": {"branch_0": {"kernel": np.ones(4, np.float32)},
      ...            "branch_1": {"kernel": np.array([0, 0, 2, 0], np.float32)}}}
      >>> _ = io.save(t, f"{d}/split.safetensors")
      >>> merge_checkpoint(f"{d}/split.safetensors", f"{d}/merged.npz").merged
      ('l',)
      >>> io.load(f"{d}/merged.npz")["l"]["kernel"].tolist()
      [1.0, 1.0, 3.0, 1.0]
    """
    _check_progress(progress)
    merged: list[str] = []

    def prepare(source: LayerSource) -> dict[str, Callable[[dict], dict]]:
        paths = [p for p, lay in source.layers.items() if lay.branches]
        merged.extend(paths)
        return {p: merge_params for p in paths}

    out, out_fmt, n, largest, sr, sw, secs = _run(
        src, dst, fmt=fmt, out_fmt=out_fmt, overwrite=overwrite, sparse_below=0.0,
        progress=progress, prepare=prepare, branches=lambda s: {},
    )  # fmt: skip
    return StreamReport(
        out, out_fmt, None, tuple(merged), n, _size_on_disk(pathlib.Path(src)),
        _size_on_disk(out), largest, sr, sw, secs,
    )  # fmt: skip
