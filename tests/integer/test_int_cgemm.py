"""The C kernels (``fairseq_qasr/integer/cgemm.py``, ``cops.py``): exact against int64 references, never wrapping
at the extremes of their operand ranges; the engine's one-pass C attention and grouped GEMMs give the same integers as
the torch paths."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import int_helpers as H
from fairseq_qasr.integer import cbuild, cgemm, cops
from fairseq_qasr.integer import kernels as K
from fairseq_qasr.integer.honesty import run_integer_only

pytestmark = pytest.mark.skipif(not cbuild.available(), reason="C kernels not built here (no AVX2 CPU or no C "
                                                                "compiler, or QASR_CGEMM=0)")


def ref(a, b, za=0, zb=0, gs=None, ratio=None):
    a, b = a.long() - za, b.long() - zb
    if ratio is None:
        return a @ b
    return sum((a[:, g * gs:(g + 1) * gs] @ b[g * gs:(g + 1) * gs]) * ratio[:, g].long()
               for g in range(b.shape[0] // gs))


def rnd(lo, hi, shape, gen, dtype=torch.int32):
    return torch.randint(lo, hi, shape, generator=gen, dtype=dtype)


RANGES = {"s8": (-128, 128, torch.int8), "u16": (0, 2 ** 16, torch.int32), "s16": (-(2 ** 15), 2 ** 15, torch.int32),
          "s8n": (-60, 70, torch.int8),  # int8 codes near their mean: the u8 x s8 way (with a few outliers)
          "s8s": (-127, 128, torch.int8)}  # right operands the u8 x s8 way takes


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), a_kind=st.sampled_from(sorted(RANGES)),
       b_kind=st.sampled_from(["s8", "s8s", "s16"]), za=st.integers(-40000, 40000), zb=st.integers(-200, 200),
       seed=st.integers(0, 2 ** 16))
def test_mm_equals_int64_reference(m, k, n, a_kind, b_kind, za, zb, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi, dt = RANGES[a_kind]
    a = rnd(lo, hi, (m, k), g, dt)
    b = rnd(*RANGES[b_kind][:2], (k, n), g, RANGES[b_kind][2])
    if a_kind.startswith("s8"):
        za = max(-128, min(127, za))
    wide = not a_kind.startswith("s8")
    out = cgemm.mm(a, cgemm.pack(b, wide=wide), za, zb)
    split = int(b.min()) < -cgemm.B_MAX or int(b.max()) > cgemm.B_MAX  # (tiny 16-bit draws can fit a byte)
    assert out.dtype == (torch.int64 if wide or split else torch.int32)
    assert torch.equal(out.long(), ref(a, b, za, zb))


@pytest.mark.parametrize("a_kind", sorted(RANGES))
def test_grouped_ratios_rounding_and_bias_epilogue(a_kind):
    g = torch.Generator().manual_seed(1)
    lo, hi, dt = RANGES[a_kind]
    a, b = rnd(lo, hi, (37, 384), g, dt), rnd(-128, 128, (384, 50), g, torch.int8)
    ratio = rnd(0, 2 ** 24 + 1, (50, 6), g)
    post = rnd(-(2 ** 20), 2 ** 20, (50,), g).long()
    p = cgemm.pack(b, 64, ratio)
    expect = ref(a, b, 5, 0, 64, ratio)
    assert torch.equal(cgemm.mm(a, p, 5), expect)
    assert torch.equal(cgemm.mm(a, p, 5, rshift=16, post=post), ((expect + 2 ** 15) >> 16) + post)


def test_operand_extremes_do_not_wrap():
    k = 1536  # the longest reduction of tiny.en (fc2); int32 partial sums must be flushed in time
    for a_val, b_val in [(2 ** 16 - 1, -128), (-(2 ** 15), -128), (-(2 ** 15), -(2 ** 15)), (2 ** 15 - 1, 2 ** 15 - 1)]:
        a = torch.full((5, k), a_val, dtype=torch.int32)
        b = torch.full((k, 17), b_val, dtype=torch.int32 if b_val < -128 or b_val > 127 else torch.int8)
        out = cgemm.mm(a, cgemm.pack(b, wide=True))
        assert torch.equal(out, ref(a, b)), (a_val, b_val)
        assert int(out.abs().max()) > 2 ** 31  # beyond any int32 accumulator
    a8, b8 = torch.full((5, k), -128, dtype=torch.int8), torch.full((k, 3), -128, dtype=torch.int8)
    assert torch.equal(cgemm.mm(a8, cgemm.pack(b8)).long(), ref(a8, b8))


def test_strided_operands_and_out_view():
    g = torch.Generator().manual_seed(2)
    a = rnd(-128, 128, (64, 40), g, torch.int8)
    bt = rnd(-128, 128, (30, 64), g, torch.int8)
    out = torch.zeros(40, 30 + 7, dtype=torch.int32)
    cgemm.mm(a.t(), cgemm.pack(bt.t()), 3, -2, out=out[:, :30])  # a transposed view, b a transposed view
    assert torch.equal(out[:, :30].long(), ref(a.t(), bt.t(), 3, -2)) and not out[:, 30:].any()


def test_bad_operands_are_rejected_with_clear_errors():
    b = torch.randint(-128, 128, (64, 8), dtype=torch.int8)
    with pytest.raises(TypeError, match="integer codes"):
        cgemm.pack(b.float())
    with pytest.raises(ValueError, match="do not match"):
        cgemm.pack(b, 16, torch.ones(8, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not match K"):
        cgemm.mm(torch.zeros(2, 63, dtype=torch.int8), cgemm.pack(b))
    with pytest.raises(ValueError, match="more than 16 bits"):
        cgemm.mm(torch.tensor([[0, 70000] * 32]), cgemm.pack(b, wide=True))
    with pytest.raises(ValueError, match="wide=True"):
        cgemm.mm(torch.zeros(2, 64, dtype=torch.int32), cgemm.pack(b))
    with pytest.raises(ValueError, match="beyond 16 bits"):
        cgemm.pack(torch.full((4, 4), 2 ** 16))


def test_isqrt_is_floor_sqrt():
    g = torch.Generator().manual_seed(3)
    v = torch.cat([torch.tensor([0, 1, 2, 3, 4, 2 ** 62 - 1, (2 ** 31 - 1) ** 2, 2 ** 62 - 2 ** 32]),
                   torch.randint(0, 2 ** 62, (2000,), generator=g)])
    assert [int(x) for x in cops.isqrt(v)] == [math.isqrt(int(x)) for x in v]
    with pytest.raises(ValueError, match="2\\^62"):
        cops.isqrt(torch.tensor([-1]))


@pytest.mark.parametrize("bits", [8, 16])
def test_layer_norm_lut_add_equal_torch_versions(bits, monkeypatch):
    g = torch.Generator().manual_seed(6)
    lo, hi = (-128, 128) if bits == 8 else (-(2 ** 15), 2 ** 15)
    x = rnd(lo, hi, (7, 3, 384), g, torch.int8 if bits == 8 else torch.int32)
    x[0, 0] = 5  # a constant row: variance 0, eps only
    for j in range(3):  # one extreme code against the other extreme: the largest |n x - sum x| of a row
        x[1, j], x[2, j] = hi - 1, lo
        x[1, j, 7 * j], x[2, j, 5 + j] = lo, hi - 1
    gain, bias = rnd(-128, 128, (384,), g, torch.int8), rnd(-(2 ** 20), 2 ** 20, (384,), g)
    k = K.ln_shift_bits(384, bits)
    table = rnd(-128, 128, (hi - lo,), g, torch.int8)
    y = rnd(lo, hi, (7, 3, 384), g, x.dtype)
    got = (cops.layer_norm(x, gain, bias, 12345, k), cops.lut(table, x, lo), cops.add(x, 3, 1 << 22, y, -7, 12345))
    with pytest.raises(ValueError, match="outside the table"):
        cops.lut(table[:10], x, lo)
    monkeypatch.setattr(cbuild, "available", lambda: False)
    want = (K.layer_norm_int(x, gain, bias, 12345, k), table[x.long() - lo],
            (x.long() - 3) * (1 << 22) + (y.long() + 7) * 12345)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype,spread,n", [
    (torch.int16, 3000, 384),   # wide rows: the division in vector lanes (reciprocal < 2^31, one exact check)
    (torch.int16, 20, 387),     # narrow rows: the 64-bit reciprocal multiply; a tail of 3 codes
    (torch.int8, 40, 390),      # 8-bit codes (k = 13)
    (torch.int16, 30000, 9),    # short rows, saturated codes
    (torch.int32, 3000, 384),   # 16-bit codes stored as int32 (the engine's storage): the vector lanes
    (torch.int32, 2 ** 17, 384),  # int32 codes beyond 16 bits: the scalar loop with a division per element
])
@pytest.mark.parametrize("frac", [16, 24])
def test_layer_norm_division_paths_equal_torch(dtype, spread, n, frac, monkeypatch):
    """Every way the C LayerNorm divides gives the torch kernel's integers, including rows holding one extreme code
    and a row of zeros but one code (the largest |c| against a small variance), with 16 and 24 fraction bits."""
    g = torch.Generator().manual_seed(n + spread)
    info = torch.iinfo(torch.int16 if dtype == torch.int32 and spread < 2 ** 15 else dtype)
    lo, hi = (-spread, spread) if spread > 2 ** 15 else (info.min, info.max)
    x = (torch.randn(600, n, generator=g) * spread).round().clamp(lo, hi).to(dtype)
    x[::7, 1], x[::11, 2] = hi, lo
    x[5] = 0
    x[5, 0] = 1
    if spread > 2 ** 15:
        x[3] = 0
        x[3, 0] = 6_000_000  # |n x - sum x| > 2^31: only the int64 loop holds it
    gain, bias = rnd(-128, 128, (n,), g, torch.int8), rnd(-(2 ** 20), 2 ** 20, (n,), g)
    k = 0 if spread > 2 ** 15 else K.ln_shift_bits(n, 8 if dtype == torch.int8 else 16)
    got = [cops.layer_norm(x, gain, b, e, k, frac) for b in (bias, None) for e in (0, 12345)]
    monkeypatch.setattr(cbuild, "available", lambda: False)
    want = [K.layer_norm_int(x, gain, b, e, k, frac) for b in (bias, None) for e in (0, 12345)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("da,db", [(torch.int8, torch.int16), (torch.int32, torch.int32), (torch.int16, torch.int8)])
def test_add_vector_and_int64_paths_equal_torch(da, db):
    """The residual add in vector lanes, and its int64 loop for codes, zero points or multipliers beyond 2^30 (a
    block of 1 024 codes with one wide code is redone whole), against the torch formula; 3 001 codes: a tail."""
    g = torch.Generator().manual_seed(9)
    a = rnd(torch.iinfo(da).min, torch.iinfo(da).max, (3001,), g, da)
    b = rnd(torch.iinfo(db).min, torch.iinfo(db).max, (3001,), g, db)
    if da == torch.int32:
        a[1500] = -(2 ** 31)  # second block: a - za beyond int32, the int64 loop
    for za, ka, zb, kb in [(3, 1 << 22, -7, 12345), (-(2 ** 30), 5, 0, -3), (0, 2 ** 30, 1, 2 ** 29 - 1)]:
        want = (a.long() - za) * ka + (b.long() - zb) * kb
        assert torch.equal(cops.add(a, za, ka, b, zb, kb), want), (za, ka, zb, kb)


def test_layer_norm_reciprocal_multiply_one_short_is_corrected(monkeypatch):
    """An 8-bit row and eps term (found by search) for which floor(u * floor((2^64 - 1) / D) / 2^64) is one less
    than floor(u / D) on 389 of its 390 codes: the C kernel's correction step must fix them (its vector division,
    which this row would take, switched off)."""
    x = torch.full((2, 390), -128, dtype=torch.int8)
    x[:, 0] = 127
    gain, k, eps = torch.ones(390, dtype=torch.int8), 9, 544411618408036  # (k of 8-bit rows before session 13)
    cbuild.dll().qasr_ln_vector(0)
    try:
        got = cops.layer_norm(x, gain, None, eps, k)
    finally:
        cbuild.dll().qasr_ln_vector(1)
    assert torch.equal(got, cops.layer_norm(x, gain, None, eps, k))  # the vector division: the same integers
    monkeypatch.setattr(cbuild, "available", lambda: False)
    assert torch.equal(got, K.layer_norm_int(x, gain, None, eps, k))


def requant_c_equals_torch(acc, m, sh, zp, qmin, qmax, dt, sub, monkeypatch):
    """cops.requantize against the torch version (C kernels and numba off), bit for bit; returns the codes."""
    got = cops.requantize(acc, m, sh, zp, qmin, qmax, dt, sub)
    monkeypatch.setattr(cbuild, "available", lambda: False)
    monkeypatch.setattr(K, "ONE_PASS", False)
    want = K.requantize(acc, m, sh, zp, qmin, qmax, dt, sub)
    monkeypatch.undo()
    assert got.dtype == want.dtype and torch.equal(got, want)
    return got


@pytest.mark.parametrize("acc_dtype", [torch.int8, torch.int32, torch.int64])
@pytest.mark.parametrize("per_col", [False, True])
def test_requantize_equals_torch_version(acc_dtype, per_col, monkeypatch):
    g = torch.Generator().manual_seed(7)
    hi = {torch.int8: 127, torch.int32: 2 ** 31 - 1, torch.int64: 2 ** 31}[acc_dtype]  # (acc * m stays in int64)
    acc = torch.randint(-hi - 1, hi, (300, 256), generator=g, dtype=acc_dtype)
    M = torch.rand(256 if per_col else 1, generator=g, dtype=torch.float64) * 1e-3 + 1e-6
    m, sh = K.quantize_multiplier(M)
    m, sh = (m.long(), sh.long()) if per_col else (m.long().reshape(()), sh.long().reshape(()))
    for zp, qmin, qmax, dt, sub in [(3, -128, 127, torch.int8, 0), (-32768, -32768, 32767, torch.int32, 17),
                                    (0, 0, 65535, torch.int32, -5)]:
        requant_c_equals_torch(acc, m, sh, zp, qmin, qmax, dt, sub, monkeypatch)


@pytest.mark.parametrize("param", ["w8a8", H.GROUPED_16BIT + "-whisper_layout", "w8a8_r16-whisper_layout"])
def test_engine_c_kernels_equal_torch_paths(param, monkeypatch):
    """Encoder output and teacher-forced logits: the C paths (one-pass attention, grouped GEMMs with their epilogue,
    16-bit codes, zero points folded into the kernel) against the int32-matmul torch paths, bit for bit."""
    recipe, model, cfg, inp, eng = H.quantized_engine(param)
    feats = torch.randn(1, 160, 80, generator=torch.Generator().manual_seed(4))  # > SMALL_M encoder frames
    lengths = torch.tensor([160])
    prev = torch.randint(4, 20, (1, 20), generator=torch.Generator().manual_seed(5))  # > SMALL_M target tokens

    x = eng.quantize_input(feats)  # the input quantizer: the one float -> int step

    def run():
        enc = eng.encode(x, lengths)
        out = enc["out"]
        return getattr(out, "t", None) if hasattr(out, "t") else out.c, eng.decode_step(prev, enc, None)

    monkeypatch.setattr(K, "_BACKEND", "avx2")
    (enc_c, logits_c), mode = run_integer_only(run)
    assert not mode.violations
    ran = {name for name, _ in mode.ops}
    assert {"qgemm_avx2", "attention_avx2", "pack_avx2", "layer_norm_exact_avx2"} <= ran, ran
    monkeypatch.setattr(K, "_BACKEND", "int32")
    monkeypatch.setattr(cbuild, "available", lambda: False)  # LayerNorm, tables, adds, isqrt: the torch versions
    eng._prep.clear()
    enc_t, logits_t = run()
    eng._prep.clear()
    assert torch.equal(enc_c, enc_t)
    assert torch.equal(logits_c, logits_t)


def attention_ref(q, zq, kt, zk, srq, lut, sm, prq, v, zv, klen=None):
    """The formula of ``cgemm.attention`` in int64 torch ops (the unfused kernels' arithmetic; keys at and past
    ``klen`` masked as the integer softmax masks: out of the max, exponential 0)."""
    def rq(x, m, sh, zp, lo, hi):
        return (((x * m + (1 << (sh - 1))) >> sh) + zp).clamp(lo, hi)
    c = rq((q.long() - zq) @ (kt.long() - zk), *srq)
    masked = None if klen is None else (torch.arange(c.shape[-1]) >= klen[:, None, None])
    mx = c.amax(-1, keepdim=True) if masked is None else \
        c.masked_fill(masked, srq[3] - 1).amax(-1, keepdim=True).clamp(min=srq[3])
    c = c if masked is None else c.masked_fill(masked, srq[3])
    e = lut.long()[mx - c]
    e = e if masked is None else e.masked_fill(masked, 0)
    r = torch.div(sm[0], e.sum(-1, keepdim=True).clamp(min=1), rounding_mode="floor")
    p = (((e * r + (1 << (sm[1] - 1))) >> sm[1]) + sm[2]).clamp(sm[3], sm[4])
    p2 = rq(p - sm[2], *prq)
    return (p2 - prq[2]) @ (v.long() - zv)


@pytest.mark.parametrize("tk", [45, 600])
@pytest.mark.parametrize("peaky", [True, False])
@pytest.mark.parametrize("grid", ["p16_v16", "p16_u16", "p8_v8", "s16_p16_v16"])
def test_one_pass_attention_equals_the_formula(tk, peaky, grid):
    """Rows and keys not multiples of the tile sizes; peaky rows (most probabilities 0 on the grid: key pairs are
    skipped) and flat ones (more than 128 active key pairs a partial sum); 16-bit value codes, signed or unsigned;
    8-bit softmax inputs (sums per code value) and 16-bit ones (per lane)."""
    g = torch.Generator().manual_seed(tk + 7 * peaky)
    bh, tq, d = 3, 37, 64
    q, kt = rnd(-128, 128, (bh, tq, d), g, torch.int8), rnd(-128, 128, (bh, d, tk), g, torch.int8)
    s16 = grid.startswith("s16")
    lo1, hi1 = (-(2 ** 15), 2 ** 15 - 1) if s16 else (-128, 127)
    srq = (int(0.6 * 2 ** 31), 31 + (8 if peaky else 14) - 8 * s16, -3, lo1, hi1)
    lut = K.exp_table(0.08 / (256 if s16 else 1), 2 ** 16 if s16 else 256)
    p16 = "p16" in grid
    omax = 2 ** 16 - 1 if p16 else 255
    R = K.recip_bits(omax)
    sm = (omax << R, R, 0, 0, omax)  # probability 1 -> code omax: the whole output grid is used
    prq = (2 ** 30, 30, -(2 ** 15), -(2 ** 15), 2 ** 15 - 1) if p16 else (2 ** 30, 30, -128, -128, 127)
    vlo, vhi, zv = {"p16_v16": (-(2 ** 15), 2 ** 15, 5479), "p16_u16": (0, 2 ** 16, 40000),
                    "p8_v8": (-128, 128, 3), "s16_p16_v16": (-(2 ** 15), 2 ** 15, -123)}[grid]
    v = rnd(vlo, vhi, (bh, tk, d), g, torch.int8 if vhi == 128 else torch.int32)
    v[0, :2] = vlo  # the extremes
    v[1, :2] = vhi - 1
    got = cgemm.attention(q, 5, kt, -7, srq, lut, sm, prq, v, zv)
    assert torch.equal(got, attention_ref(q, 5, kt, -7, srq, lut, sm, prq, v, zv))


@pytest.mark.parametrize("m1, sh1, zp1", [(2 ** 29, 30, -3), (2 ** 29 + 1, 30, 5), (2 ** 31 - 1, 31, 0),
                                           (2 ** 30, 40, 2 ** 29 - 1), (2 ** 30, 40, -(2 ** 29)),
                                           (2 ** 31 - 1, 19, 0)])
def test_attention_score_codes_at_every_multiplier_range(m1, sh1, zp1):
    """The scores' requantization takes 32-bit lanes where every unclamped code fits int32 (multiplier at most half
    of 2^shift, |zero point| < 2^29) and 64-bit lanes otherwise: both equal the formula, at the boundary of each
    condition, with scores that land inside the code range and others that clamp."""
    g = torch.Generator().manual_seed(m1 % 1000 + sh1)
    bh, tq, tk, d = 2, 21, 70, 64
    q, kt = rnd(-6, 7, (bh, tq, d), g, torch.int8), rnd(-6, 7, (bh, d, tk), g, torch.int8)
    q[0, 0], kt[0, :, 0] = 127, 127  # a score of 64 * 127 * 127: clamped at the top
    lo1, hi1 = -128, 127
    if abs(zp1) > 2 ** 16:  # a shift of the codes by zp1: the code range follows it
        lo1, hi1 = zp1 - 128, zp1 + 127
    lut = K.exp_table(0.05, hi1 - lo1 + 1)
    R = K.recip_bits(255)
    sm, prq = (255 << R, R, 0, 0, 255), (2 ** 30, 30, -128, -128, 127)
    v = rnd(-128, 128, (bh, tk, d), g, torch.int8)
    srq = (m1, sh1, zp1, lo1, hi1)
    assert torch.equal(cgemm.attention(q, 0, kt, 0, srq, lut, sm, prq, v, 3),
                       attention_ref(q, 0, kt, 0, srq, lut, sm, prq, v, 3))


@pytest.mark.parametrize("omax", [255, 2 ** 16 - 1])
def test_attention_with_an_exponential_table_that_ends_early(omax):
    """A steep exponential table (its last ~220 of 256 entries 0) over scores spread across the whole code range:
    the codes whose exponential is 0 are skipped in the row sums and probabilities, and still give the formula's
    result (8- and 16-bit probability grids)."""
    g = torch.Generator().manual_seed(omax)
    bh, tq, tk, d = 2, 19, 333, 64
    q, kt = rnd(-128, 128, (bh, tq, d), g, torch.int8), rnd(-128, 128, (bh, d, tk), g, torch.int8)
    lut = K.exp_table(0.6, 256)
    assert 20 < int((lut > 0).sum()) < 60
    R = K.recip_bits(omax)
    sm = (omax << R, R, 0, 0, omax)
    prq = (2 ** 30, 30, -(2 ** 15), -(2 ** 15), 2 ** 15 - 1) if omax > 255 else (2 ** 30, 30, -128, -128, 127)
    v = rnd(-128, 128, (bh, tk, d), g, torch.int8)
    srq = (2 ** 30, 31 + 9, 0, -128, 127)  # scores / 1024: rows across the whole 8-bit range
    for klen in (None, torch.tensor([333, 100], dtype=torch.int32)):
        assert torch.equal(cgemm.attention(q, 0, kt, 0, srq, lut, sm, prq, v, 3, klen=klen),
                           attention_ref(q, 0, kt, 0, srq, lut, sm, prq, v, 3, None if klen is None else klen.long()))


@pytest.mark.parametrize("param", ["w8a8", "w8a8_r16-whisper_layout"])
def test_incremental_decode_steps_on_c_attention_equal_torch_paths(param, monkeypatch):
    """Decoder steps one token at a time (self-attention over the cache, cross-attention with keys/values packed once
    per decode on the C path) give the same logits at every step as the unfused torch paths."""
    recipe, model, cfg, inp, eng = H.quantized_engine(param)
    feats = torch.randn(2, 160, 80, generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([160, 160])
    tokens = torch.randint(4, 20, (2, 6), generator=torch.Generator().manual_seed(7))
    x = eng.quantize_input(feats)  # the input quantizer: the one float -> int step

    def steps():
        enc = eng.encode(x, lengths)
        state: dict = {}
        return [eng.decode_step(tokens[:, :t], enc, state)[:, -1] for t in range(1, tokens.size(1) + 1)]

    calls = []
    real = cgemm.attention
    monkeypatch.setattr(cgemm, "attention", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    monkeypatch.setattr(K, "_BACKEND", "avx2")
    got, mode = run_integer_only(steps)
    assert not mode.violations
    assert calls.count(1) >= 2 * tokens.size(1)  # every step's self- and cross-attention: one query, the C kernel
    monkeypatch.setattr(K, "_BACKEND", "int32")
    monkeypatch.setattr(cbuild, "available", lambda: False)
    eng._prep.clear()
    want = steps()
    eng._prep.clear()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("acc_dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("out_dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("per_col", [False, True])
def test_vector_requantize_equals_torch_version(acc_dtype, out_dtype, per_col, monkeypatch):
    """The 8-lane path (int8/16/32/64 in -> int8/int16/int32 codes; int32: an unsigned 16-bit grid): rows not a
    multiple of 8 lanes, int64 values beyond 32 bits, exact ties (multiplier 2^k: half-up rounding of negative
    values), clamping at both ends."""
    g = torch.Generator().manual_seed(11)
    cols = 37
    bits = {torch.int8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 41}[acc_dtype]
    acc = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, (50, cols), generator=g, dtype=acc_dtype)
    acc[0, :8] = torch.tensor([-6, -5, -3, -1, 1, 3, 5, 6], dtype=acc_dtype)  # ties (column 0: m = 2^29, shift 30)
    acc[1], acc[2] = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = {torch.int8: (-128, 127), torch.int16: (-(2 ** 15), 2 ** 15 - 1), torch.int32: (0, 2 ** 16 - 1)}[out_dtype]
    M = (1 + torch.rand(cols if per_col else 1, generator=g, dtype=torch.float64)) * 4 * (hi + 1) / 2 ** (bits - 1)
    m, sh = K.quantize_multiplier(M)  # (extreme accumulators reach both clamps)
    m, sh = m.long(), sh.long()
    if bits > 32:  # shortened, as the engine does for wide accumulators: acc * m stays within int64
        m, sh = m >> 9, sh - 9
    if per_col:
        m[0], sh[0] = 2 ** 29, 30  # x 1/2: exact halves
    else:
        m, sh = m.reshape(()), sh.reshape(())
    seen = set()
    for zp, sub in [(0, 0), (-3, 17), (5, -(2 ** 20))]:
        got = requant_c_equals_torch(acc, m, sh, zp, lo, hi, out_dtype, sub, monkeypatch)
        seen |= {int(got.min()), int(got.max())}
    assert {lo, hi} <= seen  # both clamps exercised


def test_op_profile_names_the_c_kernels():
    from fairseq_qasr.integer.profiling import format_profile, op_profile

    a = torch.randint(-128, 128, (64, 96), dtype=torch.int8)
    p = cgemm.pack(torch.randint(-128, 128, (96, 32), dtype=torch.int8))
    prof = op_profile(lambda: cgemm.mm(a, p), rounds=2, pause_s=0)
    assert prof["qasr::qgemm_avx2"]["calls"] == 1 and prof["qasr::qgemm_avx2"]["ms"] > 0
    assert prof["wall"]["ms"] >= prof["qasr::qgemm_avx2"]["ms"]
    assert "qasr::qgemm_avx2" in format_profile(prof)


def test_beam_search_on_c_kernels_equals_torch_paths_and_packs_cross_attention_once(monkeypatch):
    """Beam search reorders the decoder state every step: the cross-attention keys/values keep their packed form
    (reordered with the hypotheses), and the hypotheses and scores equal those of the unfused torch paths."""
    recipe, model, cfg, inp, eng = H.quantized_engine("w8a8")
    feats = torch.randn(2, 160, 80, generator=torch.Generator().manual_seed(8))
    lengths = torch.tensor([160, 160])
    packs = []
    real = cgemm.pack_kv
    monkeypatch.setattr(cgemm, "pack_kv", lambda kt, *a: packs.append(kt.shape[-1]) or real(kt, *a))
    monkeypatch.setattr(K, "_BACKEND", "avx2")
    got = eng.beam_search(feats, lengths, beam=3, max_len=8)
    frames = packs[0]  # the encoder's self-attention packs first: its frame count
    cross = packs.count(frames) - eng.cfg["encoder_layers"]
    monkeypatch.setattr(K, "_BACKEND", "int32")
    monkeypatch.setattr(cbuild, "available", lambda: False)
    eng._prep.clear()
    want = eng.beam_search(feats, lengths, beam=3, max_len=8)
    eng._prep.clear()
    assert got == want
    assert cross == eng.cfg["decoder_layers"]  # once per layer and decode, not once per step


def test_one_pass_attention_with_key_padding_equals_the_formula():
    """Per-head key counts (key padding): 0 keys, a few, all; peaky and flat rows."""
    g = torch.Generator().manual_seed(21)
    bh, tq, tk, d = 6, 21, 300, 64
    q, kt = rnd(-128, 128, (bh, tq, d), g, torch.int8), rnd(-128, 128, (bh, d, tk), g, torch.int8)
    v = rnd(-(2 ** 15), 2 ** 15, (bh, tk, d), g)
    lut = K.exp_table(0.08, 256)
    R = K.recip_bits(2 ** 16 - 1)
    sm = ((2 ** 16 - 1) << R, R, 0, 0, 2 ** 16 - 1)  # probability 1 -> 65535
    prq = (2 ** 30, 30, -(2 ** 15), -(2 ** 15), 2 ** 15 - 1)
    klen = torch.tensor([0, 1, 17, 150, 299, 300], dtype=torch.int32)
    for shift in (39, 45):  # peaky, flat
        srq = (int(0.6 * 2 ** 31), shift, -3, -128, 127)
        got = cgemm.attention(q, 5, kt, -7, srq, lut, sm, prq, v, 123, klen=klen)
        assert torch.equal(got, attention_ref(q, 5, kt, -7, srq, lut, sm, prq, v, 123, klen.long()))
    with pytest.raises(ValueError, match="key lengths"):
        cgemm.attention(q, 5, kt, -7, srq, lut, sm, prq, v, 123, klen=klen + 1)


def test_padded_batches_on_c_attention_equal_torch_paths(monkeypatch):
    """Utterances of different lengths in one batch: the encoder's self-attention and every decoder step's
    cross-attention take the key padding on the C kernel, with the same integers as the unfused torch paths."""
    recipe, model, cfg, inp, eng = H.quantized_engine("w8a8")
    feats = torch.randn(3, 160, 80, generator=torch.Generator().manual_seed(9))
    lengths = torch.tensor([160, 96, 131])
    tokens = torch.randint(4, 20, (3, 5), generator=torch.Generator().manual_seed(10))
    x = eng.quantize_input(feats)

    def run():
        enc = eng.encode(x, lengths)
        state: dict = {}
        steps = [eng.decode_step(tokens[:, :t], enc, state)[:, -1] for t in range(1, tokens.size(1) + 1)]
        return enc["out"].t, steps

    masked_calls = []
    real = cgemm.attention
    monkeypatch.setattr(cgemm, "attention", lambda *a, **k: masked_calls.append(
        (a[11] if len(a) > 11 else k.get("klen")) is not None) or real(*a, **k))
    monkeypatch.setattr(K, "_BACKEND", "avx2")
    (enc_c, steps_c), mode = run_integer_only(run)
    assert not mode.violations and sum(masked_calls) >= eng.cfg["encoder_layers"] + tokens.size(1)
    monkeypatch.setattr(K, "_BACKEND", "int32")
    monkeypatch.setattr(cbuild, "available", lambda: False)
    eng._prep.clear()
    enc_t, steps_t = run()
    eng._prep.clear()
    assert torch.equal(enc_c, enc_t)
    for a, b in zip(steps_c, steps_t):
        assert torch.equal(a, b)


def _centred_codes(shape, gen, outliers: float, centre=None):
    """int8 codes at their row's mean (``centre``, or random per row) +- 64 (the u8 x s8 way's widest bytes; the GEMM
    centres blocks of 48 rows, the attention each query row), a share ``outliers`` of them at
    +- 67 (outliers): code j of the first half and code j of the second mirror each other, so the row mean stays
    put, and neighbours (the byte pairs) are independent. The last dimension is even."""
    c = rnd(-60, 61, shape[:-1] + (1,), gen) if centre is None else centre
    sign = torch.where(torch.rand(shape[:-1] + (shape[-1] // 2,), generator=gen) < 0.5, 1, -1)
    dev = sign * torch.where(torch.rand(sign.shape, generator=gen) < outliers, 67, 64)
    return (c + torch.cat([dev, -dev], -1)).to(torch.int8)


@pytest.mark.parametrize("grouped", [False, True])
def test_byte_way_gemm_is_exact_at_its_worst_cases(grouped, monkeypatch):
    """The u8 x s8 way (vpmaddubsw): bytes at the ends of their range times weight pairs of +-127 of one sign (the
    largest byte-pair sums), outliers added back, blocks with too many outliers on the vpmaddwd way; equal to the
    int64 reference and to the vpmaddwd way (with ratios of up to 2^30, whose products with an outlier's code pass
    int32); right operands with -128 are never packed as bytes."""
    g = torch.Generator().manual_seed(3 + grouped)
    m, k, n = 150, 256, 40
    b = (127 * torch.where(torch.rand(k // 2, 1, n, generator=g) < 0.5, 1, -1)).expand(k // 2, 2, n)
    b = b.reshape(k, n).to(torch.int8)
    ratio = rnd(2 ** 29, 2 ** 30 + 1, (n, k // 64), g) if grouped else None  # folded ratios: up to 2^30
    a = torch.cat([_centred_codes((96, k), g, 0.005, centre=-9), _centred_codes((54, k), g, 0.1, centre=30)])
    za = -17
    expect = ref(a, b, za, gs=64, ratio=ratio)
    cgemm.byte_way_blocks()
    p = cgemm.pack(b, 64 if grouped else 0, ratio)
    assert p.bq is not None
    assert torch.equal(cgemm.mm(a, p, za).long(), expect)
    assert cgemm.byte_way_blocks() == (2, 2)  # rows 0-95 as bytes, 96-149: too many outliers
    monkeypatch.setattr(cgemm, "BYTE_WAY", False)
    assert torch.equal(cgemm.mm(a, cgemm.pack(b, 64 if grouped else 0, ratio), za).long(), expect)
    monkeypatch.setattr(cgemm, "BYTE_WAY", True)
    b[5, 7] = -128
    assert cgemm.pack(b, 64 if grouped else 0, ratio).bq is None


@pytest.mark.parametrize("tq", [1, 37])
def test_byte_way_attention_equals_the_formula(tq):
    """QK^T the u8 x s8 way (queries as bytes around their row means, outliers added back; keys in [-127, 127]),
    with key padding; a decoder step (one query) too."""
    g = torch.Generator().manual_seed(tq)
    bh, tk, d = 4, 300, 64
    q = _centred_codes((bh, tq, d), g, 0.01, centre=5)  # centred on zq: the +-127 keys' scores stay unclamped
    kt = rnd(-127, 128, (bh, d, tk), g, torch.int8)
    kt[0, :, :3] = 127
    kt[1, :, :3] = -127
    v = rnd(-(2 ** 15), 2 ** 15, (bh, tk, d), g)
    lut = K.exp_table(0.08, 256)
    R = K.recip_bits(2 ** 16 - 1)
    sm = ((2 ** 16 - 1) << R, R, 0, 0, 2 ** 16 - 1)  # probability 1 -> 65535
    prq = (2 ** 30, 30, -(2 ** 15), -(2 ** 15), 2 ** 15 - 1)
    srq = (int(0.6 * 2 ** 31), 41, -3, -128, 127)  # ~1/1700 of a score a code, unclamped: outlier terms show
    kv = cgemm.pack_kv(kt, 5, -7, v, 123)
    assert kv.kq is not None
    cgemm.byte_way_blocks()
    for klen in (None, torch.tensor([0, 5, 299, 300], dtype=torch.int32)):
        got = cgemm.attention(q, 5, kt, -7, srq, lut, sm, prq, v, 123, kv=kv, klen=klen)
        assert torch.equal(got, attention_ref(q, 5, kt, -7, srq, lut, sm, prq, v, 123,
                                              None if klen is None else klen.long()))
    assert cgemm.byte_way_blocks()[1] >= bh * -(-tq // 16)  # (blocks with many outliers: the vpmaddwd way)
    words = cgemm.PackedKV(kv.kp, kv.kinit, kv.vp, kv.tk, kv.vo_zv)  # the same packs without the bytes
    assert torch.equal(cgemm.attention(q, 5, kt, -7, srq, lut, sm, prq, v, 123, kv=words),
                       cgemm.attention(q, 5, kt, -7, srq, lut, sm, prq, v, 123, kv=kv))


def test_byte_way_attention_outliers_and_widest_bytes_are_exact():
    """Scores seen ~1/256 a code, probabilities through identity values. (1) a query row with two large outliers
    (their terms added back) against random keys; (2) a row whose byte pairs sit at the top of the byte range against
    a key of +127s (the largest byte-pair sums) among small keys, so that key's probability shows any saturation."""
    g = torch.Generator().manual_seed(0)
    lut = K.exp_table(0.08, 256)
    R = K.recip_bits(2 ** 16 - 1)
    sm = ((2 ** 16 - 1) << R, R, 0, 0, 2 ** 16 - 1)  # probability 1 -> 65535
    prq = (2 ** 30, 30, -(2 ** 15), -(2 ** 15), 2 ** 15 - 1)
    srq = (2 ** 30, 38, 0, -128, 127)
    v = (torch.eye(16, 64) * 1000).int().unsqueeze(0)
    q = torch.zeros(1, 4, 64, dtype=torch.int8)
    q[0, 0, 0], q[0, 0, 32] = 100, -100  # mean 0, outliers of 36
    q[0, 1, :32], q[0, 1, 32:] = 64, -64  # mean 0, bytes 128 then 0
    random_keys = rnd(-127, 128, (1, 64, 16), g, torch.int8)
    small_keys = rnd(-3, 4, (1, 64, 16), g, torch.int8)
    small_keys[0, :, 0] = 127
    for kt in (random_keys, small_keys):
        kv = cgemm.pack_kv(kt, 0, 0, v, 0)
        cgemm.byte_way_blocks()
        got = cgemm.attention(q, 0, kt, 0, srq, lut, sm, prq, v, 0, kv=kv)
        assert cgemm.byte_way_blocks() == (0, 1)
        assert torch.equal(got, attention_ref(q, 0, kt, 0, srq, lut, sm, prq, v, 0))


@pytest.mark.parametrize("out_dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("per_col", [False, True])
def test_requantization_in_the_gemm_epilogue_equals_requantize(out_dtype, per_col):
    """``mm(..., requant=...)``: the grouped GEMM's int64 results (rounding shift, bias), and a plain GEMM's int32
    results (bias in the column terms), requantized in its epilogue, never stored, equal :func:`cops.requantize` of the
    stored results; partial panels (N = 37) and both ways."""
    g = torch.Generator().manual_seed(per_col + 3 * out_dtype.itemsize)
    m_rows, k, n = 101, 256, 37
    b = rnd(-127, 128, (k, n), g, torch.int8)
    ratio = rnd(2 ** 20, 2 ** 24 + 1, (n, k // 64), g)
    p = cgemm.pack(b, 64, ratio)
    post = rnd(-2 ** 20, 2 ** 20, (n,), g).long()
    info = torch.iinfo(out_dtype)
    m = rnd(2 ** 20, 2 ** 31 - 1, (n,) if per_col else (), g).long()
    sh = rnd(44, 52, (n,) if per_col else (), g).long()
    zp = 7 if out_dtype == torch.int8 else -300
    for a in (_centred_codes((m_rows, k), g, 0.002, centre=3), rnd(-128, 128, (m_rows, k), g, torch.int8)):
        expect = cops.requantize(cgemm.mm(a, p, 5, rshift=8, post=post), m, sh, zp, info.min, info.max, out_dtype)
        got = cgemm.mm(a, p, 5, rshift=8, post=post, requant=(m, sh, zp, info.min, info.max, out_dtype))
        assert got.dtype == out_dtype and torch.equal(got, expect)
    p32 = cgemm.pack(b)  # int32 accumulators (per-channel weights): the same epilogue, with the bias
    bias = rnd(-2 ** 20, 2 ** 20, (n,), g)
    # int32 lanes where every code fits int32 unclamped; int64 lanes where a multiplier passes 2^(shift-1) (the
    # first column's, or the only one) or the zero point is 2^29
    wide_m, wide_sh = m.clone(), sh.clone()
    wide_m.view(-1)[0], wide_sh.view(-1)[0] = 2 ** 30, 10  # codes ~2^20 x the values: past int32, clamped
    for mm_, sh_, zp_ in ((m, sh, zp), (wide_m, wide_sh, zp), (m, sh, 2 ** 29 if out_dtype == torch.int32 else zp)):
        full = (_centred_codes((m_rows, k), g, 0.002, centre=3), rnd(-128, 128, (m_rows, k), g, torch.int8))
        for a in (*full, full[0][:5]):  # (5 rows: fewer than the 32-bit lanes' constants pay for; the int64 lanes)
            expect = cops.requantize(cgemm.mm(a, p32, 5, bias=bias), mm_, sh_, zp_, info.min, info.max, out_dtype)
            got = cgemm.mm(a, p32, 5, bias=bias, requant=(mm_, sh_, zp_, info.min, info.max, out_dtype))
            assert got.dtype == out_dtype and torch.equal(got, expect)
    with pytest.raises(ValueError, match="requant"):
        cgemm.mm(a, p32, requant=(m[:3] if per_col else m.expand(3), sh, zp, info.min, info.max, out_dtype))


@pytest.mark.parametrize("za", [0, 5])
def test_bias_in_the_column_terms_equals_adding_it(za):
    """``mm(..., bias=...)`` (int32 outputs): the bias joins the kernel's column terms; equal to adding it to the
    result, on both ways (byte and int16), with and without a left zero point, on partial panels (N = 37)."""
    g = torch.Generator().manual_seed(17 + za)
    k, n = 256, 37
    b = rnd(-127, 128, (k, n), g, torch.int8)
    p = cgemm.pack(b)
    bias = rnd(-2 ** 24, 2 ** 24, (n,), g)
    for a in (_centred_codes((101, k), g, 0.002, centre=3), rnd(-128, 128, (101, k), g, torch.int8)):
        got = cgemm.mm(a, p, za, bias=bias)
        assert got.dtype == torch.int32 and torch.equal(got, cgemm.mm(a, p, za) + bias)
    with pytest.raises(ValueError, match="bias of 36 values"):
        cgemm.mm(a, p, bias=bias[:36])


@pytest.mark.parametrize("sa,sb,s_out", [(1e-3, 3.1e-5, 2.3e-3), (0.7, 0.7, 0.7), (5e-2, 1.3e-7, 1.1e-2),
                                         (1.7e-5, 2e-3, 7e-4), (1.0, 0.25, 2.0)])  # (the last: many exact ties)
def test_add_requant_multipliers_and_c_kernel_equal_torch(sa, sb, s_out, monkeypatch):
    """The residual add straight onto a consumer's grid: both multipliers within 2^-30 of their ratios while the
    ratios are within 2^13 of each other (the 4th case: 2^16 apart, the finer one coarser), and the C kernel (8
    lanes, blocks with an out-of-range code redone, a tail) equal to the torch formula for every output type."""
    ma, ta, mb, tb, sh = K.add_multipliers(sa, sb, s_out)
    for m, t, r in ((ma, ta, sa / s_out), (mb, tb, sb / s_out)):
        assert m < 2 ** 31 and 0 <= t <= 13
        spread = max(sa, sb) / min(sa, sb)
        assert abs(m * 2.0 ** (t - sh) / r - 1) < (2 ** -30 if spread < 2 ** 13 else 2 ** -14)
    g = torch.Generator().manual_seed(11)
    a = rnd(-(2 ** 15), 2 ** 15, (3001,), g)
    b = rnd(-(2 ** 15), 2 ** 15, (3001,), g, torch.int16)
    a[:4] = torch.tensor([2 ** 15 - 1, -(2 ** 15), 0, 1])
    for dt, (zp, lo, hi) in ((torch.int32, (-5, -(2 ** 15), 2 ** 15 - 1)), (torch.int8, (3, -128, 127)),
                             (torch.int16, (0, -(2 ** 15), 2 ** 15 - 1))):
        got = cops.add_requant(a, 7, ma, ta, b, -3, mb, tb, sh, zp, lo, hi, dt)
        monkeypatch.setattr(cbuild, "available", lambda: False)
        want = K.add_requant_int(a, 7, ma, ta, b, -3, mb, tb, sh, zp, lo, hi, dt)
        monkeypatch.undo()
        assert got.dtype == want.dtype and torch.equal(got, want)
    rows, one = a[:3000].view(2, 1500), b[:1500].view(1, 1500)  # a broadcast operand (positions of a batch)
    got = K.add_requant_int(rows, 7, ma, ta, one, -3, mb, tb, sh, 0, -(2 ** 15), 2 ** 15 - 1, torch.int32)
    monkeypatch.setattr(cbuild, "available", lambda: False)
    assert torch.equal(got, K.add_requant_int(rows, 7, ma, ta, one, -3, mb, tb, sh, 0, -(2 ** 15), 2 ** 15 - 1))
    monkeypatch.undo()
    wide = a.clone()
    wide[2000] = 2 ** 17 + 7  # 2^17 from the zero point: an error, not a wrong code
    with pytest.raises(ValueError, match="2\\^17 or more"):
        cops.add_requant(wide, 7, ma, ta, b, -3, mb, tb, sh, 0, -(2 ** 15), 2 ** 15 - 1, torch.int32)
