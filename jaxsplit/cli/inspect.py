"""``jaxsplit inspect``: per-layer weight statistics and, with ``--bits``, recommendations.

With ``--bits B`` (and any other ``QuantSpec`` flag, ``--budget F``), every unsplit layer
goes through the ``Auto`` search (``jaxsplit.search``, measured by ``jaxsplit.measure``:
what ``--threshold auto`` would do) as a dry run (``match_layers``), and layers are ranked
by the squared error a split removes per extra non-zero parameter. The checkpoint is read
one layer at a time (``jaxsplit.stream``).
"""

from __future__ import annotations

import argparse
import logging

from jaxsplit import stream
from jaxsplit.cli.common import (
    add_input_arguments,
    add_quant_options,
    input_format,
    open_input,
    quant_spec,
    weights,
)
from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag, table
from jaxsplit.config import Auto, SplitConfig
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.split import LayerPlan
from jaxsplit.stats import layer_stats, rank_by_outliers

__all__ = ["COMMAND", "recommendation", "rank_recommendations"]

logger = logging.getLogger("jaxsplit")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--top", type=int, default=5, help="how many layers to recommend (default 5)")
    add_quant_options(p, bits_default=None)
    p.add_argument(
        "--budget", type=float, default=None, metavar="F",
        help="with --bits: at most F extra non-zeros per layer, as a fraction (0.02 = 2%%)",
    )  # fmt: skip
    add_json_flag(p)


def recommendation(plan: LayerPlan) -> dict:
    """One layer's ``Auto`` choice as a row: method, threshold, MSE before/after, extra
    non-zeros, and ``gain_per_param``: the squared error removed (MSE drop times the
    layer's size) per extra non-zero (per one, when a split adds none).

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec, SplitConfig, match_layers
      >>> p = {"d": {"kernel": np.array([0.1, -0.2, 0.05, 3.0] * 4, np.float32)}}
      >>> plan = match_layers(p, SplitConfig(layers=["d"], threshold=Auto(QuantSpec(bits=4))))
      >>> r = recommendation(plan.layers[0])
      >>> r["path"], r["split"], r["mse_after"] < r["mse_before"], r["gain_per_param"] > 0
      ('d', True, True, True)
    """
    a = plan.auto
    if a is None:
        return {"path": plan.path, "split": False, "method": None, "threshold": None,
                "mse_before": None, "mse_after": None, "reduction": 0.0, "extra_nonzero": 0,
                "extra_fraction": 0.0, "gain_per_param": 0.0, "reason": plan.reason}  # fmt: skip
    removed = max(a.mse_unsplit - a.mse, 0.0) * plan.n_total
    gain = removed / max(a.extra_nonzero, 1)
    return {
        "path": plan.path,
        "split": a.split,
        "method": a.method,
        "threshold": a.threshold,
        "mse_before": a.mse_unsplit,
        "mse_after": a.mse,
        "reduction": a.reduction,
        "extra_nonzero": a.extra_nonzero,
        "extra_fraction": a.extra_fraction,
        "gain_per_param": gain,
        "reason": plan.reason,
    }


def rank_recommendations(rows: list[dict]) -> list[dict]:
    """Rows by ``gain_per_param``, largest first; layers the search leaves alone last.

    Example:
      >>> rows = [{"path": "a", "split": True, "gain_per_param": 1.0},
      ...         {"path": "b", "split": False, "gain_per_param": 0.0},
      ...         {"path": "c", "split": True, "gain_per_param": 5.0}]
      >>> [r["path"] for r in rank_recommendations(rows)]
      ['c', 'a', 'b']
    """
    return sorted(rows, key=lambda r: (not r["split"], -r["gain_per_param"]))


def _recommend(args, layers, names) -> tuple[list[dict], str]:
    spec = quant_spec(args)
    try:
        auto = Auto(spec, max_extra=args.budget)
    except (ConfigError, ConfigTypeError) as e:
        raise UsageError(f"--budget: {e}") from None
    unsplit = {p for p, lay in layers.items() if not lay.branches}
    if not unsplit:
        return [], "every layer is already split"
    cfg = SplitConfig(layers=lambda path, node: path in unsplit, threshold=auto, weights=names)
    report = stream.plan_checkpoint(args.ckpt, cfg, fmt=input_format(args.ckpt, args.format))
    rows = rank_recommendations([recommendation(p) for p in report.layers])
    chosen = [r for r in rows if r["split"]]
    extra = sum(r["extra_nonzero"] for r in chosen)
    size = sum(int(layers[p].array.size) for p in unsplit)
    budget = "no budget" if args.budget is None else f"budget {args.budget:.2%} per layer"
    summary = (
        f"--threshold auto ({spec.bits}-bit {spec.granularity.replace('_', '-')}, {budget}) "
        f"would split {len(chosen)} of {len(unsplit)} layers for {extra} extra non-zeros "
        f"({extra / max(size, 1):.3%} of their parameters)"
    )
    return rows, summary


def _threshold_text(t) -> str | float | None:
    if isinstance(t, tuple):
        return f"per channel {min(t):.4g}..{max(t):.4g}"
    return t


def _inspect_run(args: argparse.Namespace, ui: UI) -> int:
    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    if args.budget is not None and args.bits is None:
        raise UsageError("--budget needs --bits (the search scores splits under a QuantSpec)")
    names = weights(args)
    with open_input(args.ckpt, args.format, names) as src:  # one layer at a time
        layers = src.layers
        rows = []
        for path in layers:
            rows += [
                r
                for r in layer_stats(src.subtree(path), names)
                if r.path == path or r.path.startswith(f"{path}/branch_")  # not leaf siblings
            ]
            stream.release()
    for r in rows:
        logger.info("%s: %s %s max|w|=%s max/std=%s", r.path, r.kind, r.dtype, r.max_abs,
                    r.max_over_std)  # fmt: skip
    recs, summary = _recommend(args, layers, names) if args.bits is not None else (None, "")
    if recs is None:
        ranked = [r.path for r in rank_by_outliers(rows) if r.max_over_std is not None]
    else:
        ranked = [r["path"] for r in recs if r["split"]]
    ranked = ranked[: args.top]
    if ui.json:
        out = {"checkpoint": args.ckpt, "layers": [r.to_dict() for r in rows],
               "split_candidates": ranked}  # fmt: skip
        if recs is not None:
            out["recommendations"] = recs
            out["auto"] = summary
        ui.print_json(out)
        return 0
    cols = ["path", "kind", "shape", "dtype", "max|w|", "std", "max/std", "kurtosis", "nonfinite"]
    table(ui, f"{args.ckpt}: {len(rows)} layers", cols, [list(r) for r in rows])
    if recs is not None:
        table(
            ui,
            "Recommended splits (error removed per extra non-zero, largest first)",
            ["rank", "path", "method", "threshold", "MSE before", "MSE after", "removed %",
             "+nnz", "+nnz %", "removed/+nnz"],
            [[i + 1, r["path"], r["method"] or "leave", _threshold_text(r["threshold"]),
              r["mse_before"], r["mse_after"], 100 * r["reduction"], r["extra_nonzero"],
              100 * r["extra_fraction"], r["gain_per_param"]]
             for i, r in enumerate(recs[: args.top])],
        )  # fmt: skip
        ui.note(summary)
    elif ranked:
        by_path = {r.path: r for r in rows}
        table(
            ui,
            "Split candidates (max/std, largest first; --bits B ranks by what a split buys)",
            ["rank", "path", "max/std", "kurtosis"],
            [
                [i + 1, p, by_path[p].max_over_std, by_path[p].kurtosis]
                for i, p in enumerate(ranked)
            ],
        )
    return 0


COMMAND = Command(
    name="inspect",
    help="per-layer weight statistics; with --bits, recommended splits",
    add_arguments=_inspect_args,
    run=_inspect_run,
)
