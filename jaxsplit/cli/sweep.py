"""``jaxsplit sweep``: quantization error over thresholds x methods x bit widths."""

from __future__ import annotations

import argparse

from jaxsplit.cli.common import (
    add_input_arguments,
    add_quant_options,
    load_checkpoint,
    parse_threshold,
    quant_spec,
    require_layers,
    weights,
)
from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag, table
from jaxsplit.config import SplitConfig
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.plot import pareto, pareto_points
from jaxsplit.render import sweep_csv
from jaxsplit.sweeps import sweep

__all__ = ["COMMAND"]


def _sweep_args(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument(
        "--layers",
        nargs="+",
        default=["**"],
        metavar="PATTERN",
        help="layer paths, globs or re:REGEX (default: every layer)",
    )
    p.add_argument(
        "--thresholds",
        nargs="+",
        default=["rel:0.25", "rel:0.5", "rel:0.75"],
        metavar="T",
        help="T, rel:F, sigma:K or pct:P (default: rel:0.25 rel:0.5 rel:0.75)",
    )
    p.add_argument("--methods", nargs="+", default=["balance"], metavar="M", help="split methods")
    add_quant_options(p, many_bits=True)
    p.add_argument("--seed", type=int, default=0, help="seed for the random method")
    p.add_argument("--csv", metavar="PATH", help="also write every row as CSV")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the Pareto view: error removed vs extra non-zeros, per method and "
        "threshold, over all layers, the frontier drawn (needs the demo extra's matplotlib)",
    )
    add_json_flag(p)


def _sweep_run(args: argparse.Namespace, ui: UI) -> int:
    thresholds = [parse_threshold(t, "--thresholds") for t in args.thresholds]
    specs = [quant_spec(args, b) for b in args.bits]
    try:
        cfg = SplitConfig(
            layers=tuple(args.layers), seed=args.seed, spec=specs[0], weights=weights(args)
        )
    except (ConfigError, ConfigTypeError) as e:
        raise UsageError(f"--{e.field}: {e}") from None
    tree = load_checkpoint(args.ckpt, args.format)
    n = len(require_layers(tree, args.ckpt, cfg.weights))
    with ui.progress(f"sweeping {n} layers", n) as advance:
        result = sweep(
            tree,
            cfg,
            thresholds=thresholds,
            methods=args.methods,
            specs=specs,
            on_layer=lambda path: advance(),
        )
    if args.csv:
        sweep_csv(result, args.csv)
    if args.plot:
        try:
            pareto(pareto_points(result), args.plot, title=str(args.ckpt))
        except ImportError as e:
            raise UsageError(f"--plot: {e}") from None
    if ui.json:
        ui.print_json(result.to_dict())
        return 0
    cols = ["layer", "threshold", "method", "spec", "split %", "extra nz %", "MSE before"]
    cols += ["MSE", "Widrow corr.", "reduction %", "SQNR dB"]
    rows = [
        [
            r.layer,
            r.threshold,
            r.method,
            r.spec,
            100 * r.frac_split,
            100 * r.extra_fraction,
            r.mse_before,
            r.mse,
            r.predicted_mse_correlated,
            100 * r.reduction,
            r.sqnr_db,
        ]
        for r in result.rows
    ]
    table(ui, f"{args.ckpt}: sweep ({len(result.rows)} rows)", cols, rows)
    for path in (args.csv, args.plot):
        if path:
            ui.note(f"wrote {path}")
    return 0


COMMAND = Command(
    name="sweep",
    help="quantization error over a grid of thresholds x methods x bit widths",
    add_arguments=_sweep_args,
    run=_sweep_run,
)
