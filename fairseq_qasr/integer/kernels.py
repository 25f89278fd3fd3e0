"""Integer kernels: fixed-point requantization, int8 GEMMs with int32 accumulation, integer softmax,
LayerNorm with an integer square root, look-up tables.

Everything at inference time is integer arithmetic on integer tensors. The only float code here is
:func:`quantize_multiplier`, which runs once when a model is compiled/exported (never during inference).
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import cbuild, cgemm, cops, numba_kernels

INT8_MIN, INT8_MAX = -128, 127


# --- compile-time helper (float, runs at export only) -----------------------------------------------
def quantize_multiplier(M: Tensor) -> Tuple[Tensor, Tensor]:
    """Real multipliers ``M > 0`` -> (``m`` int32 in [2^30, 2^31), ``shift`` int8) with ``M ~= m * 2^-shift``
    (gemmlowp / TFLite ``QuantizeMultiplier``). Multipliers below 2^-31 get a smaller ``m`` (shift capped at 62)."""
    M = M.detach().double().reshape(-1) if M.dim() else M.detach().double().reshape(1)
    if bool((M <= 0).any()):
        raise ValueError("requantization multiplier must be positive")
    mant, exp = torch.frexp(M)  # M = mant * 2^exp, mant in [0.5, 1)
    m = torch.round(mant * 2.0 ** 31).long()
    shift = 31 - exp.long()
    top = m == 2 ** 31
    m = torch.where(top, m // 2, m)
    shift = torch.where(top, shift - 1, shift)
    if bool((shift < 1).any()):
        raise ValueError(f"requantization multiplier too large ({float(M.max()):.3g} >= 2^30)")
    over = (shift - 62).clamp(min=0)
    m = torch.div(m, 2 ** over, rounding_mode="floor") if bool(over.any()) else m
    shift = shift.clamp(max=62)
    return m.to(torch.int32), shift.to(torch.int8)


WIDE_WORD = 2 ** 31  # two-word multipliers: m >= WIDE_WORD holds m_hi 2^31 + m_lo (see split_multiplier)


def mantissa62(r) -> Tuple[int, int]:
    """``(m, e)`` with ``r = m 2^-e`` rounded half up to ``m`` in [2^61, 2^62) (``r`` a positive Fraction)."""
    from fractions import Fraction

    r = Fraction(r)
    e = 61 - (r.numerator.bit_length() - r.denominator.bit_length())
    while r * 2 ** e >= 2 ** 62:
        e -= 1
    while r * 2 ** e < 2 ** 61:
        e += 1
    m = math.floor(r * 2 ** e + Fraction(1, 2))
    return (m // 2, e - 1) if m == 2 ** 62 else (m, e)


def quantize_multiplier_exact(num: Tensor, den: Tensor) -> Tuple[Tensor, Tensor]:
    """Compile time: the real multipliers ``num / den`` (float64 values taken as the exact binary fractions they
    are: products of float32 scales, float32 scales) -> (``m`` int64 in [2^61, 2^62), ``shift``) with ``m 2^-shift``
    the exact ratio rounded half up to 62 bits (relative error <= 2^-62). :func:`split_multiplier` turns it into the
    two 31-bit words the kernels multiply with. Ratios of 2^30 or more are an error; below 2^-32 the shift stops at
    93 (``m`` then has fewer bits)."""
    from fractions import Fraction

    num = num.detach().double().reshape(-1)
    den = den.detach().double().reshape(-1).expand(num.numel())
    ms, shs = [], []
    for a, b in zip(num.tolist(), den.tolist()):
        if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"requantization multiplier must be positive and finite ({a} / {b})")
        r = Fraction(a) / Fraction(b)
        m, sh = mantissa62(r)
        if sh < 32:
            raise ValueError(f"requantization multiplier too large ({float(r):.3g} >= 2^30)")
        if sh > 93:  # (the shift stops at 93: fewer bits)
            m, sh = math.floor(r * 2 ** 93 + Fraction(1, 2)), 93
        if m < WIDE_WORD:
            raise ValueError(f"requantization multiplier too small ({float(r):.3g} < 2^-62)")
        ms.append(m)
        shs.append(sh)
    return torch.tensor(ms, dtype=torch.int64), torch.tensor(shs, dtype=torch.int64)


def exact_fixed_point(factors: Sequence[Tensor], den: Tensor, shift: int, low_bits: int) -> Tuple[Tensor, Tensor]:
    """Compile time: ``round(prod(factors) / den * 2^shift)`` (half up) of the exact binary fractions the float64
    values are (scales, integer codes; broadcast together), as int64 ``(value >> low_bits, value mod 2^low_bits)``:
    two words, so that values beyond int64 (a bias at ``shift`` bits) are held exactly."""
    from fractions import Fraction

    ts = torch.broadcast_tensors(*(f.detach().double() for f in factors), den.detach().double())
    hi, lo, mask = [], [], (1 << low_bits) - 1
    for vals in zip(*(t.reshape(-1).tolist() for t in ts)):
        r = Fraction(1)
        for v in vals[:-1]:
            r *= Fraction(v)
        q = math.floor(r / Fraction(vals[-1]) * 2 ** shift + Fraction(1, 2))
        hi.append(q >> low_bits)
        lo.append(q & mask)
    return torch.tensor(hi, dtype=torch.int64).view(ts[0].shape), torch.tensor(lo, dtype=torch.int64).view(ts[0].shape)


def split_multiplier(m: Tensor, shift: Tensor) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``(m_hi, m_lo, s)`` such that ``m 2^-shift = (m_hi + m_lo 2^-31) 2^-s`` with ``m_hi, m_lo < 2^31``: a one-word
    multiplier (``m < 2^31``, every file before format version 5) is itself with ``m_lo = None``; a two-word one
    (:func:`quantize_multiplier_exact`) splits into its high and low 31 bits, ``s = shift - 31``. The kernels compute
    ``(a m_hi + floor(a m_lo / 2^31) + 2^(s-1)) >> s``: exactly ``a m 2^-shift`` rounded half up, for ``|a| < 2^32``."""
    m, shift = m.long(), shift.long()
    wide = m >= WIDE_WORD
    if not bool(wide.any()):
        return m, None, shift
    hi = torch.where(wide, m >> 31, m)
    lo = torch.where(wide, m & (WIDE_WORD - 1), torch.zeros_like(m))
    return hi, lo, torch.where(wide, shift - 31, shift)


def _wide_product(a: Tensor, hi: Tensor, lo: Optional[Tensor]) -> Tensor:
    """``a m_hi + floor(a m_lo / 2^31)`` in int64 (``|a| < 2^32`` where ``m_lo`` is given)."""
    return a * hi if lo is None else a * hi + ((a * lo) >> 31)


def mul_round(a: Tensor, hi: Tensor, lo: Optional[Tensor], s: Tensor) -> Tensor:
    """``round(a (m_hi + m_lo 2^-31) 2^-s)`` (half up) exactly, as :func:`rshift_round` of :func:`_wide_product`
    where ``|a| < 2^32``; for wider int64 values (``|a| < 2^62``: wide accumulators with a two-word multiplier) in
    31-bit limbs: ``a m = T 2^62 + R`` with ``a = a1 2^31 + a0``, ``m = m_hi 2^31 + m_lo``, then ``(T + 2^(S-63))
    >> (S-62)`` for ``S = s + 31 >= 63`` (else ``T 2^(62-S) + ((R + 2^(S-1)) >> S)``). The C kernels take 128 bits."""
    if lo is None or not a.numel() or int(a.abs().max()) < 2 ** 32:
        return rshift_round(_wide_product(a, hi, lo), s)
    if int(a.abs().max()) >= 2 ** 62:
        raise ValueError("two-word requantization of values of 2^62 or more")
    m31 = WIDE_WORD - 1
    a1, a0 = a >> 31, a & m31
    y = a1 * lo + a0 * hi  # |y| < 2^63
    z = (y & m31) * WIDE_WORD + a0 * lo  # < 2^63
    t = a1 * hi + (y >> 31) + (z >> 62)
    r = z & (2 ** 62 - 1)
    S = s.long() + 31
    big = S >= 63
    hi_part = (t + (torch.ones_like(S) << (S - 63).clamp(min=0))) >> (S - 62).clamp(min=0)
    lo_part = (t << (62 - S).clamp(min=0)) + ((r + (torch.ones_like(S) << (S - 1).clamp(max=62))) >> S.clamp(max=62))
    return torch.where(big, hi_part, lo_part)


# --- requantization -------------------------------------------------------------------------------
def rshift_round(x: Tensor, shift: Tensor) -> Tensor:
    """``round(x / 2^shift)`` (half up) for int64 ``x`` and integer ``shift >= 1``."""
    return (x + (torch.ones_like(shift, dtype=torch.int64) << (shift.long() - 1))) >> shift.long()


def shorten_multiplier(m: Tensor, shift: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """The same multiplier with ``bits`` fewer mantissa bits (relative error <= 2^(bits-31)): for int64
    accumulators of up to ``31 + bits`` bits, so that ``acc * m`` stays inside int64."""
    if not bits:
        return m, shift
    short = rshift_round(m.long(), torch.full_like(shift.long(), bits))
    return short.to(m.dtype), (shift.long() - bits).to(shift.dtype)  # stored as compactly as before


ADD_ALIGN_BITS = 13  # add_multipliers: the larger operand's multiplier may carry this many extra bits


def add_multipliers(sa: float, sb: float, s_out: float) -> Tuple[int, int, int, int, int]:
    """Compile time: ``(ma, ta, mb, tb, sh)`` with ``s_a / s_out ~= ma 2^(ta - sh)`` and ``s_b / s_out ~= mb 2^(tb -
    sh)`` (``ma, mb < 2^31``) for :func:`add_requant_int`. Each multiplier keeps 31 bits where the two ratios are
    within 2^13 of each other (the common shift is the finer one's, the coarser one shifted left by up to 13 bits);
    beyond that the finer one loses the excess bits."""
    (ma, sha), (mb, shb) = (tuple(int(v) for v in quantize_multiplier(torch.tensor([r], dtype=torch.float64)))
                            for r in (sa / s_out, sb / s_out))
    sh = min(max(sha, shb), min(sha, shb) + ADD_ALIGN_BITS)
    out = []
    for m, shi in ((ma, sha), (mb, shb)):
        if shi <= sh:
            out += [m, sh - shi]
        else:  # (only the finer operand, beyond 2^13 apart): its multiplier rounded to fewer bits
            d = shi - sh
            out += [(m + (1 << (d - 1))) >> d, 0]
    return out[0], out[1], out[2], out[3], sh


def add_multipliers_exact(sa: float, sb: float, s_out: float) -> Tuple[int, int, int, int, int, int, int]:
    """Compile time: :func:`add_multipliers` with two-word multipliers, ``(ma, ta, mb, tb, sh, la, lb)``: ``s_a /
    s_out = (ma + la 2^-31) 2^(ta - sh)`` rounded half up to 62 bits from the exact ratio
    (:func:`quantize_multiplier_exact`), likewise ``b``; the same alignment of the two (the finer one rounded to
    fewer bits beyond 2^13 apart)."""
    (ma, sha), (mb, shb) = (tuple(int(v) for v in quantize_multiplier_exact(torch.tensor([s], dtype=torch.float64),
                                                                            torch.tensor([s_out], dtype=torch.float64)))
                            for s in (sa, sb))
    sha, shb = sha - 31, shb - 31  # the high words' shifts
    sh = min(max(sha, shb), min(sha, shb) + ADD_ALIGN_BITS)
    out = []
    for m, shi in ((ma, sha), (mb, shb)):
        t = sh - shi
        if t < 0:  # (only the finer operand, beyond 2^13 apart): rounded to fewer bits
            m, t = (m + (1 << (-t - 1))) >> -t, 0
        out.append((m >> 31, t, m & (WIDE_WORD - 1)))
    (ha, ta, la), (hb, tb, lb) = out
    return ha, ta, hb, tb, sh, la, lb


def add_requant_int(a: Tensor, za: int, ma: int, ta: int, b: Tensor, zb: int, mb: int, tb: int, sh: int, zp: int,
                    qmin: int, qmax: int, out_dtype=torch.int32, la: int = 0, lb: int = 0) -> Tensor:
    """Residual add straight onto a consumer's grid: ``clamp(((x ma 2^ta + y mb 2^tb + floor((x la 2^ta + y lb 2^tb)
    / 2^31) + 2^(sh-1)) >> sh) + zp, qmin, qmax)``, ``x = a - za``, ``y = b - zb`` within 2^17 (every term stays
    below 2^61: exact in int64); ``la``, ``lb``: the second words of two-word multipliers (0: one word). Exact ties
    of the real value (the full product within its rounding bound of a half) round to even, as the fake model's
    ``torch.round``: two grids' ratios meet on a half now and then (2 codes in test-clean, session 14)."""
    if cbuild.available():  # (a broadcast operand, e.g. the positions of a batch, copied out first)
        a, b = torch.broadcast_tensors(a, b)
        return cops.add_requant(a, za, ma, ta, b, zb, mb, tb, sh, zp, qmin, qmax, out_dtype, la, lb)
    x, y = a.long() - za, b.long() - zb
    low = x * (la << ta) + y * (lb << tb)
    t = x * (ma << ta) + y * (mb << tb) + (low >> 31)
    half = 1 << (sh - 1)
    q = (t + half) >> sh
    # an exact tie of the real value rounds to even (the fake model's torch.round): the 93-bit product t 2^31 +
    # (low mod 2^31) lies within w of the exact value (the multipliers' rounding)
    rem, d = t & (2 * half - 1), low & (2 ** 31 - 1)
    w = ((x.abs() << ta) + (y.abs() << tb)) // 2 + 1
    odd = (q & 1) == 1
    q = q - (odd & (rem == half) & (d <= w)).long() + (odd & (rem == half - 1) & (2 ** 31 - d <= w)).long()
    return torch.clamp(q + zp, qmin, qmax).to(out_dtype)


def requantize(acc: Tensor, m: Tensor, shift: Tensor, zp: int, qmin: int, qmax: int, out_dtype=torch.int8,
               sub: int = 0) -> Tensor:
    """``clamp(round((acc - sub) * m * 2^-shift) + zp, qmin, qmax)``: int32/int64 accumulator (or codes minus their
    zero point ``sub``) -> integer codes; one- or two-word multipliers (:func:`split_multiplier`). One pass in C
    (:mod:`.cops`) or :mod:`.numba_kernels` where it applies, else torch ops."""
    if cbuild.available():
        out = cops.requantize(acc, m, shift, zp, qmin, qmax, out_dtype, sub)
        if out is not None:
            return out
    if ONE_PASS and acc.numel() >= SMALL_TENSOR:  # (a parallel numba call costs ~0.1 ms to start)
        out = numba_kernels.requantize(acc, m, shift, zp, qmin, qmax, out_dtype, sub)
        if out is not None:
            return out
    a = acc.long() - sub if sub else acc.long()
    hi, lo, sh = split_multiplier(m, shift)
    y = mul_round(a, hi, lo, sh) + zp
    return y.clamp_(qmin, qmax).to(out_dtype)


def rescale(acc: Tensor, m: Tensor, shift: Tensor) -> Tensor:
    """``round(acc * m * 2^-shift)`` as int64 (no clamp): move an accumulator onto another grid."""
    hi, lo, sh = split_multiplier(m, shift)
    return mul_round(acc.long(), hi, lo, sh)


# --- GEMMs ----------------------------------------------------------------------------------------
ONE_PASS = numba_kernels.AVAILABLE and os.environ.get("QASR_CPU_KERNELS", "1") != "0"  # numba requant/softmax
SMALL_TENSOR = 4096  # fewer elements: torch ops beat starting a parallel numba kernel (decoder steps)
SMALL_M = 16  # at most this many rows (decoder steps): an int32 GEMV-like matmul beats _int_mm's overhead
_BACKEND: Optional[str] = None


def int8_gemm_backend() -> str:
    """How int8 x int8 -> int32 GEMMs run here: ``"int_mm"`` (``torch._int_mm``), ``"avx2"`` (:mod:`.cgemm`, C,
    ``vpmaddwd``), ``"numba"`` (:mod:`.numba_kernels`, int16 operands) or ``"int32"`` (an int32 matmul of the
    widened codes). All are exact integer arithmetic; which is fastest depends on the CPU: ``_int_mm`` is fast where
    the CPU has int8 dot-product instructions (measured on such a machine: 2.6 ms against 10.2 ms for fp32 ``mm`` on
    1500x384 @ 384x1536), but on an AVX2 CPU without VNNI it took 1376 ms, the int32 matmul 148 ms, the numba
    kernel 56 ms, the C kernel 10-17 ms (fp32 MKL: 20-35 ms). Probed once per process on a small product;
    ``QASR_INT_GEMM`` overrides."""
    global _BACKEND
    if _BACKEND is None:
        forced = os.environ.get("QASR_INT_GEMM")
        if forced in GEMM_BACKENDS and _backend_available(forced):
            _BACKEND = forced
        else:
            g = torch.Generator().manual_seed(0)
            a = torch.randint(-128, 128, (256, 384), generator=g, dtype=torch.int8)
            b = torch.randint(-128, 128, (384, 384), generator=g, dtype=torch.int8)
            timings = {}
            for name in GEMM_BACKENDS:
                if not _backend_available(name):
                    continue
                prepared = prepare_weight(b, name)
                _gemm(a, b, prepared, name)  # warm-up (numba: compile or load from its cache)
                runs = []
                for _ in range(5):  # the fastest of five: robust to other jobs on the machine
                    t = time.perf_counter()
                    _gemm(a, b, prepared, name)
                    runs.append(time.perf_counter() - t)
                timings[name] = min(runs)
            _BACKEND = min(timings, key=timings.get)
            if "avx2" in timings and timings["avx2"] <= 2 * timings[_BACKEND]:
                _BACKEND = "avx2"  # also runs 16-bit codes and weight groups in one pass: keep it unless 2x slower
    return _BACKEND


GEMM_BACKENDS = ("int_mm", "avx2", "numba", "int32")


def _backend_available(name: str) -> bool:
    return {"numba": numba_kernels.AVAILABLE, "avx2": name == "avx2" and cbuild.available()}.get(name, True)


def prepare_weight(b: Tensor, backend: Optional[str] = None):
    """The int8 right operand ``[K, N]`` in the layout the backend reads (cache it for weights)."""
    backend = backend or int8_gemm_backend()
    if backend == "avx2":
        return cgemm.pack(b)
    if backend == "numba":
        return numba_kernels.prepare(b)
    return b.int() if backend == "int32" else b.contiguous()


def _prepared_for(prepared, backend: str) -> bool:
    if backend == "avx2":
        return isinstance(prepared, cgemm.Packed) and not prepared.out64
    return isinstance(prepared, Tensor) and prepared.dtype == {"numba": torch.int16, "int32": torch.int32}.get(
        backend, torch.int8)


def _gemm(a: Tensor, b: Tensor, prepared, backend: str) -> Tensor:
    if backend == "int_mm":
        return torch._int_mm(a.contiguous(), b.contiguous())
    if prepared is None:
        prepared = prepare_weight(b, backend)
    if backend == "avx2":
        return cgemm.mm(a, prepared)
    if backend == "numba":
        return numba_kernels.mm(a, prepared)
    return torch.matmul(a.int(), prepared)


def int_mm(a: Tensor, b: Tensor, prepared: Tensor | None = None) -> Tensor:
    """int8 ``[M, K] @ [K, N]`` -> int32 (int32 accumulation, exact for ``K < 2^17``), on the fastest backend
    (:func:`int8_gemm_backend`; ``prepared``: ``b`` from :func:`prepare_weight`, cached by the caller); few rows
    (decoder steps) take the int32 matmul. Wider codes (16-bit grids, stored as int32): see :func:`wide_mm`."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return wide_mm(a, b)
    backend = int8_gemm_backend()
    if a.shape[0] <= SMALL_M and not (backend == "avx2" and _prepared_for(prepared, backend)):
        return torch.matmul(a.int(), prepared if _prepared_for(prepared, "int32") else b.int())
    return _gemm(a, b, prepared if _prepared_for(prepared, backend) else None, backend)


def _bytes(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``x = hi * 256 + lo`` with ``lo`` in [0, 255] and ``hi`` the arithmetic high part (int32 each)."""
    x = x.int()
    return x >> 8, x & 255


def wide_mm(a: Tensor, b: Tensor, prepared: Optional["cgemm.Packed"] = None) -> Tensor:
    """Exact ``a @ b`` (batched) for integer codes of up to 16 bits (|code| < 2^15, or unsigned < 2^16) as int64.
    With the AVX2 kernel (:mod:`.cgemm`) and an int8 right operand (``prepared``: ``cgemm.pack(b, wide=True)``,
    cached by the caller for weights): one pass, int32 partial sums flushed to int64. Otherwise each operand wider
    than 8 bits is split into bytes and the byte products run as int32 matmuls (each sum stays below 2^31 for
    ``K < 2^15``), recombined in int64 — an int64 matmul was 19x slower than int32 here."""
    if int8_gemm_backend() == "avx2":
        if a.dim() == 2:
            usable = isinstance(prepared, cgemm.Packed) and prepared.out64 and prepared.ratio is None
            return cgemm.mm(a, prepared if usable else cgemm.pack(b, wide=True))
        return _batched_cgemm(a, 0, b, 0, wide=True)
    if a.shape[-1] >= 2 ** 15:
        raise ValueError(f"wide_mm: reduction length {a.shape[-1]} >= 2^15 may overflow the int32 byte products")
    pa = _bytes(a) if a.dtype != torch.int8 else (None, a.int())
    pb = _bytes(b) if b.dtype != torch.int8 else (None, b.int())
    out = None
    for ia, ta in enumerate(pa):
        for ib, tb in enumerate(pb):
            if ta is None or tb is None:
                continue
            part = torch.matmul(ta, tb).long()
            shift = 8 * ((ia == 0 and pa[0] is not None) + (ib == 0 and pb[0] is not None))
            part = part << shift if shift else part
            out = part if out is None else out + part
    return out


def pack_batched(b: Tensor, wide: bool) -> list:
    """:func:`cgemm.pack` of each ``b [..., K, N]`` matrix (flattened leading dims)."""
    b2 = b.reshape(-1, *b.shape[-2:])
    return [cgemm.pack(b2[i], wide=wide) for i in range(b2.shape[0])]


def _batched_cgemm(a: Tensor, za: int, b: Tensor, zb: int, wide: bool, packs: Optional[list] = None) -> Tensor:
    """``(a[i] - za) @ (b[i] - zb)`` for each leading index, through :mod:`.cgemm`, written in place."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a2 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b2 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.empty(a2.shape[0], a2.shape[1], b2.shape[2], dtype=torch.int64 if wide else torch.int32)
    for i in range(a2.shape[0]):
        cgemm.mm(a2[i], packs[i] if packs is not None else cgemm.pack(b2[i], wide=wide), za, zb, out=out[i])
    return out.view(*batch, a2.shape[1], b2.shape[2])


def linear_int(x: Tensor, w_t: Tensor, bias_eff: Tensor | None, prepared: Tensor | None = None) -> Tensor:
    """``x [..., K]`` integer codes times ``w_t [K, N]`` int8 weights (symmetric, zero point 0), plus the
    folded bias ``bias - z_x * colsum(w_t)``: the exact accumulator of ``(x - z_x) @ w`` — int32 for int8 codes,
    int64 for wider ones (then ``bias_eff`` must be int64 too)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x.dtype == torch.int8 and bias_eff is not None and _prepared_for(prepared, "avx2") \
            and int8_gemm_backend() == "avx2":  # the bias joins the C kernel's column terms: no pass over acc
        return cgemm.mm(x2, prepared, bias=bias_eff).view(*lead, w_t.shape[1])
    acc = int_mm(x2, w_t, prepared) if x.dtype == torch.int8 else wide_mm(x2, w_t, prepared)
    if bias_eff is not None:
        acc += bias_eff
    return acc.view(*lead, w_t.shape[1])


def matmul_int(a: Tensor, za: int, b: Tensor, zb: int, packs: Optional[list] = None) -> Tensor:
    """Exact ``(a - za) @ (b - zb)`` for batched codes ``a [..., M, K]``, ``b [..., K, N]``: int32 for int8
    codes, int64 for wider ones. ``packs``: ``b`` from :func:`pack_batched` (cached by the caller), AVX2 only."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    M, K, N = a.shape[1], a.shape[2], b.shape[2]
    if int8_gemm_backend() == "avx2":  # zero points folded into the kernel's epilogue
        wide = a.dtype != torch.int8 or b.dtype != torch.int8
        return _batched_cgemm(a, za, b, zb, wide, packs).view(*batch, M, N)
    if a.dtype == torch.int8 and b.dtype == torch.int8 and M > SMALL_M and int8_gemm_backend() != "int32":
        out = torch.empty(a.shape[0], M, N, dtype=torch.int32)
        for i in range(a.shape[0]):
            out[i] = _gemm(a[i], b[i], None, int8_gemm_backend())
    elif a.dtype == torch.int8 and b.dtype == torch.int8:
        out = torch.matmul(a.int(), b.int())
    else:  # 16-bit codes: products reach 2^31 after a few terms, accumulate in int64
        out = wide_mm(a, b)
    if zb:
        out -= zb * a.sum(-1, dtype=out.dtype).unsqueeze(-1)
    if za:
        out -= za * b.sum(-2, dtype=out.dtype).unsqueeze(-2)
    if za and zb:
        out += K * za * zb
    return out.view(*batch, M, N)


# --- integer nonlinearities ------------------------------------------------------------------------
def isqrt(v: Tensor) -> Tensor:
    """Floor integer square root of a non-negative int64 tensor (bitwise, 32 steps, no float; in C where the AVX2
    kernels are built, bit for bit)."""
    if cbuild.available() and bool((v < 2 ** 62).all()):
        return cops.isqrt(v)
    v = v.long()
    res = torch.zeros_like(v)
    for b in range(31, -1, -1):
        cand = res | (1 << b)
        res = torch.where(cand * cand <= v, cand, res)
    return res


def layer_norm_int(x: Tensor, gain: Tensor, bias: Tensor | None, eps_term: int, k: int, frac: int = 16) -> Tensor:
    """Integer LayerNorm over the last dim of codes ``x``.

    ``c = n*x - sum(x)`` (= n * (x - mean) in code units), ``D = isqrt((sum c^2 << 2k) / n + eps_term)``
    (~ 2^k * n * std), ``xhat = round(c * 2^(frac+k) / D)`` (the normalized input with ``frac`` fractional bits),
    then ``xhat * gain + (bias << (frac - 16))`` (gain: int codes per element, zero point 0; bias codes on the fake
    model's grid ``s_gain * 2^-16``) on the grid ``s_gain * 2^-frac`` (int64). ``eps_term = round(n^2 eps 2^2k /
    s_x^2)``.
    """
    n = x.shape[-1]
    xi = x.long()
    c = n * xi - xi.sum(-1, keepdim=True)
    ss = (c * c).sum(-1, keepdim=True)  # floor(ss 2^2k / n) as (ss // n) 2^2k + floor((ss % n) 2^2k / n): in int64
    v = ((ss // n) << (2 * k)) + torch.div((ss % n) << (2 * k), n, rounding_mode="floor") + eps_term
    d = isqrt(v).clamp_(min=1)
    xhat = torch.div((c << (frac + 1 + k)) + d, 2 * d, rounding_mode="floor")
    y = xhat * gain.long()
    if bias is not None:
        y += bias.long() << (frac - 16)
    return y


# --- exact LayerNorm (format version 5) ----------------------------------------------------------------
LN_ROW_BITS = 110  # the row's variance term W 2^2G is brought to about 2^110 (its square root D to ~2^55 bits)


def ln_exact_constants(n: int, eps: float, s_x: float, s_gain: float, s_out: float, bias: Optional[Tensor],
                       umax: int) -> Tuple[list, Tensor, Tensor]:
    """Compile time: the constants of :func:`layer_norm_exact` for a LayerNorm over ``n`` features (input grid
    ``s_x``, gain grid ``s_gain``, bias codes on ``s_gain 2^-16``) feeding a quantizer of scale ``s_out``; ``umax``
    bounds ``|c * gain|``. Returns ``ints = [mA, SA, S, Em, Ee, Eint]`` (``A = s_gain / s_out = mA 2^-SA``, the
    variance floor ``E = n^2 eps / s_x^2 = Em 2^-Ee``, ``Eint = floor(E)``, the output shift ``S``) and the bias
    ``B = round(beta / s_out 2^(S+30))`` as its high (``>> 30``) and low 30 bits per feature."""
    from fractions import Fraction

    if umax >= 2 ** 32 or n >= 2 ** 14:
        raise NotImplementedError(f"exact LayerNorm: |c * gain| up to {umax} (n = {n}) does not fit its 2^32 bound")
    A = Fraction(s_gain) / Fraction(s_out)
    E = Fraction(n * n) * Fraction(eps) / (Fraction(s_x) ** 2)
    mA, SA = mantissa62(A)
    Em, Ee = mantissa62(E) if E > 0 else (0, 0)
    # S: the row multiplier M = A 2^(S+30) / sqrt(W) below 2^60 for every row that is not constant
    # (W >= E + n - 1 there); the bias's high word below 2^61
    w_lb = float(E) + n - 1
    S = math.floor(30 - math.log2(float(A)) + 0.5 * math.log2(w_lb)) - 1
    bmax = 0 if bias is None else int(bias.long().abs().max()) * s_gain / 2 ** 16 / s_out
    if bmax > 0:
        S = min(S, math.floor(61 - 30 - math.log2(bmax)) - 1)
    if not 1 <= S <= 62:
        raise NotImplementedError(f"exact LayerNorm: output shift {S} outside [1, 62]")
    codes = torch.zeros(n, dtype=torch.float64) if bias is None else bias.reshape(-1).double()
    bh, bl = exact_fixed_point([codes, torch.tensor(s_gain * 2.0 ** -16, dtype=torch.float64)],
                               torch.tensor(s_out, dtype=torch.float64), S + 30, 30)
    return [mA, SA, S, Em, Ee, math.floor(E)], bh, bl


def ln_row_multiplier(V: int, n: int, ints: list) -> int:
    """The row multiplier ``M = round(A 2^(S+30) / sqrt(W))`` of :func:`layer_norm_exact`, ``W = V / n + E`` (``V =
    sum c^2``), in integers: ``Wf = floor(W 2^2G)`` near ``2^LN_ROW_BITS``, ``D = isqrt(Wf)``, ``M = round(mA
    2^(S+30-SA+G) / D)``; 0 for a constant row (``V = 0``: every ``c`` is 0). The C kernel computes the same."""
    if V == 0:
        return 0
    mA, SA, S, Em, Ee, Eint = ints
    Wi = V // n
    G = (LN_ROW_BITS - (Wi + Eint).bit_length()) // 2
    e2 = 2 * G - Ee
    Wf = (Wi << 2 * G) + (((V % n) << 2 * G) // n) + ((Em << e2) if e2 >= 0 else (Em >> -e2))
    D = math.isqrt(Wf)
    k = S + 30 - SA + G
    num = mA << k if k >= 0 else mA >> -k
    return min((num + D // 2) // D, 2 ** 60 - 1)


def layer_norm_exact(x: Tensor, gain: Tensor, bh: Tensor, bl: Tensor, ints: list, zp: int, qmin: int, qmax: int,
                     out_dtype=torch.int32) -> Tensor:
    """LayerNorm over the last dim of codes ``x`` straight onto a consumer's grid, rounded once from an exact
    computation: ``c = n x - sum x``, per row ``M`` (:func:`ln_row_multiplier`, 60 bits), ``u = c * gain``, ``t = u
    M_hi + bh + floor((u M_lo + bl) / 2^30)`` (``M = M_hi 2^30 + M_lo``), code ``clamp(((t + 2^(S-1)) >> S) + zp)``:
    ``round(c gain A / sqrt(V / n + E) + beta / s_out)``, the fake model's ``round(y / s_out)``, to about 2^-50
    relative. Torch twin of the C kernel (the row multipliers in Python integers)."""
    if cbuild.available():
        return cops.layer_norm_exact(x, gain, bh, bl, ints, zp, qmin, qmax, out_dtype)
    n = x.shape[-1]
    xi = x.long().reshape(-1, n)
    c = n * xi - xi.sum(-1, keepdim=True)
    V = (c * c).sum(-1).tolist()
    M = torch.tensor([ln_row_multiplier(v, n, ints) for v in V], dtype=torch.int64).unsqueeze(-1)
    S = int(ints[2])
    u = c * gain.long()
    t = u * (M >> 30) + bh + ((u * (M & (2 ** 30 - 1)) + bl) >> 30)
    y = ((t + (1 << (S - 1))) >> S) + zp
    return y.clamp_(qmin, qmax).to(out_dtype).view(x.shape)


def _exp_terms(q: Tensor, exp_lut: Tensor, masked, cmin: int):
    """Shared by the integer softmax and log-softmax: codes (masked lanes at ``cmin``), row max, table
    exponentials ``exp_lut[max - q]`` (0 on masked lanes) and their row sums (at least 1)."""
    xi = q.long()
    if masked is not None:
        xi = xi.masked_fill(masked, cmin)
        mx = xi.masked_fill(masked, cmin - 1).amax(-1, keepdim=True).clamp_(min=cmin)
    else:
        mx = xi.amax(-1, keepdim=True)
    e = exp_lut.long()[mx - xi]
    if masked is not None:
        e = e.masked_fill(masked, 0)
    s = e.sum(-1, keepdim=True).clamp_(min=1)
    return xi, mx, e, s


def softmax_out_mult(s_out: float) -> Tuple[int, int]:
    """Compile time: the softmax output multiplier ``(round(2^shift / s_out), shift)`` with the multiplier near 2^30
    (shift 22 for 8-bit outputs; at least 16, as before format version 4): its rounding and the row reciprocal's
    ``floor`` then move an output code by about 2^-22 LSB, where shift 16 left 2^-16."""
    shift = max(16, math.floor(30 + math.log2(s_out)))
    return int(round(2.0 ** shift / s_out)), shift


def recip_bits(out_mult: int) -> int:
    """Fraction bits ``R`` of the softmax's per-row reciprocal ``floor(out_mult * 2^R / sum)``: 30, or fewer when
    ``out_mult`` is large (fine 16-bit output grids), so that ``out_mult * 2^R`` and ``e * r <= out_mult * 2^R``
    (``e <= sum``) stay below 2^62."""
    return max(0, min(30, 61 - int(out_mult).bit_length()))


def softmax_int(x: Tensor, cmin: int, masked: Tensor | None, exp_lut: Tensor, out_mult: int, out_shift: int,
                zp_out: int, qmin: int, qmax: int, out_dtype=torch.int8) -> Tensor:
    """Softmax of integer codes over the last dim.

    ``exp_lut[d] = round(2^F exp(-s_in d))`` for code distances ``d = max - x`` (a table over the k-bit
    input), masked lanes contribute 0. Output code ``round(E * out_mult / (sum E * 2^out_shift)) + zp_out``
    with ``out_mult = round(2^out_shift / s_out)``, computed with one integer division per row (a reciprocal
    ``floor(out_mult * 2^30 / sum)``) and a multiply-shift per element.
    """
    R = recip_bits(out_mult)
    if ONE_PASS:
        out = numba_kernels.softmax(x, cmin, masked, exp_lut, out_mult << R, R + out_shift, zp_out, qmin, qmax,
                                    out_dtype)
        if out is not None:
            return out
    xi, mx, e, s = _exp_terms(x, exp_lut, masked, cmin)
    # one division per row: r = floor(out_mult * 2^R / sum), then round(e * r * 2^-(R + out_shift))
    r = torch.div(out_mult << R, s, rounding_mode="floor")
    sh = R + out_shift
    q = ((e * r + (1 << (sh - 1))) >> sh) + zp_out
    return q.clamp_(qmin, qmax).to(out_dtype)


EXP_BITS = 62  # exact softmax: exponentials round(2^62 exp(-s d))


def exp_table_exact(scale: float, n_codes: int) -> Tensor:
    """Compile time: ``round(2^62 exp(-scale d))`` for ``d = 0 .. n_codes-1`` (int64), from 40-digit decimals (the
    float64 ``exp`` is good to 53 bits only)."""
    from decimal import Decimal, localcontext

    out = []
    with localcontext() as ctx:
        ctx.prec = 40
        step, top = (-Decimal(scale)).exp(), Decimal(2 ** EXP_BITS)
        v = top
        for _ in range(n_codes):
            e = int((v + Decimal("0.5")).to_integral_value("ROUND_FLOOR"))
            if e == 0:
                break
            out.append(e)
            v *= step
    return torch.tensor(out + [0] * (n_codes - len(out)), dtype=torch.int64)


def softmax_exact_constants(s_out: float) -> Tuple[int, int]:
    """Compile time: ``(cq, Q)`` of :func:`softmax_exact`: ``Q = floor(122 + log2 s_out)``, ``cq = floor(2^Q /
    s_out)`` (exact), so that the row reciprocal ``floor(cq / sum)`` stays below 2^61 (``sum >= 2^62``)."""
    from fractions import Fraction

    Q = math.floor(122 + math.log2(s_out))
    return math.floor(Fraction(2) ** Q / Fraction(s_out)), Q


def softmax_exact(x: Tensor, cmin: int, masked: Optional[Tensor], lut: Tensor, cq: int, Q: int, zp_out: int,
                  qmin: int, qmax: int, out_dtype=torch.int8) -> Tensor:
    """Softmax of integer codes over the last dim, rounded once from 62-bit exponentials: ``e = lut[max - x]`` (0
    on masked lanes), per row ``r = floor(cq / sum e)`` (Python integers), code ``clamp(((e r +
    2^(Q-1)) >> Q) + zp_out)`` = ``round(e / (sum e * s_out))`` to about 2^-45 LSB. ``e r`` (up to 2^123) is taken
    in 31-bit limbs: ``floor(e r / 2^62) = e1 r1 + ((e1 r0 + e0 r1 + ((e0 r0) >> 31)) >> 31)``, then rounded by
    ``2^(Q-62)``. The C kernels compute the same in 128 bits (:func:`cops.softmax_exact`, the one-pass attention)."""
    if cbuild.available():
        return cops.softmax_exact(x, cmin, masked, lut, cq, Q, zp_out, qmin, qmax, out_dtype)
    _, _, e, _ = _exp_terms(x, lut, masked, cmin)
    mask31 = 2 ** 31 - 1
    e1, e0 = e >> 31, e & mask31
    s1, s0 = e1.sum(-1).reshape(-1).tolist(), e0.sum(-1).reshape(-1).tolist()
    # (a row with a lane has sum e >= 2^62, its maximum's e: r < 2^61; a fully masked row has every e = 0)
    r = torch.tensor([min(cq // max((a << 31) + b, 1), 2 ** 62) for a, b in zip(s1, s0)],
                     dtype=torch.int64).view(*e.shape[:-1], 1)
    r1, r0 = r >> 31, r & mask31
    t = e1 * r1 + ((e1 * r0 + e0 * r1 + ((e0 * r0) >> 31)) >> 31)
    q = ((t + (1 << (Q - 63))) >> (Q - 62)) + zp_out
    return q.clamp_(qmin, qmax).to(out_dtype)


def exp_table(scale: float, n_codes: int, frac_bits: int = 20) -> Tensor:
    """Compile time: ``round(2^F exp(-scale d))`` for ``d = 0 .. n_codes-1`` (int64)."""
    d = torch.arange(n_codes, dtype=torch.float64)
    return torch.round(torch.exp(-scale * d) * 2.0 ** frac_bits).long()


def ln_shift_bits(n: int, code_bits: int = 8) -> int:
    """Extra precision ``k`` for :func:`layer_norm_int` that keeps every intermediate inside int64:
    ``(sum c^2 / n) << 2k <= n^2 2^(2 code_bits + 2k) < 2^62`` and ``|c| 2^(frac+1+k) < 2^55`` (at n = 384: 16-bit
    inputs 5, 8-bit ones 13; ``D`` ~ 2^k n std, the integer square root, is then exact to 2^-26 or better)."""
    return max(0, min(16, int((62 - 2 * math.log2(max(n, 2)) - 2 * code_bits - 1) // 2)))


def max_pool2d_ceil(x: Tensor, k: int = 2) -> Tensor:
    """Max-pool (kernel = stride = k, ceil_mode) over dims 1, 2 of channel-last codes ``[B, T, F, C]``."""
    b, t, f, c = x.shape
    pt, pf = (-t) % k, (-f) % k
    if pt or pf:
        low = torch.iinfo(x.dtype).min
        x = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (0, pf, 0, pt), value=low).permute(0, 2, 3, 1)
    t2, f2 = (t + pt) // k, (f + pf) // k
    return x.reshape(b, t2, k, f2, k, c).amax(dim=(2, 4))


def log_table(frac_bits: int = 16, index_bits: int = 10) -> Tensor:
    """Compile time: ``round(2^F ln(1 + j / 2^index_bits))`` for ``j = 0 .. 2^index_bits - 1`` (int64)."""
    j = torch.arange(2 ** index_bits, dtype=torch.float64)
    return torch.round(torch.log1p(j / 2 ** index_bits) * 2.0 ** frac_bits).long()


def ilog2_floor(v: Tensor) -> Tensor:
    """``floor(log2 v)`` of positive int64 values (bitwise binary search, no float)."""
    v = v.long()
    r = torch.zeros_like(v)
    for b in (32, 16, 8, 4, 2, 1):
        big = (v >> b) > 0
        r = torch.where(big, r + b, r)
        v = torch.where(big, v >> b, v)
    return r


def ln_fixed(v: Tensor, ln2: int, table: Tensor, index_bits: int = 10) -> Tensor:
    """``round(2^F ln v)`` for positive int64 ``v``: exponent times ``ln2 = round(2^F ln 2)`` plus a table on
    the top ``index_bits`` mantissa bits (error < 2^-index_bits relative)."""
    e = ilog2_floor(v)
    # mantissa bits below the leading one, aligned to index_bits
    shift = e - index_bits
    mant = torch.where(shift >= 0, v >> shift.clamp(min=0), v << (-shift).clamp(min=0)) - (1 << index_bits)
    return e * ln2 + table[mant]


def log_softmax_int(q: Tensor, cmin: int, masked: Optional[Tensor], exp_lut: Tensor, step: int, ln2: int,
                    log_lut: Tensor, exp_frac_bits: int = 20) -> Tensor:
    """Log-softmax of integer codes over the last dim, in fixed point (2^-16 nats, int64):
    ``(q - max) * step - ln(sum exp_lut[max - q] / 2^exp_frac_bits)`` with ``step = round(2^16 s_in)``."""
    xi, mx, e, s = _exp_terms(q, exp_lut, masked, cmin)
    lse = ln_fixed(s, ln2, log_lut) - exp_frac_bits * ln2
    out = (xi - mx) * step - lse
    if masked is not None:
        out = out.masked_fill(masked, -(2 ** 36))
    return out
