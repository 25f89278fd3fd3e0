"""Quantized element-wise activations, softmax and max-pooling (integer input -> function)."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import QConfig, QModule


class _QElementwise(QModule):
    """``fn(quantized x, **kw)``; with 2^bits input codes this is a look-up table in hardware."""

    fn: ClassVar[Callable[..., Tensor]]
    kw_names: ClassVar[tuple] = ()

    def __init__(self, qconfig: QConfig, **kw: Any):
        super().__init__(qconfig)
        self.kw = kw

    @classmethod
    def from_float(cls, m: nn.Module, qconfig: QConfig) -> "_QElementwise":
        return cls(qconfig, **{k: getattr(m, k) for k in cls.kw_names})

    def forward(self, x: Tensor, *args: Any, **kw: Any) -> Tensor:
        return self.run([x], {}, *args, **{**self.kw, **kw})

    def compute(self, x: Tensor, *args: Any, **kw: Any) -> Tensor:
        return type(self).fn(x, *args, **kw)


class QReLU(_QElementwise):
    op_type = "relu"
    fn = staticmethod(F.relu)


class QGELU(_QElementwise):
    op_type = "gelu"
    fn = staticmethod(F.gelu)
    kw_names = ("approximate",)


class QSiLU(_QElementwise):
    op_type = "silu"
    fn = staticmethod(F.silu)


class QGLU(_QElementwise):
    op_type = "glu"
    fn = staticmethod(F.glu)
    kw_names = ("dim",)


class QSoftmax(_QElementwise):
    """Softmax of integer scores; -inf (masked lanes) passes the input quantizer unchanged."""

    op_type = "softmax"
    fn = staticmethod(F.softmax)
    kw_names = ("dim",)
    keep_neg_inf = True


class QLogSoftmax(_QElementwise):
    op_type = "log_softmax"
    fn = staticmethod(F.log_softmax)
    kw_names = ("dim",)
    keep_neg_inf = True


class QMaxPool(_QElementwise):
    """Max-pooling: a comparison of integer codes, output stays on the input grid."""

    op_type = "max_pool"
    kw_names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")

    def __init__(self, qconfig: QConfig, nd: int = 2, **kw: Any):
        super().__init__(qconfig, **kw)
        self.nd = nd

    @classmethod
    def from_float(cls, m: nn.Module, qconfig: QConfig) -> "QMaxPool":
        if getattr(m, "return_indices", False):
            raise NotImplementedError("MaxPool with return_indices")
        nd = 1 if isinstance(m, nn.MaxPool1d) else 2
        return cls(qconfig, nd=nd, **{k: getattr(m, k) for k in cls.kw_names})

    def compute(self, x: Tensor, *args: Any, **kw: Any) -> Tensor:
        return (F.max_pool1d if self.nd == 1 else F.max_pool2d)(x, *args, **kw)


class QMean(_QElementwise):
    """Mean of integer codes: an integer sum times the constant 1/n."""

    op_type = "mean"
    fn = staticmethod(torch.mean)


class QSum(_QElementwise):
    op_type = "sum"
    fn = staticmethod(torch.sum)


ACTIVATION_FNS: dict[str, Optional[type]] = {
    "relu": QReLU, "gelu": QGELU, "silu": QSiLU, "glu": QGLU, "softmax": QSoftmax,
    "log_softmax": QLogSoftmax, "max_pool": QMaxPool, "mean": QMean, "sum": QSum}
