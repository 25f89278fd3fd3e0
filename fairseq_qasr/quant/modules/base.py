"""One forward template for every quantized op:
input quantizers -> weight quantizers (+ int32 bias) -> compute on integer grids -> output quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..audit_state import region
from ..qtype import QSpec
from ..quantizer import Quantizer, quantize_bias


@dataclass(frozen=True)
class QConfig:
    """Specs for the roles of one quantized op. ``output=None``: the consumer's input quantizer
    requantizes (accumulators stay int32 until then)."""

    input: QSpec = QSpec()
    weight: QSpec = QSpec(symmetric=True, granularity="channel")
    output: Optional[QSpec] = None


class QModule(nn.Module):
    """Base class. Subclasses set ``op_type``, ``n_inputs``, ``weight_axes`` and implement ``compute``.

    ``weight_axes`` maps each quantized parameter name to its output-channel axis (None: per-tensor
    only). A parameter named ``bias`` is quantized to int32 on ``input_scale * weight_scale``.
    """

    op_type: ClassVar[str] = ""
    n_inputs: ClassVar[int] = 1
    weight_axes: ClassVar[Dict[str, Optional[int]]] = {}
    keep_neg_inf: ClassVar[bool] = False
    bias_frac_bits: ClassVar[Optional[int]] = None  # bias grid = w_scale * 2^-bits (no input scale)

    def __init__(self, qconfig: QConfig, weight_shapes: Optional[Dict[str, Sequence[int]]] = None):
        super().__init__()
        self.qconfig = qconfig
        self.in_q = nn.ModuleList(Quantizer(qconfig.input, keep_neg_inf=self.keep_neg_inf)
                                  for _ in range(self.n_inputs))
        shapes = weight_shapes or {}
        self.w_q = nn.ModuleDict({
            name: Quantizer(self._weight_spec(qconfig.weight, axis), shapes.get(name))
            for name, axis in self.weight_axes.items()})
        self.out_q = Quantizer(qconfig.output) if qconfig.output is not None else None

    @staticmethod
    def _weight_spec(spec: QSpec, axis: Optional[int]) -> QSpec:
        if axis is None:
            return spec.with_(granularity="tensor")
        if spec.granularity == "channel":
            return spec.with_(axis=axis)
        if spec.granularity == "group":
            return spec.with_(axis=axis + 1)  # groups run along the input-feature axis
        return spec

    def run(self, inputs: Sequence[Any], params: Dict[str, Optional[Tensor]], **kw: Any) -> Any:
        """The template every quantized op goes through."""
        xs = [q(x) for q, x in zip(self.in_q, inputs)] + list(inputs[self.n_inputs:])
        qp: Dict[str, Optional[Tensor]] = {}
        for name, p in params.items():
            if p is None or name == "bias":
                continue
            qp[name] = self.w_q[name](p) if name in self.w_q else p
        if params.get("bias") is not None:
            qp["bias"] = self._bias(params["bias"])
        with region("compute", self, self.op_type):
            y = self.compute(*xs, **qp, **kw)
        return self.out_q(y) if self.out_q is not None else y

    def _bias(self, bias: Tensor) -> Tensor:
        if not self.w_q["weight"].enabled:
            return bias
        return quantize_bias(bias, *self.bias_scales(bias.device), self)

    def bias_scales(self, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
        """(input scale, per-channel weight scale) whose product is the int32 bias grid."""
        wq = self.w_q["weight"]
        with region("requant", self, "bias_scale"):  # scale arithmetic, not data
            w_scale = wq.current_scale()
            if wq.spec.granularity == "group":  # finest accumulator grid of the row's groups
                w_scale = w_scale.amin(dim=-1)
            if self.bias_frac_bits is not None:
                in_scale = torch.tensor(2.0 ** -self.bias_frac_bits, device=device)
            else:
                in_scale = self.in_q[0].current_scale()
        return in_scale.detach(), w_scale.detach()

    def compute(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError

    def quantizers(self) -> Tuple[Quantizer, ...]:
        return tuple(m for m in self.modules() if isinstance(m, Quantizer))
