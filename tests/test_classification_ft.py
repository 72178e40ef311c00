"""snn_ft.py --method (the fine-tuning stages of snn.finetune) and the classification metric / figures
(classification.metrics, classification.plots), on the tiny fake CIFAR-10 of conftest."""
import json
import os

import pytest
import torch

from classification import workflow
from classification.cifar10 import main as train_script
from classification.cifar10 import snn_ft as ft_script
from classification.cifar10.task import TASK
from common import dist, run_cli
from common.checkpoint import BEST

LAYERS = "layer1.0.*"


def _base(data, out, *extra):
    return ["--data", data, "--out", str(out), "-b", "4", "--test-batch-size", "4", "-j", "0",
            "--train-subset", "8", "--val-subset", "4", "--no-progress", "--seed", "0", "-a", "resnet20",
            "--bit", "2", *extra]


@pytest.fixture(scope="module")
def ann2(fake_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann2")
    train_script.main(_base(fake_cifar, out, "--epochs", "1", "--max-iters", "1", "--no-tensorboard"))
    return str(out / "resnet20_2bit" / BEST)


def _ft_argv(fake_cifar, out, init, *extra):
    return _base(fake_cifar, out, "--init", init, "-n", "1", "--force", "--ft-layers", LAYERS,
                 "--no-eval-before", "--no-tensorboard", *extra)


def test_method_fastsnn_is_snn_finetune_unchanged(ann2, fake_cifar, tmp_path):
    """--method fastsnn: the same tuned weights, bit for bit, as snn.finetune(method="fastsnn") called
    directly with the script's settings (seed, loader, lr, momentum, wd, BN mode, layers)."""
    import snn
    argv = _ft_argv(fake_cifar, tmp_path, ann2, "--method", "fastsnn")
    rec = ft_script.main(argv)
    ck = torch.load(tmp_path / "resnet20_2bit_ft_fastsnn" / BEST, weights_only=True)
    assert ck["method"] == "fastsnn" and ck["method_options"] == {} and rec["method"] == "fastsnn"
    with open(tmp_path / "resnet20_2bit_ft_fastsnn" / "metrics_snn_ft_signed_T3.json") as f:
        assert json.load(f)["method"] == "fastsnn"
    assert [h["layer"] for h in rec["finetune"]] == ["layer1.0.act1", "layer1.0.act2"]

    args = ft_script.get_parser().parse_args(argv)
    args.run_kind = "ft"
    workflow.setup_run(args, TASK)
    with dist.session(args.device, args.local_rank) as ctx:
        dist.seed_all(0, ctx.rank)
        data = TASK.build_data(args, ctx)
        ann, _ = workflow.load_trained(args, TASK, data, ctx.device, ann2, "--init", "")
        ann.eval()
        net = snn.convert(ann)
        snn.finetune(ann, net, data.train_loader, epochs=1, lr=1e-3, momentum=0.9,
                     weight_decay=ann.ft_weight_decay, bn_mode=ann.ft_bn_mode, force=True, progress=False,
                     layers=["layer1.0.act1", "layer1.0.act2"], method="fastsnn", log=lambda s: None)
    mine = net.ann_state_dict()
    assert set(mine) == set(ck["state_dict"])
    for k, v in mine.items():
        assert torch.equal(v, ck["state_dict"][k]), k
    src = torch.load(ann2, weights_only=True)["state_dict"]
    assert not torch.equal(mine["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])  # it did tune


def test_default_method_and_options_recorded(ann2, fake_cifar, tmp_path, capsys):
    rec = ft_script.main(_ft_argv(fake_cifar, tmp_path, ann2, "--e2e-batches", "1", "--e2e-lr", "0.01"))
    out = capsys.readouterr().out
    assert "method fastsnn+e2e (e2e: 1 batches x 3 epoch(s), lr 0.01, loss ce)" in out
    assert rec["method"] == "fastsnn+e2e" and rec["finetune"][-1]["layer"] == "end-to-end"
    opts = {"min_steps": 50, "e2e_batches": 1, "e2e_epochs": 3, "e2e_lr": 0.01, "e2e_loss": "ce"}
    assert [e["epoch"] for e in rec["finetune"][-1]["epochs"]] == [1, 2, 3]
    assert rec["method_options"] == opts
    ck = torch.load(tmp_path / "resnet20_2bit_ft" / BEST, weights_only=True)
    assert ck["method"] == "fastsnn+e2e" and ck["method_options"] == opts


def test_local_accept_flag(ann2, fake_cifar, tmp_path, capsys):
    argv = [a for a in _ft_argv(fake_cifar, tmp_path, ann2, "--method", "fastsnn", "--ft-accept", "local",
                                "--local-batches", "1", "--score-batches", "1") if a != "--force"]
    rec = ft_script.main(argv)
    out = capsys.readouterr().out
    assert "layer-wise steps kept if the layer's error on 1 batches falls" in out
    assert "kept only if the layer's own rate error on 1 batches falls" in out
    assert rec["method_options"] == {"accept": "local", "local_batches": 1}
    assert all("local_error_before" in h and "score" not in h["epochs"][0] for h in rec["finetune"])


def test_accept_auto_is_the_original_test_for_the_original_method(tmp_path):
    """--ft-accept auto (default): the layer-wise steps of the default method are judged locally; --method fastsnn
    keeps the original's whole-SNN score (so its options stay empty: the original algorithm); --force needs none."""
    parse = lambda *a: ft_script.get_parser().parse_args(["--data", str(tmp_path), *a])  # noqa: E731
    e2e = {"min_steps": 50, "e2e_batches": None, "e2e_epochs": 3, "e2e_lr": None, "e2e_loss": "ce"}
    assert workflow.method_options(parse()) == {"accept": "local", "local_batches": 8, **e2e}
    assert workflow.method_options(parse("--force")) == e2e
    assert workflow.method_options(parse("--method", "fastsnn")) == {}
    assert workflow.method_options(parse("--method", "fastsnn", "--ft-accept", "local", "--local-batches", "2")) == \
        {"accept": "local", "local_batches": 2}
    assert workflow.method_options(parse("--ft-accept", "score")) == e2e
    assert workflow.method_options(parse("--method", "bias+fastsnn"))["accept"] == "local"


@pytest.mark.parametrize("extra, needle", [
    (["--method", "fastsnn+foo"], "--method 'fastsnn+foo' is not a method"),
    (["--method", "fastsnn+fastsnn"], "is not a method"),
    (["--method", "e2e+fastsnn"], "e2e must come last"),
    (["--e2e-batches", "0"], "--e2e-batches 0 must be at least 1"),
    (["--e2e-epochs", "0"], "--e2e-epochs 0 must be at least 1"),
    (["--e2e-lr", "-1"], "--e2e-lr -1.0 must not be negative"),
    (["--local-batches", "0"], "--local-batches 0 must be at least 1"),
    (["--min-steps", "-1"], "--min-steps -1 must not be negative"),
])
def test_bad_method_is_one_line_error(extra, needle, fake_cifar, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(ft_script.main, _ft_argv(fake_cifar, tmp_path, str(tmp_path / "none.pth"), *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0] and "Traceback" not in err
    assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ metric, figures
def test_accuracy_topk_and_clamp():
    from classification import metrics
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    y = torch.tensor([1, 2, 2, 0])
    assert metrics.correct_topk(out, y, (1, 2, 5)) == [2.0, 3.0, 4.0]  # k=5 clamps to 3 classes
    assert metrics.accuracy(out, y, (1,)) == [50.0]
    assert metrics.format_acc(91.234, 99.5) == " * Acc@1 91.234 Acc@5 99.500"
    m = metrics.TopK.factory((1, 2))()
    m.update(out[:2], (None, y[:2]))
    m.update(out[2:], (None, y[2:]))
    assert m.compute() == {"top1": 50.0, "top2": 75.0, "samples": 4}


def test_snn_metrics_figures(tmp_path):
    from classification import plots
    layers = [{"name": f"l{i}", "agreement": 1 - i / 10, "firing_rate": i / 20} for i in range(5)]
    m = {"arch": "a", "bit": 2, "T": 3, "neuron": "signed", "per_step_top1": [1, 2, 3], "ann_top1": 3,
         "layers": layers}
    ps = plots.plot_snn_metrics(m, str(tmp_path / "metrics_snn_signed_T3.json"))
    assert [os.path.basename(p) for p in ps] == ["metrics_snn_signed_T3_acc_vs_t.png",
                                                 "metrics_snn_signed_T3_layers.png"]
    p = plots.plot_accuracy_vs_t({"signed": [50, 60, 70]}, str(tmp_path / "a.png"), {"ANN": 72.0})
    for path in ps + [p]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, needle", [(["--ft-method", "nope"], "--ft-method 'nope' is not a method"),
                                          (["--settle", "-1"], "--settle -1 must not be negative"),
                                          (["--e2e-batches", "0"], "--e2e-batches 0 must be at least 1")])
def test_demo_bad_flags_fail_before_the_first_step(argv, needle, tmp_path, capsys):
    from classification import demo
    with pytest.raises(SystemExit) as e:
        run_cli(demo.main, argv + ["--out", str(tmp_path), "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not os.listdir(tmp_path)


def test_imagenet_snn_ft_has_the_method_flags(tmp_path):
    from classification.imagenet import task
    a = task.parse_args("ft", ["-a", "resnet18", "--bit", "2", str(tmp_path)])
    assert (a.method, a.e2e_batches, a.e2e_epochs, a.e2e_lr, a.e2e_loss) == ("fastsnn+e2e", None, 3, None, "ce")
    a = task.parse_args("ft", ["-a", "resnet18", "--method", "bias+fastsnn", "--e2e-lr", "0.01", str(tmp_path)])
    assert a.method == "bias+fastsnn" and workflow.method_options(a) == {"accept": "local", "local_batches": 8,
                                                                       "min_steps": 50}
    with pytest.raises(Exception, match="is not a method"):
        workflow.check_method("fastsnn+nope")
