"""``jaxsplit report``: the per-layer quantization error table (``jaxsplit.quant_error``).

What is compared with what:

* ``report CKPT SPLIT_CKPT``: the original checkpoint against its split.
* ``report CKPT --layers … --threshold …``: against a split made in memory (nothing written).
* ``report CKPT`` where CKPT holds split layers: its merged weights against its branches.
* ``report CKPT`` otherwise: the unsplit baseline (every layer compared with itself).
"""

from __future__ import annotations

import argparse

from jaxsplit import io
from jaxsplit.cli.common import (
    add_input_arguments,
    add_quant_options,
    add_split_options,
    check_patterns,
    load_calibration,
    load_checkpoint,
    quant_spec,
    require_layers,
    split_config,
    twin_spec,
    weights,
)
from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag
from jaxsplit.evaluate import quant_error
from jaxsplit.render import report_markdown, report_rich_table
from jaxsplit.split import merge_params, split_params

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


def _trees(args: argparse.Namespace, tree: dict, layers: dict) -> tuple[dict, dict, str]:
    """``(params, params2, what)`` per the module docstring."""
    if args.split_ckpt is not None:
        if args.layers:
            raise UsageError("give SPLIT_CKPT or --layers, not both")
        split = load_checkpoint(args.split_ckpt, args.split_format, "SPLIT_CKPT")
        return tree, split, f"{args.ckpt} vs {args.split_ckpt}"
    if args.layers:
        cfg = split_config(args, quant_spec(args))
        check_patterns(tree, cfg, list(layers))
        calibration = load_calibration(args.calibration)
        p2 = split_params(tree, cfg, calibration=calibration)
        return tree, p2, f"{args.ckpt} split in memory"
    if any(layer.branches for layer in layers.values()):
        return merge_params(tree), tree, f"{args.ckpt} (merged vs its branches)"
    return tree, tree, f"{args.ckpt} (unsplit baseline)"


def _run(args: argparse.Namespace, ui: UI) -> int:
    spec = quant_spec(args)
    if args.threshold is not None and not args.layers:
        raise UsageError("--threshold needs --layers")
    tree = load_checkpoint(args.ckpt, args.format)
    names = weights(args)
    params, params2, what = _trees(args, tree, require_layers(tree, args.ckpt, names))
    with ui.progress("quantizing"):
        report = quant_error(params, params2, spec, weights=names, twin_spec=twin_spec(args, spec))
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
