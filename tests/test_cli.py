"""The ``jaxsplit`` command: happy paths, round trips, and the bad-input matrix.

Every bad input asserts the exit code, the one-line message on stderr, and that nothing
in the working directory was written or changed.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import assert_cli_error, readme_commands, run_cli

from jaxsplit import cli, io, merge_params
from jaxsplit.cli.ui import Command, finite

# A failed orbax read leaves a callback on orbax's closed event loop; a background thread
# reports it later, during whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = {"orbax": "ckpt", "msgpack": "w.msgpack", "safetensors": "w.safetensors", "npz": "w.npz"}


def _params(dtype=np.float32):
    rng = np.random.default_rng(1)
    return {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((8, 4)).astype(dtype),
                "bias": np.zeros(4, dtype),
            },
            "block_1": {"Conv_0": {"kernel": rng.standard_t(2, (3, 3, 2, 4)).astype(dtype)}},
            "Embed_0": {"embedding": rng.standard_normal((6, 4)).astype(dtype)},
        },
        "batch_stats": {"bn": {"mean": np.arange(4, dtype=np.float32)}},
    }


def _snapshot(d: pathlib.Path):
    return {
        str(f.relative_to(d)): (f.read_bytes() if f.is_file() else None, f.stat().st_mtime_ns)
        for f in sorted(d.rglob("*"))
    }


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return io.save(_params(), tmp_path / "w.npz")


# --- happy paths ---------------------------------------------------------------------------


def test_inspect_table_and_json(ckpt, capsys):
    code, out, err = run_cli(capsys, "inspect", ckpt)
    assert code == 0 and err == ""
    for path in ("Dense_0", "block_1/Conv_0", "Embed_0"):
        assert path in out
    code, out, _ = run_cli(capsys, "inspect", ckpt, "--json")
    data = json.loads(out)
    rows = {r["path"]: r for r in data["layers"]}
    k = io.load(ckpt)["params"]["Dense_0"]["kernel"].astype(np.float64)
    assert rows["Dense_0"]["kind"] == "dense" and rows["block_1/Conv_0"]["kind"] == "conv"
    assert rows["Embed_0"]["kind"] == "embed" and rows["Dense_0"]["shape"] == [8, 4]
    assert rows["Dense_0"]["max_abs"] == np.abs(k).max()
    assert rows["Dense_0"]["std"] == pytest.approx(k.std(), rel=1e-12)
    # the heavy-tailed (Student-t) conv kernel is the best split candidate
    assert data["split_candidates"][0] == "block_1/Conv_0"
    assert len(data["split_candidates"]) == 3


def test_split_dry_run_writes_nothing(ckpt, capsys, tmp_path):
    before = _snapshot(tmp_path)
    argv = ["split", ckpt, "out.npz", "--layers", "Dense_0", "block_*/*", "--threshold", "rel:0.5"]
    code, out, err = run_cli(capsys, *argv, "--dry-run", "--json")
    assert code == 0 and "dry run: nothing written" in err
    data = json.loads(out)
    assert data["output"] is None and data["patterns"]["block_*/*"] == ["block_1/Conv_0"]
    assert [p["action"] for p in data["layers"]] == ["split", "split"]
    assert _snapshot(tmp_path) == before
    code, out, _ = run_cli(capsys, *argv, "--dry-run")
    assert code == 0 and "would split 2 of 2" in out and "block_1/Conv_0" in out


def test_split_verbose_logs_per_layer(ckpt, capsys):
    code, _, err = run_cli(
        capsys, "split", ckpt, "o.npz", "--layers", "*", "--threshold", "1", "-v"
    )
    assert code == 0
    assert re.search(r"Dense_0: split \d+/32 values \(threshold 1\)", err)
    assert "wrote o.npz (npz)" in err


def _dtype_tree():
    """Three dtypes, one shape: few distinct compilations (split compiles per shape/dtype)."""
    rng = np.random.default_rng(2)
    out = {}
    for name, dt in (("f32", np.float32), ("bf16", "bfloat16"), ("f16", np.float16)):
        out[name] = {
            "Dense_0": {"kernel": rng.standard_normal((4, 4)).astype(dt), "bias": np.ones(4, dt)},
            "Embed_0": {"embedding": rng.standard_t(2, (4, 4)).astype(dt)},
        }
    return {"params": out, "batch_stats": {"mean": np.arange(3.0)}}


@pytest.mark.parametrize(
    ("fmt", "method"),
    [("orbax", "balance"), ("msgpack", "balance"), ("safetensors", "balance"),
     ("npz", "balance"), ("safetensors", "random")],
)  # fmt: skip
def test_split_load_merge_round_trip(tmp_path, monkeypatch, capsys, fmt, method):
    monkeypatch.chdir(tmp_path)
    tree = _dtype_tree()
    src = io.save(tree, NAMES[fmt])
    out = f"split_{NAMES[fmt]}"
    argv = ["split", src, out, "--layers", "*/*", "--threshold", "0.5", "--method", method]
    code, _, err = run_cli(capsys, *argv, "--seed", "3")
    assert code == 0, err
    split = io.load(out)
    for name, sub in tree["params"].items():
        for layer, leaves in sub.items():
            node = split["params"][name][layer]
            assert set(node) == {"branch_0", "branch_1"}, (name, layer)
            w = next(iter(leaves))
            assert node["branch_1"][w].dtype == leaves[w].dtype
    merged = merge_params(split)
    assert np.array_equal(merged["batch_stats"]["mean"], tree["batch_stats"]["mean"])
    for name, sub in tree["params"].items():
        for layer, leaves in sub.items():
            for leaf, want in leaves.items():
                got = np.asarray(merged["params"][name][layer][leaf])
                assert got.dtype == want.dtype, (name, layer, leaf)
                assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (name, layer)


def test_subprocess_python_m_jaxsplit(ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "jaxsplit", "split", str(ckpt), "out", "--layers", "Dense_0",
         "--threshold", "0.5", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["output_format"] == "orbax"
    assert io.detect_format(tmp_path / "out") == "orbax"
    assert "branch_1" in io.load(tmp_path / "out")["params"]["Dense_0"]


def test_help_version_and_no_command(capsys):
    assert run_cli(capsys, "--help")[0] == 0
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("jaxsplit ")
    assert_cli_error(
        run_cli(capsys), 2, r"^jaxsplit: error: a command is required \(inspect, split"
    )


def test_the_command_table_is_static_and_in_help_order():
    assert [c.name for c in cli.COMMANDS] == ["inspect", "split", "report", "sweep", "demo"]
    assert len({c.name for c in cli.COMMANDS}) == len(cli.COMMANDS)


def test_build_parser_takes_any_command_table():
    seen = []

    def add(p):
        p.add_argument("--n", type=int, default=1)

    def run(args, ui):
        seen.append((args.n, args.verbose))
        return 0

    fake = Command(name="fake", help="fake", add_arguments=add, run=run)
    args = cli.build_parser([fake]).parse_args(["fake", "--n", "4", "-v"])
    assert args.command.run(args, None) == 0 and seen == [(4, True)]


def test_debug_shows_traceback(ckpt, capsys):
    argv = ["split", ckpt, "o.npz", "--layers", "nope", "--threshold", "1", "--debug"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("jaxsplit split: error: --layers pattern")


def test_readme_cli_examples_run(tmp_path, monkeypatch, capsys):
    """Every ``jaxsplit`` command the README shows runs (exit 0), on the checkpoints its
    python examples write; ``jaxsplit demo`` runs in ``test_cli_sweep.py`` (as ``--quick
    --epochs 1``: the full job is minutes; one demo run per suite)."""
    text = (ROOT / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    for title in ("## Checkpoints and the command line", "## Real model code"):
        section = text.split(title, 1)[1].split("\n## ", 1)[0]
        ns: dict = {}
        for code in re.findall(r"```python\n(.*?)```", section, re.S):
            exec(compile(code, f"README {title}", "exec"), ns)  # noqa: S102
    cmds = readme_commands(text)
    names = [argv[1] for argv in cmds]
    assert names.count("demo") == 1 and names.count("sweep") >= 2, names
    assert {"inspect", "split", "report", "sweep", "demo"} <= set(names)
    for argv in cmds:
        if argv[1] == "demo":  # run by test_cli_sweep.test_demo_quick_writes_table_and_plot
            assert argv == ["jaxsplit", "demo"], argv
            continue
        code, out, err = run_cli(capsys, *argv[1:])
        assert code == 0, (argv, err)
        if "--json" in argv:
            json.loads(out)
    assert "branch_1" in io.load("ckpt_split")["params"]["Dense_0"]
    assert set(io.load("split.npz")["params"]["Dense_1"]) == {"branch_0", "branch_1"}
    gating = io.load("gemma_split.npz")["params"]["mlp"]["gating_einsum"]
    assert set(gating) == {"branch_0", "branch_1"}
    assert set(io.load("gemma_k4.npz")["params"]["mlp"]["linear"]) == {
        f"branch_{i}" for i in range(4)
    }


def test_report_modes_agree_with_quant_error(ckpt, capsys, tmp_path):
    from jaxsplit import QuantSpec, Sigma, SplitConfig, quant_error, split_params

    split = ["--layers", "*", "block_*/*", "--threshold", "sigma:2"]
    assert run_cli(capsys, "split", ckpt, "s.npz", *split)[0] == 0
    params = io.load(ckpt)
    cfg = SplitConfig(layers=("*", "block_*/*"), threshold=Sigma(2))
    want = quant_error(params, split_params(params, cfg), QuantSpec(bits=4))
    want = json.loads(json.dumps(finite(want.to_dict())))
    runs = {
        "two files": ["report", ckpt, "s.npz"],
        "in memory": ["report", ckpt, *split],
        "split only": ["report", "s.npz"],
    }
    for name, argv in runs.items():
        code, out, err = run_cli(capsys, *argv, "--bits", "4", "--json")
        assert code == 0, (name, err)
        got = json.loads(out)
        assert got["layers"] == want["layers"] and got["total"] == want["total"], name
    assert want["total"]["layers_split"] == 3 and want["total"]["reduction"] > 0
    code, out, _ = run_cli(capsys, "report", ckpt, "--json", "--per-channel")
    base = json.loads(out)
    assert base["spec"]["granularity"] == "per_channel"
    assert [r["reduction"] for r in base["layers"]] == [0.0, 0.0, 0.0]
    code, out, _ = run_cli(capsys, "report", ckpt, "s.npz", "--markdown", "--bits", "4")
    assert code == 0 and "| Dense_0 |" in out
    code, out, _ = run_cli(capsys, "report", ckpt, "s.npz", "--bits", "4")
    assert code == 0 and "4-bit per-tensor" in out and "block_1/Conv_0" in out


def test_report_bad_inputs(ckpt, capsys, tmp_path):
    io.save({"params": {"Other": {"kernel": np.ones((2, 2), np.float32)}}}, "other.npz")
    cases = [
        (["--bits", "1"], 2, r"--bits: QuantSpec.bits must be an int in \[2, 16\], got 1"),
        (["--bits", "x"], 2, r"argument --bits: invalid int value: 'x'"),
        (["gone.npz"], 2, r"SPLIT_CKPT 'gone.npz' does not exist"),
        (["--threshold", "1"], 2, r"--threshold needs --layers"),
        (["--layers", "Dense_0"], 2, r"--threshold is required with --layers"),
        (
            ["other.npz", "--layers", "x", "--threshold", "1"],
            2,
            r"give SPLIT_CKPT or --layers, not both",
        ),
        (
            ["--layers", "Nope", "--threshold", "1"],
            2,
            r"--layers pattern\(s\) \['Nope'\] matched no layer; available",
        ),
        (["other.npz"], 1, r"params and params2 hold different layers"),
    ]
    for extra, code, pattern in cases:
        _check_bad(
            capsys, tmp_path, ["report", ckpt, *extra], code, "^jaxsplit report: error: " + pattern
        )


# --- the bad-input matrix: exit code, one-line message, nothing written or changed ---------

SPLIT = ["--layers", "Dense_0", "--threshold", "0.5"]


def _check_bad(capsys, tmp_path, argv, code, pattern):
    before = _snapshot(tmp_path)
    assert_cli_error(run_cli(capsys, *argv), code, pattern)
    assert _snapshot(tmp_path) == before


def test_missing_checkpoint(ckpt, capsys, tmp_path):
    for cmd in (["inspect", "gone.npz"], ["split", "gone", "out.npz", *SPLIT]):
        _check_bad(capsys, tmp_path, cmd, 2, r"^jaxsplit \w+: error: CKPT 'gone(\.npz)?' does not")


@pytest.mark.parametrize("fmt", io.FORMATS)
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_truncated_or_corrupt_checkpoint(tmp_path, monkeypatch, capsys, fmt, damage):
    monkeypatch.chdir(tmp_path)
    src = io.save(_params(), NAMES[fmt])
    files = sorted(f for f in ([src] if src.is_file() else src.rglob("*")) if f.is_file())
    if fmt == "orbax":  # damage the array data, keep the metadata
        files = [f for f in files if f.parent.name == "d"]
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    for cmd in (["inspect", src], ["split", src, "out.npz", *SPLIT]):
        _check_bad(capsys, tmp_path, cmd, 1, rf"error: cannot read '{src}' as {fmt}")


def test_not_an_orbax_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    _check_bad(capsys, tmp_path, ["inspect", "ckpt"], 1, r"not an orbax checkpoint directory")


def test_unknown_format(ckpt, capsys, tmp_path):
    shutil.copy(ckpt, tmp_path / "w.txt")
    _check_bad(capsys, tmp_path, ["inspect", "w.txt"], 2, r"CKPT: cannot tell the checkpoint fo")
    _check_bad(
        capsys, tmp_path, ["inspect", "w.txt", "--format", "pickle"], 2,
        r"^jaxsplit inspect: error: argument --format: invalid choice: 'pickle'",
    )  # fmt: skip
    _check_bad(
        capsys, tmp_path, ["split", ckpt, "out.pt", *SPLIT], 2,
        r"OUT: cannot tell the checkpoint format of 'out.pt'.*--out-format",
    )  # fmt: skip
    # naming the format reads the file whatever its name
    assert run_cli(capsys, "inspect", "w.txt", "--format", "npz")[0] == 0


@pytest.mark.parametrize(
    "tree",
    [{}, {"params": {"step": np.int32(3)}}, {"params": {"bn": {"scale": np.ones(3)}}}],
    ids=["empty", "no-layers", "only-norms"],
)
def test_empty_tree(tmp_path, monkeypatch, capsys, tree):
    monkeypatch.chdir(tmp_path)
    io.save(tree, "e.msgpack")
    for cmd in (["inspect", "e.msgpack"], ["split", "e.msgpack", "o.npz", *SPLIT]):
        _check_bad(capsys, tmp_path, cmd, 1, r"error: checkpoint 'e.msgpack' holds no layers")


def test_pattern_matching_nothing_lists_available_paths(ckpt, capsys, tmp_path):
    argv = ["split", ckpt, "o.npz", "--layers", "Dense_0", "Dense_9", "--threshold", "1"]
    _check_bad(
        capsys, tmp_path, argv, 2,
        r"--layers pattern\(s\) \['Dense_9'\] matched no layer; available: "
        r"\['Dense_0', 'block_1/Conv_0', 'Embed_0'\]",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("threshold", "pattern"),
    [("nan", r"--threshold 'nan': SplitConfig.threshold must be a finite number in \[0, inf\)"),
     ("-1", r"--threshold '-1': SplitConfig.threshold must be a finite number .*got -1.0"),
     ("inf", r"--threshold 'inf': .*finite"),
     ("rel:1.5", r"--threshold 'rel:1.5': Relative.fraction must be .* \[0, 1\]"),
     ("sigma:-2", r"--threshold 'sigma:-2': Sigma.k must be"),
     ("pct:nan", r"--threshold 'pct:nan': Percentile.p must be"),
     ("big", r"--threshold 'big' is not a number; use T \(absolute\), rel:F"),
     ("max:3", r"--threshold 'max:3': unknown kind 'max'")],
)  # fmt: skip
def test_bad_threshold(ckpt, capsys, tmp_path, threshold, pattern):
    argv = ["split", ckpt, "o.npz", "--layers", "Dense_0", "--threshold", threshold]
    _check_bad(capsys, tmp_path, argv, 2, r"^jaxsplit split: error: " + pattern)


def test_unknown_method_and_bad_seed(ckpt, capsys, tmp_path):
    _check_bad(
        capsys, tmp_path, ["split", ckpt, "o.npz", *SPLIT, "--method", "clipz"], 2,
        r"--method: SplitConfig.method must be one of \['balance', 'random'.*got 'clipz'",
    )  # fmt: skip
    _check_bad(
        capsys, tmp_path, ["split", ckpt, "o.npz", *SPLIT, "--seed", "-4"], 2,
        r"--seed: SplitConfig.seed must be in \[0, 2\*\*63\), got -4",
    )  # fmt: skip
    _check_bad(
        capsys, tmp_path, ["split", ckpt, "o.npz", *SPLIT, "--seed", "x"], 2,
        r"argument --seed: invalid int value: 'x'",
    )  # fmt: skip
    _check_bad(capsys, tmp_path, ["split", ckpt, *SPLIT], 2, r"OUT is required \(or pass --dry")
    _check_bad(
        capsys, tmp_path, ["split", ckpt, "o.npz", "--layers", "re:(", "--threshold", "1"], 2,
        r"--layers: SplitConfig.layers\[0\] is not a valid regex: 're:\('",
    )  # fmt: skip


def test_non_float_kernels(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    io.save({"params": {"q": {"kernel": np.ones((4, 4), np.int8)}}}, "int.npz")
    argv = ["split", "int.npz", "o.npz", "--layers", "q", "--threshold", "0.5"]
    _check_bad(capsys, tmp_path, argv, 1, r"layer 'q': kernel has dtype int8; only floating")
    _check_bad(capsys, tmp_path, [*argv, "--dry-run"], 1, r"kernel has dtype int8")
    assert run_cli(capsys, "inspect", "int.npz")[0] == 0  # inspect shows it, with no stats


def test_non_finite_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    w = np.full((4, 4), 0.25, np.float32)
    w[0, 0], w[1, 1], w[2, 2] = np.nan, np.inf, 3.0
    io.save({"params": {"d": {"kernel": w}}}, "nan.npz")
    argv = ["split", "nan.npz", "o.npz", "--layers", "d", "--threshold", "0.5"]
    _check_bad(capsys, tmp_path, argv, 1, r"layer 'd': kernel holds 2 non-finite value\(s\)")
    code, _, err = run_cli(capsys, *argv, "--allow-nonfinite")
    assert code == 0, err
    b = io.load("o.npz")["params"]["d"]
    assert np.isnan(b["branch_0"]["kernel"][0, 0]) and b["branch_1"]["kernel"][2, 2] == 1.5


def test_output_exists(ckpt, capsys, tmp_path):
    (tmp_path / "o.npz").write_bytes(b"precious")
    (tmp_path / "odir").mkdir()
    _check_bad(
        capsys, tmp_path, ["split", ckpt, "o.npz", *SPLIT], 2,
        r"OUT 'o.npz' already exists; pass --overwrite to replace it",
    )  # fmt: skip
    _check_bad(capsys, tmp_path, ["split", ckpt, "odir", *SPLIT], 2, r"'odir' already exists")
    _check_bad(capsys, tmp_path, ["split", ckpt, ckpt, *SPLIT, "--overwrite"], 2,
               r"is the input checkpoint")  # fmt: skip
    assert run_cli(capsys, "split", ckpt, "o.npz", *SPLIT, "--overwrite")[0] == 0
    assert "branch_1" in io.load(tmp_path / "o.npz")["params"]["Dense_0"]


def test_output_directory_missing(ckpt, capsys, tmp_path):
    _check_bad(
        capsys, tmp_path, ["split", ckpt, "no/such/o.npz", *SPLIT], 2,
        r"OUT's directory '.*no/such' does not exist",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("exc", "code", "pattern"),
    [(KeyboardInterrupt, 130, r"interrupted; no output written"),
     (OSError, 1, r"error: No space left on device")],
)  # fmt: skip
@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_interrupted_write_keeps_previous_output(ckpt, capsys, tmp_path, monkeypatch, exc, code,
                                                 pattern, fmt):  # fmt: skip
    out = NAMES[fmt].replace("w", "previous")
    io.save({"params": {"old": {"kernel": np.ones(2)}}}, out)
    real = io._sync

    def crash(p):  # the whole output is written, the rename onto OUT has not happened
        real(p)
        raise exc("No space left on device") if exc is OSError else exc()

    monkeypatch.setattr(io, "_sync", crash)
    _check_bad(capsys, tmp_path, ["split", ckpt, out, *SPLIT, "--overwrite"], code, pattern)
    assert list(io.load(out)["params"]) == ["old"]


def _unprivileged(calls, cwd):
    """Runs ``cli.main(argv)`` for each argv in one child process that cannot bypass file
    permissions (as root, the override capabilities are dropped); prints the exit codes."""
    script = (
        "import sys; from jaxsplit.cli import main; print([main(a) for a in eval(sys.argv[1])])"
    )
    cmd = [sys.executable, "-c", script, repr([[str(x) for x in a] for a in calls])]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        cmd = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_unreadable_checkpoint_and_unwritable_output_dir(ckpt, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(ckpt, locked / "w.npz")
    os.chmod(locked / "w.npz", 0)
    os.chmod(locked, 0o555)
    try:
        before = _snapshot(tmp_path)
        calls = [["inspect", locked / "w.npz"], ["split", ckpt, locked / "o.npz", *SPLIT]]
        run = _unprivileged(calls, tmp_path)
        assert run.stdout == "[1, 1]\n" and "Traceback" not in run.stderr, run.stderr
        assert re.fullmatch(
            r"jaxsplit inspect: error: checkpoint '.*w.npz' is not readable \(permission denied\)\n"
            r"jaxsplit split: error: output directory '.*locked' is not writable\n",
            run.stderr,
        )
        assert _snapshot(tmp_path) == before
    finally:
        os.chmod(locked, 0o755)
