"""Segmentation models: spec-6 structure, output sizes (65 -> 513, 33 -> 513), backbone names, conversion
(first spiking layer bit-exact, T = 2^bit - 1, the upsample after the read-out)."""
import pytest
import torch
import torch.nn as nn

import quant
import snn
from quant import QuantAct
from segmentation.models import MODELS, get_model


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_vgg9_structure_is_spec_6():
    m = get_model("deeplabv1_vgg9", 21, bit=4)
    spec = [(3, 64, 1, 1), (64, 64, 2, 1), (64, 128, 1, 1), (128, 128, 2, 1), (128, 256, 2, 1), (256, 256, 1, 2),
            (256, 256, 1, 2), (256, 1024, 1, 12)]
    got = [(u.conv.in_channels, u.conv.out_channels, u.conv.stride[0], u.conv.dilation[0]) for u in m.features]
    assert got == spec
    assert all(u.conv.kernel_size == (3, 3) and u.conv.bias is not None for u in m.features)   # convs with bias
    assert all(isinstance(u.act, QuantAct) and u.act.bit == 4 for u in m.features)
    assert m.classifier.kernel_size == (1, 1) and (m.classifier.in_channels, m.classifier.out_channels) == (1024, 21)
    assert sum(isinstance(x, QuantAct) for x in m.modules()) == 8   # classifier: no activation
    assert type(m.features[0].conv) is nn.Conv2d   # float first layer


def test_fov_dilation_changes_only_the_largefov_layer():
    """``fov_dilation``: the LargeFOV layer's dilation (and padding) only; same weights, same output size.
    On a 65-pixel input (a 9 x 9 grid) dilation 12 reads the padding with every tap but the centre one,
    so it equals a 1 x 1 convolution of the centre weights; dilation 1 does not."""
    torch.manual_seed(0)
    m12, m1 = get_model("deeplabv1_vgg9", 5, width=0.125), get_model("deeplabv1_vgg9", 5, width=0.125, fov_dilation=1)
    assert (m12.fov_dilation, m1.fov_dilation) == (12, 1)
    assert [u.conv.dilation[0] for u in m1.features] == [1, 1, 1, 1, 1, 2, 2, 1] and m1.features[7].conv.padding == (1, 1)
    m1.load_state_dict(m12.state_dict())
    m12.eval(), m1.eval()
    x = torch.randn(2, 3, 65, 65)
    feat = m12.features[:7](x)
    conv = m12.features[7].conv
    centre = torch.nn.functional.conv2d(feat, conv.weight[:, :, 1:2, 1:2], conv.bias)
    assert torch.allclose(conv(feat), centre, atol=1e-5)
    assert not torch.allclose(m1.features[7].conv(feat), centre, atol=1e-3)
    assert m1(x).shape == m12(x).shape == (2, 5, 65, 65)
    with pytest.raises(ValueError, match="only deeplabv1_vgg9"):
        get_model("deeplabv3_r34", 5, width=0.125, fov_dilation=1)
    with pytest.raises(ValueError, match="positive integer"):
        get_model("deeplabv1_vgg9", 5, fov_dilation=0)


def test_r34_aspp_structure_is_spec_6():
    m = get_model("deeplabv3_r34", 81, bit=3)
    assert (m.conv1.kernel_size, m.conv1.stride) == ((7, 7), (4, 4))
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert [getattr(m, f"layer{i}")[0].conv1.stride[0] for i in range(1, 5)] == [1, 2, 2, 1]
    assert all(c.dilation == (1, 1) for n, c in m.named_modules() if n.startswith("layer") and isinstance(c, nn.Conv2d))
    assert len(m.aspp) == 5
    assert [(b.conv.kernel_size[0], b.conv.dilation[0], b.conv.in_channels, b.conv.out_channels) for b in m.aspp] == \
        [(1, 1, 512, 256), (3, 6, 512, 256), (3, 12, 512, 256), (3, 18, 512, 256), (3, 24, 512, 256)]
    assert (m.project.conv.in_channels, m.project.conv.out_channels, m.project.conv.kernel_size) == (1280, 256, (1, 1))
    assert (m.head0.conv.kernel_size, m.head0.conv.out_channels) == ((3, 3), 256)
    assert (m.head1.kernel_size, m.head1.out_channels) == ((1, 1), 81)
    assert not any(isinstance(x, (nn.AdaptiveAvgPool2d, nn.MaxPool2d)) for x in m.modules())  # no image pooling


def test_r34_backbone_names_match_imagenet_resnet34():
    from classification.models import get_model as cls_model
    cls = cls_model("resnet34", bit=4, dataset="imagenet").state_dict()
    seg = get_model("deeplabv3_r34", 21, bit=4)
    own = seg.state_dict()
    shared = [k for k in cls if k in own]
    assert len(shared) == len([k for k in cls if not k.startswith("fc.")])
    # the layer4 downsample differs only in stride; shapes are the same everywhere
    assert all(cls[k].shape == own[k].shape for k in shared)


def _feature_size(model, x, name):
    sizes = {}
    def hook(m, i, o):
        sizes["s"] = o.shape
    h = dict(model.named_modules())[name].register_forward_hook(hook)
    out = model(x)
    h.remove()
    return sizes["s"], out


@pytest.mark.parametrize("name, accumulator, feat", [("deeplabv1_vgg9", "classifier", 65), ("deeplabv3_r34", "head1", 33)])
def test_output_sizes_513(name, accumulator, feat):
    torch.manual_seed(0)
    m = get_model(name, 5, bit=32, width=0.0625).eval()
    with torch.no_grad():
        s, out = _feature_size(m, torch.randn(1, 3, 513, 513), accumulator)
    assert tuple(s) == (1, 5, feat, feat)       # 65 (stride 8) / 33 (stride 16) logits ...
    assert tuple(out.shape) == (1, 5, 513, 513)  # ... upsampled to in * s - (s - 1) = 513
    # non-square inputs of k * stride + 1 keep their size too
    stride = 8 if name == "deeplabv1_vgg9" else 16
    with torch.no_grad():
        assert tuple(m(torch.randn(2, 3, 2 * stride + 1, 4 * stride + 1)).shape) == (2, 5, 2 * stride + 1, 4 * stride + 1)


def test_width_and_bad_arguments():
    m = get_model("deeplabv1_vgg9", 3, width=0.25)
    assert [u.conv.out_channels for u in m.features] == [16, 16, 32, 32, 64, 64, 64, 256]
    with pytest.raises(ValueError, match="unknown model"):
        get_model("deeplabv2", 3)
    with pytest.raises(ValueError, match="background and at least one class"):
        get_model("deeplabv1_vgg9", 1)
    with pytest.raises(ValueError, match="bit"):
        get_model("deeplabv1_vgg9", 3, bit=6.5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bit", [2, 3, 4])
def test_conversion_first_layer_exact_and_T(name, bit):
    torch.manual_seed(1)
    ann = quant.randomize_bn(get_model(name, 4, bit=bit, width=0.125), seed=bit)
    for a in ann.modules():
        if isinstance(a, QuantAct):
            a.act_alpha.data.fill_(1.5)
    net = snn.convert(ann)
    assert net.T == 2 ** bit - 1
    x = torch.randn(2, 3, 33, 33)
    with snn.Monitor(ann, net) as mon:
        ann_out, steps = mon.run(x)
        layers = mon.summary()["layers"]
    first = layers[0]["name"]
    assert first == ("features.0.act" if name == "deeplabv1_vgg9" else "act1")
    assert layers[0]["agreement"] == 1.0 and layers[0]["mean_abs_error"] == 0.0
    assert len(layers) == sum(isinstance(m, QuantAct) for m in ann.modules())
    out = net(x)
    assert out.shape == ann_out.shape == (2, 4, 33, 33)
    assert tuple(steps.shape) == (net.T, 2, 4, 33, 33)
    assert torch.allclose(steps[-1], out, atol=1e-5)


def test_single_spiking_layer_equals_the_ann():
    """With only the first unit spiking (the rest of the net is the accumulator and the upsample),
    the SNN equals the quantized ANN exactly -- the bilinear upsample commutes with the time mean."""
    from segmentation.models import upsample_logits

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.unit = get_model("deeplabv1_vgg9", 3, bit=2, width=0.125).features[0]
            self.cls = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return upsample_logits(self.cls(self.unit(x)), 8)

    torch.manual_seed(0)
    ann = quant.randomize_bn(One())
    net = snn.convert(ann)
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        assert torch.allclose(net(x), ann(x), atol=1e-5)
