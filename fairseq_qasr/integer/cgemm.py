"""Exact integer GEMMs on the C kernels (:mod:`.cbuild`): int8 or 16-bit codes, ``vpmaddwd`` into int32 (int8 codes
times right codes in [-127, 127]: the u8 x s8 ``vpmaddubsw`` way, bytes centred and clamped so no pair sum can
saturate, outliers added back), optional per-group partial sums combined with integer ratios in int64 (per-group
weight scales), zero points, a rounding shift + bias and optionally the consumer's requantization folded into the
epilogue; and the one-pass attention (QK^T, softmax, AV per head and 16 query rows).

Why: ``torch._int_mm`` is fast only with int8 dot-product instructions (VNNI/AMX). Without them the fastest exact
integer GEMM had been the numba kernel (one horizontal reduction per output); this one is register-blocked (4 rows x
16 columns per tile, B packed into 16-column panels) and runs 16-bit codes and weight groups in the same pass, where
the torch path split 16-bit codes into bytes and ran one GEMM per weight group.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import cbuild, cops
from .cbuild import NR

B_MAX = 255  # right operand codes in [-255, 255]: a byte of a 16-bit code, or int8 codes
WIDE_GROUP = 256  # k per int32 partial sum for 16-bit left codes: 256 x 2^15 x 255 < 2^31
# int8 left codes times right codes in [-127, 127] take the u8 x s8 (vpmaddubsw) way; QASR_CGEMM_BYTES=0: vpmaddwd only
BYTE_WAY = os.environ.get("QASR_CGEMM_BYTES", "1") != "0"


NONE8 = torch.empty(0, dtype=torch.int8)


@dataclass
class Packed:
    """A right operand ``[K, N]`` in the kernel's layout, with what the product needs besides it."""

    bp: Tensor  # int16 [Np/16, Kp/2, 16, 2]
    k: int
    n: int
    gs: int  # k per int32 partial sum (a weight group, WIDE_GROUP, or Kp: one int32 accumulator)
    ratio: Optional[Tensor]  # int32 [groups, Np] or None
    colsum: Tensor  # int64 [N]: sum_g ratio_g * colsum_g (plain column sums without ratios)
    out64: bool  # int64 output (per-group ratios, 16-bit codes), else int32
    reps: int = 1  # the left operand repeated along K this many times (16-bit right operands: high, low byte)
    inits: dict = field(default_factory=dict)  # (off - za, zb) -> the kernel's int64 column term, cached
    bq: Optional[Tensor] = None  # int8 [Np/16, Kq/4, 16, 4]: codes in [-127, 127] as bytes, for the u8 x s8 way
    colsum_np: Optional[Tensor] = None  # colsum zero padded to Np (the u8 x s8 way's centre term)
    ratio_lo: Optional[Tensor] = None  # int32 [groups, Np]: second words of two-word ratios ratio * 2^lshift + ratio_lo
    colsum_lo: Optional[Tensor] = None  # int64 [N]: sum_g ratio_lo_g * colsum_g
    lshift: int = 0

    @property
    def words(self) -> int:
        """1, or 2 with two-word ratios: column terms, ``post`` and ``colsum_np`` then hold the second words' at
        ``Np``."""
        return 1 if self.ratio_lo is None else 2

    def init(self, d: int, zb: int) -> Tensor:
        """Column term ``d * colsum - zb * K * d`` (``d = off - za``), zero padded to ``Np`` (two words: both, the
        second at ``Np``); cached per key."""
        t = self.inits.get((d, zb))
        if t is None:
            t = torch.zeros(self.np_ * self.words, dtype=torch.int64)
            t[:self.n] = d * self.colsum - zb * self.k * d
            if self.colsum_lo is not None:
                t[self.np_:self.np_ + self.n] = d * self.colsum_lo
            if len(self.inits) < 64:
                self.inits[(d, zb)] = t
        return t

    @property
    def kp(self) -> int:
        return self.bp.shape[1] * 2

    @property
    def np_(self) -> int:
        return self.bp.shape[0] * NR


@cbuild.op("pack_avx2(Tensor b, Tensor(a!) bp, Tensor(b!) colsum, int[] ints) -> ()")
def _pack_op(b: Tensor, bp: Tensor, colsum: Tensor, ints: List[int]) -> None:
    part, k0 = ints
    k, n = b.shape
    cbuild.dll().qasr_pack(b.data_ptr(), cbuild.TYPES[b.dtype], b.stride(0), b.stride(1), k, n, part,
                           bp.data_ptr() + 2 * k0 * NR, bp.shape[1] * 2, bp.shape[0] * NR, colsum.data_ptr())


@cbuild.op("pack_batch_avx2(Tensor b, Tensor(a!) bp, Tensor(b!) colsum) -> ()")
def _pack_batch_op(b: Tensor, bp: Tensor, colsum: Tensor) -> None:
    nb, k, n = b.shape
    cbuild.dll().qasr_pack_batch(b.data_ptr(), cbuild.TYPES[b.dtype], b.stride(0), b.stride(1), b.stride(2), k, n, 0,
                                 bp.data_ptr(), bp[0].numel(), bp.shape[2] * 2, bp.shape[1] * NR, colsum.data_ptr(), nb,
                                 torch.get_num_threads())


def pack_batch(b: Tensor, k_align: int = 2) -> Tuple[Tensor, Tensor]:
    """``b [B, K, N]`` codes (int8/int16/int32 storage, values within int16) packed as :func:`pack` packs each
    ``b[i]`` without groups or splitting, in one call: ``(bp [B, Np/16, Kp/2, 16, 2] with Kp = K rounded up to
    k_align (even), column sums [B, N] int64)``."""
    nb, k, n = b.shape
    bp = torch.zeros(nb, -(-n // NR), -(-k // k_align) * k_align // 2, NR, 2, dtype=torch.int16)
    colsum = torch.empty(nb, n, dtype=torch.int64)
    _pack_batch_op(cbuild.codes(b), bp, colsum)
    return bp, colsum


def _pack_into(b: Tensor, part: int, bp: Tensor, k0: int, colsum: Tensor) -> None:
    """``b`` (a 2-D view of integer codes, any strides) packed into rows ``k0..`` (even) of every panel of ``bp``."""
    _pack_op(cbuild.codes(b), bp, colsum, [part, k0])


@cbuild.op("pack_bytes_avx2(Tensor b, Tensor(a!) out) -> ()")
def _pack_bytes_op(b: Tensor, out: Tensor) -> None:
    nb, k, n = b.shape
    cbuild.dll().qasr_pack_bytes(b.data_ptr(), b.stride(0), b.stride(1), b.stride(2), k, n, out.data_ptr(),
                                 out.shape[2] * 4, out.shape[1] * NR, nb, torch.get_num_threads())


def _byte_panels(b: Tensor) -> Tensor:
    """Codes ``b [..., K, N]`` within int8 (any strides) in the u8 x s8 kernel's layout: ``[..., Np/16, Kq/4, 16, 4]``
    int8 (zero padded)."""
    b = b if b.dtype == torch.int8 else b.to(torch.int8)
    *lead, k, n = b.shape
    kq, np_ = -(-k // 4) * 4, -(-n // NR) * NR
    out = torch.empty(*lead, np_ // NR, kq // 4, NR, 4, dtype=torch.int8)
    _pack_bytes_op(b.reshape(-1, k, n) if lead else b[None], out.view(-1, np_ // NR, kq // 4, NR, 4))
    return out


def pack(b: Tensor, group_size: int = 0, ratio: Optional[Tensor] = None, wide: bool = False,
         split: Optional[bool] = None, ratio_lo: Optional[Tensor] = None, lshift: int = 0) -> Packed:
    """Pack codes ``b [K, N]`` (any strides). Codes within [-255, 255] are packed as they are; wider (16-bit) codes
    as their high and low bytes (two stacked halves combined by ratios 256 and 1, int64 out). ``group_size`` +
    ``ratio [N, groups]`` (int32): per-group products combined as ``sum_g ratio[n, g] * partial_g``; ``wide``: the
    left operand has 16-bit codes (int64 out, int32 partial sums over ``WIDE_GROUP`` k). ``ratio_lo`` (like
    ``ratio``) + ``lshift`` in [1, 62]: two-word ratios ``R = ratio * 2^lshift + ratio_lo``; the product is then
    ``floor(sum_g R_g partial_g / 2^lshift)`` (plus ``post``'s words, :func:`mm`), each partial sum computed once."""
    cbuild.dll()  # (a clear error where the kernels are not available)
    if b.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64) or b.dim() != 2:
        raise TypeError(f"cgemm.pack: expected 2-D integer codes, got {b.dtype} {tuple(b.shape)}")
    k, n = b.shape
    np_ = -(-n // NR) * NR
    lo, hi = (int(v) for v in torch.aminmax(b)) if b.dtype != torch.int8 and b.numel() else (-128, 127)
    if split is None:
        split = lo < -B_MAX or hi > B_MAX
    if split:
        if ratio is not None:
            raise ValueError("cgemm.pack: per-group ratios need right operand codes in [-255, 255]")
        if lo < -(2 ** 15) or hi > 2 ** 15 - 1:
            raise ValueError("cgemm.pack: right operand codes beyond 16 bits")
        kh = -(-k // WIDE_GROUP) * WIDE_GROUP
        bp = torch.zeros(np_ // NR, kh, NR, 2, dtype=torch.int16)  # [high bytes; low bytes] along K
        hi, lo = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
        _pack_into(b, 1, bp, 0, hi)  # (high, low) = (v >> 8, v & 255) of the stored codes
        _pack_into(b, 2, bp, kh, lo)
        groups = 2 * kh // WIDE_GROUP
        rt = torch.ones(groups, np_, dtype=torch.int32)
        rt[: groups // 2] = 256
        return Packed(bp, k, n, WIDE_GROUP, rt, hi * 256 + lo, True, reps=2)
    if not wide and ratio is None and k >= 2 ** 16:
        raise ValueError(f"cgemm.pack: K={k} too long for one int32 accumulator; pack with wide=True")
    kp = k + (k % 2)
    if ratio is not None:
        if not group_size or group_size % 2 or k % group_size or tuple(ratio.shape) != (n, k // group_size):
            raise ValueError(f"cgemm.pack: ratios {tuple(ratio.shape)} do not match K={k}, group size {group_size}")
        gs = group_size
    else:
        gs = WIDE_GROUP if wide else kp
    bp = torch.zeros(np_ // NR, kp // 2, NR, 2, dtype=torch.int16)
    colsum = torch.zeros(n, dtype=torch.int64)
    _pack_into(b, 0, bp, 0, colsum)
    rt = None
    if ratio is not None:
        rt = torch.zeros(k // gs, np_, dtype=torch.int32)
        rt[:, :n] = ratio.t()
        colsum = (cbuild.codes(b).long().view(k // gs, gs, n).sum(1) * ratio.t().long()).sum(0)
    p = Packed(bp, k, n, gs, rt, colsum, wide or ratio is not None)
    if ratio_lo is not None:
        if ratio is None or tuple(ratio_lo.shape) != tuple(ratio.shape) or not 1 <= lshift <= 62:
            raise ValueError(f"cgemm.pack: second ratio words {tuple(ratio_lo.shape)} need first words of the same "
                             f"shape and a shift in [1, 62] (got {lshift})")
        p.ratio_lo = torch.zeros(k // gs, np_, dtype=torch.int32)
        p.ratio_lo[:, :n] = ratio_lo.t()
        p.colsum_lo = (cbuild.codes(b).long().view(k // gs, gs, n).sum(1) * ratio_lo.t().long()).sum(0)
        p.lshift = lshift
    if BYTE_WAY and not wide and (ratio is None or gs % 4 == 0) \
            and b.numel() and int(b.min()) >= -127 and int(b.max()) <= 127:
        p.bq = _byte_panels(b)
        p.colsum_np = torch.zeros(np_ * p.words, dtype=torch.int64)
        p.colsum_np[:n] = colsum
        if p.colsum_lo is not None:
            p.colsum_np[np_:np_ + n] = p.colsum_lo
    return p


@cbuild.op("qgemm_avx2(Tensor a, Tensor bp, Tensor bq, Tensor colsum, Tensor ratio, Tensor ratio_lo, Tensor init, "
           "Tensor post, Tensor rq_mult, Tensor rq_mlo, Tensor rq_shift, Tensor(a!) out, int[] ints) -> ()")
def _qgemm_op(a: Tensor, bp: Tensor, bq: Tensor, colsum: Tensor, ratio: Tensor, ratio_lo: Tensor, init: Tensor,
              post: Tensor, rq_mult: Tensor, rq_mlo: Tensor, rq_shift: Tensor, out: Tensor, ints: List[int]) -> None:
    off, reps, k, n, gs, bz, rshift, rq, rq_zp, rq_qmin, rq_qmax, acc64, lshift = ints
    out64 = bool(acc64)  # int64 accumulators (else int32); rq: either requantized into out's codes
    cbuild.dll().qasr_qgemm(a.data_ptr(), cbuild.TYPES[a.dtype], a.stride(0), off, reps, a.shape[0], k,
                            bp.data_ptr(), bp.shape[1] * 2, bp.shape[0] * NR, n, gs,
                            ratio.data_ptr() if ratio.numel() else None, init.data_ptr() if init.numel() else None,
                            bz, rshift, post.data_ptr() if post.numel() else None,
                            None if out64 else out.data_ptr(), out.data_ptr() if out64 and not rq else None,
                            # (int32 way with rq: the out32 pointer only selects the way, rq writes the codes)
                            out.stride(0), bq.data_ptr() if bq.numel() else None,
                            colsum.data_ptr() if colsum.numel() else None,
                            rq_mult.data_ptr() if rq else None, rq_mlo.data_ptr() if rq and rq_mlo.numel() else None,
                            rq_shift.data_ptr() if rq else None,
                            int(rq_mult.numel() > 1), rq_zp, rq_qmin, rq_qmax, out.data_ptr() if rq else None,
                            cbuild.TYPES.get(out.dtype, 0), out.stride(0),
                            ratio_lo.data_ptr() if ratio_lo.numel() else None, lshift, torch.get_num_threads())


def mm(a: Tensor, p: Packed, za: int = 0, zb: int = 0, out: Optional[Tensor] = None, rshift: int = 0,
       post: Optional[Tensor] = None, requant: Optional[Tuple[Tensor, Tensor, int, int, int, torch.dtype]] = None,
       bias: Optional[Tensor] = None) -> Tensor:
    """Exact ``sum_g ratio_g * ((a - za)_g @ (b - zb)_g)`` (plain ``(a - za) @ (b - zb)`` without ratios; ``zb``
    must be 0 with them) for integer codes ``a [M, K]`` of up to 16 bits (int8, or int16/int32 storage spanning at
    most 2^16 values; rows may be strided): int32 when one int32 accumulator holds the whole sum (int8 codes, no
    groups), else int64. ``out``: a preallocated ``[M, N]`` tensor of that dtype (rows may be strided). int64 only:
    ``rshift`` rounds the result down by ``2^rshift`` (half up), then ``post [N]`` (int64; or padded to ``Np``) is
    added. ``requant = (multiplier, shift, zp, qmin, qmax, dtype)`` (one multiplier/shift or one per column): the
    int32/int64 results never reach memory; returns their codes as :func:`cops.requantize` would
    (``clamp(((v * m + 2^(sh-1)) >> sh) + zp, qmin, qmax)``) in ``dtype`` (int8/int16/int32). ``bias [N]``: added
    to every row, within the kernel's column terms (no extra pass over the output). Two-word ratios
    (:func:`pack`'s ``ratio_lo``): ``floor((sum_g (ratio_g 2^L + ratio_lo_g) partial_g + b 2^L + bl) / 2^L)`` with
    ``post`` as ``[2 Np]`` words ``(b, bl)`` (no ``rshift``)."""
    cbuild.dll()  # (a clear error where the kernels are not available)
    if a.dim() != 2 or a.shape[1] != p.k:
        raise ValueError(f"cgemm.mm: left operand {tuple(a.shape)} does not match K={p.k}")
    if zb and p.ratio is not None and p.reps == 1:
        raise ValueError("cgemm.mm: a right-operand zero point with per-group ratios")
    a = cbuild.codes(a)
    if a.stride(1) != 1:
        a = a.contiguous()
    off = 0
    if a.dtype != torch.int8 and a.numel():
        lo, hi = (int(v) for v in torch.aminmax(a))
        if hi - lo > 2 ** 16 - 1:
            raise ValueError(f"cgemm.mm: left operand spans {hi - lo + 1} values (more than 16 bits)")
        if lo < -(2 ** 15) or hi > 2 ** 15 - 1:
            off = lo + 2 ** 15  # shift into int16; init adds (off - za) * colsum back
    if not p.out64 and a.dtype != torch.int8:
        raise ValueError("cgemm.mm: 16-bit left operand needs a right operand packed with wide=True")
    dtype = torch.int64 if p.out64 else torch.int32
    rq_m, rq_ml, rq_sh, rq_ints = cbuild.NONE64, cbuild.NONE64, cbuild.NONE64, [0, 0, 0, 0]
    if requant is not None:
        m, sh, zp, qmin, qmax, rq_dtype = requant
        if out is not None or rq_dtype not in (torch.int8, torch.int16, torch.int32) \
                or m.numel() not in (1, p.n) or sh.numel() not in (1, m.numel()):
            raise ValueError("cgemm.mm: requant needs one multiplier/shift or one per column, int8/16/32 codes, no out")
        rq_m, rq_ml, rq_sh = cops.words(m, sh)  # (one- or two-word multipliers)
        rq_ints = [1, int(zp), int(qmin), int(qmax)]
        dtype = rq_dtype
    if out is None:
        out = torch.empty(a.shape[0], p.n, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != (a.shape[0], p.n) or (out.numel() and out.stride(1) != 1):
        raise ValueError(f"cgemm.mm: out must be a row-major {dtype} [{a.shape[0]}, {p.n}] view")
    init = p.init(off - za, zb) if off != za or zb else cbuild.NONE64
    if bias is not None:
        if bias.numel() != p.n:
            raise ValueError(f"cgemm.mm: bias of {bias.numel()} values for N={p.n}")
        col = torch.zeros(p.np_ * p.words, dtype=torch.int64)  # (first words only)
        col[:p.n] = bias.reshape(-1)
        init = col if init is cbuild.NONE64 else col + init
    if (rshift or post is not None) and not p.out64:
        raise ValueError("cgemm.mm: rshift/post apply to int64 outputs only")
    if p.words == 2:
        if rshift or zb or (post is not None and post.numel() != 2 * p.np_):
            raise ValueError("cgemm.mm: two-word ratios take post as [2 Np] words, no rshift or right zero point")
    elif post is not None and post.numel() != p.np_:  # (callers that repeat a post term pass it padded to Np)
        post = torch.cat([post.long(), torch.zeros(p.np_ - p.n, dtype=torch.int64)]) if p.np_ > p.n else post.long()
    byteway = p.bq is not None and a.dtype == torch.int8
    _qgemm_op(a, p.bp, p.bq if byteway else NONE8, p.colsum_np if byteway else cbuild.NONE64,
              p.ratio if p.ratio is not None else cbuild.NONE32,
              p.ratio_lo if p.ratio_lo is not None else cbuild.NONE32, init,
              cbuild.NONE64 if post is None else post.contiguous(), rq_m, rq_ml, rq_sh, out,
              [off, p.reps, p.k, p.n, p.gs, zb, rshift, *rq_ints, int(p.out64), p.lshift])
    return out


def byte_way_blocks() -> Tuple[int, int]:
    """Row blocks of int8 left codes (times right codes in [-127, 127]) since the last call that took the vpmaddwd
    way (too many codes far from their block's mean) and the u8 x s8 way; resets the counts."""
    out = torch.zeros(2, dtype=torch.int64)
    cbuild.dll().qasr_byte_way_blocks(out.data_ptr())
    return int(out[0]), int(out[1])


@cbuild.op("attention_avx2(Tensor q, Tensor kp, Tensor kinit, Tensor lut, Tensor vp, Tensor klen, Tensor kq, "
           "Tensor kcol, Tensor(a!) out, int[] ints) -> ()")
def _attention(q: Tensor, kp: Tensor, kinit: Tensor, lut: Tensor, vp: Tensor, klen: Tensor, kq: Tensor, kcol: Tensor,
               out: Tensor, ints: List[int]) -> None:
    (tk, zk, m1, m1l, sh1, zp1, qmin1, qmax1, mult_r, sh, zpo, qmino, qmaxo, cq_hi, cq_lo, Q, m2, m2l, sh2, zp2, qmin2,
     qmax2, vo_zv) = ints
    bh, tq, d = q.shape
    exact = lut.dtype == torch.int64  # (62-bit exponentials: kernels.softmax_exact)
    cbuild.dll().qasr_attention(q.data_ptr(), bh, tq, d, kp.data_ptr(), kp[0].numel(), tk, kp.shape[1] * NR,
                                kinit.data_ptr(), zk, m1, m1l, sh1, zp1, qmin1, qmax1,
                                None if exact else lut.data_ptr(), mult_r, sh, zpo, qmino, qmaxo,
                                lut.data_ptr() if exact else None, cq_hi, cq_lo, Q,
                                m2, m2l, sh2, zp2, qmin2, qmax2, vp.data_ptr(), vp[0].numel(),
                                vp.shape[2] * 2, vo_zv, vp.shape[1] * NR, klen.data_ptr() if klen.numel() else None,
                                kq.data_ptr() if kq.numel() else None, kcol.data_ptr() if kcol.numel() else None,
                                out.data_ptr(), torch.get_num_threads())


def _words(rq: Tuple[int, int, int, int, int]) -> List[int]:
    """(multiplier, shift, zp, qmin, qmax) -> (m_hi, m_lo, shift', zp, qmin, qmax) (kernels.split_multiplier)."""
    return list(_split_words(int(rq[0]), int(rq[1]))) + list(rq[2:])


@functools.lru_cache(maxsize=1024)
def _split_words(m: int, shift: int) -> Tuple[int, int, int]:
    hi, lo, sh = cops.words(torch.tensor([m]), torch.tensor([shift]))
    return int(hi), int(lo) if lo.numel() else 0, int(sh)


@dataclass
class PackedKV:
    """Keys and values of :func:`attention` in the kernel's layout (reusable while they do not change: the
    cross-attention of a whole decode)."""

    kp: Tensor  # int16 [BH, Tkp/16, d/2, 16, 2]
    kinit: Tensor  # int32 [BH, Tkp]: the query/key zero-point terms
    vp: Tensor  # int16 [BH, dp/16, vKp/2, 16, 2]: value codes minus vo
    tk: int
    vo_zv: int  # vo - zv
    kq: Optional[Tensor] = None  # int8 [BH, Tkp/16, dq/4, 16, 4]: key codes (in [-127, 127]) for the u8 x s8 QK^T
    kcol: Optional[Tensor] = None  # int32 [BH, Tkp]: key column sums (with kq)

    def select(self, heads: Tensor) -> "PackedKV":
        """These packs for the heads ``heads`` (beam reordering), in that order."""
        pick = (lambda t: None if t is None else t.index_select(0, heads))
        return PackedKV(pick(self.kp), pick(self.kinit), pick(self.vp), self.tk, self.vo_zv, pick(self.kq),
                        pick(self.kcol))


def pack_kv(kt: Tensor, zq: int, zk: int, v: Tensor, zv: int) -> PackedKV:
    """Pack ``kt [BH, d, Tk]`` int8 key codes and ``v [BH, Tk, d]`` value codes of up to 16 bits for queries with
    zero point ``zq``."""
    cbuild.dll()  # (a clear error where the kernels are not available)
    bh, d, tk = kt.shape
    if kt.dtype != torch.int8 or d % 2:
        raise ValueError("cgemm.attention: int8 key codes and an even head dimension expected")
    if d > 2 ** 14 or abs(zk) > 255 or abs(zq) > 255:  # the kernel adds the zero-point terms in int32
        raise ValueError("cgemm.attention: head dimension or zero points too large for int32 score terms")
    kp, kcol = pack_batch(kt)
    kinit = torch.zeros(bh, kp.shape[1] * NR, dtype=torch.int32)
    kinit[:, :tk] = -zq * kcol + zk * d * zq
    lo, hi = (int(x) for x in torch.aminmax(v)) if v.dtype != torch.int8 and v.numel() else (-128, 127)
    vo = 0 if lo >= -(2 ** 15) and hi < 2 ** 15 else lo + 2 ** 15  # V' = V - vo: int16 codes
    if hi - vo >= 2 ** 15:
        raise ValueError("cgemm.attention: value codes wider than 16 bits")
    vp, _ = pack_batch(v if not vo else v.int() - vo, 16)  # (the kernel scans key pairs 8 at a time)
    kv = PackedKV(kp, kinit, vp, tk, vo - zv)
    if BYTE_WAY and d % 4 == 0 and kt.numel() and int(kt.min()) >= -127:
        kv.kq = _byte_panels(kt)
        kv.kcol = torch.zeros(bh, kp.shape[1] * NR, dtype=torch.int32)
        kv.kcol[:, :tk] = kcol
    return kv


def attention(q: Tensor, zq: int, kt: Tensor, zk: int, scores_rq: Tuple[int, int, int, int, int], lut: Tensor,
              softmax: Tuple[int, int, int, int, int], probs_rq: Tuple[int, int, int, int, int], v: Tensor,
              zv: int, kv: Optional[PackedKV] = None, klen: Optional[Tensor] = None) -> Tensor:
    """Attention (optionally with key padding) in one pass per (head, block of 16 query rows), bit for bit the
    engine's unfused kernels: ``q [BH, Tq, d]`` int8 codes, ``kt [BH, d, Tk]`` int8 codes, ``v [BH, Tk, d]`` codes of up to 16 bits
    (or ``kv``: both already packed by :func:`pack_kv`; ``kt``, ``v`` are then not read); ``klen [BH]``: keys at and
    past ``klen[i]`` are masked (key padding: no part in the row max and sums, probability 0);
    ``scores_rq`` / ``probs_rq`` = (multiplier, shift, zero point, qmin, qmax) onto the softmax input and AV input
    grids (stored codes, at most 16 bits), ``softmax`` = (``out_mult << R``, ``R + out_shift``, zero point, qmin,
    qmax) of :func:`kernels.softmax_int` with exp table ``lut`` (int32), or with an int64 table of 62-bit
    exponentials ``(cq, Q, zero point, qmin, qmax)`` of :func:`kernels.softmax_exact`. Probabilities go to the AV
    product as the bytes of their offset from the zero point, so key pairs that are 0 in a whole 4-row tile are
    skipped. Returns the int64 AV accumulators [BH, Tq, d]."""
    cbuild.dll()  # (a clear error where the kernels are not available)
    bh, tq, d = q.shape
    if q.dtype != torch.int8 or d % 2:
        raise ValueError("cgemm.attention: int8 query codes and an even head dimension expected")
    if not 0 <= probs_rq[4] - probs_rq[2] < 2 ** 16:  # probabilities as offsets from the zero point: 16 bits
        raise ValueError("cgemm.attention: AV input grid wider than 16 bits")
    if lut.numel() < scores_rq[4] - scores_rq[3] + 1:  # (indexed by max - code over the softmax input grid)
        raise ValueError(f"cgemm.attention: exp table of {lut.numel()} entries for a grid of "
                         f"{scores_rq[4] - scores_rq[3] + 1} codes")
    tk = kv.tk if kv is not None else kt.shape[-1]
    if klen is not None and (klen.shape != (bh,) or int(klen.min()) < 0 or int(klen.max()) > tk):
        raise ValueError(f"cgemm.attention: key lengths must be {bh} values in [0, {tk}]")
    if kv is None:
        kv = pack_kv(kt, zq, zk, v, zv)
    out = torch.empty(bh, tq, d, dtype=torch.int64)
    if lut.dtype == torch.int64:  # exact: softmax = (cq, Q, zp, qmin, qmax), cq = floor(2^Q / s_out) < 2^126
        cq, Q = int(softmax[0]), int(softmax[1])
        sm = [0, 1, *softmax[2:], cq >> 63, cq & (2 ** 63 - 1), Q]
    else:
        sm, lut = [*softmax, 0, 0, 1], lut.to(torch.int32)
    ints = [kv.tk, zk, *_words(scores_rq), *sm, *_words(probs_rq), kv.vo_zv]
    _attention(q.contiguous(), kv.kp, kv.kinit, lut.contiguous(), kv.vp,
               cbuild.NONE32 if klen is None else klen.to(torch.int32).contiguous(),
               NONE8 if kv.kq is None else kv.kq, cbuild.NONE32 if kv.kcol is None else kv.kcol, out,
               [int(i) for i in ints])
    return out
