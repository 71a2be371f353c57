"""jaxsplit.stream: streamed split/merge equals the in-memory path bit for bit; atomic;
bounded memory.

``python tests/test_io_stream.py --measure N ROWS COLS [FMT]`` measures peak RSS and wall
time of a streamed split of a synthetic bf16 checkpoint of N tensors ROWS x COLS.
"""

import json
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import io, stream

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
NAMES = {"orbax": "ckpt", "msgpack": "w.msgpack", "safetensors": "w.safetensors", "npz": "w.npz"}


def _tree(seed=0):
    rng = np.random.default_rng(seed)

    def w(shape, dtype):
        a = rng.standard_normal(shape).astype(np.float32)
        a.reshape(-1)[:3] = [-0.0, 1e-40, 0.0]  # -0.0, a float32 subnormal, a zero
        return a.astype(dtype)

    return {
        "params": {
            "Dense_0": {"kernel": w((16, 8), np.float32), "bias": np.zeros(8, np.float32)},
            "block": {
                "Conv_0": {"kernel": w((3, 3, 4, 4), ml_dtypes.bfloat16)},
                "Dense_1": {"kernel": w((8, 8), np.float16), "bias": np.ones(8, np.float16)},
            },
            "Embed_0": {"embedding": w((10, 4), np.float32)},
            "scale": np.float32(2.0),
        },
        "batch_stats": {"bn": {"mean": np.arange(3, dtype=np.int32)}},
    }


def _assert_same(a, b, path=""):
    assert sorted(a) == sorted(b), (path, sorted(a), sorted(b))
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k], f"{path}/{k}")
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert x.dtype == y.dtype and x.shape == y.shape, (path, k, x.dtype, y.dtype)
            assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)), (
                path,
                k,
            )


def _forms(p):
    return sorted((t.path, t.form, t.shape, t.dtype) for t in io.stored_info(p, count=False))


CFG = js.SplitConfig(layers=["**"], threshold=js.Relative(0.5), method="clip")


@pytest.mark.parametrize(
    ("src_fmt", "out_fmt"),
    [("safetensors", "safetensors"), ("orbax", "safetensors"), ("npz", "safetensors"),
     ("msgpack", "safetensors"), ("safetensors", "npz"), ("orbax", "orbax"),
     ("safetensors", "msgpack")],
)  # fmt: skip
def test_streamed_split_equals_in_memory_split(tmp_path, src_fmt, out_fmt):
    src = io.save(_tree(), tmp_path / f"src_{NAMES[src_fmt]}")
    dst = tmp_path / f"out_{NAMES[out_fmt]}"
    seen = []
    rep = stream.split_checkpoint(src, dst, CFG, progress=lambda *a: seen.append(a))
    ref = io.save(js.split_params(io.load(src), CFG), tmp_path / f"ref_{NAMES[out_fmt]}")
    _assert_same(io.load(dst), io.load(ref))
    _assert_same(io.load(dst, dense=False)["batch_stats"], io.load(ref)["batch_stats"])
    assert _forms(dst) == _forms(ref)
    assert "sparse" in {f for _, f, *_ in _forms(dst)}
    _assert_same(js.merge_params(io.load(dst)), io.load(src))
    # the report is split_with_report's
    _, want = js.split_with_report(io.load(src), CFG)
    assert rep.report == want
    assert rep.streamed_read == (src_fmt != "msgpack")
    assert rep.streamed_write == (out_fmt in ("safetensors", "npz"))
    assert seen[-1][:2] == (len(seen), len(seen)) and rep.n_tensors >= len(seen)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("src_fmt", ["safetensors", "orbax"])
def test_streamed_merge_equals_in_memory_merge(tmp_path, src_fmt):
    src = io.save(_tree(), tmp_path / f"src_{NAMES[src_fmt]}")
    split = io.save(js.split_params(io.load(src), CFG), tmp_path / f"split_{NAMES[src_fmt]}")
    rep = stream.merge_checkpoint(split, tmp_path / "merged.safetensors")
    assert set(rep.merged) == set(js.find_layers(io.load(src)))
    _assert_same(io.load(tmp_path / "merged.safetensors"), io.load(src))


def test_random_method_uses_full_paths(tmp_path):
    cfg = js.SplitConfig(layers=["block/*"], threshold=0.5, method="random", seed=3)
    src = io.save(_tree(), tmp_path / "src.safetensors")
    stream.split_checkpoint(src, tmp_path / "out.safetensors", cfg)
    _assert_same(io.load(tmp_path / "out.safetensors"), js.split_params(io.load(src), cfg))


def test_plan_gives_per_layer_configs(tmp_path):
    src = io.save(_tree(), tmp_path / "src.safetensors")
    other = js.SplitConfig(layers=None, threshold=0.1, method="balance")
    stream.split_checkpoint(src, tmp_path / "a.npz", CFG, plan={"Dense_0": other})
    want = js.split_params(io.load(src), dataclasses_replace(CFG, layers=["re:(?!Dense_0$).*"]))
    want = js.split_params(want, dataclasses_replace(other, layers=["Dense_0"]))
    _assert_same(io.load(tmp_path / "a.npz"), want)
    calls = []

    def plan(path, node):
        calls.append((path, sorted(node)))
        return other if path == "Dense_0" else None

    stream.split_checkpoint(src, tmp_path / "b.npz", CFG, plan=plan)
    _assert_same(io.load(tmp_path / "b.npz"), want)
    assert ("Dense_0", ["bias", "kernel"]) in calls
    with pytest.raises(ValueError, match=r"plan names path\(s\) \['nope'\]"):
        stream.split_checkpoint(src, tmp_path / "c.npz", CFG, plan={"nope": other})
    with pytest.raises(TypeError, match=r"plan\['Dense_0'\] must be a jaxsplit.SplitConfig"):
        stream.split_checkpoint(src, tmp_path / "c.npz", CFG, plan={"Dense_0": 1.0})
    with pytest.raises(TypeError, match="plan must be None, a mapping"):
        stream.split_checkpoint(src, tmp_path / "c.npz", CFG, plan=3)
    assert not (tmp_path / "c.npz").exists()


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_iter_layers_one_at_a_time(tmp_path):
    src = io.save(js.split_params(_tree(), CFG), tmp_path / "s.safetensors")
    got = dict(stream.iter_layers(src))
    assert list(got) == list(js.find_layers(io.load(src)))
    _assert_same(got["Dense_0"], io.load(src)["params"]["Dense_0"])


def _snapshot(d: pathlib.Path):
    return {
        str(f.relative_to(d)): (f.read_bytes() if f.is_file() else None, f.stat().st_mtime_ns)
        for f in sorted(d.rglob("*"))
    }


@pytest.mark.parametrize("out_fmt", ["safetensors", "npz", "orbax"])
def test_killed_run_keeps_previous_output(tmp_path, out_fmt):
    src = io.save(_tree(), tmp_path / "src.safetensors")
    out = io.save({"old": np.ones(2)}, tmp_path / NAMES[out_fmt])
    before = _snapshot(tmp_path)

    def kill(done, total, path):
        if done == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt, match="killed"):
        stream.split_checkpoint(src, out, CFG, overwrite=True, progress=kill)
    assert _snapshot(tmp_path) == before  # previous output intact, no temp debris
    stream.split_checkpoint(src, out, CFG, overwrite=True)
    assert "old" not in io.load(out)


def test_errors_before_anything_is_written(tmp_path):
    src = io.save(_tree(), tmp_path / "src.safetensors")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"pattern\(s\) \['nope'\] matched no layer; available"):
        stream.split_checkpoint(src, tmp_path / "o.safetensors", js.SplitConfig(layers=["nope"]))
    split = io.save(js.split_params(io.load(src), CFG), tmp_path / "split.safetensors")
    with pytest.raises(
        ValueError, match="layer '.*' is already split into 2 branches; call merge_params first"
    ):
        stream.split_checkpoint(split, tmp_path / "o.safetensors", CFG)
    bad = io.save({"l": {"kernel": np.arange(4)}}, tmp_path / "int.npz")
    with pytest.raises(TypeError, match="layer 'l': kernel has dtype int64"):
        stream.split_checkpoint(bad, tmp_path / "o.npz", CFG)
    with pytest.raises(ValueError, match="is the input"):
        stream.split_checkpoint(src, src, CFG, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists"):
        stream.split_checkpoint(src, split, CFG)
    with pytest.raises(TypeError, match="cfg must be a jaxsplit.SplitConfig"):
        stream.split_checkpoint(src, tmp_path / "o.npz", {"layers": "**"})
    with pytest.raises(TypeError, match="progress must be None or a callable"):
        stream.split_checkpoint(src, tmp_path / "o.npz", CFG, progress=1)
    with pytest.raises(ValueError, match="sparse_below must be None or a number in"):
        stream.split_checkpoint(src, tmp_path / "o.npz", CFG, sparse_below=-1)
    slash = io.save({"a/b": {"kernel": np.ones(2)}}, tmp_path / "slash.msgpack")
    with pytest.raises(ValueError, match=r"key 'a/b/kernel' cannot be stored in a flat npz"):
        stream.split_checkpoint(slash, tmp_path / "o.npz", js.SplitConfig(layers=None))
    del before["src.safetensors"]
    after = _snapshot(tmp_path)
    assert sorted(after) == ["int.npz", "slash.msgpack", "split.safetensors", "src.safetensors"]


def test_nonfinite_mid_stream_leaves_nothing(tmp_path):
    t = _tree()
    t["params"]["block"]["Dense_1"]["kernel"][0, 0] = np.nan
    src = io.save(t, tmp_path / "src.safetensors")
    with pytest.raises(ValueError, match="NaN|non-finite"):
        stream.split_checkpoint(src, tmp_path / "o.safetensors", CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_streamed_safetensors_is_readable_by_safetensors(tmp_path):
    from safetensors.numpy import load_file

    src = io.save(_tree(), tmp_path / "src.npz")
    out = tmp_path / "o.safetensors"
    stream.split_checkpoint(src, out, CFG)
    flat = load_file(out)
    assert "params/Dense_0/branch_0/kernel" in flat
    assert any(k.endswith("__jaxsplit_sparse__/indices") for k in flat)
    assert (8 + int.from_bytes(out.read_bytes()[:8], "little")) % 8 == 0  # aligned data


def _status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _write_input(src: pathlib.Path, n: int, rows: int, cols: int, fmt: str) -> None:
    rng = np.random.default_rng(0)

    def tensor():
        return rng.standard_normal((rows, cols), np.float32).astype(ml_dtypes.bfloat16)

    if fmt == "safetensors":  # tensor by tensor, so this process stays small
        w = stream._SafetensorsStream(src, 200 * n)
        for i in range(n):
            w.add(("params", f"layer_{i}", "kernel"), tensor())
        w.finish()
    else:
        io.save({"params": {f"layer_{i}": {"kernel": tensor()} for i in range(n)}}, src)


def _threshold(text: str):
    """``"3.0"`` (absolute), ``"sigma:3"``, ``"relative:0.5"``, ``"percentile:99"``."""
    kind, _, value = text.rpartition(":")
    kinds = {"": float, "sigma": js.Sigma, "relative": js.Relative, "percentile": js.Percentile}
    return kinds[kind](float(value))


def _measure(
    n: int, rows: int, cols: int, fmt: str = "safetensors", threshold: str = "3.0"
) -> dict:
    """In a fresh process: peak RSS of a streamed split of a synthetic bf16 checkpoint.

    The runtime (interpreter, jax, the split programs compiled for the tensor shape) is
    measured after a warm-up run on a one-tensor checkpoint; the peak is then ``VmHWM``
    after resetting it (``/proc/self/clear_refs``), so it counts what the data costs.
    """
    import resource
    import tempfile
    import time

    d = pathlib.Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR")))
    name = "src" if fmt == "orbax" else f"src.{fmt}"
    cfg = js.SplitConfig(layers=["**"], threshold=_threshold(threshold), method="clip")
    _write_input(d / f"warm_{name}", 1, rows, cols, fmt)
    stream.split_checkpoint(d / f"warm_{name}", d / "warm_out.safetensors", cfg)
    _write_input(d / name, n, rows, cols, fmt)
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    rep = stream.split_checkpoint(d / name, d / "out.safetensors", cfg)
    wall = time.perf_counter() - t0
    peak = _status("VmHWM")
    layers = rep.report.layers
    return {
        "in_bytes": rep.in_bytes,
        "out_bytes": rep.out_bytes,
        "ratio": rep.out_bytes / rep.in_bytes,
        "extra_nonzeros": sum(x.n_split for x in layers) / sum(x.n_total for x in layers),
        "largest_tensor": rep.largest_tensor_bytes,
        "runtime_rss": base,
        "peak_rss": peak,
        "peak_minus_runtime_over_largest": (peak - base) / rep.largest_tensor_bytes,
        "ru_maxrss_incl_compile": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_s": wall,
    }


def test_peak_memory_is_bounded_by_the_largest_tensor():
    """A 128 MB checkpoint of 32 bf16 tensors of 4 MB, streamed: the peak grows by a few
    tensors, not by the checkpoint.

    The split of one kernel (``split_params``, clip, absolute threshold, donated) itself
    peaks at ~3-4x the kernel's bytes; reading adds 1x; the allocator keeps ~20 MB.
    Statistics thresholds (``Sigma``, ``Percentile``) add what their resolution needs
    (~9x a bf16 kernel: float32 copies; see the report).
    """
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_io_stream as t; "
        "print(json.dumps(t._measure(32, 1024, 2048)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=pathlib.Path(__file__).parent.parent,
    )  # fmt: skip
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["ratio"] <= 1.15, m
    assert m["largest_tensor"] == 4 * 2**20 and m["in_bytes"] > 128 * 2**20
    assert m["peak_rss"] - m["runtime_rss"] <= 6 * m["largest_tensor"] + 32 * 2**20, m


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        n, rows, cols = (int(x) for x in sys.argv[2:5])
        print(json.dumps(_measure(n, rows, cols, *sys.argv[5:7]), indent=1))


def _auto_tree(seed=0, empty=True):
    """Heavy-tailed layers of several sizes (one above ``screen.MIN_SIZE``: screened), and
    an empty kernel (skipped; orbax cannot store one)."""
    rng = np.random.default_rng(seed)

    def t(*shape):
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)

    p = {
        "a": {"kernel": t(64, 32), "bias": np.zeros(32, np.float32)},
        "b": {"Dense_0": {"kernel": t(32, 16).astype(ml_dtypes.bfloat16)}},
        "big": {"kernel": t(512, 512)},
    }
    if empty:
        p["e"] = {"kernel": np.zeros((0, 4), np.float32)}
    return {"params": p}


def _calib(tree, seed=1):
    rng = np.random.default_rng(seed)
    p = tree["params"]
    x = rng.standard_normal((64, 64)).astype(np.float32)
    return {"a": x @ x.T / 64, "big": rng.uniform(0.1, 3.0, 512).astype(np.float32),
            "b/Dense_0": rng.uniform(0.5, 2.0, p["b"]["Dense_0"]["kernel"].shape[0])}  # fmt: skip


@pytest.mark.parametrize(
    ("src_fmt", "scope", "calibrated"),
    [("safetensors", "tree", False), ("orbax", "tree", True), ("safetensors", "tree", True),
     ("orbax", "layer", True)],
)  # fmt: skip
def test_tree_scope_and_calibrated_auto_stream_equal_in_memory(
    tmp_path, src_fmt, scope, calibrated
):
    """Two passes (curves, allocation, splits): the streamed output, report and dry run equal
    ``split_with_report`` on the whole tree, bit for bit; calibration from an .npz."""
    tree = _auto_tree(empty=src_fmt != "orbax")
    src = io.save(tree, tmp_path / f"src_{NAMES[src_fmt]}")
    calib = None
    if calibrated:
        np.savez(tmp_path / "calib.npz", **_calib(tree))
        with np.load(tmp_path / "calib.npz") as z:
            calib = {k: z[k] for k in z.files}
    budget = 0.03 if scope == "tree" else 0.02
    auto = js.Auto(js.QuantSpec(bits=4), candidates=16, max_extra=budget, scope=scope)
    cfg = js.SplitConfig(layers=["**"], threshold=auto, method="auto")
    seen = []
    rep = stream.split_checkpoint(
        src, tmp_path / "out.safetensors", cfg, calibration=calib,
        progress=lambda *a: seen.append(a),
    )  # fmt: skip
    ref_tree, ref = js.split_with_report(io.load(src), cfg, calibration=calib)
    ref_path = io.save(ref_tree, tmp_path / "ref.safetensors")
    _assert_same(io.load(tmp_path / "out.safetensors"), io.load(ref_path))
    assert rep.report.to_dict() == ref.to_dict()
    assert stream.plan_checkpoint(src, cfg, calibration=calib).to_dict() == ref.to_dict()
    assert len(rep.report.split_paths) >= 2
    if scope == "tree":
        searched = sorted(s[2] for s in seen if s[2].startswith("search "))
        assert searched == sorted(f"search {p}" for p in js.tree.find_layers(tree))
        chosen = [p.auto for p in ref.layers if p.auto is not None]
        total = sum(p.n_total for p in ref.layers if p.auto is not None)
        assert sum(c.extra_nonzero for c in chosen) <= budget * total
    merged = js.merge_params(io.load(tmp_path / "out.safetensors"))
    _assert_same(merged, io.load(src))


def test_tree_scope_stream_checks_before_writing(tmp_path):
    t = _auto_tree()
    t["params"]["big"]["kernel"][3, 3] = np.inf
    src = io.save(t, tmp_path / "src.safetensors")
    auto = js.Auto(js.QuantSpec(bits=4), candidates=8, max_extra=0.05, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=auto)
    with pytest.raises(js.errors.NonFiniteError, match="'big'"):
        stream.split_checkpoint(src, tmp_path / "out.safetensors", cfg)
    with pytest.raises(js.errors.CalibrationError, match="calibration key 'nope'"):
        stream.split_checkpoint(src, tmp_path / "out.safetensors", cfg,
                                calibration={"nope": np.ones(3)})  # fmt: skip
    with pytest.raises(js.ConfigError, match="plan .* cannot be combined") as e:
        stream.split_checkpoint(src, tmp_path / "out.safetensors", cfg, plan={})
    assert e.value.field == "plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_report_sweep_inspect_stream_the_in_memory_figures(tmp_path, capsys):
    """``report``/``sweep``/``inspect`` read one layer at a time (a tree budget: two passes)
    and print what the in-memory library gives for the whole tree."""
    from cli_helpers import run_cli

    tree = _auto_tree(empty=False)  # (quant_error has no figure for an empty kernel)
    src = io.save(tree, tmp_path / "src.safetensors")
    np.savez(tmp_path / "calib.npz", **_calib(tree))
    auto = ["--threshold", "auto", "--bits", "4", "--candidates", "16"]
    cfg = js.SplitConfig(
        layers=["**"], threshold=js.Auto(js.QuantSpec(bits=4), candidates=16, max_extra=0.03,
                                         scope="tree"),
    )  # fmt: skip

    def cli_json(*argv):
        code, out, err = run_cli(capsys, *argv, "--json")
        assert code == 0, err
        return json.loads(out)

    rep = cli_json("report", src, "--layers", "**", *auto, "--budget", "0.03")
    lib = js.quant_error(tree, js.split_params(tree, cfg), js.QuantSpec(bits=4))
    assert sorted(json.dumps(r, sort_keys=True) for r in rep["layers"]) == sorted(
        json.dumps(r, sort_keys=True) for r in lib.to_dict()["layers"]
    )
    flags = ["--bits", "4", "--candidates", "16", "--budget", "0.03"]
    rows = cli_json("sweep", src, "--thresholds", "auto", *flags,
                    "--calibration", tmp_path / "calib.npz")["rows"]  # fmt: skip
    calib = dict(np.load(tmp_path / "calib.npz"))
    want = js.sweeps.auto_sweep(
        tree,
        js.SplitConfig(layers=("**",)),
        autos=[cfg.threshold],
        methods=["balance"],
        calibration=calib,
    ).to_dict()["rows"]
    key = lambda r: r["layer"]  # noqa: E731
    assert sorted(rows, key=key) == sorted(want, key=key)
    ins = cli_json("inspect", src, "--bits", "4")
    assert sorted(r["path"] for r in ins["layers"]) == sorted(js.tree.find_layers(tree))
    assert {r["path"] for r in ins["recommendations"]} == set(js.tree.find_layers(tree))


@pytest.mark.parametrize("at", ["search a", "b/Dense_0"])
def test_killed_two_pass_run_keeps_previous_output(tmp_path, at):
    """Interrupted in pass 1 (a curve) or pass 2 (a split): the previous output is intact."""
    src = io.save(_auto_tree(), tmp_path / "src.safetensors")
    out = io.save({"old": np.ones(2)}, tmp_path / "out.safetensors")
    before = _snapshot(tmp_path)
    auto = js.Auto(js.QuantSpec(bits=4), candidates=8, max_extra=0.05, scope="tree")
    cfg = js.SplitConfig(layers=["**"], threshold=auto, method="clip")

    def kill(done, total, path):
        if path == at:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt, match="killed"):
        stream.split_checkpoint(src, out, cfg, overwrite=True, progress=kill)
    assert _snapshot(tmp_path) == before


def test_sigkilled_process_leaves_previous_output_intact(tmp_path):
    """A process killed outright (SIGKILL, no cleanup runs) mid-write: the previous output is
    byte for byte what it was; only the staging directory beside it is left behind."""
    src = io.save(_tree(), tmp_path / "src.safetensors")
    out = io.save({"old": np.arange(5.0)}, tmp_path / "out.safetensors")
    old = out.read_bytes()
    code = (
        "import os, signal, sys; import jaxsplit as js; from jaxsplit import stream\n"
        "cfg = js.SplitConfig(layers=['**'], threshold=js.Relative(0.5), method='clip')\n"
        "def kill(done, total, path):\n"
        "    if done == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"stream.split_checkpoint({str(src)!r}, {str(out)!r}, cfg, overwrite=True, progress=kill)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert r.returncode == -9, r.stderr[-2000:]
    assert out.read_bytes() == old
    debris = sorted(
        p.name for p in tmp_path.iterdir() if p.name not in ("src.safetensors", "out.safetensors")
    )
    assert (
        len(debris) == 1
        and debris[0].startswith(".out.safetensors.")
        and debris[0].endswith(".tmp")
    )
