"""Two-word (62-bit) requantization multipliers (format version 5): every kernel that requantizes — the C vector
and scalar paths, the GEMM epilogues, the one-pass attention, the residual add, numba, torch — rounds ``a * M``
exactly as the rational number it is (half up), checked against Python integers."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from fairseq_qasr.integer import cbuild, cgemm, cops
from fairseq_qasr.integer import kernels as K
from fairseq_qasr.integer import numba_kernels

needs_c = pytest.mark.skipif(not cbuild.available(), reason="C kernels not built here (no AVX2 CPU or no C compiler, "
                                                            "or QASR_CGEMM=0)")


def exact(a: torch.Tensor, m: torch.Tensor, sh: torch.Tensor, zp: int, lo: int, hi: int) -> torch.Tensor:
    """``clamp(floor(a m / 2^sh + 1/2) + zp)`` in Python integers (``m``, ``sh`` broadcast over the last dim)."""
    cols = a.shape[-1]
    mm = [int(v) for v in m.reshape(-1).expand(cols)] if m.numel() > 1 else [int(m)] * cols
    ss = [int(v) for v in sh.reshape(-1).expand(cols)] if sh.numel() > 1 else [int(sh)] * cols
    rows = a.reshape(-1, cols).tolist()
    out = [[min(max(((x * mm[j] + (1 << (ss[j] - 1))) >> ss[j]) + zp, lo), hi) for j, x in enumerate(r)] for r in rows]
    return torch.tensor(out, dtype=torch.int64).view(a.shape)


def near_tie(a0: int, M: float) -> tuple:
    """A two-word multiplier ``(m, shift)`` near ``M`` that puts ``a0 > 0`` (not a power of two) just at or above a
    rounding tie, so that its high word alone (the low word dropped) rounds ``a0`` one code lower or more: ``m =
    ceil((k + 1/2) 2^shift / a0)`` for the first ``k >= floor(a0 M)`` where that leaves a low word."""
    assert a0 > 0 and a0 & (a0 - 1), a0
    for k in range(int(a0 * M), int(a0 * M) + 64):
        tie = Fraction(2 * k + 1, 2 * a0)
        sh = 61 - tie.numerator.bit_length() + tie.denominator.bit_length()
        while True:
            m = -((-(2 * k + 1) * 2 ** sh) // (2 * a0))
            if m < 2 ** 61:
                sh += 1
            elif m >= 2 ** 62:
                sh -= 1
            else:
                break
        if m % 2 ** 31:
            assert (a0 * (m >> 31) * 2 ** 31 + 2 ** (sh - 1)) >> sh <= k  # (the high word alone: k or less)
            return m, sh
    raise AssertionError(f"no near tie for {a0}")


def two_word(n: int, g: torch.Generator, lo: float = 1e-6, hi: float = 1e-1):
    """``n`` exact 62-bit multipliers of random float32-like ratios in [lo, hi)."""
    num = (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).float().double()
    den = torch.full((n,), 0.37, dtype=torch.float32).double()
    return K.quantize_multiplier_exact(num, den)


def test_exact_multipliers_are_the_ratio_rounded_to_62_bits():
    g = torch.Generator().manual_seed(0)
    num = torch.rand(50, generator=g, dtype=torch.float64).float().double() * 10 + 1e-4
    den = (torch.rand(50, generator=g, dtype=torch.float64) + 0.01).float().double()
    m, sh = K.quantize_multiplier_exact(num, den)
    for a, b, mi, si in zip(num.tolist(), den.tolist(), m.tolist(), sh.tolist()):
        r = Fraction(a) / Fraction(b)
        assert 2 ** 61 <= mi < 2 ** 62
        assert abs(Fraction(mi, 2 ** si) - r) <= Fraction(1, 2 ** (si + 1))  # rounded, not truncated
    hi, lo, s = K.split_multiplier(m, sh)
    assert torch.equal(hi * 2 ** 31 + lo, m) and bool((hi < 2 ** 31).all()) and torch.equal(s, sh - 31)
    one, none, same = K.split_multiplier(torch.tensor([2 ** 30]), torch.tensor([30]))  # one word: itself
    assert none is None and int(one) == 2 ** 30 and int(same) == 30
    with pytest.raises(ValueError, match="too large"):
        K.quantize_multiplier_exact(torch.tensor([2.0 ** 30]), torch.tensor([1.0]))


@pytest.mark.parametrize("acc_dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("per_col", [False, True])
def test_two_word_requantize_is_exact_on_every_path(acc_dtype, per_col, monkeypatch):
    """C (8 lanes and the scalar tail; int64 values: the 128-bit scalar loop), numba and torch: the exact rational
    rounding, at accumulator extremes, with exact ties (a multiplier of 1/2 whose low word is 0) and values just off
    a tie by one unit of the low word."""
    g = torch.Generator().manual_seed(3 + per_col)
    cols = 37
    bits = {torch.int8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 31}[acc_dtype]
    acc = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, (40, cols), generator=g, dtype=acc_dtype)
    acc[1], acc[2] = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    m, sh = two_word(cols if per_col else 1, g, 2.0 ** -bits, 2.0 ** (16 - bits))
    a0 = int(acc.abs().max()) - 3  # a value just at a tie (the low word decides): every column's, or column 2's
    acc[3] = a0
    if per_col:
        m[0], sh[0] = 2 ** 61, 62  # x 1/2: exact halves
        m[1], sh[1] = 2 ** 61 + 1, 62  # just above 1/2
        m[2], sh[2] = (torch.tensor(v) for v in near_tie(a0, float(m[2]) * 2.0 ** -float(sh[2])))
        acc[0, :2] = torch.tensor([-3, -3], dtype=acc_dtype)
    else:
        m, sh = (torch.tensor(v) for v in near_tie(a0, float(m) * 2.0 ** -float(sh)))
    for zp, lo, hi, dt, sub in [(3, -2 ** 20, 2 ** 20, torch.int32, 0), (0, -(2 ** 15), 2 ** 15 - 1, torch.int16, 0),
                                (-7, 0, 2 ** 16 - 1, torch.int32, 0)]:
        want = exact(acc.long() - sub, m, sh, zp, lo, hi).to(dt)
        outs = {}
        if cbuild.available():
            outs["c"] = cops.requantize(acc, m, sh, zp, lo, hi, dt, sub)
        if numba_kernels.AVAILABLE:
            outs["numba"] = numba_kernels.requantize(acc, m, sh, zp, lo, hi, dt, sub)
        monkeypatch.setattr(cbuild, "available", lambda: False)
        monkeypatch.setattr(K, "ONE_PASS", False)
        outs["torch"] = K.requantize(acc, m, sh, zp, lo, hi, dt, sub)
        monkeypatch.undo()
        for name, got in outs.items():
            if got is None:  # (numba declines int16 values, and int64 ones with two words: the torch version runs)
                assert name == "numba" and acc_dtype in (torch.int16, torch.int64)
                continue
            assert got.dtype == dt and torch.equal(got, want), name


@pytest.mark.parametrize("ratio", [2.0 ** -40, 3e-9, 0.37 * 2.0 ** -20])
def test_two_words_on_wide_int64_accumulators_are_exact(ratio, monkeypatch):
    """int64 accumulators up to 2^61 with a two-word multiplier: the torch limb arithmetic and C's 128-bit scalar
    path both round exactly (ties planted), every output grid width; beyond 2^62 an error."""
    g = torch.Generator().manual_seed(int(ratio * 2 ** 50) % 1000)
    acc = torch.randint(-(2 ** 61), 2 ** 61, (7, 33), generator=g, dtype=torch.int64)
    acc[0, :3] = torch.tensor([2 ** 61 - 1, -(2 ** 61), 0])
    a0 = int(acc[1:].abs().max()) | 1
    acc[1, 0] = a0
    m, sh = (torch.tensor(v) for v in near_tie(a0, ratio))
    want = exact(acc, m, sh, 5, -(2 ** 31), 2 ** 31 - 1)
    outs = [cops.requantize(acc, m, sh, 5, -(2 ** 31), 2 ** 31 - 1, torch.int32)] if cbuild.available() else []
    monkeypatch.setattr(cbuild, "available", lambda: False)
    monkeypatch.setattr(K, "ONE_PASS", False)
    outs.append(K.requantize(acc, m, sh, 5, -(2 ** 31), 2 ** 31 - 1, torch.int32))
    for got in outs:
        assert torch.equal(got.long(), want)
    with pytest.raises(ValueError, match="2\\^62"):
        K.requantize(torch.tensor([2 ** 62]), m, sh, 0, -128, 127, torch.int8)


@needs_c
@pytest.mark.parametrize("out_dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("rows", [5, 101])  # (5: the int64 lanes of rq_row; 101: the int32 lanes' constants)
def test_two_word_gemm_epilogue_is_exact(out_dtype, rows):
    """``cgemm.mm(..., requant=...)`` with per-column two-word multipliers (and one-word ones in the same call)
    equals the exact rounding of the stored int32 results, partial panels included (N = 37)."""
    g = torch.Generator().manual_seed(rows)
    k, n = 256, 37
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    p = cgemm.pack(b)
    a = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
    info = torch.iinfo(out_dtype)
    m, sh = two_word(n, g, 2.0 ** -20, 2.0 ** -10 if out_dtype == torch.int8 else 2.0 ** -3)
    m[3], sh[3] = 2 ** 29 + 12345, 40  # a one-word column among two-word ones
    acc = cgemm.mm(a, p, 5)
    for j in (5, 20):  # columns whose multiplier puts one value at a tie that the low word decides (a code in range)
        a0 = min(x for x in acc[:, j].tolist() if x > 2 ** 10 and x & (x - 1))
        m[j], sh[j] = (torch.tensor(v) for v in near_tie(a0, 50.5 / a0))
    got = cgemm.mm(a, p, 5, requant=(m, sh, -2, info.min, info.max, out_dtype))
    assert torch.equal(got.long(), exact(acc.long(), m, sh, -2, info.min, info.max))
    one_m, one_sh = m[5:6].clone(), sh[5:6].clone()  # one multiplier for every column
    got = cgemm.mm(a, p, 5, requant=(one_m.reshape(()), one_sh.reshape(()), 0, info.min, info.max, out_dtype))
    assert torch.equal(got.long(), exact(acc.long(), one_m, one_sh, 0, info.min, info.max))


@needs_c
@pytest.mark.parametrize("spread", [127, 20])  # full-range codes (the vpmaddwd way), or near their mean (u8 x s8 way)
def test_two_word_group_ratios_in_one_gemm_are_exact(spread):
    """A grouped Linear's folded sum with two-word ratios and bias (format version 5) from one pass of the C GEMM:
    ``floor((sum_g (r_g 2^L + rl_g) GEMM_g + b 2^L + bl) / 2^L)`` equals Python integers, left zero point, bias in the
    column terms, outliers of the u8 x s8 way and a partial panel (N = 37) included; requantized in the epilogue it
    equals the exact rounding of that sum."""
    g = torch.Generator().manual_seed(spread)
    m, k, n, gs, za, L = 23, 256, 37, 64, 3, 30
    a = torch.randint(-spread, spread + 1, (m, k), generator=g, dtype=torch.int8)
    a[4, 7], a[9, 100] = 127, -128  # (outliers of the u8 x s8 way)
    w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    hi = torch.randint(0, 2 ** 30, (n, k // gs), generator=g, dtype=torch.int32)
    lo = torch.randint(0, 2 ** 30, (n, k // gs), generator=g, dtype=torch.int32)
    b = torch.randint(-2 ** 40, 2 ** 40, (n,), generator=g)
    bl = torch.randint(-2 ** 29, 2 ** 29, (n,), generator=g)
    bias = torch.randint(-1000, 1000, (n,), generator=g)
    p = cgemm.pack(w, gs, hi, ratio_lo=lo, lshift=L)
    post = torch.zeros(2 * p.np_, dtype=torch.int64)
    post[:n], post[p.np_:p.np_ + n] = b, bl
    cgemm.byte_way_blocks()
    got = cgemm.mm(a, p, za, post=post, bias=bias)
    assert cgemm.byte_way_blocks()[1 if spread < 127 else 0] > 0  # (the way meant)
    parts = [[[sum((x - za) * y for x, y in zip(row[q * gs:(q + 1) * gs], col[q * gs:(q + 1) * gs]))
               for q in range(k // gs)] for col in w.t().tolist()] for row in a.tolist()]
    want = torch.tensor([[(sum((int(hi[j, q]) * 2 ** L + int(lo[j, q])) * pq for q, pq in enumerate(pj))
                           + (int(b[j]) + int(bias[j])) * 2 ** L + int(bl[j])) >> L for j, pj in enumerate(pr)]
                         for pr in parts])
    assert torch.equal(got, want)
    rq_m, rq_sh = two_word(n, g, 2.0 ** -42, 2.0 ** -38)
    codes = cgemm.mm(a, p, za, post=post, bias=bias, requant=(rq_m, rq_sh, 1, -128, 127, torch.int8))
    assert torch.equal(codes.long(), exact(want, rq_m, rq_sh, 1, -128, 127))
    assert len(set(codes.reshape(-1).tolist())) > 50  # (codes across the range, not clamped)
    with pytest.raises(ValueError, match="two-word"):
        cgemm.mm(a, p, za, post=post[:p.np_])


@needs_c
@pytest.mark.parametrize("M", [0.6, 1.3 * 2.0 ** -15])  # above 1/2: the 64-bit lanes; below: the 32-bit ones
def test_two_word_attention_requantizations_are_exact(M):
    """The one-pass attention's scores and probabilities requantized with two-word multipliers, each planted so that
    a row maximum score and a probability sit at a tie the low word decides: equal to the formula computed with the
    exact rounding (torch, :func:`kernels.requantize`)."""
    g = torch.Generator().manual_seed(5)
    bh, tq, tk, d = 2, 21, 70, 64
    lim = 7 if M > 0.5 else 128  # (scores whose codes stay inside the 16-bit grid)
    q = (torch.randint(-lim, lim, (bh, tq, d), generator=g) + 5).clamp(-128, 127).to(torch.int8)  # (around zq, zk)
    kt = (torch.randint(-lim, lim, (bh, d, tk), generator=g) - 7).clamp(-128, 127).to(torch.int8)
    v = torch.randint(-128, 128, (bh, tk, d), generator=g, dtype=torch.int8)
    m2, s2 = K.quantize_multiplier_exact(torch.tensor([0.7]).float().double(), torch.tensor([1.9]).float().double())
    lut = K.exp_table(0.3 if M < 0.5 else 0.01, 2 ** 16)  # (a 16-bit softmax input grid)
    R = K.recip_bits(255)
    sm = (255 << R, R, 0, 0, 255)

    def rq(x, m, sh, zp, lo, hi):
        return K.requantize(x, torch.tensor(m), torch.tensor(sh), zp, lo, hi, torch.int64)
    s = (q.long() - 5) @ (kt.long() + 7)
    s0 = int(s.max())  # the largest score: its row's maximum
    srq = (*near_tie(s0, M), -3, -(2 ** 15), 2 ** 15 - 1)
    c = rq(s, *srq)
    e = lut.long()[c.amax(-1, keepdim=True) - c]
    r = torch.div(sm[0], e.sum(-1, keepdim=True).clamp(min=1), rounding_mode="floor")
    p = (((e * r + (1 << (sm[1] - 1))) >> sm[1]) + sm[2]).clamp(sm[3], sm[4])
    p0 = max(x for x in set((p - sm[2]).flatten().tolist()) if x & (x - 1))  # (a power of two: no low word)
    prq = (*near_tie(p0, float(m2) * 2.0 ** -float(s2)), 2, -128, 127)  # likewise a probability code
    want = (rq(p - sm[2], *prq) - prq[2]) @ (v.long() - 3)
    assert torch.equal(cgemm.attention(q, 5, kt, -7, srq, lut, sm, prq, v, 3), want)


@pytest.mark.parametrize("x0", [12345, 30001])
def test_two_word_residual_add_at_a_tie(x0, monkeypatch):
    """The add with two-word multipliers planted so that one element sits at a tie the low words decide (C vector
    lanes and tail, torch): equal to the exact rounding."""
    m, S = near_tie(x0, 0.37)
    m += 2  # (just past the tie by more than the multipliers' rounding bound: not taken for an exact tie)
    ma, la, sh = m >> 31, m % 2 ** 31, S - 31
    mb, lb = ma, la + 1
    g = torch.Generator().manual_seed(x0)
    a = torch.randint(-(2 ** 15), 2 ** 15, (1003,), generator=g, dtype=torch.int32)
    b = torch.randint(-(2 ** 15), 2 ** 15, (1003,), generator=g, dtype=torch.int32)
    a[::5], b[::5] = x0 + 7, -3  # x = x0, y = 0: at the tie (in vector lanes and the tail)
    A, B = ma * 2 ** 31 + la, mb * 2 ** 31 + lb
    want = torch.tensor([min(max((((x - 7) * A + (y + 3) * B + (1 << (S - 1))) >> S), -(2 ** 31)), 2 ** 31 - 1)
                         for x, y in zip(a.tolist(), b.tolist())])
    outs = [cops.add_requant(a, 7, ma, 0, b, -3, mb, 0, sh, 0, -(2 ** 31), 2 ** 31 - 1, torch.int32, la, lb)] \
        if cbuild.available() else []
    monkeypatch.setattr(cbuild, "available", lambda: False)
    outs.append(K.add_requant_int(a, 7, ma, 0, b, -3, mb, 0, sh, 0, -(2 ** 31), 2 ** 31 - 1, torch.int32, la, lb))
    for got in outs:
        assert torch.equal(got.long(), want)


@pytest.mark.parametrize("sa,sb,s_out", [(1e-3, 3.1e-5, 2.3e-3), (0.7, 0.7, 0.7), (5e-2, 1.3e-7, 1.1e-2),
                                         (1.0, 0.25, 2.0)])
def test_two_word_residual_add_is_exact(sa, sb, s_out, monkeypatch):
    """:func:`kernels.add_multipliers_exact`: both ratios to 62 bits (2^-61 relative; the finer one coarser beyond
    2^13 apart), and the add (C vector lanes and tail, torch) equal to the exact rounding of ``x s_a / s_out + y s_b /
    s_out`` (exact ties, many in the last case, to even)."""
    sa, sb, s_out = (float(torch.tensor(v, dtype=torch.float32)) for v in (sa, sb, s_out))
    ma, ta, mb, tb, sh, la, lb = K.add_multipliers_exact(sa, sb, s_out)
    A, B, S = (ma * 2 ** 31 + la) << ta, (mb * 2 ** 31 + lb) << tb, sh + 31
    spread = max(sa, sb) / min(sa, sb)
    for big, r in ((A, Fraction(sa) / Fraction(s_out)), (B, Fraction(sb) / Fraction(s_out))):
        assert abs(Fraction(big, 2 ** S) / r - 1) < (Fraction(1, 2 ** 61) if spread < 2 ** 13 else Fraction(1, 2 ** 45))
    g = torch.Generator().manual_seed(13)
    a = torch.randint(-(2 ** 15), 2 ** 15, (3001,), generator=g, dtype=torch.int32)
    b = torch.randint(-(2 ** 15), 2 ** 15, (3001,), generator=g, dtype=torch.int32).to(torch.int16)
    a[:4] = torch.tensor([2 ** 15 - 1, -(2 ** 15), 0, 1])
    ra, rb = Fraction(sa) / Fraction(s_out), Fraction(sb) / Fraction(s_out)  # the fake model's exact value, rounded
    want = torch.tensor([min(max(round((x - 7) * ra + (y + 3) * rb) - 5, -(2 ** 15)), 2 ** 15 - 1)  # (half to even)
                         for x, y in zip(a.tolist(), b.tolist())])
    outs = []
    if cbuild.available():
        outs.append(cops.add_requant(a, 7, ma, ta, b, -3, mb, tb, sh, -5, -(2 ** 15), 2 ** 15 - 1, torch.int32, la, lb))
    monkeypatch.setattr(cbuild, "available", lambda: False)
    outs.append(K.add_requant_int(a, 7, ma, ta, b, -3, mb, tb, sh, -5, -(2 ** 15), 2 ** 15 - 1, torch.int32, la, lb))
    for got in outs:
        assert torch.equal(got.long(), want)


def ln_reference(x, gain, bias, n, eps, s_x, s_g, s_out, zp, lo, hi):
    """The fake model's LayerNorm code ``round(y / s_out) + zp`` in 60-digit decimals."""
    from decimal import Decimal, getcontext

    getcontext().prec = 60
    out = []
    for row in x.tolist():
        mu = Fraction(sum(row), n)
        var = sum((Fraction(v) - mu) ** 2 for v in row) / n * Fraction(s_x) ** 2
        den = (Decimal(var.numerator) / Decimal(var.denominator) + Decimal(eps)).sqrt()
        codes = []
        for j, v in enumerate(row):
            d = (Fraction(v) - mu) * Fraction(s_x)
            y = Decimal(d.numerator) / Decimal(d.denominator) / den * Decimal(int(gain[j])) * Decimal(s_g) \
                + Decimal(int(bias[j])) * Decimal(s_g) / Decimal(2 ** 16)
            codes.append(min(max(int((y / Decimal(s_out) + Decimal("0.5")).to_integral_value("ROUND_FLOOR")) + zp,
                                 lo), hi))
        out.append(codes)
    return torch.tensor(out)


@pytest.mark.parametrize("bits", [8, 16])
def test_exact_layer_norm_equals_a_60_digit_reference(bits, monkeypatch):
    """:func:`kernels.layer_norm_exact` (C, and its torch twin with the row multipliers in Python integers): every
    code equals the fake model's LayerNorm evaluated in 60-digit decimals, on rows of 16- and 8-bit codes, a constant
    row (its codes are the bias alone) and a row with one code apart."""
    g = torch.Generator().manual_seed(bits)
    n, half = 384, 2 ** (bits - 1)
    x = torch.randint(-half, half, (24, n), generator=g, dtype=torch.int32)
    x[0], x[1] = 7, 0
    x[1, 5] = 1
    gain = torch.randint(-127, 128, (n,), generator=g, dtype=torch.int8)
    bias = torch.randint(-2 ** 20, 2 ** 20, (n,), generator=g, dtype=torch.int32)
    s_x, s_g, s_out = (float(torch.tensor(v).float()) for v in (3e-4 * 2 ** (16 - bits), 0.013, 0.05))
    ints, bh, bl = K.ln_exact_constants(n, 1e-5, s_x, s_g, s_out, bias, n * 2 ** bits * 128)
    want = ln_reference(x, gain, bias, n, 1e-5, s_x, s_g, s_out, 3, -128, 127)
    outs = [cops.layer_norm_exact(x, gain, bh, bl, ints, 3, -128, 127, torch.int32)] if cbuild.available() else []
    monkeypatch.setattr(cbuild, "available", lambda: False)
    outs.append(K.layer_norm_exact(x, gain, bh, bl, ints, 3, -128, 127))
    for got in outs:
        assert torch.equal(got.long(), want)
    assert bool((want[0] == want[0].mode().values).float().mean() < 1)  # (the bias alone still varies by channel)
    monkeypatch.undo()
    if outs[:-1]:  # the C kernel's vector lanes (8-bit rows) and scalar tail (n = 380) into every code width
        for dtype in (torch.int8, torch.int16):
            got = cops.layer_norm_exact(x, gain, bh, bl, ints, 3, -128, 127, dtype)
            assert got.dtype == dtype and torch.equal(got.long(), want)
        ints4, bh4, bl4 = K.ln_exact_constants(n - 4, 1e-5, s_x, s_g, s_out, bias[4:], n * 2 ** bits * 128)
        assert torch.equal(cops.layer_norm_exact(x[:, 4:], gain[4:], bh4, bl4, ints4, 3, -128, 127, torch.int8).long(),
                           ln_reference(x[:, 4:], gain[4:], bias[4:], n - 4, 1e-5, s_x, s_g, s_out, 3, -128, 127))


def softmax_reference(x, s_in, s_out, zp, lo, hi):
    """The fake model's softmax codes ``round(p / s_out) + zp`` in 50-digit decimals."""
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    so = Decimal(Fraction(s_out).numerator) / Decimal(Fraction(s_out).denominator)
    out = []
    for row in x.reshape(-1, x.shape[-1]).tolist():
        es = [(-Decimal(s_in) * (max(row) - v)).exp() for v in row]
        total = sum(es)
        out.append([min(max(int((e / total / so + Decimal("0.5")).to_integral_value("ROUND_FLOOR")) + zp, lo), hi)
                    for e in es])
    return torch.tensor(out).view(x.shape)


@pytest.mark.parametrize("bits", [8, 16])
def test_exact_softmax_equals_a_50_digit_reference(bits, monkeypatch):
    """:func:`kernels.softmax_exact` (62-bit exponentials, one rounding) and the one-pass C attention with its int64
    table: every probability code equals the fake model's softmax in 50-digit decimals (16- and 8-bit output
    grids)."""
    g = torch.Generator().manual_seed(bits)
    s_in = float(torch.tensor(0.05 / 16).float())
    s_out = float(torch.tensor(1 / (2 ** bits - 1)).float())
    x = torch.randint(-2000, 2000, (3, 16, 500), generator=g)
    lut = K.exp_table_exact(s_in, 2 ** 16)
    cq, Q = K.softmax_exact_constants(s_out)
    want = softmax_reference(x, s_in, s_out, 0, 0, 2 ** bits - 1)
    got = K.softmax_exact(x, -(2 ** 15), None, lut, cq, Q, 0, 0, 2 ** bits - 1, torch.int32)
    assert torch.equal(got.long(), want)
    if not cbuild.available():
        return
    # the C attention: scores straight onto these codes (multiplier 1), the probabilities onto an AV grid of the
    # same codes (multiplier 1, zero point 0), values the identity rows: the output is the probability codes
    bh, tq, tk = 2, 5, 40
    q = torch.randint(-40, 40, (bh, tq, 64), generator=g, dtype=torch.int8)  # (scores within the 16-bit grid)
    kt = torch.randint(-40, 40, (bh, 64, tk), generator=g, dtype=torch.int8)
    srq, prq = (2 ** 30, 30, 0, -(2 ** 15), 2 ** 15 - 1), (2 ** 30, 30, -(2 ** 15), -(2 ** 15), 2 ** 15 - 1)
    v = torch.eye(tk, 64, dtype=torch.int32).expand(bh, tk, 64).contiguous()  # (column j: key j's probability)
    out = cgemm.attention(q, 0, kt, 0, srq, lut, (cq, Q, 0, 0, 2 ** bits - 1), prq, v, 0)
    scores = (q.long() @ kt.long())
    want_c = softmax_reference(scores, s_in, s_out, 0, 0, 2 ** bits - 1)
    assert torch.equal(out[..., :tk], want_c)


def test_exact_ties_of_a_residual_add_round_to_even(monkeypatch):
    """Two grids whose ratios meet on halves (``s_a / s_out = 1/2``, ``s_b / s_out = 5/6``: ``x/2 + 5y/6`` is a half
    for odd ``x`` and ``y`` a multiple of 6): every exact tie rounds to even, as the fake model's ``torch.round``
    (negative and positive, in vector lanes and the tail), every other value as before; C and torch."""
    sa, sb, s_out = 3 * 2.0 ** -10, 5 * 2.0 ** -10, 6 * 2.0 ** -10
    ma, ta, mb, tb, sh, la, lb = K.add_multipliers_exact(sa, sb, s_out)
    assert lb  # (5/6: a non-dyadic ratio, only approximated by its 62 bits)
    x = torch.arange(-601, 602, dtype=torch.int32)
    y = (torch.arange(x.numel()) % 7 - 3).int() * 6  # multiples of 6
    y[::5] += 1  # (and some that are not: no tie)
    want = torch.round(torch.tensor([float(Fraction(int(u)) / 2 + Fraction(int(v)) * 5 / 6) for u, v in
                                     zip(x.tolist(), y.tolist())], dtype=torch.float64)).long()
    ties = sum(1 for u, v in zip(x.tolist(), y.tolist()) if u % 2 and v % 6 == 0)
    assert ties > 400
    outs = [cops.add_requant(x, 0, ma, ta, y, 0, mb, tb, sh, 0, -(2 ** 31), 2 ** 31 - 1, torch.int32, la, lb)] \
        if cbuild.available() else []
    monkeypatch.setattr(cbuild, "available", lambda: False)
    outs.append(K.add_requant_int(x, 0, ma, ta, y, 0, mb, tb, sh, 0, -(2 ** 31), 2 ** 31 - 1, torch.int32, la, lb))
    for got in outs:
        assert torch.equal(got.long(), want)


@pytest.mark.skipif(not cbuild.available(), reason="C kernels not built here")
@pytest.mark.parametrize("masked", [False, True])
def test_c_softmax_exact_equals_the_torch_twin(masked, monkeypatch):
    """:func:`cops.softmax_exact` (rows in C, 128 bits) against the torch twin (31-bit limbs), with key padding and a
    causal mask that broadcasts, a fully masked row, int8 / 16-bit codes out."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2000, 2000, (2, 3, 7, 300), generator=g).int()
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 7, 300, dtype=torch.bool)
        mask[..., 290:] = True  # key padding
        mask[0, 0, 2] = True  # a fully masked row
    lut = K.exp_table_exact(float(torch.tensor(0.003).float()), 2 ** 16)
    for bits, dt in ((8, torch.int8), (16, torch.int32)):
        cq, Q = K.softmax_exact_constants(float(torch.tensor(1 / (2 ** bits - 1)).float()))
        got = cops.softmax_exact(x, -(2 ** 15), mask, lut, cq, Q, -128 if bits == 8 else 0,
                                 -128 if bits == 8 else 0, 127 if bits == 8 else 2 ** 16 - 1, dt)
        monkeypatch.setattr(cbuild, "available", lambda: False)
        want = K.softmax_exact(x, -(2 ** 15), None if mask is None else mask.expand(x.shape), lut, cq, Q,
                               -128 if bits == 8 else 0, -128 if bits == 8 else 0, 127 if bits == 8 else 2 ** 16 - 1,
                               dt)
        monkeypatch.undo()
        assert got.dtype == dt and torch.equal(got, want)
