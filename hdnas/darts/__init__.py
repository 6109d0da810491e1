"""A drop-in faster backend for DARTS-family search code (DARTS, PC-DARTS, GDAS, FairDARTS).

Two lines make an existing DARTS search use it::

    import hdnas.darts
    hdnas.darts.patch(model)        # every MixedOp swapped in place, weights and BN state kept

``MixedOp`` (fused mixed op, recomputation), the weightings (``weighting``), the plain DARTS
candidate ops (``operations``) and a small DARTS search network (``model_search``) are here.
"""
from hdnas.darts.mixed import BACKENDS, DartsBackendError, MixedOp
from hdnas.darts.operations import OPS, PRIMITIVES, PlainMixedOp, channel_shuffle
from hdnas.darts.patch import PatchReport, patch
from hdnas.darts.weighting import (WEIGHTINGS, edge_weights, gdas_weights, sigmoid_weights,
                                   softmax_weights)

__all__ = ["BACKENDS", "DartsBackendError", "MixedOp", "OPS", "PRIMITIVES", "PatchReport",
           "PlainMixedOp", "channel_shuffle", "edge_weights", "gdas_weights", "patch",
           "sigmoid_weights", "softmax_weights", "WEIGHTINGS"]
