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
from jaxsplit.cli import UI, Command, UsageError, add_json_flag
from jaxsplit.cli_commands import (
    add_input_arguments,
    add_split_options,
    check_patterns,
    load_checkpoint,
    require_layers,
    split_config,
)

__all__ = ["COMMAND", "quant_spec"]


def _args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument(
        "split_ckpt", metavar="SPLIT_CKPT", nargs="?", help="the split checkpoint to compare"
    )
    p.add_argument("--split-format", choices=io.FORMATS, help="SPLIT_CKPT's format")
    p.add_argument("--bits", type=int, default=8, help="integer bit width (default 8)")
    p.add_argument(
        "--per-channel", action="store_true", help="one scale per output channel (last axis)"
    )
    add_split_options(p, required=False)
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    add_json_flag(p)


def quant_spec(args: argparse.Namespace):
    """The ``QuantSpec`` of ``--bits``/``--per-channel``; bad values are ``UsageError``.

    Example:
      >>> quant_spec(argparse.Namespace(bits=4, per_channel=True)).granularity
      'per_channel'
    """
    from jaxsplit.quant import QuantSpec

    granularity = "per_channel" if args.per_channel else "per_tensor"
    try:
        return QuantSpec(bits=args.bits, granularity=granularity)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--bits: {e}") from None


def _trees(args: argparse.Namespace, tree: dict, layers: dict) -> tuple[dict, dict, str]:
    """``(params, params2, what)`` per the module docstring."""
    from jaxsplit.transform import merge_params, split_params

    if args.split_ckpt is not None:
        if args.layers:
            raise UsageError("give SPLIT_CKPT or --layers, not both")
        split = load_checkpoint(args.split_ckpt, args.split_format, "SPLIT_CKPT")
        return tree, split, f"{args.ckpt} vs {args.split_ckpt}"
    if args.layers:
        cfg = split_config(args)
        check_patterns(tree, cfg, list(layers))
        return tree, split_params(tree, cfg), f"{args.ckpt} split in memory"
    if any(layer.branches for layer in layers.values()):
        return merge_params(tree), tree, f"{args.ckpt} (merged vs its branches)"
    return tree, tree, f"{args.ckpt} (unsplit baseline)"


def _run(args: argparse.Namespace, ui: UI) -> int:
    from jaxsplit.evaluate import quant_error

    spec = quant_spec(args)
    if args.threshold is not None and not args.layers:
        raise UsageError("--threshold needs --layers")
    tree = load_checkpoint(args.ckpt, args.format)
    params, params2, what = _trees(args, tree, require_layers(tree, args.ckpt))
    with ui.progress("quantizing"):
        report = quant_error(params, params2, spec)
    if ui.json:
        ui.print_json({"checkpoint": args.ckpt, "split_checkpoint": args.split_ckpt,
                       **report.to_dict()})  # fmt: skip
    elif args.markdown:
        print(report.to_markdown(), file=ui.out.file)
    else:
        table = report.to_rich_table()
        table.title = f"{what}: {spec.bits}-bit {spec.granularity.replace('_', '-')}"
        table.title_justify = "left"
        ui.out.print(table)
    return 0


COMMAND = Command(
    name="report", help="per-layer quantization error before/after a split", add_arguments=_args,
    run=_run,
)  # fmt: skip
