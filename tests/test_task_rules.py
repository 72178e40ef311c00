"""The rules every task's scripts follow (common.runs), tried as a user would: the scripts run as
processes on tiny VOC-format data for a few iterations.

* a fresh run into a used folder is a one-line error naming --resume auto, --fresh and --save_folder;
  --fresh keeps the old files aside; fine-tuning methods get a folder each;
* every evaluation writes its own file (ANN eval, SNN, settle K) beside the checkpoint it evaluated;
* size, classes, width, bits come from the checkpoint unless given; classes files beside the data;
* presets are checked like flags; flags before data; worker defaults fit the machine; --help lists the
  flags a script uses; a folder of images skips an unreadable file; demo --input / --output.
"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import detection_fixtures as DF  # noqa: E402
import segmentation_fixtures as SF  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run(script, argv, cwd=REPO, ok=True):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([PY, os.path.join(REPO, script)] + [str(a) for a in argv], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_line_error(r, *needles):
    err = "\n".join(ln for ln in r.stderr.strip().splitlines() if not ln.startswith("warning: "))
    assert r.returncode == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err[-2000:]
    for n in needles:
        assert n in err, err
    return err


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """A 2-bit tiny detector trained on the two-class VOC fixture at 64 px (classes.txt beside the data,
    found without --classes)."""
    base = tmp_path_factory.mktemp("det_rules")
    root = DF.tiny_voc(str(base / "data"))
    out = str(base / "weights")
    common = ["-d", "voc", "-root", root, "--width", "0.125", "--train_size", "64", "--val_size", "64", "--epochs",
              "1", "-j", "0", "--save_folder", out, "--no-progress", "--seed", "0", "--max-iters", "1", "-bs", "2",
              "--no-tensorboard"]
    run("detection/train.py", common + ["--bit", "2"])
    return {"root": root, "out": out, "common": common, "best": os.path.join(out, "voc", "yolov2_tiny_2bit",
                                                                               "model_best.pth.tar")}


def test_detection_fresh_run_into_a_used_folder(det):
    run_dir = os.path.dirname(det["best"])
    before = {f: digest(os.path.join(run_dir, f)) for f in ("model_best.pth.tar", "checkpoint.pth.tar",
                                                           "metrics_ann.json")}
    r = run("detection/train.py", det["common"] + ["--bit", "2"], ok=False)
    one_line_error(r, run_dir, "--resume auto", "--fresh", "--save_folder")
    assert {f: digest(os.path.join(run_dir, f)) for f in before} == before      # nothing touched
    # --fresh: a new run there, the old one kept aside
    run("detection/train.py", det["common"] + ["--bit", "2", "--fresh", "--save_folder", det["out"] + "_copy"])
    shutil.copytree(det["out"] + "_copy", det["out"] + "_fresh")
    fresh_dir = os.path.join(det["out"] + "_fresh", "voc", "yolov2_tiny_2bit")
    old = digest(os.path.join(fresh_dir, "model_best.pth.tar"))
    # a --fresh command that fails on its inputs leaves the old run where it was
    bad = det["common"] + ["--bit", "2", "--fresh", "--save_folder", det["out"] + "_fresh"]
    one_line_error(run("detection/train.py", bad + ["--init", det["out"] + "_none.pth"], ok=False), "_none.pth")
    one_line_error(run("detection/train.py", bad + ["--anchors", "auto:0"], ok=False), "auto:0")
    assert not glob.glob(fresh_dir + ".replaced-*") and digest(os.path.join(fresh_dir, "model_best.pth.tar")) == old
    one_line_error(run("detection/train.py", bad + ["--resume", os.path.join(fresh_dir, "checkpoint.pth.tar")],
                       ok=False), "--fresh and --resume", "contradict")
    # --fresh wins over --resume auto: a new run, the old one kept aside
    run("detection/train.py", det["common"] + ["--bit", "2", "--fresh", "--resume", "auto", "--save_folder",
                                               det["out"] + "_fresh"])
    aside = glob.glob(fresh_dir + ".replaced-*")
    assert len(aside) == 1 and digest(os.path.join(aside[0], "model_best.pth.tar")) == old
    assert os.path.isfile(os.path.join(fresh_dir, "model_best.pth.tar"))


def test_detection_checkpoint_settings_and_metrics_files(det):
    """eval.py without -size / --classes / --bit / -v: the checkpoint's (64 px, cat / dog, 2 bits); the ANN
    evaluation writes metrics_ann_eval.json and leaves the training's metrics_ann.json alone; the SNN with
    and without settle steps write two files."""
    run_dir = os.path.dirname(det["best"])
    train_metrics = digest(os.path.join(run_dir, "metrics_ann.json"))
    ev = ["-d", "voc", "-root", det["root"], "-j", "0", "--no-progress", "--init", det["best"], "--max-iters", "1"]
    run("detection/eval.py", ev)
    ann = json.load(open(os.path.join(run_dir, "metrics_ann_eval.json")))
    assert ann["input_size"] == 64 and ann["classes"] == ["cat", "dog"] and ann["bit"] == 2
    assert digest(os.path.join(run_dir, "metrics_ann.json")) == train_metrics
    run("detection/eval.py", ev + ["--spike"])
    run("detection/eval.py", ev + ["--spike", "--settle", "2"])
    plain = json.load(open(os.path.join(run_dir, "metrics_snn_signed_T3.json")))
    settled = json.load(open(os.path.join(run_dir, "metrics_snn_signed_T3_settle2.json")))
    assert plain["settle"] == 0 and len(plain["per_step_map"]) == 3
    assert settled["settle"] == 2 and len(settled["per_step_map"]) == 5


def test_checkpoint_class_names_must_match_the_data(det, seg, tmp_path):
    """The same class count under other names or in another order would permute the labels silently:
    detection and segmentation refuse it in one line; segmentation also refuses a detector checkpoint."""
    rev = tmp_path / "reversed.txt"
    rev.write_text("dog\ncat\n")
    ev = ["-d", "voc", "-root", det["root"], "-j", "0", "--no-progress", "--init", det["best"], "--max-iters", "1"]
    one_line_error(run("detection/eval.py", ev + ["--classes", rev], ok=False),
                   "other class names", "class 0 is 'cat' there and 'dog' here", "--classes")
    # the root's own classes.txt (no --classes) is the data's names too: a re-exported root of another order
    other = tmp_path / "other_root"
    shutil.copytree(det["root"], other)
    (other / "classes.txt").write_text("dog\ncat\n")
    ev_other = ["-d", "voc", "-root", other, "-j", "0", "--no-progress", "--init", det["best"], "--max-iters", "1"]
    one_line_error(run("detection/eval.py", ev_other, ok=False), "other class names")
    names = open(seg["data"]["classes"]).read().split()
    seg_rev = tmp_path / "seg_reversed.txt"
    seg_rev.write_text("\n".join([names[0]] + names[1:][::-1]) + "\n")
    sev = ["-d", "voc", "--data_root", seg["data"]["root"], "--test_size", "49", "-j", "0", "--no-progress"]
    one_line_error(run("segmentation/eval.py", sev + ["--classes", seg_rev, "--init", seg["best2"]], ok=False),
                   "other class names")
    # the masks' values follow the root's own classes file: a --classes of another order is refused even when
    # it is the checkpoint's
    seg_root = tmp_path / "seg_root"
    shutil.copytree(seg["data"]["root"], seg_root)
    (seg_root / "classes_seg.txt").write_text("\n".join([names[0]] + names[1:][::-1]) + "\n")
    sev2 = ["-d", "voc", "--data_root", seg_root, "--test_size", "49", "-j", "0", "--no-progress"]
    one_line_error(run("segmentation/eval.py", sev2 + ["--classes", seg["data"]["classes"], "--init", seg["best2"]],
                       ok=False), "which the masks' values follow")
    one_line_error(run("segmentation/eval.py", sev2 + ["--init", seg["best2"]], ok=False), "other class names")
    one_line_error(run("segmentation/eval.py", sev + ["--classes", seg["data"]["classes"], "--init", det["best"]],
                       ok=False), "is not a segmentation checkpoint", "yolov2_tiny")


def test_detection_finetuning_methods_get_their_own_folders(det):
    ft = ["-d", "voc", "-root", det["root"], "-j", "0", "--no-progress", "--init", det["best"], "--save_folder",
          det["out"], "--max-iters", "1", "--force", "--no-eval-before", "--no-tensorboard", "-bs", "2"]
    run("detection/snn_ft.py", ft)
    run("detection/snn_ft.py", ft + ["--method", "fastsnn+e2e", "--e2e-epochs", "1"])
    a = torch.load(os.path.join(det["out"], "voc", "yolov2_tiny_2bit_ft", "model_best.pth.tar"), weights_only=True)
    b = torch.load(os.path.join(det["out"], "voc", "yolov2_tiny_2bit_ft_fastsnn-e2e", "model_best.pth.tar"),
                   weights_only=True)
    assert (a["method"], b["method"]) == ("fastsnn", "fastsnn+e2e") and a["val_size"] == 64
    one_line_error(run("detection/snn_ft.py", ft, ok=False), "already holds a run", "--fresh", "--save_folder")


def test_detection_demo_folder_with_a_broken_file(det, tmp_path):
    """README's demo line (--input / --output), the size from the checkpoint, a file that does not decode
    skipped with a warning."""
    photos = tmp_path / "photos"
    shutil.copytree(os.path.join(det["root"], "VOCdevkit", "VOC2007", "JPEGImages"), photos)
    (photos / "broken.jpg").write_bytes(b"not an image")
    r = run("detection/demo.py", ["-v", "yolov2_tiny", "--bit", "2", "--spike", "--init", det["best"], "--input",
                                  photos, "--output", tmp_path / "boxes", "--vis_thresh", "0.0"])
    assert "broken.jpg" in r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path / "boxes")) == [f"00000{i}.png" for i in range(1, 6)]
    # two images of one name (x.jpg, x.png) get a drawing each; the input folder as the output is refused
    from PIL import Image
    Image.open(photos / "000001.jpg").save(photos / "000001.png")
    argv = ["--bit", "2", "--init", det["best"], "--input", photos, "--vis_thresh", "0.0"]
    run("detection/demo.py", argv + ["--output", tmp_path / "boxes2"])
    drawn = sorted(os.listdir(tmp_path / "boxes2"))
    assert drawn[:2] == ["000001_jpg.png", "000001_png.png"] and len(drawn) == 6, drawn
    before = digest(photos / "000001.png")
    one_line_error(run("detection/demo.py", argv + ["--output", photos], ok=False), "holds the input images", "--out")
    assert digest(photos / "000001.png") == before


def test_detection_classes_beside_a_vocdevkit_root(det, tmp_path):
    """-root DIR/VOCdevkit without --classes: DIR/classes.txt, not the 20 VOC classes."""
    out = tmp_path / "w"
    run("detection/train.py", ["-d", "voc", "-root", os.path.join(det["root"], "VOCdevkit"), "--width", "0.125",
                               "--train_size", "64", "--val_size", "64", "--epochs", "1", "-j", "0", "--save_folder",
                               out, "--no-progress", "--max-iters", "1", "-bs", "2", "--no-tensorboard"])
    ck = torch.load(out / "voc" / "yolov2_tiny_32bit" / "model_best.pth.tar", weights_only=True)
    assert ck["classes"] == ["cat", "dog"] and ck["num_classes"] == 2


def test_detection_flags_before_data_and_workers(tmp_path):
    missing = str(tmp_path / "no_data")
    one_line_error(run("detection/train.py", ["-root", missing, "--train_size", "100"], ok=False), "--train_size 100")
    one_line_error(run("detection/eval.py", ["-root", missing, "-bs", "0"], ok=False), "--batch-size 0")
    from common.runs import default_workers
    n = default_workers()
    assert 1 <= n <= min(4, os.cpu_count() or 1)
    for script in ("train", "eval", "snn_ft"):
        text = run(f"detection/{script}.py", ["--help"]).stdout
        assert f"= {n} here" in " ".join(text.split())
    ev = run("detection/eval.py", ["--help"]).stdout
    assert "--lr" not in ev and "--epochs" not in ev and "--seed" not in ev


def test_detection_and_classification_train_with_amp(det, fake_cifar, tmp_path, monkeypatch):
    """``--amp`` in the other tasks' train.py: every training step runs in bfloat16 autocast, the run
    records it in the checkpoint's args and saves float32 weights."""
    from classification.cifar10 import main as cifar_main
    from common import runs
    from detection import train as det_train
    steps, autocast = [], runs.autocast
    monkeypatch.setattr(runs, "autocast", lambda device, enabled: steps.append(enabled) or autocast(device, enabled))
    out = str(tmp_path / "det")
    det_train.main(det["common"] + ["--bit", "32", "--save_folder", out, "--amp"])
    assert steps and all(steps)
    steps.clear()
    cifar = str(tmp_path / "cifar")
    cifar_main.main(["--data", fake_cifar, "--out", cifar, "-a", "resnet20", "--bit", "2",
                     "-b", "4", "--train-subset", "8", "--val-subset", "4", "--epochs", "1", "-j", "0",
                     "--no-progress", "--no-tensorboard", "--seed", "0", "--max-iters", "2", "--amp"])
    assert steps == [True, True]
    for path in (os.path.join(out, "voc", "yolov2_tiny_32bit", "model_best.pth.tar"),
                 os.path.join(cifar, "resnet20_2bit", "model_best.pth.tar")):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert ck["args"]["amp"] is True, path
        assert all(v.dtype in (torch.float32, torch.int64) for v in ck["state_dict"].values()), path


# ---------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg_rules")
    r = SF.write_voc(str(base / "data"), n_train=4, n_val=2)
    out = str(base / "weights")
    common = ["-d", "voc", "--data_root", r["root"], "--classes", r["classes"], "-m", "deeplabv1_vgg9",
              "--crop_size", "33", "--test_size", "49", "--save_folder", out, "-j", "0", "--no-progress",
              "--no-tensorboard", "--seed", "0", "--batch_size", "2", "--test_batch_size", "2", "--max-iters", "1"]
    run("segmentation/train.py", common + ["--width", "0.125", "--bit", "32", "--epochs", "1"])
    best32 = os.path.join(out, "voc", "deeplabv1_vgg9_32bit", "model_best.pth.tar")
    # the bit chain without --width: the checkpoint's
    run("segmentation/train.py", common + ["--bit", "2", "--epochs", "1", "--init", best32])
    return {"data": r, "out": out, "common": common, "best32": best32,
            "best2": os.path.join(out, "voc", "deeplabv1_vgg9_2bit", "model_best.pth.tar")}


def test_segmentation_init_keeps_the_checkpoint_width(seg):
    assert torch.load(seg["best2"], weights_only=True)["width"] == 0.125


def test_segmentation_fresh_run_into_a_used_folder(seg):
    before = digest(seg["best32"])
    r = run("segmentation/train.py", seg["common"] + ["--width", "0.125", "--bit", "32", "--epochs", "1"], ok=False)
    one_line_error(r, "--resume auto", "--fresh", "--save_folder")
    assert digest(seg["best32"]) == before


def test_segmentation_eval_writes_beside_the_checkpoint(seg, tmp_path):
    """--init X from another working directory: the metrics go next to X (no ./weights), one file per
    measurement: ANN, SNN, SNN + settle."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    x = other / "model.pth.tar"
    shutil.copyfile(seg["best2"], x)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    ev = ["-d", "voc", "--data_root", seg["data"]["root"], "--classes", seg["data"]["classes"], "--test_size", "49",
          "-j", "0", "--no-progress", "--init", x]
    run("segmentation/eval.py", ev, cwd=cwd)
    run("segmentation/eval.py", ev + ["--spike"], cwd=cwd)
    run("segmentation/eval.py", ev + ["--spike", "--settle", "1"], cwd=cwd)
    assert sorted(os.listdir(other)) == ["metrics_ann_eval.json", "metrics_snn_signed_T3.json",
                                         "metrics_snn_signed_T3_settle1.json", "model.pth.tar"]
    assert os.listdir(cwd) == []
    rec = json.load(open(other / "metrics_snn_signed_T3_settle1.json"))
    assert rec["settle"] == 1 and len(rec["per_step_miou"]) == 4 and rec["width"] == 0.125


def test_segmentation_presets_are_checked_like_flags(seg, tmp_path):
    for cfg, needle in (({"bit": 7}, "bit = 7"), ({"model": "unet"}, "model = 'unet'"),
                        ({"batch_size": "eight"}, "batch_size = 'eight'"), ({"colour": 1}, "colour")):
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        one_line_error(run("segmentation/train.py", seg["common"] + ["--config", path], ok=False), str(path), needle)
    # a preset of eval.py with training keys: accepted (the training flags are the train script's)
    path = tmp_path / "ev.json"
    path.write_text(json.dumps({"bit": 2, "spike": True, "epochs": 30, "lr": 0.01}))
    r = run("segmentation/eval.py", ["--config", path, "-d", "voc", "--data_root", seg["data"]["root"], "--classes",
                                     seg["data"]["classes"], "--test_size", "49", "-j", "0", "--no-progress",
                                     "--init", seg["best2"], "--metrics-out", tmp_path / "m.json"])
    assert json.load(open(tmp_path / "m.json"))["neuron"] == "signed"
    assert "SNN mIoU" in r.stdout


def test_segmentation_help_lists_only_the_flags_used(seg):
    ev = run("segmentation/eval.py", ["--help"]).stdout
    for flag in ("--lr", "--momentum", "--crop_size", "--epochs", "--seed"):
        assert flag not in ev, flag
    assert "--max-iters" in ev and "--spike" in ev
    from common.runs import default_workers
    assert f"= {default_workers()} here" in " ".join(ev.split())


def test_segmentation_finetuning_methods_and_inference(seg, tmp_path):
    ft = seg["common"] + ["--init", seg["best2"], "-n", "1", "--force", "--no-eval-before"]
    run("segmentation/snn_ft.py", ft)
    run("segmentation/snn_ft.py", ft + ["--method", "fastsnn+e2e", "--e2e-epochs", "1"])
    for d in ("deeplabv1_vgg9_2bit_ft", "deeplabv1_vgg9_2bit_ft_fastsnn-e2e"):
        assert os.path.isfile(os.path.join(seg["out"], "voc", d, "model_best.pth.tar")), d
    one_line_error(run("segmentation/snn_ft.py", ft, ok=False), "already holds a run", "--fresh")
    photos = tmp_path / "photos"
    shutil.copytree(os.path.join(seg["data"]["voc"], "JPEGImages"), photos)
    (photos / "zz_broken.png").write_bytes(b"\x89PNG broken")
    r = run("segmentation/inference.py", ["--init", seg["best2"], "--input", photos, "--output", tmp_path / "o",
                                          "--spike", "--test_size", "49"])
    assert "zz_broken.png" in r.stdout + r.stderr
    assert len(os.listdir(tmp_path / "o")) == 2 * 6
    one_line_error(run("segmentation/inference.py", ["--init", seg["best2"], "--input", photos, "--output", photos,
                                                     "--test_size", "49"], ok=False), "holds the input images", "--output")


def test_segmentation_classes_beside_a_vocdevkit_root(tmp_path):
    """--data_root DIR/VOCdevkit without --classes: DIR/classes_seg.txt, not the 21 VOC classes."""
    r = SF.write_voc(str(tmp_path / "scenes"), n_train=2, n_val=1, classes_file=False)
    names = ["background", "shirt", "shoe", "bag"]
    (tmp_path / "scenes" / "classes_seg.txt").write_text("\n".join(names) + "\n")
    run("segmentation/train.py", ["-d", "voc", "--data_root", os.path.join(r["root"], "VOCdevkit"), "--width", "0.125",
                                  "--crop_size", "33", "--test_size", "49", "--save_folder", tmp_path / "w", "-j", "0",
                                  "--no-progress", "--no-tensorboard", "--batch_size", "2", "--epochs", "1"])
    ck = torch.load(tmp_path / "w" / "voc" / "deeplabv1_vgg9_32bit" / "model_best.pth.tar", weights_only=True)
    assert ck["class_names"] == names


def test_segmentation_flags_before_data(tmp_path):
    missing = ["--data_root", str(tmp_path / "none")]
    one_line_error(run("segmentation/train.py", missing + ["--crop_size", "100"], ok=False), "--crop_size 100")
    one_line_error(run("segmentation/eval.py", missing + ["--test_batch_size", "0"], ok=False), "--test-batch-size 0")
