"""The house rules hold: no import cycles, no private names taken across modules, no core
module importing the CLI or the demo (``tests/house_check.py``, a copy of the team's checker),
and the README's "Layout" section lists exactly the package's modules."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_house_check_finds_nothing():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "house_check.py"), str(ROOT / "jaxsplit")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 cycles, 0 private imports, 0 upward imports" in out.stdout


def test_house_check_catches_a_cycle(tmp_path):
    """The checker is not a test that cannot fail: a planted cycle and private import fail it."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import _hidden\n")
    (pkg / "b.py").write_text("import pkg.a\n_hidden = 1\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "house_check.py"), str(pkg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1
    assert "cycle: pkg.a <-> pkg.b" in out.stdout and "private import" in out.stdout


def test_readme_layout_lists_every_module():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    listed, folder = set(), ""
    for line in block.splitlines():
        stripped = line.lstrip()
        indent, name = len(line) - len(stripped), (stripped.split() or [""])[0]
        if indent == 2:
            folder = name if name.endswith("/") else ""
            if not folder:
                listed.add(name)
        elif indent == 4:
            listed.add(folder + name)
    actual = {str(p.relative_to(ROOT / "jaxsplit")) for p in (ROOT / "jaxsplit").rglob("*.py")}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))
