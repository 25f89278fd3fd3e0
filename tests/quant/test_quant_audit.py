"""The honesty audit passes an honestly quantized model and catches planted float ops."""
import torch
import torch.nn.functional as F
from torch import nn

from fairseq_qasr.quant import calibrate, quantize_model
from fairseq_qasr.quant.audit import audit

from quant_toy import ToyBlock, toy_inputs


def quantized_toy():
    torch.manual_seed(0)
    m = ToyBlock().eval()
    x, mask = toy_inputs()
    quantize_model(m, "w8a8", example_inputs=(x, mask))
    calibrate(m, [(x, mask)])
    return m, (x, mask)


def test_honest_model_passes():
    m, inp = quantized_toy()
    r = audit(m, [inp])
    assert r.ok, r.table()
    assert ("linear", "addmm") in r.rows and ("softmax", "_softmax") in r.rows
    assert r.rows[("linear", "addmm")].bits[0] == {32}  # int32 bias on s_in * s_w
    assert "VERDICT: PASS" in r.table()


def test_catches_planted_float_softmax():
    m, inp = quantized_toy()
    m.planted_float_softmax = True  # F.softmax escapes routing and runs in float
    r = audit(m, [inp])
    assert not r.ok
    assert any("_softmax" in v.op and v.path == "" and "outside" in v.detail for v in r.violations), r.table()


def test_catches_float_residual_add():
    m, inp = quantized_toy()
    for q in m.add_0.in_q:
        q.enabled = False  # the residual add now sees float activations
    r = audit(m, [inp])
    assert any("add" in v.op and v.path == "add_0" and "float" in v.detail for v in r.violations), r.table()


class EscapingLayerNorm(nn.LayerNorm):
    """A float LayerNorm whose forward escapes routing (as a fused third-party kernel would)."""

    def forward(self, x):
        with torch._C.DisableTorchFunction():
            return super().forward(x)


def test_catches_float_layer_norm():
    m, inp = quantized_toy()
    m.ln = EscapingLayerNorm(16)  # planted after quantization
    r = audit(m, [inp])
    assert any("native_layer_norm" in v.op and v.path == "ln" for v in r.violations), r.table()
    assert "VERDICT: FAIL" in r.table()


def test_catches_off_grid_input():
    m, inp = quantized_toy()
    with torch.no_grad():
        m.o.weight.add_(1e-3)  # weights changed after the quantizer's range was frozen: still on grid
    assert audit(m, [inp]).ok
    m.o.w_q["weight"].enabled = False  # raw float weights reach the matmul
    r = audit(m, [inp])
    assert any(v.path == "o" and "input" in v.detail for v in r.violations), r.table()
