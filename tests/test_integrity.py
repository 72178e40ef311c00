"""Experiment integrity (issues 15 and 16): the same command gives the same, correctly labelled
experiment -- display flags do not change results, resume equals an uninterrupted run, run folders
and records do not collide or get overwritten, checkpoints and flags must agree, errors are one line
(once under torchrun). Tiny fake CIFAR-10 / image folders, resnet20, a few iterations, CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from classification import workflow
from classification.cifar10 import main as train_script
from classification.cifar10 import snn as snn_script
from classification.cifar10 import snn_ft as ft_script
from common import run_cli
from common.checkpoint import BEST, CHECKPOINT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _data(data, out, *extra):
    """Flags every CIFAR script accepts."""
    return ["--data", data, "--out", str(out), "-b", "4", "--test-batch-size", "4", "-j", "0",
            "--train-subset", "16", "--val-subset", "4", "--no-progress", "-a", "resnet20", *extra]


def _train(data, out, *extra):
    return _data(data, out, "--epochs", "1", "--no-tensorboard", "--seed", "0", *extra)


def _json(path):
    with open(path) as f:
        return json.load(f)


def _one_line_error(fn, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(fn, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def run2(fake_cifar, tmp_path_factory):
    """A trained 2-bit resnet20 run (1 epoch, 2 iterations)."""
    out = tmp_path_factory.mktemp("run2")
    rec = train_script.main(_train(fake_cifar, out, "--bit", "2", "--max-iters", "2"))
    return out, rec


# ------------------------------------------------------------------------------ 16.1 display flags
def test_progress_bar_does_not_touch_the_loader():
    """The bar iterates its loader exactly once, when the loop does (tqdm.auto's asyncio class made
    an extra iterator in its constructor: an extra RNG draw, and extra worker processes)."""
    from common.logger import progress
    from torch.utils.data import DataLoader
    calls = []

    class Counting(DataLoader):
        def __iter__(self):
            calls.append(1)
            return super().__iter__()
    loader = Counting(list(range(6)), batch_size=2, shuffle=True)
    state = torch.get_rng_state()
    bar = progress(loader, "x", True)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)
    assert sum(len(b) for b in bar) == 6 and calls == [1]


def test_progress_flag_gives_identical_losses(fake_cifar, tmp_path):
    recs = {}
    for flag in ("--progress", "--no-progress"):
        argv = [a for a in _train(fake_cifar, tmp_path / flag, "--bit", "32", "--epochs", "2", "-p", "1")
                if a != "--no-progress"] + [flag]
        train_script.main(argv)
        recs[flag] = _json(tmp_path / flag / "resnet20_32bit" / "history.json")["history"]
    keys = ("train_loss", "train_top1", "test_loss", "test_top1")
    assert [[h[k] for k in keys] for h in recs["--progress"]] == [[h[k] for k in keys] for h in recs["--no-progress"]]
    env = _json(tmp_path / "--progress" / "resnet20_32bit" / "metrics_ann.json")["env"]
    assert env["seed"] == 0 and env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__
    assert {"python", "torchvision", "host", "platform", "cpu_count"} <= set(env)


# ------------------------------------------------------------------------------ 16.2 chain script
def _chain(args, tmp_path, **env):
    log = tmp_path / "calls"
    stub = tmp_path / "py"
    stub.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    stub.chmod(0o755)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "cifar10_chain.sh"), *args], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, "PYTHON": str(stub), **env})
    return r, (log.read_text().splitlines() if log.exists() else [])


def test_chain_out_is_one_source_of_truth(tmp_path):
    r, calls = _chain(["alex", "--out", "DIR", "-id", "1"], tmp_path, OUT="res")
    assert r.returncode == 0, r.stderr
    inits = [c.split("--init ")[1].split()[0] for c in calls if "--init" in c]
    assert len(inits) == 8 and all(p.startswith("DIR/alex_") for p in inits), inits
    assert all(c.count("--out") == 1 and "--out DIR" in c for c in calls)
    (tmp_path / "b").mkdir()
    r, calls = _chain(["alex", "--dataset", "fashionmnist", "--out=D2"], tmp_path / "b")
    assert r.returncode == 0 and len(calls) == 9
    assert all(c.split("--init ")[1].startswith("D2/fashionmnist/alex_") for c in calls if "--init" in c)


def test_chain_dry_run_help_and_usage(tmp_path):
    r, calls = _chain(["alex"], tmp_path, DRY="1")
    assert r.returncode == 0 and calls == [] and r.stderr.count("+ python ") == 9
    r, calls = _chain([], tmp_path)  # (DRY=1 printed and ran nothing: no calls file yet)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "usage" in r.stderr and calls == []
    r, calls = _chain(["--help"], tmp_path)
    assert r.returncode == 0 and "usage:" in r.stdout and "DRY=1" in r.stdout and calls == []


# ------------------------------------------------------------------------------ 16.3 collisions
def test_run_folders_do_not_collide_across_datasets():
    from classification.cifar10.task import TASK as CIFAR
    from classification.imagenet import task as inet
    args = inet.parse_args("train", ["-a", "resnet18", "--bit", "4", "/data"])
    args.run_namespace = inet.TASK.namespace(args)
    assert workflow.run_dir(args) == os.path.join("result", "imagenet", "resnet18_4bit")
    c = train_script.get_parser().parse_args(["-a", "resnet18", "--bit", "4"])
    c.run_namespace = CIFAR.namespace(c)
    assert workflow.run_dir(c) == os.path.join("result", "resnet18_4bit")  # the original's CIFAR-10 path
    f = train_script.get_parser().parse_args(["-a", "resnet18", "--bit", "4", "--dataset", "fashionmnist"])
    f.run_namespace = CIFAR.namespace(f)
    assert workflow.run_dir(f) == os.path.join("result", "fashionmnist", "resnet18_4bit")


def test_resume_refuses_another_experiment(run2, fake_cifar, tmp_path, capsys):
    out, _ = run2
    ck = torch.load(out / "resnet20_2bit" / CHECKPOINT, weights_only=True)
    foreign = tmp_path / "resnet20_2bit"
    foreign.mkdir()
    torch.save({**ck, "dataset": "imagenet", "num_classes": 1000}, foreign / CHECKPOINT)
    line = _one_line_error(train_script.main, _train(fake_cifar, tmp_path, "--bit", "2", "--resume", "auto"), capsys)
    assert "1000-class model (imagenet)" in line and "10 classes" in line
    torch.save({**ck, "dataset": "fashionmnist"}, foreign / CHECKPOINT)
    line = _one_line_error(train_script.main, _train(fake_cifar, tmp_path, "--bit", "2", "--resume", "auto"), capsys)
    assert "trained on fashionmnist" in line


# ------------------------------------------------------------------------------ 16.4 records
def test_evaluations_never_overwrite_a_training_record(run2, fake_cifar, tmp_path):
    out, rec = run2
    record = out / "resnet20_2bit" / "metrics_ann.json"
    before = record.read_text()
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(out / "resnet20_2bit" / BEST, other / "copy.pth.tar")
    train_script.main(_train(fake_cifar, out, "--bit", "2", "-e", "--init", str(other / "copy.pth.tar")))
    train_script.main(_train(fake_cifar, out, "--bit", "2", "-e"))
    assert record.read_text() == before
    assert _json(other / "metrics_ann_eval.json")["checkpoint"] == str(other / "copy.pth.tar")
    assert _json(out / "resnet20_2bit" / "metrics_ann_eval.json")["script"] == "main.py -e"
    snn_script.main(_data(fake_cifar, out, "--bit", "2", "--init", str(other / "copy.pth.tar")))
    assert os.path.exists(other / "metrics_snn_signed_T3.json")
    assert not os.path.exists(out / "resnet20_2bit" / "metrics_snn_signed_T3.json")


# ------------------------------------------------------------------------------ 16.5 / 16.9 / 15.2 errors
@pytest.fixture(scope="module")
def folder_run(fake_folder, tmp_path_factory):
    """A 3-class run on the image-folder dataset."""
    out = tmp_path_factory.mktemp("folder_run")
    train_script.main(_train(fake_folder, out, "--bit", "2", "--max-iters", "1", "--dataset", "folder"))
    return out / "folder" / "resnet20_2bit" / BEST


def test_checkpoint_and_flags_must_agree(run2, folder_run, fake_cifar, fake_folder, tmp_path, capsys):
    out, _ = run2
    best = str(out / "resnet20_2bit" / BEST)
    line = _one_line_error(snn_script.main, _data(fake_cifar, tmp_path, "--bit", "2", "--wbit", "3", "--init", best),
                           capsys)
    assert "2-bit weights but --wbit 3" in line
    # another class count, on every load path: --resume, --init, snn.py, snn_ft.py
    folder = _train(fake_folder, tmp_path, "--bit", "2", "--dataset", "folder")
    ck = out / "resnet20_2bit" / CHECKPOINT
    for fn, argv in ((train_script.main, folder + ["--resume", str(ck)]),
                     (train_script.main, folder + ["--init", best]),
                     (snn_script.main, _data(fake_folder, tmp_path, "--bit", "2", "--dataset", "folder", "--init", best)),
                     (ft_script.main, _data(fake_folder, tmp_path, "--bit", "2", "--dataset", "folder", "--init", best))):
        line = _one_line_error(fn, argv, capsys)
        assert "10-class model" in line and "3 classes" in line, line
    # a raw state dict (no metadata) of another class count
    raw = tmp_path / "raw.pth"
    torch.save(torch.load(best, weights_only=True)["state_dict"], raw)
    line = _one_line_error(snn_script.main, _data(fake_folder, tmp_path, "--bit", "2", "--dataset", "folder",
                                                  "--init", str(raw)), capsys)
    assert "does not fit" in line and "fc.weight" in line


def test_error_texts(run2, fake_cifar, tmp_path, capsys):
    out, _ = run2
    best = str(out / "resnet20_2bit" / BEST)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    line = _one_line_error(snn_script.main, _data(fake_cifar, tmp_path, "--bit", "2", "--init", str(text)), capsys)
    assert "(a text file)" in line and "(101)" not in line
    line = _one_line_error(snn_script.main, _data(fake_cifar, tmp_path, "-a", "alex", "--bit", "2", "--init", best),
                           capsys)
    assert "a alex" not in line and "trained as --arch resnet20" in line
    line = _one_line_error(snn_script.main, _data(fake_cifar, tmp_path, "--bit", "2", "--chunk", "0", "--init", best),
                           capsys)
    assert "--chunk 0" in line
    f32 = tmp_path / "f32"
    train_script.main(_train(fake_cifar, f32, "--bit", "32", "--max-iters", "1"))
    line = _one_line_error(snn_script.main, _data(fake_cifar, tmp_path, "--bit", "3", "--init",
                                                  str(f32 / "resnet20_32bit" / BEST)), capsys)
    assert "32-bit model" in line and "--bit 32" not in line.split(" — ")[1] and "--bit 3 --init" in line


def test_user_error_printed_once_under_a_launcher(monkeypatch, tmp_path, capsys):
    from common import UserError

    def main(argv):
        raise UserError("bad thing", "do this")
    for rank in ("0", "1"):
        err_file = tmp_path / f"error{rank}.json"
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err_file))
        with pytest.raises(SystemExit) as e:
            run_cli(main, [])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == ("error: bad thing — do this\n" if rank == "0" else "")
        assert json.loads(err_file.read_text())["message"] == "error: bad thing — do this"


# ------------------------------------------------------------------------------ 16.6 flags that do nothing
@pytest.mark.parametrize("script", ["cifar_snn", "cifar_ft", "imagenet_snn", "imagenet_ft"])
def test_scripts_list_only_their_flags(script, capsys):
    from classification.imagenet import task as inet
    parser = {"cifar_snn": snn_script.get_parser, "cifar_ft": ft_script.get_parser,
              "imagenet_snn": lambda: inet.get_parser("snn"), "imagenet_ft": lambda: inet.get_parser("ft")}[script]()
    helptext = parser.format_help()
    for flag in ("--epochs", "--resume", "--start-epoch", "--print-freq", "--alpha-init"):
        assert flag not in helptext, flag
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs", "5"])
    assert "--tune-malloc" in helptext
    assert "--epochs" in train_script.get_parser().format_help()


def test_malloc_tuning_is_opt_in(run2, fake_cifar, tmp_path, monkeypatch):
    import quant.fused
    calls = []
    monkeypatch.setattr(quant.fused, "tune_malloc", lambda *a, **k: calls.append(1) or True)
    out, _ = run2
    base = _data(fake_cifar, out, "--bit", "2", "--metrics-out", str(tmp_path / "m.json"), "--max-iters", "1")
    snn_script.main(base)
    assert calls == []
    snn_script.main(base + ["--tune-malloc"])
    assert calls == [1]


# ------------------------------------------------------------------------------ 16.7 resume
def test_kill_and_resume_equals_an_uninterrupted_run(fake_cifar, tmp_path, monkeypatch):
    from classification import engine
    argv = lambda out: _train(fake_cifar, out, "--bit", "32", "--epochs", "3", "--lr", "0.05")  # noqa: E731
    full = train_script.main(argv(tmp_path / "full"))
    real, calls = engine.train_one_epoch, []

    def killed_in_epoch_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(engine, "train_one_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_script.main(argv(tmp_path / "cut"))
    monkeypatch.setattr(engine, "train_one_epoch", real)
    resumed = train_script.main(argv(tmp_path / "cut") + ["--resume", "auto"])
    a = torch.load(tmp_path / "full" / "resnet20_32bit" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / "resnet20_32bit" / CHECKPOINT, weights_only=True)
    keys = ("train_loss", "train_top1", "test_loss", "test_top1", "lr")
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert full["top1"] == resumed["top1"]
    best = torch.load(tmp_path / "full" / "resnet20_32bit" / BEST, weights_only=True)
    assert "optimizer" not in best and "rng_state" not in best
    assert {"state_dict", "arch", "bit", "wbit", "num_classes", "dataset", "epoch"} <= set(best)


# ------------------------------------------------------------------------------ 16.8 script folders
def test_outputs_in_a_script_folder_are_ignored():
    for p in ("classification/cifar10/data/x", "classification/cifar10/result/alex_2bit/model_best.pth.tar",
              "classification/imagenet/result/x"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", p], cwd=ROOT)
        assert r.returncode == 0, p


# ------------------------------------------------------------------------------ 15.3 ANN reference
def test_finetuned_file_reports_its_source_ann(run2, fake_cifar, tmp_path):
    out, _ = run2
    init = str(out / "resnet20_2bit" / BEST)
    base = _data(fake_cifar, tmp_path, "--bit", "2", "--init", init)
    f = ft_script.main(base + ["--force", "--no-eval-before", "--no-tensorboard", "--ft-layers", "layer1.0.*"])
    source = snn_script.main(_data(fake_cifar, tmp_path, "--bit", "2", "--init", init))
    ck = torch.load(tmp_path / "resnet20_2bit_ft" / BEST, weights_only=True)
    assert ck["ann_top1"] == source["ann_top1"] == f["ann_top1"] and ck["init"] == init
    again = snn_script.main(_data(fake_cifar, tmp_path, "--bit", "2", "--init", str(tmp_path / "resnet20_2bit_ft" / BEST)))
    assert again["ann_top1"] == source["ann_top1"] and again["ann_checkpoint"] == init
    assert "finetuned_weights_ann_top1" in again and again["top1"] == f["top1"]
    m = _json(tmp_path / "resnet20_2bit_ft" / "metrics_snn_signed_T3.json")
    assert m["ann_top1"] == source["ann_top1"] and "finetuned_weights_ann_top1" in m


# ------------------------------------------------------------------------------ 15.4 workers
def test_default_workers_follow_the_machine(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert workflow.default_workers() == 2
    assert train_script.get_parser().parse_args([]).workers == 2
    assert "= 2 here" in train_script.get_parser().format_help()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert workflow.default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert workflow.default_workers() == 4
