"""jaxsplit: horizontal layer splitting (``W = W1 + W2``) for JAX/Flax parameter trees."""

# core: config, selection, split/merge
from jaxsplit import kernels as kernels
from jaxsplit.config import Percentile as Percentile
from jaxsplit.config import Relative as Relative
from jaxsplit.config import Sigma as Sigma
from jaxsplit.config import SplitConfig as SplitConfig
from jaxsplit.select import find_layers as find_layers
from jaxsplit.transform import LayerPlan as LayerPlan
from jaxsplit.transform import SplitReport as SplitReport
from jaxsplit.transform import match_layers as match_layers
from jaxsplit.transform import merge_params as merge_params
from jaxsplit.transform import split_params as split_params
from jaxsplit.transform import split_with_report as split_with_report

# isort: split
# quantization evaluator (quant.py, evaluate.py)
from jaxsplit import quant as quant
from jaxsplit.evaluate import quant_error as quant_error
from jaxsplit.evaluate_model import evaluate_outputs as evaluate_outputs
from jaxsplit.quant import QuantSpec as QuantSpec
from jaxsplit.quant import fake_quant as fake_quant

# isort: split
# methods and automatic thresholds
from jaxsplit import auto as auto
from jaxsplit import qat as qat
from jaxsplit.auto import AutoChoice as AutoChoice
from jaxsplit.config import Auto as Auto

# isort: split
# sweeps (sweep.py); the demo is jaxsplit.demo
from jaxsplit.sweep import SweepResult as SweepResult
from jaxsplit.sweep import SweepRow as SweepRow
from jaxsplit.sweep import sweep as sweep

# isort: split
# wrappers (linen.py, nnx.py) are imported as submodules: jaxsplit.linen, jaxsplit.nnx
from jaxsplit import linen as linen
from jaxsplit import nnx as nnx

__version__ = "0.1.0"

__all__ = [
    # core
    "kernels",
    "Percentile",
    "Relative",
    "Sigma",
    "SplitConfig",
    "find_layers",
    "LayerPlan",
    "SplitReport",
    "match_layers",
    "merge_params",
    "split_params",
    "split_with_report",
    # quantization evaluator
    "quant",
    "QuantSpec",
    "fake_quant",
    "quant_error",
    "evaluate_outputs",
    # methods and automatic thresholds
    "auto",
    "qat",
    "Auto",
    "AutoChoice",
    # sweeps
    "SweepResult",
    "SweepRow",
    "sweep",
    # wrappers
    "linen",
    "nnx",
]
