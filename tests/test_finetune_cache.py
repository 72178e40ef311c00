"""The fine-tuner's prefix cache (``snn.finetune(cache=...)``): same result as recomputing the prefixes
on the same fixed batches, frontiers that keep long skips, memory-limit fallback, "auto"."""
import copy
import importlib
import os
import sys

import pytest
import torch
import torch.nn as nn

import quant
import snn

sys.path.insert(0, os.path.dirname(__file__))
from test_snn import Stem, TinyResNet, _trained_tiny_resnet, cbr  # noqa: E402

ft = importlib.import_module("snn.finetune")  # the module (snn.finetune is also the function)


class LongSkip(nn.Module):
    """An activation read again three spiking layers later (a long residual skip through a 1x1 conv)."""

    def __init__(self, bit=2):
        super().__init__()
        self.stem = Stem(3, 8, bit)
        self.c1, self.c2, self.c3 = cbr(8, 8, bit), cbr(8, 8, bit), cbr(8, 8, bit)
        self.conv4 = quant.QuantConv2d(8, 8, 3, padding=1, bias=False, wbit=bit)
        self.bn4 = nn.BatchNorm2d(8)
        self.proj = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.act4 = quant.QuantAct(bit, 1.5)
        self.pool = nn.AvgPool2d(8)
        self.fc = quant.Linear8bit(8, 10)

    def forward(self, x):
        a1 = self.c1(self.stem(x))
        out = self.act4(self.bn4(self.conv4(self.c3(self.c2(a1)))) + self.proj(a1))
        return self.fc(torch.flatten(self.pool(out), 1))


class SharedConv(nn.Module):
    """One convolution feeding two spiking layers: tuning the second one changes the first one's output."""

    def __init__(self, bit=2):
        super().__init__()
        self.stem = Stem(3, 8, bit)
        self.conv = quant.QuantConv2d(8, 8, 3, padding=1, bias=False, wbit=bit)
        self.bn = nn.BatchNorm2d(8)
        self.act1 = quant.QuantAct(bit, 1.5)
        self.conv2 = quant.QuantConv2d(8, 8, 3, padding=1, bias=False, wbit=bit)
        self.act2 = quant.QuantAct(bit, 1.5)
        self.c3 = cbr(8, 8, bit)
        self.pool = nn.AvgPool2d(8)
        self.fc = quant.Linear8bit(8, 10)

    def forward(self, x):
        y = self.bn(self.conv(self.stem(x)))
        a = self.act1(y)
        b = self.act2(y + self.conv2(a))
        return self.fc(torch.flatten(self.pool(self.c3(a + b)), 1))


class Passes:
    """An iterable loader (no len) that counts its passes."""

    def __init__(self, batches):
        self.batches, self.n = batches, 0

    def __iter__(self):
        self.n += 1
        return iter(self.batches)


@pytest.fixture(scope="module")
def tiny():
    ann, batches = _trained_tiny_resnet(steps=10)
    return ann, snn.convert(ann), batches[:4]


def _run(ann, net, loader, **kw):
    """Fine-tune a copy of ``net``; returns (history, tuned copy, log lines)."""
    net = copy.deepcopy(net)
    logs = []
    kw = {"epochs": 2, "lr": 1e-2, "progress": False, "log": logs.append, **kw}
    return snn.finetune(ann, net, loader, **kw), net, logs


def _assert_same(a, b):
    (ha, na, _), (hb, nb, _) = a, b
    assert [h["layer"] for h in ha] == [h["layer"] for h in hb]
    for x, y in zip(ha, hb):
        assert x["accepted"] == y["accepted"] and len(x["epochs"]) == len(y["epochs"])
        for ex, ey in zip(x["epochs"], y["epochs"]):
            for key in ("loss_first", "loss_mean", "loss_last"):
                assert ey[key] == pytest.approx(ex[key], rel=1e-4, abs=1e-7), (x["layer"], key)
    sa, sb = na.ann_state_dict(), nb.ann_state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), k


def _cache_lines(logs):
    return [line for line in logs if "prefix cache" in line]


@pytest.mark.parametrize("bn_mode", ["recalibrate", "frozen"])
def test_cache_equals_recomputation_on_the_same_batches(tiny, bn_mode):
    ann, net, batches = tiny
    plain = _run(ann, net, batches, bn_mode=bn_mode, cache=False, force=True)
    cached = _run(ann, net, batches, bn_mode=bn_mode, cache=True, force=True)
    _assert_same(plain, cached)
    assert not _cache_lines(plain[2]) and len(_cache_lines(cached[2])) == 1 and "on" in _cache_lines(cached[2])[0]
    x = batches[0][0]
    with torch.no_grad():  # the tuned networks spike alike
        assert torch.allclose(plain[1](x, per_step=True), cached[1](x, per_step=True), rtol=1e-4, atol=1e-6)


def test_cache_with_accept_revert_and_layer_subset(tiny):
    """Reverted layers and untuned layers in between: the next layer's trains come from the kept state."""
    ann, net, batches = tiny

    def scores():
        it = iter([0.5, 0.6, 0.4, 0.3, 0.2, 0.7, 0.1])  # b1.act1 kept at ep 1, b1.act2 reverted
        return lambda n: next(it)
    kw = dict(force=False, layers=["b1.act1", "b1.act2", "b2.act2"], epochs=2)
    plain = _run(ann, net, batches, score_fn=scores(), cache=False, **kw)
    cached = _run(ann, net, batches, score_fn=scores(), cache=True, **kw)
    assert [h["accepted"] for h in plain[0]] == [True, False, True]
    _assert_same(plain, cached)


def test_prefix_is_evaluated_once_per_batch(tiny):
    """O(L): the SNN's stem (read only through the frontier) runs once per batch, plus the dry run that
    sizes the frontier, instead of once per batch, layer and epoch."""
    ann, net, batches = tiny
    for cache, expect in ((False, 4 * 2 * len(batches)), (True, len(batches) + 1)):
        tuned = copy.deepcopy(net)
        calls = []
        tuned.net.stem.conv.register_forward_hook(lambda m, i, o: calls.append(1))
        snn.finetune(ann, tuned, batches, epochs=2, progress=False, log=lambda s: None, cache=cache)
        assert len(calls) == expect, cache


def _small(model_cls, seed):
    """An untrained model with plausible BN, its SNN, 3 batches of 8x8 images, the tunable layers."""
    torch.manual_seed(0)
    ann = quant.randomize_bn(model_cls())
    net = snn.convert(ann)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
    return ann, net, batches, [layer for layer in snn.spiking_layers(net) if layer.tunable]


def test_long_skip_stays_in_the_frontier():
    ann, net, batches, todo = _small(LongSkip, 1)
    assert [layer.name for layer in todo] == ["c1.2", "c2.2", "c3.2", "act4"]
    assert [n.name for n in todo[3].inputs] == ["c1_2", "c3_2"]
    frontier = ft._Frontier(net.net, [layer.inputs for layer in todo], ft._changed_by(net.net, todo))
    skip = todo[3].inputs[0]
    assert [skip in keep for keep in frontier.keep] == [False, True, True, True]  # kept from c1's new output on
    assert [sorted(n.name for n in keep) for keep in frontier.keep] == [
        ["stem_act"], ["c1_2"], ["c1_2", "c2_2"], ["c1_2", "c3_2"]]
    _assert_same(_run(ann, net, batches, cache=False), _run(ann, net, batches, cache=True))


def test_values_changed_by_a_later_layer_are_not_cached():
    ann, net, batches, todo = _small(SharedConv, 2)
    assert [layer.name for layer in todo] == ["act1", "act2", "c3.2"]
    changes = ft._changed_by(net.net, todo)
    assert changes[todo[1].inputs[-1]] == 1  # act1's trains depend on the conv that act2 tunes
    _assert_same(_run(ann, net, batches, cache=False, lr=0.1), _run(ann, net, batches, cache=True, lr=0.1))


def test_memory_limit_too_small_falls_back_to_recomputation(tiny):
    ann, net, batches = tiny
    plain = _run(ann, net, batches, cache=False)
    small = _run(ann, net, batches, cache=True, cache_mb=1e-3)
    lines = _cache_lines(small[2])
    assert len(lines) == 1 and "off" in lines[0] and "same batches" in lines[0]
    _assert_same(plain, small)


def test_auto():
    ann, batches = _trained_tiny_resnet(steps=1)
    net = snn.convert(ann)
    batches = batches[:3]
    plain = _run(ann, net, batches, cache=False, epochs=1)
    # a list: a fixed sequence, cached
    assert "on" in _cache_lines(_run(ann, net, batches, cache="auto", epochs=1)[2])[0]
    # an unbounded iterable: a fresh pass per layer-epoch, as without the cache
    loader = Passes(batches)
    out = _run(ann, net, loader, cache="auto", epochs=1)
    assert not _cache_lines(out[2]) and loader.n == 4
    _assert_same(plain, out)
    # bounded by max_batches: drawn once, cached
    loader = Passes(batches + batches)
    out = _run(ann, net, loader, cache="auto", epochs=1, max_batches=3)
    assert "on" in _cache_lines(out[2])[0] and loader.n == 1
    _assert_same(plain, out)
    # ... unless the frontier does not fit: the pass begun for the estimate is the first layer's
    loader = Passes(batches + batches)
    out = _run(ann, net, loader, cache="auto", epochs=1, max_batches=3, cache_mb=1e-3)
    lines = _cache_lines(out[2])
    assert len(lines) == 1 and "off" in lines[0] and "same batches" not in lines[0] and loader.n == 4
    _assert_same(plain, out)


def test_bad_cache_value():
    net = snn.convert(quant.randomize_bn(TinyResNet()))
    with pytest.raises(ValueError, match="cache="):
        snn.finetune(TinyResNet(2).eval(), net, [], cache="yes", progress=False)


def test_ft_cache_flag():
    from classification.cifar10 import snn_ft
    from classification.workflow import FT_CACHE
    parse = snn_ft.get_parser().parse_args
    assert [FT_CACHE[parse(a).ft_cache] for a in ([], ["--ft-cache", "on"], ["--ft-cache", "off"])] == [
        "auto", True, False]
