"""Quantized modules, all built on the one template in :mod:`.base`."""
from .activations import QGELU, QGLU, QLogSoftmax, QMaxPool, QMean, QReLU, QSiLU, QSoftmax, QSum
from .arith import QAdd, QMatMul, QMul, QSub
from .attention import QMultiheadAttention
from .base import QConfig, QModule
from .embedding import QEmbedding
from .linear import QConv1d, QConv2d, QLinear
from .norm import QLayerNorm

OP_CLASSES = {c.op_type: c for c in (QLinear, QConv1d, QConv2d, QEmbedding, QLayerNorm, QSoftmax,
                                     QLogSoftmax, QMatMul, QAdd, QSub, QMul, QGELU, QGLU, QReLU,
                                     QSiLU, QMaxPool, QMean, QSum)}

__all__ = ["QConfig", "QModule", "OP_CLASSES", "QMultiheadAttention"] + [c.__name__ for c in OP_CLASSES.values()]
