"""The README's first lines are the two commands, and .ci/run runs the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 200, "README must open with the commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_demo_and_test_commands():
    install_demo, tests = _readme_commands()[:2]
    assert install_demo.endswith("jaxsplit demo")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(test_cmd)}$", ci, re.M), (test_cmd, ci)
