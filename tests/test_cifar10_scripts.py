"""classification/cifar10/{main,snn,snn_ft}.py end to end on a fake CIFAR-10 (a few images, CPU).

Most runs call ``main(argv)`` in-process (fast); a few go through the real command line
(subprocess, torchrun) to prove the scripts work as launched.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from classification import engine
from common import UserError
from classification.cifar10 import main as train_script
from classification.cifar10 import snn as snn_script
from classification.cifar10 import snn_ft as ft_script
from classification.models import CIFAR_ARCHS
from common import run_cli
from common.checkpoint import BEST, CHECKPOINT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "classification", "cifar10")
PY = sys.executable
SNN_KEYS = {"arch", "bit", "T", "neuron", "top1", "top5", "ann_top1", "per_step_top1", "layers", "sops",
            "ann_macs", "energy"}
# fine-tune only a few layers of the deep nets (the fine-tuner's cost grows with depth squared)
FT_LAYERS = {"vgg11": "features.1.act,classifier.1.act", "resnet18": "layer1.0.*,layer2.0.act2",
             **{a: "layer1.0.*,layer3.0.act2" for a in ("resnet32", "resnet44", "resnet56", "resnet110")}}


def _base(data, out, *extra):
    return ["--data", data, "--out", str(out), "-b", "4", "--test-batch-size", "4", "-j", "0",
            "--train-subset", "8", "--val-subset", "4", "--epochs", "1", "--no-progress", "--no-tensorboard",
            "--seed", "0", *extra]


def _only(script, argv):
    """``argv`` without the flags ``script`` does not have (snn.py / snn_ft.py list only the flags they
    use; the tests share one argument list between the three scripts)."""
    known = script.get_parser()._option_string_actions
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-") and tok.split("=")[0] not in known:
            i += 2 if "=" not in tok and i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        out.append(tok)
        i += 1
    return out


def _snn(argv):
    return snn_script.main(_only(snn_script, argv))


def _ft(argv):
    return ft_script.main(_only(ft_script, argv))


def _json(path):
    with open(path) as f:
        return json.load(f)


def _check_snn_metrics(rec, T, neuron):
    assert SNN_KEYS <= set(rec)
    assert rec["T"] == T and rec["neuron"] == neuron and len(rec["per_step_top1"]) == T
    assert rec["per_step_top1"][-1] == rec["top1"]
    assert rec["layers"][0]["agreement"] == 1.0 and rec["layers"][0]["mean_abs_error"] == 0.0
    assert rec["sops"] > 0 and rec["ann_macs"] > 0 and rec["energy"]["snn_uJ"] > 0


# ------------------------------------------------------------------------------------------ every arch
@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_every_script_runs_for_every_arch(arch, fake_cifar, tmp_path):
    base = _base(fake_cifar, tmp_path, "-a", arch, "--bit", "2", "--max-iters", "1")
    rec = train_script.main(base)
    run = tmp_path / f"{arch}_2bit"
    assert {CHECKPOINT, BEST, "metrics_ann.json", "history.json"} <= set(os.listdir(run))
    assert rec["T"] is None and rec["neuron"] is None and 0 <= rec["top1"] <= 100
    s = _snn(base)
    _check_snn_metrics(s, 3, "signed")
    assert os.path.exists(run / "metrics_snn_signed_T3.json")
    layers = ["--ft-layers", FT_LAYERS[arch]] if arch in FT_LAYERS else []
    f = _ft(base + ["--force", "--no-eval-before", "-n", "1"] + layers)
    assert f["finetuned"] and f["finetune"] and all(h["accepted"] for h in f["finetune"])
    ck = torch.load(tmp_path / f"{arch}_2bit_ft" / BEST, weights_only=True)
    assert ck["snn_finetuned"] is True and ck["arch"] == arch and ck["T"] == 3 and ck["neuron"] == "signed"


# ------------------------------------------------------------------------------ the original's chain
@pytest.fixture(scope="module")
def chain(fake_cifar, tmp_path_factory):
    """resnet20 trained 32 -> 4 -> 3 -> 2 bits with --init, 2 epochs at 32 bits."""
    out = tmp_path_factory.mktemp("chain")
    recs = {32: train_script.main(_base(fake_cifar, out, "-a", "resnet20", "--bit", "32", "--wd", "5e-4",
                                        "--epochs", "2", "--plot", "--tensorboard"))}
    for bit, prev, wd in ((4, 32, "1e-4"), (3, 4, "1e-4"), (2, 3, "3e-5")):
        recs[bit] = train_script.main(_base(fake_cifar, out, "-a", "resnet20", "--bit", str(bit), "--wd", wd,
                                            "--lr", "4e-2", "--init", str(out / f"resnet20_{prev}bit" / BEST)))
    return out, recs


def test_chain_outputs(chain):
    out, recs = chain
    for bit in (32, 4, 3, 2):
        run = out / f"resnet20_{bit}bit"
        ck = torch.load(run / CHECKPOINT, weights_only=True)
        assert ck["bit"] == bit and ck["arch"] == "resnet20" and isinstance(ck["args"], dict)
        assert {"optimizer", "scheduler", "history", "best_acc1", "state_dict"} <= set(ck)
        m = _json(run / "metrics_ann.json")
        assert m["bit"] == bit and m["T"] is None and m["top1"] == recs[bit]["top1"]
    assert os.path.exists(out / "resnet20_32bit" / "metrics_ann_curves.png")
    assert any(f.startswith("events") for f in os.listdir(out / "resnet20_32bit" / "tb"))
    h = _json(out / "resnet20_32bit" / "history.json")["history"]
    assert [e["epoch"] for e in h] == [1, 2] and h[1]["lr"] == pytest.approx(0.01)  # x0.1 at 50 %


def test_init_loads_the_previous_stage(chain, fake_cifar, tmp_path):
    out, _ = chain
    src = torch.load(out / "resnet20_3bit" / BEST, weights_only=True)["state_dict"]
    # lr 0: the new 2-bit run keeps the 3-bit weights and clips exactly
    train_script.main(_base(fake_cifar, tmp_path, "-a", "resnet20", "--bit", "2", "--lr", "0", "--wd", "0",
                            "--init", str(out / "resnet20_3bit" / BEST), "--max-iters", "1"))
    got = torch.load(tmp_path / "resnet20_2bit" / BEST, weights_only=True)["state_dict"]
    for k in ("layer1.0.conv1.weight", "layer2.1.act2.act_alpha", "fc.weight"):
        assert torch.equal(got[k], src[k]), k


def test_snn_signed_and_unsigned(chain, fake_cifar):
    out, recs = chain
    for bit, T in ((3, 7), (2, 3)):
        base = _base(fake_cifar, out, "-a", "resnet20", "--bit", str(bit), "-e")
        s, u = _snn(base), _snn(base + ["-u"])
        _check_snn_metrics(s, T, "signed")
        _check_snn_metrics(u, T, "unsigned")
        assert s["ann_top1"] == u["ann_top1"] == recs[bit]["top1"]  # same ANN, same test images
        for n in ("signed", "unsigned"):
            path = out / f"resnet20_{bit}bit" / f"metrics_snn_{n}_T{T}.json"
            assert _json(path)["neuron"] == n
        # T override
        assert _snn(base + ["--T", "5", "--chunk", "2"])["T"] == 5
    # settle steps (signed only): per-step top-1 over T + K steps; -u --settle is a one-line error
    plain = _json(out / "resnet20_2bit" / "metrics_snn_signed_T3.json")
    st = _snn(_base(fake_cifar, out, "-a", "resnet20", "--bit", "2", "--settle", "4"))
    assert st["T"] == 3 and len(st["per_step_top1"]) == 7 and st["settle"] == 4
    # its own metrics file: the plain signed one (no --settle: settle 0, T steps) is left as it was
    assert _json(out / "resnet20_2bit" / "metrics_snn_signed_T3_settle4.json")["settle"] == 4
    after = _json(out / "resnet20_2bit" / "metrics_snn_signed_T3.json")
    assert after == plain and after["settle"] == 0 and len(after["per_step_top1"]) == 3
    with pytest.raises(UserError, match="--settle needs signed neurons"):
        _snn(_base(fake_cifar, out, "-a", "resnet20", "--bit", "2", "--settle", "4", "-u"))


def test_metrics_out_and_plots(chain, fake_cifar, tmp_path):
    out, _ = chain
    dest = tmp_path / "m" / "snn.json"
    _snn(_base(fake_cifar, out, "-a", "resnet20", "--bit", "2", "--metrics-out", str(dest), "--plot"))
    assert _json(dest)["bit"] == 2
    assert os.path.exists(tmp_path / "m" / "snn_acc_vs_t.png") and os.path.exists(tmp_path / "m" / "snn_layers.png")


def test_main_evaluate_flag(chain, fake_cifar):
    out, recs = chain
    rec = train_script.main(_base(fake_cifar, out, "-a", "resnet20", "--bit", "2", "-e"))
    assert rec["top1"] == recs[2]["top1"] and rec["neuron"] is None and rec["ann_macs"] > 0


def test_snn_ft_force_then_reload(chain, fake_cifar, tmp_path):
    out, _ = chain
    init = str(out / "resnet20_2bit" / BEST)
    base = _base(fake_cifar, tmp_path, "-a", "resnet20", "--bit", "2", "--init", init)
    f = _ft(base + ["-n", "2", "--force", "--ft-layers", "layer1.*", "--e2e-batches", "1"])
    # the default method fastsnn+e2e: the layer-wise stage, then one end-to-end entry
    assert [h["layer"] for h in f["finetune"]] == [f"layer1.{b}.act{i}" for b in range(3) for i in (1, 2)] + \
        ["end-to-end"]
    assert f["method"] == "fastsnn+e2e" and f["method_options"]["e2e_batches"] == 1
    assert all(len(h["epochs"]) == 2 for h in f["finetune"][:-1])  # -n honoured
    assert f["before"]["top1"] is not None and f["bn_mode"] == "recalibrate" and f["weight_decay"] == 1e-4
    path = tmp_path / "resnet20_2bit_ft" / "metrics_snn_ft_signed_T3.json"
    assert _json(path)["finetune"][0]["accepted"] is True
    # snn.py accepts the fine-tuned checkpoint and reproduces its accuracy exactly
    again = _snn(base[:-2] + ["--init", str(tmp_path / "resnet20_2bit_ft" / BEST)])
    assert again["finetuned"] and again["top1"] == f["top1"] and again["per_step_top1"] == f["per_step_top1"]
    # the same spike trains (agreement differs: there the reference ANN carries the tuned weights)
    assert [l["firing_rate"] for l in again["layers"]] == [l["firing_rate"] for l in f["layers"]]
    assert os.path.exists(tmp_path / "resnet20_2bit_ft" / "metrics_snn_signed_T3.json")
    # snn_ft -e: the SNN on the test set (not the ANN on the training set)
    ev = _ft(base[:-2] + ["--init", str(tmp_path / "resnet20_2bit_ft" / BEST), "-e"])
    assert ev["top1"] == f["top1"] and ev["samples"] == 4 and ev["T"] == 3


def test_snn_ft_without_force_scores_on_train_set(fake_cifar, tmp_path):
    base = _base(fake_cifar, tmp_path, "-a", "alex", "--bit", "2", "--max-iters", "1")
    train_script.main(base)
    f = _ft(base + ["--score-batches", "1", "--no-eval-before", "-u", "--ft-accept", "score"])
    assert f["neuron"] == "unsigned" and f["bn_mode"] == "frozen" and f["weight_decay"] == 5e-4  # alex defaults
    for h in f["finetune"]:
        assert "score" in h["epochs"][0] and "best_score" in h
    # the default (--ft-accept auto): the layers judged by their own error, the end-to-end epochs by the score
    f = _ft(base + ["--score-batches", "1", "--no-eval-before", "-u", "--local-batches", "1", "--fresh"])
    *layers, e2e = f["finetune"]
    assert layers and all("local_error" in h["epochs"][0] and "score" not in h["epochs"][0] for h in layers)
    assert e2e["layer"] == "end-to-end" and all("score" in ep for ep in e2e["epochs"]) and "best_score" in e2e


def test_weight_bits_follow_the_checkpoint(fake_cifar, tmp_path):
    base = _base(fake_cifar, tmp_path, "-a", "resnet20", "--bit", "2", "--max-iters", "1")
    train_script.main(base + ["--wbit", "32"])
    s = _snn(base)  # no --wbit: the checkpoint's float weights are used
    assert s["wbit"] == 32 and s["layers"][0]["agreement"] == 1.0


def test_other_datasets_through_the_scripts(fake_folder, tmp_path):
    base = _base(fake_folder, tmp_path / "f", "-a", "resnet20", "--bit", "2", "--max-iters", "1", "--dataset", "folder")
    rec = train_script.main(base)
    assert rec["num_classes"] == 3 and rec["dataset"] == "folder"
    assert _snn(base)["num_classes"] == 3
    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    for name, n in (("train", 8), ("test", 4)):
        with open(c100 / name, "wb") as f:
            pickle.dump({"data": np.zeros((n, 3072), np.uint8), "fine_labels": list(range(n))}, f)
    rec = train_script.main(_base(str(tmp_path / "c100"), tmp_path / "o", "-a", "alex", "--bit", "2", "-ct", "100",
                                  "--max-iters", "1"))
    assert rec["dataset"] == "cifar100" and rec["num_classes"] == 100


def test_start_epoch_sets_the_schedule(fake_cifar, tmp_path):
    train_script.main(_base(fake_cifar, tmp_path, "-a", "resnet20", "--bit", "32", "--epochs", "4",
                            "--start-epoch", "3", "--lr", "0.1", "--max-iters", "1"))
    h = _json(tmp_path / "resnet20_32bit" / "history.json")["history"]
    assert [e["epoch"] for e in h] == [4] and h[0]["lr"] == pytest.approx(0.001)  # past 2 and 3


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_interrupted_run(fake_cifar, tmp_path, monkeypatch):
    base = _base(fake_cifar, tmp_path, "-a", "resnet20", "--bit", "32", "--epochs", "2", "--lr", "0.05")
    real, calls = engine.train_one_epoch, []

    def dies_in_epoch_2(*a, **k):
        calls.append(a[4])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second epoch
        return real(*a, **k)
    monkeypatch.setattr(engine, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_script.main(base)
    ck1 = torch.load(tmp_path / "resnet20_32bit" / CHECKPOINT, weights_only=True)
    assert ck1["epoch"] == 1 and len(ck1["history"]) == 1
    monkeypatch.setattr(engine, "train_one_epoch", real)
    rec = train_script.main(base + ["--resume", "auto"])
    ck2 = torch.load(tmp_path / "resnet20_32bit" / CHECKPOINT, weights_only=True)
    assert ck2["epoch"] == 2 and [h["epoch"] for h in ck2["history"]] == [1, 2]
    assert ck2["history"][0] == ck1["history"][0]
    assert ck2["history"][1]["lr"] == pytest.approx(0.005)  # schedule restored: x0.1 from epoch 2
    assert rec["epochs"] == 2
    # resuming a finished run trains nothing and rewrites the metrics
    again = train_script.main(base + ["--resume", str(tmp_path / "resnet20_32bit" / CHECKPOINT)])
    assert again["top1"] == rec["top1"]


# ------------------------------------------------------------------------------------------ bad input
def _bad_cases(data, ckpts, tmp):
    corrupt = tmp / "corrupt.pth.tar"
    corrupt.write_bytes(os.urandom(500))
    common = _base(data, tmp / "bad")
    return {
        "unknown arch": (train_script, ["-a", "resnet7"] + common, "invalid choice"),
        "bad bit": (train_script, ["--bit", "7"] + common, "invalid choice"),
        "bad batch size": (train_script, common + ["-b", "0"], "--batch-size"),
        "missing data folder": (train_script, common + ["--dataset", "folder", "--data", str(tmp / "nope")],
                                "does not exist"),
        "missing cifar": (train_script, common + ["--data", str(tmp / "empty"), "--no-download"],
                          "cifar-10-batches-py"),
        "missing init": (train_script, common + ["--init", str(tmp / "none.pth")], "does not exist"),
        "corrupt init": (snn_script, common + ["--init", str(corrupt)], "corrupt"),
        "init of another arch": (snn_script, common + ["-a", "alex", "--init", ckpts["resnet20"]], "trained as --arch resnet20, not --arch alex"),
        "mismatched raw state dict": (train_script, common + ["-a", "alex", "--init", ckpts["raw"]],
                                      "does not match the model"),
        "snn of wrong bit": (snn_script, common + ["--bit", "3", "--init", ckpts["resnet20"]], "2-bit model"),
        "snn of a float ANN": (snn_script, common + ["--init", ckpts["raw32"]], "no activation clips"),
        "default init missing": (snn_script, common + ["-a", "vgg11"], "does not exist"),
        "-u on 32-bit": (snn_script, common + ["--bit", "32", "-u"], "full-precision"),
        "ft -u on 32-bit": (ft_script, common + ["--bit", "32", "-u"], "full-precision"),
        "bad T": (snn_script, common + ["--init", ckpts["resnet20"], "--T", "0"], "--T 0 must be at least 1"),
        "bad ft layers": (ft_script, common + ["--init", ckpts["resnet20"], "--ft-layers", "nope*"], "matches none"),
        "snn of other weight bits": (snn_script, common + ["--init", ckpts["raw_w32"]], "--wbit"),
        "resume without state": (train_script, common + ["--bit", "2", "--resume", ckpts["raw2"]], "without training"),
        "NaN loss": (train_script, common + ["--bit", "32", "--lr", "1e38", "--train-subset", "16"],
                     "loss became NaN at epoch 1 iter"),
    }


@pytest.fixture(scope="module")
def bad_ckpts(fake_cifar, tmp_path_factory):
    from classification.models import get_model
    out = tmp_path_factory.mktemp("ckpts")
    train_script.main(_base(fake_cifar, out, "-a", "resnet20", "--bit", "2", "--max-iters", "1"))
    sd2 = torch.load(out / "resnet20_2bit" / BEST, weights_only=True)["state_dict"]
    torch.save(sd2, out / "raw2.pth")
    torch.save(get_model("resnet20", bit=32).state_dict(), out / "raw32.pth")
    torch.save(get_model("resnet20", bit=2, wbit=32).state_dict(), out / "raw_w32.pth")
    return {"raw_w32": str(out / "raw_w32.pth"), "resnet20": str(out / "resnet20_2bit" / BEST), "raw": str(out / "raw2.pth"),
            "raw2": str(out / "raw2.pth"), "raw32": str(out / "raw32.pth")}


@pytest.mark.parametrize("case", ["unknown arch", "bad bit", "bad batch size", "missing data folder", "missing cifar",
                                  "missing init", "corrupt init", "init of another arch", "mismatched raw state dict",
                                  "snn of wrong bit", "snn of a float ANN", "default init missing", "-u on 32-bit",
                                  "ft -u on 32-bit", "bad T", "bad ft layers", "snn of other weight bits",
                                  "resume without state", "NaN loss"])
def test_bad_input_is_one_line_error(case, fake_cifar, bad_ckpts, tmp_path, capsys):
    script, argv, needle = _bad_cases(fake_cifar, bad_ckpts, tmp_path)[case]
    argv = _only(script, argv) if script is not train_script else argv
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(script.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0] and " — " in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ real command lines
def _run(args, cwd, timeout=300, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cli_bad_arch_from_repo_root(tmp_path):
    r = _run([PY, "classification/cifar10/main.py", "--arch", "nope", "--out", str(tmp_path)], ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_cli_seed_style_relative_defaults(fake_cifar, tmp_path):
    """``python snn.py --arch ... -e -u`` with data/ and result/ relative to the working directory, the
    script's folder (which holds snn.py) first on sys.path -- the snn package must still be found."""
    shutil.copytree(fake_cifar, tmp_path / "data")
    common = ["-b", "4", "-j", "0", "--train-subset", "8", "--val-subset", "4", "--no-progress"]
    r = _run([PY, os.path.join(SCRIPTS, "main.py"), "--arch", "alex", "--bit", "2", "-id", "0", "--wd", "1e-4",
              "--epochs", "1", "--max-iters", "1"] + common, tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "result" / "alex_2bit" / BEST)
    r = _run([PY, os.path.join(SCRIPTS, "snn.py"), "--arch", "alex", "--bit", "2", "-id", "0", "-e", "-u",
              "--init", "result/alex_2bit/model_best.pth.tar"] + common, tmp_path)
    assert r.returncode == 0, r.stderr
    assert " * Acc@1 " in r.stdout
    assert _json(tmp_path / "result" / "alex_2bit" / "metrics_snn_unsigned_T3.json")["neuron"] == "unsigned"
    r = _run([PY, os.path.join(SCRIPTS, "snn_ft.py"), "--arch", "alex", "--bit", "2", "-n", "1", "--force",
              "--init", "result/alex_2bit/model_best.pth.tar", "--ft-layers", "features.1.act"] + common, tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "result" / "alex_2bit_ft" / BEST)


def test_torchrun_two_processes(fake_cifar, tmp_path):
    """DDP on the CPU (gloo): training and SNN evaluation with 2 processes; counts are exact."""
    common = ["--data", fake_cifar, "--out", str(tmp_path), "-b", "4", "-j", "0", "--train-subset", "8",
              "--val-subset", "5", "--no-progress", "--no-tensorboard", "-a", "resnet20", "--bit", "2"]
    launch = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {"OMP_NUM_THREADS": "1"}
    r = _run(launch + [os.path.join(SCRIPTS, "main.py"), "--epochs", "1"] + common, ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "resnet20_2bit" / BEST, weights_only=True)
    assert not any(k.startswith("module.") for k in ck["state_dict"])
    r = _run(launch + [os.path.join(SCRIPTS, "snn.py")] + [c for c in common if c != "--no-tensorboard"], ROOT,
             env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _json(tmp_path / "resnet20_2bit" / "metrics_snn_signed_T3.json")
    assert m["samples"] == 5 and m["layers"][0]["agreement"] == 1.0  # 3 + 2 images, no padding
    assert r.stdout.count(" * Acc@1") == 1  # rank 0 prints


def test_chain_script_commands(tmp_path):
    """scripts/cifar10_chain.sh runs the original's recipe in order (PYTHON stubbed to record the calls)."""
    log = tmp_path / "calls"
    stub = tmp_path / "py"
    stub.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    stub.chmod(0o755)
    r = _run(["bash", os.path.join(ROOT, "scripts", "cifar10_chain.sh"), "alex", "-id", "1"], tmp_path,
             env={"PYTHON": str(stub), "EPOCHS": "7", "OUT": "res"})
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 9
    assert calls[0].startswith("classification/cifar10/main.py --arch alex --bit 32 --wd 5e-4 --lr 0.1 --epochs 7")
    assert "--bit 2 --wd 3e-5 --lr 4e-2" in calls[3] and "--init res/alex_3bit/model_best.pth.tar" in calls[3]
    assert all(c.endswith("-id 1") for c in calls)
    snn_calls = [c for c in calls if "snn.py" in c and "snn_ft" not in c]
    assert [("-u" in c.split(), c.split()[c.split().index("--bit") + 1]) for c in snn_calls] == \
        [(False, "3"), (True, "3"), (False, "2"), (True, "2")]
    assert "snn_ft.py --arch alex --bit 2 -n 1 --force" in calls[-1]


def test_demo_quick(tmp_path, monkeypatch, fake_fmnist_system, capsys):
    from classification import demo
    monkeypatch.setenv("FASHION_MNIST_DIR", fake_fmnist_system)
    s = demo.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    # time per stage, so far, and left
    assert "--- train 32-bit ANN: " in out and "(elapsed " in out and "step 1/10, about " in out and " left)" in out
    assert "step 10/10, done" in out
    assert "bits |  T | ANN top-1 | SNN signed | SNN unsigned | fine-tuned | settle (K = 9)" in out
    assert "fine-tuned (fastsnn+e2e)" in out and "--method fastsnn+e2e --e2e-loss ce --e2e-epochs 1 --e2e-batches 1" in out
    assert [r["bits"] for r in s["table"]] == [32, 4, 3, 2] and s["table"][3]["finetuned"] is not None
    # the settle step: 2-bit row only, per-step top-1 over T + K = 12 steps
    assert s["table"][3]["settle"] is not None and s["table"][2]["settle"] is None
    st = s["snn"]["2bit_settle"]
    assert st["settle"] == 9 and len(st["per_step_top1"]) == 12 and st["per_step_top1"][-1] == st["top1"]
    assert s["ft_method"] == "fastsnn+e2e" and s["finetune_history"][-1]["layer"] == "end-to-end"
    assert s["table"][2]["T"] == 7 and s["table"][3]["T"] == 3
    assert os.path.exists(tmp_path / "summary.json")
    assert all(os.path.exists(p) for p in s["plots"]) and len(s["plots"]) == 3


def test_demo_seeds(tmp_path, monkeypatch, fake_fmnist_system, capsys):
    """classification.demo_seeds: one quick demo per seed, the table as mean ± spread; a seed already
    measured with the same demo flags is not run again."""
    from classification import demo, demo_seeds
    monkeypatch.setenv("FASHION_MNIST_DIR", fake_fmnist_system)
    r = demo_seeds.main(["--seeds", "0", "--out", str(tmp_path), "--", "--quick", "--no-progress"])
    assert r["seeds"] == [0] and [row["bits"] for row in r["rows"]] == [32, 4, 3, 2]
    md = (tmp_path / "seeds.md").read_text()
    assert md.startswith("| bits | T | ANN top-1 |") and "| signed + settle |" in md
    assert "Fine-tuned: --method fastsnn+e2e --ft-accept auto. Settle: K = 9 steps after T." in md
    assert r["rows"][3]["settle"]["n"] == 1 and r["rows"][2]["settle"] is None
    calls = []
    monkeypatch.setattr(demo, "main", lambda argv: calls.append(argv))
    again = demo_seeds.main(["--seeds", "0", "--out", str(tmp_path), "--", "--quick", "--no-progress"])
    assert calls == [] and again["rows"] == r["rows"]
    # the statistics and the table
    runs = [{"table": [{"bits": 2, "T": 3, "ann_top1": a, "snn_signed": 10.0, "snn_unsigned": None,
                        "finetuned": f}]} for a, f in ((70.0, 60.0), (72.0, 64.0), (74.0, 62.0))]
    rows = demo_seeds.aggregate(runs)
    assert rows[0]["ann_top1"]["mean"] == pytest.approx(72.0) and rows[0]["ann_top1"]["std"] == pytest.approx(2.0)
    assert rows[0]["snn_unsigned"] is None and rows[0]["snn_signed"]["std"] == 0.0
    md = demo_seeds.markdown(rows, [0, 1, 2])
    assert "| 2 | 3 | 72.0 ± 2.0 (70.0–74.0) | 10.0 ± 0.0 (10.0–10.0) | – | 62.0 ± 2.0 (60.0–64.0) |" in md
    with pytest.raises(Exception):
        demo_seeds.main(["--out", str(tmp_path), "--", "--seed", "3"])


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_in_a_folder_dataset(fake_folder, tmp_path, capsys, workers):
    """A file of an ImageFolder tree that does not decode: one line naming it (also from a loader worker)."""
    data = tmp_path / "d"
    shutil.copytree(fake_folder, data)
    victim = sorted(p for p in (data / "train").rglob("*") if p.is_file())[0]
    victim.write_bytes(b"not an image")
    argv = _base(str(data), tmp_path / "o", "-a", "resnet20", "--bit", "2", "--dataset", "folder", "-j", workers,
                 "--train-subset", "12", "--max-iters", "3")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(train_script.main, argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in lines[0], err
    assert lines[0].startswith(f"error: image {victim} cannot be decoded"), lines[0]
