"""quant.quantize / quant.calibrate: any torchvision CNN -> quantized ANN -> SNN, and the ImageNet
scripts' torchvision archs.

Every model is built with random weights (BN statistics randomised) at a small input size; the SNN
checks run in float64, where the settle mode must reproduce the quantized ANN to rounding error.
"""
from __future__ import annotations

import copy
import os
import subprocess
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import segmentation

import quant
import snn
from quant import UnsupportedLayerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (input side, has max-pools)
MODELS = {
    "resnet18": (16, True), "resnet34": (16, True), "resnet50": (16, True), "vgg11_bn": (32, True),
    "vgg16_bn": (32, True), "alexnet": (64, True), "densenet121": (32, True), "shufflenet_v2_x1_0": (16, True),
    "regnet_x_400mf": (16, False), "mobilenet_v2": (16, False), "fcn_resnet50": (16, True),
    "deeplabv3_resnet50": (16, True),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ("fcn_resnet50", "deeplabv3_resnet50"):
        m = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=5, aux_loss=True)
    else:
        m = torchvision.models.get_model(name, weights=None, num_classes=10)
    if name.startswith(("vgg", "alexnet")):  # narrower hidden classifier layers (4096 wide: 0.5 GB per copy)
        fc = [i for i, l in enumerate(m.classifier) if isinstance(l, nn.Linear)]
        m.classifier[fc[0]] = nn.Linear(m.classifier[fc[0]].in_features, 64)
        m.classifier[fc[1]] = nn.Linear(64, 64)
        m.classifier[fc[2]] = nn.Linear(64, 10)
    return quant.randomize_bn(m, 0)


def relu_sites(m: nn.Module) -> int:
    """ReLU / ReLU6 call sites of a float model (module calls counted per call)."""
    g = fx.Tracer().trace(copy.deepcopy(m).eval())
    mods = dict(m.named_modules())
    n = 0
    for node in g.nodes:
        if node.op == "call_module" and type(mods[node.target]) in (nn.ReLU, nn.ReLU6):
            n += 1
        elif node.op == "call_function" and node.target in (F.relu, torch.relu, F.relu6):
            n += 1
    return n


def with_avg_pools(m: nn.Module) -> nn.Module:
    """The float model with every MaxPool2d module replaced the way maxpool='avg' does it."""
    m = copy.deepcopy(m)
    for path, mod in list(m.named_modules()):
        if isinstance(mod, nn.MaxPool2d):
            parent, _, leaf = path.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf,
                    nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode,
                                 count_include_pad=False))
    return m


def leaves(y):
    return list(y.values()) if isinstance(y, dict) else [y]


@pytest.fixture
def single_thread():
    """One intra-op thread: small convolutions on shared CPU cores run faster without OpenMP spinning."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model_quantizes_and_converts(name, single_thread):
    """Output shapes, the input model untouched, one QuantAct per ReLU call site, 8-bit first / last
    layers, bit 32 = the float model, pretrained keys load; the SNN's first layer is exact on every
    neuron, the monitor covers every layer, and the settle mode equals the quantized ANN."""
    side, has_maxpool = MODELS[name]
    m = build(name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kinds = [type(x) for x in m.modules()]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        y = m(x)
    pool = "avg" if has_maxpool else "error"
    if has_maxpool:
        with pytest.raises(UnsupportedLayerError, match=r"MaxPool2d\): max-pooling") as e:
            quant.quantize(m, 2)
        assert "\n" not in str(e.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quant.quantize(m, 2, maxpool=pool)
    msgs = [str(w.message) for w in caught if "max-pool" in str(w.message)]
    assert len(msgs) == int(has_maxpool) and all("\n" not in s for s in msgs)
    # the input model is untouched
    assert [type(x) for x in m.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # structure: one QuantAct per call site, every conv / linear quantized, 8-bit edges
    acts = [a for a in q.modules() if isinstance(a, quant.QuantAct)]
    assert len(acts) == relu_sites(m) and {a.bit for a in acts} == {2}
    assert len({id(a) for a in acts}) == len(acts)
    weights = [w for w in q.modules() if isinstance(w, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(w, quant.WEIGHT_LAYERS) for w in weights)
    eight = [w for w in weights if isinstance(w, (quant.Conv2d8bit, quant.Linear8bit))]
    assert 2 <= len(eight) <= 3 and {w.wbit for w in weights if w not in eight} == {2}
    report = quant.load_init(q, m.state_dict())  # torchvision-named (pretrained) weights load as they are
    assert all(k.endswith(("act_alpha", "wgt_alpha")) for k in report["missing_quantizer"])
    # bit 32 with float edges is the float model (max-pools as average pools)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q32 = quant.quantize(m, 32, first_last_bit=32, maxpool=pool)
    with torch.no_grad():
        ref = with_avg_pools(m)(x) if has_maxpool else y
        for a, b in zip(leaves(q32(x)), leaves(ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    quant.calibrate(q, [x])
    q.eval()
    with torch.no_grad():
        yq = q(x)
    assert isinstance(yq, dict) == isinstance(y, dict)
    assert [t.shape for t in leaves(yq)] == [t.shape for t in leaves(y)]
    if isinstance(y, dict):
        assert list(yq) == list(y)
    # the SNN, in float64
    q64, x64 = copy.deepcopy(q).double(), x[:1].double()
    net = snn.convert(q64)
    with snn.Monitor(q64, net) as mon:
        mon.run(x64)
        stats = mon.summary()
    assert [l["name"] for l in stats["layers"]] == list(net.neurons()) and len(stats["layers"]) == len(acts)
    assert stats["layers"][0]["agreement"] == 1.0
    assert all(0.0 <= l["firing_rate"] <= 1.0 for l in stats["layers"]) and stats["sops"] > 0
    if isinstance(y, dict):  # the final upsampling runs once per sample, after the read-out
        def calls(g):
            return [n.target for n in g.graph.nodes if n.op == "call_function"]
        assert F.interpolate in calls(net.head)
        assert sum(f is F.interpolate for f in calls(net.net)) == (name == "deeplabv3_resnet50")  # ASPP pooling
    settle = len(acts) * net.T  # depth x T steps: every layer reaches its quantized level
    exact = snn.convert(q64, settle=settle)
    with snn.Monitor(q64, exact) as mon:
        a, steps = mon.run(x64, lazy=True)
        stats = mon.summary()
    assert all(l["agreement"] == 1.0 for l in stats["layers"])
    for s, t in zip(leaves(steps.output()), leaves(a)):
        torch.testing.assert_close(s, t, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------- call sites
class Sites(nn.Module):
    """Every way a ReLU is written: a shared module, in-place functional (the input read again after it),
    torch.relu, a tensor method, ReLU6, a functional max-pool, a sigmoid on the output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.six = nn.ReLU6()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        F.relu(z, inplace=True)
        z = self.relu(z + y)                  # `z` after the in-place call is rectified
        z = F.max_pool2d(torch.relu(self.conv3(z)), 2)
        z = self.six(z).relu()
        return torch.sigmoid(self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)))


@pytest.mark.filterwarnings("ignore:quantize")
def test_every_relu_call_site_gets_its_own_quantizer():
    torch.manual_seed(0)
    m = quant.randomize_bn(Sites())
    x = torch.randn(3, 3, 8, 8)
    q = quant.quantize(m, 3, maxpool="avg", alpha_init=2.5)
    acts = {p: a for p, a in q.named_modules() if isinstance(a, quant.QuantAct)}
    assert len(acts) == 6 and {a.bit for a in acts.values()} == {3}
    assert sorted(a.alpha_init for a in acts.values()) == [2.5] * 5 + [6.0]  # ReLU6 starts at 6
    assert acts["six"].alpha_init == 6.0 and q.relu6_sites == ("six",)
    assert isinstance(q.conv1, quant.Conv2d8bit) and isinstance(q.fc, quant.Linear8bit)
    assert q.conv2.wbit == 3 and q.conv2.wmode == "apot"
    assert "max_pool2d() in the model's forward()" in q.replaced_maxpools[0]
    # at 32 bits (float edges) it is the float model -- with F.max_pool2d as the average pool
    q32 = quant.quantize(m, 32, first_last_bit=32, maxpool="avg")
    ref = copy.deepcopy(m)
    with torch.no_grad():
        y = ref.relu(ref.bn1(ref.conv1(x)))
        z = torch.relu(ref.conv2(y))
        z = torch.relu(z + y)
        z = F.avg_pool2d(torch.relu(ref.conv3(z)), 2, count_include_pad=False)
        z = torch.clamp(z, 0, 6)
        want = torch.sigmoid(ref.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)))
        torch.testing.assert_close(q32(x), want)
    # trains: every clip gets a gradient
    q.train()
    q(x).sum().backward()
    assert all(a.act_alpha.grad is not None for a in acts.values())
    # converts, with the output sigmoid computed on the rates
    q.eval()
    out = snn.convert(q)(x)
    assert out.shape == (3, 4) and bool(((out > 0) & (out < 1)).all())


@pytest.mark.filterwarnings("ignore:quantize")
def test_weight_bits_and_arguments():
    m = Sites().eval()
    q = quant.quantize(m, 4, wbit=2, first_last_bit=32, maxpool="avg")
    assert type(q.conv1) is nn.Conv2d and type(q.fc) is nn.Linear and q.conv2.wbit == 2
    assert quant.quantize(m, 2, first_last_bit=4, maxpool="avg").conv1.wbit == 4
    assert type(quant.quantize(m, 2, wbit=32, maxpool="avg").conv2) is nn.Conv2d  # float hidden weights
    q = quant.quantize(m, 2, maxpool="avg")
    with torch.no_grad():
        q.conv2.wgt_alpha.fill_(1.5)
        q.relu.act_alpha.fill_(0.7)
    again = quant.quantize(q, 2)  # an already quantized model: its quantized layers are kept as they are
    assert again.conv2.wgt_alpha.item() == 1.5 and again.relu.act_alpha.item() == pytest.approx(0.7)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(again(x), q(x), rtol=0, atol=0)
    for kw, msg in ((dict(bit=1), "bit=1"), (dict(bit=2, wbit=9), "wbit=9"), (dict(bit=2, maxpool="max"), "maxpool"),
                    (dict(bit=2, alpha_init=0.0), "alpha_init")):
        with pytest.raises(ValueError, match=msg):
            quant.quantize(m, **kw)
    assert m.training is False and not any(isinstance(a, quant.QuantAct) for a in m.modules())


# ----------------------------------------------------------------------------------------- refusals
class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y * self.gate(y)
        return self.fc(y.mean((2, 3)))


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                hidden_dim=8, mlp_dim=16, num_classes=3)


@pytest.mark.parametrize("make, where", [
    (lambda: torchvision.models.efficientnet_b0(), "'features.0.2' (SiLU)"),
    (lambda: torchvision.models.mobilenet_v3_small(), "'features.0.2' (Hardswish)"),
    (lambda: torchvision.models.convnext_tiny(), "layer_norm() in 'features.0.1' (LayerNorm2d)"),
    (_tiny_vit, "'encoder.layers.encoder_layer_0.ln_1' (LayerNorm)"),
    (SE, "'gate.2' (Sigmoid)"),
    (lambda: torchvision.models.resnet18(), "'maxpool' (MaxPool2d): max-pooling"),
])
def test_refused_layers_name_path_and_type(make, where):
    m = make()
    with pytest.raises(UnsupportedLayerError) as e:
        quant.quantize(m, 2)
    msg = str(e.value)
    assert msg.startswith(where) and "\n" not in msg, msg
    assert isinstance(e.value, ValueError)


# -------------------------------------------------------------------------------------- calibration
def test_calibrate_sets_percentiles_layer_by_layer():
    """The clips and the re-estimated BN statistics equal the same procedure written out by hand."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU6(), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6),
                      nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    quant.randomize_bn(m)
    q = quant.quantize(m, 2, first_last_bit=32).eval()  # conv 0 float, conv 3 ternary
    ref = copy.deepcopy(q)
    R = ref.get_submodule
    batches = [torch.randn(4, 3, 8, 8) * 3, torch.randn(4, 3, 8, 8) * 3]
    alphas = quant.calibrate(q, [(b, None) for b in batches], percentile=90)

    def mean(v):
        return sum(v) / len(v)
    p0, mu, var, p1 = [], [], [], []
    with torch.no_grad():
        for b in batches:
            a = R("1")(R("0")(b))
            p0.append(float(torch.quantile(a.clamp_min(0).flatten(), 0.9)))
            R("2").act_alpha.fill_(min(mean(p0), 6.0))
            h = R("3")(R("2")(a))  # BN 4 follows a quantized conv: re-estimated before it runs
            mu.append(h.mean((0, 2, 3)))
            var.append(h.var((0, 2, 3)))
            R("4").running_mean.copy_(mean(mu))
            R("4").running_var.copy_(mean(var))
            p1.append(float(torch.quantile(R("4")(h).clamp_min(0).flatten(), 0.9)))
    assert alphas["2"] == pytest.approx(min(mean(p0), 6.0), rel=1e-5)
    assert alphas["5"] == pytest.approx(mean(p1), rel=1e-4)
    torch.testing.assert_close(q.get_submodule("4").running_mean, mean(mu))
    torch.testing.assert_close(q.get_submodule("4").running_var, mean(var))
    # BN 1 follows a float conv: kept with bn="auto", re-estimated with bn=True
    assert torch.equal(q.get_submodule("1").running_mean, m[1].running_mean)
    quant.calibrate(q, batches[:1], bn=True)
    torch.testing.assert_close(q.get_submodule("1").running_mean, m[0](batches[0]).mean((0, 2, 3)).detach())
    for bad in (dict(percentile=0), dict(bn="yes")):
        with pytest.raises(ValueError):
            quant.calibrate(q, batches, **bad)
    with pytest.raises(ValueError, match="no batches"):
        quant.calibrate(q, [])
    with pytest.raises(ValueError, match="QuantAct"):
        quant.calibrate(m, batches)


def test_calibrate_caps_relu6_and_restores_the_mode():
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU6(), nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        m[0].weight.fill_(10.0)
        m[0].bias.zero_()
    q = quant.quantize(m, 2).train()
    alphas = quant.calibrate(q, [torch.rand(2, 1, 4, 4) + 1])
    assert alphas["1"] == 6.0 and q.training


# ------------------------------------------------------------------------------------------ the CLI
from test_imagenet import CLASSES, _user_error, data, one_thread  # noqa: E402,F401 - shared fixtures


def _ok(tmp_path):
    return ["-b", "2", "--test-batch-size", "6", "-j", "0", "--input-size", "64", "--out", str(tmp_path / "result"),
            "--no-progress", "--loader", "torch"]


def test_cli_refuses_unsupported_archs_in_one_line(data, tmp_path, capsys, one_thread):
    from classification.imagenet import dali_main, snn as snn_script
    msg = _user_error(dali_main.main, ["-a", "efficientnet_b0", "--bit", "2"] + _ok(tmp_path) + [data], capsys)
    assert "efficientnet_b0" in msg and "'features.0.2' (SiLU)" in msg
    ckpt = str(tmp_path / "any.pth")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, ckpt)
    msg = _user_error(snn_script.main, ["-a", "mobilenet_v3_small", "--bit", "2", "-e", "--init", ckpt]
                      + _ok(tmp_path) + [data], capsys)
    assert "(Hardswish)" in msg
    assert "invalid choice" in _user_error(dali_main.main, ["-a", "resnet5"] + _ok(tmp_path) + [data], capsys)


def test_cli_torchvision_arch_chain(data, tmp_path, capsys, one_thread):
    """mobilenet_v2 through the three ImageNet scripts (train, SNN, fine-tuning), from a local state dict."""
    from classification.engine import evaluate
    from classification.imagenet import dali_main, snn as snn_script, snn_ft
    from classification import imagenet_data as D
    from classification.models import get_model
    tv = torchvision.models.mobilenet_v2(num_classes=CLASSES)
    path = str(tmp_path / "mobilenet_v2_tv.pth")
    torch.save(tv.state_dict(), path)
    base = ["-a", "mobilenet_v2", "--bit", "2"] + _ok(tmp_path) + [data]
    rec = dali_main.main(base + ["-e", "--pretrained", path, "--no-tensorboard"])
    model = get_model("mobilenet_v2", 2, num_classes=CLASSES, dataset="imagenet")
    quant.load_init(model, tv.state_dict())
    val = D.build_loader(os.path.join(data, "val"), train=False, batch_size=6, workers=0, input_size=64,
                         backend="torch")
    assert evaluate(model, val, print_result=False)["top1"] == pytest.approx(rec["top1"])
    rec = dali_main.main(base + ["--pretrained", path, "--epochs", "1", "--prof", "1", "--no-tensorboard"])
    assert rec["arch"] == "mobilenet_v2" and rec["wbit"] == 32
    rec = snn_script.main(base + ["-e"])
    assert rec["T"] == 3 and rec["layers"][0]["agreement"] == 1.0
    assert len(rec["layers"]) == sum(isinstance(a, quant.QuantAct) for a in model.modules())
    rec = snn_ft.main(base + ["--force", "--prof", "1", "--no-eval-before", "--no-tensorboard"])
    assert rec["finetuned"] and os.path.isfile(tmp_path / "result" / "imagenet" / "mobilenet_v2_2bit_ft" /
                                               "model_best.pth.tar")


def test_cli_pretrained_from_the_torch_hub_cache(data, tmp_path, capsys, one_thread, monkeypatch):
    from classification.imagenet import dali_main
    from classification.models import torchvision_models
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    argv = ["-a", "mobilenet_v2", "--bit", "4", "-e", "--pretrained", "--no-tensorboard"] + _ok(tmp_path) + [data]
    msg = _user_error(dali_main.main, argv, capsys)
    assert "torch hub cache" in msg and "network unreachable" in msg and "--pretrained FILE" in msg
    url = torchvision.models.get_model_weights("mobilenet_v2").DEFAULT.url
    (hub / "checkpoints").mkdir(parents=True)
    cached = hub / "checkpoints" / os.path.basename(url)
    torch.save(torchvision.models.mobilenet_v2(num_classes=CLASSES).state_dict(), cached)
    assert torchvision_models.weights_file("mobilenet_v2") == str(cached)
    rec = dali_main.main(argv)
    assert "--pretrained: torchvision mobilenet_v2 weights" in capsys.readouterr().out and rec["samples"] == 6


def test_chain_script_takes_a_torchvision_arch():
    import shlex
    from classification.imagenet import task
    env = dict(os.environ, DRY="1")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "imagenet_chain.sh"), "-a", "mobilenet_v2",
                        "/data/imagenet", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[len("+ "):]) for line in r.stderr.splitlines() if line.startswith("+ ")]
    kinds = {"dali_main.py": "train", "snn.py": "snn", "snn_ft.py": "ft"}
    bits = []
    for c in cmds:
        a = task.parse_args(kinds[os.path.basename(c[5])], c[6:])
        assert a.arch == "mobilenet_v2"
        bits.append(a.bit)
    assert bits[:4] == [32, 4, 3, 2] and len(cmds) == 10


def test_own_network_doc_example_runs(tmp_path, monkeypatch, single_thread):
    """docs/own-network.md's Python example runs as written."""
    import pathlib
    import re
    text = (pathlib.Path(ROOT) / "docs" / "own-network.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code.replace("/tmp/", str(tmp_path) + "/"), "own-network.md", "exec"), {"__name__": "doc"})


def test_byon_demo_runs_end_to_end(tmp_path, fake_fmnist_system, monkeypatch, capsys, single_thread):
    """The Fashion-MNIST runner (on the tiny fake data set): quantize -> calibrate -> train -> SNN."""
    import json
    from classification import byon_demo
    monkeypatch.setenv("FASHION_MNIST_DIR", fake_fmnist_system)
    out = tmp_path / "out"
    rec = byon_demo.main(["--out", str(out), "--width", "0.25", "--epochs", "1", "-b", "4", "--calib-batches", "1"])
    assert rec["T"] == 15 and len(rec["per_step_top1"]) == 15 and rec["layers"][0]["agreement"] == 1.0
    assert (rec["train_images"], rec["test_images"]) == (12, 6)
    with open(out / "summary.json") as f:
        assert json.load(f)["snn_top1"] == rec["snn_top1"]
    assert os.path.isfile(out / "model.pth")
    assert "--epochs 0" in _user_error(byon_demo.main, ["--out", str(out), "--epochs", "0"], capsys)


def test_calibrate_auto_reaches_batchnorms_behind_a_concatenation():
    """DenseNet: a BN fed by torch.cat of quantized-weight convolutions is re-estimated by bn="auto" (its float
    statistics no longer fit); one fed only by activations (the first layer's cat of the stem) is not."""
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=4).eval()
    with pytest.warns(UserWarning, match="max-pool"):
        q = quant.quantize(m, 2, maxpool="avg")
    bns = {n: b for n, b in q.named_modules() if isinstance(b, nn.BatchNorm2d)}
    before = {n: b.running_mean.clone() for n, b in bns.items()}
    quant.calibrate(q, [torch.randn(2, 3, 32, 32) for _ in range(2)])
    moved = {n for n, b in bns.items() if not torch.equal(b.running_mean, before[n])}
    assert "features.denseblock1.denselayer2.norm1" in moved and "features.transition1.norm" in moved
    assert "features.denseblock1.denselayer1.norm1" not in moved  # the stem's activations only
