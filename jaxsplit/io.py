"""Checkpoints in and out: orbax directories, Flax msgpack, safetensors, numpy ``.npz``.

Trees are nested dicts with string keys and numpy leaves; dtypes (float32, bfloat16,
float16, integers, ...) are preserved by every format. Flat formats (safetensors,
npz) store ``/``-joined keys (``params/Dense_0/kernel``), so keys must not contain
``/`` and empty sub-dicts are not kept.

Split trees are stored compactly: a ``branch_1 … branch_{k-1}`` weight whose density
(non-zero bit patterns / size) is below ``save(sparse_below=...)`` is written as a sparse
record (indices + values + shape, see ``jaxsplit.sparse_io``) in every format; ``load``
gives it back dense, bit for bit (``dense=False``: as a ``SparseArray``).
``stored_info`` reports how each tensor is stored; ``open_checkpoint`` reads one tensor
at a time (the streamed split in ``jaxsplit.stream`` is built on it).

Saving is atomic: the checkpoint is written into a fresh temporary directory next to
the output and renamed into place only once complete, so a crash or Ctrl-C never
leaves a half-written output where a good one was; an existing output is replaced
only with ``overwrite=True``. Nothing is ever written next to, or into, the input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxsplit import sparse_io
from jaxsplit.select import unwrap
from jaxsplit.sparse_io import DEFAULT_SPARSE_BELOW, SparseArray

__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointReader",
    "StoredTensor",
    "detect_format",
    "load",
    "open_checkpoint",
    "save",
    "staged_output",
    "stored_info",
    "to_numpy_tree",
]
logger = logging.getLogger("jaxsplit")

#: Supported checkpoint formats (``fmt=`` / ``--format`` values).
FORMATS = ("orbax", "msgpack", "safetensors", "npz")
_SUFFIXES = {".msgpack": "msgpack", ".safetensors": "safetensors", ".npz": "npz"}
_NPZ_DTYPES = "__jaxsplit_dtypes__"  # npz entry recording dtypes numpy cannot store (bfloat16)


class CheckpointError(ValueError):
    """A checkpoint cannot be read (missing parts, truncated, corrupt, malformed sparse
    records) or its tree cannot be stored in the requested format."""


def detect_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The checkpoint format of ``path``: ``fmt`` if given, else from the path.

    An existing directory, or a path without a suffix, is an orbax checkpoint;
    ``.msgpack``, ``.safetensors`` and ``.npz`` files are what they say.

    Args:
      path: checkpoint path (need not exist).
      fmt: explicit format, one of ``FORMATS``, or ``None`` to detect.

    Returns:
      One of ``FORMATS``.

    Raises:
      ValueError: ``fmt`` is not a known format, or the format cannot be told from
        the path (the message says which suffixes are understood).

    Example:
      >>> detect_format("model.safetensors"), detect_format("ckpt/step_10")
      ('safetensors', 'orbax')
      >>> detect_format("w.txt", "npz")
      'npz'
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
        return fmt
    p = pathlib.Path(path)
    if p.is_dir():
        return "orbax"
    if p.suffix in _SUFFIXES:
        return _SUFFIXES[p.suffix]
    if not p.suffix and not p.exists():
        return "orbax"
    raise ValueError(
        f"cannot tell the checkpoint format of {str(path)!r} from its name; use a directory "
        f"(orbax) or a {'/'.join(_SUFFIXES)} file, or name the format, one of {list(FORMATS)}"
    )


def to_numpy_tree(tree: Mapping, _path: str = "") -> dict[str, Any]:
    """A nested ``dict`` copy of ``tree`` with string keys and numpy leaves.

    Accepts dicts, ``FrozenDict``, ``nnx.State`` (Variables are unwrapped), jax and
    numpy arrays and Python numbers. Integer keys (``nnx`` lists) become strings.
    ``SparseArray`` leaves are kept as they are.

    Raises:
      TypeError: a leaf is not an array or a number (the message names its path).

    Example:
      >>> import jax.numpy as jnp
      >>> t = to_numpy_tree({"d": {"kernel": jnp.ones(2)}, "step": 3})
      >>> type(t["d"]["kernel"]).__name__, t["step"].dtype.kind
      ('ndarray', 'i')
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"checkpoint tree must be a mapping, got {type(tree).__name__}")
    out = {}
    for k, v in tree.items():
        key = f"{_path}/{k}" if _path else str(k)
        v = unwrap(v)
        if isinstance(v, SparseArray):
            out[str(k)] = v  # written as a sparse record by ``save``
        elif isinstance(v, Mapping):
            out[str(k)] = to_numpy_tree(v, key)
        elif (hasattr(v, "shape") and hasattr(v, "dtype")) or isinstance(v, int | float | bool):
            out[str(k)] = np.asarray(v)
        else:
            raise TypeError(
                f"checkpoint leaf {key!r} is a {type(v).__name__}; only arrays and numbers "
                f"can be saved"
            )
    return out


def load(path: str | os.PathLike, *, fmt: str | None = None, dense: bool = True) -> dict[str, Any]:
    """Loads a checkpoint as a nested dict of numpy arrays.

    Args:
      path: an orbax checkpoint directory (or a directory holding exactly one, e.g.
        ``step/default``), or a ``.msgpack``/``.safetensors``/``.npz`` file.
      fmt: format override, one of ``FORMATS``.
      dense: give sparse-stored twins back as dense arrays (bit for bit); ``False``:
        as ``jaxsplit.sparse_io.SparseArray`` records.

    Returns:
      The tree, as saved (linen ``{'params': ...}`` variables stay so).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      PermissionError: ``path`` cannot be read.
      ValueError: unknown format.
      CheckpointError: the checkpoint is truncated, corrupt or not of that format.
      TypeError: ``dense`` is not a bool.

    Example:
      >>> import tempfile, numpy as np
      >>> d = tempfile.mkdtemp()
      >>> _ = save({"d": {"kernel": np.ones(2, np.float16)}}, f"{d}/w.npz")
      >>> load(f"{d}/w.npz")["d"]["kernel"].dtype
      dtype('float16')
      >>> w2 = np.zeros(100, np.float32); w2[7] = 1.5
      >>> t = {"d": {"branch_0": {"kernel": np.ones(100, np.float32)}, "branch_1": {"kernel": w2}}}
      >>> _ = save(t, f"{d}/s.safetensors")
      >>> np.array_equal(load(f"{d}/s.safetensors")["d"]["branch_1"]["kernel"], w2)
      True
      >>> load(f"{d}/s.safetensors", dense=False)["d"]["branch_1"]["kernel"].nnz
      1
    """
    if not isinstance(dense, bool):
        raise TypeError(f"dense must be a bool, got {dense!r} ({type(dense).__name__})")
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    fmt = detect_format(p, fmt)
    if fmt != "orbax" and p.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory, not a {fmt} file")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"checkpoint {str(path)!r} is not readable (permission denied)")
    try:
        tree = _READERS[fmt](p)
    except (PermissionError, CheckpointError):
        raise
    except Exception as e:  # the readers raise many kinds; all mean "not a valid checkpoint"
        raise CheckpointError(
            f"cannot read {str(path)!r} as {fmt} (truncated or corrupt?): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(tree).__name__}, not a tree")
    try:
        return sparse_io.decode_tree(tree, dense)
    except sparse_io.SparseRecordError as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from None


def save(
    tree: Mapping,
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    overwrite: bool = False,
    sparse_below: float | None = DEFAULT_SPARSE_BELOW,
) -> pathlib.Path:
    """Saves ``tree`` atomically (temporary sibling, then rename).

    Args:
      tree: a parameter tree (see ``to_numpy_tree``).
      path: output path; its format is detected like ``detect_format``.
      fmt: format override, one of ``FORMATS``.
      overwrite: replace an existing output (still atomically for files; a replaced
        directory is moved aside and restored if the final rename fails).
      sparse_below: a weight under ``branch_1 … branch_{k-1}`` of a split layer whose
        density (non-zero bit patterns / size) is below this is stored as a sparse
        record (only when that is smaller than dense); ``None`` or ``0``: never.
        ``SparseArray`` leaves are always stored sparse.

    Returns:
      The output path.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false.
      FileNotFoundError: the output's parent directory is missing.
      PermissionError: the parent directory is not writable.
      ValueError: unknown format, keys that the format cannot store (or the reserved
        ``__jaxsplit_sparse__``), ``sparse_below`` outside ``[0, 1]``.
      TypeError: a leaf is not an array or number; ``sparse_below`` not a number.

    Example:
      >>> import tempfile, numpy as np
      >>> out = save({"w": np.zeros(3)}, f"{tempfile.mkdtemp()}/w.safetensors")
      >>> sorted(load(out))
      ['w']
    """
    below = sparse_io.check_sparse_below(sparse_below)
    fmt = detect_format(pathlib.Path(path), fmt)
    arrays = sparse_io.encode_tree(to_numpy_tree(tree), below)
    if fmt in ("safetensors", "npz"):
        _flatten(arrays)  # key checks before anything touches the disk
    with staged_output(path, fmt=fmt, overwrite=overwrite) as staged:
        _WRITERS[fmt](arrays, staged)
    return pathlib.Path(path)


@contextlib.contextmanager
def staged_output(
    path: str | os.PathLike, *, fmt: str, overwrite: bool = False
) -> Iterator[pathlib.Path]:
    """Atomic output: yields a path in a fresh temporary sibling directory to write to.

    When the ``with`` block ends normally the written file or directory is fsynced,
    given the umask's file mode and renamed onto ``path``; if the block raises (or is
    interrupted) the temporary directory is removed and a previous ``path`` is intact.

    Args:
      path: the final output path.
      fmt: its format (``"orbax"`` outputs are directories, the others files).
      overwrite: allow replacing an existing ``path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false, or it is a file where
        a directory is due (or the reverse).
      FileNotFoundError: the parent directory is missing.
      PermissionError: the parent directory is not writable.

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> with staged_output(f"{d}/x.npz", fmt="npz") as tmp:
      ...     _ = tmp.write_bytes(b"data")
      >>> open(f"{d}/x.npz", "rb").read()
      b'data'
    """
    out = pathlib.Path(path)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {str(out)!r} already exists (pass overwrite to replace)")
        if out.is_dir() != (fmt == "orbax"):
            raise FileExistsError(
                f"output {str(out)!r} exists and is a {'directory' if out.is_dir() else 'file'}; "
                f"a {fmt} checkpoint cannot replace it"
            )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist")
    try:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except PermissionError:
        raise PermissionError(f"output directory {str(parent)!r} is not writable") from None
    try:
        staged = tmp / out.name
        yield staged
        _sync(staged)
        if staged.is_file():  # some writers (safetensors) create 0600 files: use the umask's mode
            staged.chmod(_default_file_mode(tmp))
        _move_into_place(staged, out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _sync_dir(parent)  # make the rename itself durable


# --- placing the finished output ---------------------------------------------------------


def _sync(p: pathlib.Path) -> None:
    """Flushes a written file (or a directory's files) to disk before the rename."""
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        _sync_dir(f)


def _sync_dir(folder: pathlib.Path) -> None:
    """fsync of one file or directory (for a directory: its entries, i.e. renames)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_file_mode(folder: pathlib.Path) -> int:
    """The permission bits a newly created file gets under the process umask."""
    probe = folder / ".mode-probe"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


def _move_into_place(staged: pathlib.Path, out: pathlib.Path, tmp: pathlib.Path) -> None:
    if staged.is_file() or not out.exists():
        os.replace(staged, out)  # atomic for files; for a new directory, a plain rename
        return
    backup = tmp / f"{out.name}.previous"
    os.rename(out, backup)
    try:
        os.rename(staged, out)
    except BaseException:
        os.rename(backup, out)
        raise


# --- formats -----------------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        if "/" in k or not k:
            raise ValueError(
                f"key {prefix + k!r} cannot be stored in a flat checkpoint (keys are joined "
                f"with '/', so they must be non-empty and hold no '/'); use orbax or msgpack"
            )
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}/"))
        else:
            flat[prefix + k] = v
    if not prefix and _NPZ_DTYPES in flat:
        raise ValueError(f"key {_NPZ_DTYPES!r} is reserved")
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"key {key!r} is both an array and a subtree")
        if leaf in node:
            raise CheckpointError(f"key {key!r} is both an array and a subtree")
        node[leaf] = v
    return tree


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Silences orbax's warnings and absl log lines (our errors say what went wrong)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl.setLevel(level)


def _read_orbax(p: pathlib.Path) -> dict:
    import jax

    ocp = _orbax()
    if not (p / "_METADATA").exists():
        inner = [c for c in p.iterdir() if c.is_dir() and (c / "_METADATA").exists()]
        if len(inner) != 1:
            raise CheckpointError(
                f"{str(p)!r} is not an orbax checkpoint directory (no _METADATA file)"
            )
        p = inner[0]
    with _quiet_orbax():
        ck = ocp.PyTreeCheckpointer()
        meta = ck.metadata(p.absolute()).item_metadata
        if meta is None:
            raise CheckpointError(
                f"cannot read {str(p)!r} as orbax: unreadable metadata (truncated or corrupt?)"
            )
        meta = meta.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = ck.restore(p.absolute(), args=ocp.args.PyTreeRestore(restore_args=args))
    return to_numpy_tree(tree)


def _write_orbax(tree: dict, p: pathlib.Path) -> None:
    if not _leaves(tree):
        raise ValueError("an orbax checkpoint cannot hold an empty tree (no arrays)")
    with _quiet_orbax():
        _orbax().PyTreeCheckpointer().save(p.absolute(), tree)


def _leaves(tree: Mapping) -> list:
    """The array leaves of a nested mapping, in order."""
    return [x for v in tree.values() for x in (_leaves(v) if isinstance(v, Mapping) else [v])]


def _read_msgpack(p: pathlib.Path) -> dict:
    from flax import serialization

    return to_numpy_tree(serialization.msgpack_restore(p.read_bytes()))


def _write_msgpack(tree: dict, p: pathlib.Path) -> None:
    from flax import serialization

    p.write_bytes(serialization.msgpack_serialize(tree))


def _read_safetensors(p: pathlib.Path) -> dict:
    from safetensors.numpy import load_file

    return _unflatten(load_file(p))


def _write_safetensors(tree: dict, p: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.require(v, requirements="C") for k, v in _flatten(tree).items()}, p)


def _read_npz(p: pathlib.Path) -> dict:
    with np.load(p, allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    dtypes = json.loads(str(flat.pop(_NPZ_DTYPES))) if _NPZ_DTYPES in flat else {}
    for k, name in dtypes.items():
        flat[k] = flat[k].view(_dtype(name))
    return _unflatten(flat)


def _write_npz(tree: dict, p: pathlib.Path) -> None:
    flat = _flatten(tree)
    # numpy stores extension dtypes (bfloat16, float8) as opaque void: record their names
    custom = {k: v.dtype.name for k, v in flat.items() if v.dtype.kind == "V"}
    if custom:
        flat = {**flat, _NPZ_DTYPES: np.array(json.dumps(custom))}
    with open(p, "wb") as f:
        np.savez(f, **flat)


def _dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "(no message)"


_READERS = {
    "orbax": _read_orbax,
    "msgpack": _read_msgpack,
    "safetensors": _read_safetensors,
    "npz": _read_npz,
}
_WRITERS = {
    "orbax": _write_orbax,
    "msgpack": _write_msgpack,
    "safetensors": _write_safetensors,
    "npz": _write_npz,
}
