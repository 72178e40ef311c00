"""The segmentation scripts end to end on a tiny VOC-layout fixture: the 32 -> 2-bit chain, ANN / SNN
evaluation JSON, fine-tuning, inference PNGs, presets, --resume auto, backbone --init, a 2-process
torchrun run, and bad input as one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from segmentation_fixtures import save_palette_png, write_voc  # noqa: E402

from common import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def common_flags(r, out):
    return ["-d", "voc", "--data_root", r["root"], "--classes", r["classes"], "-m", "deeplabv1_vgg9",
            "--width", "0.125", "--crop_size", "33", "--test_size", "49", "--save_folder", out, "-j", "0",
            "--no-progress", "--no-tensorboard", "--seed", "0", "--batch_size", "3", "--test_batch_size", "2"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Train 32-bit (2 epochs) then 2-bit (--init the 32-bit best); returns paths and records."""
    from segmentation import train
    base = tmp_path_factory.mktemp("seg_scripts")
    r = write_voc(str(base / "data"))
    out = str(base / "runs")
    flags = common_flags(r, out)
    rec32 = train.main(flags + ["--bit", "32", "--epochs", "2", "--lr", "0.02"])
    best32 = os.path.join(out, "voc", "deeplabv1_vgg9_32bit", "model_best.pth.tar")
    rec2 = train.main(flags + ["--bit", "2", "--epochs", "1", "--lr", "0.01", "--init", best32, "--alpha-init", "3"])
    return {"data": r, "out": out, "flags": flags, "rec32": rec32, "rec2": rec2, "best32": best32,
            "best2": os.path.join(out, "voc", "deeplabv1_vgg9_2bit", "model_best.pth.tar")}


def test_small_data_hint_without_init_only(chain, tmp_path, capsys):
    """A few images and no --init: one line pointing to segmentation.pretrain; with --init: none."""
    from segmentation import train
    flags = common_flags(chain["data"], str(tmp_path)) + ["--epochs", "1", "--max-iters", "1", "--val-subset", "2"]
    train.main(flags + ["--bit", "32"])
    out = capsys.readouterr().out
    assert out.count("hint:") == 1 and "python -m segmentation.pretrain" in out
    train.main(flags + ["--bit", "2", "--init", chain["best32"]])
    assert "hint:" not in capsys.readouterr().out


def test_training_writes_best_checkpoint_and_metrics(chain):
    for bit in (32, 2):
        d = os.path.join(chain["out"], "voc", f"deeplabv1_vgg9_{bit}bit")
        for f in ("checkpoint.pth.tar", "model_best.pth.tar", "history.json", "metrics_ann.json"):
            assert os.path.isfile(os.path.join(d, f)), f
    ck = torch.load(chain["best2"], map_location="cpu", weights_only=True)
    assert (ck["task"], ck["model"], ck["bit"], ck["num_classes"], ck["width"]) == ("segmentation", "deeplabv1_vgg9", 2, 4, 0.125)
    assert ck["init"]["mode"] == "strict"            # the bit chain loads its predecessor strictly
    hist = ck["history"]
    assert hist[0]["lr"] < 0.01                      # poly LR, stepped per iteration
    assert 0.0 <= chain["rec32"]["miou"] <= 100.0 and chain["rec32"]["best_epoch"] in (1, 2)
    assert len(chain["rec32"]["per_class_iou"]) == 4                 # the best epoch's IoU of every class
    h32 = json.load(open(os.path.join(chain["out"], "voc", "deeplabv1_vgg9_32bit", "history.json")))["history"]
    assert len(h32) == 2 and h32[1]["lr"] < h32[0]["lr"]


def test_poly_schedule_per_iteration(chain):
    ck = torch.load(os.path.join(chain["out"], "voc", "deeplabv1_vgg9_32bit", "checkpoint.pth.tar"),
                    map_location="cpu", weights_only=True)
    sch = ck["scheduler"]
    it = sch["last_epoch"]
    assert it == 2 * 2                                # 6 images / batch 3 = 2 iterations x 2 epochs
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.02 * (1 - it / sch["total_iters"]) ** 0.9)


def test_eval_ann_and_snn_json(chain, tmp_path):
    from segmentation import eval as seg_eval
    flags = chain["flags"]
    ann = seg_eval.main(flags + ["--bit", "2", "--metrics-out", str(tmp_path / "ann.json")])
    assert ann["miou"] == pytest.approx(chain["rec2"]["miou"])   # the same val set, the same model
    js = str(tmp_path / "snn.json")
    rec = seg_eval.main(flags + ["--bit", "2", "--spike", "--metrics-out", js, "--plot"])
    saved = json.load(open(js))
    for k in ("miou", "ann_miou", "per_step_miou", "per_class_iou", "pixel_acc", "T", "neuron", "layers", "sops"):
        assert k in saved, k
    assert saved["T"] == 3 and saved["neuron"] == "signed" and len(saved["per_step_miou"]) == 3
    assert saved["per_step_miou"][-1] == pytest.approx(saved["miou"])
    assert saved["ann_miou"] == pytest.approx(ann["miou"])
    assert len(saved["per_class_iou"]) == 4 and saved["layers"][0]["agreement"] == 1.0
    conf = torch.tensor(saved["ann_confusion"], dtype=torch.float64)  # the ANN's pixels, finding vs naming
    assert conf.shape == (4, 4) and int(conf.sum()) == int(torch.tensor(ann["confusion"]).sum())
    for k in ("naming_acc", "item_iou"):
        assert saved[f"ann_{k}"] == (None if ann[k] is None else pytest.approx(ann[k]))
    assert all(k in saved for k in ("item_iou", "naming_acc", "miou_if_named"))
    assert os.path.isfile(str(tmp_path / "snn_miou_vs_t.png")) and os.path.isfile(str(tmp_path / "snn_layers.png"))
    u = seg_eval.main(flags + ["--bit", "2", "--spike", "-u", "--metrics-out", str(tmp_path / "u.json")])
    assert u["neuron"] == "unsigned" and u["T"] == 3
    assert rec["samples"] == u["samples"] == 3


def test_finetune_then_eval_and_inference(chain, tmp_path):
    from segmentation import eval as seg_eval
    from segmentation import inference, snn_ft
    flags = chain["flags"]
    rec = snn_ft.main(flags + ["--bit", "2", "-n", "1", "--force", "--max-iters", "1", "--no-eval-before"])
    ft = os.path.join(chain["out"], "voc", "deeplabv1_vgg9_2bit_ft", "model_best.pth.tar")
    assert os.path.isfile(ft) and rec["finetuned"] and len(rec["finetune"]) >= 1
    ck = torch.load(ft, map_location="cpu", weights_only=True)
    assert ck["snn_finetuned"] and ck["T"] == 3 and ck["num_classes"] == 4
    again = seg_eval.main(flags + ["--bit", "2", "--spike", "--init", ft, "--metrics-out", str(tmp_path / "ft.json")])
    assert again["finetuned"] and again["miou"] == pytest.approx(rec["miou"])
    # without --force: accept / revert on the training mIoU
    rec2 = snn_ft.main(flags + ["--bit", "2", "-n", "1", "--max-iters", "1", "--score-batches", "1",
                                "--no-eval-before", "--save_folder", str(tmp_path / "ft2")] +
                       ["--init", chain["best2"]])
    assert all("accepted" in h for h in rec2["finetune"])
    # inference: a mask PNG (class indices) and an overlay per image, ANN and SNN
    img = os.path.join(chain["data"]["voc"], "JPEGImages", "val_001.jpg")
    outs = inference.main(flags + ["--init", chain["best2"], "--input", img, "--output", str(tmp_path / "inf")])  # bit 2 read from it
    outs += inference.main(flags + ["--bit", "2", "--spike", "--init", chain["best2"], "--input",
                                    os.path.dirname(img), "--output", str(tmp_path / "inf_snn")])
    from PIL import Image
    mask = Image.open(os.path.join(tmp_path, "inf", "val_001_mask.png"))
    assert mask.mode == "P" and mask.size == Image.open(img).size and int(np.asarray(mask).max()) < 4
    over = Image.open(os.path.join(tmp_path, "inf", "val_001_overlay.png"))
    assert over.mode == "RGB" and over.size == mask.size
    assert len(outs) == 2 + 2 * 9


def test_finetune_methods_and_opt_in_malloc(chain, tmp_path, monkeypatch, capsys):
    """snn_ft.py --method fastsnn+e2e (per-pixel cross-entropy with the masks) and --ft-accept local, recorded;
    the glibc heap tuning only with --tune-malloc."""
    import quant.fused
    from segmentation import eval as seg_eval
    from segmentation import snn_ft, workflow
    calls = []
    monkeypatch.setattr(quant.fused, "tune_malloc", lambda *a, **k: calls.append(1) or True)
    flags = chain["flags"]
    rec = snn_ft.main(flags + ["--bit", "2", "-n", "1", "--max-iters", "1", "--score-batches", "1", "--no-eval-before",
                               "--method", "fastsnn+e2e", "--e2e-epochs", "2", "--ft-accept", "local",
                               "--local-batches", "1", "--save_folder", str(tmp_path / "ft"), "--init", chain["best2"]])
    assert calls == []
    opts = {"accept": "local", "local_batches": 1, "e2e_batches": None, "e2e_epochs": 2, "e2e_lr": None,
            "e2e_loss": "ce", "min_steps": 50}
    assert rec["method"] == "fastsnn+e2e" and rec["method_options"] == opts
    e2e = rec["finetune"][-1]
    assert e2e["layer"] == "end-to-end" and len(e2e["epochs"]) == 2 and all("score" in e for e in e2e["epochs"])
    assert all("local_error_before" in h for h in rec["finetune"][:-1])
    assert "loss ce), layer-wise steps kept if the layer's error on 1 batches falls" in capsys.readouterr().out
    ck = torch.load(os.path.join(str(tmp_path / "ft"), "voc", "deeplabv1_vgg9_2bit_ft_fastsnn-e2e", "model_best.pth.tar"),
                    map_location="cpu", weights_only=True)
    assert ck["method"] == "fastsnn+e2e" and ck["method_options"] == opts
    # the loss: cross-entropy over the labelled pixels, zero when every pixel is ignored
    out = torch.randn(2, 4, 5, 5)
    y = torch.randint(0, 4, (2, 5, 5))
    y[0, :2] = 255
    assert torch.allclose(workflow.e2e_cross_entropy(out, None, (None, y)),
                          torch.nn.functional.cross_entropy(out, y, ignore_index=255))
    assert float(workflow.e2e_cross_entropy(out, None, (None, torch.full_like(y, 255)))) == 0.0
    seg_eval.main(flags + ["--bit", "2", "--spike", "--max-batches", "1", "--metrics-out", str(tmp_path / "m.json")])
    assert calls == []
    seg_eval.main(flags + ["--bit", "2", "--spike", "--max-batches", "1", "--tune-malloc",
                           "--metrics-out", str(tmp_path / "m2.json")])
    assert calls == [1]


def test_resume_auto_continues(chain, tmp_path, monkeypatch):
    from segmentation import train
    flags = chain["flags"] + ["--save_folder", str(tmp_path), "--bit", "32", "--lr", "0.02"]
    train.main(flags + ["--epochs", "1"])
    rec = train.main(flags + ["--epochs", "2", "--resume", "auto"])
    ck = torch.load(os.path.join(tmp_path, "voc", "deeplabv1_vgg9_32bit", "checkpoint.pth.tar"),
                    map_location="cpu", weights_only=True)
    assert ck["epoch"] == 2 and [h["epoch"] for h in ck["history"]] == [1, 2] and rec["epochs"] == 2
    # one process, seeded: a run killed after its first epoch and resumed equals the uninterrupted one,
    # with the data loaded in the process and by a worker (whose seed comes from the loader's generator)
    from common import checkpoint
    real = checkpoint.save_checkpoint

    def save_then_die(state, *a, **kw):
        real(state, *a, **kw)
        if state["epoch"] == 1:
            raise KeyboardInterrupt
    for j in ("0", "1"):
        run = chain["flags"] + ["--bit", "32", "--lr", "0.02", "--epochs", "2", "-j", j]
        killed = run + ["--save_folder", str(tmp_path / f"killed{j}")]
        monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train.main(killed)
        monkeypatch.setattr(checkpoint, "save_checkpoint", real)
        train.main(killed + ["--resume", "auto"])
        train.main(run + ["--save_folder", str(tmp_path / f"straight{j}")])
        a, b = (torch.load(os.path.join(tmp_path, d + j, "voc", "deeplabv1_vgg9_32bit", "checkpoint.pth.tar"),
                           weights_only=True) for d in ("killed", "straight"))
        assert a["epoch"] == b["epoch"] == 2
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (j, k)
    # a finished run rerun with --resume auto (a restarted chain) trains nothing and keeps its results
    again = train.main(flags + ["--epochs", "2", "--resume", "auto"])
    assert again["miou"] == rec["miou"] and again["epochs"] == 2


def test_presets_and_overrides(chain):
    from segmentation import eval as seg_eval
    from segmentation import train, workflow
    args = workflow.parse_args(train.get_parser(), ["--config", "voc_deeplabv1_2bit", "--save_folder", "S"])
    assert (args.model, args.bit, args.lr, args.crop_size, args.sybn, args.epochs) == ("deeplabv1_vgg9", 2, 0.007, 513, True, 50)
    assert args.init == "S/voc/deeplabv1_vgg9_3bit/model_best.pth.tar"
    args = workflow.parse_args(seg_eval.get_parser(), ["--config", "coco_deeplabv3_T7", "--bit", "2"])
    assert (args.dataset, args.model, args.spike, args.bit, args.test_size) == ("coco", "deeplabv3_r34", True, 2, 641)
    # a training preset in eval.py: its epochs / sybn are ignored, the rest applies
    args = workflow.parse_args(seg_eval.get_parser(), ["--config", "voc_deeplabv3_4bit"])
    assert args.bit == 4 and not args.spike
    n = len([f for f in os.listdir(workflow.CONFIG_DIR) if f.endswith(".json")])
    assert n == 28   # {voc, coco} x {deeplabv1, deeplabv3} x {32, 4, 3, 2 bit, T15, T7, T3}
    with pytest.raises(UserError, match="no such preset"):
        workflow.parse_args(train.get_parser(), ["--config", "voc_deeplabv9_2bit"])


def test_init_backbone_partial_mode(tmp_path, capsys):
    """An ImageNet ResNet-34 of classification/ initialises the segmenter's backbone (partial mode);
    a segmentation checkpoint of the same model loads strictly."""
    from classification.models import get_model as cls_model
    from segmentation import workflow
    from segmentation.models import get_model
    cls = cls_model("resnet34", bit=32, dataset="imagenet")
    path = str(tmp_path / "r34.pth.tar")
    torch.save({"arch": "resnet34", "state_dict": cls.state_dict()}, path)
    seg = get_model("deeplabv3_r34", 21)
    args = workflow.parse_args(__import__("segmentation.train", fromlist=["x"]).get_parser(),
                               ["-m", "deeplabv3_r34", "--init", path])
    info = workflow.init_weights(seg, args, 21)
    assert info["mode"] == "backbone"
    assert torch.equal(seg.layer3[2].conv1.weight, cls.layer3[2].conv1.weight)
    assert torch.equal(seg.bn1.running_var, cls.bn1.running_var)
    assert "loaded" in capsys.readouterr().out
    # a shape mismatch (another width) is refused
    args.width = 0.5
    with pytest.raises(UserError, match="shape"):
        workflow.init_weights(get_model("deeplabv3_r34", 21, width=0.5), args, 21)



def test_init_torchvision_loads_the_shared_pretrained_weights(monkeypatch):
    """``--init torchvision`` takes torchvision's ResNet-34 through ``common.pretrained`` (the fetch is
    replaced by torchvision's own constructor, offline); a failed fetch is a one-line error; the VGG-9 is
    refused."""
    import torchvision
    import common.pretrained
    from segmentation import train, workflow
    from segmentation.models import get_model
    tv = torchvision.models.resnet34(weights=None)
    calls = []

    def fake_fetch(arch, source="torchvision", **kw):
        calls.append((arch, source))
        return tv.state_dict()
    monkeypatch.setattr(common.pretrained, "pretrained_state_dict", fake_fetch)
    seg = get_model("deeplabv3_r34", 21)
    args = workflow.parse_args(train.get_parser(), ["-m", "deeplabv3_r34", "--init", "torchvision"])
    info = workflow.init_weights(seg, args, 21)
    assert calls == [("resnet34", "torchvision")] and info["mode"] == "backbone"
    assert torch.equal(seg.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)

    def offline(arch, source="torchvision", **kw):
        raise RuntimeError("could not fetch torchvision resnet34 IMAGENET1K_V1 weights (URLError: x); pass a file")
    monkeypatch.setattr(common.pretrained, "pretrained_state_dict", offline)
    with pytest.raises(UserError, match="could not fetch") as e:
        workflow.init_weights(get_model("deeplabv3_r34", 21), args, 21)
    assert "\n" not in str(e.value)
    args = workflow.parse_args(train.get_parser(), ["--init", "torchvision"])
    with pytest.raises(UserError, match="deeplabv3_r34"):
        workflow.init_weights(get_model("deeplabv1_vgg9", 21), args, 21)

def test_bad_input_one_line_errors(chain, tmp_path):
    from segmentation import eval as seg_eval
    from segmentation import train
    flags = chain["flags"]
    # a checkpoint with another class count
    r5 = write_voc(str(tmp_path / "five"), n_train=2, n_val=1)
    with open(r5["classes"], "a") as f:
        f.write("extra\n")
    f5 = common_flags(r5, chain["out"])
    with pytest.raises(UserError, match="trained for 4 classes but the data has 5"):
        seg_eval.main(f5 + ["--bit", "2", "--init", chain["best2"]])
    with pytest.raises(UserError, match="trained for 4 classes but the data has 5"):
        train.main(f5 + ["--bit", "2", "--epochs", "1", "--init", chain["best2"], "--save_folder", str(tmp_path / "o5")])
    with pytest.raises(UserError, match="holds a 2-bit model"):
        seg_eval.main(flags + ["--bit", "3", "--init", chain["best2"]])
    with pytest.raises(UserError, match="--spike with --bit 32"):
        seg_eval.main(flags + ["--bit", "32", "--spike", "--init", chain["best32"]])
    # a mask of another size than its image: found before training starts
    rb = write_voc(str(tmp_path / "bad"), n_train=2, n_val=1)
    save_palette_png(os.path.join(rb["voc"], "SegmentationClass", "val_000.png"), np.zeros((5, 5), np.uint8))
    with pytest.raises(UserError, match="is 5x5 but its image is"):
        train.main(common_flags(rb, str(tmp_path / "o")) + ["--epochs", "1"])


def _cli(script, args, **kw):
    return subprocess.run([PY, os.path.join(ROOT, "segmentation", script)] + args, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def test_cli_errors_are_one_line(chain, tmp_path):
    p = _cli("train.py", ["--data_root", str(tmp_path / "missing"), "-j", "0"])
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: data root") and "—" in lines[0], p.stderr
    # mask values outside the class range, found in a loader worker process: still one line
    rb = write_voc(str(tmp_path / "bad"), n_train=2, n_val=2)
    bad = np.zeros((40, 33), np.uint8)
    bad[2, 2] = 200
    save_palette_png(os.path.join(rb["voc"], "SegmentationClass", "val_000.png"), bad)
    flags = common_flags(rb, chain["out"])
    flags[flags.index("-j") + 1] = "1"
    p = _cli("eval.py", flags + ["--bit", "2", "--init", chain["best2"]])
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "label(s) 200 outside the class range 0..3" in lines[0] and "Traceback" not in p.stderr


def test_two_process_torchrun(chain, tmp_path):
    """torchrun with 2 gloo processes: DDP training (SyncBN requested); python -m torch.distributed.launch
    (--local-rank argument): the SNN evaluation, whose confusion matrix is summed over both ranks (the same
    mIoU as one process)."""
    flags = common_flags(chain["data"], str(tmp_path)) + ["--bit", "2", "--init", chain["best2"]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"]
    p = subprocess.run(run + [os.path.join(ROOT, "segmentation", "train.py")] + flags + ["--epochs", "1", "--sybn"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    best = os.path.join(str(tmp_path), "voc", "deeplabv1_vgg9_2bit", "model_best.pth.tar")
    trained = json.load(open(os.path.join(str(tmp_path), "voc", "deeplabv1_vgg9_2bit", "metrics_ann.json")))
    from segmentation import eval as seg_eval
    alone = seg_eval.main(chain["flags"] + ["--bit", "2", "--init", best, "--metrics-out", str(tmp_path / "a.json")])
    assert trained["miou"] == pytest.approx(alone["miou"])   # val mIoU of the 2-rank run = one process
    js = str(tmp_path / "ddp.json")
    launch = [PY, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port", "29572"]
    p = subprocess.run(launch + [os.path.join(ROOT, "segmentation", "eval.py")] + flags +
                       ["--spike", "--init", chain["best2"], "--metrics-out", js], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.load(open(js))
    one = seg_eval.main(chain["flags"] + ["--bit", "2", "--spike", "--init", chain["best2"],
                                          "--metrics-out", str(tmp_path / "one.json")])
    assert two["samples"] == one["samples"] == 3
    assert two["miou"] == pytest.approx(one["miou"]) and two["ann_miou"] == pytest.approx(one["ann_miou"])


def test_original_dist_test_command_with_a_json_config(chain, tmp_path):
    """vedaseg's ``bash tools/dist_test.sh CONFIG CHECKPOINT "GPU_IDS"`` with a JSON file of flag values."""
    r = chain["data"]
    cfg = tmp_path / "my_T3.json"
    cfg.write_text(json.dumps({"dataset": "voc", "data_root": r["root"], "classes": r["classes"], "model": "deeplabv1_vgg9",
                               "width": 0.125, "bit": 2, "spike": True, "test_size": 49, "workers": 0,
                               "progress": False, "metrics_out": str(tmp_path / "t3.json")}))
    p = subprocess.run(["bash", os.path.join(ROOT, "segmentation", "tools", "dist_test.sh"), str(cfg), chain["best2"], "0"],
                       cwd=os.path.join(ROOT, "segmentation"), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.load(open(tmp_path / "t3.json"))
    assert rec["T"] == 3 and rec["neuron"] == "signed" and rec["samples"] == 3


def test_scales_flag_reaches_the_training_transform(chain, tmp_path):
    """``--scales`` sets the random rescaling of the training images (flag and preset alike); a factor
    out of range is a one-line error before any data is read."""
    from segmentation import data as segdata
    from segmentation import train, workflow

    def scales_of(argv):
        args = workflow.parse_args(train.get_parser(), argv)
        workflow.check_args(args)
        data = workflow.build_data(args, train=True)
        assert isinstance(data.train.transforms, segdata.TrainTransform)
        return data.train.transforms.scales

    assert scales_of(chain["flags"]) == segdata.SCALES
    assert scales_of(chain["flags"] + ["--scales", "0.75", "1", "1.25"]) == (0.75, 1.0, 1.25)
    cfg = tmp_path / "c.json"
    cfg.write_text('{"scales": [0.5, 1.0]}')
    assert scales_of(chain["flags"] + ["--config", str(cfg)]) == (0.5, 1.0)
    p = _cli("train.py", chain["flags"] + ["--scales", "0", "1", "--save_folder", str(tmp_path / "o2")])
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert p.returncode == 2 and len(lines) == 1 and "--scales 0 1: every factor must be in (0, 8]" in lines[0], p.stderr
    assert not os.path.exists(str(tmp_path / "o2"))


def test_adam_trains_and_resumes_only_with_adam(chain, tmp_path):
    """``--optimizer adam`` (the short-run recipe) trains, saves Adam's state and resumes with it; a resume
    that names the other optimizer is a one-line error, not a state dict that fails later."""
    from segmentation import train
    flags = chain["flags"] + ["--save_folder", str(tmp_path), "--bit", "32", "--lr", "1e-3", "--max-iters", "2"]
    train.main(flags + ["--epochs", "1", "--optimizer", "adam"])
    ck = torch.load(os.path.join(tmp_path, "voc", "deeplabv1_vgg9_32bit", "checkpoint.pth.tar"),
                    map_location="cpu", weights_only=True)
    assert "exp_avg" in next(iter(ck["optimizer"]["state"].values())) and ck["args"]["optimizer"] == "adam"
    with pytest.raises(UserError, match="trained with --optimizer adam, this run has sgd"):
        train.main(flags + ["--epochs", "2", "--resume", "auto"])
    rec = train.main(flags + ["--epochs", "2", "--resume", "auto", "--optimizer", "adam"])
    assert rec["epochs"] == 2


def test_channels_last_training_matches_the_default_layout(chain, tmp_path):
    """``--channels-last`` (the CPU default) changes the memory layout only: the same seeded run in either
    layout gives the same losses up to float summation order, and its checkpoint evaluates as usual."""
    from segmentation import eval as seg_eval
    from segmentation import train
    flags = chain["flags"] + ["--bit", "2", "--epochs", "1", "--max-iters", "3", "--lr", "0.01",
                              "--init", chain["best32"], "--alpha-init", "3"]
    recs = {}
    for cl in ("--channels-last", "--no-channels-last"):
        out = str(tmp_path / cl.strip("-"))
        train.main(flags[:] + ["--save_folder", out, cl])
        best = os.path.join(out, "voc", "deeplabv1_vgg9_2bit", "model_best.pth.tar")
        h = json.load(open(os.path.join(out, "voc", "deeplabv1_vgg9_2bit", "history.json")))["history"]
        w = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]["features.2.conv.weight"]
        assert w.is_contiguous(memory_format=torch.channels_last) == (cl == "--channels-last")
        recs[cl] = (h[0]["train_loss"], seg_eval.main(["--init", best, "--data_root", chain["data"]["root"],
                                                        "--classes", chain["data"]["classes"], "--test_size", "49",
                                                        "-j", "0", "--no-progress"])["miou"])
    (l_cl, m_cl), (l_nc, m_nc) = recs["--channels-last"], recs["--no-channels-last"]
    assert l_cl == pytest.approx(l_nc, rel=1e-3) and m_cl == pytest.approx(m_nc, abs=2.0)


def test_amp_training_keeps_a_float32_checkpoint(chain, tmp_path):
    """``--amp`` (bfloat16 autocast) trains the same seeded run to about the same loss, and what it saves
    is float32 -- the next bit of the chain, the SNN and eval.py read it as any other checkpoint."""
    from segmentation import train
    flags = chain["flags"] + ["--bit", "32", "--epochs", "1", "--max-iters", "3", "--lr", "0.01"]
    losses = {}
    for amp in ("--amp", "--no-amp"):
        out = str(tmp_path / amp.strip("-"))
        train.main(flags[:] + ["--save_folder", out, amp])
        run = os.path.join(out, "voc", "deeplabv1_vgg9_32bit")
        ck = torch.load(os.path.join(run, "model_best.pth.tar"), map_location="cpu", weights_only=True)
        assert all(v.dtype in (torch.float32, torch.int64) for v in ck["state_dict"].values())
        assert ck["args"]["amp"] == (amp == "--amp")
        losses[amp] = json.load(open(os.path.join(run, "history.json")))["history"][0]["train_loss"]
    assert losses["--amp"] == pytest.approx(losses["--no-amp"], rel=5e-2) and losses["--amp"] != losses["--no-amp"]


def test_fov_dilation_is_kept_by_the_checkpoint(chain, tmp_path):
    """``--fov-dilation`` is stored in the checkpoint; the next bit of the chain and eval.py take it from
    there; an evaluation that names another one, a bad value or a ResNet are one-line errors."""
    from segmentation import eval as seg_eval
    from segmentation import train
    flags = common_flags(chain["data"], str(tmp_path)) + ["--epochs", "1", "--max-iters", "1", "--val-subset", "2"]
    train.main(flags + ["--bit", "32", "--fov-dilation", "1"])
    best32 = os.path.join(str(tmp_path), "voc", "deeplabv1_vgg9_32bit", "model_best.pth.tar")
    assert torch.load(best32, map_location="cpu", weights_only=True)["fov_dilation"] == 1
    train.main(flags + ["--bit", "2", "--init", best32, "--alpha-init", "3"])
    best2 = os.path.join(str(tmp_path), "voc", "deeplabv1_vgg9_2bit", "model_best.pth.tar")
    ck = torch.load(best2, map_location="cpu", weights_only=True)
    assert ck["fov_dilation"] == 1 and ck["init"]["mode"] == "strict"
    ev = ["--init", best2, "--data_root", chain["data"]["root"], "--classes", chain["data"]["classes"],
          "--test_size", "49", "-j", "0", "--no-progress", "--val-subset", "2"]
    rec = seg_eval.main(ev + ["--spike"])
    assert rec["T"] == 3 and 0.0 <= rec["miou"] <= 100.0
    from segmentation import workflow
    a = workflow.parse_args(seg_eval.get_parser(), ev)
    workflow.check_args(a)
    ckpt, path = workflow.open_trained(a)
    model, _ = workflow.load_trained(a, 4, torch.device("cpu"), path, "--init", ckpt=ckpt)
    assert model.features[7].conv.dilation == (1, 1)        # the checkpoint's, not the default 12
    with pytest.raises(UserError, match="holds a --fov-dilation 1 model"):
        seg_eval.main(ev + ["--fov-dilation", "12"])
    with pytest.raises(UserError, match="must be at least 1"):
        train.main(flags + ["--bit", "32", "--fov-dilation", "0", "--fresh"])
    with pytest.raises(UserError, match="only deeplabv1_vgg9 has a LargeFOV layer"):
        train.main(flags + ["--bit", "32", "-m", "deeplabv3_r34", "--fov-dilation", "1", "--crop_size", "33"])
