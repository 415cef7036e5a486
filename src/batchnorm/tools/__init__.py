"""Model tools around batch norm, on torch.fx graphs.

    weights     pure tensor functions: bn_scale_shift, fold_bn_weights, fold_bn_into_next_weights
    capture     the graph captures, tried in order: torch.fx symbolic tracing, then torch.fx with
                the example's concrete shapes; each graph checked against the model's outputs
    tracing     trace (TraceError when no capture can), traced_copy, the shared graph queries
    biases      find_redundant_biases: the proof that a BN cancels a producer's bias
    folding     plan_folds: which BNs fold into a neighbouring Conv/Linear in eval mode
    surgery     strip_redundant_biases, fold_bn, inspect_model (each on a deep copy, with a report)
    stats       recalibrate ("precise BN"), diagnose (running statistics against data)
    commands    the `batchnorm inspect | fold | strip-bias` command line

Every BN is recognised as an instance of torch.nn.modules.batchnorm._BatchNorm, so torch.nn's
modules and batchnorm's alike (including the fused BatchNormReLU / BatchNormAddReLU).
"""

from batchnorm.tools.biases import RedundantBias, find_redundant_biases
from batchnorm.tools.folding import plan_folds
from batchnorm.tools.stats import Diagnosis, RecalibrationReport, diagnose, recalibrate
from batchnorm.tools.surgery import (
    BNRemnant,
    FoldReport,
    Inspection,
    StripReport,
    fold_bn,
    inspect_model,
    max_output_difference,
    strip_redundant_biases,
)
from batchnorm.tools.tracing import TraceError, trace
from batchnorm.tools.weights import (
    absorb_bias,
    bn_scale_shift,
    fold_bn_into_next_weights,
    fold_bn_weights,
)

__all__ = [
    "TraceError", "trace", "RedundantBias", "find_redundant_biases", "plan_folds",
    "strip_redundant_biases", "StripReport", "fold_bn", "FoldReport", "BNRemnant",
    "inspect_model", "Inspection", "max_output_difference",
    "recalibrate", "RecalibrationReport", "diagnose", "Diagnosis",
    "bn_scale_shift", "fold_bn_weights", "fold_bn_into_next_weights", "absorb_bias",
]
