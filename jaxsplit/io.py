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

from jaxsplit import host, sparse_io
from jaxsplit.sparse_io import DEFAULT_SPARSE_BELOW, SparseArray
from jaxsplit.tree import leaf_items, set_in, unwrap

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
#: The npz entry (a JSON string ``{key: dtype name}``) naming extension dtypes (bfloat16).
NPZ_DTYPES_KEY = _NPZ_DTYPES


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


# --- reading one tensor at a time ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """How one logical tensor is stored (``stored_info`` / ``CheckpointReader.tensors``).

    Attributes:
      path: ``/``-joined keys of the (dense) leaf, ``params/Dense_0/branch_1/kernel``.
      shape: the dense shape.
      dtype: the dense dtype name (``bfloat16``).
      form: ``"dense"`` or ``"sparse"`` (a sparse record).
      nnz: stored non-zero bit patterns (``None`` for a dense tensor not counted).
      density: ``nnz / size`` (``None`` when ``nnz`` is).
      nbytes: bytes of the stored data (sparse: indices + values + shape).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    form: str
    nnz: int | None
    density: float | None
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CheckpointReader:
    """Random access to a checkpoint's tensors, one at a time (see ``open_checkpoint``).

    Attributes:
      path: the checkpoint.
      fmt: its format.
      streamed: ``False`` for msgpack, which can only be read whole (it is, on open).
      tensors: ``{keys: StoredTensor}`` of every logical leaf, in stored order
        (``nnz`` is known for sparse records only).
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None):
        p = pathlib.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        self.path, self.fmt = p, detect_format(p, fmt)
        if self.fmt != "orbax" and p.is_dir():
            raise CheckpointError(f"{str(path)!r} is a directory, not a {self.fmt} file")
        if not os.access(p, os.R_OK):
            raise PermissionError(f"checkpoint {str(path)!r} is not readable (permission denied)")
        self.streamed = self.fmt != "msgpack"
        self._raw: dict[tuple, tuple[tuple[int, ...], np.dtype]] = {}
        self._file: Any = None
        try:
            getattr(self, f"_open_{self.fmt}")()
            self.tensors = self._index()
        except (CheckpointError, PermissionError):
            self.close()
            raise
        except Exception as e:
            self.close()
            raise CheckpointError(
                f"cannot read {str(path)!r} as {self.fmt} (truncated or corrupt?): "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the underlying file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # formats: each fills self._raw {stored keys: (shape, dtype)} and provides _read_raw

    def _open_safetensors(self) -> None:
        f = self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"cannot read {str(self.path)!r} as safetensors: no header")
        n = int.from_bytes(head, "little")
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise CheckpointError(
                f"cannot read {str(self.path)!r} as safetensors (truncated or corrupt?): "
                f"header of {n} bytes in a {size}-byte file"
            )
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._data_start, self._offsets = 8 + n, {}
        end = 0
        for key, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dt, shape, (a, b) = (
                _SAFETENSORS_DTYPES[e["dtype"]],
                tuple(e["shape"]),
                e["data_offsets"],
            )
            if a != end or b - a != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise CheckpointError(f"tensor {key!r} has bad data_offsets {[a, b]}")
            end = b
            keys = tuple(key.split("/"))
            self._raw[keys], self._offsets[keys] = (shape, dt), (a, b)
        if self._data_start + end > size:
            raise CheckpointError(
                f"cannot read {str(self.path)!r} as safetensors (truncated or corrupt?): "
                f"data ends at byte {self._data_start + end} of {size}"
            )
        self._raw = dict(sorted(self._raw.items(), key=lambda kv: self._offsets[kv[0]]))

    def _read_safetensors(self, keys: tuple) -> np.ndarray:
        shape, dt = self._raw[keys]
        a, b = self._offsets[keys]
        return self._pread(keys, a, b - a).view(dt).reshape(shape)

    def _pread(self, keys: tuple, offset: int, n: int) -> np.ndarray:
        """``n`` bytes of tensor ``keys``'s data from ``offset`` of the data section, in a
        new aligned buffer (jax reads it in place)."""
        buf = host.empty_aligned((n,), np.uint8)
        if os.preadv(self._file.fileno(), [memoryview(buf)], self._data_start + offset) != n:
            raise CheckpointError(f"cannot read {str(self.path)!r}: tensor {keys} is truncated")
        return buf

    def flat_readable(self, keys: tuple) -> bool:
        """Whether ``read_flat`` can read ``keys`` in ranges (a dense safetensors tensor).

        Example:
          >>> import tempfile
          >>> p = save({"w": np.arange(6.0).reshape(2, 3)}, tempfile.mkdtemp() + "/c.safetensors")
          >>> with CheckpointReader(p) as r:
          ...     r.flat_readable(("w",)), r.read_flat(("w",), 2, 5).tolist()
          (True, [2.0, 3.0, 4.0])
        """
        keys = tuple(keys)
        return self.fmt == "safetensors" and self.tensors[keys].form == "dense"

    def read_flat(self, keys: tuple, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of a dense safetensors tensor in flat C order, as a
        new 1-D array (one read of those bytes; the rest of the tensor is never read).

        Raises:
          ValueError: ``flat_readable(keys)`` is false, or the range is not within the
            tensor (``0 <= start <= stop <= size``).
          CheckpointError: the file is truncated.
        """
        keys = tuple(keys)
        if not self.flat_readable(keys):
            raise ValueError(
                f"read_flat reads dense safetensors tensors; {'/'.join(keys)!r} is a "
                f"{self.tensors[keys].form} tensor of a {self.fmt} checkpoint"
            )
        shape, dt = self._raw[keys]
        size = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= stop <= size:
            raise ValueError(f"range [{start}, {stop}) is not within the {size} elements of {keys}")
        offset = self._offsets[keys][0] + start * dt.itemsize
        return self._pread(keys, offset, (stop - start) * dt.itemsize).view(dt)

    def _open_npz(self) -> None:
        self._file = np.load(self.path, allow_pickle=False)
        custom = {}
        if _NPZ_DTYPES in self._file.files:
            custom = json.loads(str(self._file[_NPZ_DTYPES]))
        for name in self._file.files:
            if name == _NPZ_DTYPES:
                continue
            with self._file.zip.open(f"{name}.npy") as f:
                fmt_ = np.lib.format
                version = fmt_.read_magic(f)
                read_header = (
                    fmt_.read_array_header_1_0 if version == (1, 0) else fmt_.read_array_header_2_0
                )
                shape, _, dt = read_header(f)
            self._raw[tuple(name.split("/"))] = (
                shape,
                _dtype(custom[name]) if name in custom else dt,
            )

    def _read_npz(self, keys: tuple) -> np.ndarray:
        a = self._file["/".join(keys)]
        dt = self._raw[keys][1]
        return a.view(dt) if a.dtype != dt else a

    def _open_msgpack(self) -> None:
        logger.info(
            "%s: msgpack checkpoints cannot be read one tensor at a time; loading it whole",
            self.path,
        )
        self._whole = dict(leaf_items(_read_msgpack(self.path)))
        self._raw = {k: (v.shape, v.dtype) for k, v in self._whole.items()}

    def _read_msgpack(self, keys: tuple) -> np.ndarray:
        return self._whole[keys]

    def _open_orbax(self) -> None:
        self._dir = _orbax_dir(self.path)
        with _quiet_orbax():
            meta = _orbax().PyTreeCheckpointer().metadata(self._dir.absolute()).item_metadata
        if meta is None:
            raise CheckpointError(
                f"cannot read {str(self.path)!r} as orbax: unreadable metadata (truncated or "
                f"corrupt?)"
            )
        for keys, m in leaf_items(meta.tree):
            self._raw[tuple(str(k) for k in keys)] = (tuple(m.shape), np.dtype(m.dtype))

    def _read_orbax_many(self, many: list[tuple]) -> dict[tuple, np.ndarray]:
        ocp = _orbax()
        item: dict = {}
        args: dict = {}
        for keys in many:
            shape, dt = self._raw[keys]
            set_in(item, keys, np.broadcast_to(np.zeros((), dt), shape))
            set_in(args, keys, ocp.RestoreArgs(restore_type=np.ndarray))
        with _quiet_orbax():
            tree = ocp.PyTreeCheckpointer().restore(
                self._dir.absolute(),
                args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
            )
        flat = dict(leaf_items(tree))
        return {keys: np.asarray(flat[keys]) for keys in many}

    def _read_raw(self, many: list[tuple]) -> dict[tuple, np.ndarray]:
        for keys in many:
            if keys not in self._raw:
                raise KeyError(f"checkpoint {str(self.path)!r} holds no tensor {'/'.join(keys)!r}")
        if self.fmt == "orbax":
            return self._read_orbax_many(many)
        return {keys: getattr(self, f"_read_{self.fmt}")(keys) for keys in many}

    # logical tensors (sparse records are one tensor)

    def _index(self) -> dict[tuple, StoredTensor]:
        out: dict[tuple, StoredTensor] = {}
        self._parts: dict[tuple, tuple[tuple, ...]] = {}
        for keys, (shape, dt) in self._raw.items():
            if len(keys) >= 2 and keys[-2] == sparse_io.SPARSE_KEY:
                base = keys[:-2]
                if base in out:
                    continue
                parts = tuple(
                    (*base, sparse_io.SPARSE_KEY, n) for n in ("indices", "values", "shape")
                )
                if any(q not in self._raw for q in parts):
                    raise CheckpointError(
                        f"sparse record {'/'.join(base)!r} lacks one of indices/values/shape"
                    )
                (nnz,), vdt = self._raw[parts[0]][0], self._raw[parts[1]][1]
                dims = tuple(int(d) for d in self._read_raw([parts[2]])[parts[2]])
                size = int(np.prod(dims, dtype=np.int64))
                nbytes = sum(
                    int(np.prod(self._raw[q][0])) * self._raw[q][1].itemsize for q in parts
                )
                out[base] = StoredTensor(
                    "/".join(base),
                    dims,
                    vdt.name,
                    "sparse",
                    nnz,
                    nnz / size if size else 0.0,
                    nbytes,
                )
                self._parts[base] = parts
            else:
                size = int(np.prod(shape, dtype=np.int64))
                out[keys] = StoredTensor(
                    "/".join(keys), tuple(shape), dt.name, "dense", None, None, size * dt.itemsize
                )
                self._parts[keys] = (keys,)
        return out

    def read_stored(self, keys: tuple) -> np.ndarray | SparseArray:
        """The tensor at ``keys`` as stored: an array, or a ``SparseArray`` record."""
        return self.read_many([keys], dense=False)[tuple(keys)]

    def read(self, keys: tuple) -> np.ndarray:
        """The dense tensor at ``keys`` (a sparse record is densified, bit for bit)."""
        return self.read_many([keys])[tuple(keys)]

    def read_many(self, many: list[tuple], dense: bool = True) -> dict[tuple, Any]:
        """Several tensors in one go (one orbax restore call): ``{keys: array}``.

        Raises:
          KeyError: a key is not a tensor of the checkpoint.
          CheckpointError: the data is truncated, corrupt or a malformed sparse record.
        """
        many = [tuple(k) for k in many]
        for keys in many:
            if keys not in self.tensors:
                raise KeyError(f"checkpoint {str(self.path)!r} holds no tensor {'/'.join(keys)!r}")
        try:
            raw = self._read_raw([q for k in many for q in self._parts[k]])
            out = {}
            for keys in many:
                if self.tensors[keys].form == "dense":
                    out[keys] = raw[keys]
                    continue
                i, v, sh = (raw[q] for q in self._parts[keys])
                rec = {sparse_io.SPARSE_KEY: {"indices": i, "values": v, "shape": sh}}
                s = sparse_io.record_from_tree(rec, "/".join(keys))
                out[keys] = s.todense() if dense else s
            return out
        except (CheckpointError, KeyError):
            raise
        except Exception as e:
            raise CheckpointError(
                f"cannot read {str(self.path)!r} as {self.fmt} (truncated or corrupt?): "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e


def open_checkpoint(path: str | os.PathLike, *, fmt: str | None = None) -> CheckpointReader:
    """Opens a checkpoint for reading one tensor at a time (use as a context manager).

    Only the header / metadata is read on open (msgpack: the whole file, with a logged
    warning). Tensors are keyed by their tuple of keys.

    Raises:
      FileNotFoundError, PermissionError, ValueError, CheckpointError: as ``load``.

    Example:
      >>> import tempfile, numpy as np
      >>> out = save({"d": {"kernel": np.eye(2, dtype=np.float32)}}, f"{tempfile.mkdtemp()}/w.npz")
      >>> with open_checkpoint(out) as r:
      ...     list(r.tensors), r.read(("d", "kernel")).tolist()
      ([('d', 'kernel')], [[1.0, 0.0], [0.0, 1.0]])
    """
    return CheckpointReader(path, fmt)


def stored_info(
    path: str | os.PathLike, *, fmt: str | None = None, count: bool = True
) -> list[StoredTensor]:
    """How each tensor of a checkpoint is stored: shape, dtype, dense/sparse, density, bytes.

    Args:
      path: a checkpoint (as for ``load``).
      fmt: format override.
      count: also count the non-zeros of dense tensors (reads them one at a time);
        ``False`` reads only headers, and dense tensors get ``nnz=density=None``.

    Returns:
      One ``StoredTensor`` per logical leaf, in stored order.

    Raises:
      FileNotFoundError, PermissionError, ValueError, CheckpointError: as ``load``.

    Example:
      >>> import tempfile, numpy as np
      >>> w = np.zeros((10, 10), np.float32); w[0, :3] = 2.0
      >>> t = {"d": {"branch_0": {"kernel": np.ones((10, 10), np.float32)},
      ...            "branch_1": {"kernel": w}}}
      >>> out = save(t, f"{tempfile.mkdtemp()}/w.safetensors")
      >>> sorted((s.path, s.form, s.density, s.nbytes) for s in stored_info(out))
      [('d/branch_0/kernel', 'dense', 1.0, 400), ('d/branch_1/kernel', 'sparse', 0.03, 40)]
    """
    with open_checkpoint(path, fmt=fmt) as r:
        out = []
        for keys, t in r.tensors.items():
            if count and t.form == "dense":
                a = r.read(keys)
                nnz = int(np.count_nonzero(a.reshape(-1).view(f"u{a.dtype.itemsize}")))
                size = int(np.prod(t.shape, dtype=np.int64))
                t = dataclasses.replace(t, nnz=nnz, density=nnz / size if size else 0.0)
            out.append(t)
        return out


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


def _orbax_dir(p: pathlib.Path) -> pathlib.Path:
    """``p``, or the one orbax checkpoint directory inside it (``step/default``)."""
    if not (p / "_METADATA").exists():
        inner = [c for c in p.iterdir() if c.is_dir() and (c / "_METADATA").exists()]
        if len(inner) != 1:
            raise CheckpointError(
                f"{str(p)!r} is not an orbax checkpoint directory (no _METADATA file)"
            )
        p = inner[0]
    return p


def _read_orbax(p: pathlib.Path) -> dict:
    import jax

    ocp = _orbax()
    p = _orbax_dir(p)
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


def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    d = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
         "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
         "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
         "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}  # fmt: skip
    return {k: np.dtype(v) for k, v in d.items()}


_SAFETENSORS_DTYPES = _safetensors_dtypes()
#: numpy dtype -> safetensors dtype string (for the streamed writer).
SAFETENSORS_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


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
