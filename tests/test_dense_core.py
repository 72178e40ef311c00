"""The conversion core on the way dense (detection / segmentation) models are written: shape metadata on
trains, one QuantAct called at several places, batch sizes read from the input, constants built from
shapes, the read-out boundary, linearity of the ops between neurons, several inputs / dict outputs,
exact SOPs for every conv kind, partial backbone loading, and the shared pipeline."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
import snn
from common import UserError
from common import pipeline
from quant.functional import act_levels
from snn.convert import TimeContext, _TimeOp


def _bn(c):
    bn = nn.BatchNorm2d(c)
    return bn


def _prep(model, seed=0):
    torch.manual_seed(seed)
    quant.randomize_bn(model, seed)
    for m in model.modules():
        if isinstance(m, quant.QuantAct):
            with torch.no_grad():
                m.act_alpha.fill_(1.5 + 0.1 * (hash(id(m)) % 5))
    return model.eval()


class Stem(nn.Module):
    def __init__(self, cin=3, cout=8, bit=2, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = quant.QuantAct(bit)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class YoloLike(nn.Module):
    """A YOLO head written the usual way: size() unpacking, permute / view, a grid from the shape,
    sigmoid / exp decoding -- after the (non-spiking) prediction conv."""

    def __init__(self, deep=False, A=2, C=3):
        super().__init__()
        self.stem = Stem(3, 8, stride=2)
        self.deep = deep
        if deep:
            self.mid = Stem(8, 8)
        self.pred = nn.Conv2d(8, A * (5 + C), 1)
        self.A, self.C = A, C

    def forward(self, x):
        y = self.stem(x)
        if self.deep:
            y = self.mid(y)
        pred = self.pred(y)
        B, abC, H, W = pred.size()
        pred = pred.permute(0, 2, 3, 1).contiguous().view(B, H * W, abC)
        pred = pred.view(B, H * W * self.A, 5 + self.C)
        gy, gx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        grid = torch.stack([gx, gy], -1).view(1, H * W, 1, 2).expand(1, H * W, self.A, 2).reshape(1, -1, 2)
        xy = (torch.sigmoid(pred[..., 1:3]) + grid) / W
        wh = torch.exp(pred[..., 3:5].clamp(max=4))
        return {"conf": torch.sigmoid(pred[..., :1]), "box": torch.cat([xy, wh], -1), "cls": pred[..., 5:].softmax(-1)}


class SharedRelu(nn.Module):
    """torchvision style: one QuantAct module used after two different layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu = quant.QuantAct(2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean((2, 3)))


class BatchFromInput(nn.Module):
    """Reads the batch size from the input and reshapes with it between spiking layers; adds a
    constant built from the input's shape."""

    def __init__(self):
        super().__init__()
        self.stem = Stem(3, 8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.act = quant.QuantAct(2)
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        B = x.size(0)
        y = self.stem(x)
        y = y.reshape(x.size(0), 8, -1)          # [B, 8, H*W]
        y = y.view(B, 8, x.shape[2], x.shape[3])
        pos = torch.arange(x.shape[-1], dtype=x.dtype).view(1, 1, 1, -1) * 0.01
        y = self.act(self.conv(y) + pos)
        return self.fc(y.reshape(B, -1))


class SegLike(nn.Module):
    def __init__(self, deep=False, classes=4, mode="bilinear"):
        super().__init__()
        self.stem = Stem(3, 8, stride=2)
        self.deep = deep
        if deep:
            self.mid = Stem(8, 8)
        self.cls = nn.Conv2d(8, classes, 1)
        self.mode = mode

    def forward(self, x):
        y = self.stem(x)
        if self.deep:
            y = self.mid(y)
        y = self.cls(y)
        kw = {"align_corners": True} if self.mode in ("bilinear", "bicubic") else {}
        return F.interpolate(y, size=(y.shape[2] * 2 - 1, y.shape[3] * 2 - 1), mode=self.mode, **kw)


def _leaves(o):
    if isinstance(o, dict):
        return [v for k in sorted(o) for v in _leaves(o[k])]
    if isinstance(o, (list, tuple)):
        return [v for x in o for v in _leaves(x)]
    return [o]


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("factory", [YoloLike, SegLike, lambda: SegLike(mode="bicubic"), lambda: SegLike(mode="area")])
def test_one_spiking_layer_equals_ann_exactly(factory):
    """A net with one spiking layer (driven by the analog input) equals its quantized ANN exactly, with a
    YOLO head written the usual way or a final bilinear / bicubic / area upsample after the read-out."""
    ann = _prep(factory())
    x = torch.randn(3, 3, 16, 16)
    net = snn.convert(ann)
    with torch.no_grad():
        a, s = ann(x), net(x)
    for u, v in zip(_leaves(a), _leaves(s)):
        assert u.shape == v.shape
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)


def test_readout_is_before_the_post_processing():
    ann = _prep(SegLike(deep=True))
    net = snn.convert(ann)
    pre_ops = {n.target for n in net.net.graph.nodes if n.op == "call_function"}
    head_ops = {n.target for n in net.head.graph.nodes if n.op == "call_function"}
    assert F.interpolate in head_ops and F.interpolate not in pre_ops
    # the classifier (accumulator) runs on the trains; its output is the read-out
    assert "cls" in {n.target for n in net.net.graph.nodes if n.op == "call_module"}
    y = ann(torch.randn(2, 3, 16, 16))
    assert net(torch.randn(2, 3, 16, 16)).shape == y.shape


def test_head_runs_on_per_sample_tensors():
    """Everything after the read-out sees [B, ...], never [T*B, ...]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Stem(3, 8, stride=2)
            self.mid = Stem(8, 8)
            self.cls = nn.Conv2d(8, 4, 1)
            self.up = nn.Upsample(scale_factor=8, mode="bilinear", align_corners=True)

        def forward(self, x):
            return self.up(self.cls(self.mid(self.stem(x))))
    ann = _prep(M())
    net = snn.convert(ann, T=7)
    seen = []
    net.head.get_submodule("up").register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape)))
    net.net.get_submodule("cls").register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape)))
    assert net(torch.randn(3, 3, 16, 16)).shape == (3, 4, 64, 64)
    assert seen == [(7 * 3, 8, 8, 8), (3, 4, 8, 8)]


def test_deep_dense_models_first_layer_bit_exact_and_close():
    for factory in (lambda: YoloLike(deep=True), lambda: SegLike(deep=True)):
        ann = _prep(factory())
        net = snn.convert(ann, T=15)
        x = torch.randn(4, 3, 16, 16)
        with snn.Monitor(ann, net) as mon:
            a, steps = mon.run(x)
            stats = mon.summary()
        assert stats["layers"][0]["agreement"] == 1.0
        for u, v in zip(_leaves(a), _leaves(steps)):
            assert v.shape == (15,) + tuple(u.shape)


def test_shared_quantact_gets_one_neuron_per_call_site():
    ann = _prep(SharedRelu())
    net = snn.convert(ann)
    names = list(net.neurons())
    assert names == ["relu", "relu__call1"]
    assert net.ann_site("relu__call1") == ("relu", 1)
    assert net.neurons()["relu"].constant_input and not net.neurons()["relu__call1"].constant_input
    x = torch.randn(5, 3, 8, 8)
    with snn.Monitor(ann, net) as mon:
        mon.run(x)
        layers = mon.summary()["layers"]
    assert [l["name"] for l in layers] == names
    assert layers[0]["agreement"] == 1.0
    # the state dict keeps the ANN's keys (the clone of the second call site is not in it)
    sd = net.ann_state_dict()
    assert set(sd) == set(ann.state_dict())
    # the fine-tuner's target for the second call site is the ANN's second call of relu
    from snn.finetune import _ann_activation
    got = {}
    h = ann.relu.register_forward_hook(lambda m, i, o: got.setdefault("calls", []).append(o))
    ann(x)
    h.remove()
    torch.testing.assert_close(_ann_activation(ann, net.ann_site("relu__call1"))(x), got["calls"][1])
    hist = snn.finetune(ann, net, [(x, None)], epochs=1, progress=False, log=lambda m: None)
    assert [h["layer"] for h in hist] == ["relu__call1"]


def test_batch_size_read_from_input_and_grid_from_shape():
    ann = _prep(BatchFromInput())
    x = torch.randn(3, 3, 4, 4)
    net = snn.convert(ann, T=3)
    with torch.no_grad():
        y = net(x)
        steps = net(x, per_step=True)
    assert y.shape == (3, 5) and steps.shape == (3, 3, 5)
    # chunked simulation gives the same result
    net.chunk = 1
    torch.testing.assert_close(net(x), y)


def test_total_charge_into_second_layer_equals_ann_with_reshape_and_grid():
    """With x.size(0) reshapes and a shape-built constant between two spiking layers, the charge the
    second layer integrates over T steps is T times the ANN's pre-activation (exact conversion)."""
    ann = _prep(BatchFromInput())
    x = torch.randn(2, 3, 4, 4)
    _charge_check(ann, x, "act", T=3)


def _charge_check(ann, x, name, T, site=0):
    got = {}
    calls = []
    h = ann.get_submodule(name).register_forward_hook(lambda m, i, o: calls.append(i[0]))
    with torch.no_grad():
        ann(x)
    h.remove()
    net = snn.convert(ann, T=T)
    neuron_name = [n for n in net.neurons() if net.ann_site(n) == (name, site)][0]
    neuron = net.net.get_submodule(neuron_name)
    h2 = neuron.register_forward_hook(lambda m, i, o: got.__setitem__("cur", i[0]))
    with torch.no_grad():
        net(x)
    h2.remove()
    cur = got["cur"].view(T, x.shape[0], *got["cur"].shape[1:])
    # the ANN's current into this QuantAct, from the SNN's rates of the layers below: the first layer is
    # exact, so feed the ANN's own first-layer output -> the pre-activation equals the ANN's
    torch.testing.assert_close(cur.sum(0) / T, calls[site], rtol=1e-4, atol=1e-5)


class Between(nn.Module):
    """Stem (exact) -> op -> QuantAct: the op acts on the first layer's spike train."""

    def __init__(self, op, cin=8, cout=8):
        super().__init__()
        self.stem = Stem(3, 8)
        self.op = op
        self.conv = nn.Conv2d(cin, cout, 1)
        self.act = quant.QuantAct(2)
        self.out = nn.Conv2d(cout, 2, 1)

    def forward(self, x):
        return self.out(self.act(self.conv(self.op(self.stem(x), x))))


def _reorg(y, x):
    B, C, H, W = y.size()
    s = 2
    y = y.view(B, C, H // s, s, W // s, s).permute(0, 1, 3, 5, 2, 4).contiguous()
    y = y.view(B, C * s * s, H // s, W // s)
    return F.interpolate(y, scale_factor=2, mode="nearest")[:, :8]


OPS = {
    "reorg": (_reorg, 8),
    "concat_static": (lambda y, x: torch.cat([y, x], 1), 11),
    "upsample_bilinear": (lambda y, x: F.interpolate(F.avg_pool2d(y, 2), scale_factor=2, mode="bilinear",
                                                     align_corners=False), 8),
    "upsample_bicubic_area": (lambda y, x: F.interpolate(F.interpolate(y, scale_factor=0.5, mode="area"),
                                                         size=y.shape[-2:], mode="bicubic", align_corners=False), 8),
    "avgpool_mean_sum": (lambda y, x: y - y.mean((2, 3), keepdim=True) + torch.sum(y, dim=1, keepdim=True) * 0.1
                         + F.adaptive_avg_pool2d(y, 1), 8),
    "pixel_unshuffle": (lambda y, x: F.pixel_shuffle(F.pixel_unshuffle(y, 2), 2), 8),
    "scale_by_static": (lambda y, x: y * x.mean(1, keepdim=True) / (1 + x.abs().mean()), 8),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_commute_with_time_mean(name):
    """mean_t f(s_t) = f(mean_t s_t) for the linear ops allowed between neurons (reorg, concat,
    upsample, avg-pool, mean / sum, products with static values): the second layer integrates T times
    the ANN's pre-activation."""
    op, cin = OPS[name]

    class Op(nn.Module):
        def forward(self, y, x):
            return op(y, x)
    ann = _prep(Between(Op(), cin=cin))
    _charge_check(ann, torch.randn(2, 3, 8, 8), "act", T=3)


def test_shared_call_site_charge():
    ann = _prep(SharedRelu())
    _charge_check(ann, torch.randn(2, 3, 6, 6), "relu", T=3, site=1)


@settings(max_examples=25, deadline=None)
@given(T=st.sampled_from([3, 7, 15]), B=st.integers(1, 3), C=st.integers(1, 4),
       op=st.sampled_from(["cat", "reorg", "up", "avg"]), seed=st.integers(0, 1000))
def test_folded_op_equals_op_of_mean(T, B, C, op, seed):
    """Property: on a random folded spike train [T*B, ...], the op followed by the time mean equals the
    op of the time mean (the layout the converter relies on)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-1, 2, (T * B, C, 4, 4), generator=g).double()
    ctx = TimeContext()
    ctx.steps = T
    view = _TimeOp(ctx, "view")
    size = _TimeOp(ctx, "size")

    def f(y, folded):
        if op == "cat":
            return torch.cat([y, 2 * y], 1)
        if op == "up":
            return F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        if op == "avg":
            return F.avg_pool2d(y, 2)
        b, c, h, w = (size(y) if folded else y.size())
        v = (lambda t, *sh: view(t, *sh)) if folded else (lambda t, *sh: t.view(*sh))
        y = v(y, b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).contiguous()
        return v(y, b, c * 4, h // 2, w // 2)
    out = f(s, True)
    mean_of_f = out.view(T, B, *out.shape[1:]).mean(0)
    f_of_mean = f(s.view(T, B, C, 4, 4).mean(0), False)
    torch.testing.assert_close(mean_of_f, f_of_mean)


# ---------------------------------------------------------------------------------------- linearity
class Bad(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.stem = Stem(3, 4)
        self.fn = fn
        self.act = quant.QuantAct(2)
        self.fc = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.fc(self.act(self.fn(self.stem(x), x)))


@pytest.mark.parametrize("fn,match", [
    (lambda y, x: x[:, :4] / (y + 1), "division by a spike train"),
    (lambda y, x: y * y, "product of two spike trains"),
    (lambda y, x: y - y.mean(), "reduces over the batch"),
    (lambda y, x: torch.cat([y, y], 0)[:2], "along dim 0"),
    (lambda y, x: y.permute(1, 0, 2, 3).permute(1, 0, 2, 3), "moves the batch axis"),
    (lambda y, x: y[0:1].expand_as(y), "batch axis"),
    (lambda y, x: torch.relu(y), "not linear"),
    (lambda y, x: F.max_pool2d(y, 1), "stride-2 convolution"),
])
def test_nonlinear_between_neurons_rejected(fn, match):
    with pytest.raises(snn.ConversionError, match=match):
        snn.convert(_prep(Bad(fn)))


def test_nonlinear_after_accumulator_allowed_and_exact():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Stem(3, 4)
            self.fc = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            y = self.fc(self.stem(x))
            return torch.sigmoid(y).max(1)[0], y.softmax(1)
    ann = _prep(M())
    x = torch.randn(2, 3, 5, 5)
    a, s = ann(x), snn.convert(ann)(x)
    for u, v in zip(a, s):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)


def test_several_inputs_and_dict_outputs_and_steps():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Stem(3, 4)
            self.b = Stem(1, 4)
            self.act = quant.QuantAct(2)
            self.conv = nn.Conv2d(8, 4, 1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x, m):
            y = self.act(self.conv(torch.cat([self.a(x), self.b(m)], 1)))
            h = self.head(y)
            return {"logits": h, "prob": h.sigmoid(), "mask_sum": m.sum((1, 2, 3))}
    ann = _prep(Two())
    x, m = torch.randn(2, 3, 6, 6), torch.randn(2, 1, 6, 6)
    net = snn.convert(ann, T=3)
    out = net(x, m)
    assert set(out) == {"logits", "prob", "mask_sum"} and out["logits"].shape == (2, 2, 6, 6)
    steps = list(net.steps(x, m))
    assert len(steps) == 3
    torch.testing.assert_close(steps[-1]["prob"], out["prob"])
    stacked = net(x, m, per_step=True)
    assert stacked["prob"].shape == (3, 2, 2, 6, 6)
    torch.testing.assert_close(stacked["prob"][0], steps[0]["prob"])
    net.chunk = 2
    torch.testing.assert_close(net(x, m)["prob"], out["prob"])


def test_signed_neuron_tolerance_edge():
    """A membrane of -1e-8 right after a spike (float rounding of an exact 0) must not cancel it."""
    for theta in (0.37, 1.0, 6.0):
        th = torch.tensor(theta, dtype=torch.float32)
        cur = torch.tensor([[theta / 2], [-1e-8], [-1e-8 * theta], [0.0]], dtype=torch.float32)
        s, v, n = snn.if_multistep(cur, th, torch.full((1,), theta / 2), torch.zeros(1), True)
        assert s[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
        assert float(n) == 1.0


@settings(max_examples=60, deadline=None)
@given(theta=st.floats(0.05, 20.0), eps=st.floats(0.0, 9e-4))
def test_signed_neuron_relative_tolerance_property(theta, eps):
    """After a spike, a membrane of -eps*theta (eps below the relative tolerance 1e-3) keeps the spike;
    -2e-3*theta cancels it."""
    th = torch.tensor(theta, dtype=torch.float64)
    v0 = torch.full((1,), theta / 2, dtype=torch.float64)
    keep = torch.tensor([[theta / 2], [-eps * theta]], dtype=torch.float64)
    s, _, n = snn.if_multistep(keep, th, v0, torch.zeros(1, dtype=torch.float64), True)
    assert s[:, 0].tolist() == [1.0, 0.0]
    cancel = torch.tensor([[theta / 2], [-2e-3 * theta]], dtype=torch.float64)
    s, _, n = snn.if_multistep(cancel, th, v0, torch.zeros(1, dtype=torch.float64), True)
    assert s[:, 0].tolist() == [1.0, -1.0] and float(n) == 0.0


# ---------------------------------------------------------------------------------------- SOPs
def _brute_sops(m, x):
    ind = (x != 0).to(x.dtype)
    if isinstance(m, nn.Linear):
        return float(F.linear(ind, torch.ones(m.out_features, m.in_features, dtype=x.dtype)).sum())
    nd = len(m.kernel_size)
    g = m.groups
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        w = torch.ones(m.in_channels, m.out_channels // g, *m.kernel_size, dtype=x.dtype)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return float(fn(ind, w, None, m.stride, m.padding, m.output_padding, g, m.dilation).sum())
    w = torch.ones(m.out_channels, m.in_channels // g, *m.kernel_size, dtype=x.dtype)
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    if m.padding_mode != "zeros":
        return float(fn(F.pad(ind, m._reversed_padding_repeated_twice, mode=m.padding_mode), w, None, m.stride,
                        0, m.dilation, g).sum())
    return float(fn(ind, w, None, m.stride, m.padding, m.dilation, g).sum())


@pytest.mark.parametrize("m,shape", [
    (nn.Conv2d(4, 6, 3, padding=2, dilation=2), (2, 4, 9, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 8)),
    (nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 7, 7)),
    (nn.Conv2d(4, 8, 1), (2, 4, 5, 5)),
    (nn.Conv2d(4, 6, 3, padding=12, dilation=12), (1, 4, 13, 13)),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 6, 6)),
    (nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1), (2, 4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 5)),
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    (nn.Conv3d(2, 3, 3, padding=1), (1, 2, 4, 4, 4)),
    (nn.Linear(10, 7), (3, 10)),
])
def test_sops_exact_for_every_conv_kind(m, shape):
    from snn.monitor import _sops
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 2, shape, generator=g).float() * (torch.rand(shape, generator=g) < 0.3)
    assert _sops(m, x) == pytest.approx(_brute_sops(m, x), rel=1e-6)


# ---------------------------------------------------------------------------------------- pipeline
class _Top1:
    def __init__(self):
        self.c = self.n = 0

    def update(self, out, batch):
        y = batch[1]
        self.c += int((out.argmax(1) == y).sum())
        self.n += len(y)

    def compute(self):
        return {"top1": 100.0 * self.c / max(self.n, 1), "n": self.n}


def test_pipeline_evaluate_snn_and_finetune_and_save(tmp_path):
    ann = _prep(SharedRelu())
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))) for _ in range(3)]
    net = pipeline.convert(ann, T=3)
    res = pipeline.evaluate_snn(ann, net, data, _Top1, key="top1", progress=False)
    assert len(res["per_step_top1"]) == 3 and res["top1"] == res["per_step_top1"][-1]
    assert res["ann_top1"] == pipeline.evaluate(ann, data, _Top1, progress=False)["top1"]
    assert res["layers"][0]["agreement"] == 1.0 and res["T"] == 3 and res["neuron"] == "signed"
    assert res["sops"] > 0 and res["ann_macs"] > 0
    hist = pipeline.finetune(ann, net, data, epochs=1, progress=False, log=lambda m: None)
    assert hist and hist[0]["accepted"]
    path = pipeline.save_finetuned(str(tmp_path / "ft.pth.tar"), net, {"arch": "shared"})
    ck = torch.load(path, weights_only=True)
    assert ck["snn_finetuned"] and ck["T"] == 3
    fresh = SharedRelu()
    fresh.load_state_dict(ck["state_dict"])  # the ANN's keys


def test_pipeline_dict_batches_and_errors():
    ann = _prep(SharedRelu())
    data = [{"image": torch.randn(2, 3, 6, 6), "label": torch.tensor([0, 1])}]
    net = pipeline.convert(ann)
    snn.finetune(ann, net, data, epochs=1, progress=False, log=lambda m: None)
    with pytest.raises(UserError, match="--chunk"):
        pipeline.convert(ann, chunk=0)
    with pytest.raises(UserError, match="signed"):
        pipeline.convert(ann, settle=3, signed=False)


def test_load_backbone_partial(tmp_path, capsys):
    src = SegLike(deep=True)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "bb.pth")
    dst = SegLike(deep=True, classes=7)
    msgs = []
    rep = pipeline.load_backbone(dst, str(tmp_path / "bb.pth"), prefix_map={"cls.": None}, log=msgs.append)
    assert "stem.conv.weight" in rep["loaded"] and "cls.weight" in rep["initialised"]
    torch.testing.assert_close(dst.stem.conv.weight, src.stem.conv.weight)
    assert "loaded" in msgs[0] and "initialised" in msgs[0]
    with pytest.raises(UserError, match="shape mismatch for cls.weight"):
        pipeline.load_backbone(SegLike(deep=True, classes=7), str(tmp_path / "bb.pth"), log=msgs.append)
    with pytest.raises(UserError, match="shares no parameter"):
        pipeline.load_backbone(nn.Linear(2, 2), str(tmp_path / "bb.pth"), log=msgs.append)
    renamed = {"backbone." + k: v for k, v in src.state_dict().items() if not k.startswith("cls")}
    rep = pipeline.load_backbone(SegLike(deep=True), renamed, prefix_map={"backbone.": ""}, log=msgs.append)
    assert len(rep["loaded"]) == len(renamed)


# ---------------------------------------------------------------------------------------- settle mode
class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), quant.QuantAct(2)
        self.c2, self.b2, self.a2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), quant.QuantAct(2)

    def forward(self, x):
        return self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x))))) + x)


class ResConcatReorg(nn.Module):
    """A residual net with a concat and a reorg route (YOLOv2-R34 style), 7 spiking layers deep."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), quant.QuantAct(2)
        self.b1, self.b2 = _Block(8), _Block(8)
        self.side, self.sa = nn.Conv2d(8, 4, 1), quant.QuantAct(2)
        self.mix, self.ma = nn.Conv2d(8 + 16, 8, 1), quant.QuantAct(2)
        self.fc = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.b1(self.act(self.bn(self.stem(x))))
        r = self.sa(self.side(y))
        B, C, H, W = r.size()
        r = r.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).contiguous().view(B, C * 4, H // 2, W // 2)
        r = F.interpolate(r, scale_factor=2, mode="nearest")
        return self.fc(self.ma(self.mix(torch.cat([self.b2(y), r], 1))))


def _settle_model():
    m = ResConcatReorg().double()
    quant.randomize_bn(m, 0)
    for a in m.modules():
        if isinstance(a, quant.QuantAct):
            with torch.no_grad():
                a.act_alpha.fill_(1.0)
    return m.eval()


def test_settle_reaches_the_quantized_ann_exactly():
    """After K = depth x T settle steps every layer's spike count equals the quantized ANN's level and
    the output equals the ANN (float64; a negative-spike tolerance far below any tie)."""
    torch.manual_seed(0)
    m = _settle_model()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    T, depth = 3, 7
    for chunk in (None, 2):
        net = snn.convert(m, T=T, settle=depth * T, chunk=chunk)  # the mode's own tolerance (0)
        with snn.Monitor(m, net) as mon:
            a, steps = mon.run(x)
            stats = mon.summary()
        assert [l["agreement"] for l in stats["layers"]] == [1.0] * depth
        assert steps.shape[0] == T + depth * T and stats["settle"] == depth * T
        torch.testing.assert_close(steps[-1], a, rtol=0, atol=1e-12)
    plain = snn.convert(m, T=T, neg_tol=1e-9)
    with snn.Monitor(m, plain) as mon:
        mon.run(x)
        assert min(l["agreement"] for l in mon.summary()["layers"]) < 1.0  # the gap settle closes


def _band_model():
    """Three first-layer neurons at levels 1, 2, 3 of T = 3 (spikes at t = 2 / t = 1, 3 / every step)
    drive one neuron with weights (0.6, -0.05015, 0): it fires at t = 2 and ends at v = -0.0003 theta,
    inside the default negative-spike tolerance band (Q / theta = 0.4997: the ANN's level is 0)."""
    m = nn.Sequential(quant.QuantAct(2), nn.Linear(3, 1, bias=False), quant.QuantAct(2))
    with torch.no_grad():
        m[0].act_alpha.fill_(1.0)
        m[2].act_alpha.fill_(1.0)
        m[1].weight.copy_(torch.tensor([[0.6, -0.05015, 0.0]]))
    return m.eval(), torch.tensor([[1 / 3, 2 / 3, 1.0]])


def test_settle_uses_the_exact_rounding_criterion():
    """The default tolerance (1e-3) leaves the band neuron one level high; the settle mode's exact
    criterion (v in [0, theta)) gives the ANN's level, while settle=0 stays today's simulation."""
    m, x = _band_model()
    levels = []
    for kw in ({}, {"settle": 1}, {"settle": 1, "neg_tol": 1e-3}):
        net = snn.convert(m, **kw)
        with snn.Monitor(m, net) as mon:
            mon.run(x)
            levels.append(mon.summary()["layers"][-1]["agreement"])
    assert levels == [0.0, 1.0, 0.0]  # plain: n = 1 vs level 0; settle: exact; explicit tol honoured
    net = snn.convert(m, settle=2)
    assert {n.neg_tol for n in net.neurons().values()} == {0.0}
    net.set_settle(0)
    assert {n.neg_tol for n in net.neurons().values()} == {1e-3}


def test_settle_zero_is_todays_simulation_and_unsigned_rejected():
    m = _settle_model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    a = snn.convert(m, settle=0)(x, per_step=True)
    b = snn.convert(m)(x, per_step=True)
    assert torch.equal(a, b)
    with pytest.raises(snn.ConversionError, match="signed"):
        snn.convert(m, signed=False, settle=3)


def test_settle_graph_switches_offsets_off():
    from snn.convert import settle_graph
    m = _settle_model()
    net = snn.convert(m, settle=3)
    g = settle_graph(net.net, net.node_kinds)
    wrapped = [n.target for n in g.graph.nodes if n.op == "call_module" and n.target.startswith("_settle.")]
    # every conv with a bias and every BN acting on trains runs without its offset; the first layer
    # (static, analog input) is not part of it
    assert "_settle.settle_b1_c1" in wrapped and "_settle.settle_b1_b1" in wrapped
    assert not any("settle_stem" in w or w == "_settle.settle_bn" for w in wrapped)
