"""``jaxsplit sweep``: quantization error over thresholds x methods x bit widths.

The checkpoint is read one layer at a time (``jaxsplit.stream``): a grid per layer, then
each ``--thresholds auto`` search streamed (a tree-wide ``--budget`` reads it twice)."""

from __future__ import annotations

import argparse
import dataclasses

from jaxsplit import stream
from jaxsplit.cli.common import (
    add_input_arguments,
    add_quant_options,
    check_sensitivity_budget,
    load_calibration,
    load_sensitivity,
    open_input,
    parse_threshold,
    quant_spec,
    twin_spec,
    weights,
)
from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag, table
from jaxsplit.config import Auto, SplitConfig
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.evaluate import quant_error
from jaxsplit.plot import pareto, pareto_points
from jaxsplit.render import sweep_csv
from jaxsplit.split import resolve_selection
from jaxsplit.sweeps import SweepResult, auto_rows, sweep

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
        help="T, rel:F, sigma:K, pct:P or auto (default: rel:0.25 rel:0.5 rel:0.75)",
    )
    p.add_argument(
        "--threshold", dest="thresholds", nargs="+", metavar="T", help="alias of --thresholds"
    )
    p.add_argument("--methods", nargs="+", default=["balance"], metavar="M", help="split methods")
    add_quant_options(p, many_bits=True)
    p.add_argument("--seed", type=int, default=0, help="seed for the random method")
    p.add_argument("--budget", type=float, metavar="F", help="auto: tree-wide extra budget")
    p.add_argument("--layer-budget", type=float, metavar="F", help="auto: per-layer budget")
    p.add_argument("--candidates", type=int, default=64, help="auto: thresholds per method")
    p.add_argument("--twin-bits", type=int, metavar="B", help="auto: bits of the sparse twins")
    p.add_argument("--calibration", metavar="FILE", help="auto: input second moments (.npz)")
    p.add_argument("--sensitivity", metavar="FILE", help="auto --budget: JSON {layer path: weight}")
    p.add_argument("--csv", metavar="PATH", help="also write every row as CSV")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the Pareto view: error removed vs extra non-zeros, per method and "
        "threshold, over all layers, the frontier drawn (needs the demo extra's matplotlib)",
    )
    add_json_flag(p)


def _sweep_run(args: argparse.Namespace, ui: UI) -> int:
    use_auto = "auto" in args.thresholds
    thresholds = [parse_threshold(t, "--thresholds") for t in args.thresholds if t != "auto"]
    specs = [quant_spec(args, b) for b in args.bits]
    if not use_auto and args.methods and "auto" in args.methods:
        raise UsageError("--methods auto needs --thresholds auto")
    if args.budget is not None and args.layer_budget is not None:
        raise UsageError("give --budget (tree-wide) or --layer-budget, not both")
    try:
        cfg = SplitConfig(
            layers=tuple(args.layers), seed=args.seed, spec=specs[0], weights=weights(args)
        )
        autos = [
            Auto(
                s,
                candidates=args.candidates,
                max_extra=args.budget if args.budget is not None else args.layer_budget,
                scope="tree" if args.budget is not None else "layer",
                twin_spec=twin_spec(args, s),
            )
            for s in specs
        ]
    except (ConfigError, ConfigTypeError) as e:
        raise UsageError(f"--{e.field}: {e}") from None
    calibration = load_calibration(args.calibration) if use_auto else None
    check_sensitivity_budget(
        args, tree_budget=use_auto and args.budget is not None, needs="auto and --budget F"
    )
    sensitivity = load_sensitivity(args.sensitivity)
    fixed = [m for m in args.methods if m != "auto"]
    rows: list = []
    with open_input(args.ckpt, args.format, cfg.weights) as src:
        selected, _, _ = resolve_selection(src.skel, cfg)  # unmatched patterns raise here
        paths = [lay.path for lay in selected]
        if thresholds and fixed:
            with ui.progress(f"sweeping {len(paths)} layers", len(paths)) as advance:
                for path in paths:
                    rows += sweep(
                        src.subtree(path), stream.one_layer(cfg, path), thresholds=thresholds,
                        methods=fixed, specs=specs,
                    ).rows  # fmt: skip
                    stream.release()
                    advance()
        if use_auto:
            with ui.progress(f"searching {len(paths)} layers") as advance:
                for a in autos:
                    for m in args.methods:
                        c = dataclasses.replace(cfg, threshold=a, method=m, spec=None)
                        for _, sub, sub2, plan in stream.iter_split(
                            src, c, calibration=calibration, sensitivity=sensitivity
                        ):
                            if plan is None:
                                continue
                            err = quant_error(sub, sub2, a.spec, weights=cfg.weights,
                                              twin_spec=a.twin_spec)  # fmt: skip
                            rows += auto_rows([plan], err.layers, a)
                            advance()
    result = SweepResult(tuple(rows))
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
