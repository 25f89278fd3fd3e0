"""All-integer inference engine for an exported (or in-memory quantized) ``qtransformer_conv``.

Plain torch, no fairseq. Data flow: input features are quantized once by the first op's input quantizer
(:meth:`IntegerEngine.quantize_input`, the only float op); from there every tensor is an integer tensor:

* ``QT``  — integer codes (int8 storage; unsigned grids are stored with an offset of -128, the zero point
  is shifted with them) of a quantizer grid ``s * (c - z)``.
* ``Acc`` — an int32/int64 accumulator on a grid known at compile time (per tensor or per output channel):
  GEMM results (bias folded in), LayerNorm outputs (``s_gain * 2^-16``), residual sums.

Every consumer's input quantizer turns the producer's ``Acc`` into its own codes by a fixed-point
multiplier and shift (``requant`` keys, one per consumer quantizer), exactly like the fake-quantized model
rounds the float value onto the consumer's grid.

One forward code serves two modes: *compile* (``IntegerEngine.from_quantized(model)``: the fake-quantized
model is at hand, each requantization site computes and records its integer constants — float arithmetic
at export time only) and *run* (every constant comes from ``self.t``, the integer tensors of the exported
file). ``strict`` run mode raises on a missing constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import cbuild, cgemm, cops
from . import kernels as K

NEG_LOGIT = -(2 ** 40)  # suppressed / forbidden logits (int64 grid)


@dataclass
class QT:
    c: Tensor            # integer codes (stored representation)
    z: int               # zero point in the stored representation
    scale: Any = None    # compile mode only
    on: Optional[str] = None  # path of the quantizer whose grid these codes are on
    aux: Optional[Dict[str, Tensor]] = None  # cached derived integer tensors (int32 copy, column sums)


@dataclass
class Acc:
    t: Tensor            # int32 / int64 accumulator
    scale: Any = None    # compile mode only: scalar tensor or per-last-dim tensor
    headroom: int = 0    # bits beyond the int32 range (int64 values; consumers' multipliers are shortened to match)
    group_src: Optional[Tuple[str, "QT"]] = None  # a grouped Linear's (name, input codes): consumers may fold

    @property
    def shape(self) -> torch.Size:
        return self.t.shape


class GemmAcc(Acc):
    """An Acc still to be computed by a GEMM: ``run(None)`` gives the accumulator (on first use of ``t``),
    ``run((m, shift, zp, qmin, qmax, dtype))`` the codes requantized in the GEMM's epilogue (the accumulator never
    reaches memory; :meth:`IntegerEngine.requant` does this when the accumulator is not needed otherwise)."""

    def __init__(self, run: Callable[[Optional[tuple]], Tensor], cols: int, scale: Any = None, headroom: int = 0,
                 lead: Tuple[int, ...] = (), fusable: bool = True):
        self.run, self.cols, self._t, self.scale, self.headroom = run, cols, None, scale, headroom
        self.lead, self.fusable = tuple(lead), fusable  # fusable=False: run(None) only (computed when first used)
        self.group_src: Optional[Tuple[str, QT]] = None

    @property
    def t(self) -> Tensor:
        if self._t is None:
            self._t = self.run(None)
        return self._t

    @property
    def shape(self) -> torch.Size:
        """The accumulator's shape, without running the GEMM."""
        return torch.Size((*self.lead, self.cols))


class AddAcc(Acc):
    """A residual add of 16-bit codes, still to be summed: :meth:`IntegerEngine.requant` puts it straight onto each
    consumer's grid with two full multipliers (:func:`kernels.add_requant_int`, exact in int64); ``t`` is the sum
    on the add's fine grid (files written before format version 2, and any other use)."""

    def __init__(self, qa: QT, qb: QT, sum_fn: Callable[[QT, QT], Tensor], scale: Any = None, headroom: int = 0):
        self.qa, self.qb, self.sum_fn, self._t, self.scale, self.headroom = qa, qb, sum_fn, None, scale, headroom

    @property
    def t(self) -> Tensor:
        if self._t is None:
            self._t = self.sum_fn(self.qa, self.qb)
        return self._t

    @property
    def shape(self) -> torch.Size:
        return self.qa.c.shape

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "AddAcc":
        """The same add over ``fn`` of both operands' codes (row selection, slicing)."""
        qa, qb = (QT(fn(q.c), q.z, q.scale, q.on) for q in (self.qa, self.qb))
        return AddAcc(qa, qb, self.sum_fn, self.scale, self.headroom)


class LNAcc(Acc):
    """A LayerNorm's output, still to be computed: :meth:`IntegerEngine.requant` puts it straight onto each
    consumer's grid, rounded once from the exact row statistics (:func:`kernels.layer_norm_exact`, format version 5);
    ``t`` is the fixed-point output ``xhat * gain + bias`` of files before version 5 (and any other use)."""

    def __init__(self, name: str, q: QT, run: Callable[[QT], Tensor], scale: Any = None, headroom: int = 0):
        self.name, self.q, self.run, self._t, self.scale, self.headroom = name, q, run, None, scale, headroom
        self.group_src = None

    @property
    def t(self) -> Tensor:
        if self._t is None:
            self._t = self.run(self.q)
        return self._t

    @property
    def shape(self) -> torch.Size:
        return self.q.c.shape

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "LNAcc":
        """The same LayerNorm over ``fn`` of the input codes (row selection, slicing)."""
        return LNAcc(self.name, QT(fn(self.q.c), self.q.z, self.q.scale, self.q.on), self.run, self.scale,
                     self.headroom)


def _has(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _storage(qmin: int, qmax: int) -> Tuple[int, torch.dtype]:
    """(offset, dtype) of the stored codes of a [qmin, qmax] grid: int8 when it fits (unsigned 8-bit
    grids shifted by -128), else int32."""
    if qmin >= -128 and qmax <= 127:
        return 0, torch.int8
    if qmax - qmin <= 255:
        return -128 - qmin, torch.int8
    return 0, torch.int32


class IntegerEngine:
    def __init__(self, cfg: Dict[str, Any], tensors: Dict[str, Tensor], meta: Dict[str, Any],
                 src: Optional[torch.nn.Module] = None):
        self.cfg = cfg
        self.t = tensors            # every integer constant (weights unpacked to int8)
        self.meta = meta            # per-key integer scalars: zero points, ranges, shifts ...
        self.src = src              # compile mode: the fake-quantized model
        self.scales: Dict[str, Any] = {}  # compile mode: float scales (documentation in the export header)
        self.fused = False  # torch.compile'd integer kernels for the hot paths (same results; see fused.py)
        self.hook = None  # tests: hook(quantizer_path, qt, masked) sees (and may replace) every code tensor
        self._prep: Dict[str, Tensor] = {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_quantized(cls, model: torch.nn.Module, cfg: Dict[str, Any], example_len: int = 64) -> "IntegerEngine":
        """Compile a fake-quantized, calibrated ``QTransformerConvModel`` (eval mode): one dummy pass of the
        encoder and of full + incremental decoding records every integer constant."""
        eng = cls(dict(cfg), {}, {}, src=model)
        feats = torch.zeros(1, example_len, cfg["input_feat_per_channel"])
        with torch.no_grad():
            enc = eng.encode(eng.quantize_input(feats), torch.tensor([example_len]))
            eng.decode_step(torch.tensor([[2, 4]]), enc, None)
            state: Dict[str, Any] = {}
            eng.decode_step(torch.tensor([[2]]), enc, state)
            lg = eng.decode_step(torch.tensor([[2, 4]]), enc, state)
            if _has(model, "decoder.output_log_softmax.in_q.0"):
                eng.log_probs(lg)
        eng.src = None
        return eng

    @property
    def compiling(self) -> bool:
        return self.src is not None

    def _quantizer(self, path: str):
        return self.src.get_submodule(path)

    def _qinfo(self, path: str) -> Tuple[int, int, int]:
        """(zero point, qmin, qmax) of a per-tensor quantizer; recorded in ``meta`` at compile time."""
        key = "q:" + path
        if self.compiling and key not in self.meta:
            q = self._quantizer(path)
            scale, zp = q.raw_qparams()
            if scale.numel() != 1:
                raise NotImplementedError(f"{path}: activation quantizers must be per tensor")
            self.meta[key] = dict(zp=int(zp.reshape(())), qmin=q.spec.qmin, qmax=q.spec.qmax, bits=q.spec.bits,
                                  signed=q.spec.signed)
            self.scales[path] = float(scale.reshape(()))
        m = self.meta[key]
        return m["zp"], m["qmin"], m["qmax"]

    def _scale(self, path: str) -> Tensor:
        return self._quantizer(path).raw_qparams()[0].detach().double()

    def _store(self, name: str, fn):
        if name not in self.t:
            if not self.compiling:
                raise KeyError(f"exported model lacks integer constant {name!r}")
            self.t[name] = fn()
        return self.t[name]

    # ---------------------------------------------------------------- requantization
    def requant(self, x, qpath: str, masked: Optional[Tensor] = None) -> QT:
        """Codes of ``x`` (an Acc or a QT on another grid) on the grid of quantizer ``qpath``."""
        if isinstance(x, QT) and x.on == qpath:
            return x
        zp, qmin, qmax = self._qinfo(qpath)
        off, dtype = _storage(qmin, qmax)
        if isinstance(x, AddAcc) and (self.compiling or "rqa:" + qpath in self.t):
            return self._add_requant(x, qpath, zp + off, qmin + off, qmax + off, dtype, masked)
        if isinstance(x, LNAcc) and ((self.compiling and self.EXACT_MULTIPLIERS) or "lnq:" + qpath in self.t):
            return self._ln_requant(x, qpath, zp + off, qmin + off, qmax + off, dtype, masked)
        key = "rq:" + qpath
        if isinstance(x, Acc) and x.group_src is not None and ((self.compiling and self.FOLD_GROUPS)
                                                               or "gq:" + qpath + ".r" in self.t):
            x, key = self._folded_group_acc(x.group_src, qpath), "rqg:" + qpath
        if isinstance(x, Acc):
            acc = x
        elif self.compiling:
            acc = Acc((x.c.int() - x.z) if x.z else x.c, x.scale)
        else:
            acc = None  # codes: the kernels subtract the zero point themselves
        if self.compiling and key + ".m" not in self.t:
            self.t[key + ".m"], self.t[key + ".sh"] = self._multiplier(acc.scale, self._scale(qpath), acc.headroom)
        m, sh = self._mult(key)
        if self._identity(key, x, zp + off, qmin, qmax):  # same grid (e.g. softmax out_q -> matmul in_q)
            c = x.c
        elif self.fused and not self.compiling and dtype == torch.int8:
            from . import fused
            if isinstance(x, QT):
                c = fused.requant(x.c, m, sh, zp + off, qmin + off, qmax + off, sub=x.z)
            else:
                c = fused.requant(acc.t, m, sh, zp + off, qmin + off, qmax + off)
        elif isinstance(x, GemmAcc) and x._t is None and x.fusable and self.FUSE_REQUANT \
                and (m.numel() == 1 or m.numel() == m.shape[-1] == x.cols):
            c = x.run((m, sh, zp + off, qmin + off, qmax + off, dtype))  # requantized in the GEMM's epilogue
        elif isinstance(x, QT):  # codes minus their zero point, inside the kernel
            c = K.requantize(x.c, m, sh, zp + off, qmin + off, qmax + off, dtype, sub=x.z)
        else:
            c = K.requantize(acc.t, m, sh, zp + off, qmin + off, qmax + off, dtype)
        out = QT(c, zp + off, self._scale(qpath).reshape(()) if self.compiling else None, qpath)
        self._emit(qpath, out, masked)
        return out

    def _add_requant(self, x: AddAcc, qpath: str, zp: int, qmin: int, qmax: int, dtype: torch.dtype,
                     masked: Optional[Tensor]) -> QT:
        """A residual add of 16-bit codes straight onto ``qpath``'s grid: ``rqa:<qpath>`` = (ma, ta, mb, tb, sh)."""
        key = "rqa:" + qpath
        if self.compiling and key not in self.t:
            s_out = float(self._scale(qpath).reshape(()))
            add_mult = K.add_multipliers_exact if self.EXACT_MULTIPLIERS else K.add_multipliers
            self.t[key] = torch.tensor(add_mult(float(x.qa.scale), float(x.qb.scale), s_out), dtype=torch.int64)
            # also the fine sum's multiplier, for a caller that takes the sum itself (``x.t``: e.g. the encoder
            # output of a pre-norm model without a final LayerNorm, handed through fairseq as a tensor)
            self.t["rq:" + qpath + ".m"], self.t["rq:" + qpath + ".sh"] = self._multiplier(
                x.scale, self._scale(qpath), x.headroom)
        ma, ta, mb, tb, sh, *low = (int(v) for v in self.t[key])  # (format version 5: two-word, + la, lb)
        c = K.add_requant_int(x.qa.c, x.qa.z, ma, ta, x.qb.c, x.qb.z, mb, tb, sh, zp, qmin, qmax, dtype, *low)
        out = QT(c, zp, self._scale(qpath).reshape(()) if self.compiling else None, qpath)
        self._emit(qpath, out, masked)
        return out

    def _ln_requant(self, x: LNAcc, qpath: str, zp: int, qmin: int, qmax: int, dtype: torch.dtype,
                    masked: Optional[Tensor]) -> QT:
        """A LayerNorm straight onto ``qpath``'s grid from its exact row statistics (:func:`kernels.layer_norm_exact`):
        ``lnq:<qpath>`` = [mA, SA, S, Em, Ee, Eint], ``lnq:<qpath>.bh/.bl`` the bias words."""
        key = "lnq:" + qpath
        name, gain = x.name, self.t["lng:" + x.name]
        if self.compiling and key not in self.t:
            mod = self._quantizer(name)
            n = gain.numel()
            g = self.meta["lng_bits:" + name]
            _, iqmin, iqmax = self._qinfo(name + ".in_q.0")
            umax = n * (iqmax - iqmin) * max(abs(int(g["qmin"])), abs(int(g["qmax"])))
            ints, bh, bl = K.ln_exact_constants(n, float(mod.eps), float(self.scales[name + ".in_q.0"]),
                                                float(self.scales[name + ".w_q.weight"]),
                                                float(self._scale(qpath).reshape(())), self.t.get("b:" + name), umax)
            self.t[key], self.t[key + ".bh"], self.t[key + ".bl"] = torch.tensor(ints, dtype=torch.int64), bh, bl
            self.meta["ln_exact:" + name] = True  # (memory_tensor: the encoder output carried as these input codes)
        c = K.layer_norm_exact(x.q.c, gain, self.t[key + ".bh"], self.t[key + ".bl"], self.t[key].tolist(), zp, qmin,
                               qmax, dtype)
        out = QT(c, zp, self._scale(qpath).reshape(()) if self.compiling else None, qpath)
        self._emit(qpath, out, masked)
        return out

    def _requant_as(self, done: QT, same_source: bool, x, qpath: str) -> QT:
        """``requant(x, qpath)``, reusing ``done`` (codes of ``x`` when ``same_source``) where ``qpath``'s grid and
        multiplier equal those of ``done`` (self-attention's q/k/v inputs share one grid): no second pass over ``x``.
        Not while a hook watches each quantizer or while compiling."""
        if same_source and self.hook is None and not self.compiling and self._same_grid(done.on, qpath):
            return QT(done.c, done.z, done.scale, qpath)
        return self.requant(x, qpath)

    def _same_grid(self, a: str, b: str) -> bool:
        """Quantizers ``a`` and ``b`` have one grid and one multiplier from their source (cached)."""
        flag = self._prep.get("same:" + a + ":" + b)
        if flag is None and ("lnq:" + a in self.t or "lnq:" + b in self.t):  # exact LayerNorm outputs
            flag = self._prep["same:" + a + ":" + b] = self._qinfo(a) == self._qinfo(b) and all(
                f"lnq:{q}{k}" in self.t for q in (a, b) for k in ("", ".bh", ".bl")) and all(
                torch.equal(self.t[f"lnq:{a}{k}"], self.t[f"lnq:{b}{k}"]) for k in ("", ".bh", ".bl"))
        if flag is None:
            fa, fb = ("gq:" + a + ".r" in self.t), ("gq:" + b + ".r" in self.t)  # folded grouped Linear outputs
            (ma, sa), (mb, sb) = self._mult(self._rq_key(a)), self._mult(self._rq_key(b))
            flag = fa == fb and self._qinfo(a) == self._qinfo(b) and ma.shape == mb.shape and torch.equal(ma, mb) \
                and torch.equal(sa, sb) and (not fa or all(torch.equal(self.t[f"gq:{a}.{k}"], self.t[f"gq:{b}.{k}"])
                                                           for k in "rb"))
            self._prep["same:" + a + ":" + b] = flag
        return flag

    def _rq_key(self, qpath: str) -> str:
        """The requantization constants' key of quantizer ``qpath``: ``rqg:`` where a grouped Linear's output folds
        into it (:meth:`_folded_group_acc`), else ``rq:``."""
        return ("rqg:" if "gq:" + qpath + ".r" in self.t else "rq:") + qpath

    def _identity(self, key: str, x, zp: int, qmin: int, qmax: int) -> bool:
        """True when ``x`` already holds the codes: multiplier exactly 1, same zero point and range."""
        if not isinstance(x, QT) or x.on is None or x.z != zp or self.compiling:
            return False
        flag = self._prep.get("id:" + key)
        if flag is None:
            m, sh = self._mult(key)
            src = self.meta.get("q:" + x.on)
            flag = bool(m.numel() == 1 and int(sh) < 63 and int(m) == 1 << int(sh) and src is not None
                        and src["qmin"] == qmin and src["qmax"] == qmax)
            self._prep["id:" + key] = flag
        return flag

    def _emit(self, path: str, out: QT, masked: Optional[Tensor]) -> None:
        if self.hook is not None:
            self.hook(path, out, masked)

    def _multiplier(self, num, s_out: Tensor, headroom: int) -> Tuple[Tensor, Tensor]:
        """Compile time: the requantization multiplier ``num / s_out`` (per tensor or per channel): two words, 62 bits
        of the exact ratio (:func:`kernels.quantize_multiplier_exact`; int64 accumulators of up to 62 bits take the
        kernels' 128-bit / limb arithmetic); with ``EXACT_MULTIPLIERS`` off, as before format version 5, one word of
        ``31 - headroom`` bits."""
        num = torch.as_tensor(num, dtype=torch.float64)
        if self.EXACT_MULTIPLIERS and headroom <= 31:
            m, sh = K.quantize_multiplier_exact(num, s_out.reshape(()))
            return m, sh.to(torch.int8)
        return K.shorten_multiplier(*K.quantize_multiplier(num / s_out.reshape(())), headroom)

    def _mult(self, key: str) -> Tuple[Tensor, Tensor]:
        p = self._prep.get(key)
        if p is None:
            m, sh = self.t[key + ".m"].long(), self.t[key + ".sh"].long()
            if m.numel() == 1:
                m, sh = m.reshape(()), sh.reshape(())
            p = self._prep[key] = (m, sh)
        return p

    def quantize_input(self, feats: Tensor) -> QT:
        """The input quantizer of the first op: the one float -> integer step (features are float)."""
        first = self._first_op()
        zp, qmin, qmax = self._qinfo(first + ".in_q.0")
        off, dtype = _storage(qmin, qmax)
        if "input.scale" not in self.meta:
            self.meta["input.scale"] = float(self._scale(first + ".in_q.0"))
        s = torch.tensor(self.meta["input.scale"], dtype=feats.dtype)
        if self._input_rounding() == "reciprocal":  # PyTorch's fused fake-quantize: nearbyint(x * (1.0f / s))
            c = torch.round(feats * (torch.tensor(1.0, dtype=feats.dtype) / s))
        else:  # the numba fake-quantize kernel: rint(x / s), true division
            c = torch.round(feats / s.expand_as(feats))
        c = torch.clamp(c + zp, qmin, qmax)
        return QT((c + off).to(dtype), zp + off, s.double() if self.compiling else None, first + ".in_q.0")

    def _input_rounding(self) -> str:
        """How the fake model's input quantizer computes codes, so that the engine rounds every input like it: the
        conv1d front-end quantizes a transposed (non-contiguous) view, which takes PyTorch's fused kernel (multiply
        by the float32 reciprocal); the vgg2d front-end's contiguous input takes the numba kernel (true division)
        where numba is installed. The two differ on rare ties (1 of 240 000 dev-clean input codes, then 17 LSB of
        the 16-bit grid after conv1)."""
        mode = self.meta.get("input.rounding")
        if mode is None:
            from fairseq_qasr.quant import cpu_kernels
            mode = "divide" if self.cfg["encoder_frontend"] == "vgg2d" and cpu_kernels.enabled() else "reciprocal"
            self.meta["input.rounding"] = mode
        return mode

    def _first_op(self) -> str:
        if self.cfg["encoder_frontend"] == "vgg2d":
            return "encoder.frontend.blocks.0.0"
        return "encoder.frontend.conv1"

    # ---------------------------------------------------------------- ops
    GROUP_FRAC_BITS = 24  # fixed-point fraction of the per-group scale ratios s_group / s_row (<= 1): far below
    #                       one LSB of a 16-bit consumer grid (16 bits were not; files store the value they used)
    SOFTMAX_EXP_FRAC_BITS = 30  # fraction bits of the softmax exp tables
    LN_FRAC_BITS = 24  # fraction bits of the normalized LayerNorm input (16 before format version 3: its rounding
    #                    times the gain moved 8-bit outputs by one code where the fake model's did not)
    WIDE_ACC_BITS = 12  # headroom of int64 accumulators of 16-bit x 16-bit products (|acc| < 2^43)
    ADD_FRAC_BITS = 14  # residual adds of 8-bit codes sum on max(s_a, s_b) * 2^-14 (int32)
    ADD_FRAC_BITS_WIDE = 22  # ... of 16-bit codes on max(s_a, s_b) * 2^-22 (int64): factor and multiplier
    #                          rounding balanced (2^-23 and 2^-23 relative), ~1/64 LSB of a 16-bit code
    FUSE_REQUANT = True  # Linears on the C kernels: the consumer's requantization runs in the GEMM's epilogue
    GROUP_ACC_FRAC_BITS = 8  # grouped accumulators keep 8 more fractional bits (int64, |acc| < 2^39)
    FOLD_GROUPS = True  # compile grouped Linears with their consumer's multiplier folded into the group ratios
    EXACT_MULTIPLIERS = True  # compile two-word (62-bit) multipliers from the exact scale ratios (format version 5)
    #                     (format version 4); False: consumer-independent ratios, as version 3 files hold

    def linear(self, name: str, x: QT) -> Acc:
        """Linear / conv-as-GEMM ``name`` on codes already on its input grid; int32 accumulator. Per-group
        weights: one int32 GEMM per group, combined with integer ratios ``round(s_g / s_row * 2^16)`` (``s_row``
        = the row's largest group scale, so ratios are <= 1 and the sum stays in the int32 accumulator range:
        with 8 extra fractional bits, int64; consumers' multipliers are shortened by 8 bits so the 64-bit
        product ``acc * multiplier`` cannot overflow)."""
        w_t, bias_eff = self._linear_params(name, x.z)
        scale = None
        if self.compiling:
            scale = self._scale(name + ".in_q.0").reshape(()) * self._row_scale(name)
        ratios = self.t.get("gk:" + name)
        if ratios is not None:
            f = self.GROUP_ACC_FRAC_BITS
            if not self.compiling:  # lazy: a folding consumer computes its own sum; on the C kernels the consumer's
                avx2 = K.int8_gemm_backend() == "avx2"  # requantization may fuse into the epilogue
                acc = GemmAcc(lambda rq: self._grouped_gemm(name, x, ratios, rq), ratios.shape[0], None, f,
                              x.c.shape[:-1], fusable=avx2)
            else:
                acc = Acc(self._grouped_gemm(name, x, ratios), scale * 2.0 ** -f if scale is not None else None, f)
            acc.group_src = (name, x)
            return acc
        if x.c.dtype != torch.int8:  # 16-bit codes: exact int64 accumulator (int32 could overflow at K = 1536)
            prepared = self._prep.get("linw:" + name)
            if prepared is None and K.int8_gemm_backend() == "avx2":
                prepared = self._prep["linw:" + name] = cgemm.pack(w_t, wide=True)
            return Acc(K.linear_int(x.c, w_t, bias_eff.long(), prepared), scale, self._wide_headroom(x, w_t.shape[0]))
        small = x.c.numel() // x.c.shape[-1] <= K.SMALL_M and K.int8_gemm_backend() != "avx2"  # decoder: int32
        key = ("lin32:" if small else "linp:") + name
        prepared = self._prep.get(key)  # the weights in the GEMM backend's layout, cached
        if prepared is None:
            prepared = self._prep[key] = w_t.int() if small else K.prepare_weight(w_t)
        if isinstance(prepared, cgemm.Packed) and not self.compiling and self.FUSE_REQUANT:
            def run(rq: Optional[tuple]) -> Tensor:  # the consumer's requantization in the int32 epilogue
                if rq is None:
                    return K.linear_int(x.c, w_t, bias_eff, prepared)
                out = cgemm.mm(x.c.reshape(-1, x.c.shape[-1]), prepared, bias=bias_eff, requant=rq)
                return out.view(*x.c.shape[:-1], w_t.shape[1])
            return GemmAcc(run, w_t.shape[1], None, 0, x.c.shape[:-1])
        acc = K.linear_int(x.c, w_t, bias_eff, prepared)
        return Acc(acc, scale)

    def _wide_headroom(self, x: QT, k: int) -> int:
        """Bits beyond int32 that ``k`` products of ``x``'s codes (minus zero point) and int8 weights can need."""
        return max(0, math.ceil(math.log2(k * self._code_span(x) * 128 + 2 ** 31)) - 31)

    def _code_span(self, x: QT) -> int:
        """The largest ``|code - zero point|`` of ``x``'s grid (16 bits where its quantizer is unknown)."""
        _, qmin, qmax = self._qinfo(x.on) if x.on else (x.z, -(2 ** 15), 2 ** 16 - 1)
        off, _ = _storage(qmin, qmax)
        return max(abs(qmin + off - x.z), abs(qmax + off - x.z))

    def _grouped_gemm(self, name: str, x: QT, ratios: Tensor, requant: Optional[tuple] = None,
                      fold: Optional[str] = None) -> Tensor:
        """The grouped Linear's int64 accumulator; with ``requant`` (C kernels only) its codes on a grid instead.
        ``fold``: a consumer's quantizer path; ``ratios`` are then its folded ratios (:meth:`_folded_group_acc`),
        the sum is not rounded and the bias is ``gq:<fold>.b``."""
        gs = int(self.meta["w:" + name]["group_size"])
        lead = x.c.shape[:-1]
        xc = x.c.reshape(-1, x.c.shape[-1])
        if fold is None:
            shift = int(self.meta.get("group_frac_bits", 16)) - self.GROUP_ACC_FRAC_BITS  # 16: files before session 3
        else:
            shift = 0
        tag = name if fold is None else name + "|" + fold
        if fold is not None and "gq:" + fold + ".rl" in self.t:  # two-word ratios (format version 5)
            return self._grouped_gemm_two_word(name, x, fold, requant)

        def bias() -> Tensor:  # on the sum's grid: the folded consumer's, or the ratios' (rounded by 2^shift)
            return self.t["gq:" + fold + ".b"] if fold is not None else self._group_bias(name, ratios, shift)
        if K.int8_gemm_backend() == "avx2":  # all groups, rounding and bias in one pass
            packed = self._prep.get("grpc:" + tag)
            if packed is None:
                pk = cgemm.pack(self._linear_params(name, x.z)[0], gs, ratios)
                post = torch.zeros(pk.np_, dtype=torch.int64)  # padded to the kernel's column count
                post[:pk.n] = bias()
                packed = self._prep["grpc:" + tag] = (pk, post)
            return cgemm.mm(xc, packed[0], x.z, rshift=shift, post=packed[1], requant=requant).view(*lead, ratios.shape[0])
        else:  # one int32 GEMM per group
            groups = self._prep.get("grp:" + tag)
            if groups is None:  # per group: contiguous [gs, N] weight slice, its column sums, the int64 ratios
                w_t = self._linear_params(name, x.z)[0]
                groups = self._prep["grp:" + tag] = [
                    (w_t[g * gs:(g + 1) * gs].contiguous(), w_t[g * gs:(g + 1) * gs].int().sum(0),
                     ratios[:, g].long()) for g in range(ratios.shape[1])]
            total = torch.zeros(xc.shape[0], groups[0][0].shape[1], dtype=torch.int64)
            for g, (w_g, colsum, ratio) in enumerate(groups):
                part = K.linear_int(xc[:, g * gs:(g + 1) * gs].contiguous(), w_g, -x.z * colsum if x.z else None)
                total += part.long() * ratio
        acc = (total + (1 << (shift - 1))) >> shift if shift else total
        acc += bias()
        return acc.view(*lead, acc.shape[-1])

    def _grouped_gemm_two_word(self, name: str, x: QT, fold: str, requant: Optional[tuple]) -> Tensor:
        """The folded sum with two-word ratios ``R = r 2^L + rl`` and bias ``B = b 2^L + bl`` (``L = gq:<fold>.ls``):
        ``v = (sum_g r_g GEMM_g + b) + floor((sum_g rl_g GEMM_g + bl) / 2^L)``, exactly ``floor((sum_g R_g GEMM_g +
        B) / 2^L)``, so the consumer's rounding by ``2^S`` is that of the exact sum at ``S + L`` bits. The C kernel
        multiplies each group's int32 partial sum by both words and requantizes in its epilogue; elsewhere each
        group's int32 GEMM is taken times both words."""
        key = "gq:" + fold
        hi, lo, L = self.t[key + ".r"], self.t[key + ".rl"], int(self.t[key + ".ls"])
        gs = int(self.meta["w:" + name]["group_size"])
        lead, n = x.c.shape[:-1], hi.shape[0]
        xc = x.c.reshape(-1, x.c.shape[-1])
        if K.int8_gemm_backend() == "avx2":
            packed = self._prep.get("grpc2:" + name + "|" + fold)
            if packed is None:
                pk = cgemm.pack(self._linear_params(name, x.z)[0], gs, hi, ratio_lo=lo, lshift=L)
                post = torch.zeros(2 * pk.np_, dtype=torch.int64)
                post[:n], post[pk.np_:pk.np_ + n] = self.t[key + ".b"], self.t[key + ".bl"]
                packed = self._prep["grpc2:" + name + "|" + fold] = (pk, post)
            return cgemm.mm(xc, packed[0], x.z, post=packed[1], requant=requant).view(*lead, n)
        else:
            groups = self._prep.get("grp2:" + name + "|" + fold)
            if groups is None:
                w_t = self._linear_params(name, x.z)[0]
                groups = self._prep["grp2:" + name + "|" + fold] = [
                    (w_t[g * gs:(g + 1) * gs].contiguous(), w_t[g * gs:(g + 1) * gs].int().sum(0), hi[:, g].long(),
                     lo[:, g].long()) for g in range(hi.shape[1])]
            v_hi = self.t[key + ".b"].expand(xc.shape[0], n).clone()
            v_lo = self.t[key + ".bl"].expand(xc.shape[0], n).clone()
            for g, (w_g, colsum, r_hi, r_lo) in enumerate(groups):
                part = K.linear_int(xc[:, g * gs:(g + 1) * gs].contiguous(), w_g, -x.z * colsum if x.z else None).long()
                v_hi += part * r_hi
                v_lo += part * r_lo
        v = (v_hi + (v_lo >> L)).reshape(*lead, n)
        if requant is not None:
            m, sh, zp, qmin, qmax, dtype = requant
            return K.requantize(v, m, sh, zp, qmin, qmax, dtype)
        return v

    def _folded_group_acc(self, src: Tuple[str, QT], qpath: str) -> Acc:
        """A grouped Linear's output with its consumer ``qpath``'s multiplier folded into the group ratios:
        ``v = sum_g R[:, g] * GEMM_g + B`` (int64, exact) with ``R = round(s_in s_g / s_out * 2^S)`` (at most
        ``2^30``, fewer bits where a 16-bit input could overflow int64) and the bias ``B`` on the same grid; the
        consumer rounds ``v`` by ``2^S`` (``rqg:<qpath>``: multiplier 1, shift S). One rounding of the exact sum
        against the fake model's ``round(sum_g s_in s_g GEMM_g / s_out)``, where consumer-independent ratios and a
        shortened multiplier (:meth:`linear`) rounded three times (format version 4)."""
        name, x = src
        key = "gq:" + qpath
        if self.compiling and key + ".r" not in self.t:
            self._fold_group_constants(name, x, qpath)
        ratios = self.t[key + ".r"]
        if K.int8_gemm_backend() == "avx2" and not self.compiling:
            acc = GemmAcc(lambda rq: self._grouped_gemm(name, x, ratios, rq, fold=qpath), ratios.shape[0], None, 0,
                          x.c.shape[:-1])
        else:
            scale = self._scale(qpath).reshape(()) * 2.0 ** -int(self.t["rqg:" + qpath + ".sh"]) \
                if self.compiling else None
            acc = Acc(self._grouped_gemm(name, x, ratios, fold=qpath), scale, 0)
        return acc

    def _fold_group_constants(self, name: str, x: QT, qpath: str) -> None:
        """Compile :meth:`_folded_group_acc`'s ratios, bias and shift for Linear ``name`` feeding ``qpath``."""
        wq = self._quantizer(name).w_q["weight"]
        s_g = wq.raw_qparams()[0].detach().double()  # [N, groups]
        s_in, s_out = self._scale(name + ".in_q.0").reshape(()), self._scale(qpath).reshape(())
        M = s_in * s_g / s_out
        wmax = max(abs(int(self.meta["w:" + name]["qmin"])), abs(int(self.meta["w:" + name]["qmax"])))
        k = s_g.shape[1] * int(self.meta["w:" + name]["group_size"])
        bound = math.ceil(math.log2(k * self._code_span(x) * wmax))
        bits = min(30, 61 - bound)  # |sum_g R GEMM_g| < 2^61: the kernels' int64 epilogue
        S = bits - 1 - math.floor(math.log2(float(M.max())))
        if not 1 <= S <= 62 or bits < 16:
            raise NotImplementedError(f"{name} -> {qpath}: group ratios {float(M.min()):.3g}..{float(M.max()):.3g} "
                                      f"do not fold into int32 with a shift in [1, 62]")
        bias = self.t.get("b:" + name)
        # the fake model's bias grid s_in * min_g s_g (finest group) or s_in * max_g s_g
        grid = None if bias is None else \
            s_g.amin(dim=1) if self.meta.get("bias_grid:" + name) == "finest_group" else s_g.amax(dim=1)
        if self.EXACT_MULTIPLIERS:  # two words: R = r 2^L + rl, B = b 2^L + bl from the exact scale ratios
            L = bits  # (the low words' sums bounded as the high words')
            r, rl = K.exact_fixed_point([s_in, s_g], s_out, S + L, L)
            self.t["gq:" + qpath + ".r"], self.t["gq:" + qpath + ".rl"] = r.to(torch.int32), rl.to(torch.int32)
            b, bl = K.exact_fixed_point([bias.double(), s_in, grid], s_out, S + L, L) if bias is not None else \
                (torch.zeros(M.shape[0], dtype=torch.int64), torch.zeros(M.shape[0], dtype=torch.int64))
            self.t["gq:" + qpath + ".b"], self.t["gq:" + qpath + ".bl"] = b, bl
            self.t["gq:" + qpath + ".ls"] = torch.tensor(L, dtype=torch.int8)
        else:
            self.t["gq:" + qpath + ".r"] = torch.round(M * 2.0 ** S).to(torch.int32)
            self.t["gq:" + qpath + ".b"] = torch.zeros(M.shape[0], dtype=torch.int64) if bias is None else \
                torch.round(bias.double() * s_in * grid / s_out * 2.0 ** S).long()
        self.t["rqg:" + qpath + ".m"] = torch.tensor(1, dtype=torch.int32)
        self.t["rqg:" + qpath + ".sh"] = torch.tensor(S, dtype=torch.int8)

    def _group_bias(self, name: str, ratios: Tensor, shift: int) -> Tensor:
        """The grouped Linear's bias on its accumulator grid (int64 per output channel; zeros without a bias),
        computed once per layer."""
        key = "gbias:" + name
        t = self._prep.get(key)
        if t is None:
            bias = self.t.get("b:" + name)
            if bias is not None and self.meta.get("bias_grid:" + name) == "finest_group":
                # the fake model's bias grid is s_in * min_g s_g (its finest group), i.e. ratio min_g gk of the row's
                # accumulator grid s_in * max_g s_g: the same fixed-point ratio as the finest group's GEMM
                t = (bias.long() * ratios.amin(dim=1).long() + (1 << (shift - 1))) >> shift
            elif bias is not None:
                t = bias.long() << self.GROUP_ACC_FRAC_BITS
            else:
                t = torch.zeros(ratios.shape[0], dtype=torch.int64)
            self._prep[key] = t
        return t

    def _row_scale(self, name: str) -> Tensor:
        """Per-output-channel scale of the accumulator: the weight scale, or for per-group weights the
        largest group scale of the row."""
        s = self._scale(name + ".w_q.weight")
        return s.amax(dim=-1) if s.dim() == 2 else s.reshape(-1)

    def _linear_params(self, name: str, zx: int) -> Tuple[Tensor, Optional[Tensor]]:
        key = "lin:" + name
        p = self._prep.get(key)
        if p is not None:
            return p
        if self.compiling:
            self._export_weight(name)
        w = self.t["w:" + name]
        if w.dim() == 3:  # Conv1d [out, in, k] (never per group): tap-major columns, as conv1d's patches
            w = w.transpose(1, 2)
        w2 = w.reshape(w.shape[0], -1)
        w_t = w2.t().contiguous()
        colsum = w2.int().sum(1)
        bias = self.t.get("b:" + name)
        bias_eff = (bias.long() if bias is not None else torch.zeros_like(colsum, dtype=torch.long)) - zx * colsum.long()
        if bool((bias_eff.abs() < 2 ** 31).all()):  # always for int8 codes; 16-bit zero points may need int64
            bias_eff = bias_eff.int()
        p = self._prep[key] = (w_t, bias_eff)
        return p

    def _export_weight(self, name: str) -> None:
        from fairseq_qasr.quant.affine import quantize_codes
        mod = self._quantizer(name)
        weight = mod.weight
        wq = mod.w_q["weight"]
        grouped = wq.spec.granularity == "group"
        if grouped and weight.dim() != 2:
            raise NotImplementedError(f"{name}: per-group weight scales are supported for Linear weights only")
        if not wq.spec.symmetric:
            raise NotImplementedError(f"{name}: the engine expects symmetric weights (zero point 0)")
        scale, zp = wq.qparams(weight.dim())
        codes = quantize_codes(weight.detach(), scale, zp, wq.spec.qmin, wq.spec.qmax).to(torch.int8)
        self.t["w:" + name] = codes
        for other, t in list(self.t.items()):  # tied weights quantized identically: store them once
            if other.startswith("w:") and other != "w:" + name and t.shape == codes.shape and torch.equal(t, codes):
                if grouped == ("gk:" + other[2:] in self.t):
                    self.meta["alias:w:" + name] = other
                    break
        self.meta["w:" + name] = dict(bits=wq.spec.bits, qmin=wq.spec.qmin, qmax=wq.spec.qmax,
                                      granularity=wq.spec.granularity, axis=wq.spec.axis,
                                      group_size=wq.spec.group_size if grouped else 0)
        raw = wq.raw_qparams()[0].detach().double()
        row = raw.amax(dim=-1) if grouped else raw
        if grouped:  # s_g / s_row <= 1 as GROUP_FRAC_BITS-fractional-bit integers
            self.t["gk:" + name] = torch.round(raw / row[:, None] * 2 ** self.GROUP_FRAC_BITS).to(torch.int32)
            self.meta["group_frac_bits"] = self.GROUP_FRAC_BITS
        self.scales[name + ".w_q.weight"] = raw.float()
        if getattr(mod, "bias", None) is not None:
            in_scale = mod.in_q[0].current_scale().detach()
            # the fake model's int32 bias grid: s_in * s_w, for groups the finest group scale (float32, as there)
            w_scale = raw.float()  # float32 -> float64 -> float32 is exact
            if grouped:
                w_scale = w_scale.amin(dim=-1)
                self.meta["bias_grid:" + name] = "finest_group"
            bscale = (in_scale.reshape(()) * w_scale).to(mod.bias.dtype)
            bscale = bscale.expand(mod.bias.shape) if bscale.numel() == 1 else bscale.reshape(mod.bias.shape)
            b = torch.clamp(torch.round(mod.bias.detach() / bscale), -(2 ** 31), 2 ** 31 - 1)
            self.t["b:" + name] = b.to(torch.int32)

    def mul_const(self, name: str, x: QT) -> Acc:
        """``x * constant`` (QMul with a Python-number operand): codes times the int8 constant code."""
        key = "const:" + name
        if self.compiling and key not in self.meta:
            mod = self._quantizer(name)
            wq = mod.w_q["const"]
            val = torch.tensor(float(mod.const_value))
            s, z = wq.raw_qparams()
            self.meta[key] = int(torch.clamp(torch.round(val / s) + z, wq.spec.qmin, wq.spec.qmax)) - int(z)
            self.scales[name + ".w_q.const"] = float(s)
        k = self.meta[key]
        acc = (x.c.int() - x.z) * k
        return Acc(acc, x.scale * self._scale(name + ".w_q.const").reshape(()) if self.compiling else None)

    def add(self, name: str, a, b) -> Acc:
        """Residual / positional add: both operands requantized by the add's input quantizers, then summed
        on a fine common grid ``max(s_a, s_b) * 2^-14`` with integer factors."""
        qa, qb = self.requant(a, name + ".in_q.0"), self.requant(b, name + ".in_q.1")
        wide = qa.c.dtype != torch.int8 or qb.c.dtype != torch.int8
        frac = self.ADD_FRAC_BITS_WIDE if wide else self.ADD_FRAC_BITS
        key = "add:" + name
        if self.compiling and key not in self.meta:
            sa, sb = float(qa.scale), float(qb.scale)
            s = max(sa, sb) * 2.0 ** -frac
            self.meta[key] = dict(ka=int(round(sa / s)), kb=int(round(sb / s)))
            self.scales[name + ".out"] = s
        f = self.meta[key]
        scale = torch.tensor(self.scales[name + ".out"], dtype=torch.float64) if self.compiling else None
        if wide:  # 16-bit codes: each consumer requantizes the two operands itself (AddAcc); the sum on the fine
            # grid (16-bit codes x 2^22 factors, int64; consumers' multipliers shortened by the headroom) where needed
            def fine_sum(qa: QT, qb: QT) -> Tensor:
                if cbuild.available() and qa.c.shape == qb.c.shape:
                    return cops.add(qa.c, qa.z, f["ka"], qb.c, qb.z, f["kb"])
                return (qa.c.long() - qa.z) * f["ka"] + (qb.c.long() - qb.z) * f["kb"]
            if self._within_17_bits(qa) and self._within_17_bits(qb):
                return AddAcc(qa, qb, fine_sum, scale, 17 + frac - 31)
            return Acc(fine_sum(qa, qb), scale, 17 + frac - 31)
        if self.fused and not self.compiling:
            from . import fused
            acc = fused.add(qa.c, qa.z, f["ka"], qb.c, qb.z, f["kb"])
        else:
            acc = (qa.c.int() - qa.z) * f["ka"] + (qb.c.int() - qb.z) * f["kb"]
        return Acc(acc, scale)

    def _within_17_bits(self, q: QT) -> bool:
        """Every code of ``q``'s grid lies within 2^17 of its zero point (:func:`kernels.add_requant_int`)."""
        m = self.meta.get("q:" + q.on) if q.on else None
        if m is None:
            return False
        off, _ = _storage(m["qmin"], m["qmax"])
        return max(abs(m["qmin"] + off - q.z), abs(m["qmax"] + off - q.z)) < 2 ** 17

    def layer_norm(self, name: str, x) -> Acc:
        q = self.requant(x, name + ".in_q.0")
        key = "ln:" + name
        if self.compiling and key not in self.meta:
            mod = self._quantizer(name)
            n = mod.normalized_shape[-1]
            k = K.ln_shift_bits(n, int(self.meta["q:" + name + ".in_q.0"]["bits"]))
            s_x = self.scales[name + ".in_q.0"]
            wq = mod.w_q["weight"]
            gs, gz = wq.raw_qparams()
            gcodes = torch.clamp(torch.round(mod.weight.detach() / gs) + gz, wq.spec.qmin, wq.spec.qmax) - gz
            self.t["lng:" + name] = gcodes.to(torch.int8)
            self.meta["lng_bits:" + name] = dict(bits=wq.spec.bits, qmin=wq.spec.qmin, qmax=wq.spec.qmax)
            if mod.bias is not None:
                bscale = (gs.detach() * 2.0 ** -16).to(mod.bias.dtype)
                self.t["b:" + name] = torch.clamp(torch.round(mod.bias.detach() / bscale),
                                                  -(2 ** 31), 2 ** 31 - 1).to(torch.int32)
            eps_term = int(round(n * n * mod.eps * 2.0 ** (2 * k) / (s_x * s_x)))
            self.meta[key] = dict(k=k, eps_term=eps_term, frac=self.LN_FRAC_BITS)
            self.scales[name + ".w_q.weight"] = float(gs)
        f = self.meta[key]
        frac = int(f.get("frac", 16))  # 16: files before format version 3
        gain = self.t["lng:" + name]
        bias = self.t.get("b:" + name)

        def fixed_point(q: QT) -> Tensor:  # xhat * gain + bias on s_gain 2^-frac (files before version 5)
            if cbuild.available():
                return cops.layer_norm(q.c, gain, bias, f["eps_term"], f["k"], frac)
            if self.fused and not self.compiling:
                from . import fused
                return fused.layer_norm(q.c, gain, bias, f["eps_term"], f["k"], frac)
            return K.layer_norm_int(q.c, gain, bias, f["eps_term"], f["k"], frac)
        if not self.compiling:  # (scale and headroom only set the multipliers, at compile time)
            return LNAcc(name, q, fixed_point)
        scale = torch.tensor(self.scales[name + ".w_q.weight"] * 2.0 ** -frac, dtype=torch.float64)
        return LNAcc(name, q, fixed_point, scale, self._ln_headroom(name, gain.shape[-1], frac))

    def _ln_headroom(self, name: str, n: int, frac: int) -> int:
        """Bits beyond int32 of the LayerNorm's output ``xhat * gain + bias`` (|xhat| <= sqrt(n) 2^frac): its
        consumers' multipliers are shortened by as many bits at compile time."""
        g = self.meta["lng_bits:" + name]
        gmax = max(abs(int(g["qmin"])), abs(int(g["qmax"])))
        bias = self.t.get("b:" + name)
        bmax = int(bias.long().abs().max()) << (frac - 16) if bias is not None and bias.numel() else 0
        return max(0, ((math.isqrt(n) + 1) * gmax * 2 ** frac + bmax).bit_length() - 31)

    def relu(self, name: str, x) -> Acc:
        """ReLU on the op's input grid: ``max(c - z, 0)``, exact."""
        q = self.requant(x, name + ".in_q.0")
        return Acc((q.c.int() - q.z).clamp_(min=0), q.scale)

    def lut(self, name: str, x, fn, consumer: str) -> QT:
        """Element-wise ``fn`` (GELU ...) as a table over the 2^k input codes, straight onto the consumer's
        grid (the only consumer of ``name``'s output)."""
        q = self.requant(x, name + ".in_q.0")
        zp, qmin, qmax = self._qinfo(name + ".in_q.0")
        off, _ = _storage(qmin, qmax)
        czp, cqmin, cqmax = self._qinfo(consumer)
        coff, cdtype = _storage(cqmin, cqmax)
        key = f"lut:{name}>{consumer}"

        def build():  # in float64: the function's value on each code, without float32 rounding
            codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
            s_in = torch.tensor(float(self.scales[name + ".in_q.0"]), dtype=torch.float64)
            s_c = torch.tensor(float(self.scales[consumer]), dtype=torch.float64)
            y = fn((codes - zp) * s_in)
            return (torch.clamp(torch.round(y / s_c) + czp, cqmin, cqmax) + coff).to(cdtype)

        table = self._store(key, build)
        if cbuild.available():
            c = cops.lut(table, q.c, qmin + off)
        elif self.fused and not self.compiling:
            from . import fused
            c = fused.lut(table, q.c, qmin + off)
        else:
            c = table[(q.c.long() - (qmin + off))]
        out = QT(c, czp + coff, self._scale(consumer).reshape(()) if self.compiling else None, consumer)
        self._emit(consumer, out, None)
        return out

    def max_pool(self, name: str, x: Acc) -> QT:
        q = self.requant(x, name + ".in_q.0")
        return QT(K.max_pool2d_ceil(q.c, 2), q.z, q.scale, q.on)

    def matmul(self, name: str, a, b) -> Acc:
        qa, qb = self.requant(a, name + ".in_q.0"), self.requant(b, name + ".in_q.1")
        wide = qa.c.dtype != torch.int8 or qb.c.dtype != torch.int8  # 16-bit codes: int64 accumulator
        if K.int8_gemm_backend() == "avx2":
            packs = None
            if qb.aux is not None:  # cross-attention keys/values: packed once per decode
                packs = qb.aux.get("cpacks")
                if packs is None:
                    packs = qb.aux["cpacks"] = K.pack_batched(qb.c, wide)
            acc = K.matmul_int(qa.c, qa.z, qb.c, qb.z, packs)
        elif not wide and qa.c.shape[-2] <= K.SMALL_M and qb.aux is not None:  # decoder step on cached keys/values
            if "b32" not in qb.aux:
                qb.aux["b32"] = qb.c.int()
                qb.aux["colsum"] = qb.aux["b32"].sum(-2, keepdim=True)
            b32 = qb.aux["b32"]
            acc = torch.matmul(qa.c.int(), b32)
            if qa.z:
                acc -= qa.z * qb.aux["colsum"]
            if qb.z:
                acc -= qb.z * qa.c.sum(-1, dtype=torch.int32).unsqueeze(-1)
                if qa.z:
                    acc += qa.c.shape[-1] * qa.z * qb.z
        else:
            acc = K.matmul_int(qa.c, qa.z, qb.c, qb.z)
        return Acc(acc, qa.scale * qb.scale if self.compiling else None, self.WIDE_ACC_BITS if wide else 0)

    def softmax(self, name: str, x: Acc, masked: Optional[Tensor]) -> QT:
        q = self.requant(x, name + ".in_q.0", masked)
        zp, qmin, qmax = self._qinfo(name + ".in_q.0")
        off, _ = _storage(qmin, qmax)
        ozp, oqmin, oqmax = self._qinfo(name + ".out_q")
        ooff, odtype = _storage(oqmin, oqmax)
        key = "sm:" + name
        if self.compiling and key not in self.meta and self.EXACT_MULTIPLIERS:
            # format version 5: 62-bit exponentials, one rounding of e / (sum e * s_out) (kernels.softmax_exact)
            self.t[key + ".exp"] = K.exp_table_exact(self.scales[name + ".in_q.0"], qmax - qmin + 1)
            cq, Q = K.softmax_exact_constants(self.scales[name + ".out_q"])
            self.meta[key] = dict(cq=cq, Q=Q)
        elif self.compiling and key not in self.meta:
            # 2^30 (not 2^20): the rounding of the many tiny exponentials of a 1500-lane row biases the row sum
            # enough to move 16-bit output codes by several LSB; only e / sum matters, and e * r stays < 2^62
            self.t[key + ".exp"] = K.exp_table(self.scales[name + ".in_q.0"], qmax - qmin + 1,
                                               self.SOFTMAX_EXP_FRAC_BITS).to(torch.int32)
            mult, shift = K.softmax_out_mult(self.scales[name + ".out_q"])
            self.meta[key] = dict(mult=mult, shift=shift)
        f = self.meta[key]
        if "cq" in f:
            c = K.softmax_exact(q.c, qmin + off, masked, self.t[key + ".exp"], int(f["cq"]), int(f["Q"]), ozp + ooff,
                                oqmin + ooff, oqmax + ooff, odtype)
        else:
            c = K.softmax_int(q.c, qmin + off, masked, self.t[key + ".exp"], f["mult"], f["shift"], ozp + ooff,
                              oqmin + ooff, oqmax + ooff, odtype)
        out = QT(c, ozp + ooff, self._scale(name + ".out_q").reshape(()) if self.compiling else None, name + ".out_q")
        self._emit(name + ".out_q", out, None)
        return out

    def embedding(self, name: str, idx: Tensor, consumer: str) -> QT:
        """Token / position embedding: int8 row codes times a per-row fixed-point multiplier onto the
        consumer's grid."""
        zp, qmin, qmax = self._qinfo(consumer)
        off, dtype = _storage(qmin, qmax)
        key = f"rq:{consumer}"
        if self.compiling and "w:" + name not in self.t:
            from fairseq_qasr.quant.affine import quantize_codes
            mod = self._quantizer(name)
            wq = mod.w_q["weight"]
            scale, z = wq.qparams(2)
            self.t["w:" + name] = quantize_codes(mod.weight.detach(), scale, z, wq.spec.qmin, wq.spec.qmax).to(torch.int8)
            self.meta["w:" + name] = dict(bits=wq.spec.bits, qmin=wq.spec.qmin, qmax=wq.spec.qmax,
                                          granularity=wq.spec.granularity, axis=wq.spec.axis)
            self.scales[name + ".w_q.weight"] = wq.raw_qparams()[0].detach().float()
        if self.compiling and key + ".m" not in self.t:
            self.t[key + ".m"], self.t[key + ".sh"] = self._multiplier(
                self._quantizer(name).w_q["weight"].raw_qparams()[0].detach().double().reshape(-1),
                self._scale(consumer), 0)
        w = self.t["w:" + name]
        m, sh = self.t[key + ".m"].long(), self.t[key + ".sh"].long()
        rows = w[idx].int()
        c = K.requantize(rows, m[idx].unsqueeze(-1), sh[idx].unsqueeze(-1), zp + off, qmin + off, qmax + off, dtype)
        out = QT(c, zp + off, self._scale(consumer).reshape(()) if self.compiling else None, consumer)
        self._emit(consumer, out, None)
        return out

    # ---------------------------------------------------------------- model
    def attention(self, name: str, x, memory, mask: Optional[Tensor], causal: bool,
                  cache: Optional[Dict[str, Any]], heads: int) -> Acc:
        xq = self.requant(x, name + ".q_proj.in_q.0")
        q = self.linear(name + ".q_proj", xq)
        b, tq, d = q.shape
        hd = d // heads
        kk, vk = name + ".k", name + ".v"
        if memory is None or cache is None or cache.get(kk) is None:
            src = x if memory is None else memory
            k = self.linear(name + ".k_proj", self._requant_as(xq, src is x, src, name + ".k_proj.in_q.0"))
            v = self.linear(name + ".v_proj", self._requant_as(xq, src is x, src, name + ".v_proj.in_q.0"))
            kc = self.requant(k, name + ".matmul_0.in_q.1")
            vc = self.requant(v, name + ".matmul_1.in_q.1")
            kc.c = kc.c.view(b, -1, heads, hd).permute(0, 2, 3, 1).contiguous()  # (B, H, d, Tk)
            vc.c = vc.c.view(b, -1, heads, hd).transpose(1, 2).contiguous()     # (B, H, Tk, d)
            if cache is not None and memory is None and cache.get(kk) is not None:
                kc.c = torch.cat([cache[kk].c, kc.c], dim=3)
                vc.c = torch.cat([cache[vk].c, vc.c], dim=2)
            if cache is not None:
                if memory is not None:  # cross-attention: fixed for the whole decode, cache derived tensors
                    kc.aux, vc.aux = {}, {}
                cache[kk], cache[vk] = kc, vc
        else:
            kc, vc = cache[kk], cache[vk]
        qs = self.mul_const(name + ".mul_0", self.requant(q, name + ".mul_0.in_q.0"))
        qs = self.requant(qs, name + ".matmul_0.in_q.0")
        qs.c = qs.c.view(b, tq, heads, hd).transpose(1, 2)
        tk = kc.c.shape[-1]
        c_path = not self.compiling and self.hook is None and (not causal or tq == 1) and \
            self._c_attention_ok(qs, kc)  # (one query: no causal mask)
        klen = _key_lengths(mask, heads) if c_path and mask is not None else None
        if c_path and (mask is None or klen is not None):
            return self.linear(name + ".out_proj", self._c_attention(name, qs, kc, vc, klen))
        if self.fused and not self.compiling and self.hook is None and tq > K.SMALL_M and not causal and \
                (mask is None or not bool(mask.any())) and self._fusable_attention(name):
            out = self._fused_attention(name, qs, kc, vc)
            return self.linear(name + ".out_proj", self.requant(out, name + ".out_proj.in_q.0"))
        else:
            probs = None
            scores = self.matmul(name + ".matmul_0", qs, kc)
        blocked = None
        if causal and tq > 1:
            blocked = torch.ones(tq, tk, dtype=torch.bool).triu(tk - tq + 1).expand(b, heads, tq, tk)
        if mask is not None and bool(mask.any()):
            pad = mask[:, None, None, :].expand(b, heads, tq, tk)
            blocked = pad if blocked is None else (blocked | pad)
        if probs is None:
            probs = self.softmax(name + ".softmax_0", scores, blocked)
        out = self.matmul(name + ".matmul_1", probs, vc)
        out.t = out.t.transpose(1, 2).reshape(b, tq, d)
        return self.linear(name + ".out_proj", self.requant(out, name + ".out_proj.in_q.0"))

    def _c_attention_ok(self, qs: QT, kc: QT) -> bool:
        """The one-pass C attention (:func:`cgemm.attention`) runs here: AVX2 kernel available, int8 query/key
        codes, an even head dimension."""
        return K.int8_gemm_backend() == "avx2" and qs.c.dtype == torch.int8 and kc.c.dtype == torch.int8 and \
            qs.c.shape[-1] % 2 == 0

    def _c_attention(self, name: str, qs: QT, kc: QT, vc: QT, klen: Optional[Tensor] = None) -> QT:
        """QK^T, softmax input requantization, integer softmax, requantization onto the AV grid and AV in one C
        pass per (head, 16 query rows): the same integers as the unfused path (no [Tq, Tk] tensor in memory). Keys
        and values with a derived-tensor cache (cross-attention during a decode) are packed once; ``klen`` (keys per
        batch row x head): key padding. Returns the codes on ``out_proj``'s input grid."""
        sm, av = name + ".softmax_0", name + ".matmul_1"

        def rq(key: str) -> Tuple[int, int, int, int, int]:
            m, sh = self._mult("rq:" + key)
            zp, qmin, qmax = self._qinfo(key)
            off, _ = _storage(qmin, qmax)
            return int(m), int(sh), zp + off, qmin + off, qmax + off

        ozp, oqmin, oqmax = self._qinfo(sm + ".out_q")
        ooff, _ = _storage(oqmin, oqmax)
        f = self.meta["sm:" + sm]
        if "cq" in f:  # 62-bit exponentials (the table is int64)
            softmax = (int(f["cq"]), int(f["Q"]), ozp + ooff, oqmin + ooff, oqmax + ooff)
        else:
            rb = K.recip_bits(f["mult"])
            softmax = (f["mult"] << rb, rb + f["shift"], ozp + ooff, oqmin + ooff, oqmax + ooff)
        b, h, tq, d = qs.c.shape
        kv = kc.aux.get("cgemm_kv") if kc.aux is not None else None  # cross-attention: packed once per decode
        if kv is None:
            kv = cgemm.pack_kv(kc.c.reshape(b * h, d, -1), qs.z, kc.z, vc.c.reshape(b * h, -1, d), vc.z)
            if kc.aux is not None:
                kc.aux["cgemm_kv"] = kv
        out = cgemm.attention(qs.c.reshape(b * h, tq, d), qs.z, None, kc.z, rq(sm + ".in_q.0"),
                              self.t["sm:" + sm + ".exp"], softmax, rq(av + ".in_q.0"), None, vc.z, kv, klen)
        consumer = name + ".out_proj.in_q.0"
        if self._mult("rq:" + consumer)[0].numel() == 1:  # one multiplier: requantize before the head transpose
            codes = self.requant(Acc(out), consumer)  # (int8 codes to move instead of int64 accumulators)
            codes.c = codes.c.view(b, h, tq, d).transpose(1, 2).reshape(b, tq, h * d)
            return codes
        return self.requant(Acc(out.view(b, h, tq, d).transpose(1, 2).reshape(b, tq, h * d)), consumer)

    def _fusable_attention(self, name: str) -> bool:
        """The fused kernel takes int8 codes on every attention grid (QK^T and AV operands, softmax input and
        output) and out_shift 16; recipes with wider grids there take the unfused path."""
        flag = self._prep.get("fuse:" + name)
        if flag is None:
            grids = [name + s for s in (".matmul_0.in_q.0", ".matmul_0.in_q.1", ".softmax_0.in_q.0",
                                        ".softmax_0.out_q", ".matmul_1.in_q.0", ".matmul_1.in_q.1")]
            flag = all(_storage(*self._qinfo(g)[1:])[1] == torch.int8 for g in grids) and \
                self.meta["sm:" + name + ".softmax_0"].get("shift") == 16  # (none with exact softmax tables)
            self._prep["fuse:" + name] = flag
        return flag

    def _fused_attention(self, name: str, qs: QT, kc: QT, vc: QT) -> Acc:
        """Per (batch, head): QK^T (int8 GEMM), softmax input quantizer + integer softmax (one compiled
        kernel), probabilities requantized onto the AV input grid, AV (int8 GEMM). No [B, H, T, T] tensor
        is materialized beyond one head. Same integer results as the unfused path (no mask)."""
        from . import fused
        sm, av = name + ".softmax_0", name + ".matmul_1"
        zp, qmin, qmax = self._qinfo(sm + ".in_q.0")
        off, _ = _storage(qmin, qmax)
        ozp, oqmin, oqmax = self._qinfo(sm + ".out_q")
        ooff, _ = _storage(oqmin, oqmax)
        m, sh = self._mult("rq:" + sm + ".in_q.0")
        f = self.meta["sm:" + sm]
        if "cq" in f or f["shift"] != 16:
            raise ValueError("fused softmax expects out_shift 16 (files before format version 4)")
        lut = self.t["sm:" + sm + ".exp"]
        rb = K.recip_bits(f["mult"])
        # one layout change per tensor: (B, H, Tq, d), keys as (B, H, Tk, d) (their transpose feeds the GEMM)
        a, b, v = qs.c.contiguous(), kc.c.transpose(2, 3).contiguous(), vc.c.contiguous()
        B, H, Tq, d = a.shape
        za, zb, zv = qs.z, kc.z, vc.z
        out = torch.empty(B, H, Tq, d, dtype=torch.int32)
        rows = d * za * zb - zb * a.sum(-1, dtype=torch.int64).unsqueeze(-1)   # (B, H, Tq, 1)
        cols = (-za * b.sum(-1, dtype=torch.int64)).unsqueeze(-2)              # (B, H, 1, Tk)
        vsum = v.sum(-2, dtype=torch.int32).unsqueeze(-2)                     # (B, H, 1, d)
        for bi in range(B):
            for h in range(H):
                raw = K.int_mm(a[bi, h], b[bi, h].t())
                p, psum = fused.attn_softmax(raw, rows[bi, h], cols[bi, h], m, sh, zp + off, qmin + off, qmax + off,
                                             lut, f["mult"] << rb, ozp + ooff, oqmin + ooff, oqmax + ooff,
                                             1 << (rb + 15), rb + 16)
                pq = self.requant(QT(p, ozp + ooff, None, sm + ".out_q"), av + ".in_q.0")
                if pq.c is not p:
                    psum = pq.c.sum(-1, keepdim=True, dtype=torch.int32)
                o = out[bi, h]
                o.copy_(K.int_mm(pq.c, v[bi, h]))
                if zv:
                    o -= zv * psum
                if pq.z:
                    o -= pq.z * vsum[bi, h]
                    if zv:
                        o += pq.c.shape[-1] * pq.z * zv
        return Acc(out.transpose(1, 2).reshape(B, Tq, H * d))

    def _activation(self, name: str, x, consumer: str):
        if self.cfg["activation_fn"] == "relu":
            return self.relu(name + ".relu_0", x)
        return self.lut(name + ".gelu_0", x, torch.nn.functional.gelu, consumer)

    def ffn(self, name: str, x) -> Acc:
        h = self.linear(name + ".fc1", self.requant(x, name + ".fc1.in_q.0"))
        a = self._activation(name, h, name + ".fc2.in_q.0")
        if isinstance(a, Acc):
            a = self.requant(a, name + ".fc2.in_q.0")
        return self.linear(name + ".fc2", a)

    def _block(self, layer: str, block: str, idx: int, residual, f) -> Any:
        pre = self.cfg["normalize_before"]
        norm = f"{layer}.{block}.norm"
        y = f(self.layer_norm(norm, residual) if pre else residual)
        s = self.add(f"{layer}.add_{idx}", residual, y)
        return s if pre else self.layer_norm(norm, s)

    def encode(self, x: QT, lengths: Tensor) -> Dict[str, Any]:
        cfg = self.cfg
        if cfg["encoder_frontend"] == "vgg2d":
            h = x.c.unsqueeze(-1)  # (B, T, F, C=1) channel-last
            q = QT(h, x.z, x.scale)
            nblocks = len([c for c in str(cfg["vgg_channels"]).split(",") if c.strip()])
            for bi in range(nblocks):
                for ci in range(cfg["vgg_convs_per_block"]):
                    conv = f"encoder.frontend.blocks.{bi}.{2 * ci}"
                    if ci > 0 or bi > 0:
                        q = self.requant(acc, conv + ".in_q.0")
                    acc = self.conv2d(conv, q)
                    acc = self.relu(f"encoder.frontend.blocks.{bi}.{2 * ci + 1}", acc)
                q = self.max_pool(f"encoder.frontend.blocks.{bi}.{2 * cfg['vgg_convs_per_block']}", acc)
                acc = Acc((q.c.int() - q.z), q.scale)
                lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
            b, t, f, c = acc.t.shape
            flat = Acc(acc.t.permute(0, 1, 3, 2).reshape(b, t, c * f), acc.scale, acc.headroom)
            h = self.linear("encoder.frontend.proj", self.requant(flat, "encoder.frontend.proj.in_q.0"))
        else:
            a = self.conv1d("encoder.frontend.conv1", x, pad=1, stride=1)
            g = self.lut("encoder.frontend.gelu_0", a, torch.nn.functional.gelu, "encoder.frontend.conv2.in_q.0")
            a = self.conv1d("encoder.frontend.conv2", g, pad=1, stride=2)
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            if cfg["encoder_pos"] == "sinusoidal":
                h = self.lut("encoder.frontend.gelu_1", a, torch.nn.functional.gelu, "encoder.add_0.in_q.0")
                h = self.add("encoder.add_0", h, self._positions(h.c.shape[1]))
            else:
                raise NotImplementedError("conv1d_gelu front-end without sinusoidal positions")
        t = h.shape[1]
        mask = torch.arange(t)[None, :] >= lengths[:, None]
        for i in range(cfg["encoder_layers"]):
            L = f"encoder.layers.{i}"
            h = self._block(L, "attn_block", 0, h,
                            lambda y: self.attention(L + ".self_attn", y, None, mask, False, None,
                                                     cfg["encoder_attention_heads"]))
            h = self._block(L, "ffn_block", 1, h, lambda y: self.ffn(L + ".ffn", y))
        if cfg.get("encoder_final_norm"):
            h = self.layer_norm("encoder.final_norm", h)
        if self.compiling and isinstance(h, LNAcc):
            self.meta["encoder_out_norm"] = h.name  # (memory_acc: the LayerNorm the encoder ends with)
        return {"out": h, "mask": mask, "lengths": lengths}

    def memory_tensor(self, out: Acc) -> Tensor:
        """The encoder output as one tensor for a caller to carry (fairseq reorders it by rows): the final
        LayerNorm's input codes where its consumers take the exact LayerNorm (format version 5), else the
        accumulator. :meth:`memory_acc` turns it back."""
        return out.q.c if isinstance(out, LNAcc) and "ln_exact:" + out.name in self.meta else out.t

    def memory_acc(self, t: Tensor) -> Acc:
        """:meth:`memory_tensor`'s inverse."""
        name = self.meta.get("encoder_out_norm")
        if name is not None and "ln_exact:" + name in self.meta:
            zp, qmin, qmax = self._qinfo(name + ".in_q.0")
            return self.layer_norm(name, QT(t, zp + _storage(qmin, qmax)[0], None, name + ".in_q.0"))
        return Acc(t)

    def _positions(self, t: int) -> QT:
        """Sinusoidal encoder positions, quantized by the add's second input quantizer (a constant table)."""
        name = "encoder.add_0.in_q.1"
        zp, qmin, qmax = self._qinfo(name)
        off, dtype = _storage(qmin, qmax)

        def build():
            pos = self.src.encoder.embed_positions
            need = -(-int(self.cfg.get("max_source_positions") or pos.shape[0]) // 2)  # conv stride 2
            pos = pos[: min(need, pos.shape[0])]
            q = self._quantizer(name)
            s, z = q.raw_qparams()
            return (torch.clamp(torch.round(pos / s) + z, qmin, qmax) + off).to(dtype)

        if "pos:encoder" not in self.t and self.meta.get("pos:encoder") == "sinusoidal":
            codes = self._sinusoid_codes(name)  # rebuilt at load (see _sinusoid_codes) ...
            if "pos:encoder.fix_idx" in self.t:  # ... plus the stored codes where the formula differs
                codes.view(-1)[self.t["pos:encoder.fix_idx"].long()] = self.t["pos:encoder.fix_val"]
            self.t["pos:encoder"] = codes
        table = self._store("pos:encoder", build)
        if self.compiling and "pos:encoder" not in self.meta:
            formula = self._sinusoid_codes(name)
            if formula.shape == table.shape:
                diff = (formula != table).view(-1).nonzero().view(-1)
                if diff.numel() * 5 < table.numel() // 4:  # sparse corrections pay off
                    self.meta["pos:encoder"] = "sinusoidal"  # the writer omits the table
                    if diff.numel():
                        self.t["pos:encoder.fix_idx"] = diff.to(torch.int32)
                        self.t["pos:encoder.fix_val"] = table.view(-1)[diff].clone()
        return QT(table[:t].unsqueeze(0), zp + off, self._scale(name).reshape(()) if self.compiling else None, name)

    def _sinusoid_codes(self, qpath: str) -> Tensor:
        """Codes of the sinusoidal position table, rebuilt from its formula (the model's ``sinusoids``) and
        quantized with the add's stored input quantizer. Runs once at load time, not during inference; the
        export keeps the table only if this does not reproduce it bit for bit."""
        zp, qmin, qmax = self._qinfo(qpath)
        off, dtype = _storage(qmin, qmax)
        length = -(-int(self.cfg.get("max_source_positions") or 3000) // 2)
        channels = int(self.cfg["encoder_embed_dim"])
        increment = math.log(10000.0) / (channels // 2 - 1)
        inv = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
        t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
        pos = torch.cat([torch.sin(t), torch.cos(t)], dim=1)
        s = torch.tensor(self.scales[qpath], dtype=torch.float32)
        return (torch.clamp(torch.round(pos / s) + zp, qmin, qmax) + off).to(dtype)

    def conv2d(self, name: str, x: QT) -> Acc:
        """3x3 conv, padding 1, stride 1 on channel-last codes ``[B, T, F, C]`` as one int8 GEMM (im2col)."""
        c = x.c
        c = torch.nn.functional.pad(c.permute(0, 3, 1, 2), (1, 1, 1, 1), value=x.z).permute(0, 2, 3, 1)
        b, t, f = c.shape[0], c.shape[1] - 2, c.shape[2] - 2
        patches = c.unfold(1, 3, 1).unfold(2, 3, 1)  # (B, T, F, C, 3, 3)
        cols = patches.reshape(b, t, f, -1)
        return self.linear(name, QT(cols, x.z, x.scale))

    def conv1d(self, name: str, x: QT, pad: int, stride: int, left: Optional[Tensor] = None) -> Acc:
        """1-D conv over time on ``[B, T, C]`` codes as one int8 GEMM (im2col). The patches are laid out tap-major,
        ``(k, C)``, so that the copy moves whole rows of C codes; :meth:`_linear_params` orders the conv weight
        the same way."""
        mod_k = self._kernel(name)
        c = x.c
        if left is not None:
            c = torch.cat([left, c], dim=1)
        if pad:
            b, t, ch = c.shape
            padded = c.new_full((b, t + 2 * pad, ch), x.z)
            padded[:, pad:pad + t] = c
            c = padded
        cols = c.unfold(1, mod_k, stride).transpose(2, 3)  # (B, T', k, C)
        return self.linear(name, QT(cols.reshape(cols.shape[0], cols.shape[1], -1), x.z, x.scale))

    def _kernel(self, name: str) -> int:
        key = "k:" + name
        if self.compiling and key not in self.meta:
            self.meta[key] = int(self._quantizer(name).weight.shape[-1])
        return self.meta[key]

    # ---------------------------------------------------------------- decoder
    def decode_step(self, tokens: Tensor, enc: Dict[str, Any], state: Optional[Dict[str, Any]]) -> Tensor:
        """Decoder forward (full sequence when ``state`` is None, else incremental: only new tokens are
        run). Returns int64 logits ``(B, T, V)`` on the grid ``meta['logits.scale']``."""
        cfg = self.cfg
        past = 0
        if state is not None and "steps" in state:
            past = state["steps"]
            tokens = tokens[:, -1:]
        n_out = tokens.size(1)
        prompt = [int(t) for t in str(cfg.get("decoder_prompt_ids") or "").split(",") if t.strip()]
        if prompt and past == 0:
            tokens = torch.cat([torch.tensor(prompt).expand(tokens.size(0), -1), tokens[:, 1:]], dim=1)
        if cfg["decoder_context"] == "conv":
            x = self.embedding("decoder.embed_tokens", tokens, "decoder.conv_context.convs.0.in_q.0")
            for i in range(cfg["decoder_conv_layers"]):
                conv = f"decoder.conv_context.convs.{i}"
                kern = self._kernel(conv)
                key = f"conv_context.{i}"
                left = state.get(key) if state is not None else None
                if left is None:
                    left = torch.full((x.c.size(0), kern - 1, x.c.size(2)), x.z, dtype=x.c.dtype)
                padded = torch.cat([left, x.c], dim=1)
                if state is not None:
                    state[key] = padded[:, padded.size(1) - (kern - 1):]
                a = self.conv1d(conv, QT(padded, x.z, x.scale), pad=0, stride=1)
                a = self.layer_norm(f"decoder.conv_context.norms.{i}", a)
                h = self.relu(f"decoder.conv_context.relu_{i}", a)
                if i + 1 < cfg["decoder_conv_layers"]:
                    x = self.requant(h, f"decoder.conv_context.convs.{i + 1}.in_q.0")
            if cfg["decoder_conv_channels"] != cfg["decoder_embed_dim"]:
                h = self.linear("decoder.conv_context.proj", self.requant(h, "decoder.conv_context.proj.in_q.0"))
        else:
            e = self.embedding("decoder.embed_tokens", tokens, "decoder.add_0.in_q.0")
            pos = torch.arange(past, past + tokens.size(1)).unsqueeze(0).expand(tokens.size(0), -1)
            p = self.embedding("decoder.embed_positions", pos, "decoder.add_0.in_q.1")
            h = self.add("decoder.add_0", e, p)
        if state is not None:
            state["steps"] = past + tokens.size(1)
        memory, mmask = enc["out"], enc["mask"]
        for i in range(cfg["decoder_layers"]):
            L = f"decoder.layers.{i}"
            cache = state.setdefault(L, {}) if state is not None else None
            j = 0
            heads = cfg["decoder_attention_heads"]
            sa_name = L + ".self_attn"
            h = self._block(L, "self_attn_block", j, h,
                            lambda y: self.attention(sa_name, y, None, None, True,
                                                     cache.setdefault("self", {}) if cache is not None else None, heads))
            h = self._block(L, "cross_attn_block", j + 1, h,
                            lambda y: self.attention(L + ".cross_attn", y, memory, mmask, False,
                                                     cache.setdefault("cross", {}) if cache is not None else None, heads))
            h = self._block(L, "ffn_block", j + 2, h, lambda y: self.ffn(L + ".ffn", y))
        if cfg.get("decoder_final_norm"):
            h = self.layer_norm("decoder.final_norm", h)
        if h.shape[1] != n_out:
            h = h.map_rows(lambda c: c[:, -n_out:]) if isinstance(h, (AddAcc, LNAcc)) else Acc(h.t[:, -n_out:], h.scale,
                                                                                        h.headroom)
        return self.logits(h, past == 0)

    def logits(self, h: Acc, first_is_begin: bool = False) -> Tensor:
        name = "decoder.output_projection"
        acc = self.linear(name, self.requant(h, name + ".in_q.0"))
        self._last_acc = acc
        key = "rq:logits"
        if self.compiling and key + ".m" not in self.t:
            s_l = float(acc.scale.max()) * 2.0 ** (acc.headroom - 4)  # 4 bits finer than the coarsest row's unit
            self.meta["logits.scale"] = s_l
            self.t[key + ".m"], self.t[key + ".sh"] = K.shorten_multiplier(*K.quantize_multiplier(acc.scale / s_l),
                                                                           acc.headroom)
        m, sh = self._mult(key)
        out = K.rescale(acc.t, m, sh)
        sup = self._mask("decoder_suppress_ids")
        if sup is not None:
            out = out.masked_fill(sup, NEG_LOGIT)
        if first_is_begin:
            begin = self._mask("decoder_suppress_at_begin_ids")
            if begin is not None:
                out = torch.cat([out[:, :1].masked_fill(begin, NEG_LOGIT), out[:, 1:]], dim=1)
        return out

    def log_probs(self, logits: Tensor, forbid: Optional[Tensor] = None) -> Tensor:
        """Integer log-softmax of the last decoder outputs, as the fake model's ``output_log_softmax`` computes
        it: the logit accumulators requantized by its input quantizer (8-bit codes), then
        :func:`kernels.log_softmax_int`. Returns int64 log-probabilities on the grid 2^-16 nats; suppressed
        and ``forbid`` lanes get a very negative value."""
        name = "decoder.output_log_softmax"
        acc = Acc(self._last_acc.t[:, -logits.shape[1]:], getattr(self._last_acc, "scale", None),
                  self._last_acc.headroom)
        masked = logits <= NEG_LOGIT
        if forbid is not None:
            masked = masked | forbid
        q = self.requant(acc, name + ".in_q.0", masked)
        zp, qmin, qmax = self._qinfo(name + ".in_q.0")
        off, _ = _storage(qmin, qmax)
        key = "lsm:" + name
        if self.compiling and key not in self.meta:
            s_in = self.scales[name + ".in_q.0"]
            self.t[key + ".exp"] = K.exp_table(s_in, qmax - qmin + 1).to(torch.int32)
            self.t[key + ".log"] = K.log_table().to(torch.int32)
            self.meta[key] = dict(step=int(round(s_in * 2 ** 16)), ln2=int(round(math.log(2) * 2 ** 16)))
        f = self.meta[key]
        return K.log_softmax_int(q.c, qmin + off, masked, self.t[key + ".exp"], f["step"], f["ln2"],
                                 self.t[key + ".log"].long())

    def _mask(self, option: str) -> Optional[Tensor]:
        """Bool vocabulary mask of a comma-separated index option (decoder_suppress_*), or None."""
        if option not in self._prep:
            ids = [int(t) for t in str(self.cfg.get(option) or "").split(",") if t.strip()]
            mask = None
            if ids:
                mask = torch.zeros(self.t["w:decoder.output_projection"].shape[0], dtype=torch.bool)
                mask[ids] = True
            self._prep[option] = mask
        return self._prep[option]

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def greedy(self, feats: Tensor, lengths: Tensor, max_len: int = 200, bos: int = 2, eos: int = 2,
               pad: int = 1, scores: str = "logits") -> List[List[int]]:
        """Batched greedy decoding (fairseq convention: decoder input starts with EOS). ``scores``: argmax of
        the int64 logits (``logits``) or of the integer log-softmax on the quantized ``output_log_softmax``
        input (``log_softmax``: what fairseq's search scores the fake-quantized model with)."""
        enc = self.encode(self.quantize_input(feats), lengths)
        b = feats.size(0)
        tokens = torch.full((b, 1), bos, dtype=torch.long)
        state: Dict[str, Any] = {}
        done = torch.zeros(b, dtype=torch.bool)
        out: List[List[int]] = [[] for _ in range(b)]
        for step in range(max_len):
            logits = self.decode_step(tokens, enc, state)[:, -1:]
            if scores == "log_softmax":
                forbid = torch.zeros(logits.shape[-1], dtype=torch.bool)
                forbid[pad] = True
                logits = self.log_probs(logits, forbid)
            logits = logits[:, -1]
            logits[:, pad] = NEG_LOGIT
            nxt = logits.argmax(-1)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) == eos:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return out

    @torch.no_grad()
    def beam_search(self, feats: Tensor, lengths: Tensor, beam: int = 5, max_len: int = 200, bos: int = 2,
                    eos: int = 2, pad: int = 1, len_penalty_int: bool = True) -> List[List[Tuple[List[int], int]]]:
        """Batched beam search on integer log-probabilities (2^-16 nats). Hypotheses end at EOS; the final
        ranking is by score / length (fairseq's default length penalty 1), compared by integer
        cross-multiplication. Returns, per utterance, ``beam`` (tokens, score) pairs, best first."""
        if "lsm:decoder.output_log_softmax" not in self.meta:
            raise NotImplementedError("beam search needs the model's quantized output_log_softmax")
        enc = self.encode(self.quantize_input(feats), lengths)
        B, V = feats.size(0), None
        order = torch.arange(B).repeat_interleave(beam)
        out = enc["out"]
        out = out.map_rows(lambda c: c.index_select(0, order)) if isinstance(out, (AddAcc, LNAcc)) else \
            Acc(out.t.index_select(0, order))
        enc = {"out": out, "mask": enc["mask"].index_select(0, order)}
        tokens = torch.full((B * beam, 1), bos, dtype=torch.long)
        scores = torch.zeros(B, beam, dtype=torch.long)
        scores[:, 1:] = -(2 ** 41)  # all beams start identical: keep one
        state: Dict[str, Any] = {}
        finished: List[List[Tuple[List[int], int]]] = [[] for _ in range(B)]
        done = [False] * B
        forbid = None
        for step in range(max_len):
            logits = self.decode_step(tokens, enc, state)
            if forbid is None:
                forbid = torch.zeros(logits.shape[-1], dtype=torch.bool)
                forbid[pad] = True
                if bos != eos:
                    forbid[bos] = True
            lp = self.log_probs(logits[:, -1:], forbid)[:, 0]  # (B*beam, V)
            V = lp.shape[-1]
            if step == max_len - 1:  # force EOS
                keep = lp[:, eos].clone()
                lp.fill_(-(2 ** 36))
                lp[:, eos] = keep
            cand = (scores.view(-1, 1) + lp).view(B, beam * V).clamp_(min=-(2 ** 42))
            # deterministic ties: equal scores rank by lower (beam, token) index, like argmax
            key = cand * (1 << 20) - torch.arange(beam * V)
            _, top_i = key.topk(2 * beam, dim=-1)
            top_s = cand.gather(1, top_i)
            new_scores = torch.full((B, beam), -(2 ** 41), dtype=torch.long)
            new_src = torch.zeros(B, beam, dtype=torch.long)
            new_tok = torch.full((B, beam), pad, dtype=torch.long)
            for b in range(B):
                n = 0
                for sc, idx in zip(top_s[b].tolist(), top_i[b].tolist()):
                    if done[b] or sc <= -(2 ** 40):
                        break
                    src, tok = divmod(idx, V)
                    if tok == eos:
                        hyp = tokens[b * beam + src, 1:].tolist()
                        finished[b].append((hyp, sc))
                        if len(finished[b]) >= beam:
                            done[b] = True
                        continue
                    if n < beam:
                        new_scores[b, n], new_src[b, n], new_tok[b, n] = sc, src, tok
                        n += 1
                if n == 0:
                    done[b] = True
            if all(done):
                break
            rows = (torch.arange(B)[:, None] * beam + new_src).view(-1)
            tokens = torch.cat([tokens.index_select(0, rows), new_tok.view(-1, 1)], dim=1)
            state = reorder_state(state, rows)
            scores = new_scores
        out = []
        for b in range(B):
            hyps = finished[b]
            # score / (len + 1) descending, by integer cross-multiplication
            import functools

            def cmp(x, y):
                a, la = x[1], len(x[0]) + 1
                c, lc = y[1], len(y[0]) + 1
                return -1 if a * lc > c * la else (1 if a * lc < c * la else 0)

            out.append(sorted(hyps, key=functools.cmp_to_key(cmp))[:beam])
        return out


def _key_lengths(mask: Tensor, heads: int) -> Optional[Tensor]:
    """Key padding ``mask [B, Tk]`` (True: padded) as valid-key counts per (batch row, head), int32 ``[B * heads]``;
    None unless every row's padding is a suffix (what the one-pass C attention takes)."""
    if mask.dim() != 2:
        return None
    lengths = (~mask).sum(-1)
    if not torch.equal(mask, torch.arange(mask.shape[1]) >= lengths[:, None]):
        return None
    return lengths.to(torch.int32).repeat_interleave(heads)


def reorder_state(state: Any, rows: Tensor) -> Any:
    """Beam reordering of the decoder state (batch on dim 0 of every cached tensor). Cross-attention keys/values
    (those with a derived-tensor cache) keep their packed form, reordered, instead of being packed again."""
    if isinstance(state, dict):
        return {k: reorder_state(v, rows) for k, v in state.items()}
    if isinstance(state, QT):
        out = QT(state.c.index_select(0, rows), state.z, state.scale, state.on)
        if state.aux is not None:
            out.aux = {}
            kv = state.aux.get("cgemm_kv")
            if kv is not None:  # [B * heads, ...] -> the rows' heads
                heads = state.c.shape[1]
                hr = (rows[:, None] * heads + torch.arange(heads)).reshape(-1)
                out.aux["cgemm_kv"] = kv.select(hr)
        return out
    if isinstance(state, Tensor) and state.dim() > 0:
        return state.index_select(0, rows)
    return state
