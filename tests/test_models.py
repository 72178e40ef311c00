"""Classification model zoo (spec section 6): shapes, layer types, neuron counts, fx tracing,
checkpoint loading, torchvision name compatibility."""
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import quant
from classification.models import (CIFAR_ARCHS, IMAGENET_ARCHS, VALID_BITS, BasicBlock, default_wbit,
                                   get_model, load_torchvision_weights, pretrained_state_dict)
from quant import Conv2d8bit, Linear8bit, QuantAct, QuantConv2d, QuantLinear

BITS = (32, 4, 3, 2)
LEAVES = (QuantAct, QuantConv2d, QuantLinear, Conv2d8bit, Linear8bit)

N_ACTS = {
    ("cifar", "alex"): 6, ("cifar", "vgg11"): 10, ("cifar", "resnet20"): 19, ("cifar", "resnet32"): 31,
    ("cifar", "resnet44"): 43, ("cifar", "resnet56"): 55, ("cifar", "resnet110"): 109,
    ("cifar", "resnet18"): 17,
    ("imagenet", "alexnet"): 7, ("imagenet", "vgg16"): 15, ("imagenet", "vgg11"): 10,
    ("imagenet", "resnet18"): 17, ("imagenet", "resnet34"): 33,
}
EIGHT_BIT_ENDS = {("cifar", a) for a in ("alex", "vgg11", "resnet20", "resnet32", "resnet44", "resnet56",
                                         "resnet110")} | {("imagenet", a) for a in ("alexnet", "vgg16", "vgg11")}
QUANT_WEIGHTS = {("cifar", a) for a in ("alex", "vgg11", "resnet20", "resnet32", "resnet44", "resnet56",
                                        "resnet110")}
CASES = [("cifar", a) for a in CIFAR_ARCHS] + [("imagenet", a) for a in IMAGENET_ARCHS]


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        if isinstance(m, LEAVES):
            return True
        return super().is_leaf_module(m, qualname)


def weight_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_structure(model, ds, arch, bit):
    """Types of first / last / hidden layers, no max-pool, number of QuantActs."""
    layers = weight_layers(model)
    first, last = layers[0], layers[-1]
    if (ds, arch) in EIGHT_BIT_ENDS:
        assert isinstance(first, Conv2d8bit) and isinstance(last, Linear8bit)
    else:
        assert type(first) is nn.Conv2d and type(last) is nn.Linear
    hidden = layers[1:-1]
    assert hidden and all(isinstance(m, (QuantConv2d, QuantLinear)) for m in hidden)
    want_wbit = bit if (ds, arch) in QUANT_WEIGHTS else 32
    assert {m.wbit for m in hidden} == {want_wbit}
    assert default_wbit(arch, bit, ds) == want_wbit
    assert model.wbit == want_wbit and model.bit == bit and model.dataset == ds and model.arch == arch
    assert not any("MaxPool" in type(m).__name__ for m in model.modules())
    acts = [m for m in model.modules() if isinstance(m, QuantAct)]
    assert len(acts) == N_ACTS[(ds, arch)]
    assert {a.bit for a in acts} == {bit}


def check_graph(model):
    """fx trace; every QuantAct is fed by a BN (or by BN + shortcut); the output comes from the last
    linear layer with no activation."""
    graph = LeafTracer().trace(model)
    mods = dict(model.named_modules())
    n_act = 0
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], QuantAct):
            n_act += 1
            src = node.args[0]
            if src.op == "call_function" and src.target in (operator.add, torch.add):
                srcs = [a for a in src.args if isinstance(a, fx.Node)]
                assert any(s.op == "call_module" and isinstance(mods[s.target], nn.BatchNorm2d) for s in srcs)
            else:
                assert src.op == "call_module" and isinstance(mods[src.target], (nn.BatchNorm1d, nn.BatchNorm2d))
    out = [n for n in graph.nodes if n.op == "output"][0].args[0]
    assert out.op == "call_module" and isinstance(mods[out.target], nn.Linear)
    assert n_act == N_ACTS[(model.dataset, model.arch)]


@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("ds,arch", CASES)
def test_build_forward_structure(ds, arch, bit):
    torch.manual_seed(0)
    model = get_model(arch, bit=bit, dataset=ds)
    check_structure(model, ds, arch, bit)
    if bit == 2:
        check_graph(model)
    size, batch, classes = (32, 2, 10) if ds == "cifar" else (224, 1, 1000)
    assert model.input_size == size
    frozen = (ds, arch) in {("cifar", "alex"), ("cifar", "vgg11")}
    assert model.ft_bn_mode == ("frozen" if frozen else "recalibrate")
    assert model.ft_weight_decay == (5e-4 if frozen else 1e-4)
    calls = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, m in model.named_modules() if isinstance(m, QuantAct)]
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    assert y.shape == (batch, classes)
    assert torch.isfinite(y).all()
    assert len(calls) == N_ACTS[(ds, arch)] and set(calls.values()) == {1}


def test_fine_tuner_attributes():
    from classification.models import (CifarAlexNet, CifarResNet, CifarResNet18, CifarVGG11, ImageNetAlexNet,
                                       ImageNetResNet, ImageNetVGG11, ImageNetVGG16)
    for cls in (CifarAlexNet, CifarVGG11):
        assert (cls.ft_bn_mode, cls.ft_weight_decay, cls.input_size) == ("frozen", 5e-4, 32)
    for cls in (CifarResNet, CifarResNet18):
        assert (cls.ft_bn_mode, cls.ft_weight_decay, cls.input_size) == ("recalibrate", 1e-4, 32)
    for cls in (ImageNetAlexNet, ImageNetVGG16, ImageNetVGG11, ImageNetResNet):
        assert (cls.ft_bn_mode, cls.ft_weight_decay, cls.input_size) == ("recalibrate", 1e-4, 224)


@pytest.mark.parametrize("arch,alpha", [("alex", 8.0), ("vgg11", 8.0), ("resnet20", 6.0), ("resnet18", 6.0)])
def test_alpha_init(arch, alpha):
    model = get_model(arch, bit=2)
    assert {m.act_alpha.item() for m in model.modules() if isinstance(m, QuantAct)} == {alpha}
    assert {m.wgt_alpha.item() for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))
            and m.wgt_alpha is not None} <= {3.0}
    model = get_model(arch, bit=2, alpha_init=2.5)
    assert {m.act_alpha.item() for m in model.modules() if isinstance(m, QuantAct)} == {2.5}


def test_explicit_wbit_overrides():
    m = get_model("resnet20", bit=2, wbit=32)
    assert {x.wbit for x in m.modules() if isinstance(x, QuantConv2d)} == {32}
    m = get_model("resnet18", bit=4, wbit=3)
    assert {x.wbit for x in m.modules() if isinstance(x, QuantConv2d)} == {3}
    m = get_model("resnet18", bit=3, dataset="imagenet", wbit=2)
    assert {x.wbit for x in m.modules() if isinstance(x, QuantConv2d)} == {2}


def count(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("act_alpha", "wgt_alpha")))


def test_parameter_counts():
    assert math.isclose(count(get_model("resnet20")), 0.27e6, rel_tol=0.02)
    assert count(get_model("resnet20", 2)) == count(get_model("resnet20"))
    assert math.isclose(count(get_model("resnet56")), 0.85e6, rel_tol=0.02)
    assert math.isclose(count(get_model("resnet110")), 1.73e6, rel_tol=0.02)
    torchvision = pytest.importorskip("torchvision")
    for arch in ("resnet18", "resnet34"):
        ref = getattr(torchvision.models, arch)(weights=None)
        assert count(get_model(arch, dataset="imagenet")) == count(ref)


def test_residual_addition_before_activation():
    torch.manual_seed(0)
    model = get_model("resnet20", bit=2).eval()
    blk = model.layer2[0]
    assert isinstance(blk, BasicBlock) and isinstance(blk.downsample, nn.Sequential)
    assert isinstance(blk.downsample[0], QuantConv2d) and blk.downsample[0].kernel_size == (1, 1)
    assert isinstance(blk.downsample[1], nn.BatchNorm2d)
    assert model.layer1[0].downsample is None
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        mid = blk.act1(blk.bn1(blk.conv1(x)))
        ref = blk.act2(blk.bn2(blk.conv2(mid)) + blk.downsample(x))
        assert torch.equal(blk(x), ref)
    r18 = get_model("resnet18")
    assert r18.layer1[0].downsample is not None and r18.layer1[1].downsample is None
    assert [len(getattr(r18, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 2]
    assert not hasattr(r18, "layer4")


def test_imagenet_resnet_stem_and_stride():
    m = get_model("resnet34", dataset="imagenet").eval()
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (4, 4) and m.conv1.padding == (3, 3)
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    feats = {}
    m.layer4.register_forward_hook(lambda mod, i, o: feats.__setitem__("x", o))
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    assert feats["x"].shape[-2:] == (7, 7)


def test_load_init_32_to_2_bit():
    for arch in ("resnet20", "alex"):
        torch.manual_seed(0)
        fp = get_model(arch, 32)
        low = get_model(arch, 2)
        with torch.no_grad():
            for m in low.modules():
                if isinstance(m, QuantAct):
                    m.act_alpha.fill_(1.0)
        report = quant.load_init(low, fp.state_dict())
        assert report["missing_quantizer"]
        assert torch.equal(low.state_dict()[next(k for k in fp.state_dict() if k.endswith("weight"))],
                           fp.state_dict()[next(k for k in fp.state_dict() if k.endswith("weight"))])
        alpha = 8.0 if arch == "alex" else 6.0
        assert {m.act_alpha.item() for m in low.modules() if isinstance(m, QuantAct)} == {alpha}
        # and back: a 2-bit checkpoint into the float model ignores the clips
        quant.load_init(get_model(arch, 32), low.state_dict())


def test_torchvision_names(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = get_model("resnet18", bit=2, dataset="imagenet")
    sd = pretrained_state_dict("resnet18", str(path))
    report = load_torchvision_weights(model, sd)
    assert all(k.endswith("act_alpha") for k in report["missing_quantizer"])
    assert len(report["missing_quantizer"]) == 17
    assert torch.equal(model.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert torch.equal(model.layer2[0].downsample[0].weight, ref.layer2[0].downsample[0].weight)
    assert set(model.state_dict()) - set(sd) == set(report["missing_quantizer"])
    assert torch.equal(model.fc.weight, ref.fc.weight)
    assert torch.equal(model.bn1.running_var, ref.bn1.running_var)
    # wrapped checkpoints with a DDP prefix load too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, wrapped)
    load_torchvision_weights(get_model("resnet18", bit=4, dataset="imagenet"),
                             pretrained_state_dict("resnet18", str(wrapped)))
    with pytest.raises(quant.CheckpointMismatchError):
        load_torchvision_weights(get_model("resnet20"), sd)


def test_pretrained_errors(monkeypatch, tmp_path):
    for arch in ("alexnet", "vgg16", "vgg11"):
        with pytest.raises(ValueError, match="local state-dict file"):
            pretrained_state_dict(arch, "torchvision")
    with pytest.raises(ValueError, match="local state-dict file"):
        pretrained_state_dict("resnet18", "torchvision", dataset="cifar")

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="local state-dict file"):
        pretrained_state_dict("resnet34", "torchvision")
    with pytest.raises(FileNotFoundError):
        pretrained_state_dict("resnet34", str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 1}, bad)
    with pytest.raises(ValueError, match="not a state dict"):
        pretrained_state_dict("vgg16", str(bad))


def test_name_resolution_and_errors():
    with pytest.raises(ValueError) as e:
        get_model("xyz")
    msg = str(e.value)
    assert msg.startswith("unknown arch 'xyz': choose from alex, vgg11, resnet20") and "\n" not in msg
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        get_model("vgg16", dataset="cifar")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_model("resnet20", dataset="mnist")
    for bad in (1, 0, 16, 33, 2.5, "4", True):
        with pytest.raises(ValueError, match="2, 3, 4, 5"):
            get_model("resnet20", bit=bad)
    with pytest.raises(ValueError, match="wbit"):
        get_model("resnet20", bit=2, wbit=1)
    assert type(get_model("resnet18")).__name__ == "CifarResNet18"
    assert type(get_model("resnet18", dataset="imagenet")).__name__ == "ImageNetResNet"
    assert get_model("resnet34").dataset == "imagenet"
    assert get_model("vgg11").dataset == "cifar"
    assert set(VALID_BITS) >= {32, 8, 5, 4, 3, 2}


def test_in_channels_and_num_classes():
    m = get_model("resnet20", bit=3, in_channels=1, num_classes=7).eval()
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    m = get_model("alex", bit=3, num_classes=100).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_training_step_resnet20_2bit():
    torch.manual_seed(0)
    model = get_model("resnet20", bit=2).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.04, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert model.layer1[0].act2.act_alpha.grad is not None
        assert model.layer3[2].conv1.wgt_alpha.grad is not None
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
