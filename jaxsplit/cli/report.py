"""``jaxsplit report``: the per-layer quantization error table (``jaxsplit.quant_error``).

What is compared with what:

* ``report CKPT SPLIT_CKPT``: the original checkpoint against its split.
* ``report CKPT --layers … --threshold …``: against a split made in memory (nothing written).
* ``report CKPT`` where CKPT holds split layers: its merged weights against its branches.
* ``report CKPT`` otherwise: the unsplit baseline (every layer compared with itself).

Checkpoints are read one layer at a time (``jaxsplit.stream``); a split made here is the
streamed one (a tree-wide ``--budget`` reads CKPT twice), so memory stays near a few
times the largest tensor. Rows follow the checkpoint's stored order.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

from jaxsplit import io, stream
from jaxsplit.cli.common import (
    add_input_arguments,
    add_quant_options,
    add_split_options,
    load_calibration,
    load_sensitivity,
    open_input,
    quant_spec,
    split_config,
    twin_spec,
    unmatched_usage,
    weights,
)
from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag
from jaxsplit.errors import UnmatchedPatternError
from jaxsplit.evaluate import Report, quant_error
from jaxsplit.render import report_markdown, report_rich_table
from jaxsplit.split import merge_params

__all__ = ["COMMAND"]


def _args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument(
        "split_ckpt", metavar="SPLIT_CKPT", nargs="?", help="the split checkpoint to compare"
    )
    p.add_argument("--split-format", choices=io.FORMATS, help="SPLIT_CKPT's format")
    add_quant_options(p)
    add_split_options(p, required=False)
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    add_json_flag(p)


def _pairs(args: argparse.Namespace, src, names, stack: contextlib.ExitStack):
    """``(iterator of (original, split) one-layer subtrees, what)`` per the module
    docstring, read one layer at a time."""
    if args.split_ckpt is not None:
        if args.layers:
            raise UsageError("give SPLIT_CKPT or --layers, not both")
        other = stack.enter_context(
            open_input(args.split_ckpt, args.split_format, names, "SPLIT_CKPT")
        )
        if set(src.layers) != set(other.layers):
            raise ValueError(
                f"params and params2 hold different layers: only in params: "
                f"{sorted(set(src.layers) - set(other.layers))}, only in params2: "
                f"{sorted(set(other.layers) - set(src.layers))}"
            )
        pairs = ((p, src.subtree(p), other.subtree(p)) for p in src.layers)
        return pairs, f"{args.ckpt} vs {args.split_ckpt}"
    if args.layers:
        cfg = split_config(args, quant_spec(args))
        calibration = load_calibration(args.calibration)
        try:
            it = stream.iter_split(
                src, cfg, calibration=calibration, sensitivity=load_sensitivity(args.sensitivity)
            )
            first = next(it, None)  # pattern checks and a tree search run here
        except UnmatchedPatternError as e:
            raise unmatched_usage(e, args.ckpt) from None
        rest = ((p, a, b) for p, a, b, _ in it)
        head = [] if first is None else [first[:3]]
        return itertools.chain(head, rest), f"{args.ckpt} split in memory"
    if any(layer.branches for layer in src.layers.values()):
        pairs = ((p, merge_params(s), s) for p, s in _subtrees(src))
        return pairs, f"{args.ckpt} (merged vs its branches)"
    return ((p, s, s) for p, s in _subtrees(src)), f"{args.ckpt} (unsplit baseline)"


def _subtrees(src):
    return ((p, src.subtree(p)) for p in src.layers)


def _run(args: argparse.Namespace, ui: UI) -> int:
    spec = quant_spec(args)
    if args.threshold is not None and not args.layers:
        raise UsageError("--threshold needs --layers")
    names = weights(args)
    tw = twin_spec(args, spec)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_input(args.ckpt, args.format, names))
        pairs, what = _pairs(args, src, names, stack)
        rows = []
        with ui.progress("quantizing", len(src.layers)) as advance:
            for path, a, b in pairs:
                rep = quant_error(a, b, spec, weights=names, twin_spec=tw)
                # a leaf layer's subtree holds its sibling weights as placeholders: skip them
                rows += [r for r in rep.layers if r.path == path]
                del a, b, rep
                stream.release()
                advance()
    report = Report(spec, tuple(rows))
    if ui.json:
        ui.print_json({"checkpoint": args.ckpt, "split_checkpoint": args.split_ckpt,
                       **report.to_dict()})  # fmt: skip
    elif args.markdown:
        print(report_markdown(report), file=ui.out.file)
    else:
        table = report_rich_table(report)
        table.title = f"{what}: {spec.bits}-bit {spec.granularity.replace('_', '-')}"
        table.title_justify = "left"
        ui.out.print(table)
    return 0


COMMAND = Command(
    name="report", help="per-layer quantization error before/after a split", add_arguments=_args,
    run=_run,
)  # fmt: skip
