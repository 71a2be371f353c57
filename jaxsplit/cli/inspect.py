"""``jaxsplit inspect``: per-layer weight statistics of a checkpoint."""

from __future__ import annotations

import argparse
import logging

from jaxsplit.cli.common import add_input_arguments, load_checkpoint, require_layers
from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag, table
from jaxsplit.stats import layer_stats, rank_by_outliers

__all__ = ["COMMAND"]

logger = logging.getLogger("jaxsplit")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--top", type=int, default=5, help="how many layers to recommend (default 5)")
    add_json_flag(p)


def _inspect_run(args: argparse.Namespace, ui: UI) -> int:
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


COMMAND = Command(
    name="inspect", help="per-layer weight statistics", add_arguments=_inspect_args,
    run=_inspect_run,
)  # fmt: skip
