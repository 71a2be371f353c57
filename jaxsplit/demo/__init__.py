"""The built-in job (``jaxsplit demo``): what splitting buys a small CNN and a
pretrained transformer (MiniLM) under quantization.

Built on the public API only. ``run_demo(DemoConfig())`` returns a ``DemoResult``;
``markdown(result)`` and ``plot(result, path)`` render it.
"""

from jaxsplit.demo.job import DemoConfig as DemoConfig
from jaxsplit.demo.job import DemoResult as DemoResult
from jaxsplit.demo.job import DemoRow as DemoRow
from jaxsplit.demo.job import MiniLMRow as MiniLMRow
from jaxsplit.demo.job import Variant as Variant
from jaxsplit.demo.job import minilm_variants as minilm_variants
from jaxsplit.demo.job import run_demo as run_demo
from jaxsplit.demo.job import run_minilm as run_minilm
from jaxsplit.demo.job import simulated_weights as simulated_weights
from jaxsplit.demo.job import variants as variants
from jaxsplit.demo.report import markdown as markdown
from jaxsplit.demo.report import overhead as overhead
from jaxsplit.demo.report import pivot as pivot
from jaxsplit.demo.report import plot as plot

__all__ = [
    "DemoConfig",
    "DemoResult",
    "DemoRow",
    "MiniLMRow",
    "Variant",
    "run_demo",
    "run_minilm",
    "minilm_variants",
    "simulated_weights",
    "variants",
    "markdown",
    "overhead",
    "pivot",
    "plot",
]
