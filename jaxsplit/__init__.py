"""jaxsplit: horizontal layer splitting (``W = W1 + W2``) for JAX/Flax parameter trees.

The public API, one re-export a line. Modules are public too (``jaxsplit.tree``,
``jaxsplit.thresholds``, ``jaxsplit.measure``, ``jaxsplit.search``, ``jaxsplit.render``,
``jaxsplit.io``, ...); the README's "Layout" section says what each holds.
"""

# isort: skip_file
# modules (no module is shadowed by a function of the same name)
from jaxsplit import errors as errors
from jaxsplit import tree as tree
from jaxsplit import thresholds as thresholds
from jaxsplit import kernels as kernels
from jaxsplit import quant as quant
from jaxsplit import measure as measure
from jaxsplit import search as search
from jaxsplit import sweeps as sweeps
from jaxsplit import qat as qat
from jaxsplit import plot as plot
from jaxsplit import render as render
from jaxsplit import sparse_run as sparse_run
from jaxsplit import io as io
from jaxsplit import linen as linen
from jaxsplit import nnx as nnx

# configuration and thresholds
from jaxsplit.config import Auto as Auto
from jaxsplit.config import SplitConfig as SplitConfig
from jaxsplit.thresholds import Absolute as Absolute
from jaxsplit.thresholds import Percentile as Percentile
from jaxsplit.thresholds import Relative as Relative
from jaxsplit.thresholds import Sigma as Sigma
from jaxsplit.quant import QuantSpec as QuantSpec

# split / merge
from jaxsplit.tree import find_layers as find_layers
from jaxsplit.split import LayerPlan as LayerPlan
from jaxsplit.split import SplitReport as SplitReport
from jaxsplit.split import match_layers as match_layers
from jaxsplit.split import merge_params as merge_params
from jaxsplit.split import split_params as split_params
from jaxsplit.split import split_with_report as split_with_report
from jaxsplit.search import AutoChoice as AutoChoice

# measuring
from jaxsplit.quant import fake_quant as fake_quant
from jaxsplit.measure import Measurement as Measurement
from jaxsplit.evaluate import LayerError as LayerError
from jaxsplit.evaluate import Report as Report
from jaxsplit.evaluate import quant_error as quant_error
from jaxsplit.outputs import LayerOutput as LayerOutput
from jaxsplit.outputs import OutputError as OutputError
from jaxsplit.outputs import OutputReport as OutputReport
from jaxsplit.outputs import evaluate_outputs as evaluate_outputs
from jaxsplit.calibration import calibrate as calibrate
from jaxsplit.calibration import sensitivity as sensitivity
from jaxsplit.outputs import quantized_weights as quantized_weights
from jaxsplit.sweeps import SweepResult as SweepResult
from jaxsplit.sweeps import SweepRow as SweepRow
from jaxsplit.sweeps import sweep as sweep

# typed errors (ValueError / TypeError subclasses)
from jaxsplit.errors import AlreadySplitError as AlreadySplitError
from jaxsplit.errors import BadLayerError as BadLayerError
from jaxsplit.errors import ConfigError as ConfigError
from jaxsplit.errors import ConfigTypeError as ConfigTypeError
from jaxsplit.errors import NonFiniteError as NonFiniteError
from jaxsplit.errors import UnmatchedPatternError as UnmatchedPatternError
from jaxsplit.errors import UnsplittableError as UnsplittableError
from jaxsplit.errors import CalibrationError as CalibrationError
from jaxsplit.io import CheckpointError as CheckpointError

__version__ = "0.2.0"

__all__ = [
    # modules
    "errors",
    "tree",
    "thresholds",
    "kernels",
    "quant",
    "measure",
    "search",
    "sweeps",
    "qat",
    "plot",
    "render",
    "sparse_run",
    "io",
    "linen",
    "nnx",
    # configuration and thresholds
    "Auto",
    "SplitConfig",
    "Absolute",
    "Percentile",
    "Relative",
    "Sigma",
    "QuantSpec",
    # split / merge
    "find_layers",
    "LayerPlan",
    "SplitReport",
    "match_layers",
    "merge_params",
    "split_params",
    "split_with_report",
    "AutoChoice",
    # measuring
    "fake_quant",
    "Measurement",
    "LayerError",
    "Report",
    "quant_error",
    "LayerOutput",
    "OutputError",
    "OutputReport",
    "evaluate_outputs",
    "calibrate",
    "sensitivity",
    "quantized_weights",
    "SweepResult",
    "SweepRow",
    "sweep",
    # errors
    "AlreadySplitError",
    "BadLayerError",
    "ConfigError",
    "ConfigTypeError",
    "NonFiniteError",
    "UnmatchedPatternError",
    "UnsplittableError",
    "CalibrationError",
    "CheckpointError",
]
