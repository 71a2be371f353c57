"""The README's core example runs and prints what it says."""

import pathlib
import re

import numpy as np

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_core_example_runs():
    section = README.split("## Splitting parameters", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README core example", "exec"), ns)  # noqa: S102
    assert np.array_equal(ns["params2"]["Dense_0"]["branch_1"]["kernel"], [[0.0, -1.0], [2.0, 0.0]])
    assert [(p.path, p.action) for p in ns["report"].layers] == [
        ("Dense_0", "split"),
        ("block_1/Conv_0", "skip"),
    ]
