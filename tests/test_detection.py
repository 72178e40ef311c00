"""Detection task: models, targets / loss, mAP, loaders (fixtures, scene set, labelme-examples' real
files), conversion with the first spiking layer bit-exact, the scripts (2-process gloo included) and
their one-line errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import detection_fixtures as F  # noqa: E402

from common import UserError  # noqa: E402
from common import run_cli  # noqa: E402
from common import scenes  # noqa: E402
from detection import data as D  # noqa: E402
from detection.boxes import decode_boxes, kmeans_anchors, postprocess  # noqa: E402
from detection.loss import build_targets, distill_loss, yolo_loss  # noqa: E402
from detection.metrics import DetectionMetric, average_precision, finding_and_naming, interpolated_ap, voc_map  # noqa: E402
from detection.models import VOC_ANCHORS, get_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET = os.path.join(REPO, "detection")
HAVE_FMNIST = os.path.isfile(os.path.join(scenes.fashion_mnist_dir(), "t10k-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed (scripts/setup.sh)")


# ---------------------------------------------------------------------------------------- models
@torch.no_grad()
def test_model_shapes_416_gives_13x13():
    for version in ("yolov2_tiny", "yolov2_r34"):
        m = get_model(version, 20, VOC_ANCHORS, bit=4, width=0.25).eval()
        out = m(torch.zeros(1, 3, 416, 416))
        assert out.shape == (1, 13 * 13 * 5, 25), version
        full = get_model(version, 20, VOC_ANCHORS, bit=4)
        assert full.pred.out_channels == 125 and full.pred.kernel_size == (1, 1) and full.pred.in_channels == 1024
    tiny = get_model("yolov2_tiny", 20)
    convs = [u.conv for u in tiny.backbone]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 256, 512, 1024]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 2, 1, 1]
    assert tiny.head.conv.in_channels == tiny.head.conv.out_channels == 1024
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in tiny.modules())
    r34 = get_model("yolov2_r34", 20)
    assert r34.backbone.conv1.stride == (4, 4) and r34.backbone.conv1.kernel_size == (7, 7)
    assert [len(getattr(r34.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert r34.head4.conv.in_channels == 1536 and r34.route.conv.out_channels == 128
    half = get_model("yolov2_tiny", 3, bit=2, width=0.5)
    assert half.backbone[0].conv.out_channels == 8 and half.pred.out_channels == 5 * 8
    with pytest.raises(ValueError):
        get_model("yolov3", 20)


def test_r34_backbone_takes_the_imagenet_resnet34():
    from classification.models import get_model as cls_model
    from detection import workflow as W
    res = cls_model("resnet34", bit=32, dataset="imagenet")
    det = get_model("yolov2_r34", 20, bit=4, width=1.0)
    logs = []
    from common import pipeline
    rep = pipeline.load_backbone(det, res.state_dict(), prefix_map={"fc.": None, "": "backbone."}, log=logs.append)
    assert len(rep["loaded"]) == len([k for k in res.state_dict() if not k.startswith("fc.")])
    assert torch.equal(det.backbone.layer3[2].conv2.weight, res.layer3[2].conv2.weight)
    assert all(k.startswith(("head", "route", "pred")) or k.endswith("act_alpha") for k in rep["initialised"])
    assert W.ms_sizes(640) == list(range(320, 609, 32))


# ---------------------------------------------------------------------------------------- targets / loss
def test_target_assignment_on_known_boxes():
    anchors = [[1.0, 1.0], [2.0, 2.0], [2.2, 2.0], [4.0, 4.0]]
    # 128 input -> 4x4 grid; box centred at (1.5, 2.5) cells, 2x2 cells: anchor 1 exact, anchor 2 IoU 0.91 ignored
    box = torch.tensor([[0.5 / 4, 1.5 / 4, 2.5 / 4, 3.5 / 4]])
    t = build_targets([box], [torch.tensor([3])], anchors, (128, 128)).view(4, 4, 4, 11)
    cell = t[2, 1]                                              # row gy=2, col gx=1
    assert cell[1, 0] == 1 and cell[1, 1] == 3
    assert torch.allclose(cell[1, 2:6], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.isclose(cell[1, 6], torch.tensor(2.0 - 0.25))  # 2 - w*h (normalised area)
    assert torch.allclose(cell[1, 7:], box[0])
    assert cell[2, 0] == -1 and cell[2, 6] == -1                # IoU 2*2/(2.2*2) = 0.91 > 0.5: ignored
    assert cell[0, 0] == 0 and cell[3, 0] == 0                  # IoU 0.25 each: negatives
    assert (t[..., 0] != 0).sum() == 2                          # nothing else assigned
    # no anchor above the threshold: the best one is still the positive
    tiny = torch.tensor([[0.0, 0.0, 0.05, 0.3]])
    t2 = build_targets([tiny], [torch.tensor([0])], anchors, (128, 128))
    assert (t2[..., 0] == 1).sum() == 1 and (t2[..., 0] == -1).sum() == 0
    # smaller than a pixel at the input size: skipped
    assert (build_targets([torch.tensor([[0.1, 0.1, 0.104, 0.5]])], [torch.tensor([0])], anchors, (128, 128))[..., 0] != 0).sum() == 0


def test_decode_inverts_the_targets_and_loss_by_hand():
    anchors = [[1.0, 1.0], [2.0, 2.0], [2.2, 2.0], [4.0, 4.0]]
    C = 5
    boxes = torch.tensor([[0.12, 0.40, 0.60, 0.85], [0.55, 0.05, 0.95, 0.30]])
    labels = torch.tensor([1, 4])
    t = build_targets([boxes], [labels], anchors, (128, 128))
    pos = t[0, :, 0] == 1
    assert pos.sum() == 2
    pred = torch.zeros(1, t.shape[1], 5 + C)
    txty = t[0, pos, 2:4]
    pred[0, pos, 0:2] = torch.log(txty / (1 - txty))           # logit: sigmoid(tx) = target offset
    pred[0, pos, 2:4] = t[0, pos, 4:6]
    dec = decode_boxes(pred, anchors, (128, 128))[0, pos]
    assert torch.allclose(dec, t[0, pos, 7:11], atol=1e-5)
    assert sorted(map(tuple, dec.round(decimals=4).tolist())) == sorted(map(tuple, boxes.round(decimals=4).tolist()))
    # the loss of an all-zero prediction, term by term
    zero = torch.zeros_like(pred)
    total, parts = yolo_loss(zero, t, anchors, (128, 128))
    from detection.boxes import box_iou_pairs
    iou = box_iou_pairs(decode_boxes(zero, anchors, (128, 128))[0, pos], t[0, pos, 7:11])
    n_neg = int((t[0, :, 0] == 0).sum())
    w = t[0, pos, 6]
    assert math.isclose(parts["conf"], float(5 * ((0.5 - iou) ** 2).sum() + 0.25 * n_neg), rel_tol=1e-5)
    assert math.isclose(parts["cls"], 2 * math.log(C), rel_tol=1e-5)
    box_expect = float(((2 * math.log(2) + (t[0, pos, 4:6] ** 2).sum(-1)) * w).sum())
    assert math.isclose(parts["box"], box_expect, rel_tol=1e-5)
    assert math.isclose(parts["iou"], float(torch.nn.functional.smooth_l1_loss(iou, torch.ones(2), reduction="sum")),
                        rel_tol=1e-5)
    assert math.isclose(float(total), sum(parts.values()), rel_tol=1e-5)
    # a perfect prediction detects both boxes after post-processing
    perfect = pred.clone()
    perfect[..., 4] = -9.0
    perfect[0, pos, 4] = 9.0
    perfect[0, pos, 5 + labels] = 9.0
    det = postprocess(perfect, anchors, (128, 128), 0.3, 0.5)[0]
    assert sorted(det["labels"].tolist()) == [1, 4] and (det["scores"] > 0.99).all()


def test_loss_gradients_reach_the_right_outputs():
    anchors = [[1.0, 1.0], [2.0, 2.0], [2.2, 2.0], [4.0, 4.0]]
    box = torch.tensor([[0.5 / 4, 1.5 / 4, 2.5 / 4, 3.5 / 4]])
    t = build_targets([box], [torch.tensor([2])], anchors, (128, 128))
    pred = torch.randn(1, t.shape[1], 8, requires_grad=True)
    loss, _ = yolo_loss(pred, t, anchors, (128, 128))
    loss.backward()
    g = pred.grad[0]
    obj = t[0, :, 0]
    assert (g[obj == -1] == 0).all()                              # ignored: no loss at all
    neg = g[obj == 0]
    assert (neg[:, 4] != 0).all() and (neg[:, :4] == 0).all() and (neg[:, 5:] == 0).all()   # only "no object"
    p = g[obj == 1][0]
    assert (p[:5] != 0).all() and (p[5:] != 0).all()             # box, objectness and class terms
    # a stronger "object" logit on a negative cell raises the loss; on the positive one it lowers it
    with torch.no_grad():
        q = pred.clone()
        q[0, obj == 0, 4] += 1.0
    assert yolo_loss(q, t, anchors, (128, 128))[0] > loss


def test_distill_loss_by_hand():
    """Zero where the student predicts what the teacher does; per anchor KL(teacher || student) of the
    class distributions + squared box differences, weighted by the teacher's objectness; no gradient
    to the objectness logit or to the teacher."""
    torch.manual_seed(0)
    t = torch.randn(2, 6, 9)
    assert float(distill_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 6, 9, requires_grad=True)
    tt = t.clone().requires_grad_(True)
    loss = distill_loss(s, tt)
    pt, ps = torch.softmax(t[..., 5:], -1), torch.softmax(s.detach()[..., 5:], -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    box = ((s.detach()[..., :4] - t[..., :4]) ** 2).sum(-1)
    assert float(loss) == pytest.approx(float(((kl + box) * torch.sigmoid(t[..., 4])).sum() / 2), rel=1e-5)
    loss.backward()
    assert tt.grad is None and (s.grad[..., 4] == 0).all() and (s.grad[..., :4] != 0).all() and (s.grad[..., 5:] != 0).any()
    # an anchor the teacher sees as empty hardly counts
    t2 = t.clone()
    t2[..., 4] = -30.0
    assert float(distill_loss(s.detach(), t2)) < 1e-9 * float(loss) + 1e-9


def test_kmeans_anchors_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 2.0], [3.0, 3.0], [6.0, 2.0]])
    wh = torch.cat([c * (1 + 0.03 * torch.randn(50, 2, generator=g)) for c in centres])
    got = torch.tensor(kmeans_anchors(wh, 3))
    assert torch.allclose(got, centres[centres.prod(-1).argsort()], rtol=0.05)


# ---------------------------------------------------------------------------------------- mAP
def test_ap_hand_computed():
    # 2 ground truths; detections TP 0.9, FP 0.8, TP 0.7: recall .5 .5 1, precision 1 .5 .667
    gts = {"a": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, False]))}
    dets = [("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [50, 50, 60, 60]), ("a", 0.7, [20, 20, 30, 29])]
    assert average_precision(dets, gts, points=11) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert average_precision(dets, gts, points=0) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a duplicate of a matched box is a false positive; IoU must exceed 0.5 (exactly 0.5 is a miss)
    dets2 = [("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [0, 0, 10, 10]), ("a", 0.7, [20, 20, 30, 40])]
    assert average_precision(dets2, gts, points=0) == pytest.approx(0.5)
    # difficult: its detection is ignored, and it does not count as a positive
    gts_d = {"a": (gts["a"][0], np.array([False, True]))}
    assert average_precision([("a", 0.9, [20, 20, 30, 30]), ("a", 0.5, [0, 0, 10, 10])], gts_d, points=11) == pytest.approx(1.0)
    # no ground truth: AP undefined (left out of the mean); no detections: AP 0
    assert average_precision(dets, {"a": (np.zeros((0, 4)), np.zeros(0, bool))}) is None
    assert average_precision([], gts) == 0.0
    assert interpolated_ap(np.array([0.2, 0.4]), np.array([1.0, 1.0]), 11) == pytest.approx(5 / 11)


def test_finding_and_naming_by_hand():
    # three objects of classes 0, 1, 1 (and a difficult one, left out); detections: the first object found as
    # class 0 (0.9), the second found twice, best as class 0 (0.8, wrong) and as class 1 (0.6), the third missed
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], float)
    im = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [20, 20, 30, 31], [80, 80, 90, 90]], float),
          "scores": np.array([0.9, 0.8, 0.6, 0.7]), "labels": np.array([0, 0, 1, 1]),
          "gt_boxes": gt, "gt_labels": np.array([0, 1, 1, 0]), "difficult": np.array([False, False, False, True])}
    r = finding_and_naming({"a": im}, 2)
    assert r["confusion"] == [[1, 0, 0], [1, 0, 1]]        # rows: true class; columns: named 0, 1, none
    assert r["naming_acc"] == pytest.approx(50.0)           # of the 2 objects found, 1 named right
    # class-agnostic: NMS keeps 0.9, 0.8 and 0.7 (the 0.6 duplicate goes): TP, TP, FP over 3 positives, so
    # recall 1/3, 2/3, 2/3 at precision 1, 1, 2/3: precision 1 up to recall 0.6, nothing beyond (11-point)
    assert r["map_agnostic"] == pytest.approx(100 * 7 / 11)
    none = finding_and_naming({"a": {**im, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}}, 2)
    assert none["naming_acc"] is None and none["map_agnostic"] == 0.0 and none["confusion"] == [[0, 0, 1], [0, 0, 2]]


def _random_case(seed, n_img=12, C=3):
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(n_img):
        n = int(rng.integers(1, 4))
        xy = rng.uniform(0, 150, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(20, 60, (n, 2))], 1)
        gl = rng.integers(0, C, n)
        keep = rng.uniform(size=n) < 0.8
        boxes = gt[keep] + rng.normal(0, 6, (int(keep.sum()), 4))
        labels = gl[keep].copy()
        k = int(rng.integers(0, 3))                          # false positives
        fxy = rng.uniform(0, 150, (k, 2))
        boxes = np.concatenate([boxes, np.concatenate([fxy, fxy + 30], 1)])
        labels = np.concatenate([labels, rng.integers(0, C, k)])
        images[i + 1] = {"boxes": boxes, "scores": rng.uniform(0.05, 1, len(boxes)), "labels": labels,
                         "gt_boxes": gt, "gt_labels": gl, "difficult": np.zeros(n, bool), "id": i + 1}
    return images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_agrees_with_pycocotools(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import io
    C = 3
    images = _random_case(seed, C=C)
    gt = COCO()
    anns, aid = [], 1
    for k, im in images.items():
        for b, l in zip(im["gt_boxes"], im["gt_labels"]):
            anns.append({"id": aid, "image_id": k, "category_id": int(l) + 1, "iscrowd": 0, "area": float((b[2] - b[0]) * (b[3] - b[1])),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
            aid += 1
    gt.dataset = {"images": [{"id": k, "width": 300, "height": 300} for k in images], "annotations": anns,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(C)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        m = DetectionMetric(C, VOC_ANCHORS)
        m.images = images
        dt = gt.loadRes(m.results_coco())
        ev = COCOeval(gt, dt, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, -1]           # [recall thresholds, classes] at IoU .5, all areas, 100 dets
    ours101 = voc_map(images, C, 0.5, 101)[1]
    for c in range(C):
        assert ours101[c] == pytest.approx(float(prec[:, c].mean()), abs=1e-6), c
    # and the metric's COCOeval path gives the same AP50
    from detection.metrics import coco_evaluate
    with contextlib.redirect_stdout(io.StringIO()):
        stats = coco_evaluate(gt, m.results_coco())
    assert stats["AP50"] == pytest.approx(100 * np.mean(ours101), abs=1e-4)


def test_metric_update_compute_in_pixels():
    anchors = [[1.0, 1.0], [2.0, 2.0]]
    boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    t = build_targets([boxes], [torch.tensor([1])], anchors, (64, 64))
    pos = t[0, :, 0] == 1
    pred = torch.full((1, t.shape[1], 7), -9.0)
    txty = t[0, pos, 2:4].clamp(1e-4, 1 - 1e-4)
    pred[0, pos, 0:2] = torch.log(txty / (1 - txty))
    pred[0, pos, 2:4] = t[0, pos, 4:6]
    pred[0, pos, 4] = 9.0
    pred[0, pos, 6] = 9.0
    batch = {"image": torch.zeros(1, 3, 64, 64), "orig_size": [(200, 100)], "gt_boxes": [torch.tensor([[25.0, 50, 75, 150]])],
             "gt_labels": [torch.tensor([1])], "difficult": [torch.tensor([False])], "index": [0], "id": ["x"]}
    m = DetectionMetric(2, anchors, ["a", "b"])
    m.update(pred, batch)
    res = m.compute()
    assert res["map"] == 100.0 and res["ap"] == {"a": None, "b": 100.0}
    assert np.allclose(m.images[0]["boxes"][0], [25, 50, 75, 150], atol=0.05)


# ---------------------------------------------------------------------------------------- loaders
def test_voc_loader_on_fixture(tmp_path):
    root = F.tiny_voc(str(tmp_path))
    d = D.build_datasets("voc", root, train_size=64, val_size=64, classes_file=os.path.join(root, "classes.txt"))
    assert d.classes == ["cat", "dog"]
    assert [r.id for r in d.train.records] == ["000001", "000002", "000003", "2012_000001"]   # 07 + 12 trainval
    assert [r.id for r in d.val.records] == ["000004", "000005"]
    r2 = d.train.records[1]
    assert r2.labels.tolist() == [1] and r2.boxes.tolist() == [[9.0, 9.0, 40.0, 45.0]]         # difficult left out
    r4 = d.val.records[0]
    assert r4.difficult.tolist() == [False, True] and r4.boxes[0].tolist() == [10.0, 10.0, 40.0, 50.0]
    item = d.val[0]
    assert item["image"].shape == (3, 64, 64) and item["orig_size"] == (64, 64)
    assert torch.allclose(item["boxes"][0], torch.tensor([10, 10, 40, 50]) / 64.0)
    # the training transforms keep the boxes on the drawn (bright) rectangle
    torch.manual_seed(0)
    for _ in range(6):
        it = d.train[0]
        img = it["image"] * torch.tensor(D.STD).view(3, 1, 1) + torch.tensor(D.MEAN).view(3, 1, 1)
        if len(it["boxes"]) == 0:
            continue
        x1, y1, x2, y2 = (it["boxes"][0] * 64).round().int().tolist()
        inside = img[:, y1 + 2:y2 - 2, x1 + 2:x2 - 2]
        assert inside.numel() == 0 or inside.mean() > 0.6
    # a VOC2012 that links to VOC2007 counts once
    os.rename(os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "old2012"))
    os.symlink("VOC2007", os.path.join(root, "VOCdevkit", "VOC2012"))
    d2 = D.build_datasets("voc", root, train_size=64, val_size=64, classes_file=os.path.join(root, "classes.txt"),
                          need_val=False)
    assert len(d2.train) == 3


@needs_fmnist
def test_scene_set_voc_and_coco_loaders_agree(tmp_path):
    p = scenes.make_scenes(str(tmp_path / "s"), 4, 3, size=96, seed=1, log=None)
    voc = D.build_datasets("voc", p.root, train_size=96, val_size=96, classes_file=p.classes)
    coco = D.build_datasets("coco", p.root, train_size=96, val_size=96)
    assert coco.classes == voc.classes == list(scenes.CLASSES)
    for a, b in zip(voc.val.records + voc.train.records, coco.val.records + coco.train.records):
        assert int(a.id) == b.id
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    batch = D.collate([coco.val[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 96, 96) and len(batch["gt_boxes"]) == 3
    # a metric fed the ground truth as detections scores 100 with COCOeval as well
    m = DetectionMetric(10, VOC_ANCHORS, coco.classes, coco=coco.val.coco)
    for k, r in enumerate(coco.val.records):
        m.images[k] = {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels, "gt_boxes": r.boxes,
                       "gt_labels": r.labels, "difficult": r.difficult, "id": r.id}
    res = m.compute()
    assert res["map_voc07"] == pytest.approx(100.0) and res["coco"]["AP"] == pytest.approx(100.0)


@pytest.mark.skipif(not F.labelme_available(), reason="labelme-examples is not installed (scripts/setup.sh installs it)")
def test_loaders_on_labelme_examples_real_files(tmp_path):
    root, classes = F.labelme_voc_root(str(tmp_path))
    d = D.build_datasets("voc", root, train_size=416, val_size=416, classes_file=classes)
    assert len(d.classes) == 20 and d.classes[0] == "aeroplane"            # _background_ skipped
    assert len(d.val) == 3
    rec = {r.id: r for r in d.val.records}["2011_000003"]
    assert [d.classes[i] for i in rec.labels] == ["person", "person"]
    assert rec.boxes[0].tolist() == pytest.approx([190.0, 106.369, 313.0, 329.369], abs=1e-3)   # float coords, 1-based
    item = d.val[0]
    assert item["image"].shape == (3, 416, 416) and item["orig_size"][1] == 500
    recs, names, info = D.load_coco(F.LABELME_COCO, os.path.join(F.LABELME_COCO, "annotations.json"))
    assert names == d.classes and len(recs) == 3
    assert all(os.path.isfile(r.image) for r in recs)
    by_file = {os.path.basename(r.image): r for r in recs}
    c = by_file["2011_000003.jpg"]
    assert c.boxes[0].tolist() == pytest.approx([191.0, 107.0, 314.0, 328.0])
    assert [names[i] for i in c.labels][0] == "person"


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        D.build_datasets("voc", str(tmp_path / "nope"), train_size=64, val_size=64)
    root = F.tiny_voc(str(tmp_path / "a"))
    only_dog = os.path.join(root, "dog.txt")
    with open(only_dog, "w") as f:
        f.write("dog\n")
    with pytest.raises(UserError, match="unknown class name 'cat'"):
        D.build_datasets("voc", root, train_size=64, val_size=64, classes_file=only_dog)
    with pytest.raises(UserError, match="--classes .* does not exist"):
        D.build_datasets("voc", root, train_size=64, val_size=64, classes_file=only_dog + ".x")
    xml = os.path.join(root, "VOCdevkit", "VOC2007", "Annotations", "000004.xml")
    with open(xml, "wb") as f:
        f.write(F.voc_xml("000004.jpg", (64, 64), []))
    with pytest.raises(UserError, match="has no <object>"):
        D.build_datasets("voc", root, train_size=64, val_size=64, classes_file=os.path.join(root, "classes.txt"))


def test_coco_without_area_evaluates_and_string_ids_are_refused(tmp_path):
    ann = str(tmp_path / "instances.json")
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 12]]},                          # a triangle, no area
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [15, 5, 20, 8]},   # no segmentation, area, iscrowd
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 15, 10, 10], "area": 7.0, "iscrowd": 0}]
    F.coco_json(ann, images, anns, [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    recs, names, info = D.load_coco(str(tmp_path), ann)
    areas = [a["area"] for a in info.coco.dataset["annotations"]]
    assert 40 <= areas[0] <= 70 and areas[1] == 160.0 and areas[2] == 7.0     # mask area, w*h, given kept
    m = DetectionMetric(2, VOC_ANCHORS, names, coco=info)
    r = recs[0]
    m.images[0] = {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels, "gt_boxes": r.boxes,
                   "gt_labels": r.labels, "difficult": r.difficult, "id": r.id}
    assert m.compute()["coco"]["AP"] == pytest.approx(100.0)
    images[0]["id"] = "img1"
    for a in anns:
        a["image_id"] = "img1"
    F.coco_json(ann, images, anns, [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    with pytest.raises(UserError, match=r"instances.json has the image id 'img1', not an integer") as e:
        D.load_coco(str(tmp_path), ann)
    assert "\n" not in str(e.value)


def test_voc_list_with_a_repeated_id_uses_it_once(tmp_path, capsys, monkeypatch):
    from common import dist
    monkeypatch.setattr(dist, "_warned", set())
    root = F.tiny_voc(str(tmp_path))
    with open(os.path.join(root, "VOCdevkit", "VOC2007", "ImageSets", "Main", "test.txt"), "a") as f:
        f.write("000004\n000005 1\n")
    d = D.build_datasets("voc", root, train_size=64, val_size=64, need_train=False)
    assert [r.id for r in d.val.records] == ["000004", "000005"]
    assert "test.txt lists 2 repeated image id(s) (000004, 000005)" in capsys.readouterr().err


def test_all_difficult_test_set_has_no_map(capsys, monkeypatch):
    from common import dist
    monkeypatch.setattr(dist, "_warned", set())
    gt = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
    im = {"boxes": gt, "scores": np.ones(1), "labels": np.array([0]), "gt_boxes": gt, "gt_labels": np.array([0]),
          "difficult": np.array([True]), "id": "x"}
    assert voc_map({0: im}, 2) == (None, [None, None])
    m = DetectionMetric(2, VOC_ANCHORS, ["a", "b"])
    m.images[0] = im
    res = m.compute()
    assert res["map"] == 0.0 and res["ap"] == {"a": None, "b": None}
    assert "mAP is undefined" in capsys.readouterr().err
    m.images[0] = {**im, "difficult": np.array([False])}
    assert m.compute()["map"] == 100.0 and "undefined" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("version", ["yolov2_tiny", "yolov2_r34"])
def test_conversion_first_layer_bit_exact(version):
    import quant
    import snn
    torch.manual_seed(0)
    ann = quant.randomize_bn(get_model(version, 4, bit=2, width=0.125, alpha_init=1.0))
    net = snn.convert(ann)
    assert net.T == 3
    x = torch.randn(2, 3, 64, 64)
    with snn.Monitor(ann, net) as mon:
        ann_out, steps = mon.run(x)
        layers = mon.summary()["layers"]
    first = "backbone.0.act" if version == "yolov2_tiny" else "backbone.act1"
    assert layers[0]["name"] == first and layers[0]["agreement"] == 1.0
    out = net(x)
    assert out.shape == ann_out.shape == (2, 2 * 2 * 5, 9)
    assert torch.isfinite(out).all()
    assert len(layers) == len([m for m in ann.modules() if isinstance(m, quant.QuantAct)])


# ---------------------------------------------------------------------------------------- scripts
@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    if not HAVE_FMNIST:
        pytest.skip("dataset-fashion-mnist is not installed")
    return scenes.make_scenes(str(tmp_path_factory.mktemp("det_scenes")), 8, 4, size=64, seed=0, log=None)


def _env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(args, cwd=DET, timeout=240):
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _cli(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.fixture(scope="module")
def trained(scene_root, tmp_path_factory):
    """32-bit then 2-bit tiny detectors trained for a few iterations with the original's command (2 processes)."""
    out = str(tmp_path_factory.mktemp("det_weights"))
    common = ["-d", "voc", "-v", "yolov2_tiny", "--batch_size", "2", "-root", scene_root.root, "--classes",
              scene_root.classes, "--width", "0.125", "--train_size", "64", "--val_size", "64", "--epochs", "1",
              "--num_workers", "0", "--save_folder", out, "--no-progress", "--seed", "0", "--max-iters", "2"]
    r = _run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "train.py", "-ms", "--ema",
              "--sybn", "--bit", "32"] + common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("hint:") == 1 and "python -m detection.pretrain" in r.stdout  # few images, no --init
    best32 = os.path.join(out, "voc", "yolov2_tiny_32bit", "model_best.pth.tar")
    assert os.path.isfile(best32) and os.path.isfile(os.path.join(out, "voc", "yolov2_tiny_32bit", "checkpoint.pth.tar"))
    from detection import train as T
    T.main(["--bit", "2", "--init", best32, "--anchors", "voc", "--lr", "1e-4"] + common)
    best2 = os.path.join(out, "voc", "yolov2_tiny_2bit", "model_best.pth.tar")
    ck = torch.load(best2, weights_only=True)
    assert ck["bit"] == 2 and ck["width"] == 0.125 and ck["num_classes"] == 10 and ck["classes"] == list(scenes.CLASSES)
    return {"out": out, "best32": best32, "best2": best2, "common": common}


def test_train_resume_auto(trained):
    from detection import train as T
    rec = T.main(["--bit", "2", "--resume", "auto"] + trained["common"] + ["--epochs", "2", "--max-iters", "1"])
    assert rec["epochs"] == 2 and [h["epoch"] for h in rec["history"]] == [1, 2]


def test_train_with_a_teacher(trained, tmp_path, capsys):
    """--teacher: the 2-bit student also learns the 32-bit model's predictions (its loss has a kd part);
    a missing teacher, a negative weight or a teacher of other anchors is a one-line error."""
    from detection import train as T
    argv = ["--bit", "2", "--init", trained["best32"], "--teacher", trained["best32"], "--lr", "1e-4"] + trained["common"]
    rec = T.main(argv + ["--save_folder", str(tmp_path / "kd")])
    assert rec["history"][0]["train_kd"] > 0
    h = rec["history"][0]
    assert h["train_loss"] == pytest.approx(sum(h[f"train_{k}"] for k in ("conf", "cls", "box", "iou", "kd")), rel=1e-4)
    for extra, needle in ((["--teacher", str(tmp_path / "none.pth")], "does not exist"),
                          (["--kd-weight", "-1"], "--kd-weight -1.0 must not be negative"),
                          (["--anchors", "1,1 2,2 3,3 4,4 5,5"], "has the anchors")):
        code, err = _cli(T.main, argv + ["--save_folder", str(tmp_path / "bad")] + extra, capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_iters_per_epoch(trained, tmp_path, capsys):
    """--iters-per-epoch N: N training batches an epoch whatever --max-iters allows; below 1 is a one-line error."""
    from detection import train as T
    argv = ["--bit", "32", "--init", trained["best32"]] + trained["common"] + ["--iters-per-epoch", "1"]
    T.main(argv + ["--save_folder", str(tmp_path / "one")])
    assert "epochs 0->1 of 1 batch(es)" in capsys.readouterr().out
    code, err = _cli(T.main, argv + ["--save_folder", str(tmp_path / "bad"), "--iters-per-epoch", "0"], capsys)
    assert code == 2 and "--iters-per-epoch" in err and len(err.splitlines()) == 1, err


def test_snn_ft_fresh_into_a_used_folder_under_torchrun(trained, scene_root, tmp_path):
    """--fresh with two processes: the old run moves aside once, both processes go on (none waits alone)."""
    ft = ["-d", "voc", "-v", "yolov2_tiny", "--bit", "2", "--init", trained["best2"], "-root", scene_root.root,
          "--classes", scene_root.classes, "--num_workers", "0", "--no-progress", "--save_folder", str(tmp_path),
          "--max-iters", "1", "--force", "--no-eval-before", "--no-tensorboard", "-bs", "2"]
    from detection import snn_ft as F
    F.main(ft)
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "snn_ft.py"] + ft + ["--fresh"])
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = os.path.join(str(tmp_path), "voc", "yolov2_tiny_2bit_ft")
    import glob
    assert len(glob.glob(run_dir + ".replaced-*")) == 1 and os.path.isfile(os.path.join(run_dir, "model_best.pth.tar"))


def test_eval_spike_seed_command_under_torchrun(trained, scene_root, tmp_path):
    out = str(tmp_path / "snn.json")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "eval.py", "-d", "voc", "--cuda",
              "-v", "yolov2_tiny", "--bit", "2", "--spike", "--init", trained["best2"], "-root", scene_root.root,
              "--classes", scene_root.classes, "-size", "64", "--num_workers", "0", "--metrics-out", out,
              "--no-progress", "--plot", "-bs", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    rec = json.load(open(out))
    for k in ("map", "ann_map", "per_step_map", "T", "neuron", "layers", "sops", "checkpoint"):
        assert k in rec, k
    assert rec["T"] == 3 and rec["neuron"] == "signed" and len(rec["per_step_map"]) == 3
    assert rec["snn"]["images"] == 4 and rec["checkpoint"] == trained["best2"] and rec["ap"] == rec["snn"]["ap"]
    assert rec["naming_acc"] == rec["snn"]["naming_acc"] and rec["ann_map_agnostic"] == rec["ann"]["map_agnostic"]
    assert len(rec["confusion"]) == len(rec["classes"]) and len(rec["ann_confusion"][0]) == len(rec["classes"]) + 1
    assert rec["layers"][0]["agreement"] == 1.0
    assert os.path.isfile(str(tmp_path / "snn_map_vs_t.png"))
    # unsigned, in-process, and the ANN alone
    from detection import eval as E
    base = ["-d", "voc", "-v", "yolov2_tiny", "--bit", "2", "--init", trained["best2"], "-root", scene_root.root,
            "--classes", scene_root.classes, "-size", "64", "--num_workers", "0", "--no-progress"]
    u = E.main(base + ["--spike", "-u", "--metrics-out", str(tmp_path / "u.json")])
    assert u["neuron"] == "unsigned" and u["ann_map"] == pytest.approx(rec["ann_map"])
    a = E.main(base + ["--metrics-out", str(tmp_path / "a.json")])
    assert a["map"] == pytest.approx(rec["ann_map"])


def test_snn_ft_and_demo(trained, scene_root, tmp_path):
    from detection import demo as Dm
    from detection import eval as E
    from detection import snn_ft as S
    base = ["-d", "voc", "-v", "yolov2_tiny", "--bit", "2", "--init", trained["best2"], "-root", scene_root.root,
            "--classes", scene_root.classes, "-size", "64", "--num_workers", "0", "--no-progress", "-bs", "4"]
    rec = S.main(base + ["--save_folder", str(tmp_path), "--max-iters", "1", "--score-batches", "1", "--no-eval-before"])
    ft = os.path.join(str(tmp_path), "voc", "yolov2_tiny_2bit_ft", "model_best.pth.tar")
    assert rec["finetuned"] and os.path.isfile(ft) and rec["finetune"]
    ev = E.main(base[:7] + [ft] + base[8:] + ["--spike", "--metrics-out", str(tmp_path / "ft.json")])
    assert ev["finetuned"] and ev["map"] == pytest.approx(rec["map"])
    imgs = os.path.join(scene_root.voc2007, "JPEGImages")
    written = Dm.main(["--init", ft, "--bit", "2", "--spike", "--path", imgs, "--out", str(tmp_path / "png"),
                       "-size", "64", "--vis_thresh", "0.0"])
    assert len(written) == 12 and all(os.path.isfile(p) for p in written)


def test_snn_ft_on_coco_scores_its_training_batches(trained, scene_root, tmp_path):
    """The accept / revert score runs on training images, which the COCO val set does not hold: it is the
    VOC-style mAP of their boxes, not COCOeval of the val set."""
    from detection import snn_ft as S
    rec = S.main(["-d", "coco", "-v", "yolov2_tiny", "--bit", "2", "--init", trained["best2"], "-root",
                  scene_root.root, "-size", "64", "--num_workers", "0", "--no-progress", "-bs", "4",
                  "--save_folder", str(tmp_path), "--max-iters", "1", "--score-batches", "1", "--no-eval-before",
                  "--no-tfboard", "--method", "fastsnn"])
    assert rec["finetuned"] and rec["finetune"] and os.path.isfile(os.path.join(str(tmp_path), "coco",
                                                                                "yolov2_tiny_2bit_ft", "model_best.pth.tar"))


def test_snn_ft_methods(trained, scene_root, tmp_path, capsys):
    """--method fastsnn+e2e with the YOLO loss on the labels, --ft-accept local; recorded in JSON and checkpoint."""
    from detection import snn_ft as S
    base = ["-d", "voc", "-v", "yolov2_tiny", "--bit", "2", "--init", trained["best2"], "-root", scene_root.root,
            "--classes", scene_root.classes, "-size", "64", "--num_workers", "0", "--no-progress", "-bs", "4",
            "--max-iters", "1", "--score-batches", "1", "--no-eval-before", "--no-tfboard"]
    rec = S.main(base + ["--save_folder", str(tmp_path / "a"), "--method", "fastsnn+e2e", "--e2e-epochs", "2",
                         "--ft-accept", "local", "--local-batches", "1"])
    out = capsys.readouterr().out
    assert "method fastsnn+e2e (e2e: 1 batches x 2 epoch(s), lr 0.001, loss yolo), layer-wise steps kept if the layer" in out
    opts = {"accept": "local", "local_batches": 1, "e2e_batches": None, "e2e_epochs": 2, "e2e_lr": None,
            "e2e_loss": "yolo", "min_steps": 50}
    assert rec["method"] == "fastsnn+e2e" and rec["method_options"] == opts
    e2e = rec["finetune"][-1]
    assert e2e["layer"] == "end-to-end" and len(e2e["epochs"]) == 2 and all("score" in e for e in e2e["epochs"])
    assert all(math.isfinite(e["loss_mean"]) and e["loss_mean"] > 0 for e in e2e["epochs"])
    assert all("local_error_before" in h for h in rec["finetune"][:-1])
    ck = torch.load(os.path.join(str(tmp_path / "a"), "voc", "yolov2_tiny_2bit_ft_fastsnn-e2e", "model_best.pth.tar"),
                    weights_only=True)
    assert ck["method"] == "fastsnn+e2e" and ck["method_options"] == opts
    # the YOLO loss of the end-to-end stage is the training loss on the batch's boxes
    from detection import workflow as W
    from detection.loss import build_targets, yolo_loss
    anchors = ck["anchors"]
    pred = torch.randn(2, 4 * len(anchors), 5 + 10)
    batch = {"image": torch.zeros(2, 3, 64, 64), "boxes": [torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.zeros(0, 4)],
             "labels": [torch.tensor([3]), torch.zeros(0, dtype=torch.long)]}
    want = yolo_loss(pred, build_targets(batch["boxes"], batch["labels"], anchors, (64, 64)), anchors, (64, 64))[0]
    assert torch.equal(W.e2e_yolo_loss(anchors)(pred, None, batch), want)
    code, err = _cli(S.main, base + ["--save_folder", str(tmp_path / "b"), "--method", "e2e+fastsnn"], capsys)
    assert code == 2 and "e2e must come last" in err and len(err.splitlines()) == 1


def test_bad_input_one_line_errors(trained, scene_root, tmp_path, capsys):
    from detection import eval as E
    from detection import train as T
    base = ["-d", "voc", "-root", scene_root.root, "--classes", scene_root.classes, "-size", "64", "--num_workers", "0",
            "--no-progress"]

    def check(main, argv, *needles):
        code, err = _cli(main, argv, capsys)
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and " — " in err, err
        for n in needles:
            assert n in err, err
    check(E.main, ["-root", str(tmp_path / "missing"), "--init", trained["best2"], "--bit", "2"], "does not exist")
    check(E.main, base + ["--bit", "32", "--spike", "--init", trained["best32"]], "--spike with --bit 32")
    check(E.main, base + ["-v", "yolov2_r34", "--bit", "2", "--init", trained["best2"]], "holds a yolov2_tiny model")
    eleven = tmp_path / "eleven.txt"
    eleven.write_text("\n".join(list(scenes.CLASSES) + ["hat"]) + "\n")
    check(E.main, base[:4] + ["--classes", str(eleven)] + base[6:] + ["--bit", "2", "--init", trained["best2"]],
          "trained for 10 classes")
    check(E.main, base + ["--bit", "2", "--init", str(tmp_path / "none.pth")], "does not exist")
    # broken data: an XML without objects, an unknown class, an image that does not decode
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(scene_root.root, bad, symlinks=True)
    ann = bad / "VOCdevkit" / "VOC2007" / "Annotations"
    orig = (ann / "000009.xml").read_text()
    (ann / "000009.xml").write_text(orig.replace("<name>", "<name>x", 1))
    argv = ["-d", "voc", "-root", str(bad), "--classes", scene_root.classes, "-size", "64", "--num_workers", "0",
            "--no-progress", "--bit", "2", "--init", trained["best2"]]
    check(E.main, argv, "unknown class name")
    import re
    (ann / "000009.xml").write_text(re.sub(r"<object>.*</object>", "", orig, flags=re.S))
    check(E.main, argv, "has no <object>")
    (ann / "000009.xml").write_text(orig)
    (bad / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000010.jpg").unlink()
    (bad / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000010.jpg").write_bytes(b"not a jpeg at all")
    check(E.main, argv, "cannot be decoded", "000010.jpg")
    check(T.main, ["-d", "voc", "-root", str(bad), "--classes", scene_root.classes, "--train_size", "100"],
          "not a multiple of 32")


# ---------------------------------------------------------------------------------------- offline demo
@needs_fmnist
def test_pretrain_backbone_loads_into_the_detector(scene_root, tmp_path):
    from common import pipeline
    from detection import pretrain as P
    from detection import train as T
    bb = str(tmp_path / "bb.pth.tar")
    rec = P.main(["--out", bb, "--width", "0.125", "--size", "32", "--train", "64", "--test", "16", "--epochs", "1",
                  "-bs", "16"])
    assert 0.0 <= rec["accuracy"] <= 100.0 and len(rec["history"]) == 1
    sd = torch.load(bb, weights_only=True)["state_dict"]
    assert sd and all(k.startswith("backbone.") for k in sd)
    model = get_model("yolov2_tiny", 10, None, 32, 0.125)
    got = pipeline.load_backbone(model, bb, log=lambda s: None)
    own_bb = [k for k in model.state_dict() if k.startswith("backbone.")]
    assert sorted(got["loaded"]) == sorted(k for k in own_bb if k in sd)
    assert not any(k.startswith(("head.", "pred.")) for k in got["loaded"])
    assert torch.equal(model.state_dict()["backbone.0.conv.weight"], sd["backbone.0.conv.weight"])
    # the 32-bit stage starts from it (train.py --init)
    r = T.main(["-d", "voc", "-v", "yolov2_tiny", "-root", scene_root.root, "--classes", scene_root.classes,
                "--width", "0.125", "--train_size", "64", "--val_size", "64", "--epochs", "1", "-bs", "2",
                "--num_workers", "0", "--no-progress", "--no-tfboard", "--max-iters", "1", "--init", bb,
                "--save_folder", str(tmp_path / "w"), "--seed", "0"])
    assert r["epochs"] == 1
    code = subprocess.run([sys.executable, "-m", "detection.pretrain", "--out", bb, "--size", "40"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert code.returncode == 2 and "not a multiple of 32" in code.stderr


@needs_fmnist
def test_offline_demo_tiny_end_to_end(tmp_path):
    from detection import offline_demo as O
    out = str(tmp_path / "demo")
    argv = ["--out", out, "--train", "8", "--test", "4", "--size", "64", "--width", "0.125", "--pretrain", "32",
            "--pretrain-epochs", "1", "--pretrain-size", "32", "--epochs-fp", "1", "--epochs-q", "1",
            "--batch-size", "4", "--ft-iters", "1", "--workers", "0", "--train-q", "4"]
    s = O.main(argv)
    assert s["pretrain_accuracy"] is not None and set(s["ann_map"]) == set(s["ann_naming_acc"]) == {32, 4, 3, 2}
    assert all(v is None or 0 <= v <= 100 for v in s["ann_map_agnostic"].values())   # the trainings' finding figure
    assert "| 2 | 3 |" in s["table"] and len(s["snn"]) == 6
    for f in ("results.md", "summary.json", "map_vs_t.png", "layers.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert "pretrained as a Fashion-MNIST classifier" in open(os.path.join(out, "results.md")).read()
    hist = {b: json.load(open(os.path.join(out, "weights", "voc", f"yolov2_tiny_{b}bit", "history.json")))["history"][0]
            for b in (3, 2)}
    assert "train_kd" in hist[2] and "train_kd" not in hist[3]   # --distill-bits 2: the 2-bit stage distils the 32-bit ANN
    run_args = {b: json.load(open(os.path.join(out, "weights", "voc", f"yolov2_tiny_{b}bit", "metrics_ann.json")))["args"]
                for b in (32, 4, 2)}
    assert run_args[4]["lr"] == 1e-4 and run_args[2]["lr"] == 6e-4                            # --lr-q, --lr-2bit
    assert run_args[4]["iters_per_epoch"] == 1 and run_args[32]["iters_per_epoch"] is None   # --train-q 4: 1 batch of 4
    assert run_args[32]["wp_epoch"] == 0                                                       # --warmup-fp 0
    for bad in (["--train-q", "0"], ["--warmup-fp", "-1"], ["--lr-2bit", "0"]):
        with pytest.raises(UserError, match=bad[0]):
            O.main(argv + bad)
    with pytest.raises(UserError, match="--distill-bits '5'"):
        O.main(argv + ["--distill-bits", "5"])
    with pytest.raises(UserError, match="other settings.*--seed"):
        O.main(argv + ["--seed", "1"])       # a resumed run must be the same recipe (--fresh to start over)


def test_voc_root_without_image_sets_uses_every_annotation(tmp_path, capsys):
    """labelme's VOC export (Annotations/, JPEGImages/, class_names.txt with _background_ first, no
    ImageSets/Main): every annotated image for both splits, with a warning, and its class_names.txt."""
    import shutil
    root = F.tiny_voc(str(tmp_path / "src"))
    year = os.path.join(root, "VOCdevkit", "VOC2007")
    flat = tmp_path / "data_dataset_voc"
    for d in ("Annotations", "JPEGImages"):
        shutil.copytree(os.path.join(year, d), flat / d)
    (flat / "class_names.txt").write_text("_background_\ncat\ndog\n")
    data = D.build_datasets("voc", str(flat), train_size=64, val_size=64, aug="none")
    assert data.classes == ["cat", "dog"] and len(data.train) == len(data.val) == 5
    assert "no ImageSets/Main" in capsys.readouterr().err


def test_a_box_outside_its_image_is_left_out(tmp_path, capsys, monkeypatch):
    """A box wholly outside the image (a wrong <size>, a rotated photo) is no object there: left out of
    training and of the VOC metric's ground truth, named in one warning when the records are read."""
    from common import dist
    monkeypatch.setattr(dist, "_warned", set())
    F.write_voc(str(tmp_path), "VOC2007", {
        "trainval": [("000001", (64, 48), [("cat", (5, 6, 30, 40), 0)])],
        "test": [("000002", (64, 48), [("cat", (5, 6, 30, 40), 0), ("dog", (70, 2, 90, 20), 0)])]},
        classes=("cat", "dog"))
    data = D.build_datasets("voc", str(tmp_path), train_size=64, val_size=64, aug="none")
    item = data.val[0]
    assert item["gt_labels"].tolist() == [0] and len(item["gt_boxes"]) == 1 and len(item["difficult"]) == 1
    assert "1 image(s) have boxes that are empty or lie outside the image (000002.jpg)" in capsys.readouterr().err


def _v2_flip_resize(size, flip, sanitize):
    """The torchvision v2 class pipeline that :class:`detection.data.FlipResize` reproduces."""
    from torchvision.transforms import v2
    ops = ([v2.RandomHorizontalFlip()] if flip else []) + [v2.Resize((size, size), antialias=True)]
    ops += [v2.SanitizeBoundingBoxes(min_size=1.0)] if sanitize else []
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(D.MEAN, D.STD)])


@settings(max_examples=60, deadline=None)
@given(h=st.integers(2, 80), w=st.integers(2, 80), size=st.integers(8, 96), flip=st.booleans(),
       sanitize=st.booleans(), n=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
def test_flip_resize_gives_the_v2_pipelines_samples(h, w, size, flip, sanitize, n, seed):
    """The image, boxes and labels of the v2 pipeline bit for bit, and the same random draws, boxes of
    every size (those under a pixel after the resize dropped with their labels when sanitising)."""
    from torchvision import tv_tensors
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * torch.rand(n, 1, generator=g) ** 3
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]).float())], 1)
    labels = torch.randint(0, 7, (n,), generator=g)
    outs, states = [], []
    fast = D.FlipResize(size, flip, sanitize)
    for tf, alone in ((fast, fast), (_v2_flip_resize(size, flip, sanitize), _v2_flip_resize(size, flip, False))):
        torch.manual_seed(seed)
        target = {"boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(h, w)),
                  "labels": labels.clone()}
        x, t = tf(tv_tensors.Image(img.clone()), target)
        outs.append((x.as_subclass(torch.Tensor), t["boxes"].as_subclass(torch.Tensor), t["labels"]))
        states.append(torch.get_rng_state())
        torch.manual_seed(seed)
        outs.append((alone(tv_tensors.Image(img.clone())).as_subclass(torch.Tensor),))   # the image alone
    (x1, b1, l1), (y1,), (x2, b2, l2), (y2,) = outs
    assert x1.shape == (3, size, size) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(b1, b2) and torch.equal(l1, l2) and torch.equal(y1, y2)
    assert torch.equal(y1, x1) and torch.equal(states[0], states[1])
