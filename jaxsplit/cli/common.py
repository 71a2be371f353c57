"""Arguments and checks shared by the subcommands: inputs, split options, ``QuantSpec``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os

import numpy as np

from jaxsplit import io, stream
from jaxsplit.cli.ui import UsageError
from jaxsplit.config import Auto, SplitConfig
from jaxsplit.errors import ConfigError, ConfigTypeError, UnmatchedPatternError
from jaxsplit.quant import QuantSpec
from jaxsplit.select import select_layers
from jaxsplit.thresholds import SYNTAX, parse
from jaxsplit.tree import WEIGHT_NAMES, find_layers

__all__ = [
    "add_input_arguments",
    "weights",
    "load_checkpoint",
    "require_layers",
    "input_format",
    "unmatched_usage",
    "parse_threshold",
    "add_split_options",
    "split_config",
    "check_patterns",
    "add_quant_options",
    "quant_spec",
    "load_calibration",
    "load_sensitivity",
    "check_sensitivity_budget",
    "twin_spec",
]

logger = logging.getLogger("jaxsplit")

#: ``SplitConfig`` fields and the flags that set them, for error messages.
FLAGS = {
    "layers": "--layers",
    "threshold": "--threshold",
    "method": "--method",
    "seed": "--seed",
    "branches": "--branches",
    "spec": "--bits",
    "text": "--threshold",
    "max_extra": "--budget",
    "candidates": "--candidates",
    "scope": "--budget",
    "twin_spec": "--twin-bits",
}
#: ``QuantSpec`` fields and their flags.
QUANT_FLAGS = {
    "bits": "--bits",
    "granularity": "--per-channel",
    "group_size": "--group-size",
    "axis": "--axis",
    "symmetric": "--asymmetric",
    "narrow_range": "--full-range",
}


def add_input_arguments(p: argparse.ArgumentParser, *, name: str = "CKPT") -> None:
    """Adds the checkpoint positional (``args.ckpt``), ``--format`` and ``--weights``.

    Args:
      p: the subcommand's parser.
      name: the positional's metavar in help and errors.

    Example:
      >>> p = argparse.ArgumentParser()
      >>> add_input_arguments(p)
      >>> vars(p.parse_args(["w.bin", "--format", "npz", "--weights", "w,linear"]))
      {'ckpt': 'w.bin', 'format': 'npz', 'weights': 'w,linear'}
    """
    p.add_argument("ckpt", metavar=name, help="orbax directory or .msgpack/.safetensors/.npz")
    p.add_argument("--format", choices=io.FORMATS, help="input format (default: from the path)")
    p.add_argument(
        "--weights", metavar="NAMES",
        help="comma-separated leaf names that are weights (default kernel,embedding; "
        "e.g. kernel,w,gating_einsum,linear,input_embedding for Gemma)",
    )  # fmt: skip


def weights(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--weights`` leaf names (``tree.WEIGHT_NAMES`` when not given).

    Raises:
      UsageError: an empty name (``--weights w,,x``).

    Example:
      >>> weights(argparse.Namespace(weights="w, gating_einsum"))
      ('w', 'gating_einsum')
      >>> weights(argparse.Namespace(weights=None))
      ('kernel', 'embedding')
    """
    text = getattr(args, "weights", None)
    if text is None:
        return WEIGHT_NAMES
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise UsageError(f"--weights must be comma-separated leaf names, got {text!r}")
    return names


def load_checkpoint(path: str, fmt: str | None, what: str = "CKPT") -> dict:
    """Loads a checkpoint for a command (``io.load``).

    Args:
      path: the checkpoint path as typed.
      fmt: ``--format`` (``None``: from the path).
      what: the argument's name in messages (``CKPT``, ``SPLIT_CKPT``).

    Returns:
      The tree, a nested dict of numpy arrays.

    Raises:
      UsageError: the path does not exist or its format cannot be told (exit 2).
      OSError, io.CheckpointError: unreadable, truncated or corrupt (exit 1).

    Example:
      >>> load_checkpoint("/nonexistent.npz", None)
      Traceback (most recent call last):
      ...
      jaxsplit.cli.ui.UsageError: CKPT '/nonexistent.npz' does not exist
    """
    fmt = input_format(path, fmt, what)
    tree = io.load(path, fmt=fmt)
    logger.info("loaded %s (%s)", path, fmt)
    return tree


@contextlib.contextmanager
def open_input(path: str, fmt: str | None, names=WEIGHT_NAMES, what: str = "CKPT"):
    """Opens an input checkpoint layer by layer for a command (``stream.open_layers``):
    only its header is read; it must hold at least one layer.

    Raises:
      UsageError: the path does not exist or its format cannot be told (exit 2).
      ValueError: it holds no layers; OSError, io.CheckpointError: unreadable (exit 1).

    Example:
      >>> import numpy as np, tempfile
      >>> f = io.save({"d": {"kernel": np.ones(2)}}, f"{tempfile.mkdtemp()}/w.npz")
      >>> with open_input(str(f), None) as src:
      ...     list(src.layers)
      ['d']
    """
    with stream.open_layers(path, fmt=input_format(path, fmt, what), weights=names) as src:
        require_layers(src.skel, path, names)
        logger.info("opened %s (%s), %d layers", path, src.reader.fmt, len(src.layers))
        yield src


def input_format(path: str, fmt: str | None, what: str = "CKPT") -> str:
    """The format of an input checkpoint that must exist (``io.detect_format``).

    Raises:
      UsageError: the path does not exist or its format cannot be told (exit 2).

    Example:
      >>> input_format("/nonexistent.npz", None)
      Traceback (most recent call last):
      ...
      jaxsplit.cli.ui.UsageError: CKPT '/nonexistent.npz' does not exist
    """
    if not os.path.lexists(path):
        raise UsageError(f"{what} {path!r} does not exist")
    try:
        return io.detect_format(path, fmt)
    except ValueError as e:
        raise UsageError(f"{what}: {e} (--format)") from None


def unmatched_usage(e: UnmatchedPatternError, path: str) -> Exception:
    """The command-line error for an unmatched ``--layers`` pattern: ``UsageError`` (exit
    2) listing the available paths, or, for a checkpoint without layers, a ``ValueError``
    (exit 1) saying so.

    Example:
      >>> str(unmatched_usage(UnmatchedPatternError(["x"], ["d"]), "w.npz"))
      "--layers pattern(s) ['x'] matched no layer; available: ['d']"
    """
    if not e.available:
        return ValueError(
            f"checkpoint {path!r} holds no layers (no 'kernel' or 'embedding' array; name "
            f"its weights with --weights)"
        )
    return UsageError(
        f"--layers pattern(s) {list(e.patterns)} matched no layer; available: {list(e.available)}"
    )


def require_layers(tree: dict, path: str, names: tuple[str, ...] = WEIGHT_NAMES) -> dict:
    """The layers of a loaded checkpoint (``find_layers``), which must hold at least one.

    Args:
      tree: the loaded tree.
      path: the checkpoint path, for the message.
      names: the ``--weights`` leaf names.

    Returns:
      ``{path: Layer}``.

    Raises:
      ValueError: the tree holds no ``kernel``/``embedding`` array (exit 1).

    Example:
      >>> import numpy as np
      >>> list(require_layers({"params": {"d": {"kernel": np.ones((2, 2))}}}, "w.npz"))
      ['d']
    """
    layers = find_layers(tree, names)
    if not layers:
        raise ValueError(
            f"checkpoint {path!r} holds no layers (no {'/'.join(names)} array under "
            f"{'params' if 'params' in tree else 'the root'}; name its weights with --weights)"
        )
    return layers


def parse_threshold(text: str, flag: str = "--threshold"):
    """``T``, ``rel:F``, ``sigma:K`` or ``pct:P`` (``/ch``: per channel) as a threshold object.

    Raises:
      UsageError: unknown prefix, not a number, or a value the threshold rejects.

    Example:
      >>> parse_threshold("sigma:3"), parse_threshold("rel:0.5/ch")
      (Sigma(k=3.0), Relative(fraction=0.5, per_channel=True))
    """
    try:
        return parse(text)
    except (ConfigError, ConfigTypeError) as e:
        raise UsageError(f"{flag} {e}") from None


def add_split_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """Adds ``--layers --threshold --method --branches --seed --allow-nonfinite`` and the
    ``--threshold auto`` options ``--budget --layer-budget --candidates --twin-bits
    --calibration`` (see ``split_config``).

    Args:
      p: the subcommand's parser.
      required: whether ``--layers`` and ``--threshold`` must be given.

    Example:
      >>> p = argparse.ArgumentParser()
      >>> add_split_options(p, required=False)
      >>> p.parse_args(["--layers", "a", "b/*"]).layers
      ['a', 'b/*']
    """
    p.add_argument(
        "--layers", nargs="+", required=required, metavar="PATTERN",
        help="layer paths, globs (block_*/Conv_0, ** crosses /) or re:REGEX",
    )  # fmt: skip
    p.add_argument("--threshold", required=required, help=f"{SYNTAX}, or auto (searched)")
    p.add_argument(
        "--method", default=None,
        help="balance (default), random, clip, grid, residual, snap, compensate (the last four use "
        "--bits), or auto (the default with --threshold auto: the best per layer)",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=float, default=None, metavar="F",
        help="--threshold auto: at most F x (selected parameters) extra non-zeros over the "
        "whole tree (Auto scope='tree'); default: no budget",
    )  # fmt: skip
    p.add_argument(
        "--layer-budget", type=float, default=None, metavar="F",
        help="--threshold auto: at most F extra non-zeros per layer (scope='layer')",
    )  # fmt: skip
    p.add_argument("--candidates", type=int, default=64, help="--threshold auto: per method")
    p.add_argument(
        "--twin-bits", type=int, default=None, metavar="B",
        help="--threshold auto: quantize the sparse twins with B bits (mixed precision)",
    )  # fmt: skip
    p.add_argument(
        "--calibration", metavar="FILE", default=None,
        help="--threshold auto: .npz/.safetensors of input second moments keyed by layer path "
        "((d_in,) or (d_in, d_in)); scores candidates by expected output error",
    )  # fmt: skip
    p.add_argument(
        "--sensitivity", metavar="FILE", default=None,
        help="--budget: JSON {layer path: weight >= 0} (js.sensitivity) weighting the "
        "tree-wide allocation by each layer's end-to-end sensitivity",
    )  # fmt: skip
    p.add_argument("--branches", type=int, default=2, help="2 (default), 4 or 8 (balance only)")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random (default 0)")
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="keep NaN/inf weights on branch_0"
    )


def split_config(args: argparse.Namespace, spec: QuantSpec | None = None):
    """The ``SplitConfig`` of ``add_split_options``' arguments (and ``-v``).

    Args:
      args: parsed arguments holding ``layers threshold method seed allow_nonfinite verbose``
        (and ``branches`` where the command has it).
      spec: the branches' ``QuantSpec`` (``grid``/``residual`` need one).

    Returns:
      A validated ``SplitConfig``.

    Raises:
      UsageError: a missing threshold, or a value ``SplitConfig`` rejects (the message
        names the flag).

    Example:
      >>> ns = argparse.Namespace(layers=["d"], threshold="rel:0.5", method="random", seed=1,
      ...                         allow_nonfinite=False, verbose=False)
      >>> split_config(ns).threshold
      Relative(fraction=0.5)
    """
    if args.threshold is None:
        raise UsageError("--threshold is required with --layers")
    budget, layer_budget = getattr(args, "budget", None), getattr(args, "layer_budget", None)
    if args.threshold == "auto":
        if spec is None:
            raise UsageError("--threshold auto needs --bits")
        if budget is not None and layer_budget is not None:
            raise UsageError("give --budget (tree-wide) or --layer-budget, not both")
        check_sensitivity_budget(args, tree_budget=budget is not None)
        try:
            threshold = Auto(
                spec,
                candidates=getattr(args, "candidates", 64),
                max_extra=budget if budget is not None else layer_budget,
                scope="tree" if budget is not None else "layer",
                twin_spec=twin_spec(args, spec),
            )
        except (ConfigError, ConfigTypeError) as e:
            raise UsageError(f"{FLAGS.get(e.field, '--threshold auto')}: {e}") from None
    else:
        for flag, v in (("--budget", budget), ("--layer-budget", layer_budget),
                        ("--calibration", getattr(args, "calibration", None)),
                        ("--sensitivity", getattr(args, "sensitivity", None)),
                        ("--twin-bits", getattr(args, "twin_bits", None))):  # fmt: skip
            if v is not None:
                raise UsageError(f"{flag} needs --threshold auto, got --threshold {args.threshold}")
        threshold = parse_threshold(args.threshold)
    try:
        method = {} if args.method is None else {"method": args.method}
        return SplitConfig(
            layers=tuple(args.layers),
            threshold=threshold,
            **method,
            branches=getattr(args, "branches", 2),
            spec=None if isinstance(threshold, Auto) else spec,
            seed=args.seed,
            allow_nonfinite=args.allow_nonfinite,
            verbose=args.verbose,
            weights=weights(args),
        )
    except (ConfigError, ConfigTypeError) as e:
        flag = FLAGS.get(e.field)
        raise UsageError(f"{flag}: {e}" if flag else str(e)) from None


def check_patterns(tree: dict, cfg, available: list[str]) -> None:
    """Checks that every ``--layers`` pattern matches a layer.

    Raises:
      UsageError: a pattern matches nothing (exit 2); the message lists ``available``.

    Example:
      >>> import numpy as np
      >>> check_patterns({"d": {"kernel": np.ones(2)}}, SplitConfig(layers=["e"]), ["d"])
      Traceback (most recent call last):
      ...
      jaxsplit.cli.ui.UsageError: --layers pattern(s) ['e'] matched no layer; available: ['d']
    """
    unmatched = [k for k, v in select_layers(tree, cfg.layers, cfg.weights)[1].items() if not v]
    if unmatched:
        raise UsageError(
            f"--layers pattern(s) {unmatched} matched no layer; available: {available}"
        )


def add_quant_options(
    p: argparse.ArgumentParser, *, many_bits: bool = False, bits_default: int | None = 8
) -> None:
    """Adds ``--bits`` (one, or several with ``many_bits``), ``--per-channel``,
    ``--group-size``, ``--axis``, ``--asymmetric`` and ``--full-range``: every ``QuantSpec``
    option. ``bits_default=None`` makes ``--bits`` optional (``args.bits is None`` when not
    given).

    Example:
      >>> p = argparse.ArgumentParser()
      >>> add_quant_options(p)
      >>> quant_spec(p.parse_args(["--bits", "4", "--per-channel"])).granularity
      'per_channel'
    """
    if many_bits:
        p.add_argument("--bits", nargs="+", type=int, default=[8], metavar="B",
                       help="bit widths (default 8)")  # fmt: skip
    else:
        p.add_argument(
            "--bits", type=int, default=bits_default,
            help="integer bit width" + (f" (default {bits_default})" if bits_default else ""),
        )  # fmt: skip
    p.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    p.add_argument(
        "--group-size", type=int, metavar="G",
        help="one scale per G consecutive inputs of each output channel (per group)",
    )  # fmt: skip
    p.add_argument("--axis", type=int, default=-1, help="channel axis (default -1, the last)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric (zero point)")
    p.add_argument("--full-range", action="store_true", help="use -2^(b-1) too (not narrow)")


def quant_spec(args: argparse.Namespace, bits: int | None = None) -> QuantSpec:
    """The ``QuantSpec`` of ``add_quant_options``' flags; bad values are ``UsageError``.

    Args:
      args: parsed arguments (``bits``, ``per_channel`` and, where present, ``axis``,
        ``asymmetric``, ``full_range``).
      bits: overrides ``args.bits`` (one entry of a ``--bits`` list).

    Example:
      >>> quant_spec(argparse.Namespace(bits=4, per_channel=True)).granularity
      'per_channel'
    """
    group = getattr(args, "group_size", None)
    if group is not None and args.per_channel:
        raise UsageError("give --per-channel or --group-size, not both")
    granularity = "per_channel" if args.per_channel else "per_tensor"
    try:
        return QuantSpec(
            bits=args.bits if bits is None else bits,
            granularity="per_group" if group is not None else granularity,
            group_size=group,
            axis=getattr(args, "axis", -1),
            symmetric=not getattr(args, "asymmetric", False),
            narrow_range=not getattr(args, "full_range", False),
        )
    except (ConfigError, ConfigTypeError) as e:
        raise UsageError(f"{QUANT_FLAGS.get(e.field, '--bits')}: {e}") from None


def twin_spec(args: argparse.Namespace, spec: QuantSpec) -> QuantSpec | None:
    """The twins' ``QuantSpec`` of ``--twin-bits`` (``spec`` with other bits), or ``None``.

    Example:
      >>> twin_spec(argparse.Namespace(twin_bits=8), QuantSpec(bits=4)).bits
      8
    """
    b = getattr(args, "twin_bits", None)
    if b is None:
        return None
    try:
        return dataclasses.replace(spec, bits=b)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--twin-bits: {e}") from None


def load_calibration(path: str | None) -> dict | None:
    """``--calibration FILE``: ``{layer path: array}`` from a ``.npz`` or ``.safetensors``.

    Keys are layer paths (``block/Dense_0``); the shapes are checked against the layers
    by ``split_params`` (``errors.CalibrationError``, exit 1).

    Raises:
      UsageError: no such file, or not ``.npz`` / ``.safetensors``.

    Example:
      >>> import numpy as np, tempfile, os
      >>> f = os.path.join(tempfile.mkdtemp(), "c.npz")
      >>> np.savez(f, **{"b/Dense_0": np.ones(3)})
      >>> {k: v.shape for k, v in load_calibration(f).items()}
      {'b/Dense_0': (3,)}
    """
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UsageError(f"--calibration: no such file {path!r}")
    if path.endswith(".npz"):
        with np.load(path) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    raise UsageError(f"--calibration: {path!r} must be a .npz or .safetensors file")


def check_sensitivity_budget(
    args: argparse.Namespace, *, tree_budget: bool, needs: str = "--budget F"
) -> None:
    """``--sensitivity`` weights the tree-wide budget: raises if it is given without one.

    Args:
      args: parsed arguments (``sensitivity`` absent counts as not given).
      tree_budget: whether the command searches under a tree-wide budget.
      needs: the flags the message says are missing (``sweep``: ``"auto and --budget F"``).

    Raises:
      UsageError: ``--sensitivity`` without ``tree_budget``.

    Example:
      >>> check_sensitivity_budget(argparse.Namespace(sensitivity="s.json"), tree_budget=True)
      >>> check_sensitivity_budget(argparse.Namespace(sensitivity="s.json"), tree_budget=False)
      Traceback (most recent call last):
      ...
      jaxsplit.cli.ui.UsageError: --sensitivity weights the tree-wide budget: it needs --budget F
    """
    if getattr(args, "sensitivity", None) is not None and not tree_budget:
        raise UsageError(f"--sensitivity weights the tree-wide budget: it needs {needs}")


def load_sensitivity(path: str | None) -> dict | None:
    """``--sensitivity FILE``: ``{layer path: weight}`` from a JSON object.

    Write it with ``json.dump(js.sensitivity(...), f)``. The paths are checked against
    the layers by ``split_params`` (``errors.CalibrationError``, exit 1).

    Raises:
      UsageError: no such file, not JSON, or not an object of numbers.

    Example:
      >>> import json, tempfile, os
      >>> f = os.path.join(tempfile.mkdtemp(), "s.json")
      >>> with open(f, "w") as fh:
      ...     json.dump({"b/Dense_0": 0.5}, fh)
      >>> load_sensitivity(f)
      {'b/Dense_0': 0.5}
    """
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UsageError(f"--sensitivity: no such file {path!r}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--sensitivity: {path!r} is not JSON ({e})") from None
    bad = (
        not isinstance(data, dict)
        or not data
        or any(isinstance(v, bool) or not isinstance(v, int | float) for v in data.values())
    )
    if bad:
        raise UsageError(
            f"--sensitivity: {path!r} must hold a non-empty JSON object {{layer path: number}}, "
            f"got {str(data)[:200]}"
        )
    return {str(k): float(v) for k, v in data.items()}
