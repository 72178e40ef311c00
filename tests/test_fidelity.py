"""Fine-tuning methods (``snn.finetune(method=...)``, :mod:`snn.calibrate`): each one brings a
tiny converted residual net closer to its ANN; ``method="fastsnn"`` is the original algorithm bit for bit;
the classification ablation script runs."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import snn
from common import pipeline

sys.path.insert(0, os.path.dirname(__file__))
from test_snn import TinyResNet, TinyYolo, _trained_tiny_resnet  # noqa: E402

ft = importlib.import_module("snn.finetune")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL = "b85e78a34c0e719c42b54dabe7cca26073600605"  # snn/finetune.py of this revision: the single-method reference


@pytest.fixture(scope="module")
def tiny():
    ann, batches = _trained_tiny_resnet(steps=30)
    return ann, snn.convert(ann), batches[:4], batches[8:12]


def _output_mse(ann, net, batches) -> float:
    with torch.no_grad():
        return sum(float(((net(x) - ann(x)) ** 2).mean()) for x, _ in batches) / len(batches)


@pytest.mark.parametrize("method", ft.METHODS)
def test_every_method_brings_the_snn_closer_to_its_ann(tiny, method):
    ann, net0, train, held_out = tiny
    net = copy.deepcopy(net0)
    hist = snn.finetune(ann, net, train, epochs=1, lr=1e-2, progress=False, log=lambda s: None, method=method)
    assert hist and all(h["accepted"] for h in hist)
    assert ("e2e" in method) == (hist[-1]["layer"] == "end-to-end")
    before, after = _output_mse(ann, net0, held_out), _output_mse(ann, net, held_out)
    assert after < (0.9 if method == "e2e" else 0.8) * before, (method, before, after)  # e2e alone: one short pass


def test_bias_correction_moves_the_mean_rate_error_to_zero(tiny):
    ann, net0, train, _ = tiny
    net = copy.deepcopy(net0)
    layers = [l for l in snn.spiking_layers(net) if l.tunable]
    owner = snn.calibrate.bias_owner(layers[-1])
    assert owner is not None and owner[0] is net.net.get_submodule("b2.bn2")  # not the shortcut's BN
    snn.finetune(ann, net, train, progress=False, log=lambda s: None, method="bias", bias_iters=3)
    # the last layer's per-channel mean rate error is much smaller than before
    def mean_err(n):
        site = n.ann_site("b2.act2")
        errs = []
        for x, _ in train:
            ann_act = snn.prefix_cache._ann_activation(ann, site)(x)
            rates = snn.calibrate.record_rates(n, x)["b2.act2"]
            errs.append((ann_act - rates).mean((0, 2, 3)))
        return torch.stack(errs).mean(0).abs().mean().item()
    assert mean_err(net) < 0.5 * mean_err(net0)


def test_end_to_end_with_the_generic_mse_loss(tiny):
    ann, net0, train, held_out = tiny
    net = copy.deepcopy(net0)
    hist = snn.finetune(ann, net, train, lr=1e-2, progress=False, log=lambda s: None, method="e2e",
                        e2e_loss="mse", e2e_epochs=2)
    assert hist[-1]["stage"] == "e2e" and len(hist[-1]["epochs"]) == 2
    assert _output_mse(ann, net, held_out) < _output_mse(ann, net0, held_out)


@pytest.mark.parametrize("model", ["resnet", "yolo"])
def test_rate_forward_equals_the_snn_output(tiny, model):
    """The end-to-end stage's straight-through pass has the SNN's output as its value (concat / reorg too)."""
    if model == "resnet":
        ann, net, train, _ = tiny
        x = train[0][0]
    else:
        import quant
        torch.manual_seed(0)
        ann = quant.randomize_bn(TinyYolo()).eval()
        net, x = snn.convert(ann), torch.randn(2, 3, 32, 32)
    rates = snn.calibrate.record_rates(net, x)
    assert len(rates) == len(net.neurons())
    with torch.no_grad():
        assert torch.allclose(snn.calibrate.rate_forward(net, x, rates), net(x), atol=1e-5)
    assert all(isinstance(m, snn.IFNeuron) for m in net.neurons().values())  # the neurons are put back
    assert len(net.neurons()) == len(rates)


def _original_module():
    try:
        src = subprocess.run(["git", "show", f"{ORIGINAL}:snn/finetune.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the original fine-tuner's commit is not in this checkout (no git history)")
    spec = importlib.util.spec_from_loader("snn._finetune_original", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "snn"
    exec(compile(src, "snn/finetune.py@original", "exec"), mod.__dict__)
    return mod


@pytest.mark.parametrize("cache,bn_mode", [("auto", "recalibrate"), (False, "frozen")])
def test_fastsnn_is_the_original_algorithm_bit_for_bit(tiny, cache, bn_mode):
    orig = _original_module()
    ann, _, train, held_out = tiny
    scores = iter([0.5, 0.7, 0.6, 0.9, 0.8, 1.0, 0.2, 0.3, 0.95, 1.1] * 3)  # accept and revert
    runs = []
    for fn, conv in ((orig.finetune, snn.convert), (None, pipeline.convert)):
        net = conv(ann)  # pipeline.convert: no settle given
        s = [next(scores) for _ in range(10)]
        it = iter(s)
        kw = dict(epochs=2, lr=1e-2, bn_mode=bn_mode, cache=cache, progress=False, log=lambda m: None)
        if fn is None:
            hist = pipeline.finetune(ann, net, train, score=lambda n: next(it), **kw)
        else:
            hist = fn(ann, net, train, force=False, score_fn=lambda n: next(it), **kw)
        runs.append((hist, net))
        scores = iter(s * 3)  # the same score sequence for the second run
    (h0, n0), (h1, n1) = runs
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(h0) == strip(h1)
    s0, s1 = n0.ann_state_dict(), n1.ann_state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    with torch.no_grad():
        assert all(torch.equal(n0(x), n1(x)) for x, _ in held_out)


def test_local_accept_keeps_a_layer_only_when_its_own_error_falls(tiny):
    ann, net0, train, held_out = tiny
    net = copy.deepcopy(net0)
    hist = snn.finetune(ann, net, train, epochs=2, lr=1e-2, force=False, accept="local", local_batches=2,
                        progress=False, log=lambda s: None, method="fastsnn+e2e", e2e_loss="mse")
    layers = [h for h in hist if h["layer"] != "end-to-end"]
    assert layers and any(h["accepted"] for h in layers)
    for h in layers:  # the kept state is the one with the lowest error, never above the starting one
        errs = [h["local_error_before"]] + [e["local_error"] for e in h["epochs"]]
        assert h["best_local_error"] == min(errs) and "score" not in h["epochs"][0]
        assert h["accepted"] == (min(errs) < errs[0])
    assert hist[-1]["layer"] == "end-to-end" and hist[-1]["accepted"]  # no score_fn: every e2e epoch kept
    assert _output_mse(ann, net, held_out) < 0.8 * _output_mse(ann, net0, held_out)


def test_local_accept_reverts_a_step_that_makes_the_layer_worse(tiny, monkeypatch):
    ann, net0, train, held_out = tiny
    net = copy.deepcopy(net0)
    real = ft._tune_epoch

    def harmful(layer, *a, **k):  # tune, then wreck the layer's weights
        out = real(layer, *a, **k)
        with torch.no_grad():
            for p in layer.params:
                if p.dim() > 1:
                    p.mul_(-3.0)
        return out
    monkeypatch.setattr(ft, "_tune_epoch", harmful)
    hist = snn.finetune(ann, net, train, lr=1e-2, force=False, accept="local", local_batches=2,
                        progress=False, log=lambda s: None)
    assert hist and not any(h["accepted"] for h in hist)
    s0, s1 = net0.ann_state_dict(), net.ann_state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    with pytest.raises(ValueError, match="accept="):
        snn.finetune(ann, net, train, force=False, accept="global", progress=False)


def test_bad_methods():
    ann = TinyResNet().eval()
    net = snn.convert(ann)
    with pytest.raises(ValueError, match="join distinct stages"):
        snn.finetune(ann, net, [torch.randn(2, 3, 16, 16)], method="fastsnn+magic", progress=False)
    with pytest.raises(ValueError, match="must come last"):
        snn.finetune(ann, net, [torch.randn(2, 3, 16, 16)], method="e2e+bias", progress=False)
    with pytest.raises(ValueError, match="schedule"):
        snn.finetune(ann, net, [torch.randn(2, 3, 16, 16)], schedule="step", progress=False)


def test_fidelity_script_help():
    r = subprocess.run([sys.executable, "-m", "classification.fidelity", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--methods" in r.stdout and "settle" in r.stdout


def test_fidelity_script_quick_run(tmp_path):
    """The ablation end to end on a tiny chain: methods table, settle sweep, figure, JSON; cached checkpoints."""
    from classification import fidelity
    out = fidelity.main(["--quick", "--out", str(tmp_path), "--methods", "fastsnn;fastsnn+e2e:e2e_batches=1",
                         "--settle-k", "0,1", "--no-progress"])
    assert [r["method"] for r in out["methods"]] == ["fastsnn", "fastsnn+e2e:e2e_batches=1"]
    assert out["methods"][1]["continued_from"] == "fastsnn"
    assert [s["K"] for s in out["settle"]["sweep"]][0] == 0 and os.path.exists(out["figure"])
    assert len(out["curves"]) == 4 and os.path.exists(tmp_path / "fidelity_resnet20.json")
    mtime = os.path.getmtime(out["checkpoint"])
    again = fidelity.main(["--quick", "--out", str(tmp_path), "--methods", "", "--no-settle", "--no-progress"])
    assert again["checkpoint"] == out["checkpoint"] and os.path.getmtime(out["checkpoint"]) == mtime  # not retrained


def test_fidelity_lr_scale_scales_every_stage_and_keeps_its_own_folder(tmp_path, monkeypatch):
    """--lr-scale multiplies the chain's learning rates (vgg11 diverges at 0.1) and caches in its own folder."""
    from classification import fidelity
    from classification.cifar10 import main as train_script
    calls = []

    def fake_train(argv):
        calls.append(argv)
        out, bit = argv[argv.index("--out") + 1], argv[argv.index("--bit") + 1]
        path = os.path.join(out, "fashionmnist", f"vgg11_{bit}bit", "model_best.pth.tar")
        os.makedirs(os.path.dirname(path))
        open(path, "w").close()
    monkeypatch.setattr(train_script, "main", fake_train)
    base = ["--out", str(tmp_path), "--data", str(tmp_path / "data"), "-a", "vgg11"]
    plain = fidelity.train_chain(fidelity.get_parser().parse_args(base))
    lrs = [a[a.index("--lr") + 1] for a in calls]
    assert lrs == ["0.1", "0.04", "0.04", "0.04"]
    calls.clear()
    scaled = fidelity.train_chain(fidelity.get_parser().parse_args(base + ["--lr-scale", "0.1"]))
    assert [a[a.index("--lr") + 1] for a in calls] == ["0.01", "0.004", "0.004", "0.004"]
    assert scaled != plain and "_lr0.1" in scaled


@pytest.mark.parametrize("spec, what", [("fastsnn+e2e:e2e_los=ce", "unknown option"),
                                        ("fastsnn+e2e:e2e_epochs=abc", "is not a whole number >= 1"),
                                        ("fastsnn:min_steps=0", "is not a whole number >= 1"),
                                        ("fastsnn+foo", "is not a method"), ("bias:bias_iters", "key=value")])
def test_a_bad_methods_entry_is_refused_before_the_chain_trains(tmp_path, spec, what):
    from classification import fidelity
    from common import UserError
    with pytest.raises(UserError, match=what):
        fidelity.main(["--quick", "--out", str(tmp_path / "fid"), "--no-settle", "--methods", spec])
    assert not (tmp_path / "fid").exists() or not any((tmp_path / "fid").rglob("*.pth.tar"))
