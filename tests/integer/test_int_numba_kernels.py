"""The one-pass numba kernels compute exactly what their torch twins in kernels.py compute."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fairseq_qasr.integer import kernels as K
from fairseq_qasr.integer import numba_kernels as N

pytestmark = pytest.mark.skipif(not N.AVAILABLE, reason="numba not installed")


def torch_only(monkeypatch):
    monkeypatch.setattr(K, "ONE_PASS", False)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.sampled_from([torch.int32, torch.int64]),
       st.sampled_from([(8, -128, 127, torch.int8), (16, -32768, 32767, torch.int32), (8, 0, 255, torch.int32)]))
def test_requantize_equals_torch(seed, per_channel, acc_dtype, grid):
    _, qmin, qmax, out_dtype = grid
    g = torch.Generator().manual_seed(seed)
    bound = 2 ** 31 - 1 if acc_dtype == torch.int32 else 2 ** 40
    acc = torch.randint(-bound, bound, (3, 5, 6), generator=g, dtype=torch.int64).to(acc_dtype)
    M = torch.rand(6 if per_channel else 1, generator=g, dtype=torch.float64) * 1e-3 + 1e-7
    m, sh = K.shorten_multiplier(*K.quantize_multiplier(M), 10 if acc_dtype == torch.int64 else 0)
    m, sh = (m.long(), sh.long()) if per_channel else (m.long().reshape(()), sh.long().reshape(()))
    zp = int(torch.randint(qmin, qmax + 1, (), generator=g))
    fast = N.requantize(acc, m, sh, zp, qmin, qmax, out_dtype)
    slow = (K.rshift_round(acc.long() * m, sh) + zp).clamp_(qmin, qmax).to(out_dtype)
    assert fast is not None and fast.dtype == out_dtype and torch.equal(fast, slow)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.sampled_from([(8, 0, 255, -128), (16, 0, 65535, 0)]))
def test_softmax_equals_torch(seed, with_mask, out_grid):
    bits, oqmin, oqmax, ooff = out_grid
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (2, 3, 7, 33), generator=g, dtype=torch.int64).to(torch.int8)
    masked = torch.rand(q.shape, generator=g) < 0.3 if with_mask else None
    if masked is not None:
        masked[0, 0, 0] = True  # a fully masked row
    lut = K.exp_table(float(torch.rand((), generator=g)) * 0.2 + 0.01, 256).to(torch.int32)
    s_out = float(torch.rand((), generator=g)) * 0.9 / (oqmax - oqmin) + 1e-7
    mult = int(round(2.0 ** 16 / s_out))
    out_dtype = torch.int8 if bits == 8 else torch.int32
    args = (q, -128, masked, lut, mult, 16, oqmin + ooff, oqmin + ooff, oqmax + ooff, out_dtype)
    fast = K.softmax_int(*args)
    K.ONE_PASS, saved = False, K.ONE_PASS
    try:
        slow = K.softmax_int(*args)
    finally:
        K.ONE_PASS = saved
    assert torch.equal(fast, slow)


def test_kernels_are_seen_by_the_integer_only_check():
    from fairseq_qasr.integer.honesty import run_integer_only

    acc = torch.randint(-1000, 1000, (64, 128), dtype=torch.int32)
    m, sh = K.quantize_multiplier(torch.tensor([0.01]))
    m, sh = m.long().reshape(()), sh.long().reshape(())
    _, mode = run_integer_only(lambda: N.requantize(acc, m, sh, 0, -128, 127, torch.int8))
    names = {name: dtypes for (name, dtypes) in mode.ops}
    assert "requantize" in names and not mode.violations
