"""The one-pass CPU fake-quantization kernel computes exactly the torch formula, with the same STE mask."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fairseq_qasr.quant import QSpec, Quantizer
from fairseq_qasr.quant import cpu_kernels
from fairseq_qasr.quant.affine import expand_qparam, qparams_from_range, reduce_minmax

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(), reason="numba not installed or QASR_CPU_KERNELS=0")

LAYOUTS = st.sampled_from([("tensor", 0, 0), ("channel", 0, 0), ("group", -1, 4), ("group", -1, 8)])


@settings(max_examples=60, deadline=None)
@given(LAYOUTS, st.sampled_from([2, 3, 4, 8, 16]), st.booleans(), st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_kernel_equals_formula_values_and_gradients(layout, bits, symmetric, seed, scale):
    gran, axis, gs = layout
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 16, generator=g) * scale
    lo, hi = reduce_minmax(x * 0.8, gran, axis, gs)  # some values fall outside: the mask matters
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s, z = qparams_from_range(lo, hi, qmin, qmax, symmetric)
    block = cpu_kernels.block_size(x, s, gran, axis, gs)
    assert block is not None
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, mask = cpu_kernels.fake_quantize_reference(xr, expand_qparam(s, 2, gran, axis, gs),
                                                    expand_qparam(z, 2, gran, axis, gs), qmin, qmax)
    out = cpu_kernels.fake_quantize_blocks(xk, s, z, block, qmin, qmax)
    assert torch.equal(out, ref)  # bit for bit
    grad = torch.randn(x.shape, generator=g)
    out.backward(grad)
    assert torch.equal(xk.grad, torch.where(mask, grad, torch.zeros_like(grad)))  # exact STE: 1 inside, 0 outside


def test_neg_inf_passes_and_gets_no_gradient():
    x = torch.tensor([0.3, float("-inf"), -2.0, 9.0], requires_grad=True)
    y = cpu_kernels.fake_quantize_blocks(x, torch.tensor(0.1), torch.tensor(0.0), 4, -8, 7, keep_neg_inf=True)
    assert torch.isneginf(y[1]) and y[[0, 2, 3]].tolist() == pytest.approx([0.3, -0.8, 0.7])
    y[[0, 2, 3]].sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_layouts_the_kernel_cannot_take_fall_back():
    x = torch.randn(4, 8)
    assert cpu_kernels.block_size(x.t(), torch.ones(()), "tensor", 0, 0) is None  # not contiguous
    assert cpu_kernels.block_size(x.double(), torch.ones(()), "tensor", 0, 0) is None
    assert cpu_kernels.block_size(x, torch.ones(8), "channel", 1, 0) is None  # channel axis not leading
    assert cpu_kernels.block_size(x, torch.ones(2, 8), "group", 0, 2) is None  # groups not along the last axis


@pytest.mark.parametrize("gran,axis,gs", [("tensor", 0, 0), ("channel", 0, 0), ("group", 1, 4)])
def test_quantizer_same_output_with_and_without_kernel(monkeypatch, gran, axis, gs):
    x = torch.randn(8, 16) * 3
    q = Quantizer(QSpec(bits=4, granularity=gran, axis=axis, group_size=gs), shape=x.shape)
    q.observing = True
    q(x * 0.7)
    q.observing = False
    with_kernel = q(x)
    monkeypatch.setenv("QASR_CPU_KERNELS", "0")
    assert q._kernel_block(x) is None
    assert torch.equal(q(x), with_kernel)


def test_starting_the_numba_pool_keeps_torchs_thread_count():
    """numba's OpenMP pool start sets the process's OpenMP thread count to every core; torch's (which the engine's C
    kernels also use) must stay what the user set. A fresh process: this one may have started the pool already."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from fairseq_qasr.quant import cpu_kernels\n"
            "cpu_kernels.fake_quantize_blocks(torch.randn(64), torch.ones(1), torch.zeros(1), 64, -8, 7)\n"
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"
