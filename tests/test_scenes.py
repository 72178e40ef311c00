"""The shared offline scene set (common/scenes.py): determinism, boxes vs masks, VOC XML, COCO JSON."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from common import UserError
from common import scenes

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(scenes.fashion_mnist_dir(), "t10k-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed (bash scripts/setup.sh installs it)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scenes"))
    return scenes.make_scenes(out, 6, 4, size=96, seed=3, log=None)


def _voc(paths, img_id):
    root = ET.parse(os.path.join(paths.voc2007, "Annotations", f"{img_id}.xml")).getroot()
    objs = []
    for o in root.findall("object"):
        bb = o.find("bndbox")
        objs.append((o.find("name").text, int(o.find("difficult").text),
                     tuple(int(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))))
    size = root.find("size")
    return root.find("filename").text, (int(size.find("width").text), int(size.find("height").text)), objs


def _pngs(paths, img_id):
    cls = Image.open(os.path.join(paths.voc2007, "SegmentationClass", f"{img_id}.png"))
    obj = Image.open(os.path.join(paths.voc2007, "SegmentationObject", f"{img_id}.png"))
    assert cls.mode == "P" and obj.mode == "P"
    assert cls.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC colour map
    return np.asarray(cls), np.asarray(obj)


def test_layout(scene_set):
    p = scene_set
    assert p.train_ids == [f"{i:06d}" for i in range(1, 7)] and p.test_ids == [f"{i:06d}" for i in range(7, 11)]
    v = p.voc2007
    read = lambda f: open(os.path.join(v, "ImageSets", f)).read().split()  # noqa: E731
    assert read("Main/trainval.txt") == p.train_ids == read("Segmentation/train.txt")
    assert read("Main/test.txt") == p.test_ids == read("Segmentation/val.txt")
    assert os.readlink(os.path.join(p.voc_root, "VOC2012")) == "VOC2007"
    assert sorted(os.listdir(os.path.join(p.voc_root, "VOC2012", "JPEGImages"))) == [f"{i}.jpg" for i in p.train_ids + p.test_ids]
    assert sorted(os.listdir(os.path.join(p.coco_root, "train2017"))) == [f"{i}.jpg" for i in p.train_ids]
    assert sorted(os.listdir(os.path.join(p.coco_root, "val2017"))) == [f"{i}.jpg" for i in p.test_ids]
    assert open(p.classes).read().split() == list(scenes.CLASSES)
    assert open(p.classes_seg).read().split() == ["background"] + list(scenes.CLASSES)
    im = Image.open(os.path.join(v, "JPEGImages", "000001.jpg"))
    assert im.mode == "RGB" and im.size == (96, 96)
    # the background is not flat: a smooth gradient / texture with many distinct colours
    arr = np.asarray(im)
    cls, _ = _pngs(p, "000001")
    assert arr[cls == 0].std(0).min() > 10


def test_boxes_equal_mask_extents_and_xml(scene_set):
    p = scene_set
    n_items = []
    for img_id in p.train_ids + p.test_ids:
        fname, size, objs = _voc(p, img_id)
        assert fname == f"{img_id}.jpg" and size == (96, 96)
        cls, obj = _pngs(p, img_id)
        assert 1 <= len(objs) <= 4
        n_items.append(len(objs))
        assert set(np.unique(obj)) == set(range(len(objs) + 1))  # no ignore band by default
        for k, (name, difficult, (x0, y0, x1, y1)) in enumerate(objs):
            assert difficult == 0 and name in scenes.CLASSES
            ys, xs = np.nonzero(obj == k + 1)
            # VOC: 1-based inclusive pixel coordinates of the visible mask's extent
            assert (x0, y0, x1, y1) == (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)
            assert (cls[obj == k + 1] == scenes.CLASSES.index(name) + 1).all()
        assert ((cls == 0) == (obj == 0)).all()
    assert len(set(n_items)) > 1   # scenes differ in their item counts


def test_coco_json_matches_pngs(scene_set):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    p = scene_set
    for split, ids in (("train2017", p.train_ids), ("val2017", p.test_ids)):
        coco = COCO(os.path.join(p.coco_root, "annotations", f"instances_{split}.json"))
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert [coco.loadCats(i)[0]["name"] for i in range(1, 11)] == list(scenes.CLASSES)
        assert sorted(coco.getImgIds()) == [int(i) for i in ids]
        for img_id in ids:
            info = coco.loadImgs(int(img_id))[0]
            assert info["file_name"] == f"{img_id}.jpg" and (info["width"], info["height"]) == (96, 96)
            assert os.path.isfile(os.path.join(p.coco_root, split, info["file_name"]))
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=int(img_id))), key=lambda a: a["id"])
            _, _, objs = _voc(p, img_id)
            cls, obj = _pngs(p, img_id)
            assert len(anns) == len(objs)
            for k, (a, (name, _, (x0, y0, x1, y1))) in enumerate(zip(anns, objs)):
                m = coco.annToMask(a)
                assert (m.astype(bool) == (obj == k + 1)).all()
                assert a["iscrowd"] == 0 and a["area"] == int(m.sum()) == int(mask_utils.area(a["segmentation"]))
                assert a["bbox"] == [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]
                assert list(mask_utils.toBbox(a["segmentation"])) == a["bbox"]
                assert coco.loadCats(a["category_id"])[0]["name"] == name


def test_deterministic_and_idempotent(scene_set, tmp_path):
    a = scenes.make_scenes(str(tmp_path / "a"), 6, 4, size=96, seed=3, log=None)
    files = ["JPEGImages/000002.jpg", "Annotations/000005.xml", "SegmentationObject/000008.png"]
    for f in files:
        assert open(os.path.join(a.voc2007, f), "rb").read() == open(os.path.join(scene_set.voc2007, f), "rb").read()
    again = scenes.make_scenes(str(tmp_path / "a"), 6, 4, size=96, seed=3, log=None)
    assert a.generated and not again.generated
    stamp = json.load(open(tmp_path / "a" / "scenes.json"))
    assert stamp["seed"] == 3 and stamp["train"] == 6
    # another seed gives other scenes; the same seed with more scenes starts with the same ones
    with pytest.raises(UserError, match="holds a scene set of other parameters"):  # nothing replaced unasked
        scenes.make_scenes(str(tmp_path / "a"), 7, 4, size=96, seed=4, log=None)
    b = scenes.make_scenes(str(tmp_path / "a"), 7, 4, size=96, seed=4, log=None, replace=True)
    assert b.generated
    assert open(os.path.join(b.voc2007, files[0]), "rb").read() != open(os.path.join(scene_set.voc2007, files[0]), "rb").read()
    c = scenes.make_scenes(str(tmp_path / "c"), 8, 4, size=96, seed=3, log=None)
    assert open(os.path.join(c.voc2007, files[0]), "rb").read() == open(os.path.join(scene_set.voc2007, files[0]), "rb").read()
    assert not os.path.exists(os.path.join(str(tmp_path / "a"), f".scenes-tmp-{os.getpid()}"))


def _tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            out[os.path.relpath(os.path.join(d, f), root)] = open(os.path.join(d, f), "rb").read()
    return out


def test_worker_processes_write_the_same_set(tmp_path):
    """Scenes rendered by two worker processes (several chunks) are the files of the in-process run, byte for
    byte, COCO JSON included; so are Fashion-MNIST canvases of the backbone pretraining."""
    from common import pretrain
    a = scenes.make_scenes(str(tmp_path / "a"), 150, 10, size=32, seed=5, log=None, workers=0)
    b = scenes.make_scenes(str(tmp_path / "b"), 150, 10, size=32, seed=5, log=None, workers=2)
    ta, tb = _tree(a.root), _tree(b.root)
    assert len(ta) > 4 * 160 and ta == tb
    one = pretrain.fashion_canvases("test", 300, 32, (0.6, 1.0), 2, workers=0)
    two = pretrain.fashion_canvases("test", 300, 32, (0.6, 1.0), 2, workers=2)
    assert one.images.shape == (300, 3, 32, 32) and one.labels.unique().numel() > 5
    assert one.images.equal(two.images) and one.labels.equal(two.labels)


def test_border_option(tmp_path):
    p = scenes.make_scenes(str(tmp_path), 2, 1, size=64, seed=0, border=1, log=None)
    cls, obj = _pngs(p, "000001")
    assert (cls == 255).any() and ((cls == 255) == (obj == 255)).all()
    _, _, objs = _voc(p, "000001")
    assert set(np.unique(obj)) - {255} <= set(range(len(objs) + 1))


def test_cli_and_bad_input(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "common.scenes", "--out", str(tmp_path / "s"), "--train", "2",
                        "--test", "1", "--size", "64", "--seed", "1"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "s" / "coco" / "annotations" / "instances_val2017.json")
    r = subprocess.run([sys.executable, "-m", "common.scenes", "--out", str(tmp_path / "s"), "--train", "0"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    os.makedirs(tmp_path / "foreign" / "VOCdevkit")
    with pytest.raises(UserError, match="did not write"):
        scenes.make_scenes(str(tmp_path / "foreign"), 2, 1, size=64, log=None)
    with pytest.raises(UserError, match="not found"):
        scenes.make_scenes(str(tmp_path / "x"), 2, 1, size=64, source=str(tmp_path), log=None)
    for scale in ((0.9, 0.2), (0.0, 0.5), (0.5, 1.5)):
        with pytest.raises(UserError, match="--scale"):
            scenes.make_scenes(str(tmp_path / "y"), 2, 1, size=64, scale=scale, log=None)
