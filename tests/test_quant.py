"""Quantizer tests (spec section 4)."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
from quant.functional import act_levels, project, weight_magnitudes, weight_levels


# ---------------------------------------------------------------------------------------- levels
@pytest.mark.parametrize("bit", range(2, 9))
def test_weight_level_sets(bit):
    mags = weight_magnitudes(bit)
    levels = weight_levels(bit)
    assert len(levels) == 2 ** bit - 1 if bit > 2 else len(levels) == 3
    assert torch.equal(levels, -levels.flip(0))  # symmetric
    assert float(levels.max()) == 1.0 and float(mags[0]) == 0.0
    assert torch.all(mags[1:] > mags[:-1])  # distinct, sorted


def test_apot_reference_sets():
    assert weight_magnitudes(3).tolist() == [0, 0.25, 0.5, 1]
    assert torch.allclose(weight_magnitudes(4), torch.tensor([0, .1, .2, .3, .4, .6, .8, 1], dtype=torch.float64))
    five = [0, .0208, .0417, .0625, .0833, .125, .1667, .1875, .25, .3333, .375, .5, .6667, .6875, .75, 1]
    assert torch.allclose(weight_magnitudes(5), torch.tensor(five, dtype=torch.float64), atol=1e-4)
    assert weight_magnitudes(2).tolist() == [0, 1]  # ternary
    u = weight_magnitudes(3, "uniform")
    assert torch.allclose(u, torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(bit=st.integers(2, 8), seed=st.integers(0, 10_000), mode=st.sampled_from(["apot", "uniform", None]))
def test_projection_equals_brute_force(bit, seed, mode):
    if mode == "apot" and bit == 2:
        mode = None
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(2000, generator=g, dtype=torch.float64) * 2.4 - 1.2
    v = v.clamp(-1, 1)
    mags = weight_magnitudes(bit, mode)
    got = project(v, mags)
    levels = torch.cat([-mags.flip(0)[:-1], mags])
    d = (v[:, None] - levels[None, :]).abs()
    brute = levels[d.argmin(1)]
    # ties (exactly between two levels) may go either way; there are none in random doubles
    assert torch.equal(got, brute)


# ---------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("bit", [2, 3, 4])
def test_act_quant_values_and_range(bit):
    alpha = torch.tensor(2.5)
    x = torch.linspace(-3, 6, 1001)
    out = quant.act_quant(x, alpha, bit)
    n = 2 ** bit - 1
    k = out / alpha * n
    assert torch.allclose(k, k.round(), atol=1e-5)
    assert float(out.min()) == 0 and torch.isclose(out.max(), alpha)
    assert len(out.unique()) == n + 1


def test_round_half_up_at_exact_ties():
    alpha = torch.tensor(3.0)  # 2 bits: levels 0, 1, 2, 3; x/alpha*3 = x
    x = torch.tensor([0.5, 1.5, 2.5, 0.49, 2.51])
    out = quant.act_quant(x, alpha, 2)
    assert out.tolist() == [1.0, 2.0, 3.0, 0.0, 3.0]  # torch.round would give 0, 2, 2
    assert act_levels(x, alpha, 3).tolist() == [1, 2, 3, 0, 3]


def test_act_gradients_match_formulas():
    alpha = torch.tensor(2.0, requires_grad=True)
    x = torch.tensor([-1.0, 0.3, 0.9, 1.7, 2.5, 4.0], requires_grad=True)
    out = quant.act_quant(x, alpha, 2)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out.backward(g)
    inside = ((x >= 0) & (x <= alpha)).float()
    assert torch.equal(x.grad, g * inside.detach())
    y = x.detach().clamp(min=0)
    q = out.detach() / alpha.detach()
    d = torch.where(y > 2.0, torch.ones_like(y), q - y / 2.0)
    assert torch.isclose(alpha.grad, (g * d).sum())


def _ste_reference(x, alpha, bit):
    n = 2 ** bit - 1
    y = torch.relu(x)
    u = torch.clamp(y / alpha, max=1.0)
    r = u * n
    rq = r + (torch.floor(r + 0.5) - r).detach()
    return alpha * rq / n


@pytest.mark.parametrize("bit", [2, 3, 4])
def test_act_gradients_match_autograd_ste(bit):
    torch.manual_seed(bit)
    x1 = (torch.randn(500, dtype=torch.float64) * 3).requires_grad_()
    a1 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    a2 = a1.detach().clone().requires_grad_()
    g = torch.randn(500, dtype=torch.float64)
    quant.act_quant(x1, a1, bit).backward(g)
    _ste_reference(x2, a2, bit).backward(g)
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(a1.grad, a2.grad)


def test_gradcheck_where_ste_is_exact():
    """Above the clip, out = alpha exactly: the analytic gradients are the true ones."""
    x = (torch.rand(20, dtype=torch.float64) + 3.0).requires_grad_()
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: quant.act_quant(x, a, 3), (x, a))
    xn = (-torch.rand(20, dtype=torch.float64) - 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: quant.act_quant(x, a, 3), (xn, a))


# ---------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("bit", [2, 3, 4, 5])
def test_weight_quant_on_levels(bit):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    a = torch.tensor(2.0)
    wq = quant.weight_quant(w, a, bit)
    lv = weight_levels(bit).float() * 2.0
    assert torch.isin(wq, lv).all()


def _weight_reference(w, a, bit, ternary):
    w_hat = (w - w.mean()) / (w.std() + 1e-12)
    r = w_hat / a
    v = torch.clamp(r, -1, 1) if not ternary else r + (torch.clamp(r, -1, 1) - r).detach()
    q = project(v.detach(), weight_magnitudes(bit).to(w.dtype))
    return a * (v + (q - v).detach())


@pytest.mark.parametrize("bit", [2, 3, 4])
def test_weight_gradients_match_formulas(bit):
    torch.manual_seed(bit)
    w1 = (torch.randn(200, dtype=torch.float64)).requires_grad_()
    a1 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    a2 = a1.detach().clone().requires_grad_()
    g = torch.randn(200, dtype=torch.float64)
    quant.weight_quant(w1, a1, bit).backward(g)
    # weight path: clamp zeroes the gradient outside the clip, except for ternary (pass-through)
    _weight_reference(w2, a2.detach(), bit, bit == 2).backward(g)
    assert torch.allclose(w1.grad, w2.grad)
    a3 = a1.detach().clone().requires_grad_()
    _weight_reference(w1.detach(), a3, bit, False).backward(g)
    assert torch.allclose(a1.grad, a3.grad)
    # d/d alpha_w = sign(v) outside the clip, q - w_hat/alpha inside
    w_hat = quant.standardize(w1.detach())
    r = w_hat / 1.5
    q = quant.weight_quant(w1.detach(), torch.tensor(1.5, dtype=torch.float64), bit) / 1.5
    expect = torch.where(r.abs() > 1, torch.sign(r), q - r)
    assert torch.isclose(a1.grad, (g * expect).sum())


def test_gradcheck_standardisation():
    w = torch.randn(30, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(quant.standardize, (w,))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), dh=st.integers(1, 14), dw=st.integers(1, 14),
       k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2), wbit=st.sampled_from([3, 32]), seed=st.integers(0, 99))
def test_training_conv_skips_padding_only_taps_with_the_same_values(h, w, dh, dw, k, stride, wbit, seed):
    """A same-padded dilated conv trains through its centre taps where the dilation reaches past the input:
    the output and every gradient equal the full convolution's (float rounding), the dropped taps' weight
    gradients are exactly zero, and evaluation runs the full convolution bit for bit."""
    from quant.layers import centre_taps
    torch.manual_seed(seed)
    conv = quant.QuantConv2d(4, 6, k, stride=stride, padding=(dh * (k // 2), dw * (k // 2)), dilation=(dh, dw),
                             wbit=wbit)
    x = torch.randn(2, 4, h, w, requires_grad=True)
    cut = centre_taps(conv, x, conv.weight)
    assert (cut is not None) == (k > 1 and (dh >= h or dw >= w))
    full = nn.functional.conv2d(x, conv.quantized_weight(), conv.bias, conv.stride, conv.padding, conv.dilation)
    g = torch.randn_like(full)
    ref = torch.autograd.grad(full, [x, conv.weight, conv.bias], g)
    out = conv.train()(x)
    assert out.shape == full.shape and torch.allclose(out, full, atol=1e-5)
    got = torch.autograd.grad(out, [x, conv.weight, conv.bias], g)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-4)
    if cut is not None and wbit == 32:
        centre = torch.zeros_like(conv.weight, dtype=torch.bool)
        centre[:, :, k // 2 if dh >= h else slice(None), k // 2 if dw >= w else slice(None)] = True
        assert torch.all(got[1][~centre] == 0)
    with torch.no_grad():
        assert torch.equal(conv.eval()(x), full)


def test_8bit_weights_use_max_abs():
    w = torch.tensor([-4.0, 0.5, 1.0, 2.0])  # max(w) = 2 but max|w| = 4
    wq = quant.weight_quant_8bit(w)
    assert float(wq[0]) == -4.0  # with max(w) scaling it would overflow the 8-bit range
    assert torch.allclose(wq, torch.round(w / 4 * 127) / 127 * 4)


def test_bit32_is_identity():
    x = torch.randn(10)
    assert torch.equal(quant.act_quant(x, None, 32), torch.relu(x))
    c = quant.QuantConv2d(3, 4, 3, wbit=32)
    assert c.wgt_alpha is None and c.quantized_weight() is c.weight


def test_bias_not_quantized():
    c = quant.QuantConv2d(3, 4, 3, bias=True, wbit=2)
    x = torch.randn(1, 3, 5, 5)
    ref = torch.nn.functional.conv2d(x, c.quantized_weight(), c.bias)
    assert torch.allclose(c(x), ref)


def test_bad_bits_rejected():
    with pytest.raises(ValueError, match="bit=1"):
        quant.QuantAct(1)
    with pytest.raises(ValueError):
        quant.QuantConv2d(3, 3, 3, wbit=9)


# ---------------------------------------------------------------------------------------- training / init
class TinyQNet(nn.Module):
    def __init__(self, bit):
        super().__init__()
        wb = bit
        self.conv1 = quant.Conv2d8bit(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = quant.QuantAct(bit, 2.0)
        self.conv2 = quant.QuantConv2d(8, 16, 3, stride=2, padding=1, bias=False, wbit=wb)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = quant.QuantAct(bit, 2.0)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = quant.Linear8bit(16, 2)

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _toy_data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return x, y


@pytest.mark.parametrize("bit", [4, 3, 2])
def test_tiny_quantized_cnn_trains(bit):
    torch.manual_seed(0)
    x, y = _toy_data()
    model = TinyQNet(bit)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(p.grad is not None for n, p in model.named_parameters() if "alpha" in n)


def test_init_from_float_checkpoint():
    fp = TinyQNet(32)
    sd = fp.state_dict()
    assert not any("alpha" in k for k in sd)
    q = TinyQNet(2)
    info = quant.load_init(q, sd)
    assert sorted(info["missing_quantizer"]) == ["act1.act_alpha", "act2.act_alpha", "conv2.wgt_alpha"]
    assert torch.equal(q.conv2.weight, fp.conv2.weight)
    assert q.act1.act_alpha.item() == 2.0
    # a DataParallel-style prefix is stripped
    q2 = TinyQNet(2)
    quant.load_init(q2, {"module." + k: v for k, v in sd.items()})
    assert torch.equal(q2.conv1.weight, fp.conv1.weight)
    # higher-bit quantized checkpoint keeps its clips
    q4 = TinyQNet(4)
    with torch.no_grad():
        q4.act1.act_alpha.fill_(5.0)
    quant.load_init(q, q4.state_dict())
    assert q.act1.act_alpha.item() == 5.0


def test_init_mismatch_names_keys():
    q = TinyQNet(2)
    sd = TinyQNet(32).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["bn2.bias"]
    with pytest.raises(quant.CheckpointMismatchError, match=r"missing keys \[bn2.bias\].*unexpected keys \[extra.weight\]"):
        quant.load_init(q, sd)
    sd = TinyQNet(32).state_dict()
    sd["fc.weight"] = torch.zeros(3, 16)
    with pytest.raises(quant.CheckpointMismatchError, match="shape mismatch"):
        quant.load_init(q, sd)


def test_show_params_lists_every_alpha():
    q = TinyQNet(3)
    lines = []
    params = quant.show_params(q, printer=lines.append)
    assert set(params) == {"act1.act_alpha", "act2.act_alpha", "conv2.wgt_alpha"}
    assert len(lines) == 3
