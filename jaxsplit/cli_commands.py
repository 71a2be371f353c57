"""Built-in ``jaxsplit`` subcommands ``inspect`` and ``split``, and helpers shared with
``report`` (``jaxsplit.cli_report``); see ``jaxsplit.cli``."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
from typing import Any

from jaxsplit import io
from jaxsplit.cli import UI, Command, UsageError, add_json_flag

__all__ = [
    "cli_commands",
    "add_input_arguments",
    "add_split_options",
    "check_patterns",
    "load_checkpoint",
    "parse_threshold",
    "require_layers",
    "split_config",
    "table",
]

logger = logging.getLogger("jaxsplit")

_THRESHOLD_HELP = "T (absolute), rel:F (F x max|W|), sigma:K (K x std), pct:P (percentile)"


def cli_commands() -> list[Command]:
    """The built-in subcommands, in help order.

    Example:
      >>> [c.name for c in cli_commands()]
      ['inspect', 'split', 'report']
    """
    from jaxsplit import cli_report

    return [
        Command(name="inspect", help="per-layer weight statistics", **_INSPECT),
        Command(name="split", help="split layers into twin branches", **_SPLIT),
        cli_report.COMMAND,
    ]


# --- shared helpers ------------------------------------------------------------------------


def add_input_arguments(p: argparse.ArgumentParser, *, name: str = "CKPT") -> None:
    """Adds the checkpoint positional (``args.ckpt``) and ``--format`` to a parser.

    Args:
      p: the subcommand's parser.
      name: the positional's metavar in help and errors.

    Example:
      >>> p = argparse.ArgumentParser()
      >>> add_input_arguments(p)
      >>> vars(p.parse_args(["w.bin", "--format", "npz"]))
      {'ckpt': 'w.bin', 'format': 'npz'}
    """
    p.add_argument("ckpt", metavar=name, help="orbax directory or .msgpack/.safetensors/.npz")
    p.add_argument("--format", choices=io.FORMATS, help="input format (default: from the path)")


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
      jaxsplit.cli.UsageError: CKPT '/nonexistent.npz' does not exist
    """
    if not os.path.lexists(path):
        raise UsageError(f"{what} {path!r} does not exist")
    try:
        fmt = io.detect_format(path, fmt)
    except ValueError as e:
        raise UsageError(f"{what}: {e} (--format)") from None
    tree = io.load(path, fmt=fmt)
    logger.info("loaded %s (%s)", path, fmt)
    return tree


def require_layers(tree: dict, path: str) -> dict:
    """The layers of a loaded checkpoint (``find_layers``), which must hold at least one.

    Args:
      tree: the loaded tree.
      path: the checkpoint path, for the message.

    Returns:
      ``{path: Layer}``.

    Raises:
      ValueError: the tree holds no ``kernel``/``embedding`` array (exit 1).

    Example:
      >>> import numpy as np
      >>> list(require_layers({"params": {"d": {"kernel": np.ones((2, 2))}}}, "w.npz"))
      ['d']
    """
    from jaxsplit.select import find_layers

    layers = find_layers(tree)
    if not layers:
        raise ValueError(
            f"checkpoint {path!r} holds no layers (no 'kernel' or 'embedding' array under "
            f"{'params' if 'params' in tree else 'the root'})"
        )
    return layers


def table(ui: UI, title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Prints a rich table on ``ui.out``; cells are plain text (no markup), ``None`` is ``-``.

    Args:
      ui: the command's ``UI``.
      title: the table's title.
      columns: headers (text columns are left-aligned, numbers right-aligned).
      rows: one list of cells per row (floats are printed with 4 significant digits).

    Example:
      >>> import io as _io
      >>> from rich.console import Console
      >>> ui = UI(out=Console(file=_io.StringIO(), width=60), err=None)
      >>> table(ui, "t", ["path", "max"], [["a/[b]", 1.23456]])
      >>> "a/[b]" in ui.out.file.getvalue() and "1.235" in ui.out.file.getvalue()
      True
    """
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("path", "kind", "action", "reason") else "right")
    for r in rows:
        t.add_row(*(Text(_fmt(x)) for x in r))
    ui.out.print(t)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, tuple):
        return "x".join(map(str, x)) or "scalar"
    return str(x)


# --- inspect -------------------------------------------------------------------------------


def _inspect_args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--top", type=int, default=5, help="how many layers to recommend (default 5)")
    add_json_flag(p)


def _inspect_run(args: argparse.Namespace, ui: UI) -> int:
    from jaxsplit.stats import layer_stats, rank_by_outliers

    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    tree = load_checkpoint(args.ckpt, args.format)
    require_layers(tree, args.ckpt)
    rows = layer_stats(tree)
    ranked = [r for r in rank_by_outliers(rows) if r.max_over_std is not None][: args.top]
    for r in rows:
        logger.info("%s: %s %s max|w|=%s max/std=%s", r.path, r.kind, r.dtype, r.max_abs,
                    r.max_over_std)  # fmt: skip
    if ui.json:
        ui.print_json(
            {
                "checkpoint": args.ckpt,
                "layers": [r.to_dict() for r in rows],
                "split_candidates": [r.path for r in ranked],
            }
        )
        return 0
    cols = ["path", "kind", "shape", "dtype", "max|w|", "std", "max/std", "kurtosis", "nonfinite"]
    table(ui, f"{args.ckpt}: {len(rows)} layers", cols, [list(r) for r in rows])
    if ranked:
        table(
            ui,
            "Split candidates (max/std, largest first)",
            ["rank", "path", "max/std", "kurtosis"],
            [[i + 1, r.path, r.max_over_std, r.kurtosis] for i, r in enumerate(ranked)],
        )
    return 0


_INSPECT = {"add_arguments": _inspect_args, "run": _inspect_run}


# --- split ---------------------------------------------------------------------------------


def parse_threshold(text: str):
    """``T``, ``rel:F``, ``sigma:K`` or ``pct:P`` as a threshold spec.

    Raises:
      UsageError: unknown prefix, not a number, or a value the spec rejects.

    Example:
      >>> parse_threshold("sigma:3"), parse_threshold("0.5")
      (Sigma(k=3.0), 0.5)
    """
    from jaxsplit.config import Percentile, Relative, Sigma, check_real

    kinds = {"rel": Relative, "sigma": Sigma, "pct": Percentile}
    prefix, sep, number = text.rpartition(":")
    if sep and prefix not in kinds:
        raise UsageError(f"--threshold {text!r}: unknown kind {prefix!r}; use {_THRESHOLD_HELP}")
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"--threshold {text!r} is not a number; use {_THRESHOLD_HELP}") from None
    try:
        return kinds[prefix](value) if sep else check_real("SplitConfig", "threshold", value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--threshold {text!r}: {e}") from None


def add_split_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """Adds ``--layers --threshold --method --seed --allow-nonfinite`` (see ``split_config``).

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
    p.add_argument("--threshold", required=required, help=_THRESHOLD_HELP)
    p.add_argument("--method", default="balance", help="balance (default) or random")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random (default 0)")
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="keep NaN/inf weights on branch_0"
    )


def _split_args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("out", metavar="OUT", nargs="?", help="output path (not needed with --dry-run)")
    add_split_options(p, required=True)
    p.add_argument("--out-format", choices=io.FORMATS, help="output format (default: from OUT)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--dry-run", action="store_true", help="print what would split; write nothing")
    add_json_flag(p)


def split_config(args: argparse.Namespace):
    """The ``SplitConfig`` of ``add_split_options``' arguments (and ``-v``).

    Args:
      args: parsed arguments holding ``layers threshold method seed allow_nonfinite verbose``.

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
    from jaxsplit.config import SplitConfig

    if args.threshold is None:
        raise UsageError("--threshold is required with --layers")
    threshold = parse_threshold(args.threshold)
    try:
        return SplitConfig(
            layers=tuple(args.layers),
            threshold=threshold,
            method=args.method,
            seed=args.seed,
            allow_nonfinite=args.allow_nonfinite,
            verbose=args.verbose,
        )
    except (TypeError, ValueError) as e:
        flag = next((f for f in ("method", "seed", "layers") if f"SplitConfig.{f}" in str(e)), "")
        raise UsageError(f"--{flag}: {e}" if flag else str(e)) from None


def check_patterns(tree: dict, cfg, available: list[str]) -> None:
    """Checks that every ``--layers`` pattern matches a layer.

    Args:
      tree: the loaded tree.
      cfg: the ``SplitConfig``.
      available: every layer path, for the message.

    Raises:
      UsageError: a pattern matches nothing (exit 2); the message lists ``available``.

    Example:
      >>> import numpy as np
      >>> from jaxsplit.config import SplitConfig
      >>> check_patterns({"d": {"kernel": np.ones(2)}}, SplitConfig(layers=["e"]), ["d"])
      Traceback (most recent call last):
      ...
      jaxsplit.cli.UsageError: --layers pattern(s) ['e'] matched no layer; available: ['d']
    """
    from jaxsplit.select import select_layers

    unmatched = [k for k, v in select_layers(tree, cfg.layers)[1].items() if not v]
    if unmatched:
        raise UsageError(
            f"--layers pattern(s) {unmatched} matched no layer; available: {available}"
        )


def _check_output(args: argparse.Namespace) -> str | None:
    """Validates OUT before any work; returns its format (``None`` for a dry run)."""
    if args.dry_run:
        return None
    if args.out is None:
        raise UsageError("OUT is required (or pass --dry-run)")
    out, src = pathlib.Path(args.out), pathlib.Path(args.ckpt)
    if out.absolute() == src.absolute() or (out.exists() and src.exists() and out.samefile(src)):
        raise UsageError(f"OUT {args.out!r} is the input checkpoint; choose another path")
    try:
        fmt = io.detect_format(out, args.out_format)
    except ValueError as e:
        raise UsageError(f"OUT: {e} (--out-format)") from None
    if os.path.lexists(out) and not args.overwrite:
        raise UsageError(f"OUT {args.out!r} already exists; pass --overwrite to replace it")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"OUT's directory {str(out.absolute().parent)!r} does not exist")
    return fmt


def _split_run(args: argparse.Namespace, ui: UI) -> int:
    from jaxsplit.transform import match_layers, split_with_report

    cfg = split_config(args)
    out_fmt = _check_output(args)
    tree = load_checkpoint(args.ckpt, args.format)
    available = list(require_layers(tree, args.ckpt))
    check_patterns(tree, cfg, available)
    if args.dry_run:
        report = match_layers(tree, cfg)
    else:
        with ui.progress(f"splitting {len(available)} layers"):
            tree2, report = split_with_report(tree, cfg)
        with ui.progress(f"saving {args.out}"):
            io.save(tree2, args.out, fmt=out_fmt, overwrite=args.overwrite)
    _print_split(args, ui, cfg, report, out_fmt)
    return 0


def _print_split(args, ui: UI, cfg, report, out_fmt) -> None:
    written = None if args.dry_run else args.out
    if ui.json:
        ui.print_json(
            {
                "checkpoint": args.ckpt,
                "output": written,
                "output_format": out_fmt,
                "dry_run": args.dry_run,
                "config": {
                    "layers": list(cfg.layers),
                    "threshold": args.threshold,
                    "method": cfg.method,
                    "seed": cfg.seed,
                },
                **report.to_dict(),
            }
        )
    else:
        _split_table(args, ui, report)
    ui.note(f"wrote {written} ({out_fmt})" if written else "dry run: nothing written")


def _split_table(args, ui: UI, report) -> None:
    rows = [
        [p.path, p.action, p.n_split, p.n_total, p.threshold, p.dtype, p.reason]
        for p in report.layers
    ]
    cols = ["path", "action", "split", "of", "threshold", "dtype", "reason"]
    verb = "would split" if args.dry_run else "split"
    title = f"{verb} {len(report.split_paths)} of {len(report.layers)} matched layers"
    table(ui, title, cols, rows)


_SPLIT = {"add_arguments": _split_args, "run": _split_run}
