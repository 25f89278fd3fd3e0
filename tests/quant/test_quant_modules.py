"""Each quantized module against its float twin: exact with quantization off, SQNR floor at 8 bits."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairseq_qasr.quant import QConfig, QSpec
from fairseq_qasr.quant.modules import (QAdd, QConv1d, QConv2d, QEmbedding, QGELU, QGLU, QLayerNorm, QLinear,
                                        QLogSoftmax, QMatMul, QMaxPool, QMul, QReLU, QSiLU, QSoftmax)

CFG = QConfig(output=None)
SQNR_FLOOR_DB = 25.0


def sqnr(ref, y):
    ref, y = ref.detach(), y.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum().clamp_min(1e-20)))


def set_all(m, enabled=True, observing=False):
    for q in m.quantizers():
        q.enabled, q.observing = enabled, observing


def check(qmod, float_fn, *inputs, **kw):
    set_all(qmod, enabled=False)
    ref = float_fn(*inputs)
    assert torch.equal(qmod(*inputs, **kw), ref), "quantization off must reproduce the float op exactly"
    set_all(qmod, enabled=True, observing=True)
    qmod(*inputs, **kw)
    set_all(qmod, enabled=True, observing=False)
    y = qmod(*inputs, **kw)
    assert sqnr(ref, y) > SQNR_FLOOR_DB, sqnr(ref, y)


torch.manual_seed(0)
X = torch.randn(2, 6, 16)


def test_linear():
    m = nn.Linear(16, 8)
    check(QLinear.from_float(m, CFG), m, X)


def test_linear_shares_parameters():
    m = nn.Linear(16, 8)
    q = QLinear.from_float(m, CFG)
    assert q.weight is m.weight and q.bias is m.bias


def test_conv1d():
    m = nn.Conv1d(16, 8, 3, stride=2, padding=1)
    check(QConv1d.from_float(m, CFG), m, X.transpose(1, 2))


def test_conv2d():
    m = nn.Conv2d(1, 4, 3, padding=1)
    check(QConv2d.from_float(m, CFG), m, X.unsqueeze(1))


def test_embedding_and_tied_projection():
    m = nn.Embedding(20, 16, padding_idx=1)
    q = QEmbedding.from_float(m, CFG)
    idx = torch.randint(0, 20, (2, 5))
    check(q, m, idx)
    set_all(q, enabled=False)
    assert torch.equal(q.project(X), F.linear(X, m.weight))
    set_all(q, observing=True)
    q.project(X)
    set_all(q)
    assert sqnr(F.linear(X, m.weight), q.project(X)) > SQNR_FLOOR_DB


def test_layer_norm():
    m = nn.LayerNorm(16)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    check(QLayerNorm.from_float(m, CFG), m, X)


def test_softmax_with_mask():
    m = nn.Softmax(dim=-1)
    s = torch.randn(2, 6, 6) * 3
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    q = QSoftmax.from_float(m, QConfig(output=QSpec(signed=False)))
    check(q, m, s)
    assert (q(s)[..., 0, 1:] == 0).all()


@pytest.mark.parametrize("cls,float_mod", [(QGELU, nn.GELU()), (QReLU, nn.ReLU()), (QSiLU, nn.SiLU()),
                                           (QGLU, nn.GLU(dim=-1)), (QLogSoftmax, nn.LogSoftmax(dim=-1))])
def test_activations(cls, float_mod):
    check(cls.from_float(float_mod, CFG), float_mod, X)


def test_maxpool():
    m = nn.MaxPool2d(2)
    check(QMaxPool.from_float(m, CFG), m, X.unsqueeze(1))


def test_matmul():
    b = torch.randn(2, 16, 5)
    check(QMatMul(CFG), torch.matmul, X, b)


def test_add_and_scalar_mul():
    check(QAdd(CFG), torch.add, X, torch.randn_like(X))
    q = QMul(CFG)
    check(q, lambda x, c: x * c, X, 0.125)
    with pytest.raises(ValueError, match="constant"):
        q(X, 0.5)


def test_bias_is_int32_on_input_times_weight_scale():
    m = nn.Linear(16, 8)
    q = QLinear.from_float(m, CFG)
    set_all(q, observing=True)
    q(X)
    b = q._bias(m.bias)
    acc_scale = q.in_q[0].current_scale() * q.w_q["weight"].current_scale()
    codes = b / acc_scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_bias_beyond_int32_accumulator_is_refused_not_clipped():
    """16-bit input x 16-bit weights on small ranges: a bias of 1e3 needs more than 2^31 accumulator codes."""
    from fairseq_qasr.quant import AccumulatorOverflowError, quantize_model

    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight.mul_(1e-3), model[0].bias.fill_(1e3)
    wide = {"bits": 16}
    quantize_model(model, {"version": 1, "name": "w16a16", "defaults": {"input": wide, "weight": wide}})
    model.eval()  # calibration, decoding, audit and export run in eval mode
    set_all(model[0], observing=True)
    with pytest.raises(AccumulatorOverflowError, match=r"bias of 0 needs .* int32"):
        model(X * 1e-3)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_twin(batch_first):
    from fairseq_qasr.quant import calibrate, quantize_model, set_quantization
    from fairseq_qasr.quant.audit import audit
    from fairseq_qasr.quant.modules import QMultiheadAttention

    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        ref, ref_w = m(x, x, x, attn_mask=causal, key_padding_mask=pad)
    wrapper = nn.Sequential()
    wrapper.attn = m
    inp = lambda mod: mod.attn(x, x, x, attn_mask=causal, key_padding_mask=pad)  # noqa: E731
    quantize_model(wrapper, "w8a8", example_inputs=inp)
    assert isinstance(wrapper.attn, QMultiheadAttention) and wrapper.attn.in_proj_weight is m.in_proj_weight
    set_quantization(wrapper, False)
    with torch.no_grad():
        out, w = inp(wrapper)
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)
    calibrate(wrapper, [inp])
    with torch.no_grad():
        out, _ = inp(wrapper)
    assert sqnr(ref, out) > SQNR_FLOOR_DB
    assert audit(wrapper, [inp]).ok
