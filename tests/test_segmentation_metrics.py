"""mIoU from the confusion matrix against hand-computed cases; reduction over 2 gloo processes."""
import os

import pytest
import torch
import torch.distributed as dist

from segmentation.metrics import SegMetric, confusion_matrix, scores
from spawn_util import spawn


def test_confusion_matrix_by_hand_with_ignore():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 0]])
    conf = confusion_matrix(pred, target, 3)
    # rows: ground truth, cols: prediction; the 255 pixel (predicted 2) is left out
    assert conf.tolist() == [[1, 1, 0],
                             [1, 2, 0],
                             [1, 0, 1]]
    s = scores(conf)
    # IoU_0 = 1 / (2 + 3 - 1) = 1/4; IoU_1 = 2 / (3 + 3 - 2) = 1/2; IoU_2 = 1 / (2 + 1 - 1) = 1/2
    assert s["per_class_iou"] == pytest.approx([25.0, 50.0, 50.0])
    assert s["miou"] == pytest.approx(125.0 / 3)
    assert s["pixel_acc"] == pytest.approx(100.0 * 4 / 7)
    assert s["mean_acc"] == pytest.approx(100.0 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert s["pixels"] == 7


def test_absent_classes():
    # 4 classes: class 3 neither in the ground truth nor predicted (no IoU, left out of the mean);
    # class 2 predicted but absent from the ground truth (IoU 0, counted)
    target = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 2, 1, 1, 0])
    s = scores(confusion_matrix(pred, target, 4))
    # IoU_0 = 1 / (2 + 2 - 1) = 1/3, IoU_1 = 2 / (3 + 2 - 2) = 2/3, IoU_2 = 0 / (0 + 1 - 0) = 0
    assert s["per_class_iou"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert s["per_class_iou"][3] is None
    assert s["miou"] == pytest.approx(100.0 / 3)
    assert s["classes_present"] == 2
    assert scores(torch.zeros(3, 3, dtype=torch.long))["miou"] == 0.0  # nothing seen at all


def test_finding_and_naming_split_by_hand():
    # 0 = background; 1, 2 objects. Ground truth / prediction of 8 pixels:
    target = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2])
    s = scores(confusion_matrix(pred, target, 3))
    # objects in truth or prediction: 6 pixels (all but the two 0/0); in both: pixels 3, 4, 6, 7
    assert s["item_iou"] == pytest.approx(100.0 * 4 / 6)
    assert s["naming_acc"] == pytest.approx(100.0 * 2 / 4)          # pixels 3 and 7 named right
    # pixels 4 and 6 given their true class: pred = [0, 1, 0, 1, 1, 0, 2, 2]
    named = scores(confusion_matrix(torch.tensor([0, 1, 0, 1, 1, 0, 2, 2]), target, 3))["miou"]
    assert s["miou_if_named"] == pytest.approx(named) and named > s["miou"]
    assert s["confusion"] == confusion_matrix(pred, target, 3).tolist()
    perfect = scores(confusion_matrix(target, target, 3))
    assert perfect["item_iou"] == perfect["naming_acc"] == perfect["miou_if_named"] == pytest.approx(100.0)
    nothing = scores(confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 3))
    assert nothing["item_iou"] is None and nothing["naming_acc"] is None   # no object anywhere


def test_bad_targets_rejected():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3)


def test_metric_update_from_logits_and_batches():
    m = SegMetric(3, ["bg", "a", "b"])
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = 5   # -> 0
    logits[0, 1, 0, 1] = 5   # -> 1
    logits[0, 1, 1, 0] = 5   # -> 1 (gt 2)
    m.update(logits, (torch.zeros(1, 3, 2, 2), target))
    m.update(torch.tensor([[[0, 1], [2, 2]]]), {"image": None, "mask": target})   # a label map, a dict batch
    s = m.compute()
    assert m.conf.tolist() == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    assert s["per_class_iou"] == pytest.approx([100.0, 200 / 3, 50.0])
    assert s["class_names"] == ["bg", "a", "b"]
    assert m.compute() == s   # compute() does not change the state
    with pytest.raises(ValueError, match="predicts 4 classes"):
        m.update(torch.zeros(1, 4, 2, 2), (None, target))
    # logits of another size are resized to the mask's
    m2 = SegMetric(2)
    big = torch.zeros(1, 2, 3, 3)
    big[0, 1] = 1.0
    m2.update(big, (None, torch.ones(1, 5, 5, dtype=torch.long)))
    assert m2.compute()["pixel_acc"] == 100.0


def _worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        target = torch.randint(0, 4, (6, 5, 7), generator=g)
        target[:, 0, 0] = 255
        pred = torch.randint(0, 4, (6, 5, 7), generator=g)
        m = SegMetric(4)
        for i in range(rank, 6, world):          # each rank sees its own images
            m.update(pred[i:i + 1], (None, target[i:i + 1]))
        res = m.compute()
        local = m.conf.clone()
        torch.save({"res": res, "local": local}, os.path.join(out, f"r{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_confusion_matrix_reduced_over_two_processes(tmp_path):
    spawn(_worker, 2, 2, str(tmp_path / "init"), str(tmp_path))
    r0 = torch.load(tmp_path / "r0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "r1.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 5, 7), generator=g)
    target[:, 0, 0] = 255
    pred = torch.randint(0, 4, (6, 5, 7), generator=g)
    whole = scores(confusion_matrix(pred, target, 4))
    assert not torch.equal(r0["local"], r1["local"])               # the ranks saw different data
    assert torch.equal(r0["local"] + r1["local"], confusion_matrix(pred, target, 4))
    for r in (r0, r1):                                             # both ranks report the global figures
        assert r["res"]["miou"] == pytest.approx(whole["miou"])
        assert r["res"]["pixels"] == 6 * 34
        assert r["res"]["per_class_iou"] == pytest.approx(whole["per_class_iou"])
