"""Backbone pretraining on the annotated objects of a dataset (common/pretrain.py, detection/pretrain.py,
segmentation/pretrain.py): objects from boxes and from mask regions, crops, the training run (resume,
the best backbone), ``train.py --init`` from it, the small-dataset hint and the chains' PRETRAIN=1 step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import detection_fixtures as DF
import segmentation_fixtures as SF
from common import UserError
from common import pretrain as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------- objects and crops
def test_mask_objects_are_the_connected_regions_of_each_class():
    m = np.zeros((30, 40), np.uint8)
    m[2:6, 3:9] = 2            # a 4 x 6 region of class 2
    m[6:10, 9:12] = 2          # touches it only at a corner: 8-connected, the same object
    m[20:28, 30:38] = 2        # a second class-2 object
    m[12:18, 12:15] = 1        # class 1
    m[25:27, 2:4] = 1          # 4 pixels: below min_area
    m[0:3, 35:40] = 255        # ignore
    m[15, 20] = 7              # a label beyond the classes
    got = sorted(P.mask_objects(m, num_classes=3, min_area=5), key=lambda o: (o[1], o[0]))
    assert got == [((12.0, 12.0, 15.0, 18.0), 0), ((3.0, 2.0, 12.0, 10.0), 1), ((30.0, 20.0, 38.0, 28.0), 1)]
    assert P.mask_objects(m, 3, min_area=4)[0][1] == 0 and len(P.mask_objects(m, 3, min_area=4)) == 4
    assert P.mask_objects(np.zeros((5, 5), np.uint8), 3) == []


def test_box_objects_drop_empty_boxes():
    boxes = np.array([[1, 2, 10, 12], [5, 5, 5, 9], [3, 3, 8, 2]], np.float32)
    assert P.box_objects(boxes, np.array([4, 1, 2])) == [((1.0, 2.0, 10.0, 12.0), 4)]


def test_crop_square_centres_the_object_and_pads_outside_the_image():
    img = torch.full((3, 40, 60), 10, dtype=torch.uint8)
    img[:, 10:20, 30:50] = 200                               # a 20 x 10 bright object
    tight = P.crop_square(img, (30, 10, 50, 20), 16, context=1.0)
    assert tight.shape == (3, 16, 16) and tight.dtype == torch.uint8
    # a square of the longer side: the object fills the middle rows, the surroundings the top and bottom
    assert (tight[:, 5:11] > 150).all() and (tight[:, :3] < 50).all() and (tight[:, -3:] < 50).all()
    wide = P.crop_square(img, (30, 10, 50, 20), 16, context=2.0)
    assert (wide[:, 7:9, 7:9] > 150).all() and (wide[:, 0, 0] < 50).all()
    corner = P.crop_square(img, (0, 0, 10, 10), 20, context=2.0)   # half of the square lies outside
    assert (corner[:, :4, :4] == 0).all() and (corner[:, 6:, 6:] == 10).all()


def test_render_crops_and_window():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    src = [(img, [((0, 0, 8, 8), 1), ((8, 8, 30, 20), 0)]), (img, []), (img, [((4, 4, 12, 12), 2)])]
    c = P.render_crops(src, 16)
    assert c.images.shape == (3, 3, 18, 18) and c.labels.tolist() == [1, 0, 2] and len(c) == 3
    assert P.render_crops([], 16).images.shape == (0, 3, 18, 18)
    x = torch.arange(2 * 3 * 18 * 18, dtype=torch.float32).view(2, 3, 18, 18)
    assert torch.equal(P.window(x, 16), x[..., 1:17, 1:17])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        w = P.window(x, 16, g)
        assert w.shape == (2, 3, 16, 16)
        for k in range(2):     # each output is a (possibly flipped) 16 x 16 window of its input
            hits = [(oy, ox, f) for oy in range(3) for ox in range(3) for f in (0, 1)
                    if torch.equal(w[k], x[k, :, oy:oy + 16, ox:ox + 16].flip(-1) if f else x[k, :, oy:oy + 16, ox:ox + 16])]
            assert len(hits) == 1
            seen.add(hits[0])
    assert len(seen) > 6 and {f for *_, f in seen} == {0, 1}


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [P.lr_at(i, 200, 1.0) for i in range(200)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


def test_small_data_hint():
    for task in ("detection", "segmentation"):
        assert P.small_data_hint(task, 4999, has_init=True) is None
        assert P.small_data_hint(task, P.SMALL_DATASET, has_init=False) is None
        line = P.small_data_hint(task, 1500, has_init=False)
        assert "\n" not in line and "1500" in line and f"python -m {task}.pretrain" in line
        assert "--init" in line and "_pretrain/model_best.pth.tar" in line
    det = P.small_data_hint("detection", 10, False)
    assert "--optimizer adam" in det and "--anchors auto" in det
    assert "--optimizer adam --lr 6e-3" in P.small_data_hint("segmentation", 10, False)
    with pytest.raises(ValueError):
        P.small_data_hint("classification", 10, False)


@pytest.mark.parametrize("task,name", [("detection", "yolov2_tiny"), ("detection", "yolov2_r34"),
                                       ("segmentation", "deeplabv1_vgg9"), ("segmentation", "deeplabv3_r34")])
def test_every_backbone_classifies_and_its_keys_load_into_the_task_model(task, name):
    from common import pipeline
    if task == "detection":
        from detection.models import get_model
        from detection.pretrain import FEATURES
        model, fresh = (get_model(name, 5, None, 32, 0.125) for _ in range(2))
        prefixes = ("backbone.",)
    else:
        from segmentation.models import get_model
        from segmentation.pretrain import FEATURES
        model, fresh = (get_model(name, 6, 32, width=0.125) for _ in range(2))
        prefixes = model.backbone_prefixes
    clf = P.BackboneClassifier(model, FEATURES[name], 5, 32)
    x = torch.randn(3, 3, 32, 32)
    assert clf(x).shape == (3, 5)
    clf(x).sum().backward()                  # the backbone's parameters are the ones trained
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(tuple(prefixes)) for n in grads)
    sd = P.backbone_state(model, prefixes)
    got = pipeline.load_backbone(fresh, sd, log=lambda s: None)
    assert sorted(got["loaded"]) == sorted(sd) and got["initialised"]


# ---------------------------------------------------------------------------------------- segmentation
def _seg_argv(data, save, *extra):
    return ["-d", "voc", "--data_root", data["root"], "--classes", data["classes"], "--width", "0.125", "--size", "16",
            "-bs", "8", "-j", "0", "--save_folder", save, *extra]


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "amp"])
def test_segmentation_pretrain_learns_the_objects_and_train_init_loads_the_backbone(amp, tmp_path, monkeypatch):
    """The three shapes of the fixture differ in colour: the crops are easy to tell apart, so a working
    pretraining must beat chance (33 %) by far on the held-out masks -- also with ``--amp``, every step in
    bfloat16 autocast; its (float32) backbone then starts train.py."""
    from common import runs
    from segmentation import pretrain as SP
    from segmentation import train as ST
    steps, autocast = [], runs.autocast
    monkeypatch.setattr(runs, "autocast", lambda device, enabled: steps.append(enabled) or autocast(device, enabled))
    data = SF.write_voc(str(tmp_path / "d"), n_train=24, n_val=8, sizes=(48, 40, 56))
    save = str(tmp_path / "w")
    rec = SP.main(_seg_argv(data, save, "--epochs", "12", "--lr", "1e-2", *(["--amp"] if amp else [])))
    assert steps and set(steps) == {amp}
    run = os.path.join(save, "voc", "deeplabv1_vgg9_pretrain")
    assert rec["checkpoint"] == os.path.join(run, "model_best.pth.tar") and rec["test_crops"] >= 8
    assert rec["accuracy"] >= 75.0, rec["history"]
    assert json.load(open(os.path.join(run, "metrics_pretrain.json")))["accuracy"] == rec["accuracy"]
    best = torch.load(rec["checkpoint"], weights_only=True)
    assert best["object_classes"] == ["square", "disc", "bar"] and best["width"] == 0.125
    assert best["accuracy"] == rec["accuracy"] and set(best["state_dict"])
    assert all(k.startswith("features.") for k in best["state_dict"])
    assert all(v.dtype in (torch.float32, torch.int64) for v in best["state_dict"].values())
    out = ST.main(["-d", "voc", "--data_root", data["root"], "--classes", data["classes"], "--width", "0.125",
                   "--bit", "32", "--crop_size", "33", "--test_size", "57", "--epochs", "1", "--max-iters", "1",
                   "-b", "2", "-j", "0", "--save_folder", save, "--no-tensorboard", "--no-progress", "--seed", "0",
                   "--init", rec["checkpoint"]])
    assert out is not None
    ck = torch.load(os.path.join(save, "voc", "deeplabv1_vgg9_32bit", "checkpoint.pth.tar"), weights_only=True)
    assert ck["init"]["mode"] == "backbone"
    # one SGD step later the backbone is still the pretrained one (nearly), the classifier a fresh one
    sd = ck["state_dict"]
    w0, w1 = best["state_dict"]["features.3.conv.weight"], sd["features.3.conv.weight"]
    assert (w1 - w0).abs().max() < 0.1 * w0.abs().max()
    with pytest.raises(UserError, match="--width 0.125 backbone.*pass --width 0.125"):
        ST.main(["-d", "voc", "--data_root", data["root"], "--classes", data["classes"], "--width", "0.25",
                 "--bit", "32", "--crop_size", "33", "--epochs", "1", "-j", "0", "--save_folder", str(tmp_path / "w2"),
                 "--init", rec["checkpoint"], "--no-tensorboard", "--no-progress"])


def test_pretrain_resumes_a_killed_run_and_returns_a_finished_one(tmp_path):
    from segmentation import pretrain as SP
    data = SF.write_voc(str(tmp_path / "d"), n_train=6, n_val=3)
    save = str(tmp_path / "w")
    one = SP.main(_seg_argv(data, save, "--epochs", "1"))
    ck1 = torch.load(os.path.join(save, "voc", "deeplabv1_vgg9_pretrain", "checkpoint.pth.tar"), weights_only=True)
    two = SP.main(_seg_argv(data, save, "--epochs", "2"))       # continues after epoch 1
    assert [h["epoch"] for h in two["history"]] == [1, 2] and two["history"][0] == one["history"][0]
    ck2 = torch.load(os.path.join(save, "voc", "deeplabv1_vgg9_pretrain", "checkpoint.pth.tar"), weights_only=True)
    assert ck2["epoch"] == 2 and not torch.equal(ck1["state_dict"]["fc.weight"], ck2["state_dict"]["fc.weight"])
    again = SP.main(_seg_argv(data, save, "--epochs", "2"))     # finished: nothing more to do
    assert again["history"] == two["history"]
    ck3 = torch.load(os.path.join(save, "voc", "deeplabv1_vgg9_pretrain", "checkpoint.pth.tar"), weights_only=True)
    assert torch.equal(ck2["state_dict"]["fc.weight"], ck3["state_dict"]["fc.weight"])
    with pytest.raises(UserError, match=r"of other settings \(width 0.125 -> 0.25\)"):
        SP.main(_seg_argv(data, save, "--epochs", "3")[:-2] + ["--save_folder", save, "--width", "0.25"])
    fresh = SP.main(_seg_argv(data, save, "--epochs", "1", "--fresh", "--resume", ""))
    assert len(fresh["history"]) == 1
    assert any(d.startswith("deeplabv1_vgg9_pretrain.replaced-") for d in os.listdir(os.path.join(save, "voc")))


def test_pretrain_bad_input_is_one_line(tmp_path):
    data = SF.write_voc(str(tmp_path / "d"), n_train=2, n_val=1)
    save = str(tmp_path / "w")
    for extra, msg in ((["--context", "0.5"], "--context 0.5 must be at least 1"),
                       (["--epochs", "0"], "--epochs 0 must be at least 1"),
                       (["--size", "8"], "--size 8 is too small")):
        r = _run(["-m", "segmentation.pretrain", *_seg_argv(data, save, *extra)])
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    empty = SF.write_voc(str(tmp_path / "e"), n_train=2, n_val=1)
    for mask in os.listdir(os.path.join(empty["voc"], "SegmentationClass")):
        SF.save_palette_png(os.path.join(empty["voc"], "SegmentationClass", mask),
                            np.zeros_like(empty["masks"][mask[:-4]]))
    r = _run(["-m", "segmentation.pretrain", *_seg_argv(empty, save)])
    assert r.returncode == 2 and "nothing to pretrain on" in r.stderr and len(r.stderr.strip().splitlines()) <= 3


# ---------------------------------------------------------------------------------------- detection
def test_detection_pretrain_on_box_crops_and_train_init(tmp_path):
    from detection import train as DT
    root = DF.tiny_voc(str(tmp_path / "voc"))
    save = str(tmp_path / "w")
    r = _run(["-m", "detection.pretrain", "-d", "voc", "-root", root, "--classes", os.path.join(root, "classes.txt"),
              "--width", "0.125", "--size", "32", "--epochs", "2", "-bs", "2", "-j", "0", "--save_folder", save])
    assert r.returncode == 0, r.stderr[-2000:]
    run = os.path.join(save, "voc", "yolov2_tiny_pretrain")
    rec = json.load(open(os.path.join(run, "metrics_pretrain.json")))
    # VOC2007 + VOC2012 trainval without the difficult box: 4 objects; the test split: 3
    assert rec["train_crops"] == 4 and rec["test_crops"] == 3 and len(rec["history"]) == 2
    best = torch.load(os.path.join(run, "model_best.pth.tar"), weights_only=True)
    # no "version" / "classes": train.py must take it for a backbone, and the class list from the data
    assert best["object_classes"] == ["cat", "dog"] and "version" not in best and "classes" not in best
    assert all(k.startswith("backbone.") for k in best["state_dict"])
    res = DT.main(["-d", "voc", "-v", "yolov2_tiny", "-root", root, "--train_size", "64", "--val_size", "64",
                   "--epochs", "1", "-bs", "2", "--num_workers", "0", "--no-progress", "--no-tfboard", "--max-iters",
                   "1", "--init", os.path.join(run, "model_best.pth.tar"), "--save_folder", save, "--seed", "0",
                   "--optimizer", "adam", "--anchors", "auto:2"])
    assert res["epochs"] == 1
    det = torch.load(os.path.join(save, "voc", "yolov2_tiny_32bit", "checkpoint.pth.tar"), weights_only=True)
    assert det["width"] == 0.125       # taken from the pretrained backbone


# ---------------------------------------------------------------------------------------- chains
@pytest.mark.parametrize("name,args,save", [("detection", ["yolov2_tiny"], "OUT"),
                                            ("segmentation", ["deeplabv1_vgg9"], "SAVE")])
def test_chain_pretrain_step(name, args, save, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DRY"}
    env.update(PYTHON="python-stub", DRY="1", PRETRAIN="1", EPOCHS="1", PRETRAIN_ARGS="--epochs 3",
               **{save: str(tmp_path / "w")})
    extra = ["-root" if name == "detection" else "--data_root", "/data/x", "--width", "0.5", "--train_size", "96",
             "--seed", "3"]
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", f"{name}_chain.sh"), *args, *extra], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    printed = [ln for ln in r.stderr.splitlines() if ln.startswith("+ ")]
    model = args[0]
    pre = f"{tmp_path}/w/voc/{model}_pretrain"
    assert f"-m {name}.pretrain" in printed[0]
    for flag in ("/data/x", "--width 0.5", "--seed 3", "--epochs 3", f"--save_folder {tmp_path}/w"):
        assert flag in printed[0], printed[0]
    assert "--train_size" not in printed[0]
    assert "--bit 32" in printed[1] and f"--init {pre}/model_best.pth.tar" in printed[1]
    assert sorted(os.listdir(tmp_path)) == []
    # a finished pretraining is skipped
    os.makedirs(pre)
    open(os.path.join(pre, "metrics_pretrain.json"), "w").write("{}")
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", f"{name}_chain.sh"), *args, *extra], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=60)
    assert f"skip (done): {pre}/metrics_pretrain.json" in r.stderr
    assert f"--init {pre}/model_best.pth.tar" in [ln for ln in r.stderr.splitlines() if ln.startswith("+ ")][0]


def test_segmentation_pretrain_on_fashion_mnist_canvases(tmp_path):
    """``--canvases N``: the backbone learns single Fashion-MNIST items (the scene set's stand-in for
    ImageNet); the run is filed under ``fashion-mnist`` and holds the segmenter's backbone keys only."""
    from common import scenes
    if not os.path.isfile(os.path.join(scenes.fashion_mnist_dir(), "t10k-images-idx3-ubyte.gz")):
        pytest.skip("dataset-fashion-mnist is not installed (scripts/setup.sh)")
    from segmentation import pretrain as SP
    save = str(tmp_path / "w")
    rec = SP.main(["--canvases", "96", "--width", "0.125", "--size", "32", "--epochs", "1", "-bs", "32", "-j", "0",
                   "--save_folder", save, "--data_root", str(tmp_path / "not-read")])
    run = os.path.join(save, "fashion-mnist", "deeplabv1_vgg9_pretrain")
    assert rec["checkpoint"] == os.path.join(run, "model_best.pth.tar")
    assert rec["train_crops"] == 96 and rec["test_crops"] == SP.CANVAS_TEST
    best = torch.load(rec["checkpoint"], weights_only=True)
    assert best["object_classes"] == list(scenes.CLASSES) and best["dataset"] == "fashion-mnist"
    assert set(best["state_dict"]) and all(k.startswith("features.") for k in best["state_dict"])
    x = P.fashion_canvases("test", 3, 32, (0.6, 1.0), 0)
    assert x.images.shape == (3, 3, 32, 32) and x.images.dtype == torch.uint8 and len(x) == 3
    assert torch.equal(x.images, P.fashion_canvases("test", 3, 32, (0.6, 1.0), 0).images)   # seeded
    for extra, msg in ((["--canvases", "-1"], "--canvases -1 is negative"),
                       (["--canvases", "8", "--canvas-scale", "0.8", "0.5"], "--canvas-scale 0.8 0.5 must satisfy")):
        r = _run(["-m", "segmentation.pretrain", "--save_folder", save, *extra])
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
