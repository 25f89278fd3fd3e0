"""quantize_model: module swap, functional routing, naming, strictness, save/load."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairseq_qasr.quant import (UnsupportedOpError, called_without_hooks, calibrate, freeze_wrappers,
                                materialize_wrappers, quantize_model, set_quantization)
from fairseq_qasr.quant.modules import QAdd, QLayerNorm, QLinear, QMatMul, QMul, QSoftmax

from quant_toy import ToyBlock, toy_inputs


def quantized_toy(**kw):
    torch.manual_seed(0)
    m = ToyBlock(**kw).eval()
    x, mask = toy_inputs()
    quantize_model(m, "w8a8", example_inputs=(x, mask))
    calibrate(m, [(x, mask)])
    return m, x, mask


def test_modules_swapped_and_ops_routed_with_stable_names():
    m, x, mask = quantized_toy()
    assert isinstance(m.qkv, QLinear) and isinstance(m.ln, QLayerNorm)
    assert isinstance(m.mul_0, QMul) and isinstance(m.matmul_0, QMatMul) and isinstance(m.matmul_1, QMatMul)
    assert isinstance(m.softmax_0, QSoftmax) and isinstance(m.add_0, QAdd)
    assert not hasattr(m, "add_1"), "an additive -inf mask is a select, not a quantized add"


def test_disabled_reproduces_float_exactly():
    torch.manual_seed(0)
    m = ToyBlock().eval()
    x, mask = toy_inputs()
    ref = m(x, mask)
    quantize_model(m, "w8a8", example_inputs=(x, mask))
    set_quantization(m, False)
    assert torch.equal(m(x, mask), ref)


def test_state_dict_round_trip():
    m, x, mask = quantized_toy()
    sd = m.state_dict()
    assert "softmax_0.out_q.scale" in sd and "mul_0.const_value" in sd
    y = m(x, mask)
    fresh = ToyBlock().eval()
    quantize_model(fresh, "w8a8")
    made = materialize_wrappers(fresh, sd)
    assert set(made) == {"mul_0", "matmul_0", "add_0", "softmax_0", "matmul_1", "gelu_0"}
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x, mask), y)


def test_frozen_wrappers_refuse_new_call_sites():
    m, x, mask = quantized_toy()
    freeze_wrappers(m)
    m(x, mask)
    m.forward = lambda x: F.relu(ToyBlock.forward(m, x, None))  # a call site never seen before
    with pytest.raises(UnsupportedOpError, match="relu"):
        m(x)


def test_a_forward_called_directly_reenters_through_the_hooks(monkeypatch):
    """``m.forward(...)`` skips m's hooks (fairseq's search calls forwards so). quantize_model's forward re-enters
    through ``m(...)``: the forward's own ops (here the residual add) are routed as in a module call."""
    from fairseq_qasr.quant import replace

    m, x, mask = quantized_toy()
    y = m(x, mask)
    assert torch.equal(m.forward(x, mask), y)
    assert not called_without_hooks(nn.Linear(2, 2))  # a module quantize_model never hooked
    seen = []
    m.forward.inner = lambda *a: seen.append(called_without_hooks(m)) or ToyBlock.forward(m, *a)
    m.forward(x, mask)
    assert seen == [False]  # the inner forward ran once, inside the hooks
    m.forward.inner = None
    monkeypatch.setattr(replace, "called_without_hooks", lambda module: False)  # no re-entry: the add etc. in float
    assert not torch.equal(m.forward(x, mask), y)


def test_sdpa_is_decomposed():
    m, x, mask = quantized_toy(use_sdpa=True)
    assert isinstance(m.softmax_0, QSoftmax) and isinstance(m.matmul_1, QMatMul)
    set_quantization(m, False)
    ref = ToyBlock.forward(m, x)  # same module, float math
    assert torch.allclose(m(x), ref, atol=1e-5)


class FloatOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x)) + torch.exp(x)


def test_strict_raises_naming_op_and_path():
    m = nn.Sequential(nn.Linear(4, 4), FloatOps())
    with pytest.raises(UnsupportedOpError, match=r"tanh.*'1'"):
        quantize_model(m, "w8a8", example_inputs=(torch.randn(2, 4),))


def test_permissive_lists_problems():
    m = nn.Sequential(nn.Linear(4, 4), FloatOps())
    quantize_model(m, "w8a8", example_inputs=(torch.randn(2, 4),), strict=False)
    assert ("tanh", "1") in m.qasr_problems and ("exp", "1") in m.qasr_problems


class FusedAttention(nn.Module):
    """Third-party code calling the fused kernel on raw weights (as fairseq's MultiheadAttention does)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        a = self.inner
        return F.multi_head_attention_forward(x, x, x, 8, 2, a.in_proj_weight, a.in_proj_bias, None, None, False,
                                              0.0, a.out_proj.weight, a.out_proj.bias, training=False)


def test_fused_attention_refused():
    m = FusedAttention().eval()
    with pytest.raises(UnsupportedOpError, match="multi_head_attention_forward.*'<root>'"):
        quantize_model(m, "w8a8", example_inputs=(torch.randn(3, 1, 8),))


def test_integer_and_length_arithmetic_pass_through():
    class Lengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, lengths):
            out = ((lengths.float() - 1) / 2 + 1).floor().long()
            return self.lin(x), out

    m = Lengths()
    quantize_model(m, "w8a8", example_inputs=(torch.randn(2, 4), torch.tensor([7, 9])))
    assert not any(n.startswith(("sub_", "mul_", "add_")) for n, _ in m.named_children())


def test_deepcopy_keeps_routing():
    import copy

    m, x, mask = quantized_toy()
    y = m(x, mask)
    c = copy.deepcopy(m)
    freeze_wrappers(c)
    assert torch.equal(c(x, mask), y)
    assert c.softmax_0 is not m.softmax_0
    assert c.forward.module is c  # a direct forward call re-enters the copy, not the original
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(0.5)
    assert torch.equal(c.forward(x, mask), c(x, mask)) and not torch.equal(c(x, mask), y)


def test_uncalibrated_lists_unreached_call_sites():
    from fairseq_qasr.quant import uncalibrated

    torch.manual_seed(0)
    m = ToyBlock().eval()
    x, mask = toy_inputs()
    quantize_model(m, "w8a8", example_inputs=(x, mask))
    assert "softmax_0" in uncalibrated(m)
    calibrate(m, [(x, mask)])
    assert uncalibrated(m) == []
