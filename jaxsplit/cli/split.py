"""``jaxsplit split``: split a checkpoint's layers into twin branches (or ``--dry-run``).

Streamed (``jaxsplit.stream``): one layer in memory at a time, the output written
incrementally and atomically; sparse twins are stored as indices + values. A tree-wide
``--budget`` reads the input twice (curves, then splits); ``--calibration`` streams too."""

from __future__ import annotations

import argparse
import os
import pathlib

from jaxsplit import io, stream
from jaxsplit.cli.common import (
    add_input_arguments,
    add_quant_options,
    add_split_options,
    input_format,
    load_calibration,
    load_sensitivity,
    quant_spec,
    split_config,
    unmatched_usage,
    weights,
)
from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag, table
from jaxsplit.errors import UnmatchedPatternError

__all__ = ["COMMAND"]


def _split_args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("out", metavar="OUT", nargs="?", help="output path (not needed with --dry-run)")
    add_split_options(p, required=True)
    add_quant_options(p)
    p.add_argument("--out-format", choices=io.FORMATS, help="output format (default: from OUT)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--sparse-below", type=float, default=0.25, metavar="D",
        help="store twins denser than nothing but sparser than D as indices + values "
        "(default 0.25; 0 stores every twin dense)",
    )  # fmt: skip
    p.add_argument(
        "--block-mb", type=_block_mb, default=stream.DEFAULT_BLOCK_BYTES >> 20, metavar="M",
        help="split balance/clip kernels bigger than M MiB (safetensors to safetensors) in "
        "blocks of M MiB: the memory then does not grow with the kernel (default "
        f"{stream.DEFAULT_BLOCK_BYTES >> 20}; 0 reads every layer whole)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print what would split; write nothing")
    add_json_flag(p)


def _block_mb(text: str) -> int:
    """``--block-mb``: a non-negative whole number of MiB."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of MiB >= 0, got {text!r}")
    return n


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
    cfg = split_config(args, quant_spec(args))
    out_fmt = _check_output(args)
    calibration = load_calibration(args.calibration)
    sensitivity = load_sensitivity(args.sensitivity)
    fmt = input_format(args.ckpt, args.format)
    try:
        if args.dry_run:
            with ui.progress(f"planning {args.ckpt}") as advance:
                report = stream.plan_checkpoint(
                    args.ckpt, cfg, fmt=fmt, calibration=calibration, sensitivity=sensitivity,
                    progress=lambda done, total, path: advance(
                        completed=done, total=total, description=path
                    ),
                )  # fmt: skip
        else:
            with ui.progress(f"splitting {args.ckpt}") as advance:
                report = stream.split_checkpoint(
                    args.ckpt,
                    args.out,
                    cfg,
                    fmt=fmt,
                    out_fmt=out_fmt,
                    overwrite=args.overwrite,
                    sparse_below=args.sparse_below,
                    progress=lambda done, total, path: advance(
                        completed=done, total=total, description=path
                    ),
                    calibration=calibration,
                    sensitivity=sensitivity,
                    block_bytes=(args.block_mb << 20) or None,
                ).report
    except UnmatchedPatternError as e:
        raise unmatched_usage(e, args.ckpt) from None
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
                    "branches": cfg.branches,
                    "seed": cfg.seed,
                    "weights": list(weights(args)),
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
    if any(p.auto is not None for p in report.layers):
        cols += ["method", "extra %", "budget share %", "bits/weight"]
        for row, p in zip(rows, report.layers, strict=True):
            a = p.auto
            share = None if a.budget_share is None else 100 * a.budget_share
            row += [a.method, 100 * a.extra_fraction, share, a.effective_bits]
    verb = "would split" if args.dry_run else "split"
    title = f"{verb} {len(report.split_paths)} of {len(report.layers)} matched layers"
    table(ui, title, cols, rows)


COMMAND = Command(
    name="split", help="split layers into twin branches", add_arguments=_split_args,
    run=_split_run,
)  # fmt: skip
