"""Quantizer module: observer + (optionally learnable) scale/offset + the affine fake-quantizer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .affine import expand_qparam, fake_quantize, fake_quantize_fused, qparams_from_range, round_ste, stat_shape
from . import cpu_kernels
from .audit_state import Grid, active, register_grid, region
from .observers import batch_range, combine
from .qtype import QSpec


class NotCalibratedError(RuntimeError):
    """A quantizer was asked to quantize before any range was observed or loaded."""


class AccumulatorOverflowError(RuntimeError):
    """A bias does not fit the int32 accumulator grid (input scale x weight scale too fine): clipping it
    silently would change the model."""


class Quantizer(nn.Module):
    """Fake-quantizes a tensor onto the grid of ``spec``.

    States: ``enabled`` (False = identity, used to reproduce the float model exactly) and
    ``observing`` (update the range from each batch). Scale / zero point live in buffers (or
    parameters for LSQ/LSQ+), so they are saved in the state_dict. ``keep_neg_inf`` passes -inf
    through (attention masks entering a softmax).
    """

    def __init__(self, spec: QSpec, shape: Optional[Sequence[int]] = None, keep_neg_inf: bool = False):
        super().__init__()
        self.spec = spec
        self.keep_neg_inf = keep_neg_inf
        self.enabled = True
        self.observing = False
        known = spec.granularity == "tensor" or shape is not None
        sshape = stat_shape(tuple(shape), spec.granularity, spec.axis, spec.group_size) if shape is not None else ()
        if spec.learning != "none" and not known:
            raise ValueError("learnable per-channel/group quantizers need the tensor shape")
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("bits", torch.tensor(spec.bits, dtype=torch.int16))  # schedules may lower it
        self.register_buffer("lo", torch.zeros(sshape))
        self.register_buffer("hi", torch.zeros(sshape))
        if spec.learning in ("lsq", "lsq_plus"):
            self.scale = nn.Parameter(torch.ones(sshape))
        else:
            self.register_buffer("scale", torch.ones(sshape))
        if spec.learning == "lsq_plus":
            self.zero_point = nn.Parameter(torch.zeros(sshape))
        else:
            self.register_buffer("zero_point", torch.zeros(sshape))
        if spec.learning == "pact":
            self.alpha = nn.Parameter(torch.ones(()))

    def extra_repr(self) -> str:
        s = self.spec
        return (f"bits={s.bits}, {'signed' if s.signed else 'unsigned'}, "
                f"{'symmetric' if s.symmetric else 'affine'}, {s.granularity}, {s.observer}"
                + (f", {s.learning}" if s.learning != "none" else "") + (", pow2" if s.pow2 else ""))

    # --- range / parameters -------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo, hi = batch_range(x.float(), self.spec)
        if not bool(self.initialized):
            self._resize(lo.shape)
            self.lo.copy_(lo), self.hi.copy_(hi)
        else:
            nlo, nhi = combine(self.lo, self.hi, lo, hi, self.spec)
            self.lo.copy_(nlo), self.hi.copy_(nhi)
        self.apply_range()

    @torch.no_grad()
    def apply_range(self) -> None:
        """Scale and zero point (and PACT's clip) from the current range ``lo``/``hi``."""
        s, z = qparams_from_range(self.lo, self.hi, self.spec.qmin, self.spec.qmax,
                                  self.spec.symmetric, self.spec.pow2)
        self.scale.data = s.to(self.scale.dtype).clone()
        self.zero_point.data = z.to(self.zero_point.dtype).clone()
        if self.spec.learning == "pact":
            amax = torch.maximum(-self.lo, self.hi).max() if self.spec.signed else self.hi.max()
            self.alpha.data.fill_(float(amax.clamp(min=1e-8)))
        self.initialized.fill_(True)

    def _resize(self, shape: torch.Size) -> None:
        for name in ("lo", "hi", "scale", "zero_point"):
            t = getattr(self, name)
            if t.shape != shape:
                t.data = torch.zeros(shape, dtype=t.dtype, device=t.device)

    def set_bits(self, bits: int) -> None:
        """Change the bit width (progressive bit lowering); the range is kept, scale/zero point follow."""
        self.spec = self.spec.with_(bits=int(bits))
        self.bits.fill_(int(bits))
        if bool(self.initialized):
            self.apply_range()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # per-channel shapes are lazy
        if prefix + "bits" not in state_dict and prefix + "scale" in state_dict:  # written before bits was stored
            state_dict[prefix + "bits"] = torch.tensor(self.spec.bits, dtype=torch.int16)
        if prefix + "bits" in state_dict and int(state_dict[prefix + "bits"]) != self.spec.bits:
            self.spec = self.spec.with_(bits=int(state_dict[prefix + "bits"]))  # a schedule changed it
        for name in ("lo", "hi", "scale", "zero_point"):
            key = prefix + name
            if key in state_dict and getattr(self, name).shape != state_dict[key].shape:
                getattr(self, name).data = torch.zeros_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def qparams(self, ndim: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point broadcastable to a tensor of ``ndim`` dims (differentiable)."""
        scale, zp = self.raw_qparams()
        g = (self.spec.granularity, self.spec.axis, self.spec.group_size)
        return expand_qparam(scale, ndim, *g), expand_qparam(zp, ndim, *g)

    def raw_qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point in their stored (per tensor / channel / group) shape."""
        s = self.spec
        if s.learning == "pact":
            scale = self.alpha.abs() / s.qmax + 1e-8  # PACT: clip to [0|-alpha, alpha], zero point 0
            zp = torch.zeros_like(scale)
            if s.pow2:
                scale = scale + (torch.exp2(torch.ceil(torch.log2(scale))) - scale).detach()
        else:
            scale, zp = self.scale, self.zero_point
            if s.learning in ("lsq", "lsq_plus"):
                scale = scale.abs() + 1e-8
                if s.pow2:
                    scale = scale + (torch.exp2(torch.ceil(torch.log2(scale))) - scale).detach()
            if s.learning == "lsq_plus":
                zp = torch.clamp(round_ste(zp), s.qmin, s.qmax)
        return scale, zp

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        with region("requant", self, "quantize"):
            if self.observing:
                self.observe(x)
            if not bool(self.initialized):
                raise NotCalibratedError(
                    f"quantizer ({self.extra_repr()}) has no range: run calibrate() or load a state_dict")
            s = self.spec
            block = self._kernel_block(x)
            if block is not None:  # one pass, same values and gradients as the formula below
                raw_scale, raw_zp = self.raw_qparams()
                out = cpu_kernels.fake_quantize_blocks(x, raw_scale, raw_zp, block, s.qmin, s.qmax,
                                                       self.keep_neg_inf)
                if not active():
                    return out
            scale, zp = self.qparams(x.dim())
            if block is None:
                out = self._fake_quantize(x, scale, zp)
        register_grid(out, Grid(scale.detach(), zp.detach(), s.qmin, s.qmax, s.bits, self.keep_neg_inf))
        return out

    def _fake_quantize(self, x: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
        s = self.spec
        masked = torch.isneginf(x) if self.keep_neg_inf else None
        xin = torch.where(masked, torch.zeros_like(x), x) if masked is not None else x
        if self._fusable(x):  # same values and gradients, one kernel
            raw_scale, raw_zp = self.raw_qparams()
            axis = None if s.granularity == "tensor" else s.axis % x.dim()
            out = fake_quantize_fused(xin, raw_scale, raw_zp, s.qmin, s.qmax, axis)
        else:
            if s.learning in ("lsq", "lsq_plus") and self.training:
                g = 1.0 / (max(x.numel() // max(scale.numel(), 1), 1) * s.qmax) ** 0.5
                scale = (scale - scale * g).detach() + scale * g
            if s.learning == "pact":
                lo = -self.alpha if s.signed else torch.zeros_like(self.alpha)
                xin = torch.minimum(torch.maximum(xin, lo), self.alpha)
            out = fake_quantize(xin, scale.to(x.dtype), zp.to(x.dtype), s.qmin, s.qmax)
        return torch.where(masked, x, out) if masked is not None else out

    def _kernel_block(self, x: Tensor) -> Optional[int]:
        """Block size for the one-pass CPU kernel (fixed observer-set scales), or None."""
        s = self.spec
        if s.learning != "none" or not cpu_kernels.enabled():
            return None
        block = cpu_kernels.block_size(x, self.scale, s.granularity, s.axis, s.group_size)
        if block is not None and self.keep_neg_inf and block != x.numel():
            return None
        return block

    def _fusable(self, x: Tensor) -> bool:
        """Fixed (observer-set) scales on float32 per-tensor/per-channel grids take PyTorch's fused kernel."""
        s = self.spec
        return (s.learning == "none" and x.dtype == torch.float32 and s.granularity in ("tensor", "channel")
                and (s.granularity == "tensor" or self.scale.dim() == 1) and s.qmax - s.qmin < 2 ** 31)

    def current_scale(self) -> Tensor:
        """The (per-tensor or per-channel) scale currently in use, without broadcasting dims."""
        return self.raw_qparams()[0]


def quantize_bias(bias: Tensor, in_scale: Tensor, w_scale: Tensor, owner: nn.Module) -> Tensor:
    """Quantize a bias to int32 on the accumulator grid ``in_scale * w_scale`` (per output channel)."""
    if in_scale.numel() != 1:
        raise ValueError("bias quantization needs a per-tensor input scale")
    with region("requant", owner, "quantize_bias"):
        scale = (in_scale.reshape(()) * w_scale).to(bias.dtype)
        scale = scale.expand(bias.shape) if scale.numel() == 1 else scale.reshape(bias.shape)
        zp = torch.zeros_like(scale)
        qmin, qmax = -(2 ** 31), 2 ** 31 - 1
        # checked in eval mode (calibration, decoding, audit, export), not per training step: no host sync there
        codes = None if owner.training else (bias.detach() / scale.detach()).abs().max()
        if codes is not None and bool(codes > qmax):
            where = getattr(owner, "qasr_path", None) or type(owner).__name__
            raise AccumulatorOverflowError(
                f"bias of {where} needs {float(codes):.3g} codes on the int32 accumulator grid (max {qmax}): "
                f"its input x weight scale is too fine; use fewer input or weight bits for this op")
        out = fake_quantize(bias, scale, zp, qmin, qmax)
    register_grid(out, Grid(scale.detach(), zp, qmin, qmax, 32))
    return out
